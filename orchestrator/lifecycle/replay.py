"""Reproducible row choices of a continual-retraining round: the held-out eval slice of each new file
(:func:`split_holdout`) and the replay sample of earlier training rows (:func:`sample_replay`), both fixed by
the seed and the files' content, never by paths or the order files arrive in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import orchestrator.storage as storage
from orchestrator.lifecycle.registry_records import ModelRecord


def _hash_seed(sha256: str) -> int:
    return int(sha256[:15], 16)


def split_holdout(
    n_rows: int, *, fraction: float, seed: int, sha256: str, max_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train row indices, held-out row indices) of one file, fixed by seed and the file's content."""
    k = 0 if fraction <= 0 else max(1, round(n_rows * fraction))
    if max_rows is not None:
        k = min(k, max_rows)
    k = min(k, n_rows - 1)  # keep at least one training row
    order = np.random.default_rng([seed, _hash_seed(sha256)]).permutation(n_rows)
    return np.sort(order[k:]), np.sort(order[:k])


@dataclass(frozen=True)
class PoolEntry:
    """Earlier training data: one file (as read), its sha256 and its number of training rows."""

    source: dict[str, Any]
    sha256: str
    rows: int


def sample_replay(pool: Sequence[PoolEntry], k: int, *, seed: int, round_no: int) -> dict[str, np.ndarray]:
    """Choose k earlier rows without replacement: ``{sha256: sorted row indices}``.

    The pool is ordered by content hash, so the sample depends only on (seed, round, pool contents), not on
    paths or the order files were found in; each round draws a fresh sample."""
    ordered = sorted(pool, key=lambda e: e.sha256)
    total = sum(e.rows for e in ordered)
    k = min(k, total)
    if k <= 0:
        return {}
    chosen = np.sort(np.random.default_rng([seed, round_no]).choice(total, size=k, replace=False))
    starts = np.cumsum([0] + [e.rows for e in ordered])
    out: dict[str, np.ndarray] = {}
    for i, e in enumerate(ordered):
        rows = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
        if len(rows):
            out[e.sha256] = rows
    return out


def replay_pool(chain: Sequence[ModelRecord], warnings: list[str]) -> list[PoolEntry]:
    """The rows a lineage (newest first) learned: each round's new rows, or a plain job's training file.
    Files that are gone are left out, with a warning appended to ``warnings``."""
    pool: dict[str, PoolEntry] = {}
    for record in chain:
        continual = record.data.get("continual")
        if continual:
            learned = continual.get("learned") or {}
            if learned.get("sha256") and learned.get("rows"):
                pool.setdefault(learned["sha256"], PoolEntry(learned["source"], learned["sha256"], learned["rows"]))
            continue
        train = record.data.get("train") or {}
        source = (record.config.get("data") or {}).get("train")
        if train.get("sha256") and source:
            pool.setdefault(train["sha256"], PoolEntry(source, train["sha256"], int(train.get("rows", 0))))
    available = []
    for entry in pool.values():
        path = entry.source["path"]
        if not storage.is_file(path):
            warnings.append(f"replay: {path} is gone; its {entry.rows} rows are not replayed")
            continue
        available.append(entry)
    return available
