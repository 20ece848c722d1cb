"""Spec of the tokenize-once cache: built once per node, memory-mapped, keyed by content and encoding, read by index."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import DataConfig
from orchestrator.data import token_cache
from orchestrator.data.encoding import make_encoder
from orchestrator.data.sources import prepare_data
from orchestrator.data.token_cache import TokenCache, open_token_cache
from orchestrator.errors import DataError

CLASSIFY = "sequence-classification"


@pytest.fixture
def tokenizer(minilm_tokenizer: Any) -> Any:
    return minilm_tokenizer


def text_file(tmp_path: Path, rows: int = 60, name: str = "lm.tsv") -> Path:
    path = tmp_path / name
    path.write_text("text\tlabel\n" + "".join(f"sentence number {i} is here\t{i % 2}\n" for i in range(rows)))
    return path


def setup(path: Path, tokenizer: Any, *, task: str = "causal-lm", **data: Any) -> tuple[Any, Any, DataConfig]:
    """The scan, the encoder and the data config of one training file."""
    train = {"path": str(path), **({"label_column": None} if task == "causal-lm" else {})}
    train.update(data.pop("train", {}))
    config = DataConfig.model_validate({"train": train, **data})
    scanned = prepare_data(config, task).train
    return scanned, make_encoder(config.train, config, tokenizer, task=task), config


def test_a_cache_is_built_once_and_reopened_memory_mapped(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned, encoder, _ = setup(text_file(tmp_path), tokenizer, max_length=16)

    cache = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache")

    assert cache.info.built and len(cache) == 60
    assert cache.get(7) == encoder.encode({"text": "sentence number 7 is here", "text_pair": None, "label": -1})
    assert cache.folder.parent == tmp_path / "cache" / "tokens"
    assert all(Path(f["filename"]).parent == cache.folder for f in cache.dataset.cache_files)  # Arrow files, mapped
    # A second run (another rank, a restart) opens it: nothing is tokenized again.
    monkeypatch.setattr(token_cache, "_build", lambda *a: pytest.fail("tokenized again despite the cache"))
    again = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache")
    assert not again.info.built and again.folder == cache.folder
    assert again.get_many([3, 59]) == [cache.get(3), cache.get(59)]


def test_the_key_follows_content_rows_and_encoding(tokenizer: Any, tmp_path: Path) -> None:
    path = text_file(tmp_path)
    base, encoder, _ = setup(path, tokenizer, max_length=16)
    key = token_cache.cache_key(base, encoder, task="causal-lm")

    _, shorter, _ = setup(path, tokenizer, max_length=8)
    limited, _, _ = setup(path, tokenizer, max_length=16, train={"limit": 10})
    assert token_cache.cache_key(base, shorter, task="causal-lm") != key  # max_length (the encoder's fingerprint)
    assert token_cache.cache_key(limited, encoder, task="causal-lm") != key  # the rows used
    assert token_cache.cache_key(base, encoder, task=CLASSIFY) != key
    path.write_text(path.read_text().replace("number 3 ", "number three "))
    changed, _, _ = setup(path, tokenizer, max_length=16)
    assert token_cache.cache_key(changed, encoder, task="causal-lm") != key  # the file's bytes


def test_a_parallel_build_holds_the_same_examples(tokenizer: Any, tmp_path: Path, monkeypatch) -> None:
    scanned, encoder, _ = setup(text_file(tmp_path, rows=900), tokenizer, max_length=16)
    monkeypatch.setattr(token_cache, "MIN_ROWS_PER_PROCESS", 100)
    monkeypatch.setattr(token_cache, "CHUNK_ROWS", 64)

    parallel = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "a", num_proc=2)
    serial = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "b", num_proc=1)

    assert parallel.info.processes == 2 and serial.info.processes == 1
    assert len(parallel.dataset.cache_files) == 2
    assert [parallel.get(i) for i in range(900)] == [serial.get(i) for i in range(900)]
    assert parallel.rows.tolist() == list(range(900))


def test_the_other_ranks_wait_for_the_builder_then_map_its_files(tokenizer: Any, tmp_path: Path) -> None:
    scanned, encoder, _ = setup(text_file(tmp_path), tokenizer, max_length=16)
    opened: dict[str, TokenCache] = {}
    waiter = threading.Thread(
        target=lambda: opened.update(
            rank1=TokenCache.open(
                scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache", builder=False, poll_s=0.05
            )
        )
    )
    waiter.start()
    time.sleep(0.5)
    assert "rank1" not in opened  # no cache yet: it waits, it does not build
    built = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache")
    waiter.join(timeout=30)

    assert not opened["rank1"].info.built and opened["rank1"].folder == built.folder
    assert opened["rank1"].get(5) == built.get(5)
    assert not list((tmp_path / "cache" / "tokens").glob(".*partial"))  # the temporary folder was renamed away


def test_classification_rows_go_through_the_cache(tokenizer: Any, tmp_path: Path) -> None:
    scanned, encoder, _ = setup(text_file(tmp_path), tokenizer, task=CLASSIFY, max_length=16)

    cache = TokenCache.open(scanned, encoder, task=CLASSIFY, cache_dir=tmp_path / "cache")

    assert [cache.get(i)["labels"] for i in range(4)] == [int(x) for x in scanned.labels[:4]]
    assert cache.get(0)["input_ids"] == tokenizer("sentence number 0 is here")["input_ids"]
    assert set(cache.get(0)) == {"input_ids", "labels", "token_type_ids"}


def prompt_file(tmp_path: Path) -> Path:
    """Prompt/completion rows; rows 3 and 7 (lines 3 and 7) have prompts longer than max_length (32)."""
    rows = []
    for i in range(12):
        prompt = "word " * 60 if i in (2, 6) else f"what is {i} plus one?"
        rows.append(json.dumps({"prompt": prompt, "completion": f" {i + 1}"}))
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_row_the_encoder_rejects_names_file_and_line(tokenizer: Any, tmp_path: Path) -> None:
    columns = {"prompt_column": "prompt", "completion_column": "completion"}
    scanned, encoder, _ = setup(prompt_file(tmp_path), tokenizer, max_length=32, train=columns)

    with pytest.raises(DataError, match=r"qa\.jsonl:3: no answer token is left within data\.max_length \(32\)"):
        TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if p.suffix != ".lock"]
    assert not left  # nothing half-built left in place


def test_skipped_bad_rows_are_dropped_and_counted_in_the_scan(tokenizer: Any, tmp_path: Path) -> None:
    columns = {"prompt_column": "prompt", "completion_column": "completion"}
    scanned, _, config = setup(prompt_file(tmp_path), tokenizer, max_length=32, train=columns, on_bad_rows="skip")

    cache = open_token_cache(
        config.train, scanned, config, tokenizer, task="causal-lm", builder=True, cache_dir=tmp_path / "cache"
    )

    assert len(cache) == 10 and cache.dropped == 2
    assert cache.rows.tolist() == [0, 1, 3, 4, 5, 7, 8, 9, 10, 11]  # example i is row rows[i] of the scan
    assert cache.scanned.summary()["bad_rows_skipped"] == 2 and scanned.bad_rows == 0  # a copy counts them
    assert [m.split(": ")[0] for m in cache.scanned.bad_examples] == [
        f"{tmp_path}/qa.jsonl:3",
        f"{tmp_path}/qa.jsonl:7",
    ]
    reopened = open_token_cache(
        config.train, scanned, config, tokenizer, task="causal-lm", builder=True, cache_dir=tmp_path / "cache"
    )
    assert not reopened.info.built and reopened.scanned.bad_rows == 2  # the count is kept with the cache


def test_parquet_rows_are_read_a_row_group_at_a_time(tokenizer: Any, tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"sentence number {i} is here" for i in range(300)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "lm.parquet", row_group_size=50)
    scanned, encoder, _ = setup(tmp_path / "lm.parquet", tokenizer, max_length=16)
    reads: list[int] = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, g, **k: reads.append(g) or original(self, g, **k)
    )
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the whole file was read into memory"))

    cache = TokenCache.open(scanned, encoder, task="causal-lm", cache_dir=tmp_path / "cache", num_proc=1)

    assert len(cache) == 300 and reads == [0, 1, 2, 3, 4, 5]  # each group once, one in memory at a time
    assert cache.get(123) == encoder.encode({"text": texts[123], "text_pair": None, "label": -1})


@pytest.mark.slow
def test_rows_the_encoder_drops_reach_the_run_summary(
    ray_cluster: Any, tokenizer: Any, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path, monkeypatch
) -> None:
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics
    from tests.conftest import tiny_job

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))  # the workers inherit it (local cluster)
    lines = (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:201]
    rows = [{"prompt": f"Review: {line.split(chr(9))[0]}\nSentiment:", "completion": f" {line[-1]}"} for line in lines]
    for i in (10, 50, 90):
        rows[i]["prompt"] = "word " * 40  # longer than max_length: no answer token left
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = tiny_job("lm-qa", tiny_models["llama"], shared_data, tmp_path, task="causal-lm", stage=2, lr=3e-3)
    job["data"].update(packing=True, max_length=32, on_bad_rows="skip")
    job["data"]["train"] = {
        "path": str(tmp_path / "qa.jsonl"),
        "prompt_column": "prompt",
        "completion_column": "completion",
    }

    config = config_from_dict(job)
    encoder = make_encoder(config.data.train, config.data, tokenizer, task="causal-lm")
    expected = 0
    for row in rows:  # the 3 long prompts, and SST-2 reviews too long to leave an answer token within 32
        try:
            encoder.encode(row)
        except DataError:
            expected += 1
    assert expected >= 3

    result = run_training(config)

    assert prepare_data(config.data, "causal-lm").train.bad_rows == 0  # the scan finds none of them
    assert result.data["train"]["bad_rows_skipped"] == expected  # the workers' encoder does, and the summary counts
    start = next(r for r in read_metrics(result.run_dir) if r["kind"] == "start")
    assert start["data"]["train"]["bad_rows_skipped"] == expected
    assert len(list((tmp_path / "cache" / "tokens").glob("qa-*/meta.json"))) == 1


def test_a_rank_that_has_tokenized_computes_the_same_key_as_one_that_has_not(tmp_path: Path) -> None:
    # The builder's tokenizer has encoded a whole file (transformers leaves the call's truncation on its backend);
    # a waiting rank's has encoded nothing: both must look for the same folder, or the waiter waits forever.
    from orchestrator.models.loading import load_tokenizer, resolve_model_path

    used, fresh = (load_tokenizer(resolve_model_path("minilm")) for _ in range(2))
    first, _, _ = setup(text_file(tmp_path), used, max_length=16)
    TokenCache.open(first, setup(text_file(tmp_path), used, max_length=16)[1], task="causal-lm", cache_dir=tmp_path)
    scanned, encoder_used, _ = setup(text_file(tmp_path, name="eval.tsv"), used, max_length=16)
    _, encoder_fresh, _ = setup(text_file(tmp_path, name="eval.tsv"), fresh, max_length=16)

    assert token_cache.cache_key(scanned, encoder_used, task="causal-lm") == token_cache.cache_key(
        scanned, encoder_fresh, task="causal-lm"
    )
