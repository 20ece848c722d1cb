"""Exporting a trained model as a Hugging Face folder (safetensors + tokenizer + label map + job config).

Under ZeRO-3 no rank holds the whole model, so the weights are gathered first. DeepSpeed's
``_zero3_consolidated_16bit_state_dict`` gathers one parameter group at a time onto rank 0 (it is what
``save_16bit_model`` uses, whose public form only writes a pickle); gathering everything at once with
``GatheredParameters`` would need the whole model in memory on every rank.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from orchestrator.config import JobConfig

JOB_CONFIG_FILE = "orchestrator_job.yaml"
METRICS_FILE = "orchestrator_metrics.json"


def full_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on rank 0, None on other ranks. Every rank must call this."""
    if engine.zero_optimization_partition_weights():  # ZeRO-3
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if _rank() == 0 else None
    if _rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def export_hf_folder(
    engine: Any,
    *,
    tokenizer: Any,
    config: JobConfig,
    destination: Path,
    metrics: dict[str, Any],
    label_names: list[str],
    is_rank0: bool,
    method: Any,
) -> None:
    """Write a folder that ``AutoModelFor*.from_pretrained`` loads, atomically (write, then rename).

    The method writes the weights (``Method.save_weights``): a plain HF model for full fine-tuning,
    the PEFT adapter (and optionally a merged model) for LoRA, only the student for distillation."""
    state = full_state_dict(engine)
    if is_rank0:
        assert state is not None
        module = engine.module
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
        try:
            state = {k: v.contiguous() for k, v in state.items()}
            method.save_weights(module, state, staging, config)
            tokenizer.save_pretrained(str(staging))
            (staging / JOB_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            (staging / METRICS_FILE).write_text(
                json.dumps({"label_names": label_names, "metrics": _plain(metrics)}, indent=2)
            )
            old = destination.with_name(f".{destination.name}.old")
            if old.exists():
                shutil.rmtree(old)
            if destination.exists():
                destination.rename(old)
            staging.rename(destination)
            if old.exists():
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
