"""The continual-retraining file (``orchestrator retrain configs/retrain.yaml``): typed, validated, every
problem reported at once, like job files.

A retrain file names a base job (a job file, or inline), the folder watched for new data, how much earlier
data to replay, the promotion gate, and when the scheduler runs a round. Each round is the base job with
its training data, eval sets and starting model replaced (see :mod:`orchestrator.lifecycle.rounds`).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from orchestrator.config import (
    DataSource,
    JobConfig,
    _interpolate_env,
    _read_yaml,
    _Section,
    apply_overrides,
    config_from_dict,
    load_config,
)
from orchestrator.config.job import registry_problem
from orchestrator.errors import ConfigError, ConfigIssue


class WatchSection(_Section):
    dir: str = Field(
        min_length=1,
        description="Folder watched for new data files (a path every round's job can read), or a prefix on object "
        "storage (s3://bucket/incoming, gs://...): listed with each object's size and modification time.",
    )
    glob: str = Field("*.tsv", description="Which files are data, relative to dir ('**/*.tsv' includes subfolders).")
    settle_s: float = Field(
        10.0, ge=0, description="Ignore files modified in the last N seconds (they may still be being written)."
    )
    format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] | None = Field(
        None, description="Format of the new files (default: the base job's data.train.format)."
    )
    header: bool | None = Field(None, description="Whether tsv/csv files have a header (default: as data.train).")
    text_column: str | None = Field(None, description="Text column of the new files (default: as data.train).")
    text_pair_column: str | None = Field(None, description="Second text column (default: as data.train).")
    label_column: str | None = Field(None, description="Label column (default: as data.train).")

    def source_for(self, path: str, train: DataSource) -> DataSource:
        """How to read one new file: these settings, else those of the base job's training data."""
        return DataSource(
            path=path,
            format=self.format or train.format,
            header=self.header if self.header is not None else train.header,
            text_column=self.text_column or train.text_column,
            text_pair_column=self.text_pair_column if self.text_pair_column is not None else train.text_pair_column,
            label_column=self.label_column or train.label_column,
        )


class ReplaySection(_Section):
    fraction: float | None = Field(
        None, ge=0, le=1, description="Replay this fraction of all earlier training rows (default 0.2 unless count)."
    )
    count: int | None = Field(None, ge=0, description="Replay this many earlier rows (instead of fraction).")
    seed: int = Field(0, ge=0, description="Seed of the replay sample and the new-data holdout (reproducible).")

    @model_validator(mode="after")
    def _one_amount(self) -> ReplaySection:
        if self.fraction is not None and self.count is not None:
            raise ValueError("set replay.fraction or replay.count, not both")
        return self

    def amount(self, earlier_rows: int) -> int:
        if self.count is not None:
            return min(self.count, earlier_rows)
        fraction = 0.2 if self.fraction is None else self.fraction
        return min(earlier_rows, round(fraction * earlier_rows))


class RetrainEvalSection(_Section):
    holdout_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of each round's new rows held out (seeded, never trained on) as that round's new eval "
        "set, scored in every later round; 0: no new eval set.",
    )
    holdout_max: int | None = Field(None, gt=0, description="At most this many held-out rows per round.")
    extra: list[DataSource] = Field(
        default_factory=list, description="More eval sets scored every round, besides the base job's data.eval."
    )


class GateSection(_Section):
    metric: str = Field(
        "auto", description="Metric compared per eval set: 'auto' (accuracy; loss for causal-lm) or a metric name."
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether larger ('max') or smaller ('min') is better; 'auto' from the metric name."
    )
    min_new: float | None = Field(
        None, description="The new data's eval set must score at least this (at most, in min mode); null: no check."
    )
    max_forgetting: float | None = Field(
        0.02,
        ge=0,
        description="Forgetting per earlier eval set = best earlier score - new score (sign flipped in min mode); "
        "each must be at most this; null: no check.",
    )
    floor: float | None = Field(
        None, description="No eval set may score below this (above, in min mode); null: no check."
    )

    def resolved(self, task: str) -> tuple[str, str]:
        """(metric, mode) with 'auto' decided."""
        metric = self.metric if self.metric != "auto" else ("loss" if task == "causal-lm" else "accuracy")
        if self.mode != "auto":
            return metric, self.mode
        lower_better = any(word in metric for word in ("loss", "perplexity", "error"))
        return metric, "min" if lower_better else "max"


