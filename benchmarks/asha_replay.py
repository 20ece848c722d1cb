"""Replay Ray Tune's ASHA scheduler over the learning curves of a FIFO sweep: how many trial-steps ASHA with
another reduction factor or grace period would use, and which trial it would keep, without training again.

Valid because trials are deterministic (same config and seed → the same curve; the resume tests show it bit for
bit) and the benchmark runs one trial at a time, so ASHA sees results in trial order. The replay drives Ray's own
`ASHAScheduler` (no re-implementation); `--check` replays the settings of the measured ASHA arm and must reproduce
its trial-steps before any other setting is trusted.

    python benchmarks/asha_replay.py benchmarks/results/sweep.json --reduction-factor 4 --check
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def replay(curves: list[list[float]], *, reduction_factor: int, grace_period: int, max_t: int,
           steps_per_eval: int) -> dict[str, Any]:
    """Feed each curve (the metric at eval 1, 2, ...) to a fresh ASHAScheduler in trial order."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", metric="acc", mode="max", max_t=max_t,
                              grace_period=grace_period, reduction_factor=reduction_factor)
    used, kept = [], []
    for i, curve in enumerate(curves):
        trial = SimpleNamespace(trial_id=f"t{i}")
        scheduler.on_trial_add(None, trial)
        evals, stopped = 0, False
        for evals, value in enumerate(curve[:max_t], start=1):
            if scheduler.on_trial_result(None, trial, {"training_iteration": evals, "acc": value}) == \
                    TrialScheduler.STOP:
                stopped = True
                break
        if not stopped and evals < max_t:
            raise SystemExit(f"trial {i}: its curve ends after {evals} evals but ASHA would run it further")
        used.append(evals * steps_per_eval)
        kept.append(max(curve[:evals]))
    best = max(range(len(curves)), key=lambda i: kept[i])
    return {"trial_steps": sum(used), "per_trial_steps": used, "best_metric": kept[best], "best_trial": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path, help="benchmarks/sweep.py's JSON (its fifo arm holds every curve)")
    parser.add_argument("--reduction-factor", type=int, default=4)
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="first reproduce the measured ASHA arm")
    parser.add_argument("--grid", action="store_true", help="replay reduction factors 2-4 x grace periods 1-4")
    parser.add_argument("--stand-in", action="append", default=[], metavar="I=J",
                        help="use trial J's curve for trial I (a curve that was not recorded in full)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    data = json.loads(args.result.read_text())
    max_t, steps_per_eval = data["max_t"], data.get("steps_per_eval", 12)
    curves = [[value for _, value in t["curve"]] for t in data["fifo"]["trials"]]
    for pair in args.stand_in:
        missing, twin = (int(x) for x in pair.split("="))
        curves[missing] = list(curves[twin])
    result: dict[str, Any] = {"fifo_trial_steps": len(curves) * max_t * steps_per_eval,
                              "fifo_best": max(t["best"] for t in data["fifo"]["trials"])}
    if args.check:
        measured = data["asha"]
        again = replay(curves, reduction_factor=data.get("reduction_factor", 3),
                       grace_period=data.get("grace_period", 1), max_t=max_t,
                       steps_per_eval=steps_per_eval)
        result["check"] = {"replayed_trial_steps": again["trial_steps"],
                           "measured_trial_steps": measured["trial_steps"],
                           "replayed_best": again["best_metric"], "measured_best": measured["best_metric"]}
        if again["trial_steps"] != measured["trial_steps"]:
            print(json.dumps(result, indent=2))
            raise SystemExit("the replay does not reproduce the measured ASHA arm; its other figures are not valid")

    def scored(reduction_factor: int, grace_period: int) -> dict[str, Any]:
        r = replay(curves, reduction_factor=reduction_factor, grace_period=grace_period, max_t=max_t,
                   steps_per_eval=steps_per_eval)
        return r | {"vs_fifo": r["trial_steps"] / result["fifo_trial_steps"],
                    "gap_points": 100 * (result["fifo_best"] - r["best_metric"])}

    if args.grid:
        result["grid"] = [
            {"reduction_factor": factor, "grace_period": grace}
            | {k: v for k, v in scored(factor, grace).items() if k in ("vs_fifo", "gap_points")}
            for factor in (2, 3, 4) for grace in (1, 2, 3, 4)
        ]
    result["replay"] = scored(args.reduction_factor, args.grace_period)
    result["settings"] = {"reduction_factor": args.reduction_factor, "grace_period": args.grace_period, "max_t": max_t}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
