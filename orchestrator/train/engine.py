"""Building the DeepSpeed engine: config dict, optimizer, learning-rate schedule, precision."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.precision import resolve_precision

__all__ = ["resolve_precision"]  # re-exported: the engine is where DeepSpeed's precision is set


def model_width(model: torch.nn.Module) -> int | None:
    """The widest hidden size among the HF models inside ``model`` (a distillation module holds a student and a
    teacher; a PEFT model wraps one), for sizing ZeRO-3's buckets; None when no submodule has a config."""
    widths = [m.config.hidden_size for m in model.modules()
              if isinstance(getattr(getattr(m, "config", None), "hidden_size", None), int)]
    return max(widths, default=None)


def build_deepspeed_config(
    config: JobConfig, *, world_size: int, precision: str, hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config for a job; a user's raw JSON (deepspeed.config_file) overrides its keys.

    ``hidden_size`` (the model's width d) sizes ZeRO-3's buckets as HF's "auto" does: reduce bucket d², prefetch
    bucket 0.9 d², parameters under 10 d elements left unpartitioned; and what stays gathered between uses at
    about one block (14 d² elements; DeepSpeed's 1e9 default would keep a 1B model whole). DeepSpeed's defaults
    (500M-element reduce bucket, 50M prefetch) are sized for 100B-parameter models: the reduce bucket alone is 2 GB
    of fp32, allocated up front on every worker (measured: MiniLM's ZeRO-3 workers held 2.1 GB of tensors for a
    23M model).
    """
    ds = config.deepspeed
    t = config.training
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if ds.stage == 3:
        # Gather sharded weights layer by layer to rank 0 when exporting a HF folder.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if hidden_size:
            # DeepSpeed keeps up to stage3_max_live_parameters gathered between uses (default 1e9: a whole 1B
            # model stays gathered on every rank from the second step on, measured 7 GB a rank instead of 3);
            # about one transformer block (12 d²) plus the prefetch bucket is what a forward needs at a time.
            live = 14 * hidden_size * hidden_size
            zero.update(
                reduce_bucket_size=hidden_size * hidden_size,
                stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                stage3_param_persistence_threshold=10 * hidden_size,
                stage3_max_live_parameters=live,
                stage3_max_reuse_distance=live,
            )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    result: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": t.grad_accumulation,
        "train_batch_size": t.batch_size_per_worker * t.grad_accumulation * world_size,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    user_layers = [json.loads(Path(ds.config_file).read_text())] if ds.config_file else []
    user_layers.append(json.loads(json.dumps(ds.overrides)))
    for user in user_layers:
        for key in _DERIVED_KEYS:  # batch sizes always come from training.* so they cannot disagree
            user.pop(key, None)
        _deep_update(result, user)
    return result


_DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and normalisation weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], config: JobConfig, *, device_type: str) -> torch.optim.Optimizer:
    """AdamW built here rather than from DeepSpeed's JSON: DeepSpeed's own Adam kernels JIT-compile
    (FusedAdam needs nvcc, CPUAdam gcc); torch's fused AdamW is as fast and needs nothing, on GPUs and (since
    torch 2.4) on CPUs, where it is 8x faster than torch's default per-tensor loop (MiniLM: 17 vs 133 ms a step
    on 2 cores, a tenth of a batch-32 training step). Optimizer offload still uses DeepSpeedCPUAdam, which
    ZeRO-Offload requires for speed."""
    t = config.training
    kwargs = {"lr": t.lr, "betas": tuple(t.adam_betas), "eps": t.adam_eps}
    if config.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=device_type in ("cuda", "cpu"), **kwargs)


def skip_unused_cpu_comm_op(ds_config: dict[str, Any], *, device_type: str) -> bool:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU when the job cannot use it.

    On a CPU accelerator, every ``deepspeed.initialize`` builds ``deepspeed_shm_comm`` (C++ through ninja, into
    ``~/.cache/torch_extensions``): 45-70 s on 2 cores, the first time on every machine and Python environment,
    paid by a fresh cluster node, a CI run and a user's first job alike. Only DeepSpeed's tensor-parallel
    (AutoTP) layers call it (``inference_all_reduce``); the data-parallel gradient all-reduce that training uses
    goes through ``torch.distributed``, and without the op DeepSpeed itself falls back to ``torch.distributed``.
    So unless the job's DeepSpeed config asks for AutoTP, the op is marked unavailable, the way DeepSpeed marks
    an op it cannot build (``deepspeed.ops.__compatible_ops__``, a dict it keeps so that edits persist).

    Returns:
        Whether the build was skipped.
    """
    tensor_parallel = ds_config.get("tensor_parallel") or {}
    if device_type != "cpu" or int(tensor_parallel.get("autotp_size", 1) or 1) > 1:
        return False
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" not in compatible:  # a DeepSpeed without the op (or that renamed it): nothing to skip
        return False
    compatible["deepspeed_shm_comm"] = False
    return True


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at an optimizer step: linear warmup, then linear/cosine decay or flat."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class WarmupDecay:
    """Picklable LR lambda (LambdaLR saves callable objects' state, so resume restores it)."""

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str):
        self.total_steps, self.warmup_steps, self.schedule = total_steps, warmup_steps, schedule

    def __call__(self, step: int) -> float:
        return lr_lambda(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps, schedule=self.schedule)


def warmup_steps_for(config: JobConfig, total_steps: int) -> int:
    t = config.training
    return t.warmup_steps or int(round(t.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, config: JobConfig, total_steps: int, *, wrap: Any = None) -> Any:
    """LambdaLR with the warmup/decay schedule; ``wrap(base, param_group)`` may return a per-group lambda
    (discriminative LRs, unfreezing)."""
    base = WarmupDecay(total_steps, warmup_steps_for(config, total_steps), config.training.lr_schedule)
    if wrap is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [wrap(base, group) for group in optimizer.param_groups])
