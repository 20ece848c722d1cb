"""The whole job file, :class:`JobConfig`: its sections, plus the rules that span sections (a method needs
its section, checkpoints ranked by an eval need eval sets, kernels that fit the task and DeepSpeed stage).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

import orchestrator.storage as storage
from orchestrator.config.sections import (
    DataConfig,
    DeepSpeedSection,
    DistillSection,
    LoraSection,
    ModelConfig,
    OutputSection,
    RegularizationSection,
    ScalingSection,
    TrackingSection,
    TrainingConfig,
    UnfreezeSection,
    _Section,
    looks_like_jinja,
)
from orchestrator.config.tune_sections import TuneSection
from orchestrator.methods import available_methods


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
        names = available_methods()
        if value not in names:
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> JobConfig:
        problems = _task_problems(self)
        if self.method == "lora" and self.lora is None:
            # An assignment: validate_assignment runs this model's validators again, with the default set.
            self.lora = LoraSection()
        problems += _label_problems(self)
        problems += _generate_problems(self)
        problems += _method_section_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _best_checkpoints_have_scores(self) -> JobConfig:
        _check_best_checkpoints(self)
        return self

    @model_validator(mode="after")
    def _liger_fits(self) -> JobConfig:
        _check_liger(self)
        return self

    @model_validator(mode="after")
    def _regularization_fits(self) -> JobConfig:
        _check_regularization(self)
        return self

    # Paths the job reads or writes; used to make them absolute before a job is submitted elsewhere.
    def path_fields(self) -> dict[str, str]:
        fields = {"data.train.path": self.data.train.path, "output.dir": self.output.dir}
        for i, source in enumerate(self.data.eval):
            fields[f"data.eval.{i}.path"] = source.path
        if self.deepspeed.config_file:
            fields["deepspeed.config_file"] = self.deepspeed.config_file
        if self.data.chat_template is not None and not looks_like_jinja(self.data.chat_template):
            fields["data.chat_template"] = self.data.chat_template
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


def _task_problems(config: JobConfig) -> list[str]:
    """Data settings the model's task cannot use: a classification job without a label column, packing
    outside causal-lm."""
    problems = []
    if config.model.task == "sequence-classification" and not config.data.train.label_column:
        problems.append("data.train.label_column is required for sequence-classification")
    if config.data.packing and config.model.task != "causal-lm":
        problems.append("data.packing needs model.task: causal-lm (classification examples keep their own labels)")
    return problems + _chat_task_problems(config)


def _chat_task_problems(config: JobConfig) -> list[str]:
    """Chat and prompt/completion rows (and how they are rendered and labelled) are for causal-lm."""
    if config.model.task == "causal-lm":
        return []
    fix = f"they need model.task: causal-lm (this job's is {config.model.task}); remove them or change the task"
    sources = [("data.train", config.data.train)] + [(f"data.eval[{i}]", s) for i, s in enumerate(config.data.eval)]
    names = [
        f"{where}.{name}"
        for where, source in sources
        for name in ("messages_column", "prompt_column", "completion_column")
        if getattr(source, name)
    ]
    names += ["data.chat_template"] if config.data.chat_template is not None else []
    return [f"{', '.join(names)}: {fix}"] if names else []


def _label_problems(config: JobConfig) -> list[str]:
    """Problems with the label names: duplicates in data.label_names, then those of the label subsets
    (see :func:`_label_subset_problems`)."""
    problems = []
    if config.data.label_names is not None and len(set(config.data.label_names)) != len(config.data.label_names):
        problems.append("data.label_names has duplicates; list each label once")
    return problems + _label_subset_problems(config)


def _generate_problems(config: JobConfig) -> list[str]:
    """Scoring by generation (``data.eval[].generate``) is for causal-lm eval sets: the training set is never
    generated from, and a classifier has no text to generate."""
    problems = []
    if config.data.train.generate:
        problems.append("data.train.generate: only eval sets are scored by generation; remove it from data.train")
    for i, source in enumerate(config.data.eval):
        if not source.generate:
            continue
        if config.model.task != "causal-lm":
            problems.append(f"data.eval[{i}].generate: scoring by generation needs model.task: causal-lm; remove it")
        elif not (source.messages_column or source.prompt_column):
            problems.append(
                f"data.eval[{i}].generate: scoring by generation needs a reference answer per row; set "
                f"data.eval[{i}].messages_column (the last assistant turn) or prompt_column + completion_column"
            )
    return problems


def _label_subset_problems(config: JobConfig) -> list[str]:
    """Problems with growing the head and with the eval sets' label subsets (task-incremental evaluation):
    only classification eval sets take labels, each once, and all of them among data.label_names."""
    problems = []
    classification = config.model.task == "sequence-classification"
    if config.data.train.labels is not None:
        problems.append("data.train.labels: only eval sets take labels (a subset to score over); remove it")
    if config.model.grow_head and not (classification and config.data.label_names):
        problems.append(
            "model.grow_head needs sequence-classification and data.label_names (the model's labels first, "
            "then the new ones)"
        )
    for i, source in enumerate(config.data.eval):
        if source.labels is None:
            continue
        if not classification:
            problems.append(f"data.eval[{i}].labels: only sequence-classification eval sets take labels")
        elif len(set(source.labels)) != len(source.labels):
            problems.append(f"data.eval[{i}].labels has duplicates; list each label once")
        elif config.data.label_names is not None:
            unknown = [n for n in source.labels if n not in config.data.label_names]
            if unknown:
                problems.append(
                    f"data.eval[{i}].labels {unknown} are not in data.label_names {config.data.label_names}"
                )
    return problems


def _method_section_problems(config: JobConfig) -> list[str]:
    """The distill section is there exactly when the method is distill."""
    problems = []
    if config.method == "distill" and config.distill is None:
        problems.append("method: distill needs a distill section (at least distill.teacher)")
    if config.method != "distill" and config.distill is not None:
        problems.append(f"a distill section is set but method is {config.method!r}; set method: distill or remove it")
    return problems


def _check_best_checkpoints(config: JobConfig) -> None:
    """Checkpoints kept by best need a score: eval sets, and an eval at every checkpoint's step.

    Raises:
        ValueError: when output.keep_checkpoints_by is best and a checkpoint would have no score.
    """
    if config.output.keep_checkpoints_by != "best":
        return
    t = config.training
    if not config.data.eval:
        raise ValueError("output.keep_checkpoints_by: best ranks checkpoints by an eval metric; add data.eval")
    if t.checkpoint_every_steps is not None and (
        t.eval_every_steps is None or t.checkpoint_every_steps % t.eval_every_steps
    ):
        raise ValueError(
            "output.keep_checkpoints_by: best scores every checkpoint by an eval at its step; set "
            "training.checkpoint_every_steps to a multiple of training.eval_every_steps"
        )


def _check_liger(config: JobConfig) -> None:
    """Liger's kernels are for causal-lm, outside ZeRO-3 and without distillation.

    Raises:
        ValueError: when model.liger_kernel is on where its kernels do not fit.
    """
    if not config.model.liger_kernel:
        return
    if config.model.task != "causal-lm":
        raise ValueError("model.liger_kernel: Liger's kernels are for causal-lm models; set it false for "
                         f"model.task {config.model.task}")
    if config.deepspeed.stage == 3:
        # Liger's fused loss reads lm_head.weight without calling lm_head, so ZeRO-3 never gathers it.
        raise ValueError("model.liger_kernel: its fused linear + cross-entropy reads the LM head's weight "
                         "outside the head's forward, which ZeRO-3 partitions; use deepspeed.stage 0, 1 or 2")
    if config.method == "distill":
        raise ValueError("model.liger_kernel: distillation needs the student's logits, which Liger's fused "
                         "loss never materializes; set it false for method distill")


def _check_regularization(config: JobConfig) -> None:
    """L2 to the start needs whole parameters on every worker, so not ZeRO-3.

    Raises:
        ValueError: when regularization.l2_to_start is on with deepspeed.stage 3.
    """
    if config.regularization.l2_to_start > 0 and config.deepspeed.stage == 3:
        raise ValueError(
            "regularization.l2_to_start needs whole parameters on every worker; use deepspeed.stage 0, 1 or 2"
        )


def _looks_like_local_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.path.sep in value and Path(value).expanduser().exists()


REGISTRY_FILE = "registry.sqlite"  # output.registry: 'auto' is <output.dir>/registry.sqlite


def registry_problem(config: JobConfig) -> str | None:
    """Why the job's registry cannot be where its config puts it, or None: the registry is a SQLite file, and
    SQLite needs a local disk (its write-ahead log relies on local file locks), so neither a URI nor 'auto' with
    ``output.dir`` on object storage will do; registered models' files may be on the bucket."""
    value = config.output.registry
    on_store = value is not None and (storage.is_uri(value) or (value == "auto" and storage.is_uri(config.output.dir)))
    if not on_store:
        return None
    where = value if value != "auto" else f"'auto' ({config.output.dir}/{REGISTRY_FILE})"
    return (
        f"the registry {where} would be on object storage, but it is a SQLite file that needs a local disk; set "
        "output.registry to a local path on the machine that runs orchestrator train / retrain / schedule (the "
        "registered models' files still go to the bucket), or null to not register"
    )
