"""Unfreezing under DeepSpeed ZeRO 2 and 3 with 2 Ray workers: frozen parameters do not change bit for
bit, unfrozen ones do, and a block starts changing once the schedule unfreezes it; groups frozen for the
whole run (left out of the optimizer) survive a checkpoint, a resume and a ZeRO-3 export unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job
from tests.support.faults import FailAfterCheckpoint

pytestmark = pytest.mark.slow


def _weights_at(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3 shards merged)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")


def _gradual_job(name: str, stage: int, tiny_models, shared_data, tmp_path) -> dict:
    job = tiny_job(
        name,
        tiny_models["bert"],
        shared_data,
        tmp_path,
        stage=stage,
        max_steps=6,
        checkpoint_every_steps=3,
        lr=1e-2,
    )
    job["unfreeze"] = {"kind": "gradual", "every_steps": 3, "cap": 1, "lr_decay": 0.8}  # head, then + top block
    job["output"]["keep_checkpoints"] = 5
    return job


@pytest.mark.ci
@pytest.mark.parametrize("stage", [2, 3])
def test_gradual_unfreezing_keeps_frozen_blocks_bit_identical(stage, ray_cluster, tiny_models, shared_data, tmp_path):
    job = _gradual_job(f"unfreeze-z{stage}", stage, tiny_models, shared_data, tmp_path)
    result = run_training(config_from_dict(job))
    _assert_only_the_head_then_the_top_block_changed(result, job, tiny_models)


def test_a_block_pattern_run_unfreezes_like_the_automatic_blocks(ray_cluster, tiny_models, shared_data, tmp_path):
    """unfreeze.block_pattern (for architectures the automatic search does not know) names the same blocks: the
    backward stop finds their modules, and the frozen ones stay bit for bit under ZeRO-2 with 2 workers."""
    job = _gradual_job("unfreeze-pattern-z2", 2, tiny_models, shared_data, tmp_path)
    job["unfreeze"]["block_pattern"] = r"encoder\.layer\.(\d+)\."
    result = run_training(config_from_dict(job))
    _assert_only_the_head_then_the_top_block_changed(result, job, tiny_models)


def _assert_only_the_head_then_the_top_block_changed(result, job: dict, tiny_models) -> None:
    initial = {f"bert.{k}": v for k, v in load_file(tiny_models["bert"] / "model.safetensors").items()}
    checkpoints = sorted(p for p in (result.run_dir / "ray" / job["name"]).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    at_step3, at_step6 = (_weights_at(c) for c in checkpoints)

    def changed(weights: dict[str, torch.Tensor], prefix: str) -> list[bool]:
        keys = [k for k in initial if k.startswith(prefix)]
        assert keys, f"no weight is named {prefix}*: any()/all() of nothing would pass"
        return [not torch.equal(weights[k].float(), initial[k].float()) for k in keys]

    # steps 0-2: only the head trains
    assert not any(changed(at_step3, "bert.encoder.layer.1."))
    assert not any(changed(at_step3, "bert.encoder.layer.0."))
    assert not any(changed(at_step3, "bert.embeddings."))
    assert not torch.equal(at_step3["bert.pooler.dense.weight"], initial["bert.pooler.dense.weight"])
    # steps 3-5: the top block is unfrozen and changes; everything below stays bit for bit
    assert all(changed(at_step6, "bert.encoder.layer.1.attention.self.query.weight"))
    assert not any(changed(at_step6, "bert.encoder.layer.0."))
    assert not any(changed(at_step6, "bert.embeddings."))

    logged = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert [r["unfreeze/trainable_groups"] for r in logged] == [1, 1, 1, 2, 2, 2]


@pytest.mark.ci
def test_head_only_under_zero3_resumes_and_exports_the_base_models_body(
    ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    name = "head-only-z3"
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, stage=3, max_steps=6, lr=1e-2)
    job["unfreeze"] = {"kind": "head_only"}
    job["output"]["keep_checkpoints"] = 5
    with pytest.raises(Exception, match="injected fault"):  # fail after the step-3 checkpoint, then --resume
        run_training(config_from_dict(job), worker_callbacks=[FailAfterCheckpoint(step=3)])
    result = run_training(config_from_dict(job), resume=True)

    base = {f"bert.{k}": v for k, v in load_file(tiny_models["bert"] / "model.safetensors").items()}
    body = [k for k in base if not k.startswith("bert.pooler.")]  # embeddings and blocks: frozen for the run
    head = [k for k in base if k.startswith("bert.pooler.")] + ["classifier.weight", "classifier.bias"]

    # The frozen body is in the checkpoint (DeepSpeed's frozen-parameter fragments under ZeRO-3), unchanged.
    step3 = next(
        p
        for p in (result.run_dir / "ray" / name).glob("checkpoint_*")  # Ray also keeps checkpoint_manager_snapshot.json
        if p.is_dir() and json.loads((p / "train_state.json").read_text())["step"] == 3
    )
    at_step3 = _weights_at(step3)
    assert all(torch.equal(at_step3[k], base[k]) for k in body)

    # After the resume the run trained on, and the export (gathered from ZeRO-3 shards) has the base body exactly.
    records = read_metrics(result.run_dir)
    starts = [r for r in records if r["kind"] == "start"]
    assert starts[-1]["resumed_from_step"] == 3
    assert [r["step"] for r in records if r["kind"] == "train"][-3:] == [4, 5, 6]
    exported = load_file(result.final_model / "model.safetensors")
    assert all(torch.equal(exported[k], base[k]) for k in body)
    assert not torch.equal(exported["bert.pooler.dense.weight"], at_step3["bert.pooler.dense.weight"])

    # Only the head was ever in the optimizer.
    assert starts[-1]["params_trainable"] == sum(exported[k].numel() for k in head)
    assert starts[-1]["unfreeze/groups_frozen_for_run"] == [0, 1, 2]
