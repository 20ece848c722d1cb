"""Typed, validated job configuration.

One YAML file describes one job. ``load_config`` turns it into a :class:`JobConfig` or raises a single
:class:`ConfigError` that lists *every* problem at once, each with its dotted path, the YAML line it
came from and a hint on how to fix it (torchtune's ``config/_validate.py`` does the same).

Pydantic does the type checking (it already collects all errors of one pass); this package adds what
pydantic does not: YAML line numbers, "did you mean" for unknown keys, ``--set a.b=c`` overrides,
``${ENV:-default}`` interpolation and a JSON schema for editors.

Modules: :mod:`~orchestrator.config.sections` (the job file's sections), :mod:`~orchestrator.config.tune_sections`
(the sweep's tune section), :mod:`~orchestrator.config.job` (:class:`JobConfig` and its cross-section rules),
:mod:`~orchestrator.config.loader` (YAML, overrides, env interpolation, error reports, JSON schema),
:mod:`~orchestrator.config.distributions` and :mod:`~orchestrator.config.search_space` (sweep search spaces),
:mod:`~orchestrator.config.retrain` (the continual-retraining file). The names below are re-exported so
``from orchestrator.config import ...`` keeps working.
"""

from __future__ import annotations

from orchestrator.config.job import JobConfig
from orchestrator.config.loader import _interpolate_env as _interpolate_env
from orchestrator.config.loader import _read_yaml as _read_yaml
from orchestrator.config.loader import (
    apply_overrides,
    config_from_dict,
    issues_from_validation_error,
    json_schema,
    load_config,
    parse_override,
    set_dotted,
)
from orchestrator.config.sections import (
    DataConfig,
    DataSource,
    DeepSpeedSection,
    DistillSection,
    LoraSection,
    ModelConfig,
    OutputSection,
    RegularizationSection,
    ScalingSection,
    TrackingSection,
    TrainingConfig,
    UnfreezeMilestone,
    UnfreezeSection,
    WandbSection,
)
from orchestrator.config.sections import _Section as _Section
from orchestrator.config.tune_sections import (
    AshaSection,
    MedianStopSection,
    PbtSection,
    PlateauSection,
    SearchExpression,
    TuneSection,
)

__all__ = [
    "AshaSection",
    "DataConfig",
    "DataSource",
    "DeepSpeedSection",
    "DistillSection",
    "JobConfig",
    "LoraSection",
    "MedianStopSection",
    "ModelConfig",
    "OutputSection",
    "PbtSection",
    "PlateauSection",
    "RegularizationSection",
    "ScalingSection",
    "SearchExpression",
    "TrackingSection",
    "TrainingConfig",
    "TuneSection",
    "UnfreezeMilestone",
    "UnfreezeSection",
    "WandbSection",
    "apply_overrides",
    "config_from_dict",
    "issues_from_validation_error",
    "json_schema",
    "load_config",
    "parse_override",
    "set_dotted",
]
