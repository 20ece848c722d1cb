"""Scoring a model on an eval set across workers: loss, accuracy and macro-F1 or perplexity, and for a
distillation student its teacher side by side.

Each worker scores its share of the rows (``eval_batch_indices`` weights the rows a shard repeats so every
row counts once); the totals are summed over workers before any metric is computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from orchestrator.data.readers import eval_batch_indices


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over workers. NCCL reduces only CUDA tensors, so host tensors (eval totals) go through the GPU there."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and values.device.type != "cuda":
            on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            return on_gpu.to(values.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def restrict_logits(logits: torch.Tensor, label_ids: Sequence[int] | None) -> torch.Tensor:
    """Logits with every label outside ``label_ids`` set to -inf, so argmax and softmax see only an eval set's
    own labels (task-incremental evaluation); unchanged when ``label_ids`` is None."""
    if label_ids is None:
        return logits
    mask = torch.full((logits.size(-1),), float("-inf"), dtype=logits.dtype, device=logits.device)
    mask[list(label_ids)] = 0.0
    return logits + mask


def confusion_metrics(confusion: torch.Tensor, label_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction); macro-F1 averages
    over ``label_ids`` (default: every label)."""
    correct = confusion.diag().sum()
    precision = confusion.diag() / confusion.sum(0).clamp(min=1e-12)
    recall = confusion.diag() / confusion.sum(1).clamp(min=1e-12)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    if label_ids is not None:
        f1 = f1[list(label_ids)]
    return {"accuracy": (correct / confusion.sum().clamp(min=1)).item(), "f1_macro": f1.mean().item()}


@dataclass
class _Totals:
    """This worker's running sums over its share of an eval set (weighted by row)."""

    num_labels: int
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    count: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    confusion: torch.Tensor = field(init=False)
    # Distillation: the teacher scored on the same batches (accuracy, agreement, forward speed).
    teacher_confusion: torch.Tensor = field(init=False)
    agree: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    forward_s: dict[str, float] = field(default_factory=lambda: {"student": 0.0, "teacher": 0.0})
    rows: int = 0

    def __post_init__(self) -> None:
        size = max(self.num_labels, 1)
        self.confusion = torch.zeros(size, size, dtype=torch.float64)
        self.teacher_confusion = torch.zeros_like(self.confusion)


def _add_causal_lm(totals: _Totals, outputs: Any, batch: dict[str, torch.Tensor], w: torch.Tensor) -> None:
    """Next-token loss over the real (unmasked) tokens, a sequence at a time: the fp32 copy of the logits that the
    loss needs is [length, vocab] for one sequence, never [batch, length, vocab] (64 x 4096 x 128k fp32 logits
    would be 137 GB)."""
    labels = batch["labels"][:, 1:]
    mask = (labels != -100).double().cpu() * w[:, None]
    token_loss = torch.empty(labels.shape, dtype=torch.float64)
    for row in range(labels.size(0)):
        token_loss[row] = torch.nn.functional.cross_entropy(
            outputs.logits[row, :-1].float(), labels[row], ignore_index=-100, reduction="none"
        ).double().cpu()
    totals.loss_sum += (token_loss * mask).sum()
    totals.count += mask.sum()


def _add_classification(
    totals: _Totals, outputs: Any, batch: dict[str, torch.Tensor], w: torch.Tensor, label_ids: Sequence[int] | None
) -> torch.Tensor:
    """Loss and confusion counts of one batch; returns the predictions (the teacher is compared with them)."""
    logits = restrict_logits(outputs.logits.float(), label_ids)
    per_row = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").double().cpu()
    totals.loss_sum += (per_row * w).sum()
    totals.count += w.sum()
    predictions = logits.argmax(-1).cpu()
    for truth, pred, weight in zip(batch["labels"].cpu().tolist(), predictions.tolist(), w.tolist()):
        totals.confusion[truth, pred] += weight
    return predictions


