"""The registry's SQLite file: its schema, connections and write transactions.

Concurrency: the database runs in WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken up front, so two writers never interleave read-then-write; a busy writer waits up to
``busy_timeout_s``). WAL needs every writer on one host (or a filesystem with working shared memory): on NFS
shared by several machines use ``journal_mode="delete"``.

The schema is created with ``CREATE ... IF NOT EXISTS`` on every open, and its version recorded in ``meta``.
A file written by an older version is upgraded in the same transaction (:data:`MIGRATIONS`: columns added,
existing rows keep NULL there), so every registry file opens with the current code.

Version 2 added the hashes of a registered model's files (``weights_sha256``, ``files_json``; see
:mod:`orchestrator.lifecycle.artifact_store`) and the tables of failed continual shards (``shard_attempts``,
``quarantine``; see :mod:`orchestrator.lifecycle.shard_retries`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 2

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
    weights_sha256 TEXT,
    files_json TEXT,
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
CREATE TABLE IF NOT EXISTS shard_attempts (
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    round_id INTEGER NOT NULL,
    path TEXT,
    failed_at REAL NOT NULL,
    reason TEXT,
    released INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, sha256, round_id)
);
CREATE TABLE IF NOT EXISTS quarantine (
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    quarantined_at TEXT NOT NULL,
    PRIMARY KEY (name, sha256)
);
"""

# Columns added to existing tables since version 1, by table: (column, SQL type). Tables added since are in
# _SCHEMA (CREATE TABLE IF NOT EXISTS creates them in an older file).
MIGRATIONS: dict[str, list[tuple[str, str]]] = {
    "models": [("weights_sha256", "TEXT"), ("files_json", "TEXT")],
}


class RegistryDatabase:
    """Connections to one registry file: each operation opens its own, so one instance may be used from
    several threads and any number of processes may share the file.

    Args:
        path: the SQLite file (its folder exists).
        busy_timeout_s: how long a connection waits for another writer's lock.
        journal_mode: 'wal' or 'delete' (already checked).
    """

    def __init__(self, path: Path, *, busy_timeout_s: float, journal_mode: str):
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        self.journal_mode = journal_mode

    def connect(self) -> sqlite3.Connection:
        """A new connection in autocommit mode, rows as :class:`sqlite3.Row`, foreign keys on, full sync."""
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the write lock from its first statement (BEGIN IMMEDIATE)."""
        conn = self.connect()
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
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads, closed afterwards."""
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    def initialise(self) -> None:
        """Set the journal mode, then create the tables and indexes that are missing and record the version."""
        self._set_journal_mode()
        with self.transaction() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            _add_missing_columns(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None or int(row[0]) < SCHEMA_VERSION:  # never lowered: a newer file stays newer
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )

    def _set_journal_mode(self) -> None:
        """Setting WAL needs a moment of exclusive access; retry while another process initialises."""
        conn = self.connect()
        try:
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


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Upgrade a file of an older schema: add the columns of :data:`MIGRATIONS` it lacks (inside the caller's
    write transaction, so two processes opening one old file upgrade it once)."""
    for table, columns in MIGRATIONS.items():
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, sql_type in columns:
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
