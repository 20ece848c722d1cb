"""Teacher-student distillation (``method: distill``), sharded with DeepSpeed like any other method.

How it fits the engine:

* **What DeepSpeed wraps.** :meth:`Distill.prepare_model` returns a :class:`DistillationModule` whose module tree
  holds only what trains: the student and the hidden-state projector (``teacher_student.HiddenProjector``,
  learned maps from the student's width to the teacher's; none when ``hidden_weight`` is 0, parameter-free when the
  widths match). The frozen teacher is kept *outside* the tree (in the instance ``__dict__``), so DeepSpeed neither
  casts, shards nor optimises it, checkpoints leave it out (resuming reloads it from ``distill.teacher``), the
  logged parameter counts are the student's and the projector's, and layer-group discovery (unfreezing,
  discriminative LRs) finds the student's blocks.
* **Where the teacher lives** (``distill.teacher_placement``). ``replicated``: a whole copy on every worker's
  device, in bf16 when training runs in bf16. ``sharded``: its own inference-only ZeRO-3 engine, so each worker
  keeps 1/N of its weights and gathers a layer at a time in forward. Every rank must then run the same number of
  teacher forwards, which the train loop guarantees (every rank gets the same number of batches; evaluation never
  runs the teacher). The teacher is still loaded whole into CPU memory and passes whole through each GPU while it
  is partitioned, before the student is placed there; sharding lowers the memory it holds during training.
  ``auto``: sharded when the teacher's weights would take over 40% of one GPU's memory and there is more than one
  worker, else replicated (always replicated on CPU).
* **The student** (``distill.student_init``). ``teacher_layers``: a shallower copy of the teacher
  (``teacher_student.student_from_teacher``, DistilBERT-style), head included; the model loaded from
  ``model.path`` then only lends its tokenizer, label names and dtype. ``pretrained``: the model loaded from
  ``model.path``, as it is. Either way teacher and ``model.path`` must share one tokenizer
  (``teacher_student.check_vocab_match``), checked before the job takes workers (:meth:`Distill.preflight`)
  and again on each worker. With a ``lora`` section the student is wrapped in LoRA adapters (the same PEFT setup as
  ``method: lora``): its blocks stay frozen but for the adapters, the head and the projector train in full.
* **The loss.** ``teacher_student.distillation_loss``: ``alpha·CE + kd_weight·KD + hidden_weight·hidden``;
  the unweighted terms are logged as ``train/loss_ce``, ``train/loss_kd`` and ``train/loss_hidden``. For causal LMs
  the KD and hidden terms skip the tokens whose label is ``-100`` (prompts and user turns under
  ``data.train_on: completions``, padding), so they are averaged over the answer tokens like the CE term. In eval mode
  (``engine.eval()``) the module runs only the student and returns its logits and its own loss on the labels.
* **Export.** Only the student, as a plain Hugging Face folder, plus ``distill_lineage.json`` naming the teacher,
  the kept teacher blocks and the layer map (a LoRA student: merged model + ``adapter/``, like ``method: lora``).
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import orchestrator.storage as storage
from orchestrator.config import DistillSection, JobConfig
from orchestrator.errors import ConfigError, ConfigIssue, ModelError
from orchestrator.methods.base import MethodContext, TrainBatchOutput
from orchestrator.methods.student_init import _kept_layers, student_from_teacher
from orchestrator.methods.teacher_student import (
    HiddenProjector,
    check_vocab_match,
    distillation_loss,
    parse_layer_map,
)
from orchestrator.models.layers import find_blocks_module
from orchestrator.models.loading import (
    fetch_model,
    inspectable_model_path,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from orchestrator.models.weight_stream import WeightStream, write_pretrained

logger = logging.getLogger(__name__)

LINEAGE_FILE = "distill_lineage.json"
SHARD_ABOVE_GPU_FRACTION = 0.4  # teacher_placement auto: shard a teacher whose weights exceed this share of a GPU


class DistillationOutput(dict):
    """What :class:`DistillationModule` returns: ``loss``, ``logits`` (the student's) and ``components`` (the
    unweighted loss terms, floats). A dict with attribute access, like Hugging Face's ``ModelOutput``, so that
    DeepSpeed's ZeRO-3 hooks, which walk dicts and tuples of outputs, see the tensors in it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _forward_keys(model: nn.Module) -> set[str] | None:
    """Keyword arguments a model's forward accepts (None: it takes **kwargs, so anything)."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def _only(keys: set[str] | None, inputs: dict[str, Any]) -> dict[str, Any]:
    return dict(inputs) if keys is None else {k: v for k, v in inputs.items() if k in keys}


class DistillationModule(nn.Module):
    """The student and the hidden projector as submodules; the frozen teacher beside them, not in the tree.

    Args:
        student: the model that trains (a Hugging Face model).
        teacher: the frozen teacher: a Hugging Face model in eval mode, or a DeepSpeed engine wrapping one.
        settings: the job's ``distill`` section (weights, temperature, hidden loss).
        task: ``"sequence-classification"`` or ``"causal-lm"``.
        layer_pairs: (student block, teacher block) pairs; needed when ``settings.hidden_weight > 0``.
        projector: one projection per layer pair (None when no hidden-state term is used).
        lineage: what ``distill_lineage.json`` records next to the exported student.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        settings: DistillSection,
        *,
        task: str,
        layer_pairs: list[tuple[int, int]] | None = None,
        projector: HiddenProjector | None = None,
        lineage: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.student = student
        self.projector = projector
        # Outside the module tree on purpose: not cast, sharded, optimised or checkpointed with the student.
        self.__dict__["teacher"] = teacher
        self.settings = settings
        self.task = task
        self.layer_pairs = list(layer_pairs or [])
        self.lineage = dict(lineage or {})
        self._student_keys = _forward_keys(student)
        self._teacher_keys = _forward_keys(getattr(teacher, "module", teacher))
        if settings.hidden_weight > 0 and not self.layer_pairs:
            raise ValueError("distill.hidden_weight > 0 needs layer pairs (distill.layer_map)")

    def teacher_logits(self, **batch: torch.Tensor) -> torch.Tensor | None:
        """The frozen teacher's logits for an eval batch (None when ``distill.eval_teacher`` is off). Every rank
        runs the same number of eval batches, so a ZeRO-3 sharded teacher gathers in step on all of them."""
        if not self.settings.eval_teacher:
            return None
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return self.teacher(**_only(self._teacher_keys, inputs), return_dict=True).logits

    @property
    def uses_teacher(self) -> bool:
        return self.settings.kd_weight > 0 or self.settings.hidden_weight > 0

    def forward(self, **batch: torch.Tensor) -> DistillationOutput:
        if not self.training:
            # Evaluation reads the student's logits only; the teacher is not run (on any rank).
            out = self.student(**_only(self._student_keys, batch), return_dict=True)
            return DistillationOutput(loss=out.loss, logits=out.logits, components={})
        s = self.settings
        labels = batch.get("labels")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = s.hidden_weight > 0
        teacher_out = None
        if self.uses_teacher:
            with torch.no_grad():
                teacher_out = self.teacher(
                    **_only(self._teacher_keys, inputs), output_hidden_states=hidden, return_dict=True
                )
        student_out = self.student(**_only(self._student_keys, inputs), output_hidden_states=hidden, return_dict=True)
        loss, logged = distillation_loss(
            student_out,
            teacher_out,
            labels,
            alpha=s.alpha,
            beta_kd=s.kd_weight,
            gamma_hidden=s.hidden_weight,
            temperature=s.temperature,
            layer_pairs=self.layer_pairs,
            hidden_kind=s.hidden_loss,
            projector=self.projector,
            attention_mask=batch.get("attention_mask"),
            task=self.task,  # type: ignore[arg-type]
        )
        return DistillationOutput(loss=loss, logits=student_out.logits, components=logged)


