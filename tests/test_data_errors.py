"""A data file that cannot be read fails with an error naming the file (and the row or row group where there is
one), on the driver's scan (``data/sources.py``) and in the workers' reads (``data/readers.py``): corrupt,
truncated and non-parquet files, a parquet row group that does not decode, a jsonl with a broken line, a file
that is not UTF-8, an unreadable file, and a file that changed after the scan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import DataConfig
from orchestrator.data.readers import RowReader
from orchestrator.data.sources import PreparedData, prepare_data
from orchestrator.errors import DataError
from tests.conftest import REPO

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CLASSIFY = "sequence-classification"
ROWS = 3000
ROWS_PER_GROUP = 1000


def prepare(path: Path, **source: Any) -> PreparedData:
    return prepare_data(DataConfig.model_validate({"train": {"path": str(path), **source}}), CLASSIFY)


def good_parquet(path: Path) -> Path:
    """3,000 rows in 3 row groups of 1,000 (snappy-compressed, pyarrow's default)."""
    table = pa.table({"text": [f"row {i} " * 5 for i in range(ROWS)], "label": [i % 2 for i in range(ROWS)]})
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)
    return path


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite 40 bytes inside the text column of one row group (0-based): its pages no longer decompress."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def scan_error(path: Path, **source: Any) -> str:
    with pytest.raises(DataError) as caught:
        prepare(path, **source)
    return str(caught.value)


# --------------------------------------------------------------------------------------------------
# The driver's scan
# --------------------------------------------------------------------------------------------------


def test_a_file_that_is_not_parquet_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_text("text\tlabel\nhello\t1\n")  # a tsv under a .parquet name

    message = scan_error(path)

    assert message.startswith(f"{path}: ")
    assert "Parquet magic bytes not found" in message  # pyarrow's reason is kept
    assert "corrupt, truncated or not a parquet file" in message and "format:" in message


def test_a_truncated_parquet_names_the_file(tmp_path: Path) -> None:
    path = good_parquet(tmp_path / "train.parquet")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short

    message = scan_error(path)

    assert message.startswith(f"{path}: ") and "corrupt, truncated or not a parquet file" in message


def test_a_parquet_row_group_that_does_not_decode_names_the_file_and_its_rows(tmp_path: Path) -> None:
    path = good_parquet(tmp_path / "train.parquet")
    corrupt_row_group(path, 1)

    message = scan_error(path)

    assert message.startswith(f"{path}: row group 2 of 3 (rows 1001-2000): ")
    assert "Corrupt snappy compressed data" in message


def test_a_limit_inside_the_good_row_groups_never_reads_the_corrupt_one(tmp_path: Path) -> None:
    path = good_parquet(tmp_path / "train.parquet")
    corrupt_row_group(path, 2)

    assert len(prepare(path, limit=500).train) == 500  # row groups are read one at a time, as needed


