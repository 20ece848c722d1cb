"""New data for continual retraining, found by content hash.

:func:`detect_new_data` keeps the files in the watched folder whose sha256 no model of this name was trained on
(:func:`trained_hashes`: rejected candidates included, and the files of rounds now running);
:func:`find_new_data` does the whole look-up for a retrain file against its registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.retrain import LoadedRetrain
from orchestrator.errors import DataError
from orchestrator.lifecycle.artifact_store import sha256_file
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord, RoundRecord


@dataclass(frozen=True)
class DataFile:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


class HashCache:
    """sha256 of files, recomputed only when size or mtime change (the scheduler polls the same files)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, str]] = {}

    def __call__(self, path: Path) -> str:
        stat = path.stat()
        key = str(path)
        cached = self._known.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = sha256_file(path)
        self._known[key] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest


def scan_watch(
    folder: str,
    pattern: str,
    *,
    settle_s: float = 0.0,
    now: float | None = None,
    hasher: Callable[[Path], str] = lambda p: sha256_file(p),
) -> list[DataFile]:
    """Data files in the watched folder (sorted by path), skipping files modified in the last ``settle_s``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"watch.dir {folder}: not a folder (check the path; the round job must see it too)")
    now = time.time() if now is None else now
    files = []
    for path in sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        if settle_s > 0 and now - stat.st_mtime < settle_s:
            continue
        files.append(DataFile(path=str(path.resolve()), sha256=hasher(path), size=stat.st_size))
    return files


def trained_hashes(models: Iterable[ModelRecord], rounds: Iterable[RoundRecord] = ()) -> set[str]:
    """Content hashes of every file a model of this name was trained on (rejected candidates included, so a
    shard that failed the gate is not retried each round), plus those of rounds now running."""
    seen: set[str] = set()
    for m in models:
        train = m.data.get("train") or {}
        if train.get("sha256") and not m.data.get("continual"):
            seen.add(train["sha256"])
        for item in (m.data.get("continual") or {}).get("new", []):
            seen.add(item["sha256"])
    for r in rounds:
        if r.active:
            seen.update(item["sha256"] for item in r.new_data)
    return seen


def detect_new_data(files: Sequence[DataFile], seen: set[str]) -> list[DataFile]:
    """Files whose content was never trained on; a file copied twice (same hash) counts once."""
    new, taken = [], set(seen)
    for f in files:
        if f.sha256 not in taken:
            new.append(f)
            taken.add(f.sha256)
    return new


def find_new_data(
    loaded: LoadedRetrain,
    registry: Registry,
    *,
    hasher: Callable[[Path], str] | None = None,
    now: float | None = None,
    own_round: int | None = None,
) -> list[DataFile]:
    """New files in the watched folder for this model name (files of running rounds other than
    ``own_round`` are not new: that round is training on them; nor are quarantined shards, whose rounds kept
    failing: see :mod:`orchestrator.lifecycle.shard_retries`)."""
    watch = loaded.config.watch
    files = scan_watch(watch.dir, watch.glob, settle_s=watch.settle_s, now=now, hasher=hasher or sha256_file)
    others = [r for r in registry.rounds(loaded.name, active_only=True) if r.id != own_round]
    seen = trained_hashes(registry.models(loaded.name), others)
    seen.update(q.sha256 for q in registry.quarantined(loaded.name))
    return detect_new_data(files, seen)
