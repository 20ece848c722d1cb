"""Spec of packing (data.packing): whole documents per block, no attention or loss across documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.data.batching import (
    IGNORE_INDEX,
    Batch,
    PackedExamples,
    PackingCollator,
    attention_kind,
    pack_examples,
    real_tokens,
)


def documents(lengths: list[int], seed: int = 0) -> list[dict[str, Any]]:
    """Causal-LM examples as the token cache holds them; the second document's first two tokens carry no loss (a
    prompt), as chat rows' do."""
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        ids = rng.integers(5, 1000, n).tolist()
        docs.append({"input_ids": ids, "labels": list(ids)})
    docs[1]["labels"][:2] = [IGNORE_INDEX, IGNORE_INDEX]
    return docs


def one_by_one_loss(model: Any, docs: list[dict[str, Any]]) -> float:
    """Each document scored alone: the sum of its next-token losses over all documents / the labelled tokens."""
    total, count = 0.0, 0
    for doc in docs:
        ids, labels = torch.tensor([doc["input_ids"]]), torch.tensor([doc["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((target != IGNORE_INDEX).sum())
    return total / count


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_packed_batch_scores_like_its_documents_one_by_one(llama: Any, kernel: str) -> None:
    llama.config._attn_implementation = kernel  # the same weights through the other kernel
    blocks = [documents([5, 7, 3], seed=1), documents([9, 4], seed=2)]  # two blocks; the second is padded
    collator = PackingCollator(0, attention=attention_kind(llama), block_size=16)
    try:
        batch = collator(blocks)
        with torch.no_grad():
            packed = llama(**batch).loss.item()
            expected = one_by_one_loss(llama, blocks[0] + blocks[1])
            unmasked = llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
            positions_only = llama(**{k: v for k, v in batch.items() if k != "attention_mask"}).loss.item()
    finally:
        llama.config._attn_implementation = "sdpa"

    assert batch["attention_mask"].shape == (2, 1, 15, 15)
    assert batch["attention_mask"].dtype == (torch.bool if kernel == "sdpa" else torch.float32)
    assert packed == pytest.approx(expected, abs=1e-5)
    # Without the block-diagonal mask documents attend to the ones before them: the loss is another one.
    assert abs(unmasked - expected) > 1e-4
    assert abs(positions_only - expected) > 1e-4  # restarting positions alone do not stop attention here


def test_flash_layout_is_one_row_told_apart_by_position_ids_alone(llama: Any) -> None:
    blocks = [documents([5, 7, 3], seed=1), documents([9, 4], seed=2)]

    batch = PackingCollator(0, attention="flash", block_size=16)(blocks)

    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: FlashAttention's varlen path
    assert batch["input_ids"].shape == (1, 28) and batch.real_tokens == 28  # no padding
    assert batch["position_ids"][0].tolist() == [*range(5), *range(7), *range(3), *range(9), *range(4)]
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    assert bool(_is_packed_sequence(batch["position_ids"], batch_size=1))
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seqlens.tolist() == [0, 5, 12, 15, 24, 28]  # the document boundaries the varlen kernel gets
    # The same boundaries, read by transformers' own mask builder from the position ids (no cache): the loss of the
    # documents one by one, on CPU.
    with torch.no_grad():
        loss = llama(**batch, use_cache=False).loss.item()
    assert loss == pytest.approx(one_by_one_loss(llama, blocks[0] + blocks[1]), abs=1e-5)


def test_labels_are_masked_at_every_seam_and_positions_restart() -> None:
    docs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]

    batch = PackingCollator(0, attention="sdpa", block_size=8)([docs, docs[:1]])

    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    # The model shifts labels left: position 2 (token 3, doc 1's last) would be scored against token 4 (doc 2's
    # first); its label is -100, so nothing is learned across the seam.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 2, 3, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 0]]  # padding: position 0
    mask = batch["attention_mask"][:, 0]
    assert mask[0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert mask[1, 3:].int().tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]  # padding attends to itself only
    assert real_tokens(batch) == 8


def test_best_fit_decreasing_places_every_example_once_within_the_block() -> None:
    lengths = np.random.default_rng(0).integers(1, 40, 2000)

    blocks = pack_examples(lengths, 64)

    placed = np.concatenate(blocks)
    assert sorted(placed.tolist()) == list(range(2000))
    assert max(int(lengths[b].sum()) for b in blocks) <= 64
    assert [b.tolist() for b in pack_examples(lengths, 64)] == [b.tolist() for b in blocks]  # same on every rank
    fill = lengths.sum() / (len(blocks) * 64)
    sequential = 1
    room = 64
    for n in lengths:  # next-fit in file order, for comparison
        if n > room:
            sequential, room = sequential + 1, 64
        room -= n
    assert fill > 0.97 and len(blocks) < sequential


def test_an_example_longer_than_a_block_fills_one_alone() -> None:
    blocks = pack_examples(np.array([3, 100, 2]), 8)

    assert [b.tolist() for b in blocks] == [[1], [0, 2]]


class _Cache:
    """The few parts of a TokenCache that packing reads."""

    scanned = None

    def __init__(self, docs: list[dict[str, Any]]):
        self.docs = docs
        self.lengths = np.array([len(d["input_ids"]) for d in docs])

    def get_many(self, indices: Any) -> list[dict[str, Any]]:
        return [self.docs[int(i)] for i in indices]

    def close(self) -> None:
        pass


def test_packed_examples_are_blocks_of_whole_documents() -> None:
    docs = documents([6, 2, 5, 3, 8])

    packed = PackedExamples(_Cache(docs), block_size=8)

    assert len(packed) == 3  # 8 | 6+2 | 5+3
    assert [[len(d["input_ids"]) for d in packed.get(i)] for i in range(3)] == [[8], [6, 2], [5, 3]]
    assert packed.fill() == 1.0


def test_real_tokens_of_plain_batches() -> None:
    assert real_tokens({"input_ids": torch.zeros(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}) == 3
    assert real_tokens({"input_ids": torch.zeros(2, 4)}) == 8
    batch = Batch(input_ids=torch.zeros(1, 4))
    batch.real_tokens = 3
    assert real_tokens(batch) == 3
