"""Reading and writing the rows of a continual-retraining round: a data file's rows as (text, text pair,
label name) with the file's content hash (:func:`read_rows`), and the round's own jsonl files
(:func:`write_jsonl`, described to the job by :func:`jsonl_source`), local or on object storage."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

import orchestrator.storage as storage
from orchestrator.config import DataSource
from orchestrator.errors import DataError
from orchestrator.lifecycle.label_space import sort_labels

RowTriple = tuple[str, str | None, str | None]
"""One row: (text, text pair, label name)."""


@dataclass
class Rows:
    """Rows of one file as (text, text pair, label name), and the file's content hash."""

    texts: list[str]
    pairs: list[str | None]
    labels: list[str | None]
    sha256: str

    def __len__(self) -> int:
        return len(self.texts)

    def pick(self, indices: Iterable[int]) -> list[RowTriple]:
        """The rows at these indices, as (text, text pair, label) tuples."""
        return [(self.texts[i], self.pairs[i], self.labels[i]) for i in indices]


def read_rows(source: DataSource, *, task: str, on_bad_rows: str, label_names: list[str] | None) -> Rows:
    """Read a file's valid rows with label names.

    With ``label_names`` (the model's labels in id order), a label that is one of them, or the 0-based id of
    one, becomes that name; any other label is kept as it is: a label the model does not know yet (see
    :func:`orchestrator.lifecycle.label_space.union_label_names`).

    Raises:
        DataError: unreadable file or bad row; or an integer label beyond the model's ids while its labels are
            names (a new label or a typo?), naming both label sets.
    """
    from orchestrator.data.readers import RowReader
    from orchestrator.data.sources import scan_source

    discovered: dict[str, int] = {}
    scanned = scan_source(source, task=task, label_to_id=None, on_bad_rows=on_bad_rows, collect_labels=discovered)
    by_provisional = {i: key for key, i in discovered.items()}
    if task == "sequence-classification" and label_names is not None:
        _refuse_ids_beyond(source, discovered, label_names)

    def name_of(key: str) -> str:
        if label_names is None or key in label_names or not (key.isdigit() and int(key) < len(label_names)):
            return key
        return label_names[int(key)]

    reader = RowReader(scanned)
    texts, pairs, labels = [], [], []
    try:
        for i in range(len(scanned)):
            row = reader.get(i)
            text, pair, provisional = row["text"], row["text_pair"], row["label"]
            label = None
            if task == "sequence-classification":
                label = name_of(by_provisional[int(provisional)])
            texts.append(text)
            pairs.append(pair)
            labels.append(label)
    finally:
        reader.close()
    return Rows(texts=texts, pairs=pairs, labels=labels, sha256=scanned.sha256)


def _refuse_ids_beyond(source: DataSource, discovered: dict[str, int], label_names: list[str]) -> None:
    """Integer labels beyond the model's ids are refused while its labels are names (a new label or a typo?)."""
    ids_are_names = all(n.isdigit() for n in label_names)
    ambiguous = [k for k in discovered if k not in label_names and k.isdigit() and not ids_are_names]
    ambiguous = [k for k in ambiguous if int(k) >= len(label_names)]
    if ambiguous:
        raise DataError(
            f"{source.path}: its labels {sort_labels(discovered)} include ids {sort_labels(ambiguous)} beyond "
            f"the model's label set {label_names} (ids 0-{len(label_names) - 1}); write new labels as names, "
            "not numbers"
        )


def labels_in(source: dict[str, Any], *, task: str, label_names: list[str], on_bad_rows: str) -> set[str]:
    """The label names that occur in an eval file (ids mapped to names as training maps them)."""
    from orchestrator.data.sources import scan_source

    scanned = scan_source(
        DataSource.model_validate(source),
        task=task,
        label_to_id={n: i for i, n in enumerate(label_names)},
        on_bad_rows=on_bad_rows,
    )
    return {label_names[int(i)] for i in np.unique(scanned.labels)}


@dataclass(frozen=True)
class Written:
    """What :func:`write_jsonl` wrote: the number of rows and the file's sha256 (what a scan of it finds)."""

    rows: int
    sha256: str


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[RowTriple]) -> Written:
    """Write rows as jsonl ({text, text_pair?, label?}) to a local path or a URI, whole: a reader (a worker, a
    later round) never sees a part of the file (``orchestrator.storage.write_bytes``: a rename, or one PUT).

    Raises:
        StorageError: the location cannot be written (naming it).
    """
    lines = []
    for text, pair, label in rows:
        row: dict[str, Any] = {"text": text}
        if pair is not None:
            row["text_pair"] = pair
        if label is not None:
            row["label"] = label
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    data = "".join(lines).encode("utf-8")
    storage.write_bytes(path, data)
    return Written(rows=len(lines), sha256=hashlib.sha256(data).hexdigest())


def jsonl_source(path: str | os.PathLike[str], *, name: str, pairs: bool, labels: bool) -> dict[str, Any]:
    """The data source (as a dict) of a jsonl file written by :func:`write_jsonl`."""
    return {
        "path": str(path),
        "name": name,
        "format": "jsonl",
        "text_column": "text",
        "text_pair_column": "text_pair" if pairs else None,
        "label_column": "label" if labels else None,
    }
