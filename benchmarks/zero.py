"""Scaling and ZeRO memory on MiniLM/SST-2 (AdamW, fp32 on CPU), side by side in one run.

* 1 worker x 1 CPU, stage 0: the per-worker compute rate;
* 2 workers x 1 CPU, stages 0 (DDP-equivalent), 1, 2 and 3: throughput, peak resident memory per worker,
  memory above the worker's footprint before the model was loaded, and the model states themselves: the bytes
  of live tensors between steps (after step 1), which is what the ZeRO paper's model predicts (peak RSS also
  holds activations, allocator caches and the libraries, and hides the differences).
Scaling efficiency = 2-worker samples/s ÷ (2 × 1-worker samples/s); the rest is the communication and
synchronisation share (gloo all-reduce / reduce-scatter / all-gather of 22.7M fp32 values per step).
The ZeRO paper's model for the model states per worker (Ψ parameters, N workers, fp32 params and grads,
Adam moments and DeepSpeed's fp32 partition copy, 4 bytes each): stage 0: 16Ψ; 1: 8Ψ + 12Ψ/N (4Ψ/N of it the
fp32 partition); 2: 4Ψ + 16Ψ/N; 3: 20Ψ/N.

    .venv/bin/python benchmarks/zero.py --out benchmarks/results/zero.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import run_job, sst2_job, write_result


def paper_model_mb(stage: int, psi: int, n: int) -> float:
    bytes_ = {0: 16 * psi, 1: 8 * psi + 12 * psi / n, 2: 4 * psi + 16 * psi / n, 3: 20 * psi / n}[stage]
    return bytes_ / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        job = sst2_job(f"zero-1w-{int(time.time())}", Path(tmp), limit=32 * args.steps, steps=args.steps, batch=16,
                       workers=1, stage=0, evaluate=False)
        job["scaling"]["cpus_per_worker"] = 1.0
        runs["1w_z0"] = run_job(job)
        for stage in (0, 1, 2, 3):
            job = sst2_job(f"zero-2w-z{stage}-{int(time.time())}", Path(tmp), limit=32 * args.steps,
                           steps=args.steps, batch=32, workers=2, stage=stage, evaluate=False)
            runs[f"2w_z{stage}"] = run_job(job)
    psi = runs["2w_z0"]["params_total"]
    for key, res in runs.items():
        res["above_start_mb"] = res["peak_rss_mb"] - res["rss_before_model_mb"]
        res["resident_tensors_vs_stage0"] = None
        if key.startswith("2w"):
            stage = int(key[-1])
            res["paper_model_states_mb"] = paper_model_mb(stage, psi, 2)
            res["above_start_vs_stage0"] = res["above_start_mb"] / runs["2w_z0"]["above_start_mb"]
            res["paper_vs_stage0"] = paper_model_mb(stage, psi, 2) / paper_model_mb(0, psi, 2)
            if res.get("resident_tensors_mb") and runs["2w_z0"].get("resident_tensors_mb"):
                res["resident_tensors_vs_stage0"] = res["resident_tensors_mb"] / runs["2w_z0"]["resident_tensors_mb"]
    efficiency = runs["2w_z2"]["samples_per_s"] / (2 * runs["1w_z0"]["samples_per_s"])
    write_result(args.out, {
        "runs": runs,
        "scaling_efficiency_2w_z2": efficiency,
        "scaling_efficiency_2w_z0": runs["2w_z0"]["samples_per_s"] / (2 * runs["1w_z0"]["samples_per_s"]),
        "communication_share_2w_z2": 1 - efficiency,
        "command": "python benchmarks/zero.py --out benchmarks/results/zero.json",
    })


if __name__ == "__main__":
    main()
