"""Exporting a trained model as a Hugging Face folder (safetensors + tokenizer + label map + job config).

The weights are streamed (``orchestrator.models.weight_stream``): under ZeRO-3 every rank gathers one module at a
time and rank 0 writes it into the current safetensors shard (``output.max_shard_size``), so no rank ever holds
the whole model, let alone two copies of it. The folder appears atomically: it is written beside the
destination, then swapped in (``orchestrator.train.folder_swap``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from orchestrator.config import JobConfig
from orchestrator.models.weight_stream import WeightStream
from orchestrator.run_outputs import publish_folder
from orchestrator.train.folder_swap import replace_folder

JOB_CONFIG_FILE = "orchestrator_job.yaml"
METRICS_FILE = "orchestrator_metrics.json"


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
    publish_to: str | None = None,
) -> None:
    """Write a folder that ``AutoModelFor*.from_pretrained`` loads, atomically (write, then swap in).

    Every rank must call this (under ZeRO-3 the gathers are collective); only rank 0 writes. The method writes
    the weights (``Method.save_weights``): a plain HF model for full fine-tuning, the PEFT adapter (and optionally
    a merged model) for LoRA, only the student for distillation.

    Args:
        destination: the local folder (the run's scratch when ``output.dir`` is a URI).
        publish_to: the folder's URI on the bucket: rank 0 uploads it there marker-last
            (``orchestrator.run_outputs.publish_folder``) once the local copy is complete; the other ranks wait.
    """
    module = engine.module
    weights = WeightStream(module, is_rank0=is_rank0)
    if weights.partitioned:
        # ZeRO-3 may still be prefetching parameters for the next forward (an eval just ran): settle them, or the
        # export's own gathers find a parameter in flight ("Cannot partition a param in flight").
        engine.empty_partition_cache()
    staging: Path | None = None
    if is_rank0:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        method.save_weights(module, weights, staging, config)
        if staging is not None:
            tokenizer.save_pretrained(str(staging))
            (staging / JOB_CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            (staging / METRICS_FILE).write_text(
                json.dumps({"label_names": label_names, "metrics": _plain(metrics)}, indent=2)
            )
            replace_folder(staging, destination)  # keeps the last good copy whatever step a crash hits
            staging = None
            if publish_to is not None:
                publish_folder(destination, publish_to)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
