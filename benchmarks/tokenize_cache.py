"""Tokenize once (orchestrator.data.token_cache): the parallel cache build against the training it feeds, the second
run's data preparation, and the build's memory against the file's size.

Data and model: configs/sft_chat.yaml's: AG News as chat rows (scripts/make_chat_data.py), rendered with its
ChatML template, max_length 128, and its 4-block, 256-wide Llama (random weights, MiniLM's tokenizer).

- build: rows/s and example tokens/s of ``TokenCache.open`` on a cold cache, ``num_proc`` = this machine's CPUs.
- training: real tokens/s of that Llama on the cached examples, one process with as many torch threads as CPUs,
  batch 32 (the config's 2 workers x 16), dynamic padding, AdamW: the proxy for "2 CPU workers" (the same CPUs and
  global batch, without DeepSpeed's gradient all-reduce, so it is faster than the 2-worker job: a conservative
  ratio).
- second run: ``open_token_cache`` (make the encoder, key, memory-map) on the built cache, as % of the first run's.
  Each run is a fresh process (``datasets`` imported inside the timing, as on a worker).
- memory: the build's peak RSS (the main process and the largest encoding process) for jsonl and parquet files of
  1x and 4x the rows: flat in the rows means a file larger than memory builds in the same memory.

    .venv/bin/python benchmarks/tokenize_cache.py --out benchmarks/results/tokenize_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, ROOT, command_line, write_result

sys.path.insert(0, str(ROOT / "scripts"))
CONFIG = ROOT / "configs" / "sft_chat.yaml"

# One measured build in a fresh process: prints JSON (seconds, rows, tokens, peak RSS of itself and its children).
_BUILD = r"""
import json, resource, sys, time
from orchestrator.config import load_config
from orchestrator.data.sources import prepare_data
from orchestrator.data.token_cache import open_token_cache
from orchestrator.models.loading import load_tokenizer
path, model, cache, fmt = sys.argv[1:5]
job = load_config(sys.argv[5])
data = job.data.model_copy(update={"train": job.data.train.model_copy(update={"path": path}), "eval": []})
scanned = prepare_data(data, "causal-lm").train
tokenizer = load_tokenizer(model)
started = time.perf_counter()
c = open_token_cache(data.train, scanned, data, tokenizer, task="causal-lm", builder=True, cache_dir=cache)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rows": len(c), "tokens": int(c.lengths.sum()), "built": c.info.built,
                  "processes": c.info.processes,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def build(path: Path, model: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _BUILD, str(path), str(model), str(cache), "jsonl", str(CONFIG)],
                         capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat_files(folder: Path, rows: int) -> dict[str, Path]:
    """AG News chat rows: ``rows`` of them (the train file repeated as needed), as jsonl and parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from make_chat_data import convert

    base = folder / "agnews-chat.jsonl"
    if not base.exists():
        convert(DATA / "agnews" / "train.tsv", base)
    lines = base.read_text(encoding="utf-8").splitlines(keepends=True)
    chosen = (lines * (rows // len(lines) + 1))[:rows]
    jsonl = folder / f"chat-{rows}.jsonl"
    jsonl.write_text("".join(chosen), encoding="utf-8")
    table = pa.Table.from_pylist([json.loads(line) for line in chosen])
    parquet = folder / f"chat-{rows}.parquet"
    pq.write_table(table, parquet, row_group_size=10_000)
    return {"jsonl": jsonl, "parquet": parquet}


def training_tokens_per_s(model_dir: Path, cache_folder: Path, steps: int) -> float:
    """Real tokens/s of the chat Llama on cached examples (see the module docstring)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.data.batching import PaddingCollator
    from orchestrator.data.token_cache import TokenCache

    torch.set_num_threads(os.cpu_count() or 2)
    cache = TokenCache(None, cache_folder, info=_info())  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    collate = PaddingCollator(0, task="causal-lm")
    order = np.random.default_rng(0).permutation(len(cache))
    tokens, elapsed = 0, 0.0
    for step in range(steps + 2):
        batch = collate(cache.get_many(order[step * 32 : (step + 1) * 32]))
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # the first steps warm up allocators and kernels
            elapsed += time.perf_counter() - started
            tokens += batch.real_tokens
    return tokens / elapsed


def _info():  # noqa: ANN202 - the cache object only needs a BuildInfo to exist
    from orchestrator.data.token_cache import BuildInfo

    return BuildInfo(built=False, seconds=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30_000, help="rows of the 1x file (the 4x file has 4 times)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from make_chat_data import build_chat_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_chat_model(folder / "chat-llama")
        runs: dict[str, dict] = {}
        for scale in (1, 4):
            files = chat_files(folder, args.rows * scale)
            for fmt, path in files.items():
                runs[f"{fmt}_{scale}x"] = build(path, model, folder / f"cache-{fmt}-{scale}")
                print(fmt, f"{scale}x", runs[f"{fmt}_{scale}x"], flush=True)
        first = runs["jsonl_4x"]
        second = build(folder / f"chat-{args.rows * 4}.jsonl", model, folder / "cache-jsonl-4")
        assert not second["built"], "the second run built the cache again"
        caches = sorted((folder / "cache-jsonl-4" / "tokens").glob("chat-*"))
        train = training_tokens_per_s(model, caches[0], args.steps)
    build_tokens = first["tokens"] / first["seconds"]
    result = {
        "cpus": os.cpu_count(),
        "build_rows": first["rows"],
        "build_processes": first["processes"],
        "build_rows_per_s": first["rows"] / first["seconds"],
        "build_tokens_per_s": build_tokens,
        "train_tokens_per_s": train,
        "build_vs_train_tokens": build_tokens / train,
        "first_prep_s": first["seconds"],
        "second_prep_s": second["seconds"],
        "second_vs_first_pct": 100 * second["seconds"] / first["seconds"],
        "peak_rss_mb": {k: {"main": v["rss_mb"], "encoder_process": v["child_rss_mb"], "rows": v["rows"]}
                        for k, v in runs.items()},
        "command": command_line(),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