def _resolve_teacher(spec: str) -> str:
    try:
        return resolve_model_path(spec)
    except ModelError as exc:
        raise ConfigError([ConfigIssue("distill.teacher", str(exc).removeprefix("model.path: "))]) from None


def _num_blocks(model_config: Any) -> int | None:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    value = getattr(text_config, "num_hidden_layers", None)
    return value if isinstance(value, int) else None


def resolve_placement(requested: str, teacher: nn.Module, *, device: Any, precision: str, world_size: int) -> str:
    """``replicated`` or ``sharded``: what ``distill.teacher_placement`` means on this worker."""
    if requested != "auto":
        return requested
    if getattr(device, "type", str(device)) != "cuda" or world_size < 2:
        return "replicated"
    bytes_per_param = 2 if precision == "bf16" else next(teacher.parameters()).element_size()
    teacher_bytes = sum(p.numel() for p in teacher.parameters()) * bytes_per_param
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    return "sharded" if teacher_bytes > SHARD_ABOVE_GPU_FRACTION * gpu_bytes else "replicated"


def _teacher_ds_config(config: JobConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config of the sharded teacher's inference-only ZeRO-3 engine (and of its partitioned load)."""
    return {
        "train_micro_batch_size_per_gpu": config.training.batch_size_per_worker,
        "train_batch_size": config.training.batch_size_per_worker * config.scaling.num_workers,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
    }


def _shard_teacher(teacher: nn.Module, config: JobConfig, precision: str) -> Any:
    """The teacher as an inference-only ZeRO-3 engine: each rank keeps 1/N of its weights (it was loaded that way,
    see :func:`_load_teacher`, so it is never whole on a rank)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=teacher, config=_teacher_ds_config(config, precision), dist_init_required=False
    )
    engine.eval()
    return engine


def _meta_teacher(teacher_path: str, config: JobConfig) -> nn.Module:
    """A weightless copy of the teacher, to decide its placement before anything is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if config.model.task == "causal-lm" else AutoModelForSequenceClassification
    hf_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        return auto.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)


