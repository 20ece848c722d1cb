"""Data files on object storage (``data.*.path: s3://...`` or ``gs://...``): what the driver scans and what the
workers read, the same bytes on both sides.

Workers read a per-node copy (:func:`orchestrator.storage.local_copy`), not ranged reads, on purpose. A worker
reads its rows by random access: each epoch is a seeded permutation, so every micro-batch touches rows all over
the file. By ranged GETs (``storage.open_input``) every row would be one HTTP request (tens of milliseconds each
on S3: an epoch of SST-2's 67k rows is 67k requests per rank); the copy costs one sequential download per node
(the node's ranks share it under the node lock) and then reads at local-disk speed, at the same byte offsets as
the scan, so exact resume (an epoch, batch position over the scanned index) is unchanged. Parquet gains nothing
from ranged reads either: the reader loads the text columns whole. The price is disk for the file on each node,
in its cache (``ORCHESTRATOR_CACHE``).

The copy is keyed by the URI and the object's version (size and modification time: ``pyarrow.fs`` lists no
ETag), and the version the driver scanned is recorded (``ScannedSource.version``): a worker that finds another
version now fails, naming the URI, instead of training on bytes other than those scanned. The driver scans a
copy in its own cache as well (one download; workers on the driver's node reuse it).

This module imports no other data module (``sources`` and ``readers`` import it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.errors import DataError
from orchestrator.storage import StorageError


def fetch_for_scan(path: str) -> tuple[Path, str]:
    """The local copy of a data object for the driver's scan, and the object's version.

    Args:
        path: the URI as the user wrote it (messages name it).

    Raises:
        DataError: naming the URI: no such object, a prefix instead of an object, an empty object, or a
            storage failure (missing bucket, wrong credentials, unreachable endpoint).
    """
    try:
        entry = storage.stat(path)
        if entry is None:
            if storage.is_dir(path):
                raise DataError(
                    f"{path}: not a file but a prefix (folder) on the store; point data.*.path at a data object"
                )
            raise DataError(f"{path}: data file not found (no such object; check data.*.path: keys are case-sensitive)")
        if entry.size == 0:
            raise DataError(f"{path}: the file is empty (point data.*.path at a file with rows, or fill it)")
        return storage.local_copy(path, expect_version=entry.version), entry.version
    except StorageError as exc:
        raise DataError(str(exc)) from exc


def named_by_uri(text: str, local: Path, path: str) -> str:
    """``text`` (a scan's message) naming the URI the user wrote where it names the local copy it read."""
    for shown in sorted({str(local.resolve()), str(local)}, key=len, reverse=True):
        text = text.replace(shown, path)
    return text


@contextmanager
def errors_name(local: Path, path: str) -> Iterator[None]:
    """A :class:`DataError` raised while the local copy is scanned names the URI, not the cache file (every
    scan error, file:line ones included, is written with the path it read)."""
    try:
        yield
    except DataError as exc:
        raise DataError(named_by_uri(str(exc), local, path)) from exc.__cause__


def scan_remote(source: Any, scan: Callable[..., Any], **options: Any) -> Any:
    """``scan`` (``sources.scan_source``) over this node's copy of ``source``'s object: the result names the URI
    and records the version scanned; every error and bad-row example names the URI, not the cache file.

    Raises:
        DataError: naming the URI (see :func:`fetch_for_scan`, and the scan's own errors).
    """
    local, version = fetch_for_scan(source.path)
    with errors_name(local, source.path):
        scanned = scan(source.model_copy(update={"path": str(local), "name": source.display_name}), **options)
    scanned.path, scanned.version = storage.normalize(source.path), version
    scanned.bad_examples = [named_by_uri(e, local, source.path) for e in scanned.bad_examples]
    return scanned


def worker_file(path: str, version: str | None) -> str:
    """The local file a worker reads for a scanned path: the path itself, or this node's copy of the URI at the
    version the driver scanned.

    Raises:
        DataError: naming the URI: the object changed (or is gone) since the scan, or cannot be read.
    """
    if not storage.is_uri(path):
        return path
    try:
        return str(storage.local_copy(path, expect_version=version))
    except StorageError as exc:
        raise DataError(str(exc)) from exc
