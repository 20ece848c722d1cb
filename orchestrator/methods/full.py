"""Full fine-tuning: every parameter of the pretrained model trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.methods.base import MethodContext, TrainBatchOutput, model_loss
from orchestrator.models.weight_stream import WeightStream, write_pretrained


class FullFineTune:
    name = "full"

    def prepare_model(self, model: torch.nn.Module, config: JobConfig, context: MethodContext) -> torch.nn.Module:
        return model

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        return model_loss(model, batch)

    def save_weights(
        self, module: torch.nn.Module, weights: WeightStream, destination: Path | None, config: JobConfig
    ) -> None:
        write_pretrained(module, weights.tensors(), destination, max_shard_bytes=config.output.max_shard_bytes)
