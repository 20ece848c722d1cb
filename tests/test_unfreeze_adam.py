"""A group that unfreezes later starts Adam afresh: its first update equals a fresh ``torch.optim.AdamW``'s.

Until its step, a group sits in the optimizer at LR 0 with zero gradients (DeepSpeed fills the gradients the
backward stop leaves out), so its moments stay 0 while its step count grows; without a restart, its first
bias-corrected update is (1 - b1) / (1 - b1^t) / sqrt((1 - b2) / (1 - b2^t)) times a fresh Adam's at step count t
(0.74x at t = 2, 2.5x at t = 1000, toward 3.2x). Checked on torch's fused AdamW alone, inside DeepSpeed's
ZeRO 0-3 optimizers (one process), and in 2-worker Ray runs under ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.train.unfreezing import Schedule

REPO = Path(__file__).resolve().parents[1]
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


def _layered(low: torch.nn.Linear, top: torch.nn.Linear) -> list[dict]:
    """Param groups as ``layered_param_groups`` builds them: layer group 1 (a block) and 2 (the head)."""
    return [
        {"params": [low.weight], "weight_decay": WD, "layer_group": 1},
        {"params": [low.bias], "weight_decay": 0.0, "layer_group": 1},
        {"params": [top.weight], "weight_decay": WD, "layer_group": 2},
        {"params": [top.bias], "weight_decay": 0.0, "layer_group": 2},
    ]


def _fresh_adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], decays: list[float]) -> list[torch.Tensor]:
    """What a brand-new torch AdamW (same lr, betas, eps, weight decay) does with one gradient."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for copy, grad in zip(copies, grads):
        copy.grad = grad.clone()
    groups = [{"params": [c], "weight_decay": wd} for c, wd in zip(copies, decays)]
    torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=True).step()
    return [c.detach() for c in copies]


@pytest.mark.parametrize("unfreeze_at", [1, 3, 1000])
@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "not-restarted"])
def test_a_group_restarted_at_its_unfreeze_step_takes_a_fresh_adamws_first_update(unfreeze_at, restart):
    from orchestrator.train.callbacks import FreshAdamOnUnfreeze

    torch.manual_seed(0)
    low, top = torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)
    optimizer = torch.optim.AdamW(_layered(low, top), lr=LR, betas=BETAS, eps=EPS, fused=True)
    schedule = Schedule(kind="gradual", num_blocks=1, every_steps=unfreeze_at)  # head from 0, the block at s
    callback = FreshAdamOnUnfreeze(schedule, optimizer)
    run = SimpleNamespace(engine=SimpleNamespace(optimizer=optimizer), state=SimpleNamespace(step=0))
    for step in range(unfreeze_at):  # the block at LR 0 with the zero gradients DeepSpeed gives it
        for group in optimizer.param_groups:
            group["lr"] = LR if group["layer_group"] == 2 else 0.0
        for p in low.parameters():
            p.grad = torch.zeros_like(p)
        for p in top.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        run.state.step = step + 1
        if restart:
            callback.step_end(run)
    assert optimizer.state[low.weight]["step"].item() == (0 if restart else unfreeze_at)

    for group in optimizer.param_groups:
        group["lr"] = LR
    grads = [torch.randn_like(low.weight), torch.randn_like(low.bias)]
    expected = _fresh_adamw_step([low.weight, low.bias], grads, [WD, 0.0])
    low.weight.grad, low.bias.grad = (g.clone() for g in grads)
    top.weight.grad, top.bias.grad = torch.randn_like(top.weight), torch.randn_like(top.bias)
    optimizer.step()

    same = torch.equal(low.weight, expected[0]) and torch.equal(low.bias, expected[1])
    assert same == restart


def test_only_groups_that_become_trainable_at_a_step_are_restarted_and_the_rest_keep_their_moments():
    from orchestrator.train.unfreezing import groups_unfrozen_at, restart_optimizer_state

    torch.manual_seed(0)
    low, top = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(_layered(low, top), lr=LR, fused=True)
    for p in (*low.parameters(), *top.parameters()):
        p.grad = torch.randn_like(p)
    optimizer.step()
    head_moment = optimizer.state[top.weight]["exp_avg"].clone()

    assert restart_optimizer_state(optimizer, {1}) == 2  # the block's weight and bias
    assert all(optimizer.state[p]["step"].item() == 0 for p in low.parameters())
    assert all(not optimizer.state[p]["exp_avg"].any() and not optimizer.state[p]["exp_avg_sq"].any()
               for p in low.parameters())
    assert torch.equal(optimizer.state[top.weight]["exp_avg"], head_moment)
    assert optimizer.state[top.weight]["step"].item() == 1

    gradual = Schedule(kind="gradual", num_blocks=2, every_steps=4)  # groups: 0 embeddings, 1-2 blocks, 3 head
    assert [groups_unfrozen_at(gradual, s) for s in range(0, 13, 4)] == [set(), {2}, {1}, {0}]
    assert groups_unfrozen_at(gradual, 5) == set()
    # explicit milestones may freeze a group again; it restarts each time it comes back
    explicit = Schedule(
        kind="explicit", num_blocks=2,
        milestones=((0, frozenset({3})), (2, frozenset({2, 3})), (4, frozenset({3})), (6, frozenset({2, 3}))),
    )
    assert [s for s in range(8) if groups_unfrozen_at(explicit, s)] == [2, 6]


