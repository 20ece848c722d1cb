"""Tokenize once: every row of a scanned file encoded a single time per node, into a memory-mapped Arrow cache.

A worker reads its examples from the cache by index: the (epoch, batch) resume position over example indices
stays exact, and the training thread never tokenizes. The cache of one file is a folder under
``<ORCHESTRATOR_CACHE or ~/.cache/orchestrator>/tokens/`` keyed by everything that decides its content: the file's
bytes (the scan's sha256), the rows used (their offsets, i.e. ``limit`` and skipped rows) and their label ids, the
columns read, and the encoder's fingerprint (tokenizer, chat template, ``train_on``, ``max_length``, truncation
policy: :meth:`orchestrator.data.encoding.Encoder.fingerprint`). A second run with the same key opens it and
tokenizes nothing.

Built once per node: the worker with local rank 0 holds a file lock (``filelock``; two nodes that share the cache
folder do not build it twice), encodes the rows with ``datasets.Dataset.map(num_proc=<the node's CPUs>)`` (each
process reads its chunks of rows by index through :class:`~orchestrator.data.readers.RowReader`, so no process
holds the file in memory, and ``datasets`` writes the examples to Arrow files as they come, a batch at a time),
into a temporary folder that is renamed into place when complete. The node's other ranks wait for that folder to
appear, then memory-map the same files: one copy in the page cache per node, whatever the ranks.

Why Hugging Face ``datasets`` and not Ray Data: training needs random access by example index (the seeded
per-epoch permutation and the exact resume position), which a memory-mapped Arrow table gives at no cost while a
Ray Dataset is a stream of blocks; the Arrow files are memory-mapped and shared by every rank of a node (Ray Data
would hold blocks in the object store, per node, and hand them to one consumer); and ``Dataset.map`` gives a
parallel build that writes to disk as it goes, with the cache keyed by our own fingerprint. The work here is one
node's CPUs over one file; Ray Data's strength (a pipeline across the cluster's nodes) is not needed when every
node needs every example anyway.

Bad rows found by encoding (a chat the template cannot render, a prompt longer than ``max_length``:
:class:`~orchestrator.data.encoding.BadRowError`) raise, naming file and line (``data.on_bad_rows: error``), or are
dropped and counted (``skip``): :attr:`TokenCache.dropped` and :attr:`TokenCache.bad_examples`, which the recipe
adds to the scan's count so that they reach the run summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.encoding import BadRowError, make_encoder
from orchestrator.data.readers import RowReader
from orchestrator.data.sources import ScannedSource
from orchestrator.errors import DataError
from orchestrator.storage import cache_root as node_cache_root

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cache's layout or columns change
CHUNK_ROWS = 1000  # rows per map batch (and per Arrow record batch written)
MIN_ROWS_PER_PROCESS = 4000  # below this a process costs more to start than it saves
_META = "meta.json"
_MAX_BAD_EXAMPLES = 5


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The node's cache folder: ``cache_dir`` if given, else ``ORCHESTRATOR_CACHE``, else ``~/.cache/orchestrator``."""
    return Path(cache_dir) if cache_dir else node_cache_root()


def node_cpus() -> int:
    """The CPUs this process may run on (the whole node unless the process is pinned)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_key(scanned: ScannedSource, encoder: Any, *, task: str) -> str:
    """The hex key of a file's cache: content, rows used, their labels, the columns read, the encoding."""
    key = hashlib.sha256()
    key.update(json.dumps([CACHE_FORMAT, task, scanned.sha256, scanned.format]).encode())
    key.update(np.ascontiguousarray(scanned.offsets, dtype=np.int64).tobytes())
    key.update(np.ascontiguousarray(scanned.labels, dtype=np.int32).tobytes())
    # Every column reference of the scan (text, pair, label, and the chat columns where the scan has them).
    columns = {k: v for k, v in sorted(vars(scanned).items()) if k.endswith(("_index", "_column", "_ref"))}
    key.update(json.dumps(columns, sort_keys=True, default=str).encode())
    key.update(encoder.fingerprint().encode())
    return key.hexdigest()


def _features(task: str) -> Any:
    from datasets import Features, List, Value

    labels = List(Value("int32")) if task == "causal-lm" else Value("int64")
    return Features(
        {
            "row": Value("int64"),  # the example's row in the scan (RowReader index): rows may be dropped
            "length": Value("int32"),
            "input_ids": List(Value("int32")),
            "labels": labels,
            "token_type_ids": List(Value("int8")),
        }
    )


def _row_dict(got: Any) -> dict[str, Any]:
    """A row as the encoder takes it (``RowReader.get`` returns a dict; older readers a (text, pair, label) tuple)."""
    if isinstance(got, dict):
        return got
    text, pair, label = got
    return {"text": text, "text_pair": pair, "label": label}