def _add_teacher(
    totals: _Totals,
    teacher_fn: Any,
    batch: dict[str, torch.Tensor],
    w: torch.Tensor,
    predictions: torch.Tensor,
    label_ids: Sequence[int] | None,
) -> bool:
    """The teacher's predictions on the same batch; False when the module has no teacher to score."""
    tick = time.perf_counter()
    teacher_out = teacher_fn(**batch)
    totals.forward_s["teacher"] += time.perf_counter() - tick
    if teacher_out is None:
        return False
    teacher_pred = restrict_logits(teacher_out.float(), label_ids).argmax(-1).cpu()
    totals.agree += ((teacher_pred == predictions).double() * w).sum()
    for truth, pred, weight in zip(batch["labels"].cpu().tolist(), teacher_pred.tolist(), w.tolist()):
        totals.teacher_confusion[truth, pred] += weight
    return True


def _metrics(
    totals: _Totals, *, task: str, n: int, elapsed: float, label_ids: Sequence[int] | None, with_teacher: bool
) -> dict[str, float]:
    """The eval set's metrics from every worker's totals (the all-reduces are collective: every rank calls)."""
    num_labels = totals.num_labels
    summed = all_reduce_sum(torch.cat([totals.loss_sum, totals.count, totals.confusion.flatten()]))
    teacher = all_reduce_sum(torch.cat([totals.agree, totals.teacher_confusion.flatten()])) if with_teacher else None
    loss = (summed[0] / summed[1].clamp(min=1)).item()
    metrics = {"loss": loss, "samples_per_s": n / max(elapsed, 1e-9)}
    if task == "causal-lm":
        metrics["perplexity"] = math.exp(min(loss, 50.0))
        return metrics
    metrics.update(confusion_metrics(summed[2:].view(num_labels, num_labels), label_ids))
    if teacher is not None:
        teacher_metrics = confusion_metrics(teacher[1:].view(num_labels, num_labels), label_ids)
        metrics["teacher_accuracy"] = teacher_metrics["accuracy"]
        metrics["agreement"] = (teacher[0] / summed[1].clamp(min=1)).item()
        # Forward passes only (no tokenisation), this worker's share of the set: the inference speed of each.
        metrics["forward_samples_per_s"] = totals.rows / max(totals.forward_s["student"], 1e-9)
        metrics["teacher_forward_samples_per_s"] = totals.rows / max(totals.forward_s["teacher"], 1e-9)
    return metrics


@torch.no_grad()
def evaluate(
    engine: Any,
    reader: Any,
    collator: Callable[[list[Any]], dict[str, torch.Tensor]],
    *,
    task: str,
    num_labels: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    label_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Loss and accuracy/macro-F1 (classification) or perplexity (causal LM) over a whole eval set.

    With ``label_ids`` (the eval set's own labels, see ``data.eval[].labels``) loss, predictions and macro-F1
    are over those labels only: the logits of the others are masked out."""
    engine.eval()
    n = len(reader)
    totals = _Totals(num_labels)
    module = getattr(engine, "module", engine)  # the DeepSpeed engine's model
    teacher_fn = getattr(module, "teacher_logits", None) if task != "causal-lm" else None
    started = time.perf_counter()
    for indices, weights in eval_batch_indices(n, rank=rank, world_size=world_size, batch_size=batch_size):
        batch = collator([reader.get(int(i)) for i in indices])
        batch = {k: v.to(device) for k, v in batch.items()}
        tick = time.perf_counter()
        outputs = engine(**batch)
        totals.forward_s["student"] += time.perf_counter() - tick
        totals.rows += len(indices)
        w = torch.from_numpy(weights).double()
        if task == "causal-lm":
            _add_causal_lm(totals, outputs, batch, w)
            continue
        predictions = _add_classification(totals, outputs, batch, w, label_ids)
        if teacher_fn is not None and not _add_teacher(totals, teacher_fn, batch, w, predictions, label_ids):
            teacher_fn = None
    elapsed = time.perf_counter() - started
    metrics = _metrics(totals, task=task, n=n, elapsed=elapsed, label_ids=label_ids, with_teacher=bool(teacher_fn))
    engine.train()
    return metrics
