"""Distributed training orchestrator for derived models.

Public API (everything else may change):

    from orchestrator import load_config, run_training
    result = run_training(load_config("configs/quickstart.yaml"))
"""

from orchestrator.cluster.launcher import run_training
from orchestrator.cluster.preflight import preflight
from orchestrator.cluster.results import TrainResult
from orchestrator.config import JobConfig, config_from_dict, json_schema, load_config
from orchestrator.errors import ConfigError, DataError, ModelError, OrchestratorError, TrainingError
from orchestrator.methods import register_method
from orchestrator.version import __version__

__all__ = [
    "ConfigError",
    "DataError",
    "JobConfig",
    "ModelError",
    "OrchestratorError",
    "TrainResult",
    "TrainingError",
    "__version__",
    "config_from_dict",
    "json_schema",
    "load_config",
    "preflight",
    "register_method",
    "run_training",
]
