"""Spec of data reading: formats, bad rows, label maps, sharding and batching."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.budget import batches_per_epoch
from orchestrator.config import DataConfig
from orchestrator.data.batching import PaddingCollator, pad_token_id
from orchestrator.data.encoding import make_encoder
from orchestrator.data.readers import RowReader, eval_batch_indices, train_batch_indices
from orchestrator.data.sources import PreparedData, prepare_data
from orchestrator.errors import DataError

CLASSIFY = "sequence-classification"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "sst2" / "train.tsv").is_file() or not (SHARED_DATA / "agnews" / "train.tsv").is_file(),
    reason=f"shared data sets not found under {SHARED_DATA} (expected next to the repository, in ../shared/data)",
)


def prepare(train: dict[str, Any], *, task: str = CLASSIFY, **data: Any) -> PreparedData:
    return prepare_data(DataConfig.model_validate({"train": train, **data}), task)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def read_all(prepared_source: Any) -> list[tuple[str, str | None, int]]:
    reader = RowReader(prepared_source)
    try:
        return [as_tuple(reader.get(i)) for i in range(len(prepared_source))]
    finally:
        reader.close()


def as_tuple(row: dict[str, Any]) -> tuple[str, str | None, int]:
    return row["text"], row["text_pair"], row["label"]


def raw_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").split("\n")[:-1]  # the files end with a newline


# --------------------------------------------------------------------------------------------------
# The shared real data sets, read as they are
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sst2() -> PreparedData:
    return prepare({"path": str(SHARED_DATA / "sst2" / "train.tsv"), "text_column": "sentence"})


@pytest.fixture(scope="module")
def agnews() -> PreparedData:
    return prepare(
        {"path": str(SHARED_DATA / "agnews" / "train.tsv"), "header": False, "text_column": "0", "label_column": "1"}
    )


@needs_shared_data
def test_sst2_reads_every_row_with_binary_labels(sst2: PreparedData) -> None:
    lines = raw_lines(SHARED_DATA / "sst2" / "train.tsv")

    assert lines[0] == "sentence\tlabel"
    assert sst2.label_names == ["0", "1"]
    assert len(sst2.train) == len(lines) - 1
    assert sst2.train.bad_rows == 0
    assert sst2.train.columns == ["sentence", "label"]
    assert set(np.unique(sst2.train.labels)) == {0, 1}


@needs_shared_data
def test_sst2_row_reader_returns_the_raw_sentence_and_label(sst2: PreparedData) -> None:
    lines = raw_lines(SHARED_DATA / "sst2" / "train.tsv")
    reader = RowReader(sst2.train)

    for i in (0, 1, 12_345, len(sst2.train) - 1):
        sentence, label = lines[i + 1].split("\t")  # +1: the header line
        text, pair, label_id = as_tuple(reader.get(i))
        assert text == sentence  # kept as distributed, trailing space included
        assert pair is None
        assert sst2.label_names[label_id] == label
    reader.close()


@needs_shared_data
def test_agnews_reads_without_header_and_sorts_label_names(agnews: PreparedData) -> None:
    lines = raw_lines(SHARED_DATA / "agnews" / "train.tsv")

    assert agnews.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert len(agnews.train) == len(lines)  # no header: every line is a row
    assert agnews.train.bad_rows == 0
    assert agnews.train.columns == []


@needs_shared_data
def test_agnews_text_with_html_escapes_and_quotes_survives(agnews: PreparedData) -> None:
    lines = raw_lines(SHARED_DATA / "agnews" / "train.tsv")
    with_escape = next(i for i, line in enumerate(lines) if "#39;" in line)
    with_quotes = next(i for i, line in enumerate(lines) if '""' in line)
    reader = RowReader(agnews.train)

    for i in (0, with_escape, with_quotes, len(lines) - 1):
        raw_text, raw_label = lines[i].split("\t")
        text, _, label_id = as_tuple(reader.get(i))
        assert text == raw_text  # tsv has no quoting: quotes and escapes are part of the text
        assert agnews.label_names[label_id] == raw_label
    assert "#39;" in reader.get(with_escape)["text"]
    assert '""' in reader.get(with_quotes)["text"]
    reader.close()


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def test_tsv_with_header(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\nhello world\tpos\nbye now\tneg\n")

    prepared = prepare({"path": str(path)})

    assert prepared.label_names == ["neg", "pos"]
    assert read_all(prepared.train) == [("hello world", None, 1), ("bye now", None, 0)]


def test_csv_keeps_a_quoted_comma_inside_the_text(tmp_path: Path) -> None:
    path = write(tmp_path, "train.csv", 'text,label\n"hello, world",pos\n"she said ""hi""",neg\n')

    prepared = prepare({"path": str(path)})

    assert prepared.train.format == "csv"
    assert read_all(prepared.train) == [("hello, world", None, 1), ('she said "hi"', None, 0)]


