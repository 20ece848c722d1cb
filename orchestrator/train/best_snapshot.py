"""The weights of the best evaluation so far, kept without stalling training: each rank copies its 1/N share of
every parameter in place at an improvement (no gather, no file written), and ``best/`` is exported once, after
the last step, from those shares.

Exporting at every improvement gathers the whole model to rank 0 and writes it each time, which for a large
model stands training still for minutes per improvement. The snapshot costs one local copy of 1/N of the model
of what trains per rank (under ZeRO-3 that is the rank's own partition; a LoRA run copies only its adapters and
head) and nothing else until the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


def _params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that can change: frozen ones (a LoRA base, groups frozen for the run) are not copied."""
    return [p for p in module.parameters() if p.requires_grad]  # deduplicated: a tied weight once


class BestSnapshot:
    """This rank's share of ``module``'s parameters at the best evaluation, and the metrics of that evaluation."""

    def __init__(self, module: torch.nn.Module, *, rank: int, world_size: int):
        self.module, self.rank, self.world_size = module, rank, world_size
        self.shares: list[torch.Tensor] | None = None
        self.metrics: dict[str, Any] | None = None
        self.step: int | None = None

    def _share(self, param: torch.nn.Parameter) -> torch.Tensor:
        if hasattr(param, "ds_tensor"):  # ZeRO-3: the rank's partition already is its share
            return param.ds_tensor.detach()
        flat = param.data.view(-1)
        size = math.ceil(flat.numel() / self.world_size)
        return flat[self.rank * size : (self.rank + 1) * size]

    def take(self, step: int, metrics: dict[str, Any]) -> None:
        """Copy this rank's shares now (every rank, at the same step)."""
        with torch.no_grad():
            if self.shares is None:
                self.shares = [self._share(p).clone() for p in _params(self.module)]
            else:
                for kept, param in zip(self.shares, _params(self.module)):
                    kept.copy_(self._share(param))
        self.step, self.metrics = step, dict(metrics)

    def restore(self) -> None:
        """Put the snapshot back into the module (after training: the final weights are exported and checkpointed
        already). Under ZeRO-3 each rank writes its partition back; otherwise the shares are all-gathered into the
        whole parameters every rank holds."""
        assert self.shares is not None
        with torch.no_grad():
            for kept, param in zip(self.shares, _params(self.module)):
                if hasattr(param, "ds_tensor"):
                    param.ds_tensor.copy_(kept)
                    continue
                flat = param.data.view(-1)  # a view: writing it writes the parameter
                size = math.ceil(flat.numel() / self.world_size)
                if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
                    flat.copy_(kept)
                    continue
                padded = torch.zeros(size, dtype=kept.dtype, device=flat.device)
                padded[: kept.numel()].copy_(kept)
                gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
                dist.all_gather(gathered, padded)
                flat.copy_(torch.cat(gathered)[: flat.numel()])
