"""L2 toward the starting weights (L2-SP, Li et al. 2018): a regulariser against forgetting beyond replay.

A retraining round warm-starts from the champion; adding ``weight/2 · Σ‖θ − θ₀‖²`` over the trainable
parameters to the loss keeps the new model near the one that served well on the old data. It needs the
whole parameters on every rank (ZeRO stage 0-2; the config refuses it with stage 3).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from orchestrator.methods.base import TrainBatchOutput


@dataclass
class WeightAnchor:
    """The starting values of the trainable parameters and the pull toward them."""

    weight: float
    params: list[torch.nn.Parameter]
    start: list[torch.Tensor]

    @classmethod
    def capture(cls, module: torch.nn.Module, weight: float) -> WeightAnchor | None:
        """Copy the trainable parameters now (before any step or checkpoint load); None when weight is 0."""
        if weight <= 0:
            return None
        params = [p for p in module.parameters() if p.requires_grad]
        return cls(weight=weight, params=params, start=[p.detach().clone() for p in params])

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.params[0].device, dtype=torch.float32) if self.params else torch.zeros(())
        for p, p0 in zip(self.params, self.start):
            total = total + (p.float() - p0.float()).pow(2).sum()
        return 0.5 * self.weight * total

    def add_to(self, output: TrainBatchOutput) -> TrainBatchOutput:
        """The method's output with the penalty added to its loss (and logged as ``train/l2_to_start``)."""
        penalty = self.penalty()
        extra = dict(output.extra or {})
        extra["l2_to_start"] = float(penalty.detach())
        return replace(output, loss=output.loss + penalty.to(output.loss.dtype), extra=extra)
