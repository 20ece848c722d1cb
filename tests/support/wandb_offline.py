"""Reader for W&B *offline* run files (``wandb/offline-run-*/run-<id>.wandb``).

wandb 0.31 removed ``wandb.sdk.internal.datastore``, the old Python reader of these files, so this module
reads them directly. The format, as written by the Go core (``transactionlog``, a LevelDB log), is:

* a 7-byte file header: the ident ``b":W&B"``, the magic ``0xBEE1`` (little-endian uint16) and a
  version byte ``0``;
* then 32 KiB blocks (the first block includes the file header) of chunks. Each chunk has a 7-byte
  header ``<IHB`` (CRC-32, payload length, chunk type) followed by the payload. The CRC is zlib's
  CRC-32 of the payload seeded with the CRC-32 of the type byte. Chunk types are FULL (1), FIRST (2),
  MIDDLE (3) and LAST (4); a record larger than what is left of a block is split into FIRST, MIDDLE...,
  LAST. A block tail shorter than a chunk header is zero padding.
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

Example:
    >>> runs = find_offline_runs("/tmp/exp")  # doctest: +SKIP
    >>> runs[-1].history[0]["loss"]  # doctest: +SKIP
    0.5
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineArtifact", "OfflineRun", "find_offline_runs", "read_offline_run", "iter_records"]

_IDENT = b":W&B"
_MAGIC = 0xBEE1
_VERSION = 0
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_SIZE = 32 * 1024

_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

# Keys that wandb adds to every history row besides ``_step``; dropped so rows hold what was logged.
_HISTORY_INTERNAL_KEYS = frozenset({"_timestamp", "_runtime", "_wandb"})
_RUN_DIR_RE = re.compile(r"^offline-run-(\d{8}_\d{6})-(.+)$")


@dataclass
class OfflineArtifact:
    """One artifact a run logged (``log_artifact``) or declared as its input (``use_artifact``).

    Offline, wandb records both as artifact records; an input is one with ``use_after_commit`` (what
    ``use_artifact`` of a not-yet-logged artifact writes), which ``wandb sync`` turns into the input edge.

    Attributes:
        name: The artifact (collection) name.
        type: The artifact type (``model``, ``dataset``, ...).
        digest: W&B's digest of the manifest: the same files (or references) give the same digest, i.e. the
            same W&B version.
        aliases: The aliases set by this record (``latest`` included, as wandb adds it).
        metadata: The artifact's metadata.
        references: ``{path in the artifact: reference URI}`` (empty for uploaded files).
        used: True for an input of the run (``use_artifact``), False for an output (``log_artifact``).
        tags: The artifact tags set by this record.
    """

    name: str
    type: str
    digest: str
    aliases: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    used: bool = False
    tags: list[str] = field(default_factory=list)


@dataclass
class OfflineRun:
    """One W&B offline run, as read back from its ``.wandb`` file.

    Attributes:
        path: The ``offline-run-*`` folder.
        run_id: The W&B run id.
        name: The display name, if one was set.
        group: The run group, if any.
        job_type: The job type, if any.
        project: The project, if any.
        config: The run config as plain values (wandb's internal ``_wandb`` key dropped).
        history: One dict per ``wandb.log`` call (per step), with the keys as logged (dicts logged as
            nested dicts stay nested) plus ``"_step"``. wandb's ``_timestamp`` and ``_runtime`` are dropped.
        summary: The final summary (explicit ``run.summary`` values and last logged values), without
            wandb's internal ``_wandb`` key.
        tags: The run tags.
        exit_code: The exit code recorded by ``run.finish()``; ``None`` if the run never finished.
        artifacts: The artifacts logged or used, in order (see :class:`OfflineArtifact`).
        start_time: When this run (or this resumed part of it) started, in seconds since the epoch, to the
            microsecond (the folder name has seconds only); ``None`` if not recorded.
    """

    path: Path
    run_id: str
    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    project: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    exit_code: int | None = None
    artifacts: list[OfflineArtifact] = field(default_factory=list)
    start_time: float | None = None


def iter_records(wandb_file: str | Path) -> Iterator[Any]:
    """Yield the protobuf records of a ``.wandb`` file, in order.

    A record cut off at the end of the file (a run killed while writing) ends the iteration quietly.

    Args:
        wandb_file: Path to a ``run-<id>.wandb`` file.

    Yields:
        ``wandb.proto.wandb_internal_pb2.Record`` messages.

    Raises:
        ValueError: If the file is not a W&B transaction log or is corrupt (bad checksum, bad chunk order).
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(wandb_file)
    data = path.read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path} is not a W&B log: file too short ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC:
        raise ValueError(f"{path} is not a W&B log: bad header {data[: _FILE_HEADER.size]!r}")
    if version != _VERSION:
        raise ValueError(f"{path}: unsupported W&B log version {version}")

    offset = _FILE_HEADER.size
    pending: bytearray | None = None  # payload of a record split over several chunks
    while offset < len(data):
        left_in_block = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER.size:  # zero padding at the end of a block
            offset += left_in_block
            continue
        if offset + _CHUNK_HEADER.size > len(data):
            return  # truncated chunk header at the end of the file
        crc, length, chunk_type = _CHUNK_HEADER.unpack_from(data, offset)
        start = offset + _CHUNK_HEADER.size
        end = start + length
        if chunk_type == 0 and length == 0 and crc == 0:
            offset += left_in_block  # zero-filled (preallocated or padded) rest of the block
            continue
        if end > len(data):
            return  # truncated chunk payload at the end of the file
        if length > left_in_block - _CHUNK_HEADER.size:
            raise ValueError(f"{path}: corrupt W&B log, chunk at offset {offset} crosses a block boundary")
        payload = data[start:end]
        if zlib.crc32(payload, zlib.crc32(bytes([chunk_type]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt W&B log, checksum mismatch at offset {offset}")
        offset = end

        if chunk_type == _FULL:
            record_bytes = payload
            pending = None
        elif chunk_type == _FIRST:
            pending = bytearray(payload)
            continue
        elif chunk_type in (_MIDDLE, _LAST):
            if pending is None:
                raise ValueError(f"{path}: corrupt W&B log, chunk type {chunk_type} without FIRST at {offset}")
            pending += payload
            if chunk_type == _MIDDLE:
                continue
            record_bytes, pending = bytes(pending), None
        else:
            raise ValueError(f"{path}: corrupt W&B log, unknown chunk type {chunk_type} at offset {offset}")

        record = wandb_internal_pb2.Record()
        record.ParseFromString(record_bytes)
        yield record


def read_offline_run(path: str | Path) -> OfflineRun:
    """Read one offline run.

    All records are applied in order, so records appended by a resumed run are included.

    Args:
        path: The ``offline-run-*`` folder, or the ``run-<id>.wandb`` file inside it.

    Returns:
        The run's metadata, config, history, summary, tags and exit code.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the folder holds no (or several) ``.wandb`` files, or the file is not a W&B log.
    """
    wandb_file = _resolve_wandb_file(Path(path))
    run_dir = wandb_file.parent
    run = OfflineRun(path=run_dir, run_id=_run_id_from_names(wandb_file))
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}

    for record in iter_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_run_record(run, record.run, config, summary)
        elif kind == "config":
            _apply_updates(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply_updates(summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            run.history.append(_history_row(record.history))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "artifact":
            run.artifacts.append(_artifact(record.artifact))

    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    run.config = config
    run.summary = summary
    return run


def find_offline_runs(root: str | Path) -> list[OfflineRun]:
    """Read every offline run under a folder.

    Args:
        root: A folder searched recursively for ``offline-run-*`` folders holding a ``.wandb`` file (for
            example the ``dir`` given to ``wandb.init`` or its ``wandb/`` subfolder).

    Returns:
        The runs, oldest first (by the timestamp in the folder name, then by folder path).

    Raises:
        ValueError: If one of the found files is not a W&B log.
    """
    root = Path(root)
    run_dirs = {p.parent for p in root.rglob("offline-run-*/*.wandb") if p.is_file()}
    return [read_offline_run(d) for d in sorted(run_dirs, key=_run_dir_sort_key)]


def _resolve_wandb_file(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.wandb"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise ValueError(f"{path}: expected exactly one .wandb file in the run folder, found {found}")
    return candidates[0]


def _run_id_from_names(wandb_file: Path) -> str:
    stem = wandb_file.stem
    if stem.startswith("run-"):
        return stem[len("run-") :]
    match = _RUN_DIR_RE.match(wandb_file.parent.name)
    return match.group(2) if match else stem


def _run_dir_sort_key(run_dir: Path) -> tuple[str, str]:
    match = _RUN_DIR_RE.match(run_dir.name)
    return (match.group(1) if match else "", str(run_dir))


def _apply_run_record(run: OfflineRun, record: Any, config: dict[str, Any], summary: dict[str, Any]) -> None:
    """Apply a RunRecord; later ones (run updates, resumes) carry the full current state."""
    if record.run_id:
        run.run_id = record.run_id
    if record.project:
        run.project = record.project
    if record.display_name:
        run.name = record.display_name
    if record.run_group:
        run.group = record.run_group
    if record.job_type:
        run.job_type = record.job_type
    run.tags = list(record.tags)
    if record.HasField("start_time") and run.start_time is None:
        run.start_time = record.start_time.seconds + record.start_time.nanos / 1e9
    if record.HasField("config"):
        _apply_updates(config, record.config.update, record.config.remove)
    if record.HasField("summary"):
        _apply_updates(summary, record.summary.update, record.summary.remove)


def _artifact(record: Any) -> OfflineArtifact:
    return OfflineArtifact(
        name=record.name,
        type=record.type,
        digest=record.digest,
        aliases=list(record.aliases),
        metadata=_loads(record.metadata) or {},
        references={entry.path: entry.ref for entry in record.manifest.contents if entry.ref},
        used=record.use_after_commit,
        tags=list(record.tags),
    )


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _apply_updates(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        _set_path(target, _item_path(item), _loads(item.value_json))
    for item in removes:
        _del_path(target, _item_path(item))


def _history_row(record: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for item in record.item:
        _set_path(row, _item_path(item), _history_value(item))
    for key in _HISTORY_INTERNAL_KEYS:
        row.pop(key, None)
    if "_step" not in row and record.HasField("step"):
        row["_step"] = record.step.num
    return row


def _history_value(item: Any) -> Any:
    if item.value_json:
        return _loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return _loads(item.json)
    return getattr(item, kind)


def _loads(value_json: str) -> Any:
    # Python's json accepts NaN / Infinity / -Infinity, which wandb uses for non-finite numbers.
    return json.loads(value_json) if value_json else None


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _del_path(target: dict[str, Any], keys: list[str]) -> None:
    node: Any = target
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(keys[-1], None)
