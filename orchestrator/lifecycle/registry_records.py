"""Registry records: the rows of the registry's ``models`` and ``rounds`` tables as dataclasses, the converters
from SQLite rows, and the registry's error.

Statuses of a model: ``candidate`` (registered, not yet judged), ``champion`` (the one model of its name that
serves and that retraining warm-starts from), ``rejected`` (a retraining candidate the promotion gate turned
down) and ``archived`` (a former champion). A round is ``claimed`` or ``running`` while active, then
``succeeded``, ``skipped``, ``failed`` or ``abandoned``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError

STATUSES = ("candidate", "champion", "rejected", "archived")
ACTIVE_ROUND_STATUSES = ("claimed", "running")

MODEL_COLUMNS = (
    "id, name, version, parent_id, parent_ref, teacher_id, teacher_ref, method, base_model, licence, config_json, "
    "data_json, metrics_json, artifact, checkpoint, code_version, created_at, status, decision, decision_reason, "
    "round, wandb_artifact, weights_sha256, files_json"
)


class RegistryError(OrchestratorError):
    """A registry operation cannot be done (unknown id, no champion to roll back to, ...)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ModelRecord:
    """One registered model (a row of ``models`` with its JSON columns parsed)."""

    id: str
    name: str
    version: int
    parent_id: str | None
    parent_ref: str | None
    teacher_id: str | None
    teacher_ref: str | None
    method: str
    base_model: str | None
    licence: str | None
    config: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, Any]
    artifact: str
    checkpoint: str | None
    code_version: str | None
    created_at: str
    status: str
    decision: str | None = None
    decision_reason: str | None = None
    round: int | None = None
    wandb_artifact: str | None = None
    weights_sha256: str | None = None  # one sha256 over the files' hashes (None: registered before hashes were)
    files: dict[str, str] | None = None  # sha256 of every file of the artifact folder, by relative path

    @property
    def parent(self) -> str | None:
        """The registered parent's id, or the path/hub id of the model it started from."""
        return self.parent_id or self.parent_ref

    @property
    def eval_metrics(self) -> dict[str, dict[str, float]]:
        """``{eval set: {metric: value}}`` of the registered (final) model."""
        return self.metrics.get("eval", {})

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RoundRecord:
    """One continual-retraining round of a model name."""

    id: int
    name: str
    round: int
    status: str  # claimed | running | succeeded | failed | abandoned
    submission_id: str | None
    host: str | None
    pid: int | None
    new_data: list[dict[str, Any]] = field(default_factory=list)
    spec: dict[str, Any] | None = None  # the resolved retrain config the round runs (absolute paths)
    candidate_id: str | None = None
    decision: str | None = None
    message: str | None = None
    created_at: str = ""
    updated_at: str = ""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_ROUND_STATUSES


def model_from_row(row: sqlite3.Row) -> ModelRecord:
    """A ``models`` row (selected as :data:`MODEL_COLUMNS`) as a record, its JSON columns parsed."""
    values = dict(row)
    return ModelRecord(
        config=json.loads(values.pop("config_json")),
        data=json.loads(values.pop("data_json")),
        metrics=json.loads(values.pop("metrics_json")),
        files=json.loads(files) if (files := values.pop("files_json", None)) else None,
        **values,
    )


def round_from_row(row: sqlite3.Row) -> RoundRecord:
    """A ``rounds`` row (``SELECT *``) as a record, its JSON columns parsed."""
    values = dict(row)
    spec = values.pop("spec_json")
    return RoundRecord(
        new_data=json.loads(values.pop("new_data_json")), spec=json.loads(spec) if spec else None, **values
    )


def artifact_key(path: str) -> str:
    """Artifacts are keyed by absolute local path, or by the URI as given."""
    if "://" in path and not path.startswith("file://"):
        return path.rstrip("/")
    local = path.removeprefix("file://")
    return str(Path(local).expanduser().resolve())
