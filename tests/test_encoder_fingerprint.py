"""The encoder's fingerprint (part of the token cache's key) is the same on a rank that has tokenized and on one that
has not: transformers leaves the last call's padding/truncation settings on a fast tokenizer's backend, so they must
not be part of it (otherwise the ranks of a node wait for caches under different keys and the run hangs)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import DataConfig, DataSource
from orchestrator.data.encoding import make_encoder


def test_the_fingerprint_ignores_the_tokenizers_last_padding_and_truncation(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    source = DataSource(path="rows.tsv")
    data = DataConfig(train=source)
    before = make_encoder(source, data, tokenizer, task="causal-lm").fingerprint()

    tokenizer(["a first text", "a"], truncation=True, max_length=8, padding=True)  # what a builder rank has done

    assert make_encoder(source, data, tokenizer, task="causal-lm").fingerprint() == before
