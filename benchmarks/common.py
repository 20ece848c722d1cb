"""Shared helpers for the benchmarks: run one orchestrator job in this process's Ray cluster and read
its metrics back. Benchmarks are scripts, not tests: each prints its command, writes a JSON result
(`--out`), and `benchmarks/run_all.py` turns the JSON files into the README's Markdown table."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("DATA_DIR", ROOT.parent / "shared" / "data"))
SST2_TRAIN = DATA / "sst2" / "train.tsv"
SST2_TEST = DATA / "sst2" / "test.tsv"


def command_line() -> str:
    """The command that ran this benchmark, as the README shows it (relative to the repo root)."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])


def start_ray(extra_cpus: int = 1) -> None:
    """A local Ray cluster sized to this machine (one logical CPU more, for drivers that reserve one)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=(os.cpu_count() or 2) + extra_cpus, include_dashboard=False, log_to_driver=False)


def sst2_job(name: str, out: Path, *, limit: int, steps: int | None = None, epochs: float | None = None,
             batch: int = 32, workers: int = 1, stage: int = 0, lr: float = 1e-4, seed: int = 0,
             evaluate: bool = True, max_length: int = 64, **sections: Any) -> dict[str, Any]:
    """A MiniLM/SST-2 job: the first `limit` training sentences, scored on sst2/test.tsv at the end."""
    cpus = float(os.cpu_count() or 2) / workers
    training: dict[str, Any] = {"batch_size_per_worker": batch // workers, "log_every_steps": 1, "lr": lr,
                                "seed": seed, "warmup_ratio": 0.1, "eval_batch_size": 64}
    if steps is not None:
        training["max_steps"] = steps
    if epochs is not None:
        training["epochs"] = epochs
    training.update(sections.pop("training", {}))
    job: dict[str, Any] = {
        "name": name,
        "model": {"path": "minilm"},
        "data": {
            "train": {"path": str(SST2_TRAIN), "text_column": "sentence", "limit": limit},
            "eval": [{"name": "sst2_test", "path": str(SST2_TEST), "text_column": "sentence"}] if evaluate else [],
            "max_length": max_length,
            "label_names": ["negative", "positive"],
        },
        "training": training,
        "deepspeed": {"stage": stage},
        "scaling": {"num_workers": workers, "cpus_per_worker": cpus},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": False, "save_best": False},
    }
    for key, value in sections.items():
        job[key] = value
    return job


def run_job(job: dict[str, Any], *, warmup: int = 5) -> dict[str, Any]:
    """Train `job`; returns steady-state samples/s (after `warmup` steps), the last eval, peak memory
    and parameter counts read from the run's metrics.jsonl."""
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    config = config_from_dict(job)
    for attempt in range(3):  # this machine is shared: another session's `ray stop` can take the cluster down
        start_ray()
        launched = time.time()
        try:
            result = run_training(config)
            break
        except Exception as exc:
            if attempt == 2:
                raise
            import ray

            print(f"retrying {job['name']} after: {str(exc)[:200]}", flush=True)
            ray.shutdown()
            config = config_from_dict({**job, "name": f"{job['name']}-retry{attempt + 1}"})
    wall = time.time() - launched
    records = read_metrics(result.run_dir)
    start = next(r for r in records if r["kind"] == "start")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    batch = job["training"]["batch_size_per_worker"] * job["scaling"]["num_workers"]
    batch *= job["training"].get("grad_accumulation", 1)
    steady = [r for r in train if r["step"] > warmup]
    summary: dict[str, Any] = {
        "wall_s": wall,
        "time_to_first_step_s": train[0]["time"] - launched if train else None,
        "steps": train[-1]["step"] if train else 0,
        "params_total": start.get("params_total"),
        "params_trainable": start.get("params_trainable"),
        "peak_rss_mb": max((r.get("memory/peak_rss_mb", 0.0) for r in train), default=None),
        "resident_tensors_mb": next((r["memory/resident_tensors_mb"] for r in train
                                     if "memory/resident_tensors_mb" in r), None),
        "rss_before_model_mb": start.get("memory/rss_before_model_mb"),
        "run_dir": str(result.run_dir),
    }
    before = [r for r in train if r["step"] <= warmup]
    if steady and before:  # the last record at or before `warmup` (a job may log only every N steps)
        steps = steady[-1]["step"] - before[-1]["step"]
        seconds = steady[-1]["time"] - before[-1]["time"]
        summary["samples_per_s"] = steps * batch / seconds
        summary["step_s"] = seconds / steps
    if evals:
        summary["eval"] = {k: v for k, v in evals[-1].items() if "/" in k}
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