def _depth_issues(d: DistillSection, teacher_config: Any, student_config: Any) -> list[ConfigIssue]:
    """Whether keep_layers / layer_map fit both models' depths (read from their configs; unknown depths are not
    checked)."""
    n_teacher = _num_blocks(teacher_config)
    n_student = _num_blocks(student_config)
    try:
        if d.student_init == "teacher_layers" and n_teacher is not None:
            n_student = len(_kept_layers(n_teacher, d.keep_every, d.keep_layers))
        if d.hidden_weight > 0 and n_teacher is not None and n_student is not None:
            parse_layer_map(d.layer_map, n_student, n_teacher)
    except ConfigError as exc:
        return list(exc.issues)
    return []


def _load_teacher(
    teacher_path: str, model: nn.Module, config: JobConfig, context: MethodContext, *, sharded: bool = False
) -> nn.Module:
    """Load the teacher (on the CPU, with ``model``'s label names), frozen and in eval mode; ``sharded``: built
    partitioned across the workers and streamed in (``orchestrator.models.zero3_loading``), never whole on a rank.

    Raises:
        ConfigError: teacher and ``model.path`` do not share one tokenizer.
    """
    task = config.model.task
    trust = config.model.trust_remote_code
    label_names = None
    if task == "sequence-classification":
        id2label = model.config.id2label
        label_names = [id2label[i] for i in range(len(id2label))]
    zero3 = _teacher_ds_config(config, context.precision) if sharded else None
    teacher = load_model(teacher_path, task=task, label_names=label_names, trust_remote_code=trust, zero3_config=zero3,
                         dtype=torch.bfloat16 if sharded and context.precision == "bf16" else None)
    teacher.eval()
    teacher.requires_grad_(False)
    check_vocab_match(
        load_tokenizer(teacher_path, trust_remote_code=trust),
        load_tokenizer(context.model_path, trust_remote_code=trust),
        teacher.config,
        model.config,
    )
    return teacher


