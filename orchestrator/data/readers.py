"""Reading a worker's shard of the scanned data: rows by index, batch order per epoch, collation, packing.

The driver scans and validates the files (``orchestrator.data.sources``); workers get that index and read
their rows here by seeking into the files, so exact resume is an (epoch, batch) position.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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

    def _row(self, i: int) -> Any:
        s = self.scanned
        if s.format == "parquet":
            if self._table is None:
                import pyarrow.parquet as pq

                wanted = [c for c in (s.text_index, s.pair_index) if isinstance(c, str)]
                with reading_file(s.path, hint=_EVERY_NODE):
                    self._table = pq.read_table(s.path, columns=wanted).to_pydict()
            return {k: v[int(s.offsets[i])] for k, v in self._table.items()}
        with reading_file(s.path, hint=_EVERY_NODE):
            if self._handle is None:
                self._handle = open(s.path, "rb")  # noqa: SIM115 - kept open for the reader's life
            self._handle.seek(int(s.offsets[i]))
            raw = self._handle.readline()
        if not raw.strip():
            raise self._changed(i, "is past the end of the file or blank")
        try:
            return parse_line(raw, s.format)
        except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
            raise self._changed(i, f"does not parse ({exc})") from None

    def _changed(self, i: int, why: str) -> DataError:
        s = self.scanned
        return DataError(
            f"{s.path}: the row at byte {int(s.offsets[i])} (row {i + 1} of the scan) {why}: the file changed after "
            f"the job scanned it (sha256 then {s.sha256[:12]}...); keep data files unchanged while a job runs, and "
            "start the job again to scan the file as it is now"
        )

    def __len__(self) -> int:
        return len(self.scanned)

    def get(self, i: int) -> tuple[str, str | None, int]:
        row = self._row(i)
        try:
            text = row_value(row, self.scanned.text_index)
            pair = row_value(row, self.scanned.pair_index)
        except (IndexError, KeyError, TypeError):  # fewer columns, or not an object, than when it was scanned
            raise self._changed(i, "lacks the text column") from None
        if text is None:
            raise self._changed(i, "lacks the text column")
        return str(text), (None if pair is None else str(pair)), int(self.scanned.labels[i])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


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


class Collator:
    """Tokenizes a list of rows with dynamic padding (to the longest row of the batch)."""

    def __init__(self, tokenizer: Any, *, task: str, max_length: int):
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length

    def __call__(self, rows: Sequence[tuple[str, str | None, int]]) -> dict[str, Any]:
        import torch

        texts = [r[0] for r in rows]
        pairs = [r[1] for r in rows] if rows and rows[0][1] is not None else None
        encoded = self.tokenizer(
            texts,
            pairs,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = dict(encoded)
        if self.task == "causal-lm":
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
            batch.pop("token_type_ids", None)
        else:
            batch["labels"] = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------------------
# Sequence packing (causal-lm, data.packing)
# --------------------------------------------------------------------------------------------------


def pack_token_stream(documents: Sequence[Sequence[int]], *, block_size: int, eos_id: int) -> np.ndarray:
    """Join tokenized documents, each followed by ``eos_id``, and cut the stream into ``[n, block_size]`` blocks.

    The tail shorter than a block is dropped (as in Hugging Face's ``run_clm`` ``group_texts``). Documents share
    a block without an attention barrier: the end-of-text token marks the boundary, the usual packing for
    causal-LM training, which keeps every token a real one (no padding) and lets attention use the plain
    causal kernel.
    """
    total = sum(len(d) + 1 for d in documents)
    stream = np.empty(total, dtype=np.int32)
    at = 0
    for doc in documents:
        stream[at : at + len(doc)] = doc
        stream[at + len(doc)] = eos_id
        at += len(doc) + 1
    blocks = total // block_size
    return stream[: blocks * block_size].reshape(blocks, block_size)


def end_of_text_id(tokenizer: Any) -> int:
    """The token that separates packed documents: EOS, else SEP (BERT-style vocabularies).

    Raises:
        DataError: the tokenizer has neither.
    """
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError("data.packing: the tokenizer has no eos or sep token to separate documents; turn packing off")


def cache_root() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"))


class PackedReader:
    """Random access to the packed blocks of a scanned text file (``data.packing``).

    Every row is tokenized once per node: the blocks are cached as a ``.npy`` file keyed by the file's content
    hash, the rows used, the tokenizer and the block size, and written by rename so workers on one node that
    race to build it never read a partial file. Tokenizing here rather than on the driver keeps the driver
    free of tokenizers and lets each node build its cache in parallel.
    """

    def __init__(
        self,
        scanned: ScannedSource,
        tokenizer: Any,
        *,
        block_size: int,
        cache_dir: str | Path | None = None,
        chunk_rows: int = 2048,
    ):
        self.scanned = scanned
        key = hashlib.sha256()
        key.update(scanned.sha256.encode())
        key.update(scanned.offsets.tobytes())
        key.update(str((scanned.text_index, scanned.pair_index, block_size)).encode())
        key.update(str((type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))).encode())
        key.update(json.dumps(getattr(tokenizer, "init_kwargs", {}), sort_keys=True, default=str).encode())
        self.cache_file = Path(cache_dir or cache_root()) / "packed" / f"{scanned.name}-{key.hexdigest()[:24]}.npy"
        if self.cache_file.exists():
            self.blocks = np.load(self.cache_file, mmap_mode="r")
        else:
            self.blocks = self._build(tokenizer, block_size, chunk_rows)
        if not len(self.blocks):
            raise DataError(
                f"{scanned.path}: data.packing: its {len(scanned)} rows hold fewer than data.max_length "
                f"({block_size}) tokens; lower data.max_length or add data"
            )

    def _build(self, tokenizer: Any, block_size: int, chunk_rows: int) -> np.ndarray:
        rows = RowReader(self.scanned)
        documents: list[list[int]] = []
        try:
            for start in range(0, len(rows), chunk_rows):
                chunk = [rows.get(i) for i in range(start, min(start + chunk_rows, len(rows)))]
                texts = [text if pair is None else f"{text}\n{pair}" for text, pair, _ in chunk]
                documents += tokenizer(texts, add_special_tokens=False)["input_ids"]
        finally:
            rows.close()
        blocks = pack_token_stream(documents, block_size=block_size, eos_id=end_of_text_id(tokenizer))
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_file.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(partial, blocks)
        os.replace(partial, self.cache_file)
        return blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def get(self, i: int) -> np.ndarray:
        return self.blocks[i]

    def close(self) -> None:
        pass


class PackedCollator:
    """Stacks packed blocks into a batch: every position is a real token, so there is no attention mask (the
    model runs its plain causal kernel) and the labels are the inputs (the model shifts them)."""

    def __call__(self, blocks: Sequence[np.ndarray]) -> dict[str, Any]:
        import torch

        input_ids = torch.from_numpy(np.stack(blocks).astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}
