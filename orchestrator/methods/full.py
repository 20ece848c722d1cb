"""Full fine-tuning: every parameter of the pretrained model trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.methods.base import MethodContext, TrainBatchOutput, model_loss


class FullFineTune:
    name = "full"

    def prepare_model(self, model: torch.nn.Module, config: JobConfig, context: MethodContext) -> torch.nn.Module:
        return model

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        return model_loss(model, batch)

    def save_weights(
        self, module: torch.nn.Module, state: dict[str, torch.Tensor], destination: Path, config: JobConfig
    ) -> None:
        module.save_pretrained(str(destination), state_dict=state, safe_serialization=True)
