"""Per-rank memory of models bigger than one worker, as ratios that do not depend on the model's size.

A Llama-style model of about 1B parameters with random weights is built from a config (never whole in fp32:
created on the meta device, materialised in bf16, saved as bf16 safetensors shards). Then, side by side, 2 CPU
workers train it for a few steps and export it, each worker's resident memory read from /proc (VmRSS sampled,
VmHWM at the end) by a thread of this process:

* LoRA under ZeRO-3: the model built partitioned and the checkpoint streamed in tensor by tensor;
* LoRA under ZeRO-2, for comparison: every rank holds the whole model;
* full fine-tuning of a ~0.3B model under ZeRO-3, against the ZeRO paper's model states plus one gathered block;
* the same jobs on a tiny model: the baseline (Ray worker, torch, DeepSpeed, the data) subtracted from each.

Ratios: (peak RSS - the tiny job's peak) / the model's fp32 bytes, per rank (goal for LoRA under ZeRO-3 with
N = 2: <= 1/N + 0.1 = 0.6; a whole copy per rank gives >= 1), and rank 0's growth while exporting (from the
export's start to its end, from the run's ``export`` record) / (one shard + one block).

    .venv/bin/python benchmarks/zero3_memory.py --out benchmarks/results/zero3_memory.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import DATA, ROOT, command_line, write_result


def build_llama(destination: Path, *, hidden: int, layers: int, intermediate: int, seed: int = 0) -> int:
    """A random Llama-style causal LM saved as bf16 safetensors shards (MiniLM's tokenizer); returns its
    parameter count. Built on the meta device and materialised in bf16, so it never takes 4 bytes a parameter."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from orchestrator.models.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False, dtype="bfloat16")
    if (destination / "config.json").is_file():
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # meta parameters in bf16, so to_empty allocates 2 bytes a parameter
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    model.save_pretrained(destination, max_shard_size="1GB")
    tokenizer.save_pretrained(destination)
    return sum(p.numel() for p in model.parameters())


class ProcMemory:
    """Samples VmRSS of the given processes (and keeps VmHWM, the kernel's own peak) every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self.hwm: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _workers() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    @staticmethod
    def _status_mb(pid: int) -> dict[str, float]:
        values = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._workers():
                try:
                    status = self._status_mb(pid)
                except OSError:
                    continue
                self.samples.setdefault(pid, []).append((time.time(), status.get("VmRSS", 0.0)))
                self.hwm[pid] = max(self.hwm.get(pid, 0.0), status.get("VmHWM", 0.0))
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, pid: int, start: float = 0.0, end: float = float("inf")) -> float:
        inside = [rss for t, rss in self.samples.get(pid, []) if start <= t <= end]
        return max(inside, default=0.0)

    def at(self, pid: int, when: float) -> float:
        before = [rss for t, rss in self.samples.get(pid, []) if t <= when]
        return before[-1] if before else 0.0


def causal_job(name: str, model: Path, out: Path, *, method: str, stage: int, steps: int,
               shard: str) -> dict[str, Any]:
    job: dict[str, Any] = {
        "name": name,
        "model": {"path": str(model), "task": "causal-lm"},
        "method": method,
        "data": {"train": {"path": str(DATA / "sst2" / "train.tsv"), "text_column": "sentence", "limit": 64},
                 "max_length": 32},
        "training": {"max_steps": steps, "batch_size_per_worker": 1, "log_every_steps": 1, "lr": 1e-4,
                     "checkpoint_every_steps": 10**6},
        "deepspeed": {"stage": stage, "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
                      if stage == 3 else {}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1.0},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(out), "save_final": True, "save_best": False, "registry": None,
                   "max_shard_size": shard},
    }
    if method == "lora":
        job["lora"] = {"r": 8, "merge_on_export": True}
    return job


def run(job: dict[str, Any], memory: ProcMemory) -> dict[str, Any]:
    """Train and export; per rank: peak RSS over the run, and rank 0's growth while exporting."""
    import ray

    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    if not ray.is_initialized():
        # With the dashboard: Ray Train's placement-group cleaner asks the state API whether the controller lives.
        ray.init(num_cpus=(os.cpu_count() or 2) + 1, include_dashboard=None, log_to_driver=False)
    started = time.time()
    result = run_training(config_from_dict(job))
    ended = time.time()
    records = read_metrics(result.run_dir)
    start = next(r for r in records if r["kind"] == "start")
    export = next(r for r in records if r["kind"] == "export" and r["export/name"] == "final")
    pids = start["worker_pids"]
    shards = sorted((result.final_model or Path()).glob("*.safetensors"))
    return {
        "name": job["name"],
        "params_total": start["params_total"],
        "peak_rss_mb": [memory.peak(pid, started, ended) for pid in pids],
        # Split at the start record (written once the engine is built) and at the export's start.
        "peak_load_mb": [memory.peak(pid, started, start["time"]) for pid in pids],
        "peak_train_mb": [memory.peak(pid, start["time"], export["export/started"]) for pid in pids],
        "vm_hwm_mb": [memory.hwm.get(pid, 0.0) for pid in pids],
        "rank0_at_export_start_mb": memory.at(pids[0], export["export/started"]),
        "rank0_export_peak_mb": memory.peak(pids[0], export["export/started"], export["time"]),
        "export_seconds": export["export/seconds"],
        "export_shards": [s.stat().st_size / 2**20 for s in shards],
        "seconds": ended - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "benchmarks" / "results" / "models")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shard", default="1GB", help="output.max_shard_size of the exports")
    parser.add_argument("--skip-zero2", action="store_true", help="leave out the whole-copy comparison")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from tests.support.tiny_models import make_tiny_model

    big, mid = args.models / "llama-1b-bf16", args.models / "llama-0.3b-bf16"
    psi_big = build_llama(big, hidden=2048, layers=16, intermediate=5632)
    psi_mid = build_llama(mid, hidden=1024, layers=16, intermediate=2816)
    import ray

    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, ProcMemory() as memory:
        tiny = make_tiny_model(Path(tmp) / "tiny-llama", "llama")
        stamp = int(time.time())
        arms = [("tiny_lora_z3", tiny, "lora", 3), ("lora_z3", big, "lora", 3), ("tiny_full_z3", tiny, "full", 3),
                ("full_z3_0.3b", mid, "full", 3)]
        if not args.skip_zero2:
            arms.append(("lora_z2", big, "lora", 2))
        for key, model, method, stage in arms:
            job = causal_job(f"z3mem-{key}-{stamp}", model, Path(tmp), method=method, stage=stage, steps=args.steps,
                             shard=args.shard)
            runs[key] = run(job, memory)
            ray.shutdown()  # a fresh cluster per arm: nothing of one arm's run lingers into the next
            print(key, runs[key], flush=True)
    summary = summarize(runs, psi_big=psi_big, psi_mid=psi_mid, shard_bytes=_size(args.shard))
    write_result(args.out, {"command": command_line(), "runs": runs, "summary": summary,
                            "cpus": os.cpu_count()})
    print(summary)


def _size(text: str) -> int:
    from orchestrator.config.sections import parse_size

    return parse_size(text)


def summarize(runs: dict[str, Any], *, psi_big: int, psi_mid: int, shard_bytes: int) -> dict[str, Any]:
    """The ratios the README reports."""
    mb = 2**20
    fp32_big, fp32_mid = 4 * psi_big / mb, 4 * psi_mid / mb
    block_big = fp32_big / 16  # one of 16 blocks (embeddings and head aside), fp32
    out: dict[str, Any] = {"params_1b": psi_big, "params_0.3b": psi_mid}
    for key, tiny_key, fp32 in (("lora_z3", "tiny_lora_z3", fp32_big), ("lora_z2", "tiny_lora_z3", fp32_big),
                                ("full_z3_0.3b", "tiny_full_z3", fp32_mid)):
        if key in runs:
            base = runs[tiny_key]["peak_rss_mb"]
            out[f"{key}_ratio_per_rank"] = [(p - b) / fp32 for p, b in zip(runs[key]["peak_rss_mb"], base)]
            for phase in ("load", "train"):
                out[f"{key}_{phase}_ratio_per_rank"] = [
                    (p - b) / fp32 for p, b in zip(runs[key][f"peak_{phase}_mb"], runs[tiny_key][f"peak_{phase}_mb"])]
    # ZeRO paper, fp32 on CPU as DeepSpeed runs it: 4Ψ/N weights + 16Ψ/N gradients, moments and fp32 partition.
    out["full_z3_paper_model_states_mb"] = 20 * psi_mid / 2 / mb
    out["full_z3_paper_plus_block_mb"] = out["full_z3_paper_model_states_mb"] + fp32_mid / 16
    lora = runs["lora_z3"]
    growth = lora["rank0_export_peak_mb"] - lora["rank0_at_export_start_mb"]
    out["lora_z3_export_growth_mb"] = growth
    out["lora_z3_export_vs_shard_plus_block"] = growth / (shard_bytes / mb + block_big)
    return out


if __name__ == "__main__":
    main()
