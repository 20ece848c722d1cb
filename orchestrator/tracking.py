"""Experiment tracking from rank 0: a local ``metrics.jsonl`` and one W&B run per job.

W&B mode 'auto' is online when ``WANDB_API_KEY`` is set and offline otherwise. The key is read by the
wandb library from the environment; it is never copied into configs, logs or files here.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"

# Environment variables whose values must never reach a log, a saved config or W&B.
SECRET_ENV_VARS = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")


def resolve_wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Writes metrics to metrics.jsonl and W&B. Create it on rank 0 only; other ranks get a no-op."""

    def __init__(self, config: JobConfig, run_dir: Path, *, enabled: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run: Any = None
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        wandb_cfg = config.tracking.wandb
        mode = resolve_wandb_mode(wandb_cfg.mode)
        if mode == "disabled":
            return
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        # A restarted run (worker failure, --resume) continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.wandb_run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            group=wandb_cfg.group,
            tags=wandb_cfg.tags,
            name=wandb_cfg.run_name or config.name,
            job_type=wandb_cfg.job_type,
            config=config.to_dict(),
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    @property
    def wandb_path(self) -> str | None:
        if self.wandb_run is None:
            return None
        if self.wandb_run.settings.mode == "offline" or getattr(self.wandb_run, "offline", False):
            return str(Path(self.wandb_run.dir).parent)
        return self.wandb_run.path if isinstance(self.wandb_run.path, str) else "/".join(self.wandb_run.path)

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.enabled and self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = value

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return records
