"""Spec of the engine pieces that need no cluster: LR schedule, DeepSpeed config, precision, param groups."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config import JobConfig, config_from_dict
from orchestrator.train.engine import (
    WarmupDecay,
    build_deepspeed_config,
    build_optimizer,
    lr_lambda,
    param_groups,
    resolve_precision,
    skip_unused_cpu_comm_op,
    warmup_steps_for,
)


def job(**sections: Any) -> JobConfig:
    return config_from_dict(
        {"name": "demo", "model": {"path": "minilm"}, "data": {"train": {"path": "train.tsv"}}, **sections}
    )


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------


def lr_at(step: int, schedule: str, *, total: int = 110, warmup: int = 10) -> float:
    return lr_lambda(step, total_steps=total, warmup_steps=warmup, schedule=schedule)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_rises_linearly_to_the_peak(schedule: str) -> None:
    assert lr_at(0, schedule) == pytest.approx(0.1)
    assert lr_at(4, schedule) == pytest.approx(0.5)
    assert lr_at(9, schedule) == pytest.approx(1.0)
    assert lr_at(10, schedule) == pytest.approx(1.0)


def test_linear_decays_to_zero_at_the_last_step() -> None:
    assert lr_at(35, "linear") == pytest.approx(0.75)
    assert lr_at(60, "linear") == pytest.approx(0.5)
    assert lr_at(110, "linear") == pytest.approx(0.0)
    assert lr_at(500, "linear") == pytest.approx(0.0)  # never negative past the end


def test_cosine_follows_half_a_cosine_to_zero() -> None:
    assert lr_at(35, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(60, "cosine") == pytest.approx(0.5)
    assert lr_at(110, "cosine") == pytest.approx(0.0)
    assert lr_at(500, "cosine") == pytest.approx(0.0)


def test_constant_stays_at_the_peak_after_warmup() -> None:
    assert [lr_at(s, "constant") for s in (10, 60, 110, 500)] == [1.0] * 4


def test_no_warmup_starts_at_the_peak() -> None:
    assert lr_at(0, "linear", warmup=0, total=100) == pytest.approx(1.0)
    assert lr_at(50, "linear", warmup=0, total=100) == pytest.approx(0.5)


def test_warmup_ratio_applies_only_without_warmup_steps() -> None:
    assert warmup_steps_for(job(training={"warmup_ratio": 0.1}), total_steps=200) == 20
    assert warmup_steps_for(job(training={"warmup_ratio": 0.1, "warmup_steps": 5}), total_steps=200) == 5


def test_warmup_decay_is_the_lambda_and_survives_pickling() -> None:
    import pickle

    schedule = pickle.loads(pickle.dumps(WarmupDecay(total_steps=110, warmup_steps=10, schedule="cosine")))

    assert [schedule(s) for s in (0, 60, 110)] == [lr_at(s, "cosine") for s in (0, 60, 110)]


# --------------------------------------------------------------------------------------------------
# DeepSpeed config
# --------------------------------------------------------------------------------------------------


def test_global_batch_is_micro_batch_times_accumulation_times_workers() -> None:
    config = job(training={"batch_size_per_worker": 8, "grad_accumulation": 4})

    ds = build_deepspeed_config(config, world_size=3, precision="fp32")

    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 8 * 4 * 3


def test_gradient_clipping_off_is_zero() -> None:
    assert build_deepspeed_config(job(), world_size=1, precision="fp32")["gradient_clipping"] == 1.0
    off = job(training={"max_grad_norm": None})
    assert build_deepspeed_config(off, world_size=1, precision="fp32")["gradient_clipping"] == 0.0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_keys(stage: int) -> None:
    zero = build_deepspeed_config(job(deepspeed={"stage": stage}), world_size=2, precision="fp32")["zero_optimization"]

    assert zero["stage"] == stage
    assert ("reduce_scatter" in zero) == (stage >= 2)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert "offload_optimizer" not in zero
    assert "offload_param" not in zero


def test_zero3_buckets_are_sized_from_the_model_width_and_overrides_still_win() -> None:
    zero = build_deepspeed_config(job(deepspeed={"stage": 3}), world_size=2, precision="fp32",
                                  hidden_size=384)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 384 * 384
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 384 * 384)
    assert zero["stage3_param_persistence_threshold"] == 3840
    # What stays gathered between uses: about a block (DeepSpeed's 1e9 default kept a 1B model whole on every rank).
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 14 * 384 * 384

    stage2 = build_deepspeed_config(job(deepspeed={"stage": 2}), world_size=2, precision="fp32", hidden_size=384)
    assert "reduce_bucket_size" not in stage2["zero_optimization"]  # DeepSpeed's ZeRO-2 buckets are lazy

    mine = job(deepspeed={"stage": 3, "overrides": {"zero_optimization": {"reduce_bucket_size": 12345}}})
    zero = build_deepspeed_config(mine, world_size=2, precision="fp32", hidden_size=384)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345


def test_offload_keys_put_state_on_cpu() -> None:
    config = job(deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True})

    zero = build_deepspeed_config(config, world_size=2, precision="fp32")["zero_optimization"]

    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


def test_optimizer_offload_alone_leaves_params_on_device() -> None:
    config = job(deepspeed={"stage": 2, "offload_optimizer": True})

    zero = build_deepspeed_config(config, world_size=2, precision="fp32")["zero_optimization"]

    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in zero


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"), [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)]
)
def test_precision_flags(precision: str, bf16: bool, fp16: bool) -> None:
    ds = build_deepspeed_config(job(), world_size=1, precision=precision)

    assert ds["bf16"]["enabled"] is bf16
    assert ds["fp16"]["enabled"] is fp16


def test_user_config_file_overrides_keys_but_not_batch_sizes(tmp_path: Path) -> None:
    user_file = tmp_path / "ds.json"
    user_file.write_text(
        json.dumps(
            {
                "train_batch_size": 999,
                "train_micro_batch_size_per_gpu": 999,
                "zero_optimization": {"reduce_bucket_size": 1000},
                "fp16": {"initial_scale_power": 8},
                "steps_per_print": 5,
            }
        )
    )
    config = job(deepspeed={"stage": 2, "config_file": str(user_file)}, training={"batch_size_per_worker": 4})

    ds = build_deepspeed_config(config, world_size=2, precision="fp32")

    assert ds["train_batch_size"] == 8
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 2  # merged, not replaced
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["fp16"] == {"enabled": False, "initial_scale_power": 8}
    assert ds["steps_per_print"] == 5


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def test_auto_precision_on_cpu_is_fp32() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"


def test_fp16_on_cpu_is_an_error() -> None:
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_explicit_precision_is_kept_on_cpu(precision: str) -> None:
    assert resolve_precision(precision, "cpu") == precision


# --------------------------------------------------------------------------------------------------
# Optimizer parameter groups
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config)


def group_names(model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[set[str]]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [{name_of[id(p)] for p in group["params"]} for group in groups]


def test_biases_and_layer_norms_get_no_weight_decay(tiny_bert: torch.nn.Module) -> None:
    groups = param_groups(tiny_bert, weight_decay=0.1)

    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay, no_decay = group_names(tiny_bert, groups)
    all_names = {name for name, _ in tiny_bert.named_parameters()}
    assert decay | no_decay == all_names
    assert not decay & no_decay
    assert {n for n in all_names if n.endswith(".bias") or "LayerNorm" in n} == no_decay
    assert "embeddings.word_embeddings.weight" in decay
    assert "encoder.layer.0.attention.self.query.weight" in decay
    assert "encoder.layer.1.output.LayerNorm.weight" in no_decay
    assert "encoder.layer.1.output.dense.bias" in no_decay


def test_frozen_parameters_are_left_out(tiny_bert: torch.nn.Module) -> None:
    frozen = [p for name, p in tiny_bert.named_parameters() if name.startswith("embeddings.")]
    for p in frozen:
        p.requires_grad_(False)
    try:
        names = set().union(*group_names(tiny_bert, param_groups(tiny_bert, weight_decay=0.1)))
    finally:
        for p in frozen:
            p.requires_grad_(True)

    assert names
    assert not any(name.startswith("embeddings.") for name in names)


def test_cpu_optimizer_is_torchs_fused_adamw_and_steps_like_the_reference(tiny_bert: torch.nn.Module) -> None:
    import copy

    config = job(training={"lr": 1e-2, "weight_decay": 0.1})
    models = [copy.deepcopy(tiny_bert) for _ in range(2)]
    fused = build_optimizer(param_groups(models[0], 0.1), config, device_type="cpu")
    reference = torch.optim.AdamW(param_groups(models[1], 0.1), lr=1e-2, foreach=False)
    reference.param_groups[1]["lr"] = fused.param_groups[1]["lr"] = 0.0  # a group the schedule has not unfrozen yet

    assert fused.defaults["fused"] is True
    torch.manual_seed(1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, (fused, reference)):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    frozen_at_lr_0 = {id(p) for p in fused.param_groups[1]["params"]}
    unchanged = [torch.equal(a, b) for a, b in zip(models[0].parameters(), tiny_bert.parameters())
                 if id(a) in frozen_at_lr_0]
    assert unchanged and all(unchanged)


def test_resident_tensor_memory_counts_each_storage_once() -> None:
    from orchestrator.train.memory import resident_tensor_mb

    before = resident_tensor_mb(torch.device("cpu"))
    block = torch.zeros(4 * 2**20 // 4)  # 4 MiB of fp32
    views = [block[:10], block.view(2, -1), block[1:]]  # views share the storage: not counted again

    after = resident_tensor_mb(torch.device("cpu"))

    assert 4.0 <= after - before < 4.5
    del block, views
    assert resident_tensor_mb(torch.device("cpu")) < after - 3.5


def test_model_width_sees_through_wrappers_to_the_widest_model(tiny_models) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from orchestrator.train.engine import model_width

    student = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"])
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"])
    teacher.config.hidden_size = 96  # only the recorded width matters here

    class Pair(torch.nn.Module):  # like a distillation module: no config of its own
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = student, teacher

    assert model_width(Pair()) == 96
    assert model_width(student) == student.config.hidden_size
    assert model_width(torch.nn.Linear(2, 2)) is None


ENGINE_IN_A_FRESH_PROCESS = """
import os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, torch
from orchestrator.train.engine import skip_unused_cpu_comm_op

model = torch.nn.Linear(4, 2)
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True}
assert skip_unused_cpu_comm_op(config, device_type="cpu")
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
loss = engine(torch.ones(2, 4)).sum()
engine.backward(loss)
engine.step()
print("stepped")
"""


def test_a_cpu_engine_compiles_no_deepspeed_op_it_does_not_use(tmp_path: Path) -> None:
    """DeepSpeed would JIT-compile its shared-memory all-reduce (45-70 s on 2 cores) on a machine's first CPU job."""
    import os
    import subprocess
    import sys

    from tests.test_job_submit import _free_ports

    (port,) = _free_ports(1)
    extensions = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", ENGINE_IN_A_FRESH_PROCESS, str(port)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stepped" in done.stdout
    built = sorted(p.name for p in extensions.glob("*/*"))
    assert built == [], f"DeepSpeed compiled {built}"


def test_the_comm_op_is_kept_where_it_can_be_used() -> None:
    autotp = {"tensor_parallel": {"autotp_size": 2}}
    assert skip_unused_cpu_comm_op(autotp, device_type="cpu") is False
    assert skip_unused_cpu_comm_op({}, device_type="cuda") is False
