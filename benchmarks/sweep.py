"""ASHA vs FIFO on MiniLM/SST-2: same search space, same seeded draws.

12 trials over training.lr (loguniform 1e-5..1e-3) and unfreeze.kind (none | gradual, γ 0.8); each trial
trains one epoch of max_t x 192 SST-2 sentences (max_t x 12 steps of 16, 1 worker with the machine's CPUs,
ZeRO stage 0) and is scored on 300 test sentences every 12 steps (one Tune result = one ASHA time unit).
ASHA: grace 1, reduction factor 3 (rungs at 1, 3, 9, 27 evals). FIFO: scheduler none. Reports trial-steps
consumed, best metric, wall time and the share of wall time spent outside the trials' training loops (Ray/Tune
start-up, worker start, DeepSpeed init, scheduling, result handling). The README's figures (27-eval trials, each
arm in its own run, checkpoints only at a trial's end):

    .venv/bin/python benchmarks/sweep.py --trials 12 --max-t 27 --steps-per-eval 12 --checkpoint-every 100000 \
        --schedulers none --out benchmarks/results/sweep27_fifo.json
    .venv/bin/python benchmarks/sweep.py --trials 12 --max-t 27 --steps-per-eval 12 --checkpoint-every 100000 \
        --schedulers asha --fifo-result benchmarks/results/sweep27_fifo.json --out benchmarks/results/sweep27.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import SST2_TEST, SST2_TRAIN, command_line, start_ray, write_result


def sweep_job(name: str, out: Path, scheduler: str, trials: int, max_t: int, reduction_factor: int = 3,
              grace_period: int = 1, steps_per_eval: int = 12, checkpoint_every_steps: int | None = None) -> dict:
    return {
        "name": name,
        "model": {"path": "minilm"},
        "data": {
            "train": {"path": str(SST2_TRAIN), "text_column": "sentence", "limit": max_t * steps_per_eval * 16},
            "eval": [{"name": "sst2", "path": str(SST2_TEST), "text_column": "sentence", "limit": 300}],
            "max_length": 64,
            "label_names": ["negative", "positive"],
        },
        "training": {"epochs": 1, "batch_size_per_worker": 16, "warmup_ratio": 0.1, "eval_every_steps": steps_per_eval,
                     "checkpoint_every_steps": checkpoint_every_steps or steps_per_eval,
                     "log_every_steps": steps_per_eval, "lr": 5e-5},
        "unfreeze": {"kind": "gradual", "every_steps": 5, "lr_decay": 0.8},
        "deepspeed": {"stage": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": float(os.cpu_count() or 2)},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": False, "save_best": False},
        "tune": {
            "metric": "sst2/accuracy",
            "mode": "max",
            "search_space": {"training.lr": "loguniform(1e-5, 1e-3)", "unfreeze.kind": "choice([none, gradual])"},
            "num_samples": trials,
            "searcher": "random",
            "scheduler": scheduler,
            "asha": {"grace_period": grace_period, "reduction_factor": reduction_factor, "max_t": max_t},
            "seed": 0,
            "export_best": False,
        },
    }


def training_seconds(run_dir: str | None) -> float:
    """Time a trial spent in its training loop: first to last record of its metrics.jsonl."""
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return 0.0
    times = [json.loads(line)["time"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return max(times) - min(times) if times else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-t", type=int, default=9, help="evals per full trial (ASHA max_t)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA's reduction factor (Ray's default: 4)")
    parser.add_argument("--grace-period", type=int, default=1, help="ASHA's first rung, in evals")
    parser.add_argument("--steps-per-eval", type=int, default=12, help="training steps per eval (one ASHA time unit)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between checkpoints (default: every eval; ASHA and FIFO need none)")
    parser.add_argument("--schedulers", nargs="+", default=["asha", "none"], choices=["asha", "none"],
                        help="arms to run; FIFO's trial-steps are trials x max_t x steps-per-eval by construction")
    parser.add_argument("--fifo-result", type=Path, default=None,
                        help="this benchmark's JSON from an earlier FIFO-only run of the same draws (when only asha "
                             "runs): its arm is copied into --out, so one file holds both arms")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from orchestrator.config import config_from_dict
    from orchestrator.tune.sweep import run_sweep

    results, fifo_command = {}, None
    if args.fifo_result:
        earlier = json.loads(args.fifo_result.read_text())
        same = {k: earlier.get(k) for k in ("trials", "max_t", "steps_per_eval")}
        if "fifo" not in earlier or same != {"trials": args.trials, "max_t": args.max_t,
                                             "steps_per_eval": args.steps_per_eval}:
            parser.error(f"--fifo-result {args.fifo_result}: not a FIFO run of these draws ({same}); run it with the "
                         "same --trials, --max-t and --steps-per-eval and --schedulers none")
        results["fifo"], fifo_command = earlier["fifo"], earlier["command"]
    start_ray()
    with tempfile.TemporaryDirectory() as tmp:
        for scheduler in args.schedulers:
            name = f"bench-sweep-{scheduler}-{int(time.time())}"
            job = sweep_job(name, Path(tmp), scheduler, args.trials, args.max_t, args.reduction_factor,
                            args.grace_period, args.steps_per_eval, args.checkpoint_every)
            started = time.time()
            result = run_sweep(config_from_dict(job), verbose=False)
            wall = time.time() - started
            in_loops = sum(training_seconds(t.run_dir) for t in result.trials)
            results["fifo" if scheduler == "none" else scheduler] = {
                "trial_steps": sum(t.steps or 0 for t in result.trials),
                "best_metric": result.best.best_metric if result.best else None,
                "best_params": result.best.params if result.best else None,
                "statuses": [t.status for t in result.trials],
                "wall_s": wall,
                "training_loop_s": in_loops,
                "overhead_fraction": 1 - in_loops / wall,
                "trials": [{"id": t.trial_id, "params": t.params, "steps": t.steps, "best": t.best_metric,
                            "status": t.status, "curve": t.history} for t in result.trials],
            }
            print(scheduler, json.dumps(results[list(results)[-1]], default=str)[:600], flush=True)
    asha, fifo = results.get("asha"), results.get("fifo")
    fifo_steps = args.trials * args.max_t * args.steps_per_eval  # every FIFO trial runs to max_t evals
    fifo_best = fifo["best_metric"] if fifo else None
    import torch

    write_result(args.out, {
        **results,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPUs",
        "reduction_factor": args.reduction_factor, "grace_period": args.grace_period,
        "steps_per_eval": args.steps_per_eval,
        "trial_steps_asha_vs_fifo": asha["trial_steps"] / fifo_steps if asha else None,
        "best_metric_gap_points": 100 * (fifo_best - asha["best_metric"]) if asha and fifo_best is not None else None,
        "command": command_line(),
        **({"fifo_command": fifo_command} if fifo_command else {}),
        "trials": args.trials, "max_t": args.max_t,
    })


if __name__ == "__main__":
    main()
