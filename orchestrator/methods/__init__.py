"""Training methods, registered by name (PEFT's ``register_peft_method`` pattern).

A method turns a loaded pretrained model into what the engine trains and says how to compute the loss.
Adding a method is one new module here plus one line in ``_BUILTIN_METHODS`` below. The built-in
methods are registered by where they live and imported on the first ``get_method(name)``, so importing
this package (as :mod:`orchestrator.config` does to list the method names) imports neither torch nor the
config.
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.methods.base import (
    Method,
    MethodContext,
    TrainBatchOutput,
    _register_lazy_method,
    available_methods,
    get_method,
    register_method,
)

# Built-in methods: name -> "module:class" (instantiated without arguments on the first get_method).
_BUILTIN_METHODS = {
    "full": "orchestrator.methods.full:FullFineTune",
    "distill": "orchestrator.methods.distillation:Distill",
    "lora": "orchestrator.methods.lora:LoraMethod",
}
for _name, _target in _BUILTIN_METHODS.items():
    _register_lazy_method(_name, _target)
del _name, _target

# The built-in classes (FullFineTune, Distill, LoraMethod) stay importable from this package, on first access.
_CLASS_MODULES = {target.partition(":")[2]: target.partition(":")[0] for target in _BUILTIN_METHODS.values()}


def __getattr__(name: str) -> Any:
    """``from orchestrator.methods import LoraMethod`` and the like: import the class's module on demand."""
    if name in _CLASS_MODULES:
        return getattr(importlib.import_module(_CLASS_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "MethodContext", "TrainBatchOutput", "available_methods", "get_method", "register_method"]
