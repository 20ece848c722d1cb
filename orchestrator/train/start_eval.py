"""Before the first step: the model a run starts from, scored on every eval set (``orchestrator.start_vs_end``).

The reference is the model the run derives from: ``model.path`` as loaded (the base, or a continual round's
champion; a LoRA model before training is its base, its adapters start at zero) or, for distillation, the teacher.
It is scored by the same evaluation as the trained model (loss, accuracy/F1 or perplexity, exact match by
generation), collectively on every rank and under ZeRO-3 too, so start and end are the same measurement.

A classification head that the checkpoint does not hold is new and random: its score would be chance, so none is
taken and the record says why (:func:`fresh_head_reason`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator.models.loading import checkpoint_label_names, fetch_model, read_model_config
from orchestrator.models.quantize import WEIGHT_SUFFIXES
from orchestrator.start_vs_end import COMPARISON_KIND, START_EVAL_KIND, compare, summary_values

logger = logging.getLogger(__name__)


@dataclass
class StartReference:
    """What a run starts from. ``engine`` is what evaluation calls (the training engine, or a teacher view)."""

    role: str  # "model" (model.path) or "teacher" (distill.teacher)
    path: str  # as the job names it
    local_path: str | None  # its folder on this node (for its size), when there is one
    engine: Any
    fresh_head: str | None = None  # why it has no start score, when its classification head is new


def fresh_head_reason(
    model_path: str, *, task: str, label_names: list[str], grow_head: bool, trust_remote_code: bool = False
) -> str | None:
    """Why ``model_path`` would start this job with a new, random classification head (None: it has its own).

    Follows what loading does (``orchestrator.models.loading.load_model``): a checkpoint without a
    sequence-classification head gets a new one, and so does one trained on another number of labels (unless
    ``model.grow_head`` keeps its rows and adds the new labels' ones)."""
    if task != "sequence-classification":
        return None
    config = read_model_config(model_path)
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        shown = ", ".join(architectures) or "no architectures in its config.json"
        return f"the checkpoint has no classification head ({shown}): this run's head is new, a score would be chance"
    # transformers' count: a config.json may leave the default (2 labels) unsaved
    own = len(checkpoint_label_names(model_path, trust_remote_code=trust_remote_code))
    if own != len(label_names) and not grow_head:
        return f"the checkpoint's head has {own} labels, this job {len(label_names)}: the head is new"
    return None


def _safetensors_params(file: Path) -> int:
    """Elements in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())


def checkpoint_size(folder: str | Path | None) -> tuple[int | None, int | None]:
    """(parameters, bytes) of the weight files directly in a model folder: the model as shipped, so a LoRA
    export's ``adapter/`` is not counted twice. Parameters only from safetensors headers (None for pickles)."""
    if folder is None or not Path(folder).is_dir():
        return None, None
    files = [p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        return None, None
    size = sum(p.stat().st_size for p in files)
    tensors = [p for p in files if p.suffix == ".safetensors"]
    params = sum(_safetensors_params(p) for p in tensors) if tensors and len(tensors) == len(files) else None
    return params, size


def local_folder(path: str) -> str | None:
    """This node's folder of a model the job names (already fetched by then), or None."""
    if Path(path).is_dir():
        return path
    try:
        return fetch_model(path, cached_only=True)
    except Exception:  # a size is a nice-to-have: never fail a run on it
        return None


class TeacherView:
    """The frozen teacher of a distillation run as evaluation sees an engine: called with a batch (labels
    included, for its loss), ``module`` for generation, and ``eval``/``train`` that leave it in eval mode."""

    def __init__(self, distillation_module: Any):
        teacher = distillation_module.teacher
        self._teacher = teacher  # a Hugging Face model, or a DeepSpeed engine wrapping one (sharded)
        self.module = getattr(teacher, "module", teacher)
        self._keys = distillation_module._teacher_keys

    def __call__(self, **batch: torch.Tensor) -> Any:
        inputs = batch if self._keys is None else {k: v for k, v in batch.items() if k in self._keys}
        with torch.no_grad():
            return self._teacher(**inputs, return_dict=True)

    def eval(self) -> TeacherView:
        return self

    def train(self, mode: bool = True) -> TeacherView:
        return self


def start_reference(config: Any, model: Any, engine: Any, model_path: str, label_names: list[str]) -> StartReference:
    """The model this run is measured against, and the engine that scores it.

    Args:
        config: the job.
        model: the prepared model (a ``DistillationModule`` for distillation).
        engine: the training engine.
        model_path: this node's folder of ``model.path``.
        label_names: the job's labels.
    """
    if config.method == "distill" and config.distill is not None and hasattr(model, "teacher"):
        teacher_path = (getattr(model, "lineage", None) or {}).get("teacher_path") or config.distill.teacher
        fresh = fresh_head_reason(teacher_path, task=config.model.task, label_names=label_names, grow_head=False,
                                  trust_remote_code=config.model.trust_remote_code)
        return StartReference("teacher", config.distill.teacher, local_folder(teacher_path), TeacherView(model), fresh)
    fresh = fresh_head_reason(model_path, task=config.model.task, label_names=label_names,
                              grow_head=config.model.grow_head, trust_remote_code=config.model.trust_remote_code)
    return StartReference("model", config.model.path, local_folder(model_path), engine, fresh)


def start_record(reference: StartReference, scores: dict[str, float]) -> dict[str, Any]:
    """The ``start_eval`` record: what the reference is, its size, and its scores (none for a fresh head)."""
    params, size = checkpoint_size(reference.local_path)
    record: dict[str, Any] = {
        "reference": reference.role,
        "reference_path": reference.path,
        "fresh_head": reference.fresh_head,
        "start/params": params,
        "start/weight_bytes": size,
    }
    record.update(scores)
    return record


# ------------------------------------------------------------------------------------ the recipe's two hooks
def score_start(recipe: Any) -> None:
    """Before the first step (``TrainRecipe.train``): the start model scored on every eval set, kept in the run's
    state (checkpointed) and logged as the ``start_eval`` record. Once per run: a resumed run keeps the first
    attempt's scores, and a PBT trial its donor's."""
    config = recipe.config
    if not (config.training.eval_at_start and recipe.data.evals) or recipe.started_from_checkpoint:
        return
    ref = start_reference(config, recipe.model, recipe.engine, recipe.model_path, recipe.data.label_names)
    recipe.state.start_metrics = start_record(ref, recipe.evaluate(ref.engine) if ref.fresh_head is None else {})
    recipe.tracker.log(START_EVAL_KIND, recipe.state.step, recipe.state.start_metrics)


def compare_with_start(recipe: Any, metrics: dict[str, Any]) -> None:
    """After the last eval and the ``final/`` export, on rank 0: the ``start_vs_end`` record and the W&B summary's
    ``start/``, ``delta/`` and ``*_vs_start`` keys, with the sizes of ``final/``."""
    if recipe.rank != 0 or recipe.state.start_metrics is None:
        return
    params, size = checkpoint_size(recipe.run_dir / "final" if recipe.config.output.save_final else None)
    comparison = compare(recipe.state.start_metrics, {**metrics, "params": params, "weight_bytes": size})
    recipe.tracker.log(COMPARISON_KIND, recipe.state.step, comparison)
    recipe.tracker.summary(summary_values(comparison))
