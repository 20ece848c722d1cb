"""An 8B-shaped model (Llama-3-8B dimensions, random bf16 weights built on the meta device, ~16 GB of safetensors)
under ZeRO-3 with parameter and optimizer offload on ONE GPU: LoRA and full fine-tuning, a few steps at sequence
2048, gradient checkpointing on. Records the GPU's peak allocated memory and the host's peak RSS per worker next
to what ``orchestrator plan`` predicts for the same job (benchmarks/zero3_memory.py is the CPU counterpart).

Needs a CUDA GPU (about 40 GB free) and ~70 GB of host memory for full fine-tuning's offloaded Adam states.
Not yet run: no GPU was lent to the session that wrote it.

    .venv/bin/python benchmarks/gpu_zero3_8b.py --out benchmarks/results/gpu_zero3_8b.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import DATA, ROOT, command_line, start_ray, write_result
from zero3_memory import ProcMemory, build_llama


def job(name: str, model: Path, out: Path, *, method: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"path": str(model), "task": "causal-lm", "gradient_checkpointing": True},
        "method": method,
        "data": {"train": {"path": str(DATA / "agnews" / "train.tsv"), "header": False, "text_column": "0",
                           "limit": 64},
                 "max_length": 2048, "packing": True},
        "training": {"max_steps": 3, "batch_size_per_worker": 1, "log_every_steps": 1,
                     "checkpoint_every_steps": 10**6},
        "deepspeed": {"stage": 3, "precision": "bf16", "offload_params": True, "offload_optimizer": True},
        "scaling": {"num_workers": 1, "use_gpu": True},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": False, "save_best": False, "registry": None},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / "results" / "models")
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from orchestrator.cluster.launcher import run_training
    from orchestrator.cluster.memory_plan import GIB, ModelShape, plan_memory
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    model = args.models / "llama-8b-bf16"
    params = build_llama(model, hidden=4096, layers=32, intermediate=14336)
    start_ray()
    runs: dict[str, Any] = {"params": params}
    with tempfile.TemporaryDirectory() as tmp, ProcMemory() as memory:
        for method in args.methods:
            config = config_from_dict(job(f"gpu8b-{method}", model, Path(tmp), method=method))
            from transformers import AutoConfig

            plan = plan_memory(config, ModelShape.for_job(config, AutoConfig.from_pretrained(model)),
                               precision="bf16", fused_attention=True)
            result = run_training(config)
            records = read_metrics(result.run_dir)
            train = [r for r in records if r["kind"] == "train"]
            start = next(r for r in records if r["kind"] == "start")
            runs[method] = {
                "gpu_peak_allocated_gib": max(r.get("memory/peak_cuda_allocated_mb", 0) for r in train) / 1024,
                "host_peak_rss_gib": [memory.hwm.get(pid, 0.0) / 1024 for pid in start["worker_pids"]],
                "planned_gpu_gib": plan.device_total / GIB,
                "planned_host_offload_gib": plan.host_offload / GIB,
                "tokens_per_s": train[-1].get("train/tokens_per_s"),
            }
            print(method, runs[method], flush=True)
    write_result(args.out, {"command": command_line(), "runs": runs})


if __name__ == "__main__":
    main()
