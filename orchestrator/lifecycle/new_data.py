"""New data for continual retraining, found by content hash.

:func:`detect_new_data` keeps the files in the watched folder whose sha256 no model of this name was trained on
(:func:`trained_hashes`: rejected candidates included, and the files of rounds now running);
:func:`find_new_data` does the whole look-up for a retrain file against its registry.

The watched folder may be a prefix on object storage (``watch.dir: s3://bucket/incoming``): its objects are
listed with their size and modification time (``LastModified``; pyarrow's listing gives no ETag, so an
object's version is its size + modification time, as for the per-node copies in ``orchestrator.storage``), the
settle time applies to the modification time as to a local file's, and each new version is hashed once from
this machine's copy (which the round's scan of the shard then reuses). What makes a shard new is its content
hash, as for local files: a shard is ingested once, one re-uploaded unchanged is not new, one re-uploaded with
other rows is new data.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import orchestrator.storage as storage
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


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: a local file, or an object (hashed in this machine's copy, cached by version).

    Raises:
        DataError: the object cannot be read (naming it).
    """
    if not storage.is_uri(path):
        return sha256_file(path)
    try:
        return sha256_file(storage.local_copy(str(path)))
    except storage.StorageError as exc:
        raise DataError(str(exc)) from exc


class HashCache:
    """sha256 of files, recomputed only when size or mtime change (the scheduler polls the same files)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[object, str]] = {}

    def __call__(self, path: str | Path) -> str:
        key = str(path)
        if storage.is_uri(key):
            entry = storage.stat(key)
            version: object = entry.version if entry is not None else None
        else:
            stat = Path(path).stat()
            version = (stat.st_size, stat.st_mtime_ns)
        cached = self._known.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        digest = content_sha256(path)
        self._known[key] = (version, digest)
        return digest


def scan_watch(
    folder: str,
    pattern: str,
    *,
    settle_s: float = 0.0,
    now: float | None = None,
    hasher: Callable[[Any], str] = content_sha256,
) -> list[DataFile]:
    """Data files in the watched folder or prefix (sorted by path), skipping files modified in the last
    ``settle_s``. ``hasher`` gets a local ``Path``, or an object's URI."""
    if storage.is_uri(folder):
        return _scan_prefix(folder, pattern, settle_s=settle_s, now=now, hasher=hasher)
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


def _scan_prefix(
    prefix: str, pattern: str, *, settle_s: float, now: float | None, hasher: Callable[[Any], str]
) -> list[DataFile]:
    """:func:`scan_watch` over a prefix on object storage: ``pattern`` matched against each object's key below
    the prefix as ``Path.glob`` matches names below a folder (``*.tsv`` at the top only, ``**/*.tsv`` anywhere).

    Raises:
        DataError: the bucket does not exist, the credentials are refused or the endpoint does not answer.
    """
    root = storage.normalize(prefix)
    try:
        storage.check(f"{root.split('://', 1)[0]}://{storage.bucket_of(root)}", kind="any")  # a typo'd bucket
        entries = storage.list_files(root)
    except storage.StorageError as exc:
        raise DataError(f"watch.dir {prefix}: {exc}") from exc
    now = time.time() if now is None else now
    files = []
    for entry in entries:
        relative = PurePosixPath(entry.path[len(root) + 1 :])
        if relative.name.startswith(".") or not _glob_match(relative, pattern):
            continue
        if settle_s > 0 and entry.mtime is not None and now - entry.mtime.timestamp() < settle_s:
            continue  # S3 shows an object only once its upload completed; the settle time is kept as for files
        files.append(DataFile(path=entry.path, sha256=hasher(entry.path), size=entry.size))
    return files


def _glob_match(relative: PurePosixPath, pattern: str) -> bool:
    """Whether ``relative`` matches ``pattern`` as ``Path.glob(pattern)`` would find it (``**`` spans folders,
    zero included; other parts match one name each)."""
    parts = [p for p in PurePosixPath(pattern).parts if p not in ("", ".")]

    def match(names: tuple[str, ...], pats: list[str]) -> bool:
        if not pats:
            return not names
        if pats[0] == "**":
            return any(match(names[i:], pats[1:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], pats[0]) and match(names[1:], pats[1:])

    return match(relative.parts, parts)


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
    hasher: Callable[[Any], str] | None = None,
    now: float | None = None,
    own_round: int | None = None,
) -> list[DataFile]:
    """New files in the watched folder for this model name (files of running rounds other than
    ``own_round`` are not new: that round is training on them; nor are quarantined shards, whose rounds kept
    failing: see :mod:`orchestrator.lifecycle.shard_retries`)."""
    watch = loaded.config.watch
    files = scan_watch(watch.dir, watch.glob, settle_s=watch.settle_s, now=now, hasher=hasher or content_sha256)
    others = [r for r in registry.rounds(loaded.name, active_only=True) if r.id != own_round]
    seen = trained_hashes(registry.models(loaded.name), others)
    seen.update(q.sha256 for q in registry.quarantined(loaded.name))
    return detect_new_data(files, seen)
