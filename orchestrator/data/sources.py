"""Scanning and validating data files on the driver (the workers' side is ``orchestrator.data.readers``).

Data files are scanned once on the driver, before any cluster resource is taken: every row is checked
(column count, empty text, known label) and a compact index is built: the byte offset of each valid row
and its label id. Workers get the index, not the rows, and read their shard by seeking into the file, so
a file far larger than memory costs 12 bytes per row. This replaces Ray Data here on purpose: it gives
errors that name file and line, and an exact, cheap resume position (epoch, batch) for a seeded
per-epoch permutation, which a streaming Ray Dataset does not offer.

Formats: tsv (no quoting: SST-2 and AG News contain raw quotes), csv (RFC 4180 quoting within a line),
jsonl (one object per line) and parquet (columns read with pyarrow). Chat and prompt/completion rows are checked
by :mod:`orchestrator.data.chat_rows`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import orchestrator.storage as storage
from orchestrator.config import DataConfig, DataSource
from orchestrator.data.chat_rows import ChatRowError, chat_refs, check_chat_row
from orchestrator.data.remote_files import scan_remote
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


def read_failure(path: str | Path, exc: Exception, *, where: str = "", hint: str = "") -> DataError | None:
    """The DataError, naming the file, for a failure to read it; None when ``exc`` is not one (a bug to surface).

    Args:
        path: the file as the user wrote it (or as the scan resolved it).
        exc: what the read raised: an OS error, or a pyarrow error (a parquet file that does not decode).
        where: where in the file, e.g. ``": row group 2 of 3 (rows 1001-2000)"``.
        hint: more of what to do (the workers' side says that every node reads the file).
    """
    hint = f"; {hint}" if hint else ""
    if isinstance(exc, PermissionError):
        return DataError(
            f"{path}{where}: cannot read the file (permission denied); make it readable by the user the job runs "
            f"as{hint}"
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        return DataError(f"{path}{where}: cannot read the file ({exc.strerror or exc}){hint}")
    if isinstance(exc, OSError) or type(exc).__module__.startswith("pyarrow"):
        # pyarrow raises ArrowInvalid (a ValueError) for a bad footer, and a plain OSError (no errno) for pages
        # that do not decompress: both mean the bytes are not a readable parquet file.
        return DataError(
            f"{path}{where}: cannot read it as parquet ({exc}): the file is corrupt, truncated or not a parquet "
            f"file; write it again, or set format: if it is another format{hint}"
        )
    return None


@contextmanager
def reading_file(path: str | Path, *, where: str = "", hint: str = "") -> Iterator[None]:
    """Re-raise a failure to read ``path`` as a :class:`DataError` naming it (see :func:`read_failure`)."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        error = read_failure(path, exc, where=where, hint=hint)
        if error is None:
            raise
        raise error from exc


@dataclass
class ScannedSource:
    """The validated index of one data file."""

    path: str
    format: str
    name: str
    columns: list[str]
    text_index: int | str | None  # None for chat rows (chat_index)
    pair_index: int | str | None
    label_index: int | str | None
    offsets: np.ndarray  # int64 byte offset of each valid row (row number for parquet)
    labels: np.ndarray  # int32 label id of each valid row (-1 when there is no label)
    sha256: str
    rows_read: int
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    label_subset: list[int] | None = None  # eval sets: the label ids it is scored over (None: all labels)
    chat_index: dict[str, int | str] = field(default_factory=dict)  # messages / prompt, completion -> column
    version: str | None = None  # a URI's object version at the scan (workers read that version: remote_files)

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
            yield from _parquet_rows(self.path)
            return
        with open(self.path, "rb") as handle:
            offset = 0
            for line_no, raw in enumerate(handle, start=1):
                start = offset
                offset += len(raw)
                if line_no == 1 and self.header and self.fmt in ("tsv", "csv"):
                    continue
                yield line_no, start, raw


def _parquet_rows(path: Path) -> Iterator[tuple[int, int, Any]]:
    """A parquet file's rows as ``(row number, row index, dict)``, one row group in memory at a time (so a
    ``limit`` reads only the groups it needs, and a group that does not decode is named with its rows)."""
    import pyarrow.parquet as pq

    with reading_file(path):
        parquet = pq.ParquetFile(path)
    try:
        groups, first = parquet.num_row_groups, 0
        for group in range(groups):
            count = parquet.metadata.row_group(group).num_rows
            with reading_file(path, where=f": row group {group + 1} of {groups} (rows {first + 1}-{first + count})"):
                rows = parquet.read_row_group(group).to_pylist()
            for i, row in enumerate(rows, start=first):
                yield i + 1, i, row
            first += count
    finally:
        parquet.close()


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
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:1: the line is not UTF-8 text ({exc}); save the file as UTF-8") from None
    if fmt == "jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:1: not a JSON object ({exc.msg}); jsonl files hold one object per line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:1: expected a JSON object per line, got {type(obj).__name__}")
        return list(obj)
    if not header:
        return []
    try:
        return [c.strip() for c in parse_line(first, fmt)]
    except csv.Error as exc:
        raise DataError(f"{path}:1: cannot parse the header line ({exc})") from None


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
    if storage.is_uri(source.path):  # object storage: this node's copy is scanned (data/remote_files.py)
        return scan_remote(source, scan_source, task=task, label_to_id=label_to_id, on_bad_rows=on_bad_rows,
                           collect_labels=collect_labels)
    path, fmt, header = _resolve_file(source)
    with reading_file(source.path):  # an unreadable or corrupt file: a DataError naming it, not a bare OSError
        columns = _find_columns(source, path, fmt, header, task)
        sha256 = _file_sha256(path)
        bad = _BadRows(source.path, on_bad_rows)
        offsets: list[int] = []
        labels: list[int] = []
        rows_read = 0
        for line_no, offset, raw in _read_rows(path, fmt, header):
            rows_read += 1
            try:
                label_id = _check_row(raw, fmt, columns, source, label_to_id, collect_labels)
            except (_BadRow, ChatRowError) as exc:
                problem = str(exc)
            else:
                offsets.append(offset)
                labels.append(label_id)
                if source.limit is not None and len(offsets) >= source.limit:
                    break
                continue
            bad.add(line_no, problem)  # outside the except: the DataError it may raise does not chain the _BadRow
    return _build_index(source, path, fmt, columns, offsets, labels, sha256=sha256, rows_read=rows_read, bad=bad)


