"""Fault tolerance end to end on a local Ray cluster (issue 7): resuming on another number of workers, a
worker process killed with SIGKILL, checkpoint retention and a crash while a checkpoint is being written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.config import config_from_dict
from orchestrator.launcher import run_training
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow


def _checkpoints(run_dir: Path, name: str) -> dict[int, Path]:
    """Complete checkpoints in a run's Ray storage by the step they were taken at."""
    found = {}
    for folder in (run_dir / "ray" / name).glob("checkpoint_*"):
        state = folder / "train_state.json"
        if state.is_file():
            found[json.loads(state.read_text())["step"]] = folder
    return found


def _param_l2(checkpoint: Path, model_path: Path) -> float:
    """L2 norm of the model parameters consolidated from a checkpoint's ZeRO shards (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    names = {n for n, _ in model.named_parameters()}
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    assert names <= set(state)
    return math.sqrt(sum(float(state[n].detach().double().pow(2).sum()) for n in names))


@pytest.mark.parametrize(("stage", "grad_accumulation"), [(2, 1), pytest.param(3, 2, marks=pytest.mark.ci)])
def test_a_two_worker_checkpoint_resumes_on_one_worker(
    stage, grad_accumulation, ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    name = f"reshard-z{stage}"
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, stage=stage)  # 6 steps, checkpoint every 3
    monkeypatch.setenv("ORCHESTRATOR_FAULT_AT_STEP", "3")
    with pytest.raises(Exception, match="injected fault"):
        run_training(config_from_dict(job))
    monkeypatch.delenv("ORCHESTRATOR_FAULT_AT_STEP")
    saved = _checkpoints(tmp_path / name, name)
    assert list(saved) == [3]
    expected_l2 = _param_l2(saved[3], tiny_models["bert"])

    # --resume with one worker; ZeRO-3 keeps the global batch (2 micro-batches per step), ZeRO-2 halves it.
    job["scaling"]["num_workers"] = 1
    job["training"]["grad_accumulation"] = grad_accumulation
    result = run_training(config_from_dict(job), resume=True)

    records = read_metrics(result.run_dir)
    start = [r for r in records if r["kind"] == "start"][-1]
    assert start["world_size"] == 1 and start["resumed_from_step"] == 3
    assert start["resume/old_world_size"] == 2 and start["resume/universal_checkpoint"] is True
    # 3 micro-batches on each of 2 workers = the first 48 rows of the epoch = 6 micro-batches of 1 worker.
    position = (start["resume/old_batch_in_epoch"], start["resume/batch_in_epoch"], start["resume/skipped_rows"])
    assert position == (3, 6, 0)
    # The re-sharded weights right after loading are the checkpointed ones.
    assert start["resume/weights_l2"] == pytest.approx(expected_l2, rel=1e-6)
    assert ("resume/warning" in start) == (grad_accumulation == 1)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert result.metrics["step"] == 6
    assert math.isfinite(result.metrics["sst2/loss"]) and 0.0 <= result.metrics["sst2/accuracy"] <= 1.0

    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in exported.parameters())
    final = _checkpoints(tmp_path / name, name)
    assert json.loads((final[6] / "train_state.json").read_text())["world_size"] == 1
