"""Unfreezing schedules on small data: 1,000 SST-2 sentences, 3 seeds each, scored on sst2/test.tsv.

* none: every layer trains from the start at a small LR (3e-5, the usual BERT fine-tuning range);
* head_only: feature extraction, only the classifier trains (LR 2e-3);
* gradual: ULMFiT-style: the head first, one more block from the top every 0.4 epochs, discriminative
  LRs with γ = 0.8 (base 1e-4), 5 warmup steps for each newly unfrozen block.
All: 3 epochs, batch 32, max_length 64, 1 worker, DeepSpeed stage 0. Reports mean ± std accuracy per schedule.

    .venv/bin/python benchmarks/unfreeze.py --out benchmarks/results/unfreeze.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import mean_std, run_job, sst2_job, write_result

SCHEDULES = {
    "none": {"lr": 3e-5},
    "head_only": {"lr": 2e-3, "unfreeze": {"kind": "head_only"}},
    "gradual_0.8": {"lr": 1e-4, "unfreeze": {"kind": "gradual", "every_epochs": 0.4, "lr_decay": 0.8,
                                            "warmup_steps": 5}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="*", default=list(SCHEDULES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in args.schedules}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.schedules:
                job = sst2_job(f"unfreeze-{name}-s{seed}-{int(time.time())}", Path(tmp), limit=args.examples,
                               epochs=args.epochs, seed=seed, **SCHEDULES[name])
                res = run_job(job)
                runs[name].append({"seed": seed, "accuracy": res["eval"]["sst2_test/accuracy"],
                                   "samples_per_s": res.get("samples_per_s"), "wall_s": res["wall_s"]})
                print(name, seed, runs[name][-1], flush=True)
    summary = {}
    for name, items in runs.items():
        mean, std = mean_std([r["accuracy"] for r in items])
        summary[name] = {"accuracy_mean": mean, "accuracy_std": std, "runs": items}
    write_result(args.out, {"examples": args.examples, "epochs": args.epochs, "schedules": summary,
                            "command": "python benchmarks/unfreeze.py --out benchmarks/results/unfreeze.json"})


if __name__ == "__main__":
    main()