def test_jsonl_with_integer_labels(tmp_path: Path) -> None:
    rows = [{"text": "first", "label": 1}, {"text": "second", "label": 0}, {"text": "third", "label": 1.0}]
    path = write(tmp_path, "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    prepared = prepare({"path": str(path)})

    assert prepared.label_names == ["0", "1"]  # 1 and 1.0 are the same label
    assert read_all(prepared.train) == [("first", None, 1), ("second", None, 0), ("third", None, 1)]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta", "gamma"], "label": ["x", "y", "x"]}), path)

    prepared = prepare({"path": str(path)})

    assert prepared.train.format == "parquet"
    assert prepared.label_names == ["x", "y"]
    assert read_all(prepared.train) == [("alpha", None, 0), ("beta", None, 1), ("gamma", None, 0)]


def test_header_false_refers_to_columns_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "pos\tgreat film\nneg\tdull film\n")

    prepared = prepare({"path": str(path), "header": False, "text_column": "1", "label_column": "0"})

    assert read_all(prepared.train) == [("great film", None, 1), ("dull film", None, 0)]


def test_header_false_needs_index_column_names(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "great film\tpos\n")

    with pytest.raises(DataError, match="0-based column index"):
        prepare({"path": str(path), "header": False})


def test_text_pair_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "nli.tsv",
        "premise\thypothesis\tlabel\n"
        "a dog runs\tan animal moves\tentailment\n"
        "a cat sleeps\ta cat runs\tcontradiction\n",
    )

    prepared = prepare({"path": str(path), "text_column": "premise", "text_pair_column": "hypothesis"})

    assert read_all(prepared.train) == [
        ("a dog runs", "an animal moves", 1),
        ("a cat sleeps", "a cat runs", 0),
    ]


def test_limit_keeps_the_first_valid_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(10)))

    prepared = prepare({"path": str(path), "limit": 4})

    assert [text for text, _, _ in read_all(prepared.train)] == ["row 0", "row 1", "row 2", "row 3"]


def test_causal_lm_needs_no_label_column(tmp_path: Path) -> None:
    path = write(tmp_path, "corpus.jsonl", '{"text": "once upon a time"}\n{"text": "the end"}\n')

    prepared = prepare({"path": str(path)}, task="causal-lm")

    assert prepared.label_names == []
    assert read_all(prepared.train) == [("once upon a time", None, -1), ("the end", None, -1)]


# --------------------------------------------------------------------------------------------------
# Bad rows and bad files
# --------------------------------------------------------------------------------------------------

BAD_ROWS_TSV = (
    "text\tlabel\n"  # line 1
    "good one\tpos\n"
    "   \tneg\n"  # line 3: empty text
    "good two\tneg\n"
    "odd label\tmaybe\n"  # line 5: unknown label
    "too\tmany\tcolumns\n"  # line 6: wrong column count
    "good three\tpos\n"
)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (3, "empty text in column 'text'"),
        (5, "label 'maybe' is not in the label set"),
        (6, "expected 2 tab-separated columns, found 3"),
    ],
)
def test_bad_row_is_an_error_naming_file_and_line(tmp_path: Path, line: int, why: str) -> None:
    lines = BAD_ROWS_TSV.splitlines(keepends=True)
    only_this_bad_row = "".join(lines[:2] + [lines[line - 1]] + lines[6:])  # header, a good row, the bad row
    path = write(tmp_path, "train.tsv", only_this_bad_row)

    with pytest.raises(DataError) as caught:
        prepare({"path": str(path)}, label_names=["neg", "pos"])

    message = str(caught.value)
    assert message.startswith(f"{path}:3: ")  # the bad row is the file's 3rd line here
    assert why in message
    assert "on_bad_rows: skip" in message


def test_bad_rows_are_counted_and_skipped_on_request(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", BAD_ROWS_TSV)

    prepared = prepare({"path": str(path)}, label_names=["neg", "pos"], on_bad_rows="skip")

    assert [text for text, _, _ in read_all(prepared.train)] == ["good one", "good two", "good three"]
    assert prepared.train.bad_rows == 3
    assert prepared.train.rows_read == 6
    assert prepared.train.summary()["bad_rows_skipped"] == 3
    assert [re.match(r".*:(\d+): ", e).group(1) for e in prepared.train.bad_examples] == ["3", "5", "6"]


def test_a_file_of_only_bad_rows_has_no_usable_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\n \tpos\n")

    with pytest.raises(DataError, match="no usable rows"):
        prepare({"path": str(path)}, on_bad_rows="skip")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        prepare({"path": str(tmp_path / "nope.tsv")})


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "")

    with pytest.raises(DataError, match="the file is empty"):
        prepare({"path": str(path)})


