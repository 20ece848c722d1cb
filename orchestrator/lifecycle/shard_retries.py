"""Continual shards whose rounds keep failing: attempts, back-off, quarantine (the ``shard_attempts`` and
``quarantine`` tables of the registry).

A round that fails (the job died, training raised: not a candidate the gate rejected) leaves its new files
untrained, so they are new data again. Without a limit the scheduler would resubmit them at every poll,
forever. Instead each failed round counts as one attempt of each of its shards (:func:`settle_failed_rounds`,
stamped with the scheduler's clock when it first sees the failure); a shard that failed waits
``schedule.retry_backoff_s`` x 2^(attempts-1) (at most ``retry_backoff_max_s``) before its next round, which
trains it alone, so that a failure is blamed on the right shard; after ``schedule.max_attempts`` failed
attempts its content hash is quarantined with the last failure's reason. Quarantine is by content: a copy of
the file under another name stays quarantined. ``orchestrator registry release HASH`` lifts it (its attempts
are kept, marked released, and counting starts again).

A round whose submission never reached the cluster is abandoned, not failed, and counts no attempt (the
cluster was unreachable: nothing is wrong with the data).

Each function takes a connection the caller opened (reads) or a write transaction (writes).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.lifecycle.registry_promotion import record_event
from orchestrator.lifecycle.registry_records import RegistryError, now_iso


@dataclass(frozen=True)
class ShardAttempts:
    """The failed attempts of one shard (by content hash) since it was last released."""

    sha256: str
    path: str | None
    attempts: int
    last_failed_at: float  # the scheduler's clock, seconds since the epoch
    reason: str | None


@dataclass(frozen=True)
class QuarantinedShard:
    """A shard the scheduler no longer trains on: its content hash, where it was seen, and why."""

    name: str
    sha256: str
    path: str | None
    attempts: int
    reason: str
    quarantined_at: str


def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait after a shard's ``attempts``-th failure: ``base_s`` doubled per earlier failure."""
    return min(max_s, base_s * 2.0 ** max(0, attempts - 1))


def _record_failed_rounds(conn: sqlite3.Connection, name: str, at: float) -> None:
    """One attempt per shard of each failed round of ``name`` not yet counted, stamped ``at``."""
    rows = conn.execute(
        "SELECT id, new_data_json, message FROM rounds WHERE name = ? AND status = 'failed' "
        "AND id NOT IN (SELECT round_id FROM shard_attempts WHERE name = ?)",
        (name, name),
    ).fetchall()
    for round_id, new_data, message in rows:
        for item in json.loads(new_data or "[]"):
            conn.execute(
                "INSERT OR IGNORE INTO shard_attempts (name, sha256, round_id, path, failed_at, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, item["sha256"], round_id, item.get("path"), at, message),
            )


def select_attempts(conn: sqlite3.Connection, name: str) -> dict[str, ShardAttempts]:
    """The unreleased failed attempts of each shard of ``name``, by content hash."""
    rows = conn.execute(
        "SELECT sha256, path, failed_at, reason FROM shard_attempts WHERE name = ? AND released = 0 "
        "ORDER BY failed_at, round_id",
        (name,),
    ).fetchall()
    found: dict[str, ShardAttempts] = {}
    for sha, path, failed_at, reason in rows:
        before = found.get(sha)
        count = before.attempts + 1 if before else 1
        found[sha] = ShardAttempts(sha, path or (before.path if before else None), count, failed_at, reason)
    return found


def select_quarantine(conn: sqlite3.Connection, name: str | None = None) -> list[QuarantinedShard]:
    """Quarantined shards, oldest first, optionally of one model name."""
    query = "SELECT name, sha256, path, attempts, reason, quarantined_at FROM quarantine"
    if name is not None:
        query += " WHERE name = ?"
    rows = conn.execute(query + " ORDER BY quarantined_at, name, sha256", (name,) if name is not None else ())
    return [QuarantinedShard(*row) for row in rows.fetchall()]


def settle_failed_rounds(
    conn: sqlite3.Connection, name: str, *, at: float, max_attempts: int
) -> tuple[dict[str, ShardAttempts], list[QuarantinedShard]]:
    """Count the failed rounds not yet counted, and quarantine the shards that reached ``max_attempts``.

    Returns:
        (the attempts of every shard with failures, the shards quarantined now).
    """
    _record_failed_rounds(conn, name, at)
    attempts = select_attempts(conn, name)
    already = {q.sha256 for q in select_quarantine(conn, name)}
    stamp = now_iso()
    quarantined = []
    for shard in attempts.values():
        if shard.attempts < max_attempts or shard.sha256 in already:
            continue
        reason = f"{shard.attempts} failed rounds; last: {shard.reason or 'no message'}"[:4000]
        conn.execute(
            "INSERT INTO quarantine (name, sha256, path, attempts, reason, quarantined_at) VALUES (?, ?, ?, ?, ?, ?)",
            (name, shard.sha256, shard.path, shard.attempts, reason, stamp),
        )
        record_event(conn, name, "quarantine", None, None, f"{shard.path} sha256 {shard.sha256[:12]}: {reason}")
        quarantined.append(QuarantinedShard(name, shard.sha256, shard.path, shard.attempts, reason, stamp))
    return attempts, quarantined


def release_shard(conn: sqlite3.Connection, sha256: str, name: str | None) -> list[QuarantinedShard]:
    """Lift the quarantine of the shard whose hash is or starts with ``sha256`` (of one name, or every name).

    Raises:
        RegistryError: no quarantined shard matches, or the prefix matches several.
    """
    matches = [q for q in select_quarantine(conn, name) if q.sha256.startswith(sha256.lower())]
    hashes = {q.sha256 for q in matches}
    if not matches:
        where = f" of {name}" if name else ""
        raise RegistryError(
            f"no quarantined shard{where} has a sha256 starting with {sha256!r} (orchestrator registry list shows them)"
        )
    if len(hashes) > 1:
        raise RegistryError(f"{sha256!r} matches several quarantined shards; give more of the hash")
    _release(conn, matches)
    return matches


def _release(conn: sqlite3.Connection, shards: Iterable[QuarantinedShard]) -> None:
    for q in shards:
        conn.execute("DELETE FROM quarantine WHERE name = ? AND sha256 = ?", (q.name, q.sha256))
        conn.execute("UPDATE shard_attempts SET released = 1 WHERE name = ? AND sha256 = ?", (q.name, q.sha256))
        record_event(conn, q.name, "release", None, None, f"{q.path} sha256 {q.sha256[:12]} released")