@dataclass
class _Columns:
    """Where the configured columns sit in each row of one file."""

    names: list[str]  # the header's columns (tsv/csv) or the fields (jsonl/parquet); empty without a header
    text: int | str | None  # a list index (tsv/csv) or a key (jsonl/parquet); None for chat rows
    pair: int | str | None
    label: int | str | None  # None: no label read (causal-lm, or no label_column)
    width: int | None  # tsv/csv with a header: the number of columns every row must have
    chat: dict[str, int | str] = field(default_factory=dict)  # chat rows: row key -> index or key


class _BadRow(Exception):
    """A row that cannot be used; the message says why (file and line are added by :class:`_BadRows`)."""


class _BadRows:
    """The bad rows of one file: the first raises (``on_bad_rows: error``), or each is counted and the first few
    are kept as examples (``skip``)."""

    def __init__(self, source_path: str, on_bad_rows: str):
        self.source_path = source_path
        self.on_bad_rows = on_bad_rows
        self.count = 0
        self.examples: list[str] = []

    def add(self, line_no: int, why: str) -> None:
        """Record the bad row at ``line_no``.

        Raises:
            DataError: ``on_bad_rows`` is 'error'.
        """
        message = f"{self.source_path}:{line_no}: {why}"
        if self.on_bad_rows == "error":
            raise DataError(message + " (fix the row, or set data.on_bad_rows: skip to drop such rows)")
        self.count += 1
        if len(self.examples) < _MAX_BAD_EXAMPLES:
            self.examples.append(message)


def _resolve_file(source: DataSource) -> tuple[Path, str, bool]:
    """The data file, its format and whether it has a header line: ``(path, format, header)``.

    Raises:
        DataError: the file is missing, not a file, empty, or of a format the extension does not tell.
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
    return path, fmt, header


def _find_columns(source: DataSource, path: Path, fmt: str, header: bool, task: str) -> _Columns:
    """Find the configured text, text pair and label columns in the file's header (or fields).

    Raises:
        DataError: an empty header line, or a configured column the file does not have.
    """
    names = _read_columns(path, fmt, header)
    if fmt in ("tsv", "csv") and header and not names:
        raise DataError(f"{source.path}:1: the header line is empty")
    chat = chat_refs(source, lambda column, role: _column_ref(source, fmt, names, column, role))
    text_ref = None if chat else _column_ref(source, fmt, names, source.text_column, "text_column")
    pair_ref = (
        _column_ref(source, fmt, names, source.text_pair_column, "text_pair_column")
        if source.text_pair_column and not chat
        else None
    )
    needs_label = task == "sequence-classification"
    label_ref = (
        _column_ref(source, fmt, names, source.label_column, "label_column")
        if needs_label and source.label_column
        else None
    )
    width = len(names) if (names and fmt in ("tsv", "csv")) else None
    return _Columns(names=names, text=text_ref, pair=pair_ref, label=label_ref, width=width, chat=chat)


def _file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_rows(path: Path, fmt: str, header: bool) -> Iterator[tuple[int, int, Any]]:
    """Read the file's rows as ``(line number, byte offset, raw row)``, leaving out blank lines (they are not
    rows) and the header line. A raw row is the line's bytes (tsv, csv, jsonl) or a dict (parquet)."""
    for line_no, offset, raw in _Rows(path, fmt, header):
        if fmt != "parquet" and not raw.strip():
            continue
        yield line_no, offset, raw


