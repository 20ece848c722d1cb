"""ZeRO-Offload on CPU workers: optimizer state (stage 2) and parameters too (stage 3) kept in host memory
by DeepSpeed (DeepSpeedCPUAdam, built the first time). On CPU-only workers this changes where DeepSpeed keeps
state, not the numbers: the first step's loss equals the run without offload."""

from __future__ import annotations

import math

import pytest

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow

_FIRST_LOSS: dict[str, float] = {}


@pytest.mark.parametrize(
    ("stage", "offload"),
    [(2, {}), (2, {"offload_optimizer": True}), (3, {"offload_optimizer": True, "offload_params": True})],
    ids=["z2", "z2-offload-optimizer", "z3-offload-all"],
)
def test_offload_trains_and_exports(stage, offload, ray_cluster, tiny_models, shared_data, tmp_path):
    job = tiny_job(f"offload-z{stage}-{len(offload)}", tiny_models["bert"], shared_data, tmp_path, stage=stage)
    job["deepspeed"].update(offload)
    result = run_training(config_from_dict(job))

    train = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["train/loss"]) for r in train)
    assert result.final_model is not None and (result.final_model / "model.safetensors").exists()
    for other, loss in _FIRST_LOSS.items():
        assert train[0]["train/loss"] == pytest.approx(loss, rel=1e-5), other
    _FIRST_LOSS[f"z{stage}-{sorted(offload)}"] = train[0]["train/loss"]