def test_csv_read_as_tsv_points_at_the_header_and_delimiter(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text,label\nhello,pos\nbye,neg\n")

    with pytest.raises(DataError) as caught:
        prepare({"path": str(path)})

    message = str(caught.value)
    assert str(path) in message
    assert "the header has 'text,label'" in message
    assert "wrong delimiter" in message


def test_unknown_column_in_jsonl_lists_the_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "train.jsonl", '{"sentence": "hi", "label": 1}\n')

    with pytest.raises(DataError, match="fields found: sentence, label"):
        prepare({"path": str(path)})


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    path = write(tmp_path, "train.txt", "text\tlabel\nhi\tpos\n")

    with pytest.raises(DataError, match="set format: to one of tsv, csv, jsonl, parquet"):
        prepare({"path": str(path)})


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "train.txt", "text\tlabel\nhi\tpos\nho\tneg\n")

    prepared = prepare({"path": str(path), "format": "tsv"})

    assert len(prepared.train) == 2


# --------------------------------------------------------------------------------------------------
# Label map
# --------------------------------------------------------------------------------------------------


def test_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\na\t10\nb\t2\nc\t1\n")

    prepared = prepare({"path": str(path)})

    assert prepared.label_names == ["1", "2", "10"]
    assert [label for _, _, label in read_all(prepared.train)] == [2, 1, 0]


def test_explicit_label_names_fix_the_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")

    prepared = prepare({"path": str(path)}, label_names=["pos", "neg", "neutral"])

    assert prepared.label_names == ["pos", "neg", "neutral"]
    assert [label for _, _, label in read_all(prepared.train)] == [0, 1]


