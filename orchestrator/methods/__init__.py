"""Training methods, registered by name (PEFT's ``register_peft_method`` pattern).

A method turns a loaded pretrained model into what the engine trains and says how to compute the loss.
Adding a method is one new module here plus one ``register_method`` line below.
"""

from __future__ import annotations

from orchestrator.methods.base import (
    Method,
    MethodContext,
    TrainBatchOutput,
    available_methods,
    get_method,
    register_method,
)
from orchestrator.methods.distillation import Distill
from orchestrator.methods.full import FullFineTune
from orchestrator.methods.lora import LoraMethod

register_method(FullFineTune())
register_method(Distill())
register_method(LoraMethod())

__all__ = ["Method", "MethodContext", "TrainBatchOutput", "available_methods", "get_method", "register_method"]
