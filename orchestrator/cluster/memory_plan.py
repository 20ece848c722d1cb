"""Expected memory per worker of a job, before any resource is taken (``orchestrator plan CONFIG``).

Model states follow the ZeRO paper (Rajbhandari et al. 2020) as DeepSpeed lays them out, for Ψ parameters of
which Ψt train, N workers and AdamW:

* mixed precision (bf16/fp16 on GPUs): weights 2Ψ, gradients 2Ψt, fp32 master copy 4Ψt, Adam moments 8Ψt;
  ZeRO-1 partitions the optimizer states (12Ψt/N), ZeRO-2 the gradients as well, ZeRO-3 the weights too;
* fp32 (CPU workers): weights 4Ψ, gradients 4Ψt, Adam moments 8Ψt, and under ZeRO 1-3 DeepSpeed's own fp32
  partition of the trainable weights, 4Ψt/N (measured: benchmarks/zero.py matches these to within 1%).

``offload_optimizer`` moves the master copy, moments and (ZeRO 2-3) gradient partitions to host memory,
``offload_params`` (ZeRO-3) the weight partitions too. Under ZeRO-3 a worker also holds what is being computed,
gathered whole (a block, or the vocabulary matrix when that is larger), and DeepSpeed's prefetch bucket (0.9 d²).

Activations of one micro-batch (b sequences of s tokens, width h, L blocks, a heads, vocabulary V) follow
Korthikanti et al. 2022, scaled to the compute dtype: s·b·h·(34 + 5·a·s/h) bytes a block at 2 bytes an element
(the 5·a·s/h term, the attention matrix, is not stored by fused attention kernels on GPUs); with gradient
checkpointing only each block's input (s·b·h elements) is kept, plus one block's activations recomputed in
backward. The logits take b·s·V elements, and the loss an fp32 copy and its gradient. These are estimates
(allocator caches, communication buffers and the libraries come on top: about 1-2 GB a process).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config import JobConfig

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter counts and the transformer's dimensions."""

    params: int
    trainable: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    largest_block: int  # parameters gathered whole at once under ZeRO-3: a block, or the vocabulary matrix

    @classmethod
    def for_job(cls, config: JobConfig, hf_config: Any) -> ModelShape:
        """Counted on a weightless (meta-device) copy of the job's model (with LoRA's adapters for method: lora):
        no weights are read or allocated."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from orchestrator.models.layers import find_blocks_module

        auto = AutoModelForCausalLM if config.model.task == "causal-lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            model = auto.from_config(hf_config)
            _, blocks = find_blocks_module(model)
            # What ZeRO-3 gathers whole at a time: a block, or the vocabulary matrix (embeddings, LM head) if larger.
            largest_block = max(max(sum(p.numel() for p in block.parameters()) for block in blocks),
                                max(p.numel() for p in model.parameters()))
            if config.method == "lora":
                from peft import get_peft_model

                from orchestrator.methods.lora import peft_config

                model = get_peft_model(model, peft_config(config, hf_config.model_type))
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            hidden=int(hf_config.hidden_size),
            layers=len(blocks),
            heads=int(getattr(hf_config, "num_attention_heads", 1) or 1),
            vocab=int(getattr(hf_config, "vocab_size", 0) or 0),
            largest_block=largest_block,
        )


@dataclass(frozen=True)
class MemoryPlan:
    """Expected bytes per worker, on the worker's device and in host memory."""

    weights: float
    gradients: float
    optimizer: float  # fp32 master / DeepSpeed partition + Adam moments
    gathered: float  # ZeRO-3: one block gathered whole + the prefetch bucket
    activations: float
    logits: float
    host_offload: float  # what offload moves to host memory
    stage: int
    workers: int
    precision: str

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.logits

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device_total": self.device_total}


def model_states(shape: ModelShape, *, stage: int, workers: int, precision: str, offload_optimizer: bool = False,
                 offload_params: bool = False) -> dict[str, float]:
    """Weights, gradients, optimizer states per worker (bytes) and what offload moves to the host."""
    psi, trained, n = shape.params, shape.trainable, workers
    weight_bytes = 4 if precision == "fp32" else 2
    weights = weight_bytes * psi / (n if stage == 3 else 1)
    gradients = weight_bytes * trained / (n if stage >= 2 else 1)
    moments = 8 * trained / (n if stage >= 1 else 1)
    if precision == "fp32":
        master = 4 * trained / n if stage >= 1 else 0.0  # DeepSpeed's fp32 partition of the trained weights
    else:
        master = 4 * trained / (n if stage >= 1 else 1)
    optimizer, host = moments + master, 0.0
    if offload_optimizer:
        host += optimizer + (gradients if stage >= 2 else 0.0)
        gradients = gradients if stage < 2 else 0.0
        optimizer = 0.0
    if offload_params and stage == 3:
        host += weights
        weights = 0.0
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "host_offload": host}