def test_a_broken_jsonl_line_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "also good", "label": 0}\n{"text": "cut sh\n')

    message = scan_error(path)

    assert message.startswith(f"{path}:3: cannot parse the row")
    assert "on_bad_rows: skip" in message


def test_a_broken_first_jsonl_line_names_the_file_and_line_1(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "cut sh\n{"text": "good", "label": 1}\n')

    assert scan_error(path).startswith(f"{path}:1: not a JSON object")


@pytest.mark.parametrize("name", ["train.tsv", "train.csv", "train.jsonl"])
def test_a_header_line_that_is_not_utf8_names_the_file_and_line_1(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    first = b'{"t\xe9xt": "caf\xe9", "label": 1}\n' if name.endswith(".jsonl") else b"t\xe9xt\tlabel\n"
    path.write_bytes(first + b"fine\t1\n")

    message = scan_error(path)

    assert message.startswith(f"{path}:1: ") and "UTF-8" in message


@pytest.fixture
def unreadable_dir() -> Iterator[Path]:
    """A folder every user can enter (a child process that drops root must reach the file inside)."""
    folder = Path(tempfile.mkdtemp(prefix="orchestrator-unreadable-"))
    folder.chmod(0o755)
    yield folder
    for child in folder.iterdir():
        child.chmod(0o644)
        child.unlink()
    folder.rmdir()


_SCAN_AS_NOBODY = """
import sys
sys.path.insert(0, sys.argv[1])
from orchestrator.config import DataConfig
from orchestrator.data.sources import prepare_data
from orchestrator.errors import DataError
try:
    prepare_data(DataConfig.model_validate({"train": {"path": sys.argv[2]}}), "sequence-classification")
except DataError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("name", ["train.tsv", "train.parquet"])
def test_an_unreadable_file_names_the_file_and_the_fix(unreadable_dir: Path, name: str) -> None:
    path = unreadable_dir / name
    if name.endswith(".parquet"):
        good_parquet(path)
    else:
        path.write_text("text\tlabel\nhello\t1\nbye\t0\n")
    path.chmod(0)
    if os.geteuid() == 0:
        # Root reads a mode-000 file anyway: scan it from a child process that runs as nobody (uid 65534), started
        # through setpriv (util-linux): Python's own subprocess(user=...) is refused exec here.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root, which reads a mode-000 file anyway, and setpriv is not installed")
        drop_root = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        run = subprocess.run(
            [*drop_root, sys.executable, "-c", _SCAN_AS_NOBODY, str(REPO), str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 3, run.stdout + run.stderr  # 3: a DataError, not a traceback
        message = run.stdout
    else:
        message = scan_error(path)

    assert message.startswith(f"{path}: cannot read the file (permission denied)")
    assert "readable by the user the job runs as" in message


# --------------------------------------------------------------------------------------------------
# The workers' reads (the file changed, or is not there, after the driver scanned it)
# --------------------------------------------------------------------------------------------------


def read_error(prepared: PreparedData, index: int = 0) -> str:
    reader = RowReader(prepared.train)
    try:
        with pytest.raises(DataError) as caught:
            reader.get(index)
    finally:
        reader.close()
    return str(caught.value)


def test_a_worker_that_cannot_find_the_file_names_it_and_says_every_node_needs_it(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nhello\t1\nbye\t0\n")
    prepared = prepare(path)
    path.unlink()  # as on a node that does not mount the driver's folder

    message = read_error(prepared)

    assert message.startswith(f"{prepared.train.path}: cannot read the file (No such file or directory)")
    assert "same path on every node" in message


def test_a_parquet_corrupted_after_the_scan_names_the_file_on_the_worker(tmp_path: Path) -> None:
    path = good_parquet(tmp_path / "train.parquet")
    prepared = prepare(path)
    path.write_bytes(path.read_bytes()[:100])

    message = read_error(prepared)

    assert message.startswith(f"{prepared.train.path}: ") and "corrupt, truncated or not a parquet file" in message


@pytest.mark.parametrize(
    ("replacement", "index"),
    [
        (b"label\ttext\n", 1),  # cut short: the row's offset is past the end
        (b"label\ttext\n1\thello\n\xff\xfe\t0\n", 1),  # the row's bytes are no longer UTF-8
        (b"label\ttext\nhello-and-no-tab\n0\tbye\n", 0),  # the row's line has one column, the text was the 2nd
    ],
    ids=["truncated", "not-utf8", "fewer-columns"],
)
def test_a_text_file_changed_after_the_scan_names_the_file_and_the_row(
    tmp_path: Path, replacement: bytes, index: int
) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("label\ttext\n1\thello\n0\tbye\n")
    prepared = prepare(path, text_column="text")
    offset = int(prepared.train.offsets[index])
    path.write_bytes(replacement)

    message = read_error(prepared, index)

    assert message.startswith(f"{prepared.train.path}: the row at byte {offset} (row {index + 1} of the scan)")
    assert "changed after the job scanned it" in message and "start the job again" in message


def test_jsonl_rows_still_read_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"text": "é and ü", "label": 1}, {"text": "plain", "label": 0}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prepared = prepare(path)
    reader = RowReader(prepared.train)
    try:
        assert [reader.get(i)["text"] for i in range(2)] == ["é and ü", "plain"]
    finally:
        reader.close()
