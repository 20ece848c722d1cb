"""Batches of tokenized examples: dynamic padding, and packing of causal-LM documents without attention across them.

Examples come from the token cache (``orchestrator.data.token_cache``): each is a dict of ``input_ids``, ``labels``
(a list with -100 on tokens that carry no loss for causal-lm; a class id for classification) and, for some
tokenizers, ``token_type_ids``, none of them padded.

:class:`PaddingCollator` pads a batch to its longest example (not to ``max_length``), with an ``attention_mask``.

Packing (``data.packing``, causal-lm) fills blocks of at most ``max_length`` tokens with whole documents:
:func:`pack_examples` plans the blocks once per file (best-fit decreasing: the longest document first, each into
the open block it fills best, a new block when none has room; this leaves less padding than sequential packing, and
the order of documents does not matter since blocks are shuffled every epoch). A block is one example
(:class:`PackedExamples`), so the step budget and the exact-resume position count blocks. :class:`PackingCollator`
makes each block attend within its documents only:

- ``position_ids`` restart at 0 for every document;
- labels are masked at the seams: Hugging Face's causal-LM loss shifts the labels left inside the model (the
  logits at position t are scored against ``labels[t + 1]``; ``transformers.loss.loss_utils.ForCausalLMLoss``), so
  the first token of every document gets label -100, and the last token of one document is never scored against
  the first of the next;
- the attention kernel is told where documents start. With FlashAttention 2/3 (GPUs) the documents of the whole
  micro-batch are laid out in one row ``[1, total tokens]`` with no padding and no attention mask: transformers sees
  position ids that restart (``modeling_flash_attention_utils._is_packed_sequence``, which needs batch size 1) and
  runs the varlen kernel over each document. Every other kernel (SDPA, eager: CPUs, or GPUs without flash-attn)
  gets a 4-D block-diagonal causal mask ``[batch, 1, L, L]`` (bool for SDPA, additive float for eager), which
  transformers passes to the kernel as it is (``masking_utils._preprocess_mask_arguments``). That mask costs
  ``L * L`` bytes per block (bool; 4 bytes each as float32 for eager): 4 MiB per row at L = 2048, 64 MiB at 8192,
  on top of attention that already computes every ``L x L`` score; FlashAttention's path costs nothing extra.
  (transformers 5.x also derives such a mask from restarting ``position_ids`` when no mask and no cache are
  given; the explicit mask does not depend on that, nor on ``use_cache``.)

The loss of a packed batch is then the mean over its labelled tokens of the documents' own next-token losses, the
same as scoring the documents one by one (``tests/test_batching.py`` checks it on a tiny Llama).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # the label Hugging Face's losses skip

# attn_implementation values that take FlashAttention's varlen path from restarting position ids
_FLASH = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn", "kernels-community/flash-attn3")


class Batch(dict):
    """A collated batch (the model's keyword arguments) that also knows how many real tokens it holds.

    ``real_tokens`` counts every token that is not padding; the throughput log reads it, since a packed batch's
    4-D mask cannot be summed like a padding mask.
    """

    real_tokens: int = 0


def real_tokens(batch: dict[str, Any]) -> int:
    """The number of real (non-padding) tokens of a collated batch."""
    if isinstance(batch, Batch):
        return batch.real_tokens
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its end-of-text token (a padded position is masked out
    of attention and loss, so any id works), else 0."""
    for name in ("pad_token_id", "eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def attention_kind(model: Any) -> str:
    """How packed batches must tell this model's attention kernel where documents start: 'flash' (position ids only,
    one row), 'sdpa' (a bool 4-D mask) or 'eager' (an additive 4-D mask)."""
    config = getattr(model, "config", None)
    implementation = str(getattr(config, "_attn_implementation", None) or "sdpa")
    if implementation in _FLASH or "flash" in implementation:
        return "flash"
    return "sdpa" if implementation == "sdpa" else "eager"


def _pad(rows: Sequence[Sequence[int]], value: int, width: int) -> Any:
    import torch

    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class PaddingCollator:
    """Pads examples to the longest of the batch (right padding), with an attention mask.

    Args:
        pad_id: the token id of padded positions (:func:`pad_token_id`).
        task: 'causal-lm' (labels are token lists, -100 on padding; no token_type_ids) or
            'sequence-classification' (labels are class ids, a ``[batch]`` tensor).
    """

    def __init__(self, pad_id: int, *, task: str):
        self.pad_id, self.task = pad_id, task

    def __call__(self, examples: Sequence[dict[str, Any]]) -> Batch:
        import torch

        ids = [e["input_ids"] for e in examples]
        width = max(len(r) for r in ids)
        batch = Batch(input_ids=_pad(ids, self.pad_id, width))
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            mask[i, : len(row)] = 1
        batch["attention_mask"] = mask
        if self.task == "causal-lm":
            batch["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX, width)
        else:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
            if examples[0].get("token_type_ids") is not None:
                batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0, width)
        batch.real_tokens = int(mask.sum())
        return batch


# --------------------------------------------------------------------------------------------------
# Packing (causal-lm, data.packing)
# --------------------------------------------------------------------------------------------------


def pack_examples(lengths: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Plan blocks of at most ``block_size`` tokens holding whole examples: best-fit decreasing.

    Longest example first; each goes into the open block whose free room it fills best (the smallest room that
    fits it), or opens a new block. Deterministic (ties keep index order), so every rank plans the same blocks.
    Cost: O(n log n) for the sort plus a scan over at most ``block_size`` room sizes per example, in numpy (about
    a second per million examples).

    Args:
        lengths: tokens of each example; one longer than ``block_size`` (not expected: the encoder truncates to
            max_length, which is the block size) fills a block alone and is cut by the collator.
        block_size: tokens per block (``data.max_length``).

    Returns:
        The example indices of each block, longest example first.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), block_size)
    order = np.argsort(-lengths, kind="stable")
    open_with_room: list[list[int]] = [[] for _ in range(block_size + 1)]  # block ids by free room
    room_count = np.zeros(block_size + 1, dtype=np.int64)
    blocks: list[list[int]] = []
    for index in order.tolist():
        need = int(lengths[index])
        fits = np.flatnonzero(room_count[need:])
        if len(fits):
            room = need + int(fits[0])
            block = open_with_room[room].pop()
            room_count[room] -= 1
        else:
            room, block = block_size, len(blocks)
            blocks.append([])
        blocks[block].append(index)
        left = room - need
        if left > 0:
            open_with_room[left].append(block)
            room_count[left] += 1
    return [np.asarray(b, dtype=np.int64) for b in blocks]


class PackedExamples:
    """The packed blocks of a token cache: example ``i`` is block ``i``, a list of whole documents.

    Args:
        cache: the file's :class:`~orchestrator.data.token_cache.TokenCache`.
        block_size: tokens per block (``data.max_length``).
    """

    def __init__(self, cache: Any, *, block_size: int):
        self.cache, self.block_size = cache, block_size
        self.scanned = cache.scanned
        self.blocks = pack_examples(cache.lengths, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def get(self, i: int) -> list[dict[str, Any]]:
        return self.cache.get_many(self.blocks[i])

    def fill(self) -> float:
        """The share of block positions that hold real tokens (1.0: no padding at all)."""
        tokens = np.minimum(self.cache.lengths, self.block_size).sum()
        return float(tokens) / max(1, len(self.blocks) * self.block_size)

    def close(self) -> None:
        self.cache.close()


class PackingCollator:
    """Collates packed blocks (lists of documents) so that no token attends to another document's.

    Args:
        pad_id: the token id of padded positions (:func:`pad_token_id`).
        attention: :func:`attention_kind` of the model: 'flash' lays every document of the batch out in one row
            with restarting position ids (no mask, no padding); 'sdpa' / 'eager' pad each block to the longest of
            the batch and add a bool / additive 4-D block-diagonal causal mask.
        block_size: the longest a document may be (longer ones are cut; the encoder already truncates).
    """

    def __init__(self, pad_id: int, *, attention: str, block_size: int):
        self.pad_id, self.attention, self.block_size = pad_id, attention, block_size

    def _documents(self, block: Sequence[dict[str, Any]]) -> tuple[list[int], list[int], list[int], list[int]]:
        """One block's ``(input_ids, labels, position_ids, document index)``: labels masked at each document's
        first token, positions restarting per document."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        document: list[int] = []
        for d, doc in enumerate(block):
            doc_ids = list(doc["input_ids"])[: self.block_size]
            if not doc_ids:
                continue
            doc_labels = list(doc["labels"])[: self.block_size]
            doc_labels[0] = IGNORE_INDEX  # nothing before it in its document predicts it
            ids += doc_ids
            labels += doc_labels
            positions += range(len(doc_ids))
            document += [d] * len(doc_ids)
        return ids, labels, positions, document

    def __call__(self, blocks: Sequence[Sequence[dict[str, Any]]]) -> Batch:
        import torch

        rows = [self._documents(block) for block in blocks]
        if self.attention == "flash":
            flat = [sum((r[k] for r in rows), []) for k in range(3)]
            batch = Batch(
                input_ids=torch.tensor([flat[0]], dtype=torch.long),
                labels=torch.tensor([flat[1]], dtype=torch.long),
                position_ids=torch.tensor([flat[2]], dtype=torch.long),
            )
            batch.real_tokens = len(flat[0])
            return batch
        width = max(len(r[0]) for r in rows)
        batch = Batch(
            input_ids=_pad([r[0] for r in rows], self.pad_id, width),
            labels=_pad([r[1] for r in rows], IGNORE_INDEX, width),
            position_ids=_pad([r[2] for r in rows], 0, width),
        )
        # Padding positions are each their own document: they attend to themselves only, so no row of the mask is
        # empty (an all-masked row makes SDPA return NaN, which would reach the gradients).
        segments = torch.stack(
            [torch.cat([torch.as_tensor(r[3], dtype=torch.long), -1 - torch.arange(width - len(r[3]))]) for r in rows]
        )
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        allowed = (segments[:, :, None] == segments[:, None, :]) & causal
        mask = allowed[:, None]
        if self.attention != "sdpa":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
        batch["attention_mask"] = mask
        batch.real_tokens = sum(len(r[0]) for r in rows)
        return batch
