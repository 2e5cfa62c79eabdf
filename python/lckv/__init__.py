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
from .data import load_tokenizer  # noqa: E402
from .model import CausalLMOutput, GenerationOutput, LCKVForCausalLM  # noqa: E402

ConfigError = _C.ConfigError
CheckpointError = _C.CheckpointError
TrainError = _C.TrainError
FileError = _C.FileError
GenerationConfig = _C.GenerationConfig
SamplingConfig = _C.SamplingConfig
StreamingOptions = _C.StreamingOptions


def _register_with_transformers() -> None:
    """lckv.hf's classes join AutoConfig / AutoModelForCausalLM (docs/design.md §5.1.1). Importing transformers costs
    seconds, so `import lckv` does not: each class is registered when the transformers module of its Auto class
    (configuration_auto, modeling_auto) has been imported, now or later (a one-shot import hook for each). A failure
    warns and leaves transformers usable."""
    registrations = {"transformers.models.auto.configuration_auto": "register_config",
                     "transformers.models.auto.modeling_auto": "register_model"}

    def register(module_name):
        try:
            from . import hf

            getattr(hf, registrations[module_name])()
        except Exception as e:  # an incompatible transformers must not break transformers
            import warnings

            warnings.warn(f"lckv: could not register its classes with transformers ({type(e).__name__}: {e})")

    pending = set()
    for name in registrations:
        if name in sys.modules:
            register(name)
        else:
            pending.add(name)
    if not pending:
        return
    import importlib.abc
    import importlib.machinery

    class RegisterAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name not in pending:
                return None
            # importlib.util.find_spec(name) (an availability check) also lands here: the module stays pending until
            # a spec returned here is executed.
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if name in pending:
                    pending.discard(name)
                    if not pending and self in sys.meta_path:
                        sys.meta_path.remove(self)
                    register(name)

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, RegisterAfterImport())


_register_with_transformers()

__all__ = ["LCKVConfig", "LCKVForCausalLM", "CausalLMOutput", "GenerationOutput", "ConfigError", "CheckpointError", "TrainError",
           "FileError", "GenerationConfig", "SamplingConfig", "StreamingOptions", "data", "ops"]
__all__ += ["load_tokenizer"]