def _check_row(
    raw: Any,
    fmt: str,
    columns: _Columns,
    source: DataSource,
    label_to_id: dict[str, int] | None,
    collect_labels: dict[str, int] | None,
) -> int:
    """Check one row (it parses, has the columns, non-empty text, a known label) and return its label id (-1
    when no label is read).

    Raises:
        _BadRow: saying what is wrong with the row.
    """
    row = _parse_row(raw, fmt)
    _check_shape(row, fmt, columns)
    if columns.chat:  # causal-lm only: no label
        check_chat_row(row, columns.chat, source, row_value)  # a ChatRowError is a bad row too
        return -1
    text = row_value(row, columns.text)
    if text is None or not str(text).strip():
        raise _BadRow(f"empty text in column {source.text_column!r}")
    pair = columns.pair
    if pair is not None and (row_value(row, pair) is None or not str(row_value(row, pair)).strip()):
        raise _BadRow(f"empty text in column {source.text_pair_column!r}")
    if columns.label is None:
        return -1
    return _label_id(row_value(row, columns.label), source, label_to_id, collect_labels)


def _parse_row(raw: Any, fmt: str) -> Any:
    """A raw row as a list (tsv, csv) or a dict (jsonl; parquet rows already are one).

    Raises:
        _BadRow: the line does not decode or parse.
    """
    if fmt == "parquet":
        return raw
    try:
        return parse_line(raw, fmt)
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise _BadRow(f"cannot parse the row ({exc})") from None


def _check_shape(row: Any, fmt: str, columns: _Columns) -> None:
    """Check that a row has every column (tsv, csv: the header's count, and at least the configured ones) or is
    an object (jsonl, parquet).

    Raises:
        _BadRow: saying how many columns were expected and found, or what came instead of an object.
    """
    if fmt in ("tsv", "csv"):
        width = columns.width
        refs = (columns.text, columns.pair, columns.label, *columns.chat.values())
        needed = max(r for r in refs if isinstance(r, int)) + 1
        if (width is not None and len(row) != width) or len(row) < needed:
            want = width if width is not None else needed
            raise _BadRow(f"expected {want} {'tab' if fmt == 'tsv' else 'comma'}-separated columns, found {len(row)}")
    elif not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")


def _label_id(
    raw_label: Any, source: DataSource, label_to_id: dict[str, int] | None, collect_labels: dict[str, int] | None
) -> int:
    """A row's label id: from the known labels (a file may hold the ids of named labels), or, while labels are
    being discovered, a provisional id added to ``collect_labels``.

    Raises:
        _BadRow: the label is empty or not in the label set.
    """
    key = "" if raw_label is None else _label_key(raw_label)
    if not key:
        raise _BadRow(f"empty label in column {source.label_column!r}")
    if label_to_id is None:
        assert collect_labels is not None
        return collect_labels.setdefault(key, len(collect_labels))
    if key not in label_to_id and key.isdigit() and int(key) < len(label_to_id):
        key = list(label_to_id)[int(key)]  # the file holds ids of the named labels
    if key not in label_to_id:
        known = ", ".join(list(label_to_id)[:20])
        raise _BadRow(f"label {key!r} is not in the label set ({known})")
    return label_to_id[key]


def _build_index(
    source: DataSource,
    path: Path,
    fmt: str,
    columns: _Columns,
    offsets: list[int],
    labels: list[int],
    *,
    sha256: str,
    rows_read: int,
    bad: _BadRows,
) -> ScannedSource:
    """The file's index: the offset and label id of each valid row, with what was read and skipped.

    Raises:
        DataError: no row is usable.
    """
    if not offsets:
        reason = f" ({bad.count} bad rows skipped; first: {bad.examples[0]})" if bad.count else ""
        raise DataError(f"{source.path}: no usable rows{reason}")
    return ScannedSource(
        path=str(path.resolve()),
        format=fmt,
        name=source.display_name,
        columns=columns.names,
        text_index=columns.text,
        pair_index=columns.pair,
        label_index=columns.label,
        offsets=np.asarray(offsets, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int32),
        sha256=sha256,
        rows_read=rows_read,
        bad_rows=bad.count,
        bad_examples=bad.examples,
        chat_index=columns.chat,
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
