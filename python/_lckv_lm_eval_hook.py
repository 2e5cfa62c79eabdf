"""Registers the lm-evaluation-harness model `lckv` when lm_eval's registry is imported.

lm-eval 0.4 discovers models only through its own registry (lm_eval.api.registry.model_registry:
no plugin entry points), so `lm_eval --model lckv` needs `lckv` registered before the command
looks the name up. lckv_lm_eval.pth, installed next to the package, imports this module at
interpreter start-up. It imports nothing heavy (neither torch nor lm_eval): it adds an import hook
that, right after lm_eval.api.registry has run, registers `lckv` lazily as
"lckv.lm_eval_adapter:LCKVLM" (lckv and torch are imported when the model is created).
"""

import importlib.abc
import sys

_REGISTRY = "lm_eval.api.registry"
_TARGET = "lckv.lm_eval_adapter:LCKVLM"


def _register(registry_module) -> None:
    registry = registry_module.model_registry
    if "lckv" not in registry:
        registry.register("lckv", target=_TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _REGISTRY:
            return None
        spec = None
        for finder in sys.meta_path:  # whoever would have found it without us
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if _REGISTRY in sys.modules:
        _register(sys.modules[_REGISTRY])
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()
