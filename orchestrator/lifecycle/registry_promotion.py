"""Promotion, rejection and rollback in the registry: who is the champion of a name, and the ``events`` table
that records every change of champion.

Each function works inside a write transaction the caller holds (a connection from
:meth:`orchestrator.lifecycle.registry_schema.RegistryDatabase.transaction`). Promotions, rejections and
rollbacks are appended to ``events``, which is how a rollback finds the previous champion.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from orchestrator.lifecycle.registry_records import RegistryError, now_iso


def demote_champion(conn: sqlite3.Connection, name: str) -> str | None:
    """Archive the champion of ``name``; returns its id (None: there was none)."""
    row = conn.execute("SELECT id FROM models WHERE name = ? AND status = 'champion'", (name,)).fetchone()
    if row is None:
        return None
    conn.execute("UPDATE models SET status = 'archived' WHERE id = ?", (row[0],))
    return row[0]


def record_event(
    conn: sqlite3.Connection, name: str, kind: str, model_id: str | None, previous: str | None, reason: str
) -> None:
    """Append an event (promote, reject, rollback, ...) stamped now."""
    conn.execute(
        "INSERT INTO events (at, name, kind, model_id, previous_id, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (now_iso(), name, kind, model_id, previous, reason),
    )


def name_and_status(conn: sqlite3.Connection, model_id: str, path: Path) -> tuple[str, str]:
    """(name, status) of a registered model.

    Raises:
        RegistryError: no such model in the registry at ``path``.
    """
    row = conn.execute("SELECT name, status FROM models WHERE id = ?", (model_id,)).fetchone()
    if row is None:
        raise RegistryError(f"no model {model_id!r} in {path} (orchestrator registry list shows the ids)")
    return row[0], row[1]


def promote_model(conn: sqlite3.Connection, model_id: str, reason: str, path: Path) -> None:
    """Make a model the champion of its name, archiving the current one.

    Raises:
        RegistryError: unknown model, or it is the champion already.
    """
    name, status = name_and_status(conn, model_id, path)
    if status == "champion":
        raise RegistryError(f"{model_id} is already the champion of {name}")
    previous = demote_champion(conn, name)
    conn.execute(
        "UPDATE models SET status = 'champion', decision = COALESCE(decision, 'promoted'), "
        "decision_reason = COALESCE(decision_reason, ?) WHERE id = ?",
        (reason, model_id),
    )
    record_event(conn, name, "promote", model_id, previous, reason)


def record_decision(conn: sqlite3.Connection, model_id: str, decision: str, reason: str, path: Path) -> None:
    """Apply a gate's decision ('promote' or 'reject', already checked) to a candidate.

    Raises:
        RegistryError: unknown model, or it is not a candidate.
    """
    name, status = name_and_status(conn, model_id, path)
    if status != "candidate":
        raise RegistryError(f"{model_id} is {status}; only a candidate can be judged")
    previous = None
    if decision == "promote":
        previous = demote_champion(conn, name)
    conn.execute(
        "UPDATE models SET status = ?, decision = ?, decision_reason = ? WHERE id = ?",
        ("champion" if decision == "promote" else "rejected", decision, reason, model_id),
    )
    record_event(conn, name, decision, model_id, previous, reason)


def rollback_plan(conn: sqlite3.Connection, name: str | None) -> tuple[str, str]:
    """What a rollback of ``name`` would do: (the id it restores, the id it demotes).

    Raises:
        RegistryError: no name given and not exactly one name has a champion; no champion; or the champion
            had no champion before it.
    """
    name = name if name is not None else _only_champion_name(conn)
    current = _champion_of(conn, name)
    return _champion_before(conn, name, current), current


def roll_back(conn: sqlite3.Connection, name: str | None, reason: str, *, expect: str | None = None) -> tuple[str, str]:
    """Restore the champion the current champion of ``name`` replaced; returns (restored id, demoted id).

    Args:
        expect: the id the caller checked (see :func:`rollback_plan`); the rollback is refused if the champion
            changed since and another model would be restored.

    Raises:
        RegistryError: as :func:`rollback_plan`, or the champion changed since the caller's check.
    """
    previous, current = rollback_plan(conn, name)
    if expect is not None and previous != expect:
        raise RegistryError(f"the champion changed while the rollback checked {expect}; run the rollback again")
    name = _name_of(conn, current)
    conn.execute("UPDATE models SET status = 'archived' WHERE id = ?", (current,))
    conn.execute("UPDATE models SET status = 'champion' WHERE id = ?", (previous,))
    record_event(conn, name, "rollback", previous, current, reason)
    return previous, current


def _name_of(conn: sqlite3.Connection, model_id: str) -> str:
    return conn.execute("SELECT name FROM models WHERE id = ?", (model_id,)).fetchone()[0]


def _only_champion_name(conn: sqlite3.Connection) -> str:
    """The one name that has a champion."""
    names = [r[0] for r in conn.execute("SELECT name FROM models WHERE status = 'champion'")]
    if len(names) != 1:
        raise RegistryError(
            "no model has a champion"
            if not names
            else f"several names have a champion "
            f"({', '.join(sorted(names))}); say which: orchestrator registry rollback NAME"
        )
    return names[0]


def _champion_of(conn: sqlite3.Connection, name: str) -> str:
    """The id of the champion of ``name``, which must have one."""
    row = conn.execute("SELECT id FROM models WHERE name = ? AND status = 'champion'", (name,)).fetchone()
    if row is None:
        raise RegistryError(f"{name} has no champion to roll back")
    return row[0]


def _champion_before(conn: sqlite3.Connection, name: str, current: str) -> str:
    """The champion that ``current`` replaced, from the latest event that promoted it."""
    event = conn.execute(
        "SELECT previous_id FROM events WHERE name = ? AND model_id = ? AND kind = 'promote' ORDER BY id DESC LIMIT 1",
        (name, current),
    ).fetchone()
    previous = event[0] if event is not None else None
    if previous is None:
        raise RegistryError(f"{current} became champion of {name} with no champion before it; nothing to restore")
    return previous


def select_events(conn: sqlite3.Connection, name: str | None) -> list[dict[str, Any]]:
    """Every event, oldest first, optionally of one name."""
    if name is None:
        rows = conn.execute("SELECT * FROM events ORDER BY id").fetchall()
    else:
        rows = conn.execute("SELECT * FROM events WHERE name = ? ORDER BY id", (name,)).fetchall()
    return [dict(r) for r in rows]
