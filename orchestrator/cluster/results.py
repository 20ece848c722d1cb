"""What a training run returns to its caller: where its outputs are and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    best_metric: float | None
    final_model: Path | None
    best_model: Path | None
    checkpoint_path: str | None
    wandb: str | None
    data: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None  # the registry id of the exported model (output.registry)
