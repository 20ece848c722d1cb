"""Unfreezing under DeepSpeed ZeRO 2 and 3 with 2 Ray workers: frozen parameters do not change bit for
bit, unfrozen ones do, and a block starts changing once the schedule unfreezes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import config_from_dict
from orchestrator.launcher import run_training
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow


def _weights_at(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3 shards merged)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ds")


@pytest.mark.ci
@pytest.mark.parametrize("stage", [2, 3])
def test_gradual_unfreezing_keeps_frozen_blocks_bit_identical(stage, ray_cluster, tiny_models, shared_data, tmp_path):
    job = tiny_job(
        f"unfreeze-z{stage}",
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
    result = run_training(config_from_dict(job))

    initial = {f"bert.{k}": v for k, v in load_file(tiny_models["bert"] / "model.safetensors").items()}
    checkpoints = sorted(p for p in (result.run_dir / "ray" / job["name"]).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    at_step3, at_step6 = (_weights_at(c) for c in checkpoints)

    def changed(weights: dict[str, torch.Tensor], prefix: str) -> list[bool]:
        return [not torch.equal(weights[k].float(), initial[k].float()) for k in initial if k.startswith(prefix)]

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