class _EncodeChunk:
    """The map function: encodes a batch of row indices, reading the rows itself (one RowReader per process).
    Picklable, for ``num_proc`` processes; skippable bad rows are left out (``on_bad_rows: skip``)."""

    def __init__(self, scanned: ScannedSource, encoder: Any, *, skip_bad: bool):
        self.scanned, self.encoder, self.skip_bad = scanned, encoder, skip_bad
        self._reader: RowReader | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}  # each process opens its own file handle

    def encode(self, i: int, *, locate: bool) -> dict[str, Any]:
        """Row ``i`` encoded; with ``locate`` an error names its line (counting lines reads the file up to the row,
        so rows that are only counted and dropped are not located)."""
        if self._reader is None:
            self._reader = RowReader(self.scanned)
        reader = self._reader
        row = _row_dict(reader.get(i))
        where = getattr(reader, "where", None) if locate else None
        return self.encoder.encode(row, where=(lambda: where(i)) if where else None)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {k: [] for k in ("row", "length", "input_ids", "labels", "token_type_ids")}
        for i in batch["row"]:
            try:
                example = self.encode(int(i), locate=not self.skip_bad)
            except BadRowError:
                if not self.skip_bad:
                    raise
                continue
            out["row"].append(int(i))
            out["length"].append(len(example["input_ids"]))
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["token_type_ids"].append(example.get("token_type_ids"))
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@dataclass
class BuildInfo:
    """What building (or opening) a cache did, for the run's start record and the benchmarks."""

    built: bool  # False: an existing cache was opened
    seconds: float  # building, or waiting for and opening
    processes: int = 0
    dropped: int = 0
    bad_examples: list[str] = field(default_factory=list)


class TokenCache:
    """The encoded examples of one scanned file, memory-mapped; example ``i`` is row ``rows[i]`` of the scan.

    Open it with :meth:`open`. ``get(i)`` returns ``{"input_ids", "labels"[, "token_type_ids"]}``.
    """

    def __init__(self, scanned: ScannedSource, folder: Path, info: BuildInfo):
        from datasets import Dataset, concatenate_datasets

        self.scanned, self.folder, self.info = scanned, folder, info
        meta = json.loads((folder / _META).read_text())
        parts = [Dataset.from_file(str(folder / name)) for name in meta["files"]]  # memory-mapped, not read
        self.dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        self.info.dropped, self.info.bad_examples = meta["dropped"], meta["bad_examples"]
        table = self.dataset.data
        self.rows = table.column("row").to_numpy()
        self.lengths = table.column("length").to_numpy()
        self._with_types = meta["token_type_ids"]

    @property
    def dropped(self) -> int:
        """Rows the encoder found bad and ``on_bad_rows: skip`` dropped."""
        return self.info.dropped

    @property
    def bad_examples(self) -> list[str]:
        return self.info.bad_examples

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> dict[str, Any]:
        return self._example(self.dataset[int(i)])

    def get_many(self, indices: Any) -> list[dict[str, Any]]:
        """Several examples in one read (a packed block's documents)."""
        columns = self.dataset[[int(i) for i in indices]]
        return [self._example({k: v[j] for k, v in columns.items()}) for j in range(len(columns["row"]))]

    def _example(self, record: dict[str, Any]) -> dict[str, Any]:
        example = {"input_ids": record["input_ids"], "labels": record["labels"]}
        if self._with_types:
            example["token_type_ids"] = record["token_type_ids"]
        return example

    def close(self) -> None:
        pass  # memory-mapped: the mapping goes with the object

    # ------------------------------------------------------------------------------------------------- open
    @classmethod
    def open(
        cls,
        scanned: ScannedSource,
        encoder: Any,
        *,
        task: str,
        on_bad_rows: str = "error",
        builder: bool = True,
        cache_dir: str | Path | None = None,
        num_proc: int | None = None,
        poll_s: float = 0.5,
    ) -> TokenCache:
        """The file's cache: opened if it exists; else built (``builder``: the node's local rank 0) or waited for.

        Args:
            scanned: the driver's scan of the file.
            encoder: its :class:`~orchestrator.data.encoding.Encoder` (picklable; ``encode`` and ``fingerprint``).
            task: 'causal-lm' or 'sequence-classification' (the type of the labels column).
            on_bad_rows: 'error' raises the first row the encoder rejects; 'skip' drops and counts such rows.
            builder: whether this process builds a missing cache; the others wait until it is in place.
            cache_dir: the cache root (default :func:`cache_root`).
            num_proc: encoding processes (default: the node's CPUs, fewer for small files).
            poll_s: how often a waiting rank looks for the finished cache.

        Raises:
            DataError: a bad row (``on_bad_rows: error``), naming file and line, or a file with no row left.
        """
        started = time.perf_counter()
        folder = cache_root(cache_dir) / "tokens" / f"{scanned.name}-{cache_key(scanned, encoder, task=task)[:32]}"
        built, processes = False, 0
        if not (folder / _META).is_file():
            if builder:
                built, processes = _build_locked(scanned, encoder, folder, task, on_bad_rows, num_proc)
            else:
                _wait_for(folder, poll_s)
        cache = cls(scanned, folder, BuildInfo(built=built, seconds=0.0, processes=processes))
        cache.info.seconds = time.perf_counter() - started
        if not len(cache):
            raise DataError(
                f"{scanned.path}: no usable rows: all {len(scanned)} were dropped as bad rows when encoded (first: "
                f"{(cache.bad_examples or ['?'])[0]}); fix the rows, or the settings that reject them"
            )
        return cache


