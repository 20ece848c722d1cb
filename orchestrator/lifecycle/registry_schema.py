"""The registry's SQLite file: its schema, connections and write transactions.

Concurrency: the database runs in WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction (the
write lock is taken up front, so two writers never interleave read-then-write; a busy writer waits up to
``busy_timeout_s``). WAL needs every writer on one host (or a filesystem with working shared memory): on NFS
shared by several machines use ``journal_mode="delete"``.

The schema is created with ``CREATE ... IF NOT EXISTS`` on every open, and its version recorded in ``meta``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 1

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
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

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