def activation_bytes(shape: ModelShape, *, batch: int, seq: int, precision: str, checkpointing: bool,
                     fused_attention: bool) -> tuple[float, float]:
    """(activations, logits) of one micro-batch, bytes."""
    element = 4 if precision == "fp32" else 2
    h, a, s, b = shape.hidden, shape.heads, seq, batch
    per_block = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h)) * element / 2
    activations = (shape.layers * s * b * h * element + per_block) if checkpointing else shape.layers * per_block
    logits = b * s * shape.vocab * (element + 4 + 4)  # the logits, their fp32 copy in the loss and its gradient
    return activations, logits


def plan_memory(config: JobConfig, shape: ModelShape, *, precision: str, fused_attention: bool) -> MemoryPlan:
    """The expected per-worker memory of ``config`` for a model of ``shape``."""
    ds, t = config.deepspeed, config.training
    n = config.scaling.num_workers
    states = model_states(shape, stage=ds.stage, workers=n, precision=precision,
                          offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params)
    element = 4 if precision == "fp32" else 2
    gathered = (shape.largest_block + 0.9 * shape.hidden**2) * element if ds.stage == 3 else 0.0
    seq = config.data.max_length
    activations, logits = activation_bytes(shape, batch=t.batch_size_per_worker, seq=seq, precision=precision,
                                           checkpointing=config.model.gradient_checkpointing,
                                           fused_attention=fused_attention)
    if config.model.task != "causal-lm":
        logits = 0.0  # a classifier's logits are tiny
    return MemoryPlan(weights=states["weights"], gradients=states["gradients"], optimizer=states["optimizer"],
                      gathered=gathered, activations=activations, logits=logits,
                      host_offload=states["host_offload"], stage=ds.stage, workers=n, precision=precision)


def format_gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB / 100 or value == 0 else f"{value / 2**20:.1f} MiB"


def fits(plan: MemoryPlan, device_bytes: float, *, overhead: float = 1.5 * GIB) -> bool:
    """Whether the plan, plus a process's fixed overhead, fits ``device_bytes``."""
    return plan.device_total + overhead <= device_bytes and not math.isnan(plan.device_total)


def _local_device(gpu: bool, workers: int) -> tuple[float, str]:
    """This machine's device memory for one worker: the first GPU, or the RAM shared by the workers."""
    import os

    if gpu:
        import torch

        if torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
        raise ValueError("--gpu without a GPU on this machine: pass --device-memory, e.g. --device-memory 80GB")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total / workers, f"this machine's RAM / {workers} workers"


def plan_for_job(config: JobConfig, *, device_memory: str | None, gpu: bool | None) -> tuple[Any, bool]:
    """The rich table ``orchestrator plan`` prints, and whether the job fits one worker's device."""
    from rich.table import Table
    from transformers import AutoConfig

    from orchestrator.config.sections import parse_size
    from orchestrator.models.loading import resolve_model_path
    from orchestrator.precision import resolve_precision

    if gpu is None:
        gpu = config.scaling.use_gpu is True or (config.scaling.use_gpu == "auto" and _cuda_available())
    precision = resolve_precision(config.deepspeed.precision, "cuda" if gpu else "cpu")
    hf_config = AutoConfig.from_pretrained(resolve_model_path(config.model.path),
                                           trust_remote_code=config.model.trust_remote_code)
    shape = ModelShape.for_job(config, hf_config)
    fused = gpu and config.model.attn_implementation in ("auto", "sdpa", "flash_attention_2")
    plan = plan_memory(config, shape, precision=precision, fused_attention=fused)
    workers = config.scaling.num_workers
    if device_memory is not None:
        capacity, where = float(parse_size(device_memory)), f"--device-memory {device_memory}"
    else:
        capacity, where = _local_device(gpu, workers)
    table = Table(title=f"{config.name}: {shape.params / 1e9:.3g}B parameters ({shape.trainable / 1e6:.3g}M train), "
                        f"ZeRO-{plan.stage}, {workers} workers, {precision}")
    table.add_column("per worker")
    table.add_column("expected", justify="right")
    for label, value in (("weights", plan.weights), ("gradients", plan.gradients),
                         ("optimizer (master + Adam)", plan.optimizer), ("ZeRO-3 gathered block", plan.gathered),
                         ("activations" + (" (checkpointed)" if config.model.gradient_checkpointing else ""),
                          plan.activations), ("logits and loss", plan.logits),
                         ("total on the device", plan.device_total), ("offloaded to host memory", plan.host_offload)):
        table.add_row(label, format_gib(value))
    ok = fits(plan, capacity)
    table.caption = (f"{'fits' if ok else 'does NOT fit'} {format_gib(capacity)} ({where}) with 1.5 GiB for the "
                     "process; estimates, see orchestrator/cluster/memory_plan.py")
    return table, ok


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
