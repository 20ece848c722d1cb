"""Reading, validating, sharding and tokenizing training data.

Data files are scanned once on the driver, before any cluster resource is taken: every row is checked
(column count, empty text, known label) and a compact index is built: the byte offset of each valid row
and its label id. Workers get the index, not the rows, and read their shard by seeking into the file, so
a file far larger than memory costs 12 bytes per row. This replaces Ray Data here on purpose: it gives
errors that name file and line, and an exact, cheap resume position (epoch, batch) for a seeded
per-epoch permutation, which a streaming Ray Dataset does not offer.

Formats: tsv (no quoting: SST-2 and AG News contain raw quotes), csv (RFC 4180 quoting within a line),
jsonl (one object per line) and parquet (columns read with pyarrow).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import DataConfig, DataSource
from orchestrator.errors import DataError

SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_MAX_BAD_EXAMPLES = 5


def detect_format(source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"{source.path}: cannot tell the format from the extension {suffix!r}; set format: to one of "
            "tsv, csv, jsonl, parquet"
        )
    return SUFFIX_FORMATS[suffix]


@dataclass
class ScannedSource:
    """The validated index of one data file."""

    path: str
    format: str
    name: str
    columns: list[str]
    text_index: int | str
    pair_index: int | str | None
    label_index: int | str | None
    offsets: np.ndarray  # int64 byte offset of each valid row (row number for parquet)
    labels: np.ndarray  # int32 label id of each valid row (-1 when there is no label)
    sha256: str
    rows_read: int
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    label_subset: list[int] | None = None  # eval sets: the label ids it is scored over (None: all labels)

    def __len__(self) -> int:
        return len(self.offsets)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sha256": self.sha256,
            "rows": len(self),
            "rows_read": self.rows_read,
            "bad_rows_skipped": self.bad_rows,
        }


def _label_key(raw: Any) -> str:
    """Labels are compared as strings; ints and floats that are whole numbers become '3', not '3.0'."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return str(raw).strip()


def _sort_labels(names: Sequence[str]) -> list[str]:
    try:
        return sorted(names, key=lambda n: int(n))
    except ValueError:
        return sorted(names)


class _Rows:
    """Iterates (line number, byte offset, row) over a file, where row is a list or a dict."""

    def __init__(self, path: Path, fmt: str, header: bool):
        self.path, self.fmt, self.header = path, fmt, header

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(self.path)
            for i, row in enumerate(table.to_pylist()):
                yield i + 1, i, row
            return
        with open(self.path, "rb") as handle:
            offset = 0
            for line_no, raw in enumerate(handle, start=1):
                start = offset
                offset += len(raw)
                if line_no == 1 and self.header and self.fmt in ("tsv", "csv"):
                    continue
                yield line_no, start, raw


def parse_line(raw: bytes, fmt: str) -> Any:
    text = raw.decode("utf-8").rstrip("\r\n")
    if fmt == "tsv":
        return text.split("\t")
    if fmt == "csv":
        return next(csv.reader(io.StringIO(text)), [])
    if fmt == "jsonl":
        return json.loads(text) if text.strip() else None
    raise ValueError(fmt)


def _column_ref(source: DataSource, fmt: str, columns: list[str], column: str, role: str) -> int | str:
    """Resolve a configured column name to a list index (tsv/csv) or a key (jsonl/parquet)."""
    if fmt in ("jsonl", "parquet"):
        if columns and column not in columns:
            raise DataError(
                f"{source.path}: data.*.{role} {column!r} is not a field of this file; fields found: "
                f"{', '.join(columns)}"
            )
        return column
    if columns:
        if column in columns:
            return columns.index(column)
        if column.isdigit() and int(column) < len(columns):
            return int(column)
        raise DataError(
            f"{source.path}: line 1: data.*.{role} {column!r} is not a column of this file; the header has "
            f"{', '.join(repr(c) for c in columns)}. Set {role} to one of them, or header: false if the first "
            "line is data (wrong delimiter? .tsv files must be tab-separated)"
        )
    if not column.isdigit():
        raise DataError(
            f"{source.path}: the file has no header (header: false), so {role} must be a 0-based column "
            f"index such as '0'; got {column!r}"
        )
    return int(column)


def _read_columns(path: Path, fmt: str, header: bool) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with open(path, "rb") as handle:
        first = handle.readline()
    if not first.strip():
        return []
    if fmt == "jsonl":
        try:
            obj = json.loads(first)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:1: not a JSON object ({exc.msg}); jsonl files hold one object per line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:1: expected a JSON object per line, got {type(obj).__name__}")
        return list(obj)
    return [c.strip() for c in parse_line(first, fmt)] if header else []


