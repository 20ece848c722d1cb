"""Which checkpoints are kept: the config rules and the Ray Train CheckpointConfig they become (no cluster)."""

from __future__ import annotations

import pytest

from orchestrator.cluster.launcher import build_trainer
from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from tests.conftest import tiny_job


def _job(tiny_models, shared_data, tmp_path, **output):
    job = tiny_job("keep", tiny_models["bert"], shared_data, tmp_path)  # eval and checkpoint every 3 steps
    job["output"].update(output)
    return job


def test_keep_latest_is_the_default(tiny_models, shared_data, tmp_path):
    trainer = build_trainer(preflight(config_from_dict(_job(tiny_models, shared_data, tmp_path))), use_gpu=False)
    checkpoint_config = trainer.run_config.checkpoint_config
    assert checkpoint_config.num_to_keep == 2 and checkpoint_config.checkpoint_score_attribute is None


@pytest.mark.parametrize(
    ("metric", "attribute", "order"), [("auto", "sst2/accuracy", "max"), ("sst2/loss", "sst2/loss", "min")]
)
def test_keep_best_ranks_by_the_job_metric(metric, attribute, order, tiny_models, shared_data, tmp_path):
    job = _job(tiny_models, shared_data, tmp_path, keep_checkpoints=3, keep_checkpoints_by="best")
    job["training"]["metric"] = metric
    trainer = build_trainer(preflight(config_from_dict(job)), use_gpu=False)
    checkpoint_config = trainer.run_config.checkpoint_config
    assert checkpoint_config.num_to_keep == 3
    assert (checkpoint_config.checkpoint_score_attribute, checkpoint_config.checkpoint_score_order) == (
        attribute,
        order,
    )


def test_keep_best_needs_an_eval_at_every_checkpoint(tiny_models, shared_data, tmp_path):
    job = _job(tiny_models, shared_data, tmp_path, keep_checkpoints_by="best")
    job["training"].update(checkpoint_every_steps=2, eval_every_steps=3)
    with pytest.raises(ConfigError, match="multiple of training.eval_every_steps"):
        config_from_dict(job)
    job["training"].update(checkpoint_every_steps=6)
    config_from_dict(job)  # every checkpoint step is an eval step
    job["data"]["eval"] = []
    with pytest.raises(ConfigError, match="add data.eval"):
        config_from_dict(job)