def _build_student(
    model: nn.Module, teacher: nn.Module, d: DistillSection, config: JobConfig, n_teacher: int | None
) -> tuple[nn.Module, list[int] | None]:
    """The student and the teacher blocks it kept: a shallower copy of the teacher in ``model``'s dtype
    (``student_init: teacher_layers``; made on the CPU, before the teacher moves), or ``model`` itself
    (kept: None)."""
    if d.student_init != "teacher_layers":
        return model, None
    assert n_teacher is not None
    kept = _kept_layers(n_teacher, d.keep_every, d.keep_layers)
    student = student_from_teacher(teacher, keep_layers=kept)  # on the CPU, before the teacher moves
    student.to(dtype=next(model.parameters()).dtype)
    student.requires_grad_(True)
    student.train()
    if config.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    return student, kept


def _build_projector(
    student: nn.Module, teacher: nn.Module, d: DistillSection, n_teacher: int | None
) -> tuple[list[tuple[int, int]] | None, HiddenProjector | None]:
    """The layer pairs and the hidden projector (in the student's dtype) of the hidden-state term; both None
    when ``hidden_weight`` is 0."""
    if not d.hidden_weight > 0:
        return None, None
    assert n_teacher is not None
    n_student = len(find_blocks_module(student)[1])
    layer_pairs = parse_layer_map(d.layer_map, n_student, n_teacher)
    projector = HiddenProjector.from_configs(student.config, teacher.config, len(layer_pairs))
    projector.to(dtype=next(student.parameters()).dtype)
    return layer_pairs, projector


def _wrap_with_lora(student: nn.Module, config: JobConfig) -> nn.Module:
    """A LoRA student: adapters on the (teacher-initialised or pretrained) student, the rest of it frozen; the
    head and the hidden projector still train in full. Same PEFT wrapping as method: lora."""
    from orchestrator.methods.lora import check_targets, peft_config

    lora_config = peft_config(config, student.config.model_type)
    check_targets(student, list(lora_config.target_modules))
    from peft import get_peft_model

    return get_peft_model(student, lora_config)


def _place_teacher(teacher: nn.Module, placement: str, config: JobConfig, context: MethodContext) -> Any:
    """The teacher in the training precision, on this worker as ``placement`` says: a whole copy on the device, or
    its own ZeRO-3 engine over the partitions it was loaded as."""
    if placement == "sharded":
        return _shard_teacher(teacher, config, context.precision)
    teacher.to(dtype=torch.bfloat16 if context.precision == "bf16" else torch.float32)
    return teacher.to(context.device)


def _lineage(
    d: DistillSection,
    config: JobConfig,
    teacher_path: str,
    kept: list[int] | None,
    layer_pairs: list[tuple[int, int]] | None,
    placement: str,
) -> dict[str, Any]:
    """What ``distill_lineage.json`` records next to the exported student."""
    return {
        "teacher": d.teacher,
        "teacher_path": teacher_path,
        "student_init": d.student_init,
        "kept_teacher_layers": kept,
        "layer_map": None if layer_pairs is None else [list(pair) for pair in layer_pairs],
        "teacher_placement": placement,
        "alpha": d.alpha,
        "kd_weight": d.kd_weight,
        "hidden_weight": d.hidden_weight,
        "temperature": d.temperature,
        "hidden_loss": d.hidden_loss,
        "student_lora": None if config.lora is None else {"r": config.lora.r, "alpha": config.lora.alpha},
    }