def scan_source(
    source: DataSource,
    *,
    task: str,
    label_to_id: dict[str, int] | None,
    on_bad_rows: str,
    collect_labels: dict[str, int] | None = None,
) -> ScannedSource:
    """Validate every row of a file and index the valid ones.

    Args:
        source: the configured file.
        task: 'sequence-classification' (labels needed) or 'causal-lm' (text only).
        label_to_id: known labels; a label outside it is a bad row. None while the label set is
            still being discovered (training data without explicit label_names).
        on_bad_rows: 'error' raises on the first bad row; 'skip' counts it.
        collect_labels: when discovering labels, filled with label -> provisional id.

    Raises:
        DataError: naming file and line.
    """
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"{source.path}: data file not found (check data.*.path; relative paths are from {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{source.path}: not a file (point data.*.path at a data file, not a folder)")
    if path.stat().st_size == 0:
        raise DataError(f"{source.path}: the file is empty (point data.*.path at a file with rows, or fill it)")
    fmt = detect_format(source)
    header = True if source.header is None else source.header
    columns = _read_columns(path, fmt, header)
    if fmt in ("tsv", "csv") and header and not columns:
        raise DataError(f"{source.path}:1: the header line is empty")
    text_ref = _column_ref(source, fmt, columns, source.text_column, "text_column")
    pair_ref = (
        _column_ref(source, fmt, columns, source.text_pair_column, "text_pair_column")
        if source.text_pair_column
        else None
    )
    needs_label = task == "sequence-classification"
    label_ref = (
        _column_ref(source, fmt, columns, source.label_column, "label_column")
        if needs_label and source.label_column
        else None
    )
    expected_width = len(columns) if (columns and fmt in ("tsv", "csv")) else None

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)

    offsets: list[int] = []
    labels: list[int] = []
    bad = 0
    bad_examples: list[str] = []
    rows_read = 0

    def bad_row(line_no: int, why: str) -> None:
        nonlocal bad
        message = f"{source.path}:{line_no}: {why}"
        if on_bad_rows == "error":
            raise DataError(message + " (fix the row, or set data.on_bad_rows: skip to drop such rows)")
        bad += 1
        if len(bad_examples) < _MAX_BAD_EXAMPLES:
            bad_examples.append(message)

    for line_no, offset, raw in _Rows(path, fmt, header):
        if fmt != "parquet":
            if not raw.strip():
                continue  # blank lines are not rows
            try:
                row = parse_line(raw, fmt)
            except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
                rows_read += 1
                bad_row(line_no, f"cannot parse the row ({exc})")
                continue
        else:
            row = raw
        rows_read += 1
        if fmt in ("tsv", "csv"):
            width = expected_width if expected_width is not None else None
            needed = max(r for r in (text_ref, pair_ref, label_ref) if isinstance(r, int)) + 1
            if (width is not None and len(row) != width) or len(row) < needed:
                want = width if width is not None else needed
                bad_row(
                    line_no,
                    f"expected {want} {'tab' if fmt == 'tsv' else 'comma'}-separated columns, found {len(row)}",
                )
                continue
        elif not isinstance(row, dict):
            bad_row(line_no, f"expected a JSON object, got {type(row).__name__}")
            continue
        text = row_value(row, text_ref)
        if text is None or not str(text).strip():
            bad_row(line_no, f"empty text in column {source.text_column!r}")
            continue
        if pair_ref is not None and (row_value(row, pair_ref) is None or not str(row_value(row, pair_ref)).strip()):
            bad_row(line_no, f"empty text in column {source.text_pair_column!r}")
            continue
        label_id = -1
        if label_ref is not None:
            raw_label = row_value(row, label_ref)
            key = "" if raw_label is None else _label_key(raw_label)
            if not key:
                bad_row(line_no, f"empty label in column {source.label_column!r}")
                continue
            if label_to_id is not None:
                if key not in label_to_id and key.isdigit() and int(key) < len(label_to_id):
                    key = list(label_to_id)[int(key)]  # the file holds ids of the named labels
                if key not in label_to_id:
                    known = ", ".join(list(label_to_id)[:20])
                    bad_row(line_no, f"label {key!r} is not in the label set ({known})")
                    continue
                label_id = label_to_id[key]
            else:
                assert collect_labels is not None
                label_id = collect_labels.setdefault(key, len(collect_labels))
        offsets.append(offset)
        labels.append(label_id)
        if source.limit is not None and len(offsets) >= source.limit:
            break
    if not offsets:
        reason = f" ({bad} bad rows skipped; first: {bad_examples[0]})" if bad else ""
        raise DataError(f"{source.path}: no usable rows{reason}")
    return ScannedSource(
        path=str(path.resolve()),
        format=fmt,
        name=source.display_name,
        columns=columns,
        text_index=text_ref,
        pair_index=pair_ref,
        label_index=label_ref,
        offsets=np.asarray(offsets, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int32),
        sha256=digest.hexdigest(),
        rows_read=rows_read,
        bad_rows=bad,
        bad_examples=bad_examples,
    )


