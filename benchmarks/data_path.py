"""Data path alone: the driver's scan of SST-2 train (67k rows → byte-offset index) and a worker's loader
(examples read from the token cache by index + padded to tensors, batch 32, max_length 64, shuffled order, one
process, one thread; the cache is built first, timed apart: benchmarks/tokenize_cache.py measures that build),
as samples/s, next to the training rate it must feed (`--train-samples-per-s`, e.g. from
benchmarks/overhead.py). Goal: loader ≥ 10× training.

    .venv/bin/python benchmarks/data_path.py --out benchmarks/results/data_path.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import SST2_TRAIN, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-samples-per-s", type=float, default=31.5,
                        help="the training rate to compare with (plain loop, 2 CPUs, from overhead.py)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="token cache root (default ORCHESTRATOR_CACHE)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from orchestrator.config import DataConfig
    from orchestrator.data.batching import PaddingCollator, pad_token_id
    from orchestrator.data.readers import train_batch_indices
    from orchestrator.data.sources import prepare_data
    from orchestrator.data.token_cache import open_token_cache
    from orchestrator.models.loading import load_tokenizer, resolve_model_path

    data_config = DataConfig.model_validate({"train": {"path": str(SST2_TRAIN), "text_column": "sentence"},
                                             "max_length": 64, "label_names": ["negative", "positive"]})
    started = time.perf_counter()
    data = prepare_data(data_config, "sequence-classification")
    scan_s = time.perf_counter() - started
    tokenizer = load_tokenizer(resolve_model_path("minilm"))
    collator = PaddingCollator(pad_token_id(tokenizer), task="sequence-classification")
    started = time.perf_counter()
    reader = open_token_cache(data_config.train, data.train, data_config, tokenizer, task="sequence-classification",
                              builder=True, cache_dir=args.cache_dir)
    tokenize_s = time.perf_counter() - started
    batches = train_batch_indices(len(data.train), epoch=0, seed=0, shuffle=True, rank=0, world_size=1,
                                  batch_size=args.batch)[: args.batches]
    started = time.perf_counter()
    for indices in batches:
        collator([reader.get(int(i)) for i in indices])
    loader = len(batches) * args.batch / (time.perf_counter() - started)
    reader.close()
    write_result(args.out, {
        "rows": len(data.train),
        "scan_s": scan_s,
        "scan_rows_per_s": len(data.train) / scan_s,
        "tokenize_s": tokenize_s,  # the cache build (only opening it when it already existed)
        "loader_samples_per_s": loader,
        "train_samples_per_s": args.train_samples_per_s,
        "loader_vs_train": loader / args.train_samples_per_s,
        "command": "python benchmarks/data_path.py --out benchmarks/results/data_path.json",
    })


if __name__ == "__main__":
    main()