class Distill:
    name = "distill"

    def preflight(self, config: JobConfig, model_path: str) -> list[ConfigIssue]:
        """Checks run before the job takes workers: the teacher resolves and loads, shares model.path's
        tokenizer, and keep_layers / layer_map fit both models' depths."""
        from transformers import AutoConfig

        d = config.distill
        if d is None:
            return [ConfigIssue("distill", "method: distill needs a distill section")]
        try:
            # A teacher on object storage: its config and tokenizer, copied without the weights (workers load those).
            teacher_path = inspectable_model_path(_resolve_teacher(d.teacher))
        except ConfigError as exc:
            return exc.issues
        except ModelError as exc:
            return [ConfigIssue("distill.teacher", str(exc).removeprefix("model.path: "))]
        trust = config.model.trust_remote_code
        try:
            teacher_config = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust)
            student_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust)
            teacher_tokenizer = load_tokenizer(teacher_path, trust_remote_code=trust)
            student_tokenizer = load_tokenizer(model_path, trust_remote_code=trust)
        except (OSError, ValueError) as exc:
            return [ConfigIssue("distill.teacher", f"cannot load the teacher or model.path ({exc})")]
        issues: list[ConfigIssue] = []
        try:
            check_vocab_match(teacher_tokenizer, student_tokenizer, teacher_config, student_config)
        except ConfigError as exc:
            issues.extend(exc.issues)
        return issues + _depth_issues(d, teacher_config, student_config)

    def prepare_model(self, model: nn.Module, config: JobConfig, context: MethodContext) -> nn.Module:
        """The :class:`DistillationModule` that trains: the student (cut from the teacher or ``model`` itself,
        LoRA-wrapped with a ``lora`` section) and the hidden projector, with the frozen teacher placed beside them."""
        d = config.distill
        if d is None:
            raise ConfigError([ConfigIssue("distill", "method: distill needs a distill section")])
        teacher_ref = _resolve_teacher(d.teacher)
        # A teacher on object storage: this node's copy (node-locked: one rank downloads, the others reuse it).
        teacher_path = fetch_model(teacher_ref) if storage.is_uri(teacher_ref) else teacher_ref
        placement = resolve_placement(d.teacher_placement, _meta_teacher(teacher_path, config), device=context.device,
                                      precision=context.precision, world_size=context.world_size)
        teacher = _load_teacher(teacher_path, model, config, context, sharded=placement == "sharded")
        n_teacher = None
        if d.student_init == "teacher_layers" or d.hidden_weight > 0:
            n_teacher = len(find_blocks_module(teacher)[1])
        student, kept = _build_student(model, teacher, d, config, n_teacher)
        layer_pairs, projector = _build_projector(student, teacher, d, n_teacher)
        if config.lora is not None:
            student = _wrap_with_lora(student, config)
        teacher_runner = _place_teacher(teacher, placement, config, context)
        logger.info(
            "distill: teacher %s (%s, %s blocks), student %s, layer map %s",
            teacher_path,
            placement,
            n_teacher,
            f"teacher blocks {kept}" if kept is not None else "model.path",
            layer_pairs,
        )
        return DistillationModule(
            student,
            teacher_runner,
            d,
            task=config.model.task,
            layer_pairs=layer_pairs,
            projector=projector,
            lineage=_lineage(d, config, teacher_ref, kept, layer_pairs, placement),
        )

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> TrainBatchOutput:
        out = model(**batch)
        extra = {k: v for k, v in (out.components or {}).items() if k != "loss"}
        return TrainBatchOutput(loss=out.loss, logits=out.logits, extra=extra)

    def save_weights(
        self, module: nn.Module, weights: WeightStream, destination: Path | None, config: JobConfig
    ) -> None:
        """Only the student, as a plain Hugging Face folder, and ``distill_lineage.json``."""
        student = weights.sub(module.student)
        if hasattr(module.student, "peft_config"):  # a LoRA student: exported like method: lora
            from orchestrator.methods.lora import LoraMethod

            LoraMethod().save_weights(module.student, student, destination, config)
        else:
            write_pretrained(module.student, student.tensors(), destination,
                             max_shard_bytes=config.output.max_shard_bytes)
        if destination is None:
            return
        lineage = getattr(module, "lineage", None) or {"teacher": config.distill.teacher if config.distill else None}
        (Path(destination) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2))
