"""LoRA vs full fine-tuning, and frozen-layer savings, on MiniLM/SST-2 — side by side in one run.

Every variant trains the same steps on the same 4,800 SST-2 sentences (batch 32, max_length 64, 1 worker
with all CPUs, DeepSpeed stage 0) and is scored on sst2/test.tsv. Reported per variant: steady-state
step time and its ratio to full fine-tuning, peak resident memory of the worker, trainable fraction of
the parameters, and test accuracy. Each variant uses the LR usual for it (full 1e-4; LoRA 5e-4; a frozen
body lets the head take a higher LR).

    .venv/bin/python benchmarks/methods.py --out benchmarks/results/methods.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import run_job, sst2_job, write_result

VARIANTS = {
    "full": {"lr": 1e-4},
    "lora_r8": {"lr": 5e-4, "method": "lora", "lora": {"r": 8, "alpha": 16}},
    "head_only": {"lr": 2e-3, "unfreeze": {"kind": "head_only"}},
    "top_k1": {"lr": 3e-4, "unfreeze": {"kind": "top_k", "k": 1}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--speed-only", action="store_true", help="no eval: step time and memory only (short runs)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            options = dict(VARIANTS[name])
            job = sst2_job(f"bench-{name}-{int(time.time())}", Path(tmp), limit=32 * args.steps, steps=args.steps,
                           evaluate=not args.speed_only, **options)
            results[name] = run_job(job)
            print(name, results[name])
    full = results.get("full")
    for res in results.values():
        res["trainable_fraction"] = res["params_trainable"] / res["params_total"]
        if full is not None:
            res["step_time_vs_full"] = res["step_s"] / full["step_s"]
            res["peak_rss_vs_full"] = res["peak_rss_mb"] / full["peak_rss_mb"]
    command = "python benchmarks/methods.py --out benchmarks/results/methods.json"
    if args.speed_only:
        command = (f"python benchmarks/methods.py --speed-only --steps {args.steps} "
                   "--out benchmarks/results/methods_speed.json")
    write_result(args.out, {"steps": args.steps, "variants": results, "command": command})


if __name__ == "__main__":
    main()
