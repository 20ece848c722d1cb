"""Orchestrator overhead vs a hand-written PyTorch loop, side by side in one run.

Measures steady-state training samples/s of MiniLM on SST-2 (same batch, max_length and data) for
  1. a plain PyTorch loop (AdamW, no Ray, no DeepSpeed) with all CPU threads, run before and again after (2)
     (ratios use the mean; their drift says how far the host moved during the run),
  1b. the same model and data through a DeepSpeed stage-0 engine in this process (the engine's own cost),
  2. `orchestrator train` with 1 worker (Ray Train + DeepSpeed stage 0) given all CPUs,
  3. the same with 2 workers x 1 CPU (ZeRO-2),
and reports the ratios plus the time to the first step of (2) and of `orchestrator train` in a fresh process, twice
(run first, on a quiet machine): starting its own Ray cluster, and connecting to a running `ray start --head`; each
with an empty DeepSpeed op cache, a breakdown, and when each Ray actor process of the run started. Steady state
excludes the first `--warmup` steps. Run on a quiet machine:

    .venv/bin/python benchmarks/overhead.py --steps 40 --out benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(os.environ.get("DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _model_and_tokenizer(threads: int, model_path: str) -> tuple[Any, Any, bool]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.models.loading import resolve_model_path

    torch.set_num_threads(threads)
    path = resolve_model_path(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return AutoTokenizer.from_pretrained(path), model, torch.cuda.is_available()


def _timed_samples_per_s(step: Callable[[Any, Any], None], tokenizer: Any, device: Any, steps: int, warmup: int,
                         batch: int, max_length: int) -> float:
    """Run `step(inputs, labels)` on consecutive SST-2 batches (tokenized each step, as a real loop does);
    samples/s over the steps after `warmup`."""
    import torch

    lines = (DATA / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines[: batch * (steps + 1)]]
    started = None
    for i in range(steps):
        if i == warmup:
            started = time.perf_counter()
        chunk = rows[i * batch : (i + 1) * batch]
        enc = tokenizer([r[0] for r in chunk], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        step(enc.to(device), torch.tensor([int(r[1]) for r in chunk], device=device))
    assert started is not None
    return (steps - warmup) * batch / (time.perf_counter() - started)


def plain_loop(steps: int, warmup: int, batch: int, max_length: int, threads: int, model_path: str) -> float:
    """The hand-written floor: torch's fused AdamW (GPU and CPU), bf16 autocast on GPU, fp32 on CPU."""
    import contextlib

    import torch

    tokenizer, model, gpu = _model_and_tokenizer(threads, model_path)
    device = torch.device("cuda" if gpu else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    def step(inputs: Any, labels: Any) -> None:
        with autocast:
            out = model(**inputs, labels=labels)
        out.loss.item()  # the per-step loss read that any real loop (and the orchestrator) does
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _timed_samples_per_s(step, tokenizer, device, steps, warmup, batch, max_length)


def deepspeed_loop(steps: int, warmup: int, batch: int, max_length: int, threads: int, model_path: str) -> float:
    """The plain loop's model and data through a DeepSpeed stage-0 engine, in this process (no Ray): separates
    the engine's own cost from Ray's (worker processes, controller, system processes sharing the CPUs)."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from orchestrator.train.engine import skip_unused_cpu_comm_op

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    tokenizer, model, gpu = _model_and_tokenizer(threads, model_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "train_batch_size": batch,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "bf16": {"enabled": gpu},
              "steps_per_print": 10**9, "zero_allow_untested_optimizer": True}
    skip_unused_cpu_comm_op(config, device_type="cuda" if gpu else "cpu")  # as the orchestrator does
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    engine.train()

    def step(inputs: Any, labels: Any) -> None:
        out = engine(**inputs, labels=labels)
        out.loss.item()
        engine.backward(out.loss)
        engine.step()

    return _timed_samples_per_s(step, tokenizer, engine.device, steps, warmup, batch, max_length)


def _job(name: str, out: Path, steps: int, batch: int, max_length: int, model_path: str, *, stage: int,
         scaling: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's orchestrator job: `steps` steps of `batch` SST-2 sentences split over the workers."""
    return {
        "name": name,
        "model": {"path": model_path},
        "data": {"train": {"path": str(DATA / "sst2" / "train.tsv"), "text_column": "sentence",
                           "limit": batch * (steps + 2)}, "max_length": max_length},
        "training": {"max_steps": steps, "batch_size_per_worker": batch // scaling["num_workers"],
                     "log_every_steps": 1, "lr": 5e-5},
        "deepspeed": {"stage": stage},
        "scaling": scaling,
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": False, "save_best": False},
    }


def orchestrated(steps: int, warmup: int, batch: int, max_length: int, workers: int, cpus: float, stage: int,
                 out: Path, model_path: str = "minilm") -> dict[str, float]:
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    name = f"bench-w{workers}-z{stage}-{int(time.time())}"
    job = _job(name, out, steps, batch, max_length, model_path, stage=stage,
               scaling={"num_workers": workers, "cpus_per_worker": cpus})
    launched = time.time()
    run_training(config_from_dict(job))
    records = read_metrics(out / name)
    train = [r for r in records if r["kind"] == "train"]
    start = next(r for r in records if r["kind"] == "start")
    steady = [r for r in train if r["step"] > warmup]
    seconds = steady[-1]["time"] - train[warmup - 1]["time"]
    first_step = train[0]["time"] - launched
    breakdown = {}
    if "setup/worker_entry" in start:  # where the time to the first step goes
        marks = [("ray_and_workers_start", launched, start["setup/worker_entry"]),
                 ("imports", start["setup/worker_entry"], start["setup/imports_done"]),
                 ("model_load", start["setup/imports_done"], start["setup/model_ready"]),
                 ("deepspeed_init", start["setup/model_ready"], start["setup/engine_ready"]),
                 ("first_step", start["setup/engine_ready"], train[0]["time"])]
        breakdown = {name: b - a for name, a, b in marks}
    return {
        "samples_per_s": len(steady) * batch / seconds,
        "time_to_first_step_s": first_step,
        "worker_setup_s": start["time"] - launched,
        "torch_threads": start.get("torch_threads"),
        "first_step_breakdown_s": breakdown,
    }


RAY_READY = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO .*(?:Started a local Ray instance|Connected to Ray cluster)", re.M
)
LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def ray_actor_starts(since: float) -> dict[str, float]:
    """Seconds after `since` at which each Ray actor process of the run started, read from the Ray session's logs
    (the worker's .out names its actor, its core-worker log's first line is stamped): Ray Train V2 starts a
    controller and helper actors, each a new Python process, around the training worker. Empty if the logs moved."""
    from ray._common.utils import get_default_ray_temp_dir

    logs = Path(os.environ.get("RAY_TMPDIR") or get_default_ray_temp_dir()) / "session_latest" / "logs"
    starts: dict[str, float] = {}
    for out in logs.glob("worker-*.out"):
        name = re.search(r":actor_name:(\w+)", out.read_text(errors="replace"))
        pid = out.stem.rsplit("-", 1)[-1]
        core = next(logs.glob(f"python-core-worker-*_{pid}.log"), None)
        stamp = LOG_STAMP.match(core.read_text(errors="replace")) if core is not None else None
        if name and stamp and _stamp(stamp.group(1)) >= since:
            starts[name.group(1)] = round(_stamp(stamp.group(1)) - since, 2)
    return dict(sorted(starts.items(), key=lambda item: item[1]))


