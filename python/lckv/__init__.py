"""LCKV (Layer-Condensed KV Cache, Wu & Tu 2024) for PyTorch.

The model, the condensed attention op and the data loaders are the C++ library (lckv._C); this
package adds the PyTorch conventions around them.
"""

import os
import sys

# OpenMP waits passively unless the user chose (issue 12 §4: spinning idle workers made training on a
# shared machine 4.7-12x slower). libgomp reads OMP_WAIT_POLICY once, when torch loads it, so this
# only works before torch is imported (as in `python -m lckv.train`). After that the variable is left
# unset, without a warning: it would then describe a policy the running runtime does not use, and a
# warning would fire on the most common import order for a matter of performance on busy machines.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

_REBUILD = "rebuild with `pip install --no-build-isolation -e .` (or scripts/setup.sh)"


def _check_torch_version(built: str, installed: str) -> None:
    """Raises ImportError when the extension was compiled against another torch than the running one."""
    if built != installed:
        raise ImportError(f"lckv._C was built against torch {built} but torch {installed} is installed; {_REBUILD}")


try:
    from . import _C
except ImportError as e:  # not built yet, or built for a torch whose symbols differ
    raise ImportError(f"cannot load lckv._C ({e}) with torch {torch.__version__}; {_REBUILD}") from e

_check_torch_version(_C.__torch_version__, torch.__version__)

from . import data, ops  # noqa: E402
from .config import LCKVConfig  # noqa: E402
from .model import CausalLMOutput, GenerationOutput, LCKVForCausalLM  # noqa: E402

ConfigError = _C.ConfigError
CheckpointError = _C.CheckpointError
TrainError = _C.TrainError
FileError = _C.FileError
GenerationConfig = _C.GenerationConfig
SamplingConfig = _C.SamplingConfig
StreamingOptions = _C.StreamingOptions


def _register_with_transformers() -> None:
    """lckv.hf's classes join AutoConfig / AutoModelForCausalLM (docs/design.md §5). Importing transformers costs
    seconds, so `import lckv` does not: it registers now if transformers is already imported, else right after the
    program imports it (a one-shot import hook). A failure warns and leaves transformers usable."""

    def register():
        try:
            from . import hf  # noqa: F401  (registers on import)
        except Exception as e:  # an incompatible transformers must not break `import transformers`
            import warnings

            warnings.warn(f"lckv: could not register its classes with transformers ({type(e).__name__}: {e})")

    if "transformers" in sys.modules:
        return register()
    import importlib.abc
    import importlib.machinery

    class RegisterAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "transformers":
                return None
            # importlib.util.find_spec("transformers") (an availability check) also lands here: the hook stays
            # until a spec it returned is executed.
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                register()

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, RegisterAfterImport())


_register_with_transformers()

__all__ = ["LCKVConfig", "LCKVForCausalLM", "CausalLMOutput", "GenerationOutput", "ConfigError", "CheckpointError", "TrainError",
           "FileError", "GenerationConfig", "SamplingConfig", "StreamingOptions", "data", "ops"]
