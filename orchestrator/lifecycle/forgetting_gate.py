"""Forgetting and the promotion gate of a continual-retraining round.

:func:`compute_forgetting` is the best earlier score − new score per old eval set (positive: the new model
forgot); :func:`gate_decision` makes the candidate champion or rejects it, with a reason naming every check and
its numbers. :func:`gate_for` reads the gate's thresholds from a retrain file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.config.retrain import LoadedRetrain
from orchestrator.lifecycle.registry_records import ModelRecord


def score_history(chain: Sequence[ModelRecord], metric: str) -> dict[str, list[float]]:
    """``{eval set: [score of each earlier model that was scored on it]}`` from registry records."""
    history: dict[str, list[float]] = {}
    for record in chain:
        for eval_set, values in record.eval_metrics.items():
            if metric in values and values[metric] is not None and math.isfinite(values[metric]):
                history.setdefault(eval_set, []).append(float(values[metric]))
    return history


def compute_forgetting(history: dict[str, list[float]], new_scores: dict[str, float], mode: str) -> dict[str, float]:
    """Per earlier eval set: best earlier score − new score (max mode) or new − best earlier (min mode).
    Positive means the new model forgot; eval sets without an earlier score are left out."""
    out = {}
    for name, earlier in history.items():
        if not earlier or name not in new_scores:
            continue
        if mode == "max":
            out[name] = max(earlier) - new_scores[name]
        else:
            out[name] = new_scores[name] - min(earlier)
    return out


@dataclass(frozen=True)
class Gate:
    """The gate's thresholds (see :class:`orchestrator.config.retrain.GateSection`), 'auto' decided."""

    metric: str
    mode: str
    min_new: float | None = None
    max_forgetting: float | None = None
    floor: float | None = None


def gate_for(loaded: LoadedRetrain) -> Gate:
    """The gate of a retrain file, its metric and mode decided for the base job's task."""
    metric, mode = loaded.config.gate.resolved(loaded.job.model.task)
    g = loaded.config.gate
    return Gate(metric=metric, mode=mode, min_new=g.min_new, max_forgetting=g.max_forgetting, floor=g.floor)


def gate_scores(metrics: dict[str, Any], metric: str) -> dict[str, float]:
    """``{eval set: score}`` of the gate's metric from a training run's final metrics (``<eval set>/<metric>``,
    training metrics left out)."""
    return {
        key.rsplit("/", 1)[0]: float(value)
        for key, value in metrics.items()
        if key.endswith(f"/{metric}") and isinstance(value, (int, float)) and not key.startswith("train/")
    }


def gate_decision(
    gate: Gate, new_scores: dict[str, float], forgetting: dict[str, float], new_eval: str | None
) -> tuple[str, str]:
    """'promote' or 'reject', with a reason naming every check and its numbers."""
    better = (lambda a, b: a >= b) if gate.mode == "max" else (lambda a, b: a <= b)
    word = "≥" if gate.mode == "max" else "≤"
    failed, passed = [], []
    if gate.min_new is not None:
        if new_eval is None or new_eval not in new_scores:
            failed.append(f"no score on the new data ({new_eval or 'no holdout'}) to compare with min_new")
        else:
            value = new_scores[new_eval]
            ok = better(value, gate.min_new)
            (passed if ok else failed).append(
                f"new data {new_eval} {gate.metric} {value:.4f} {'' if ok else 'not '}{word} {gate.min_new:g}"
            )
    if gate.max_forgetting is not None and forgetting:
        worst = max(forgetting, key=lambda n: forgetting[n])
        too_much = {n: f for n, f in forgetting.items() if f > gate.max_forgetting + 1e-12}
        if too_much:
            items = ", ".join(f"{n} {f:+.4f}" for n, f in sorted(too_much.items()))
            failed.append(f"forgetting above {gate.max_forgetting:g} on {items}")
        else:
            passed.append(f"max forgetting {forgetting[worst]:+.4f} ({worst}) ≤ {gate.max_forgetting:g}")
    if gate.floor is not None and new_scores:
        below = {n: v for n, v in new_scores.items() if not better(v, gate.floor)}
        if below:
            items = ", ".join(f"{n} {v:.4f}" for n, v in sorted(below.items()))
            failed.append(f"{'below' if gate.mode == 'max' else 'above'} the floor {gate.floor:g}: {items}")
        else:
            edge = min(new_scores.values()) if gate.mode == "max" else max(new_scores.values())
            passed.append(f"every eval set {word} floor {gate.floor:g} (worst {edge:.4f})")
    if failed:
        return "reject", "rejected: " + "; ".join(failed) + (f" (passed: {'; '.join(passed)})" if passed else "")
    return "promote", "promoted: " + ("; ".join(passed) if passed else "no gate checks configured")
