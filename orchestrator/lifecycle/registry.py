"""Model registry and lineage: one SQLite file beside the artifacts (no server needed).

Every job that exports a model registers it (:func:`register_run`, called from
:func:`orchestrator.cluster.launcher.run_training`): id ``<name>-v<N>``, parent (the registered model or the base
model folder it started from; the teacher for a distilled student), method, base model and its licence,
data files with sha256 and row counts, the full validated config, metrics per eval set, artifact location,
code version, time and status.

Statuses: ``candidate`` (registered, not yet judged), ``champion`` (the one model of its name that serves
and that retraining warm-starts from), ``rejected`` (a retraining candidate the promotion gate turned down)
and ``archived`` (a former champion). Promotions, rejections and rollbacks are also appended to an
``events`` table, which is how ``rollback`` finds the previous champion.

Concurrency: the database runs in WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken up front, so two writers never interleave read-then-write; a busy writer waits up to
``busy_timeout_s``). Two retraining rounds finishing at the same moment get distinct versions and never
corrupt the file. WAL needs every writer on one host (or a filesystem with working shared memory): on NFS
shared by several machines pass ``journal_mode="delete"`` (env ``ORCHESTRATOR_REGISTRY_JOURNAL=delete``).

The ``rounds`` table holds continual-retraining rounds (claimed, running, finished), so that no two rounds
of one model run at once and a restarted scheduler carries on where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.errors import ModelError, OrchestratorError

if TYPE_CHECKING:
    from orchestrator.cluster.preflight import Preflight
    from orchestrator.cluster.results import TrainResult
    from orchestrator.config import JobConfig

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("candidate", "champion", "rejected", "archived")
ACTIVE_ROUND_STATUSES = ("claimed", "running")
REGISTRY_FILE = "registry.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    parent_id TEXT REFERENCES models(id),
    parent_ref TEXT,
    teacher_id TEXT REFERENCES models(id),
    teacher_ref TEXT,
    method TEXT NOT NULL,
    base_model TEXT,
    licence TEXT,
    config_json TEXT NOT NULL,
    data_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    artifact TEXT NOT NULL,
    checkpoint TEXT,
    code_version TEXT,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'champion', 'rejected', 'archived')),
    decision TEXT,
    decision_reason TEXT,
    round INTEGER,
    wandb_artifact TEXT,
    UNIQUE (name, version)
);
CREATE INDEX IF NOT EXISTS models_by_name ON models (name, status);
CREATE INDEX IF NOT EXISTS models_by_parent ON models (parent_id);
CREATE UNIQUE INDEX IF NOT EXISTS one_champion_per_name ON models (name) WHERE status = 'champion';
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    model_id TEXT,
    previous_id TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS events_by_name ON events (name, id);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    submission_id TEXT,
    host TEXT,
    pid INTEGER,
    new_data_json TEXT NOT NULL DEFAULT '[]',
    spec_json TEXT,
    candidate_id TEXT,
    decision TEXT,
    message TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (name, round)
);
"""


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


_MODEL_COLUMNS = (
    "id, name, version, parent_id, parent_ref, teacher_id, teacher_ref, method, base_model, licence, config_json, "
    "data_json, metrics_json, artifact, checkpoint, code_version, created_at, status, decision, decision_reason, "
    "round, wandb_artifact"
)


def _model_from_row(row: sqlite3.Row) -> ModelRecord:
    values = dict(row)
    return ModelRecord(
        config=json.loads(values.pop("config_json")),
        data=json.loads(values.pop("data_json")),
        metrics=json.loads(values.pop("metrics_json")),
        **values,
    )


def _round_from_row(row: sqlite3.Row) -> RoundRecord:
    values = dict(row)
    spec = values.pop("spec_json")
    return RoundRecord(
        new_data=json.loads(values.pop("new_data_json")), spec=json.loads(spec) if spec else None, **values
    )