class ScheduleSection(_Section):
    trigger: Literal["new_data", "interval", "cron"] = Field(
        "new_data",
        description="When `orchestrator schedule` starts a round: as soon as new data appears, every interval_s, "
        "or on a cron expression. Rounds run only when there is new data, and never two of one model at once.",
    )
    cron: str | None = Field(None, description="Cron expression for trigger: cron, e.g. '0 3 * * *' (03:00 daily).")
    interval_s: float | None = Field(None, gt=0, description="Seconds between rounds for trigger: interval.")
    poll_s: float = Field(60.0, gt=0, description="How often the scheduler looks at the clock, the data and its job.")
    address: str | None = Field(
        None, description="Ray dashboard address for the Jobs API, e.g. http://HEAD:8265 (default RAY_ADDRESS)."
    )
    working_dir: str = Field(".", description="Folder uploaded as each round job's working dir (has jobs/retrain.py).")
    env: list[str] = Field(
        default_factory=list, description="Environment variables passed through to round jobs (W&B ones always)."
    )
    pip: list[str] = Field(default_factory=list, description="Extra pip requirements of round jobs.")
    entrypoint_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved for a round's job driver.")
    max_attempts: int = Field(
        3,
        ge=1,
        description="Failed rounds a shard gets (the job died or raised; a candidate the gate rejects is not a "
        "failure) before its content hash is quarantined: never trained on again, copies included, until "
        "`orchestrator registry release HASH` (`orchestrator registry list` shows it with the last error).",
    )
    retry_backoff_s: float = Field(
        600.0,
        ge=0,
        description="Wait after a shard's first failed round before retrying it (alone, so a failure is blamed on "
        "the right shard); doubled after each further failure.",
    )
    retry_backoff_max_s: float = Field(21600.0, gt=0, description="The longest wait between a shard's attempts.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        # A field check (not the section's), so the error points at the cron line with the cron field's help.
        from croniter import croniter

        if value is not None and not croniter.is_valid(value):
            raise ValueError(
                "not a valid cron expression; give five fields: minute (0-59) hour (0-23) day-of-month (1-31) "
                "month (1-12) day-of-week (0-6), e.g. '0 3 * * *' for 03:00 daily"
            )
        return value

    @model_validator(mode="after")
    def _trigger_settings(self) -> ScheduleSection:
        if self.trigger == "cron" and not self.cron:
            raise ValueError("trigger: cron needs schedule.cron, e.g. '0 3 * * *'")
        if self.trigger == "interval" and self.interval_s is None:
            raise ValueError("trigger: interval needs schedule.interval_s")
        return self


class QuantizeSection(_Section):
    """Quantize each promoted champion on CPU (``orchestrator quantize``, see orchestrator.models.quantize)."""

    method: Literal["int8-dynamic", "int8-weight"] = Field(
        "int8-dynamic",
        description="int8-dynamic: int8 weights and activations (smaller and faster on CPU); int8-weight: int8 "
        "weights only (as small, not faster on CPU).",
    )
    embeddings: Literal["auto", "int8", "fp32"] = Field(
        "auto", description="The input embedding: auto (int8 for classifiers, fp32 for causal LMs), int8 or fp32."
    )
    threads: int | None = Field(None, gt=0, description="Torch threads for scoring and timing (default: torch's).")


class RetrainConfig(_Section):
    """One model retrained continually: base job, watched data, replay, gate, schedule."""

    name: str | None = Field(
        None,
        description="Registry name of the model (versions <name>-v1, -v2, ...); default: the base job's name. "
        "Rounds warm-start from this name's champion.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    job: str | dict[str, Any] = Field(
        description="The base job: a job file (relative to this file) or an inline job. Each round replaces its "
        "data.train, data.eval, model.path (the champion) and name."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted-path overrides of the base job, e.g. {training.max_steps: 100}."
    )
    watch: WatchSection = Field(description="Where new data appears.")
    replay: ReplaySection = Field(default_factory=ReplaySection, description="Earlier data mixed into each round.")
    eval: RetrainEvalSection = Field(default_factory=RetrainEvalSection, description="Eval sets of the rounds.")
    gate: GateSection = Field(default_factory=GateSection, description="Promotion gate: champion or rejected.")
    l2_to_champion: float = Field(
        0.0,
        ge=0,
        description="Regularisation beyond replay: L2 pull toward the champion's weights (sets "
        "regularization.l2_to_start of each round); 0: off.",
    )
    new_labels: Literal["grow", "refuse"] = Field(
        "grow",
        description="New data with labels the champion does not know (e.g. AG News after SST-2): 'grow' adds them "
        "after the champion's labels and grows its classifier (old rows kept, each eval set then scored over its "
        "own labels); 'refuse' fails the round, naming both label sets.",
    )
    schedule: ScheduleSection = Field(default_factory=ScheduleSection, description="`orchestrator schedule`.")
    quantize: QuantizeSection | None = Field(
        None,
        description="After a promotion, quantize the new champion into <round run dir>/quantized-<method>, scored "
        "against it on its eval sets and registered as the champion of <name>-<method>; null: off.",
    )

    @field_validator("overrides")
    @classmethod
    def _no_replaced_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        replaced = [
            k
            for k in value
            if k in ("name", "model.path", "data.train", "data.eval") or k.startswith(("data.train.", "data.eval."))
        ]
        if replaced:
            raise ValueError(f"{', '.join(replaced)} are set by each round; remove them from overrides")
        return value


@dataclass
class LoadedRetrain:
    """A validated retrain file and its base job (overrides applied)."""

    config: RetrainConfig
    job: JobConfig
    source: str | None = None

    @property
    def name(self) -> str:
        return self.config.name or self.job.name

    def resolved(self) -> dict[str, Any]:
        """The retrain config as plain data with the base job inline and every path absolute: what a round
        submitted to the cluster runs (stored with the round in the registry)."""
        data = json.loads(self.config.model_dump_json())
        job = self.job.to_dict()
        for key, value in self.job.path_fields().items():
            if "://" not in value and not Path(value).expanduser().is_absolute():
                from orchestrator.config import set_dotted

                set_dotted(job, key, str(Path(value).expanduser().resolve()))
        data["job"] = job
        data["overrides"] = {}
        data["name"] = self.name
        data["watch"]["dir"] = _absolute(self.config.watch.dir)
        for extra in data["eval"]["extra"]:
            extra["path"] = _absolute(extra["path"])
        return data


def _absolute(path: str) -> str:
    """A local path made absolute; a URI (``s3://``, ``gs://``) as it is (``Path`` would fold its ``//``)."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _model_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if part.isdigit():
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        inner = None
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            for c in (candidate, *getattr(candidate, "__args__", ())):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    inner = c
        model = inner
    return model


def _issues(exc: ValidationError, lines: dict[tuple[str, ...], int]) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
        loc = [p for p in loc if p not in ("str", "dict[str,any]")]
        line = next((lines[tuple(loc[:n])] for n in range(len(loc), 0, -1) if tuple(loc[:n]) in lines), None)
        message = err["msg"].removeprefix("Value error, ")
        hint = None
        owner = _model_at(RetrainConfig, loc[:-1])
        if err["type"] == "extra_forbidden":
            allowed = sorted(owner.model_fields) if owner else []
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            message = f"unknown key {loc[-1]!r}"
            hint = (f"did you mean {close[0]!r}? " if close else "") + f"Allowed keys here: {', '.join(allowed)}"
        else:
            info = owner.model_fields.get(loc[-1]) if owner and loc else None
            if err["type"] == "missing":
                message = "required field is missing"
            elif "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
            if info is not None and info.description:
                hint = info.description
        issues.append(ConfigIssue(location=".".join(loc) or "(top level)", message=message, line=line, hint=hint))
    return issues


def retrain_from_dict(
    data: dict[str, Any],
    overrides: list[str] = (),  # type: ignore[assignment]
    *,
    base_dir: Path | None = None,
    source: str | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
) -> LoadedRetrain:
    """Validate a retrain mapping and its base job, or raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(location="(top level)", message="expected a mapping")], source=source)
    merged = apply_overrides(data, overrides)
    missing: list[str] = []
    job_spec = merged.get("job")
    merged = {k: v for k, v in merged.items() if k != "job"}
    merged = _interpolate_env(merged, missing)
    merged["job"] = job_spec  # an inline job is interpolated by the job loader
    issues = [
        ConfigIssue(location="(env)", message=f"environment variable {n} is not set") for n in sorted(set(missing))
    ]
    config = None
    try:
        config = RetrainConfig.model_validate(merged)
    except ValidationError as exc:
        issues.extend(_issues(exc, lines or {}))
    job = None
    if config is not None:
        job_overrides = list(config.overrides.items())
        try:
            if isinstance(config.job, str):
                path = Path(_interpolate_env(config.job, missing))
                if not path.is_absolute() and base_dir is not None:
                    path = base_dir / path
                job = load_config(path, job_overrides)
            else:
                job = config_from_dict(config.job, job_overrides, source=f"{source or 'retrain'} (job)")
        except ConfigError as exc:
            where = exc.source or "job"
            issues.extend(
                ConfigIssue(location=f"job: {where}: {i.location}", message=i.message, line=i.line, hint=i.hint)
                for i in exc.issues
            )
        if job is not None and job.output.registry is None:
            issues.append(
                ConfigIssue(
                    location="job.output.registry",
                    message="retraining keeps its state in the model registry; it cannot be null",
                    hint="remove output.registry from the base job ('auto': <output.dir>/registry.sqlite) or "
                    "set a path",
                )
            )
        elif job is not None and (problem := registry_problem(job)):  # a SQLite file on a bucket: say so now
            issues.append(ConfigIssue(location="job.output.registry", message=problem))
    if issues:
        raise ConfigError(issues, source=source)
    assert config is not None and job is not None
    return LoadedRetrain(config=config, job=job, source=source)


def load_retrain(path: str | os.PathLike[str], overrides: list[str] = ()) -> LoadedRetrain:  # type: ignore[assignment]
    """Read and validate a retrain file (and the job file it names)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([ConfigIssue(location="(file)", message=f"retrain file not found: {path}")], source=str(path))
    document = _read_yaml(path)
    return retrain_from_dict(
        document.data, list(overrides), base_dir=path.parent, source=str(path), lines=document.lines
    )


def is_retrain_file(path: str | os.PathLike[str]) -> bool:
    """Whether a YAML file is a retrain file (it has top-level ``watch`` and ``job``) rather than a job file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "watch" in data and "job" in data