def row_value(row: Any, ref: int | str | None) -> Any:
    if ref is None:
        return None
    if isinstance(row, dict):
        return row.get(ref)
    return row[ref]


@dataclass
class PreparedData:
    """Everything workers need to read their shards: the scanned sources and the label map."""

    train: ScannedSource
    evals: list[ScannedSource]
    label_names: list[str]  # id -> name; empty for causal-lm

    def summary(self) -> dict[str, Any]:
        evals = []
        for e in self.evals:
            item = e.summary()
            if e.label_subset is not None:
                item["labels"] = [self.label_names[i] for i in e.label_subset]
            evals.append(item)
        return {"train": self.train.summary(), "eval": evals, "label_names": self.label_names}


def prepare_data(data: DataConfig, task: str) -> PreparedData:
    """Scan the training and eval files (driver side) and fix the label map.

    Raises:
        DataError: for a missing/empty/malformed file or a bad row, naming file and line.
    """
    label_to_id = {name: i for i, name in enumerate(data.label_names)} if data.label_names else None
    discovered: dict[str, int] = {}
    train = scan_source(
        data.train, task=task, label_to_id=label_to_id, on_bad_rows=data.on_bad_rows, collect_labels=discovered
    )
    label_names: list[str] = list(data.label_names or [])
    if task == "sequence-classification" and label_to_id is None:
        label_names = _sort_labels(list(discovered))
        if len(label_names) < 2:
            raise DataError(
                f"{data.train.path}: found only {len(label_names)} distinct label(s) ({', '.join(label_names)}); "
                "classification needs at least 2 (check label_column)"
            )
        remap = np.array([label_names.index(name) for name in discovered], dtype=np.int32)
        train.labels = remap[train.labels]
        label_to_id = {name: i for i, name in enumerate(label_names)}
    evals = [
        scan_source(source, task=task, label_to_id=label_to_id, on_bad_rows=data.on_bad_rows) for source in data.eval
    ]
    for source, scanned in zip(data.eval, evals):
        if source.labels is not None and task == "sequence-classification":
            restrict_to_labels(scanned, source.labels, label_names, on_bad_rows=data.on_bad_rows)
    names = [e.name for e in evals]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"data.eval: two eval sets are named {duplicates[0]!r}; give each a distinct data.eval[].name")
    return PreparedData(train=train, evals=evals, label_names=label_names)


def restrict_to_labels(
    scanned: ScannedSource, labels: Sequence[str], label_names: Sequence[str], *, on_bad_rows: str
) -> None:
    """Make an eval set score over ``labels`` only (its ``label_subset``: their ids, in id order).

    Raises:
        DataError: a name is not in ``label_names``, or (``on_bad_rows: error``) a row's label is outside
            ``labels``; with 'skip' such rows are dropped and counted.
    """
    unknown = [n for n in labels if n not in label_names]
    if unknown:
        raise DataError(
            f"{scanned.path}: eval labels {unknown} are not in the label set {list(label_names)}; the eval set's "
            "labels must be some of the model's labels"
        )
    subset = sorted(list(label_names).index(n) for n in labels)
    inside = np.isin(scanned.labels, subset)
    if not inside.all():
        outside = sorted({label_names[i] for i in np.unique(scanned.labels[~inside])})
        message = (
            f"{scanned.path}: {int((~inside).sum())} rows have labels {outside} outside this eval set's labels "
            f"{list(labels)}"
        )
        if on_bad_rows == "error":
            raise DataError(message + " (add them to labels, or set data.on_bad_rows: skip to drop such rows)")
        scanned.offsets, scanned.labels = scanned.offsets[inside], scanned.labels[inside]
        scanned.bad_rows += int((~inside).sum())
        if len(scanned.bad_examples) < _MAX_BAD_EXAMPLES:
            scanned.bad_examples.append(message)
        if not len(scanned.offsets):
            raise DataError(f"{scanned.path}: no usable rows ({message})")
    scanned.label_subset = subset


# --------------------------------------------------------------------------------------------------
# Worker side: reading rows by offset, sharding, batching
# --------------------------------------------------------------------------------------------------