class Registry:
    """The registry in one SQLite file. Cheap to create; each operation opens its own connection, so one
    instance may be used from several threads and any number of processes may share the file."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 60.0, journal_mode: str | None = None):
        self.path = Path(path).expanduser().resolve()
        self.busy_timeout_s = busy_timeout_s
        self.journal_mode = (journal_mode or os.environ.get("ORCHESTRATOR_REGISTRY_JOURNAL") or "wal").lower()
        if self.journal_mode not in ("wal", "delete"):
            raise RegistryError(f"journal mode must be 'wal' or 'delete'; got {self.journal_mode!r}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = self.path.parent
            raise RegistryError(f"cannot create the registry folder {where}: {exc.strerror or exc}") from None
        self._initialise()

    # -- connections and transactions ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the write lock from its first statement (BEGIN IMMEDIATE)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    def _initialise(self) -> None:
        conn = self._connect()
        try:
            # Setting WAL needs a moment of exclusive access; retry while another process initialises.
            deadline = time.monotonic() + self.busy_timeout_s
            while True:
                try:
                    conn.execute(f"PRAGMA journal_mode = {self.journal_mode}")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            conn.close()
        with self._transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- models ------------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        *,
        method: str,
        artifact: str,
        config: dict[str, Any],
        data: dict[str, Any],
        metrics: dict[str, Any],
        parent_id: str | None = None,
        parent_ref: str | None = None,
        teacher_id: str | None = None,
        teacher_ref: str | None = None,
        base_model: str | None = None,
        licence: str | None = None,
        checkpoint: str | None = None,
        code_version: str | None = None,
        status: str = "candidate",
        round: int | None = None,
        created_at: str | None = None,
    ) -> ModelRecord:
        """Add a model as ``<name>-v<N>`` (N = the next version of that name, assigned in the transaction)."""
        if status not in STATUSES:
            raise RegistryError(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
        at = created_at or now_iso()
        with self._transaction() as conn:
            for ref in (parent_id, teacher_id):
                if ref is not None and conn.execute("SELECT 1 FROM models WHERE id = ?", (ref,)).fetchone() is None:
                    raise RegistryError(f"parent/teacher {ref!r} is not a registered model")
            (latest,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM models WHERE name = ?", (name,)).fetchone()
            version = latest + 1
            model_id = f"{name}-v{version}"
            previous = None
            if status == "champion":
                previous = self._demote_champion(conn, name)
            conn.execute(
                f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES ({', '.join('?' * 22)})",
                (
                    model_id, name, version, parent_id, parent_ref, teacher_id, teacher_ref, method, base_model,
                    licence, json.dumps(config, default=str), json.dumps(data, default=str),
                    json.dumps(metrics, default=str), artifact, checkpoint, code_version, at, status, None, None,
                    round, None,
                ),
            )  # fmt: skip
            conn.execute(
                "INSERT INTO events (at, name, kind, model_id, previous_id, reason) VALUES (?, ?, 'register', ?, ?, ?)",
                (at, name, model_id, None, f"registered as {status}"),
            )
            if status == "champion":
                self._event(conn, name, "promote", model_id, previous, "registered as champion")
            row = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchone()
        return _model_from_row(row)

    def get(self, model_id: str) -> ModelRecord:
        with self._reading() as conn:
            row = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is None:
                ids = [r[0] for r in conn.execute("SELECT id FROM models ORDER BY created_at DESC LIMIT 200")]
        if row is None:
            import difflib

            close = difflib.get_close_matches(model_id, ids, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (orchestrator registry list shows the ids)"
            raise RegistryError(f"no model {model_id!r} in {self.path}{hint}")
        return _model_from_row(row)

    def find(self, model_id: str) -> ModelRecord | None:
        try:
            return self.get(model_id)
        except RegistryError:
            return None

    def models(self, name: str | None = None, status: str | None = None) -> list[ModelRecord]:
        """Registered models, oldest first, optionally of one name and/or status."""
        query = f"SELECT {_MODEL_COLUMNS} FROM models"
        clauses, params = [], []
        if name is not None:
            clauses.append("name = ?")
            params.append(name)
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY created_at, name, version", params).fetchall()
        return [_model_from_row(r) for r in rows]

    def names(self) -> list[str]:
        with self._reading() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT name FROM models ORDER BY name")]

    def find_by_artifact(self, path: str) -> ModelRecord | None:
        """The model whose artifact is this folder (or URI), if registered (newest wins)."""
        key = _artifact_key(path)
        with self._reading() as conn:
            row = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE artifact = ? ORDER BY version DESC LIMIT 1", (key,)
            ).fetchone()
        return _model_from_row(row) if row is not None else None

    def champion(self, name: str) -> ModelRecord | None:
        found = self.models(name, "champion")
        return found[0] if found else None

    def ancestors(self, model_id: str) -> list[ModelRecord]:
        """The model, its parent, grandparent, ... up to the first one not derived from a registered model."""
        chain, seen = [], set()
        current: str | None = model_id
        while current is not None and current not in seen:
            seen.add(current)
            record = self.get(current)
            chain.append(record)
            current = record.parent_id
        return chain

    def children(self, model_id: str) -> list[ModelRecord]:
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE parent_id = ? ORDER BY created_at, version", (model_id,)
            ).fetchall()
        return [_model_from_row(r) for r in rows]

    # -- decisions -----------------------------------------------------------------------------------

    def _demote_champion(self, conn: sqlite3.Connection, name: str) -> str | None:
        row = conn.execute("SELECT id FROM models WHERE name = ? AND status = 'champion'", (name,)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE models SET status = 'archived' WHERE id = ?", (row[0],))
        return row[0]

    def _event(
        self, conn: sqlite3.Connection, name: str, kind: str, model_id: str | None, previous: str | None, reason: str
    ) -> None:
        conn.execute(
            "INSERT INTO events (at, name, kind, model_id, previous_id, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (now_iso(), name, kind, model_id, previous, reason),
        )

    def _status_of(self, conn: sqlite3.Connection, model_id: str) -> tuple[str, str]:
        row = conn.execute("SELECT name, status FROM models WHERE id = ?", (model_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no model {model_id!r} in {self.path} (orchestrator registry list shows the ids)")
        return row[0], row[1]

    def promote(self, model_id: str, reason: str = "promoted by hand") -> ModelRecord:
        """Make a model the champion of its name; the current champion becomes archived."""
        with self._transaction() as conn:
            name, status = self._status_of(conn, model_id)
            if status == "champion":
                raise RegistryError(f"{model_id} is already the champion of {name}")
            previous = self._demote_champion(conn, name)
            conn.execute(
                "UPDATE models SET status = 'champion', decision = COALESCE(decision, 'promoted'), "
                "decision_reason = COALESCE(decision_reason, ?) WHERE id = ?",
                (reason, model_id),
            )
            self._event(conn, name, "promote", model_id, previous, reason)
        return self.get(model_id)

    def decide(self, model_id: str, decision: str, reason: str) -> ModelRecord:
        """Record a promotion gate's decision: 'promote' makes the candidate champion, 'reject' marks it rejected."""
        if decision not in ("promote", "reject"):
            raise RegistryError(f"decision must be 'promote' or 'reject'; got {decision!r}")
        with self._transaction() as conn:
            name, status = self._status_of(conn, model_id)
            if status != "candidate":
                raise RegistryError(f"{model_id} is {status}; only a candidate can be judged")
            previous = None
            if decision == "promote":
                previous = self._demote_champion(conn, name)
            conn.execute(
                "UPDATE models SET status = ?, decision = ?, decision_reason = ? WHERE id = ?",
                ("champion" if decision == "promote" else "rejected", decision, reason, model_id),
            )
            self._event(conn, name, decision, model_id, previous, reason)
        return self.get(model_id)

    def rollback(self, name: str | None = None, reason: str = "rollback") -> tuple[ModelRecord, ModelRecord]:
        """Restore the champion that the current champion replaced; the current one becomes archived.

        Args:
            name: the model name; may be left out when only one name has a champion.

        Returns:
            (restored champion, demoted model).
        """
        with self._transaction() as conn:
            if name is None:
                names = [r[0] for r in conn.execute("SELECT name FROM models WHERE status = 'champion'")]
                if len(names) != 1:
                    raise RegistryError(
                        "no model has a champion"
                        if not names
                        else f"several names have a champion "
                        f"({', '.join(sorted(names))}); say which: orchestrator registry rollback NAME"
                    )
                name = names[0]
            row = conn.execute("SELECT id FROM models WHERE name = ? AND status = 'champion'", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"{name} has no champion to roll back")
            current = row[0]
            event = conn.execute(
                "SELECT previous_id FROM events WHERE name = ? AND model_id = ? AND kind = 'promote' "
                "ORDER BY id DESC LIMIT 1",
                (name, current),
            ).fetchone()
            previous = event[0] if event is not None else None
            if previous is None:
                raise RegistryError(
                    f"{current} became champion of {name} with no champion before it; nothing to restore"
                )
            conn.execute("UPDATE models SET status = 'archived' WHERE id = ?", (current,))
            conn.execute("UPDATE models SET status = 'champion' WHERE id = ?", (previous,))
            self._event(conn, name, "rollback", previous, current, reason)
        return self.get(previous), self.get(current)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._reading() as conn:
            if name is None:
                rows = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
            else:
                rows = conn.execute("SELECT * FROM events WHERE name = ? ORDER BY id", (name,)).fetchall()
        return [dict(r) for r in rows]

    def set_wandb_artifact(self, model_id: str, ref: str) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE models SET wandb_artifact = ? WHERE id = ?", (ref, model_id))

    # -- lineage -------------------------------------------------------------------------------------

    def lineage(self, model_id: str) -> LineageNode:
        """The tree from the base model of ``model_id`` to every model derived from that base."""
        record = self.get(model_id)
        base = record.base_model or self.ancestors(model_id)[-1].parent_ref or "(unknown base)"
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT {_MODEL_COLUMNS} FROM models WHERE base_model = ? ORDER BY created_at, version", (base,)
            ).fetchall()
        family = [_model_from_row(r) for r in rows]
        if all(m.id != record.id for m in family):
            family.append(record)
        by_parent: dict[str | None, list[ModelRecord]] = {}
        ids = {m.id for m in family}
        for m in family:
            key = m.parent_id if m.parent_id in ids else None
            by_parent.setdefault(key, []).append(m)

        def build(m: ModelRecord, seen: frozenset[str]) -> LineageNode:
            kids = [build(c, seen | {m.id}) for c in by_parent.get(m.id, []) if c.id not in seen]
            return LineageNode(label=m.id, record=m, children=kids)

        return LineageNode(label=base, record=None, children=[build(m, frozenset()) for m in by_parent.get(None, [])])

    # -- continual-retraining rounds -------------------------------------------------------------------

    def claim_round(
        self,
        name: str,
        *,
        new_data: list[dict[str, Any]] | None = None,
        spec: dict[str, Any] | None = None,
        submission_id: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        at: str | None = None,
    ) -> RoundRecord | None:
        """Start a round of ``name`` unless one is active (claimed or running). Returns None when one is.

        A round claimed by a local process (host + pid, no submission id) whose process is gone is marked
        abandoned first, so a killed ``orchestrator retrain`` does not block the name forever. ``at`` is the
        claim's time (default now; the scheduler passes its own clock's).
        """
        at = at or now_iso()
        with self._transaction() as conn:
            for row in conn.execute(
                "SELECT * FROM rounds WHERE name = ? AND status IN ('claimed', 'running')", (name,)
            ).fetchall():
                active = _round_from_row(row)
                if active.submission_id is None and active.host == socket.gethostname() and not _pid_alive(active.pid):
                    conn.execute(
                        "UPDATE rounds SET status = 'abandoned', message = ?, updated_at = ? WHERE id = ?",
                        (f"process {active.pid} on {active.host} is gone", at, active.id),
                    )
                    continue
                return None
            (latest,) = conn.execute("SELECT COALESCE(MAX(round), 0) FROM rounds WHERE name = ?", (name,)).fetchone()
            cursor = conn.execute(
                "INSERT INTO rounds (name, round, status, submission_id, host, pid, new_data_json, spec_json, "
                "created_at, updated_at) VALUES (?, ?, 'claimed', ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    latest + 1,
                    submission_id,
                    host,
                    pid,
                    json.dumps(new_data or []),
                    json.dumps(spec, default=str) if spec is not None else None,
                    at,
                    at,
                ),
            )
            row = conn.execute("SELECT * FROM rounds WHERE id = ?", (cursor.lastrowid,)).fetchone()
        return _round_from_row(row)

    def update_round(self, round_id: int, **values: Any) -> RoundRecord:
        allowed = {"status", "submission_id", "host", "pid", "new_data", "candidate_id", "decision", "message"}
        unknown = set(values) - allowed
        if unknown:
            raise RegistryError(f"unknown round fields: {', '.join(sorted(unknown))}")
        if "new_data" in values:
            values["new_data_json"] = json.dumps(values.pop("new_data"))
        values["updated_at"] = now_iso()
        with self._transaction() as conn:
            columns = ", ".join(f"{k} = ?" for k in values)
            conn.execute(f"UPDATE rounds SET {columns} WHERE id = ?", (*values.values(), round_id))
            row = conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no round with id {round_id}")
        return _round_from_row(row)

    def get_round(self, round_id: int) -> RoundRecord:
        with self._reading() as conn:
            row = conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise RegistryError(f"no round with id {round_id} in {self.path}")
        return _round_from_row(row)

    def rounds(self, name: str, *, active_only: bool = False) -> list[RoundRecord]:
        query = "SELECT * FROM rounds WHERE name = ?"
        if active_only:
            query += " AND status IN ('claimed', 'running')"
        with self._reading() as conn:
            rows = conn.execute(query + " ORDER BY round", (name,)).fetchall()
        return [_round_from_row(r) for r in rows]

    def integrity_check(self) -> str:
        with self._reading() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]


