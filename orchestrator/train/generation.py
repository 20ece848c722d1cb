"""Scoring a causal LM by what it generates: an eval set with ``generate: true`` (``data.eval[].generate``).

Each worker greedily generates from its share of the rows' prompts (the encoder's ``prompt(row)``: the
conversation up to its last assistant turn, rendered with the generation prompt) and compares the decoded text
with the row's reference answer (``reference(row)``) after :func:`normalise_answer`. The hits and row weights
are summed over workers before ``exact_match`` is computed, as the loss totals are in
``orchestrator.train.evaluation``: ``eval_batch_indices`` gives every worker the same number of batches and
weighs its padding rows 0, so every row counts once.

Under ZeRO-3 every forward pass is collective (each rank gathers the parameters it lacks from the others), so a
rank whose prompts all finished must keep running forward passes until every rank has finished:
``generate(..., synced_gpus=True)`` does that; without it the ranks would hang in the all-gathers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from orchestrator.data.readers import RowReader, eval_batch_indices
from orchestrator.models.predict import greedy_generate
from orchestrator.train.evaluation import all_reduce_sum

logger = logging.getLogger(__name__)


class PromptEncoder(Protocol):
    """What generation needs from an eval set's encoder (``orchestrator.data.encoding``)."""

    def prompt(self, row: dict[str, Any], where: Any = None) -> list[int]: ...

    def reference(self, row: dict[str, Any]) -> str: ...


def normalise_answer(text: str) -> str:
    """The form answers are compared in: lower case, with no whitespace at all.

    Whitespace carries no signal for exact match and decoding moves it: a WordPiece tokenizer decodes "Sci/Tech"
    as "sci / tech", a byte-level one may keep a leading space; removing it all makes those equal.
    """
    return "".join(text.split()).lower()


def exact_match_totals(
    predictions: Sequence[str], references: Sequence[str], weights: Sequence[float]
) -> tuple[float, float]:
    """(weighted hits, weight) of one batch: a row is a hit when its normalised prediction equals its
    normalised reference; a padding row (weight 0) counts for nothing."""
    hits = sum(
        w
        for p, r, w in zip(predictions, references, weights, strict=True)
        if normalise_answer(p) == normalise_answer(r)
    )
    return float(hits), float(sum(weights))


def generating_model(engine: Any) -> Any:
    """The model whose ``generate`` runs: the DeepSpeed engine's wrapped module, and for distillation its student
    (the teacher is not generated from)."""
    module = getattr(engine, "module", engine)
    student = getattr(module, "student", None)
    return student if isinstance(student, torch.nn.Module) else module


@dataclass
class GenerationSet:
    """One eval set scored by generation: its rows, the encoder that makes prompts and references, and
    ``max_new_tokens``."""

    name: str
    reader: RowReader
    encoder: PromptEncoder
    max_new_tokens: int

    def close(self) -> None:
        self.reader.close()


def _where(reader: Any, i: int) -> Any:
    """Row ``i``'s ``path:line`` for an error message, counted only if there is one."""
    where = getattr(reader, "where", None)
    return (lambda: where(i)) if where is not None else None


@torch.no_grad()
def generation_metrics(
    engine: Any,
    generation_set: GenerationSet,
    tokenizer: Any,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    zero_stage: int,
) -> dict[str, float]:
    """``exact_match`` (share of rows whose greedy answer equals the reference, over all workers) and
    ``generate_rows_per_s`` (this worker's share) of one eval set. Collective: every rank calls it."""
    model = generating_model(engine)
    was_training = model.training
    model.eval()
    # Partitioned weights (ZeRO-3, or a distillation teacher sharded beside a ZeRO-2 student) are gathered in
    # every forward: every rank must run as many forwards as the longest-generating one.
    partitioned = zero_stage == 3 or any(hasattr(p, "ds_id") for p in model.parameters())
    synced = partitioned and world_size > 1
    reader, encoder = generation_set.reader, generation_set.encoder
    totals = torch.zeros(2, dtype=torch.float64)
    started, shown = time.perf_counter(), False
    for indices, weights in eval_batch_indices(len(reader), rank=rank, world_size=world_size, batch_size=batch_size):
        rows = [reader.get(int(i)) for i in indices]
        answers = greedy_generate(
            model,
            tokenizer,
            [encoder.prompt(r, where=_where(reader, int(i))) for r, i in zip(rows, indices)],
            max_new_tokens=generation_set.max_new_tokens,
            device=device,
            synced_gpus=synced,
        )
        references = [encoder.reference(r) for r in rows]
        hits, weight = exact_match_totals(answers, references, weights.tolist())
        totals += torch.tensor([hits, weight], dtype=torch.float64)
        if rank == 0 and not shown:  # one example per eval in the worker log: what the model answers
            logger.info("%s: generated %r for reference %r", generation_set.name, answers[0], references[0])
            shown = True
    elapsed = time.perf_counter() - started
    summed = all_reduce_sum(totals)
    model.train(was_training)
    return {
        "exact_match": (summed[0] / summed[1].clamp(min=1)).item(),
        "generate_rows_per_s": len(reader) / max(world_size, 1) / max(elapsed, 1e-9),
    }


class GenerationEval:
    """The eval sets of a job that are scored by generation (``data.eval[].generate``), with their readers."""

    def __init__(self, sets: Sequence[GenerationSet]):
        self.sets = list(sets)

    @classmethod
    def for_job(cls, config: Any, data: Any, tokenizer: Any) -> GenerationEval:
        """One :class:`GenerationSet` per eval set with ``generate: true`` (``config.data.eval`` and the scanned
        ``data.evals`` are in the same order)."""
        if not any(source.generate for source in config.data.eval):
            return cls([])
        from orchestrator.data.encoding import make_encoder

        sets = [
            GenerationSet(
                name=scanned.name,
                reader=RowReader(scanned),
                encoder=make_encoder(source, config.data, tokenizer, task=config.model.task),
                max_new_tokens=source.max_new_tokens,
            )
            for source, scanned in zip(config.data.eval, data.evals, strict=True)
            if source.generate
        ]
        return cls(sets)

    def metrics(self, engine: Any, tokenizer: Any, **kwargs: Any) -> dict[str, float]:
        """Every set's generation metrics as ``<set>/<metric>`` (keyword arguments: those of
        :func:`generation_metrics`)."""
        metrics: dict[str, float] = {}
        for generation_set in self.sets:
            values = generation_metrics(engine, generation_set, tokenizer, **kwargs)
            metrics.update({f"{generation_set.name}/{k}": v for k, v in values.items()})
        return metrics

    def close(self) -> None:
        for generation_set in self.sets:
            generation_set.close()
