"""Continual-retraining rounds in the registry's ``rounds`` table: claims that work as a lock per model name.

A round is claimed in one write transaction that fails while another round of the name is active (claimed
or running), so no two rounds of one model run at once, and a restarted scheduler finds the running round
where it left it. A claim made by a local process (host + pid, no Ray job submission id) whose process is
gone lapses: it is marked abandoned at the next claim. Each function takes a connection the caller opened.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from typing import Any

from orchestrator.lifecycle.registry_records import RegistryError, RoundRecord, now_iso, round_from_row

ROUND_FIELDS = {"status", "submission_id", "host", "pid", "new_data", "candidate_id", "decision", "message"}


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id runs on this host."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lapse_dead_claims(conn: sqlite3.Connection, name: str, at: str) -> bool:
    """Mark abandoned the active rounds of ``name`` claimed by a process of this host that is gone, until one
    that is alive (or a Ray job's) is met: True when no active round is left, False when one still is."""
    for row in conn.execute(
        "SELECT * FROM rounds WHERE name = ? AND status IN ('claimed', 'running')", (name,)
    ).fetchall():
        active = round_from_row(row)
        if active.submission_id is None and active.host == socket.gethostname() and not pid_alive(active.pid):
            conn.execute(
                "UPDATE rounds SET status = 'abandoned', message = ?, updated_at = ? WHERE id = ?",
                (f"process {active.pid} on {active.host} is gone", at, active.id),
            )
            continue
        return False
    return True


def insert_round(
    conn: sqlite3.Connection,
    name: str,
    *,
    new_data: list[dict[str, Any]] | None,
    spec: dict[str, Any] | None,
    submission_id: str | None,
    host: str | None,
    pid: int | None,
    at: str,
) -> RoundRecord:
    """Add the next round of ``name`` as claimed and read it back."""
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
    return round_from_row(row)


def round_columns(values: dict[str, Any]) -> dict[str, Any]:
    """The columns to update for the round fields given (``new_data`` JSON-encoded), stamped now.

    Raises:
        RegistryError: a field that is not one of :data:`ROUND_FIELDS`.
    """
    unknown = set(values) - ROUND_FIELDS
    if unknown:
        raise RegistryError(f"unknown round fields: {', '.join(sorted(unknown))}")
    values = dict(values)
    if "new_data" in values:
        values["new_data_json"] = json.dumps(values.pop("new_data"))
    values["updated_at"] = now_iso()
    return values


def update_round_row(conn: sqlite3.Connection, round_id: int, columns: dict[str, Any]) -> RoundRecord | None:
    """Set columns of a round and read it back (None: no such round)."""
    assignments = ", ".join(f"{k} = ?" for k in columns)
    conn.execute(f"UPDATE rounds SET {assignments} WHERE id = ?", (*columns.values(), round_id))
    return select_round(conn, round_id)


def select_round(conn: sqlite3.Connection, round_id: int) -> RoundRecord | None:
    """The round with this id, if any."""
    row = conn.execute("SELECT * FROM rounds WHERE id = ?", (round_id,)).fetchone()
    return round_from_row(row) if row is not None else None


def select_rounds(conn: sqlite3.Connection, name: str, *, active_only: bool) -> list[RoundRecord]:
    """The rounds of ``name`` in round order, optionally only the active ones."""
    query = "SELECT * FROM rounds WHERE name = ?"
    if active_only:
        query += " AND status IN ('claimed', 'running')"
    rows = conn.execute(query + " ORDER BY round", (name,)).fetchall()
    return [round_from_row(r) for r in rows]