@dataclass
class LineageNode:
    label: str
    record: ModelRecord | None
    children: list[LineageNode] = field(default_factory=list)

    def walk(self) -> Iterator[LineageNode]:
        yield self
        for child in self.children:
            yield from child.walk()


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _artifact_key(path: str) -> str:
    """Artifacts are keyed by absolute local path, or by the URI as given."""
    if "://" in path and not path.startswith("file://"):
        return path.rstrip("/")
    local = path.removeprefix("file://")
    return str(Path(local).expanduser().resolve())


# --------------------------------------------------------------------------------------------------
# Registering a finished job
# --------------------------------------------------------------------------------------------------


def registry_path(config: JobConfig) -> Path | None:
    """Where a job's registry lives: ``output.registry`` ('auto': ``<output.dir>/registry.sqlite``; null: none)."""
    value = config.output.registry
    if value is None:
        return None
    if value == "auto":
        return Path(config.output.dir).expanduser().resolve() / REGISTRY_FILE
    return Path(value).expanduser().resolve()


def open_registry(config: JobConfig) -> Registry | None:
    path = registry_path(config)
    return Registry(path) if path is not None else None


def read_licence(model_path: str | None) -> str | None:
    """The licence a model folder declares: its README.md front matter (``license:``), else config.json."""
    if not model_path:
        return None
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            meta: Any = None
            if end != -1:
                try:
                    meta = yaml.safe_load(text[3:end])
                except yaml.YAMLError:
                    meta = None
            if isinstance(meta, dict):
                value = meta.get("license") or meta.get("licence")
                if isinstance(value, list):
                    value = ", ".join(str(v) for v in value)
                if value:
                    if value == "other" and meta.get("license_name"):
                        return f"other ({meta['license_name']})"
                    return str(value)
    config_file = folder / "config.json"
    if config_file.is_file():
        try:
            value = json.loads(config_file.read_text()).get("license")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value:
            return str(value)
    return None