def cli_first_step(out: Path, batch: int, max_length: int, model_path: str, *, running_cluster: bool,
                   cpus: int) -> dict[str, Any]:
    """Time to the first step of `orchestrator train job.yaml` run as a user runs it, in a fresh process, with a
    breakdown read from its log, the run's records and Ray's session logs. Either the CLI starts its own local Ray
    cluster (dashboard included), or it connects to one already running (`ray start --head`, started and stopped
    here) and so skips Ray's start."""
    import yaml

    from orchestrator.tracking import read_metrics

    name = f"bench-cli-{'running' if running_cluster else 'own'}-{int(time.time())}"
    job = _job(name, out, 2, batch, max_length, model_path, stage=0, scaling={"num_workers": 1})
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # An empty JIT-op cache, as on a fresh machine: any DeepSpeed op compiled on the way counts (none should be).
    extensions = out / f"{name}-torch_extensions"  # one per arm, so each starts empty
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    if running_cluster:
        subprocess.run([ray_cli, "start", "--head", "--num-cpus", str(cpus), "--dashboard-host", "127.0.0.1"],
                       env=env, capture_output=True, check=True)
        time.sleep(5)  # let the head settle, as a cluster started earlier would be
    try:
        launched = time.time()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(path)], env=env,
                              capture_output=True, text=True, check=False)
        actors = ray_actor_starts(launched)
    finally:
        if running_cluster:
            subprocess.run([ray_cli, "stop"], env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = read_metrics(out / name)
    start = next(r for r in records if r["kind"] == "start")
    first = next(r for r in records if r["kind"] == "train")["time"]
    found = RAY_READY.search(proc.stderr + proc.stdout)
    ray_ready = _stamp(found.group(1)) if found else float("nan")
    marks = [("cli_start_and_ray_start" if not running_cluster else "cli_start_and_ray_connect", launched, ray_ready),
             ("train_controller_and_worker_start", ray_ready, start["setup/worker_entry"]),
             ("imports", start["setup/worker_entry"], start["setup/imports_done"]),
             ("model_load", start["setup/imports_done"], start["setup/model_ready"]),
             ("deepspeed_init", start["setup/model_ready"], start["setup/engine_ready"]),
             ("first_step", start["setup/engine_ready"], first)]
    compiled = sorted(p.name for p in extensions.glob("*/*"))
    return {"time_to_first_step_s": first - launched, "breakdown_s": {n: b - a for n, a, b in marks},
            "ray_actor_process_starts_s": actors, "train_fn_entry_s": start["setup/worker_entry"] - launched,
            "deepspeed_ops_compiled": compiled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--model", default="minilm", help="model folder (default: MiniLM from the demo extra)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import ray
    import torch

    cpus = os.cpu_count() or 2
    if torch.cuda.is_available():
        cpus = min(cpus, 8)
    with tempfile.TemporaryDirectory() as tmp:  # first, while no Ray runs here: the CLI starts its own cluster
        cli = cli_first_step(Path(tmp), args.batch, args.max_length, args.model, running_cluster=False, cpus=cpus)
        cli_running = cli_first_step(Path(tmp), args.batch, args.max_length, args.model, running_cluster=True,
                                     cpus=cpus)
    ray.init(num_cpus=cpus + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        plain_before = plain_loop(args.steps, args.warmup, args.batch, args.max_length, threads=cpus,
                                  model_path=args.model)
        engine_only = deepspeed_loop(args.steps, args.warmup, args.batch, args.max_length, cpus, args.model)
        one = orchestrated(args.steps, args.warmup, args.batch, args.max_length, 1, float(cpus), 0, Path(tmp),
                           args.model)
        # The plain loop again: shared hosts drift by 10-30% between minutes (measured), so the ratios use the mean
        # of the runs before and after, and the drift is reported beside them.
        plain_after = plain_loop(args.steps, args.warmup, args.batch, args.max_length, threads=cpus,
                                 model_path=args.model)
        plain = (plain_before + plain_after) / 2
        # Two workers need two GPUs on a GPU machine (NCCL does not share one); on CPU they split the cores.
        two = None
        if torch.cuda.device_count() != 1:
            two = orchestrated(args.steps, args.warmup, args.batch, args.max_length, 2, 1.0, 2, Path(tmp),
                               args.model)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "plain_samples_per_s": plain,
        "plain_before_after": [plain_before, plain_after],
        "plain_drift": plain_after / plain_before,
        "deepspeed_in_process_samples_per_s": engine_only,
        "ratio_deepspeed_in_process_vs_plain": engine_only / plain,
        "orchestrator_1worker_z0": one,
        "orchestrator_2workers_z2": two,
        "cli_time_to_first_step": cli,
        "cli_time_to_first_step_running_cluster": cli_running,
        "ratio_1worker_vs_plain": one["samples_per_s"] / plain,
        "ratio_2workers_vs_plain": two["samples_per_s"] / plain if two else None,
        "cpus": cpus,
        "batch": args.batch,
        "max_length": args.max_length,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
