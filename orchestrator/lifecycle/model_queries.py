"""Reading and adding rows of the registry's ``models`` table.

Every registered model gets the id ``<name>-v<N>``, N the next version of that name, assigned inside the
write transaction that adds it (so two writers registering at once get distinct versions). Each function
takes a connection the caller opened (:class:`orchestrator.lifecycle.registry_schema.RegistryDatabase`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.lifecycle.registry_promotion import demote_champion, record_event
from orchestrator.lifecycle.registry_records import MODEL_COLUMNS, ModelRecord, RegistryError, model_from_row

_COLUMN_NAMES = [c.strip() for c in MODEL_COLUMNS.split(",")]


def select_model(conn: sqlite3.Connection, model_id: str) -> ModelRecord | None:
    """The model with this id, if registered."""
    row = conn.execute(f"SELECT {MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchone()
    return model_from_row(row) if row is not None else None


def select_models(
    conn: sqlite3.Connection,
    clauses: Sequence[str] = (),
    params: Sequence[Any] = (),
    *,
    order: str = "created_at, name, version",
    limit: int | None = None,
) -> list[ModelRecord]:
    """Models matching every clause (``"name = ?"``, with ``params`` in order), sorted by ``order``."""
    query = f"SELECT {MODEL_COLUMNS} FROM models"
    if clauses:
        query += " WHERE " + " AND ".join(clauses)
    query += f" ORDER BY {order}"
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    return [model_from_row(r) for r in conn.execute(query, list(params)).fetchall()]


def unknown_model(conn: sqlite3.Connection, model_id: str, path: Path) -> RegistryError:
    """The error for an id that is not registered, suggesting close ids among the 200 newest."""
    import difflib

    ids = [r[0] for r in conn.execute("SELECT id FROM models ORDER BY created_at DESC LIMIT 200")]
    close = difflib.get_close_matches(model_id, ids, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else " (orchestrator registry list shows the ids)"
    return RegistryError(f"no model {model_id!r} in {path}{hint}")


def insert_model(
    conn: sqlite3.Connection,
    name: str,
    fields: dict[str, Any],
    *,
    status: str,
    at: str,
    place: Callable[[str], str] | None = None,
) -> ModelRecord:
    """Add a model as the next version of ``name`` (inside the caller's write transaction) and read it back.

    Args:
        conn: a connection in a write transaction.
        name: the model name.
        fields: the other columns: method, artifact, config, data, metrics (as dicts), parent_id, parent_ref,
            teacher_id, teacher_ref, base_model, licence, checkpoint, code_version, round, weights_sha256 and
            files (a dict, or None).
        status: a valid status; 'champion' archives the current champion.
        at: the registration time.
        place: called with the new id inside the transaction; returns the artifact to record instead of
            ``fields["artifact"]`` (registration renames the staged version folder to its id this way).

    Raises:
        RegistryError: the parent or teacher id is not a registered model.
    """
    _check_registered(conn, (fields["parent_id"], fields["teacher_id"]))
    (latest,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM models WHERE name = ?", (name,)).fetchone()
    version = latest + 1
    model_id = f"{name}-v{version}"
    previous = demote_champion(conn, name) if status == "champion" else None
    if place is not None:
        fields = {**fields, "artifact": place(model_id)}
    row = {
        **fields,
        "id": model_id,
        "name": name,
        "version": version,
        "config_json": json.dumps(fields["config"], default=str),
        "data_json": json.dumps(fields["data"], default=str),
        "metrics_json": json.dumps(fields["metrics"], default=str),
        "files_json": json.dumps(fields["files"]) if fields.get("files") is not None else None,
        "weights_sha256": fields.get("weights_sha256"),
        "created_at": at,
        "status": status,
        "decision": None,
        "decision_reason": None,
        "wandb_artifact": None,
    }
    conn.execute(
        f"INSERT INTO models ({MODEL_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMN_NAMES))})",
        tuple(row[c] for c in _COLUMN_NAMES),
    )
    conn.execute(
        "INSERT INTO events (at, name, kind, model_id, previous_id, reason) VALUES (?, ?, 'register', ?, ?, ?)",
        (at, name, model_id, None, f"registered as {status}"),
    )
    if status == "champion":
        record_event(conn, name, "promote", model_id, previous, "registered as champion")
    return model_from_row(conn.execute(f"SELECT {MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchone())


def _check_registered(conn: sqlite3.Connection, refs: Sequence[str | None]) -> None:
    """Every id given (None: none) is a registered model."""
    for ref in refs:
        if ref is not None and conn.execute("SELECT 1 FROM models WHERE id = ?", (ref,)).fetchone() is None:
            raise RegistryError(f"parent/teacher {ref!r} is not a registered model")


def adopt_artifact_row(
    conn: sqlite3.Connection, model_id: str, files: dict[str, str], weights_sha256: str, place: Callable[[str], str]
) -> ModelRecord | None:
    """Give a model registered without hashes its version folder (inside the caller's write transaction).

    Returns:
        The updated record; None when it has hashes already (another process adopted it first).
    """
    row = conn.execute("SELECT name, artifact, files_json FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None or row["files_json"] is not None:
        return None
    artifact = place(model_id)
    conn.execute(
        "UPDATE models SET artifact = ?, files_json = ?, weights_sha256 = ? WHERE id = ?",
        (artifact, json.dumps(files), weights_sha256, model_id),
    )
    record_event(conn, row["name"], "adopt", model_id, None, f"{row['artifact']} kept as {artifact} (before a rerun)")
    return select_model(conn, model_id)
