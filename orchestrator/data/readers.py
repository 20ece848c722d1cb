"""Reading a worker's shard of the scanned data: rows by index, batch order per epoch.

The driver scans and validates the files (``orchestrator.data.sources``); workers get that index and read
their rows here by seeking into the files, so exact resume is an (epoch, batch) position.
Workers train on the rows' examples, tokenized once per node (``orchestrator.data.token_cache``) and collated
or packed by ``orchestrator.data.batching``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from orchestrator.data.chat_rows import ChatRowError, messages_of
from orchestrator.data.remote_files import worker_file
from orchestrator.data.sources import ScannedSource, parse_line, reading_file, row_value
from orchestrator.errors import DataError

# Every worker reads the files the driver scanned, at the paths the driver saw them.
_EVERY_NODE = "each worker reads the file at this path, so it must be at the same path on every node (shared storage)"


class RowReader:
    """Random access to the valid rows of a scanned file (keeps one open handle).

    A row that no longer reads as it did in the scan (the file was cut, rewritten or is missing on this node)
    is a :class:`DataError` naming the file and the row, never a bare IndexError or UnicodeDecodeError.
    """

    def __init__(self, scanned: ScannedSource):
        self.scanned = scanned
        self._handle: Any = None
        self._table: Any = None
        self._file: str | None = None

    def _local_file(self) -> str:
        """The file read: the scanned path, or for a URI this node's copy of the version scanned (remote_files.py)."""
        if self._file is None:
            self._file = worker_file(self.scanned.path, self.scanned.version)
        return self._file

    def _row(self, i: int) -> Any:
        s = self.scanned
        if s.format == "parquet":
            return self._parquet_row(int(s.offsets[i]))
        with reading_file(s.path, hint=_EVERY_NODE):  # a DataError of the copy (remote_files.py) passes through
            if self._handle is None:
                self._handle = open(self._local_file(), "rb")  # noqa: SIM115 - kept open for the reader's life
            self._handle.seek(int(s.offsets[i]))
            raw = self._handle.readline()
        if not raw.strip():
            raise self._changed(i, "is past the end of the file or blank")
        try:
            return parse_line(raw, s.format)
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
            raise self._changed(i, f"does not parse ({exc})") from None

    def _parquet_row(self, row: int) -> dict[str, Any]:
        """Row ``row`` of a parquet file, from the row group that holds it: one group in memory at a time, so a file
        larger than memory works (reading rows in order, as the token cache's builder does, reads each group once)."""
        import pyarrow.parquet as pq

        s = self.scanned
        with reading_file(s.path, hint=_EVERY_NODE):
            if self._table is None:
                self._table = pq.ParquetFile(self._local_file())
                sizes = [self._table.metadata.row_group(g).num_rows for g in range(self._table.num_row_groups)]
                self._group_starts = np.cumsum([0, *sizes])
                self._group: tuple[int, dict[str, list[Any]]] = (-1, {})
            group = int(np.searchsorted(self._group_starts, row, side="right")) - 1
            if self._group[0] != group:
                wanted = [c for c in (s.text_index, s.pair_index, *s.chat_index.values()) if isinstance(c, str)]
                self._group = (group, self._table.read_row_group(group, columns=wanted).to_pydict())
        at = row - int(self._group_starts[group])
        return {k: v[at] for k, v in self._group[1].items()}

    def _changed(self, i: int, why: str) -> DataError:
        s = self.scanned
        return DataError(
            f"{s.path}: the row at byte {int(s.offsets[i])} (row {i + 1} of the scan) {why}: the file changed after "
            f"the job scanned it (sha256 then {s.sha256[:12]}...); keep data files unchanged while a job runs, and "
            "start the job again to scan the file as it is now"
        )

    def __len__(self) -> int:
        return len(self.scanned)

    def get(self, i: int) -> dict[str, Any]:
        """Row ``i`` as a dict: ``label`` (the label id, -1 without) and, as the source is configured, ``text`` and
        ``text_pair`` (None without a pair column), or ``messages`` (a list of {role, content} dicts), or
        ``prompt`` and ``completion``."""
        s = self.scanned
        row = self._row(i)
        refs = s.chat_index or {"text": s.text_index, "text_pair": s.pair_index}
        lacks = f"lacks the {' or '.join(k for k in refs if k != 'text_pair')} column"
        try:
            out: dict[str, Any] = {key: row_value(row, ref) for key, ref in refs.items()}
        except (IndexError, KeyError, TypeError):  # fewer columns, or not an object, than when it was scanned
            raise self._changed(i, lacks) from None
        if any(out[key] is None for key in refs if key != "text_pair"):
            raise self._changed(i, lacks)
        if "messages" in out:
            try:
                out["messages"] = messages_of(out["messages"])
            except ChatRowError as exc:
                raise self._changed(i, f"no longer holds a conversation ({exc})") from None
        else:
            out.update({key: str(out[key]) for key in refs if out[key] is not None})
        out["label"] = int(s.labels[i])
        return out

    def where(self, i: int) -> str:
        """Row ``i``'s place for messages: ``path:line`` (the line counted only when asked: on an error)."""
        s = self.scanned
        offset = int(s.offsets[i])
        if s.format == "parquet":
            return f"{s.path}:{offset + 1}"  # the scan numbers parquet rows from 1
        line = 1
        with reading_file(s.path, hint=_EVERY_NODE), open(self._local_file(), "rb") as handle:
            while offset > 0:
                chunk = handle.read(min(offset, 1 << 20))
                if not chunk:
                    break
                line += chunk.count(b"\n")
                offset -= len(chunk)
        return f"{s.path}:{line}"

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._table is not None:
            self._table.close()
            self._table = None


def train_order(n: int, *, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Row order of one epoch: the same on every worker, different every epoch, fixed by the seed."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_batch_indices(
    n: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world_size: int, batch_size: int
) -> list[np.ndarray]:
    """This worker's micro-batches of row indices for one epoch."""
    order = train_order(n, epoch=epoch, seed=seed, shuffle=shuffle)
    per_worker = n // world_size
    shard = order[rank::world_size][:per_worker]
    count = per_worker // batch_size
    return [shard[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def eval_batch_indices(n: int, *, rank: int, world_size: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """This worker's eval batches as (row indices, weight) pairs.

    Every worker runs the same number of batches (ZeRO-3 forward passes are collective, so a worker
    with one batch fewer would hang the others); padding rows repeat row 0 with weight 0.
    """
    shard = np.arange(rank, n, world_size)
    per_worker = math.ceil(n / world_size)
    weights = np.ones(per_worker, dtype=np.float32)
    if len(shard) < per_worker:
        pad = per_worker - len(shard)
        weights[len(shard) :] = 0.0
        shard = np.concatenate([shard, np.zeros(pad, dtype=shard.dtype)])
    count = math.ceil(per_worker / batch_size)
    return [
        (shard[i * batch_size : (i + 1) * batch_size], weights[i * batch_size : (i + 1) * batch_size])
        for i in range(count)
    ]
