"""Training time lost per checkpoint when Ray Train uploads it to S3: ``CheckpointUploadMode.SYNC`` vs ``ASYNC``
(``output.checkpoint_upload``), against the moto S3 server on this machine.

One Ray Train worker runs a fixed CPU workload per step (matrix products, about ``--step-ms`` each) and every
``--every`` steps writes a checkpoint of ``--mb`` MB (a float32 tensor: a ~``mb/4`` M-parameter model's weights,
the size a checkpoint of that model's fp32 weights has) and reports it with the mode under test. The same run
without checkpoints is the baseline; the time lost per checkpoint is (run time - baseline) / checkpoints, the
local write included (both modes pay it: it is not the upload). The ratio is SYNC's loss over ASYNC's.

    python benchmarks/checkpoint_upload.py --mb 400 --steps 24 --every 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_fn(cfg: dict[str, Any]) -> float:
    """Steps of fixed work; a checkpoint every ``every`` steps; reports the loop's wall time."""
    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    weights = torch.randn(cfg["mb"] * 1024 * 1024 // 4) if cfg["every"] else None
    mode = CheckpointUploadMode[cfg["mode"]]
    work = cfg["work"]
    started = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        for _ in range(work):
            a = torch.tanh(a @ a * 1e-3)
        if cfg["every"] and step % cfg["every"] == 0:
            folder = tempfile.mkdtemp(prefix="bench-ckpt-")
            torch.save({"w": weights, "step": step}, os.path.join(folder, "weights.pt"))
            ray.train.report({"step": step, "loop_s": time.perf_counter() - started},
                             checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=True)
    return time.perf_counter() - started  # the loop's time; queued uploads finish after it (Ray waits for them)


def run(mode: str, *, bucket: str, mb: int, steps: int, every: int, work: int) -> float:
    """Seconds the training loop took (uploads still queued at the end are not training time, but are
    waited for by Ray before the run ends)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.cluster.output_paths import ray_storage

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"mode": mode, "mb": mb, "steps": steps, "every": every, "work": work},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-{mode}-{every}-{time.time_ns()}", **ray_storage(f"{bucket}/ckpt")),
    )
    result = trainer.fit()
    return float(result.return_value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=400, help="checkpoint size in MB (400: a ~100M-param fp32 model)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--work", type=int, default=40, help="512x512 matmuls per step")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "checkpoint_upload.json")
    args = parser.parse_args()

    import ray

    from tests.support.s3_server import start_s3_server

    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    server = start_s3_server(workdir)
    os.environ.update(server.env)
    try:
        bucket = "s3://" + server.create_bucket("bench")
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
        shape = {"bucket": bucket, "mb": args.mb, "steps": args.steps, "work": args.work}
        baseline = run("SYNC", every=0, **shape)
        times = {mode: run(mode, every=args.every, **shape) for mode in ("SYNC", "ASYNC")}
        checkpoints = args.steps // args.every
        lost = {mode: (t - baseline) / checkpoints for mode, t in times.items()}
        ratio = lost["SYNC"] / lost["ASYNC"] if lost["ASYNC"] > 0 else float("inf")
        report = {
            "checkpoint_mb": args.mb, "steps": args.steps, "checkpoint_every": args.every, "checkpoints": checkpoints,
            "baseline_loop_s": round(baseline, 2), "loop_s": {m: round(t, 2) for m, t in times.items()},
            "lost_per_checkpoint_s": {m: round(v, 2) for m, v in lost.items()},
            "sync_over_async": round(ratio, 2),
            "machine": f"{os.cpu_count()} CPU cores, moto S3 server on 127.0.0.1",
        }
        print(json.dumps(report, indent=2))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
