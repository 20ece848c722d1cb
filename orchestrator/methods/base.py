"""The contract between the engine and a training method."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from orchestrator.config import JobConfig
    from orchestrator.models.weight_stream import WeightStream


@dataclass
class TrainBatchOutput:
    """What a method returns for one micro-batch: the loss to back-propagate and the model logits."""

    loss: torch.Tensor
    logits: torch.Tensor
    extra: dict[str, float] | None = None


@dataclass
class MethodContext:
    """What a method may need from the worker it runs in."""

    model_path: str  # the resolved model.path
    device: Any
    precision: str
    world_size: int


class Method(Protocol):
    """A training method: how the model to train is prepared, how a batch's loss is computed, and how
    the trained weights are written into an exported folder."""

    name: str

    def prepare_model(self, model: torch.nn.Module, config: JobConfig, context: MethodContext) -> torch.nn.Module:
        """Turn the loaded pretrained model into the module DeepSpeed wraps (e.g. add adapters)."""
        ...

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        """Forward one micro-batch through the (DeepSpeed-wrapped) model and return the loss."""
        ...

    def save_weights(
        self, module: torch.nn.Module, weights: WeightStream, destination: Path | None, config: JobConfig
    ) -> None:
        """Write the weights into an export folder, streaming them from ``weights`` (a module at a time, gathered
        under ZeRO-3). Called on every rank, since the gathers are collective; ``destination`` is None on the
        ranks that do not write (all but rank 0)."""
        ...


def model_loss(model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
    """The loss the model computes itself from ``labels`` (HF models); shared by full and LoRA."""
    outputs = model(**batch)
    return TrainBatchOutput(loss=outputs.loss, logits=outputs.logits)


_METHODS: dict[str, Method] = {}  # name -> method, imported
_LAZY_METHODS: dict[str, str] = {}  # name -> "module:attribute" of its class, imported on first get_method


def register_method(method: Method) -> None:
    """Make a method available as ``method: <name>`` in job configs."""
    if method.name in _METHODS or method.name in _LAZY_METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method


def _register_lazy_method(name: str, target: str) -> None:
    """Make a method available by name without importing it: ``target`` (``"package.module:ClassName"``)
    is imported and instantiated (no arguments) on the first ``get_method(name)``.

    Raises:
        ValueError: when a method of that name is already registered.
    """
    if name in _METHODS or name in _LAZY_METHODS:
        raise ValueError(f"a method named {name!r} is already registered")
    _LAZY_METHODS[name] = target


def get_method(name: str) -> Method:
    """The method registered as ``name``, importing it on first use if it was registered lazily.

    Raises:
        ValueError: naming the registered methods when none is called ``name``.
    """
    if name not in _METHODS and name in _LAZY_METHODS:
        module_name, _, attribute = _LAZY_METHODS[name].partition(":")
        method_class = getattr(importlib.import_module(module_name), attribute)
        _METHODS.setdefault(name, method_class())  # one instance per name, as register_method keeps
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names of the registered methods, sorted (lazily registered ones are not imported)."""
    return sorted({*_METHODS, *_LAZY_METHODS})
