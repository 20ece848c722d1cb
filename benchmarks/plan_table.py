"""The memory planner (``orchestrator plan``) applied on paper to Llama-3-8B and -70B shapes on 8 and 64 GPUs of
80 GB: per-GPU memory by method and ZeRO stage, bf16, sequence 4096, one sequence per GPU, gradient
checkpointing on. Shapes are built from their configs on the meta device (no weights, no hub).

    .venv/bin/python benchmarks/plan_table.py --out benchmarks/results/plan_table.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import DATA, command_line, write_result

SHAPES = {
    "8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256},
}
ARMS = [("full", 3, False, False), ("full", 3, True, False), ("full", 3, True, True), ("lora", 3, False, False),
        ("lora", 2, False, False)]


def job(model_dir: Path, *, method: str, stage: int, workers: int, offload_opt: bool, offload_params: bool,
        out: Path) -> dict[str, Any]:
    return {
        "name": "plan",
        "model": {"path": str(model_dir), "task": "causal-lm", "gradient_checkpointing": True},
        "method": method,
        "data": {"train": {"path": str(DATA / "sst2" / "train.tsv"), "text_column": "sentence"}, "max_length": 4096},
        "training": {"batch_size_per_worker": 1},
        "deepspeed": {"stage": stage, "precision": "bf16", "offload_optimizer": offload_opt,
                      "offload_params": offload_params},
        "scaling": {"num_workers": workers, "use_gpu": True},
        "output": {"dir": str(out)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from transformers import LlamaConfig

    from orchestrator.cluster.memory_plan import GIB, ModelShape, fits, plan_memory
    from orchestrator.config import config_from_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, dims in SHAPES.items():
            hf_config = LlamaConfig(**dims, max_position_embeddings=8192, tie_word_embeddings=False)
            model_dir = Path(tmp) / size
            hf_config.save_pretrained(model_dir)
            for workers in (8, 64):
                for method, stage, offload_opt, offload_params in ARMS:
                    spec = job(model_dir, method=method, stage=stage, workers=workers, offload_opt=offload_opt,
                               offload_params=offload_params, out=Path(tmp))
                    config = config_from_dict(spec)
                    shape = ModelShape.for_job(config, hf_config)
                    plan = plan_memory(config, shape, precision="bf16", fused_attention=True)
                    rows.append({
                        "model": size, "params_b": round(shape.params / 1e9, 2), "gpus": workers, "method": method,
                        "stage": stage, "offload": "params+optimizer" if offload_params else
                        ("optimizer" if offload_opt else "none"),
                        "per_gpu_gib": round(plan.device_total / GIB, 1),
                        "host_per_gpu_gib": round(plan.host_offload / GIB, 1),
                        "fits_80gb": fits(plan, 80e9),
                    })
    for row in rows:
        print(row)
    write_result(args.out, {"command": command_line(), "rows": rows})


if __name__ == "__main__":
    main()