def test_a_single_label_is_not_enough_to_classify(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tpos\n")

    with pytest.raises(DataError, match="at least 2"):
        prepare({"path": str(path)})


def test_eval_label_unseen_in_training_is_a_bad_row(tmp_path: Path) -> None:
    train = write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    dev = write(tmp_path, "dev.tsv", "text\tlabel\nc\tpos\nd\tneutral\n")

    with pytest.raises(DataError) as caught:
        prepare({"path": str(train)}, eval=[{"path": str(dev)}])
    assert str(caught.value).startswith(f"{dev}:3: label 'neutral' is not in the label set")

    prepared = prepare({"path": str(train)}, eval=[{"path": str(dev)}], on_bad_rows="skip")
    assert prepared.evals[0].bad_rows == 1
    assert read_all(prepared.evals[0]) == [("c", None, prepared.label_names.index("pos"))]


def test_eval_sets_share_the_training_label_ids(tmp_path: Path) -> None:
    train = write(tmp_path, "train.tsv", "text\tlabel\na\tb-label\nb\ta-label\n")
    dev = write(tmp_path, "dev.jsonl", '{"text": "c", "label": "a-label"}\n{"text": "d", "label": "b-label"}\n')

    prepared = prepare({"path": str(train)}, eval=[{"path": str(dev)}])

    assert prepared.label_names == ["a-label", "b-label"]
    assert [label for _, _, label in read_all(prepared.train)] == [1, 0]
    assert [label for _, _, label in read_all(prepared.evals[0])] == [0, 1]


def test_eval_sets_need_distinct_names(tmp_path: Path) -> None:
    train = write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
    (tmp_path / "x").mkdir()
    dev_a = write(tmp_path, "dev.tsv", "text\tlabel\nc\tpos\n")
    dev_b = write(tmp_path / "x", "dev.tsv", "text\tlabel\nd\tneg\n")

    with pytest.raises(DataError, match="two eval sets are named 'dev'"):
        prepare({"path": str(train)}, eval=[{"path": str(dev_a)}, {"path": str(dev_b)}])


# --------------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------------

N_ROWS, WORLD, BATCH, SEED = 103, 2, 4, 7


def shards(epoch: int, seed: int = SEED, shuffle: bool = True) -> list[list[np.ndarray]]:
    return [
        train_batch_indices(
            N_ROWS, epoch=epoch, seed=seed, shuffle=shuffle, rank=rank, world_size=WORLD, batch_size=BATCH
        )
        for rank in range(WORLD)
    ]


def test_train_shards_are_disjoint_equal_and_drop_less_than_one_global_batch() -> None:
    per_rank = shards(epoch=0)
    rows = [np.concatenate(batches) for batches in per_rank]

    assert len(per_rank[0]) == len(per_rank[1]) == batches_per_epoch(N_ROWS, WORLD, BATCH)
    assert all(len(batch) == BATCH for batches in per_rank for batch in batches)
    assert not set(rows[0]) & set(rows[1])
    covered = set(rows[0]) | set(rows[1])
    assert covered <= set(range(N_ROWS))
    assert 0 <= N_ROWS - len(covered) < WORLD * BATCH


def test_train_order_is_fixed_by_seed_and_epoch() -> None:
    def flat(per_rank: list[list[np.ndarray]]) -> list[int]:
        return [int(i) for batches in per_rank for batch in batches for i in batch]

    assert flat(shards(epoch=1)) == flat(shards(epoch=1))
    assert flat(shards(epoch=1)) != flat(shards(epoch=2))
    assert flat(shards(epoch=1)) != flat(shards(epoch=1, seed=SEED + 1))


def test_without_shuffle_rows_are_dealt_in_file_order() -> None:
    first_batches = [batches[0].tolist() for batches in shards(epoch=0, shuffle=False)]

    assert first_batches == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize(("n", "world", "batch"), [(7, 2, 2), (10, 2, 3), (5, 3, 4), (1, 2, 8), (64, 2, 8)])
def test_eval_batches_weight_every_row_exactly_once(n: int, world: int, batch: int) -> None:
    per_rank = [eval_batch_indices(n, rank=rank, world_size=world, batch_size=batch) for rank in range(world)]

    assert len({len(batches) for batches in per_rank}) == 1  # equal batch counts: no rank waits alone
    weight_of_row = np.zeros(n)
    for batches in per_rank:
        for rows, weights in batches:
            assert len(rows) == len(weights)
            np.add.at(weight_of_row, rows, weights)
    assert weight_of_row.tolist() == [1.0] * n
    assert sum(float(w.sum()) for batches in per_rank for _, w in batches) == n


# --------------------------------------------------------------------------------------------------
# Collation of encoded rows (real MiniLM tokenizer; packing and the token cache: test_batching.py, test_token_cache.py)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer(minilm_tokenizer: Any) -> Any:
    return minilm_tokenizer


def collate(tokenizer: Any, rows: list[tuple[str, str | None, int]], *, task: str, max_length: int) -> Any:
    """Rows encoded as the token cache encodes them, then collated as training does."""
    data = DataConfig.model_validate({"train": {"path": "rows.tsv"}, "max_length": max_length})
    encoder = make_encoder(data.train, data, tokenizer, task=task)
    examples = [encoder.encode({"text": text, "text_pair": pair, "label": label}) for text, pair, label in rows]
    return PaddingCollator(pad_token_id(tokenizer), task=task)(examples)


def test_collator_pads_to_the_longest_row_of_the_batch(tokenizer: Any) -> None:
    rows = [("a short one", None, 1), ("a much longer sentence than the other one in this batch", None, 0)]

    batch = collate(tokenizer, rows, task=CLASSIFY, max_length=128)

    longest = len(tokenizer(rows[1][0])["input_ids"])
    shortest = len(tokenizer(rows[0][0])["input_ids"])
    assert tuple(batch["input_ids"].shape) == (2, longest)  # not max_length
    assert batch["attention_mask"][1].tolist() == [1] * longest
    assert batch["attention_mask"][0].tolist() == [1] * shortest + [0] * (longest - shortest)
    assert set(batch["input_ids"][0, shortest:].tolist()) == {tokenizer.pad_token_id}
    assert batch["labels"].tolist() == [1, 0]
    assert str(batch["labels"].dtype) == "torch.int64"
    assert batch.real_tokens == longest + shortest


def test_collator_truncates_to_max_length(tokenizer: Any) -> None:
    batch = collate(tokenizer, [("word " * 50, None, 0)], task=CLASSIFY, max_length=8)

    assert tuple(batch["input_ids"].shape) == (1, 8)


def test_collator_encodes_text_pairs_as_two_segments(tokenizer: Any) -> None:
    batch = collate(tokenizer, [("a dog runs", "an animal moves", 2)], task=CLASSIFY, max_length=64)

    assert set(batch["token_type_ids"][0].tolist()) == {0, 1}
    assert batch["input_ids"][0].tolist().count(tokenizer.sep_token_id) == 2


def test_causal_lm_labels_are_the_inputs_with_padding_ignored(tokenizer: Any) -> None:
    rows = [("short", None, -1), ("a somewhat longer piece of text", None, -1)]

    batch = collate(tokenizer, rows, task="causal-lm", max_length=64)

    mask = batch["attention_mask"].bool()
    assert (~mask).any()  # the short row is padded
    assert (batch["labels"][~mask] == -100).all()
    assert (batch["labels"][mask] == batch["input_ids"][mask]).all()
    assert "token_type_ids" not in batch
