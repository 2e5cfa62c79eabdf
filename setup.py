"""Builds the Python package `lckv` and its extension `lckv._C` through CMake.

The extension links the same static library as the C++ programs (CMake target `lckv_python`),
built against the torch of the Python that runs this file. Install into an environment that
already has torch, without build isolation (an isolated build environment has no torch):

    pip install --no-build-isolation -e .     # or: scripts/setup.sh

LCKV_PY_BUILD_DIR chooses the CMake build directory (default: build-py), LCKV_BUILD_JOBS the
number of parallel compile jobs (default: 2).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import torch
        except ImportError:
            sys.exit(
                "lckv needs torch installed in the Python that builds it "
                f"({sys.executable}); with pip, pass --no-build-isolation"
            )
        build_dir = Path(os.environ.get("LCKV_PY_BUILD_DIR", ROOT / "build-py")).resolve()
        jobs = os.environ.get("LCKV_BUILD_JOBS", "2")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", "-Wno-dev",
            "-DCMAKE_BUILD_TYPE=Release", "-DLCKV_PIC=ON", f"-DLCKV_PYTHON={sys.executable}",
        ]
        # Reconfigure only when the build directory is new or was made for another Python.
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists() or f"LCKV_PYTHON:FILEPATH={sys.executable}\n" not in cache.read_text():
            subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", ext.target], check=True)
        built = sorted(build_dir.glob("_C.*.so"))
        if not built:
            sys.exit(
                f"CMake built no {ext.target} in {build_dir}: is the development package of Python "
                f"{sys.version_info.major}.{sys.version_info.minor} installed (python3-dev)?"
            )
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A fresh modification time, not the build's: --inplace then copies dest into python/lckv only if it is newer
        # than the file there, so preserving the time of an older build tree (another LCKV_PY_BUILD_DIR) left the
        # previously installed extension in place, silently.
        shutil.copy(built[-1], dest)
        print(f"lckv._C built against torch {torch.__version__}: {dest}")


class BuildPyWithPresets(build_py):
    """Ships configs/*.json inside the package (lckv/configs) for non-editable installs."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "lckv" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for preset in (ROOT / "configs").glob("*.json"):
            shutil.copy2(preset, target / preset.name)
        # lm-eval's `--model lckv` (python/_lckv_lm_eval_hook.py): the .pth lands in site-packages.
        shutil.copy2(LM_EVAL_PTH, Path(self.build_lib) / LM_EVAL_PTH.name)


# lckv_lm_eval.pth: one line run at interpreter start-up that registers the lm-eval model `lckv`
# (python/_lckv_lm_eval_hook.py: an import hook, nothing imported until lm_eval's registry is).
LM_EVAL_PTH = ROOT / "python" / "lckv_lm_eval.pth"


class DevelopWithLmEvalHook(develop):
    """pip install -e . (setup.py develop): also puts lckv_lm_eval.pth into site-packages."""

    def run(self) -> None:
        super().run()
        installed = Path(self.install_dir) / LM_EVAL_PTH.name
        if self.uninstall:
            installed.unlink(missing_ok=True)
        else:
            shutil.copy2(LM_EVAL_PTH, installed)


setup(
    name="lckv",
    version="0.1.0",
    description="Layer-Condensed KV Cache (LCKV): the C++/LibTorch model as a PyTorch module",
    python_requires=">=3.9",
    install_requires=["torch"],
    package_dir={"": "python"},
    packages=["lckv"],
    py_modules=["_lckv_lm_eval_hook"],
    ext_modules=[CMakeExtension("lckv._C", target="lckv_python")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithPresets, "develop": DevelopWithLmEvalHook},
    # setuptools' staging area, out of build/ (the C++ build directory of scripts/setup.sh).
    options={"build": {"build_base": str(ROOT / "build-py" / "setuptools")}},
    zip_safe=False,
)