def code_version() -> str:
    """The code that trained: ``ORCHESTRATOR_CODE_VERSION``, else the git commit of this checkout (``+dirty``
    with uncommitted changes), else the package version (an uploaded Ray working dir has no .git)."""
    pinned = os.environ.get("ORCHESTRATOR_CODE_VERSION")
    if pinned:
        return pinned
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == root:
        rev = git("rev-parse", "HEAD")
        if rev:
            dirty = git("status", "--porcelain", "--untracked-files=no")
            return rev + ("+dirty" if dirty else "")
    from orchestrator import __version__

    return f"orchestrator {__version__}"


def metrics_by_eval_set(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{'sst2/accuracy': .9, 'step': 6}`` → ``{'eval': {'sst2': {'accuracy': .9}}, 'step': 6}``."""
    out: dict[str, Any] = {"eval": {}}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if "/" in key:
            eval_set, metric = key.rsplit("/", 1)
            if not eval_set.startswith(("train", "unfreeze")):
                out["eval"].setdefault(eval_set, {})[metric] = value
                continue
        if key in ("step", "epoch", "best_metric", "best_step"):
            out[key] = value
    return out


def _resolve_quietly(spec: str) -> str:
    from orchestrator.models.loading import resolve_model_path

    try:
        return resolve_model_path(spec)
    except ModelError:
        return spec


def register_run(
    config: JobConfig,
    result: TrainResult,
    checked: Preflight | None = None,
    *,
    name: str | None = None,
    status: str = "candidate",
    data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    round: int | None = None,
    registry: Registry | None = None,
) -> ModelRecord | None:
    """Register the model a finished job exported (its ``final`` folder, else ``best``) as a candidate.

    The parent is the registered model whose artifact is ``model.path`` (the teacher for ``method:
    distill``), else the path itself; base model and licence are inherited from a registered parent, else
    read from the folder. When W&B is online the model is also logged as a W&B artifact with the same lineage.

    Args:
        config: the job as run.
        result: what :func:`orchestrator.cluster.launcher.run_training` returned.
        checked: its preflight (for the resolved model path); resolved again when not given.
        name: registry name (default: the job name); versions count up per name.
        status: 'candidate' (default) or 'champion'.
        data: what to record as data (default: ``result.data``, every file with sha256 and rows).
        metrics: extra metrics to record beside those of ``result.metrics`` (e.g. forgetting).
        round: the continual-retraining round that produced it.
        registry: where to register (default: the job's ``output.registry``).

    Returns:
        The new record, or None when the job exported no model or the registry is disabled.
    """
    registry = registry or open_registry(config)
    artifact_dir = result.final_model or result.best_model
    if registry is None or artifact_dir is None:
        return None
    model_path = checked.model_path if checked is not None else _resolve_quietly(config.model.path)
    parent_path = model_path
    teacher_path = None
    distill = getattr(config, "distill", None)
    if config.method == "distill" and distill is not None:
        teacher_path = _resolve_quietly(distill.teacher)
        parent_path = teacher_path  # a student derives from its teacher
    parent = registry.find_by_artifact(parent_path) if _is_local(parent_path) else None
    teacher = registry.find_by_artifact(teacher_path) if teacher_path and _is_local(teacher_path) else None
    recorded = metrics_by_eval_set(result.metrics)
    if metrics:
        recorded.update(metrics)
    record = registry.register(
        name or config.name,
        method=config.method,
        artifact=_artifact_key(str(artifact_dir)),
        config=config.to_dict(),
        data=data if data is not None else result.data,
        metrics=recorded,
        parent_id=parent.id if parent else None,
        parent_ref=None if parent else parent_path,
        teacher_id=teacher.id if teacher else None,
        teacher_ref=None if teacher or not teacher_path else teacher_path,
        base_model=parent.base_model if parent else parent_path,
        licence=(parent.licence if parent else read_licence(parent_path)) or read_licence(model_path),
        checkpoint=result.checkpoint_path,
        code_version=code_version(),
        status=status,
        round=round,
    )
    logger.info("registered %s (%s) in %s", record.id, record.status, registry.path)
    ref = log_wandb_model(record, config, registry)
    if ref:
        record.wandb_artifact = ref
    return record


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


# --------------------------------------------------------------------------------------------------
# W&B artifacts
# --------------------------------------------------------------------------------------------------


def wandb_artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def log_wandb_model(record: ModelRecord, config: JobConfig, registry: Registry) -> str | None:
    """Log the model as a W&B artifact when W&B is online: a reference to the artifact folder (no upload),
    the lineage in its metadata, and the parent/teacher artifacts as inputs of the logging run, so W&B's
    lineage graph matches the registry. Failures are logged, never raised (the registry row is the record)."""
    from orchestrator.tracking import resolve_wandb_mode

    settings = config.tracking.wandb
    if resolve_wandb_mode(settings.mode) != "online":
        return None
    try:
        import wandb

        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group,
            job_type="register-model",
            name=f"register-{record.id}",
            config={"model_id": record.id, "parent": record.parent, "method": record.method},
        )
        try:
            for ref in dict.fromkeys(r for r in (record.parent_id, record.teacher_id) if r):
                parent = registry.get(ref)
                try:
                    run.use_artifact(f"{wandb_artifact_name(parent.name)}:{wandb_artifact_name(parent.id)}")
                except Exception as exc:  # the parent was registered while W&B was offline
                    logger.warning("W&B: parent artifact %s not found (%s); lineage kept in metadata only", ref, exc)
            artifact = wandb.Artifact(
                name=wandb_artifact_name(record.name),
                type="model",
                metadata={
                    "registry_id": record.id,
                    "parent": record.parent,
                    "teacher": record.teacher_id or record.teacher_ref,
                    "method": record.method,
                    "base_model": record.base_model,
                    "licence": record.licence,
                    "code_version": record.code_version,
                    "data": record.data,
                    "metrics": record.metrics,
                    "status": record.status,
                },
            )
            uri = record.artifact if "://" in record.artifact else Path(record.artifact).as_uri()
            artifact.add_reference(uri, checksum=True)
            run.log_artifact(artifact, aliases=[wandb_artifact_name(record.id), record.status])
            ref = f"{wandb_artifact_name(record.name)}:{wandb_artifact_name(record.id)}"
        finally:
            run.finish()
        registry.set_wandb_artifact(record.id, ref)
        return ref
    except Exception as exc:
        logger.warning("W&B: could not log %s as an artifact: %s", record.id, exc)
        return None


def local_artifact(record: ModelRecord, cache_dir: Path) -> str:
    """A local folder holding the model: the artifact itself, or a copy of a remote URI (anything
    ``pyarrow.fs`` understands, as Ray storage does: s3://, gs://, ...) under ``cache_dir``."""
    artifact = record.artifact
    if "://" not in artifact or artifact.startswith("file://"):
        return artifact.removeprefix("file://")
    import pyarrow.fs

    target = cache_dir / record.id
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(artifact, str(target))
    return str(target)