def _build_locked(
    scanned: ScannedSource, encoder: Any, folder: Path, task: str, on_bad_rows: str, num_proc: int | None
) -> tuple[bool, int]:
    """Build under the folder's lock unless someone else did meanwhile. Returns ``(built here, processes)``."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / _META).is_file():  # another node sharing the folder built it while we waited for the lock
            return False, 0
        return True, _build(scanned, encoder, folder, task, on_bad_rows, num_proc)


def _wait_for(folder: Path, poll_s: float) -> None:
    """Wait until the node's builder has renamed the finished cache into place (it fails the run if it fails)."""
    waited, said = 0.0, 0.0
    while not (folder / _META).is_file():
        time.sleep(poll_s)
        waited += poll_s
        if waited - said >= 60:
            said = waited
            logger.info("waiting %.0f s for local rank 0 to build the token cache %s", waited, folder)


def _build(
    scanned: ScannedSource, encoder: Any, folder: Path, task: str, on_bad_rows: str, num_proc: int | None
) -> int:
    """Encode every row into Arrow files in a temporary folder, then rename it to ``folder``. Returns the
    number of processes used."""
    import datasets

    datasets.disable_progress_bars()
    # The fast tokenizer's own threads would be forked half-initialised; the processes are the parallelism here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    n = len(scanned)
    processes = max(1, min(num_proc or node_cpus(), n // MIN_ROWS_PER_PROCESS))
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    encode = _EncodeChunk(scanned, encoder, skip_bad=on_bad_rows == "skip")
    try:
        rows = datasets.Dataset.from_dict({"row": np.arange(n, dtype=np.int64)})  # 8 bytes a row, in memory
        encoded = rows.map(
            encode,
            batched=True,
            batch_size=CHUNK_ROWS,
            writer_batch_size=CHUNK_ROWS,
            num_proc=processes if processes > 1 else None,
            features=_features(task),
            remove_columns=["row"],
            cache_file_name=str(partial / "part.arrow"),
            new_fingerprint=folder.name,  # our key: datasets need not hash the encoder (and its tokenizer)
            desc=f"tokenizing {scanned.name}",
        )
        files = [Path(f["filename"]).name for f in encoded.cache_files]
        kept = encoded.data.column("row").to_numpy()
        with_types = encoded.data.column("token_type_ids").null_count < len(encoded)
        del encoded, rows
        meta = {
            "format": CACHE_FORMAT,
            "source": scanned.path,
            "sha256": scanned.sha256,
            "rows": n,
            "files": files,
            "token_type_ids": bool(with_types),
            "dropped": n - len(kept),
            "bad_examples": _bad_examples(encode, n, kept),
        }
        (partial / _META).write_text(json.dumps(meta, indent=1))
        _publish(partial, folder)
    finally:
        encode.close()
        shutil.rmtree(partial, ignore_errors=True)
    return processes


def _bad_examples(encode: _EncodeChunk, n: int, kept: np.ndarray) -> list[str]:
    """The messages of the first few dropped rows (encoded again here: the processes that dropped them are gone)."""
    messages = []
    for i in np.setdiff1d(np.arange(n), kept)[:_MAX_BAD_EXAMPLES].tolist():
        try:
            encode.encode(int(i), locate=True)
        except BadRowError as exc:
            messages.append(str(exc))
    return messages


def _publish(partial: Path, folder: Path) -> None:
    """Rename the finished folder into place; a folder already there (built meanwhile) wins."""
    try:
        os.rename(partial, folder)
    except OSError:
        if not (folder / _META).is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a half-removed leftover: replace it
            os.rename(partial, folder)


def open_token_cache(
    source: Any,
    scanned: ScannedSource,
    data: Any,
    tokenizer: Any,
    *,
    task: str,
    builder: bool,
    cache_dir: str | Path | None = None,
) -> TokenCache:
    """The token cache of one configured file (train or eval set), as a training worker opens it.

    Rows its encoder rejects and ``data.on_bad_rows: skip`` drops are added to the scan's count in a copy of the
    scan (``cache.scanned``; the driver's stays as it was sent), so that the run's summary counts them.

    Args:
        source: the file's ``DataSource``; ``data``: the ``DataConfig``; ``tokenizer``: the model's.
        scanned: the driver's scan of the file.
        task: the model's task.
        builder: whether this process builds a missing cache (the node's local rank 0).
        cache_dir: the cache root the driver chose (default :func:`cache_root`).
    """
    encoder = make_encoder(source, data, tokenizer, task=task)
    cache = TokenCache.open(
        scanned, encoder, task=task, on_bad_rows=data.on_bad_rows, builder=builder, cache_dir=cache_dir
    )
    if cache.dropped:
        cache.scanned = replace(
            scanned,
            bad_rows=scanned.bad_rows + cache.dropped,
            bad_examples=(scanned.bad_examples + cache.bad_examples)[:_MAX_BAD_EXAMPLES],
        )
    return cache
