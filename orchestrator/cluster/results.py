"""What a training run returns to its caller: where its outputs are and how it ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """Paths are local ``Path`` objects for a local ``output.dir``, URI strings (``s3://...``) for a bucket's:
    read them with ``orchestrator.storage`` (a model folder on a bucket is complete once
    ``orchestrator.run_outputs.is_published`` says so; ``final_model``/``best_model`` are set only then)."""

    run_dir: Path | str
    metrics: dict[str, Any]
    best_metric: float | None
    final_model: Path | str | None
    best_model: Path | str | None
    checkpoint_path: str | None
    wandb: str | None
    data: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None  # the registry id of the exported model (output.registry)
    # The run's end against the model it started from (orchestrator.start_vs_end.compare); None when not scored.
    start_vs_end: dict[str, Any] | None = None
