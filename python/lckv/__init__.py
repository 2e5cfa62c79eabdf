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

__all__ = ["LCKVConfig", "LCKVForCausalLM", "CausalLMOutput", "GenerationOutput", "ConfigError", "CheckpointError", "TrainError",
           "FileError", "GenerationConfig", "SamplingConfig", "StreamingOptions", "data", "ops"]
__all__ += ["load_tokenizer"]
