"""Full fine-tuning: every parameter of the pretrained model trains."""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.methods.base import TrainBatchOutput


class FullFineTune:
    name = "full"

    def prepare_model(self, model: torch.nn.Module, config: JobConfig) -> torch.nn.Module:
        return model

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        outputs = model(**batch)
        return TrainBatchOutput(loss=outputs.loss, logits=outputs.logits)
