"""Continual retraining on real data: the forgetting matrix with replay on and off (MiniLM).

Three rounds per arm, each a real `orchestrator retrain` round (new files found by hash in a watched folder,
warm start from the champion, replay, eval on every set seen so far, gate):
  round 1: 1,600 SST-2 sentences; round 2: the next 1,600; round 3: 1,600 AG News headlines
  (a new label space: the head grows from 2 to 6 labels, old rows kept; every eval set is scored over its own
  labels). Eval sets: 600 sentences of sst2/test.tsv (the base job's), plus a 10% holdout of each round's new file.
Rounds 1-2 run once (replay 0.3); the AG News round then runs twice from the same champion: replay 0.3 of all
earlier rows, and no replay (in a copy of the runs and registry). 1 worker, ZeRO stage 0, lr 1e-4, 1 epoch per round.

    .venv/bin/python benchmarks/forgetting.py --out benchmarks/results/forgetting.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from common import DATA, SST2_TEST, SST2_TRAIN, start_ray, write_result


def write_shards(folder: Path, per_round: int) -> list[Path]:
    sst = SST2_TRAIN.read_text().splitlines()
    header, rows = sst[0], sst[1:]
    names = {"0": "negative", "1": "positive"}
    shards = []
    for i in range(2):
        chunk = rows[i * per_round : (i + 1) * per_round]
        path = folder / f"round{i + 1}-sst2.tsv"
        path.write_text("\n".join([header] + [f"{r.rsplit(chr(9), 1)[0]}\t{names[r.rsplit(chr(9), 1)[1]]}"
                                              for r in chunk]) + "\n")
        shards.append(path)
    ag = (DATA / "agnews" / "train.tsv").read_text().splitlines()[:per_round]
    path = folder / "round3-agnews.tsv"
    path.write_text("\n".join([header] + [line.replace("\n", " ") for line in ag]) + "\n")
    shards.append(path)
    return shards


def arm_spec(root: Path, replay: float, first_train: Path, stamp: int):
    """A retrain spec whose base job, runs, registry and watched folder live under `root`."""
    from orchestrator.config.retrain import retrain_from_dict

    watch = root / "incoming"
    watch.mkdir(parents=True, exist_ok=True)
    job = {
        "name": f"forget-{stamp}",
        "model": {"path": "minilm"},
        "data": {
            "train": {"path": str(first_train), "text_column": "sentence", "label_column": "label"},
            "eval": [{"name": "sst2_test", "path": str(SST2_TEST), "text_column": "sentence", "limit": 600}],
            "max_length": 64,
            "label_names": ["negative", "positive"],
        },
        "training": {"epochs": 1, "lr": 1e-4, "batch_size_per_worker": 32, "log_every_steps": 10, "seed": 0},
        "deepspeed": {"stage": 0},
        "scaling": {"num_workers": 1},
        "tracking": {"wandb": {"mode": "disabled"}},
        "output": {"dir": str(root / "runs"), "save_best": False},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    spec = {
        "job": "job.yaml",
        "watch": {"dir": str(watch), "glob": "*.tsv", "settle_s": 0},
        "replay": {"fraction": replay, "seed": 0},
        "eval": {"holdout_fraction": 0.1, "holdout_max": 500},
        "gate": {"metric": "accuracy", "min_new": 0.5, "max_forgetting": 0.02, "floor": 0.5},
    }
    return retrain_from_dict(spec, base_dir=root, source="forgetting benchmark"), watch


def one_round(loaded, watch: Path, shard: Path) -> dict:
    from orchestrator.lifecycle.rounds import run_round

    shutil.copy(shard, watch / shard.name)
    started = time.time()
    result = run_round(loaded)
    record = {"round": result.round, "file": shard.name, "decision": result.decision, "reason": result.reason,
              "scores": result.scores, "forgetting": result.forgetting, "wall_s": time.time() - started}
    print(record, flush=True)
    return record


def matrix(rounds: list[dict]) -> str:
    sets = sorted({k for r in rounds for k in r["scores"]})
    lines = ["| round | " + " | ".join(sets) + " | decision |", "|---" * (len(sets) + 2) + "|"]
    for r in rounds:
        cells = [f"{r['scores'][k]:.4f}" if k in r["scores"] else "" for k in sets]
        lines.append(f"| {r['round']} ({r['file']}) | " + " | ".join(cells) + f" | {r['decision']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-round", type=int, default=1600)
    parser.add_argument("--replay", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start_ray()
    stamp = int(time.time())
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds 1 and 2 (SST-2) once, with replay; then the AG News round twice from the same champion: with
        # replay, and in a copy of everything (runs, registry, watched folder) without it.
        shards = write_shards(Path(tmp), args.per_round)
        root = Path(tmp) / "with-replay"
        loaded, watch = arm_spec(root, args.replay, shards[0], stamp)
        shared = [one_round(loaded, watch, shard) for shard in shards[:2]]
        copy = Path(tmp) / "without-replay"
        shutil.copytree(root, copy)
        job = yaml.safe_load((copy / "job.yaml").read_text())
        job["output"]["dir"] = str(copy / "runs")
        (copy / "job.yaml").write_text(yaml.safe_dump(job))
        arms[f"replay_{args.replay}"] = shared + [one_round(loaded, watch, shards[2])]
        loaded_off, watch_off = arm_spec(copy, 0.0, shards[0], stamp)
        arms["replay_0.0"] = shared + [one_round(loaded_off, watch_off, shards[2])]
    summary = []
    for name, rounds in arms.items():
        sst = [r["scores"].get("sst2_test") for r in rounds]  # round scores are keyed by eval set (gate metric)
        drop = None if None in sst[-2:] else 100 * (sst[-2] - sst[-1])
        summary.append(f"{name}: SST-2 test {' → '.join(f'{x:.4f}' for x in sst if x is not None)}"
                       + (f" (AG News round: {drop:+.2f} points lost)" if drop is not None else ""))
    write_result(args.out, {
        "arms": arms,
        "matrices": {name: matrix(rounds) for name, rounds in arms.items()},
        "summary": "; ".join(summary),
        "command": "python benchmarks/forgetting.py --out benchmarks/results/forgetting.json",
    })


if __name__ == "__main__":
    main()