ZERO_STAGES_IN_ONE_PROCESS = """
import json, os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from types import SimpleNamespace
import deepspeed, torch
from orchestrator.train.callbacks import FreshAdamOnUnfreeze
from orchestrator.train.engine import skip_unused_cpu_comm_op
from orchestrator.train.unfreezing import Schedule
from tests.test_unfreeze_adam import LR, WD, _fresh_adamw_step, _layered

UNFREEZE_AT = 3

def full(param):
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()

def first_update_error(stage, restart):
    torch.manual_seed(0)
    low, top = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    optimizer = torch.optim.AdamW(_layered(low, top), lr=LR, fused=True)
    frozen_until = lambda s: float(s >= UNFREEZE_AT)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [frozen_until, frozen_until, lambda s: 1.0, lambda s: 1.0])
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": zero, "steps_per_print": 10**9,
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    skip_unused_cpu_comm_op(config, device_type="cpu")
    model = torch.nn.Sequential(low, torch.nn.Tanh(), top)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    callback = FreshAdamOnUnfreeze(Schedule(kind="gradual", num_blocks=1, every_steps=UNFREEZE_AT), optimizer)
    run = SimpleNamespace(engine=engine, state=SimpleNamespace(step=0))
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 1, 0])
    for step in range(UNFREEZE_AT + 1):
        if step == UNFREEZE_AT:  # the reference: a fresh AdamW on the block, with the gradient it gets now
            ref_low, ref_top = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
            with torch.no_grad():
                for ref, p in zip((*ref_low.parameters(), *ref_top.parameters()), engine.module.parameters()):
                    ref.copy_(full(p))
            torch.nn.functional.cross_entropy(ref_top(torch.tanh(ref_low(x))), y).backward()
            expected = _fresh_adamw_step([ref_low.weight, ref_low.bias], [ref_low.weight.grad, ref_low.bias.grad],
                                         [WD, 0.0])
        hidden = engine.module[0](x)
        if step < UNFREEZE_AT:  # below the backward stop: the block's gradients are zeros
            hidden = hidden * 0.0 + hidden.detach()
        loss = torch.nn.functional.cross_entropy(engine.module[2](torch.tanh(hidden)), y)
        engine.backward(loss)
        engine.step()
        run.state.step = step + 1
        if restart:
            callback.step_end(run)
    got = [full(engine.module[0].weight), full(engine.module[0].bias)]
    return max((g - e).abs().max().item() for g, e in zip(got, expected))

print(json.dumps({f"{stage}-{restart}": first_update_error(stage, restart)
                  for stage in (0, 1, 2, 3) for restart in (True, False)}))
"""


def test_under_every_zero_stage_the_first_update_after_unfreezing_is_a_fresh_adamws(tmp_path):
    """DeepSpeed keeps its own flat fp32 partitions under ZeRO 1-3 (and, under ZeRO-3, empties the optimizer's
    param lists between steps); the restart must find the state there. One process, stages 0 to 3."""
    from tests.test_job_submit import _free_ports

    (port,) = _free_ports(1)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ZERO_STAGES_IN_ONE_PROCESS, str(port)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for stage in (0, 1, 2, 3):
        assert errors[f"{stage}-True"] <= 1e-7, (stage, errors)  # LR 1e-2: the update itself is ~1e-2
        assert errors[f"{stage}-False"] > 1e-3, (stage, errors)  # without the restart: 0.58x the fresh update


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_the_top_blocks_first_update_is_a_fresh_adamws(stage, ray_cluster, tiny_models, shared_data,
                                                                    tmp_path):
    """A fresh AdamW's first step moves every weight by lr * g / (|g| + eps): by lr exactly wherever |g| >> eps,
    whatever the gradient (eps 1e-12 here: this tiny model's gradients are ~1e-5, within 0.1% of the default eps).
    The top block unfreezes at step 3 (its 4th optimizer step); its change from the step-3 checkpoint to the
    step-4 one must be that (without the restart it is 0.58 lr)."""
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from tests.conftest import tiny_job
    from tests.test_unfreeze_ray import _weights_at

    job = tiny_job(f"adam-unfreeze-z{stage}", tiny_models["bert"], shared_data, tmp_path, stage=stage, max_steps=4,
                   lr=LR, weight_decay=0.0, lr_schedule="constant", adam_eps=1e-12, checkpoint_every_steps=3)
    job["unfreeze"] = {"kind": "gradual", "every_steps": 3, "cap": 1}  # head from step 0, the top block from 3
    job["output"]["keep_checkpoints"] = 5
    result = run_training(config_from_dict(job))

    checkpoints = sorted(p for p in (result.run_dir / "ray" / job["name"]).glob("checkpoint_*") if p.is_dir())
    steps = [json.loads((c / "train_state.json").read_text())["step"] for c in checkpoints]
    assert steps == [3, 4]
    before, after = (_weights_at(c) for c in checkpoints)
    block = [k for k in before if k.startswith("bert.encoder.layer.1.") and k.endswith("dense.weight")]
    assert block
    for name in block:
        assert torch.equal(before[name], _weights_at_start(tiny_models)[name]), name  # frozen until step 3
        moved = (after[name] - before[name]).abs() / LR
        assert moved.max().item() <= 1 + 1e-5, name
        assert moved.median().item() >= 1 - 1e-4, (name, moved.median().item())
    lower = [k for k in before if k.startswith("bert.encoder.layer.0.")]
    assert lower and all(torch.equal(before[k], after[k]) for k in lower)  # still frozen


def _weights_at_start(tiny_models) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"bert.{k}": v for k, v in load_file(tiny_models["bert"] / "model.safetensors").items()}
