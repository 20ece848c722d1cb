"""The contract between the engine and a training method."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from orchestrator.config import JobConfig


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
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], destination: Path, config: JobConfig
    ) -> None:
        """Write the weights (gathered full state dict, rank 0) into an export folder."""
        ...


def model_loss(model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
    """The loss the model computes itself from ``labels`` (HF models); shared by full and LoRA."""
    outputs = model(**batch)
    return TrainBatchOutput(loss=outputs.loss, logits=outputs.logits)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Make a method available as ``method: <name>`` in job configs."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _METHODS[method.name] = method


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    return sorted(_METHODS)
