"""A derived model against the model it started from: start, end and delta per eval set, with size and speed.

Before its first step every run scores the model it starts from on every eval set (``orchestrator.train.start_eval``:
the base or a continual round's champion, the teacher for a distilled student), one ``start_eval`` record in
metrics.jsonl. At the end it writes one ``start_vs_end`` record, :func:`compare`'s output, which the W&B summary
(:func:`summary_values`), the registry (``metrics["start_vs_end"]``), the model card and the CLI's table read.

A new classification head has no start score: it would be chance, not a baseline. Such a start record says why
(``fresh_head``) and holds no quality metrics; the comparison then has an end but no start or delta.

Both sides import this module (workers write the records, the driver reads them): plain Python, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

START_EVAL_KIND = "start_eval"
COMPARISON_KIND = "start_vs_end"
# Per-set metrics that measure speed, not quality: compared as a ratio (end / start), never as a delta.
SPEED_SUFFIXES = ("samples_per_s", "rows_per_s")
# Keys of metrics records with a "/" that are not eval sets.
_NOT_EVAL_SETS = ("train", "unfreeze", "memory", "setup", "zero3", "export", "start", "delta", "end")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def by_eval_set(record: Mapping[str, Any], sets: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """``{'sst2/accuracy': .9, 'step': 6}`` → ``{'sst2': {'accuracy': .9}}`` (only ``sets`` when given): the one
    reading of a metrics record by eval set (the registry's ``metrics.eval`` too)."""
    wanted = set(sets) if sets is not None else None
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if "/" not in key or not is_number(value):
            continue
        name, metric = key.rsplit("/", 1)
        if name.split("/")[0] in _NOT_EVAL_SETS or (wanted is not None and name not in wanted):
            continue
        out.setdefault(name, {})[metric] = value
    return out


def is_speed(metric: str) -> bool:
    return metric.endswith(SPEED_SUFFIXES)


def _pair(start: float | None, end: float | None) -> dict[str, float | None]:
    ratio = end / start if start and end is not None else None
    return {"start": start, "end": end, "ratio": ratio}


def compare(start_record: Mapping[str, Any] | None, end_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The run's model at its end against the model it started from.

    Args:
        start_record: the ``start_eval`` record (its ``reference``, ``reference_path``, ``fresh_head``,
            ``start/params``, ``start/weight_bytes`` and ``<set>/<metric>`` scores); None when the run scored no
            start.
        end_metrics: the last eval's ``<set>/<metric>`` values, with the exported model's ``params`` and
            ``weight_bytes`` when known.

    Returns:
        ``reference`` (what the start model is), ``start``/``end``/``delta`` per eval set and quality metric
        (a delta only where both sides have the metric), ``speed`` per set (start, end and ratio of every
        samples/s metric), ``params`` and ``weight_bytes`` (start, end, ratio).
    """
    start_record = start_record or {}
    start = by_eval_set(start_record)
    sets = list(start) or None
    end = by_eval_set(end_metrics, sets)
    delta: dict[str, dict[str, float]] = {}
    speed: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, metrics in end.items():
        for metric, value in metrics.items():
            before = start.get(name, {}).get(metric)
            if is_speed(metric):
                speed.setdefault(name, {})[metric] = _pair(before, value)
            elif before is not None:
                delta.setdefault(name, {})[metric] = value - before
    return {
        "reference": {
            "role": start_record.get("reference"),
            "path": start_record.get("reference_path"),
            "fresh_head": start_record.get("fresh_head"),
        },
        "start": {n: {m: v for m, v in ms.items() if not is_speed(m)} for n, ms in start.items()},
        "end": {n: {m: v for m, v in ms.items() if not is_speed(m)} for n, ms in end.items()},
        "delta": delta,
        "speed": speed,
        "params": _pair(start_record.get("start/params"), end_metrics.get("params")),
        "weight_bytes": _pair(start_record.get("start/weight_bytes"), end_metrics.get("weight_bytes")),
    }


def summary_values(comparison: Mapping[str, Any]) -> dict[str, float]:
    """The comparison as flat W&B summary keys: ``start/<set>/<metric>``, ``delta/<set>/<metric>``,
    ``<set>/<speed>_vs_start`` (ratio), ``start/params``, ``end/params``, ``start/weight_bytes``, ..."""
    out: dict[str, float] = {}
    for side in ("start", "delta"):
        for name, metrics in comparison.get(side, {}).items():
            out.update({f"{side}/{name}/{metric}": value for metric, value in metrics.items()})
    for name, metrics in comparison.get("speed", {}).items():
        for metric, pair in metrics.items():
            if pair.get("ratio") is not None:
                out[f"{name}/{metric}_vs_start"] = pair["ratio"]
    for size in ("params", "weight_bytes"):
        for side in ("start", "end", "ratio"):
            value = (comparison.get(size) or {}).get(side)
            if is_number(value):
                out[f"{side}/{size}" if side != "ratio" else f"{size}_ratio"] = value
    return out


def table_rows(comparison: Mapping[str, Any]) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(eval set, metric, start, end, delta) per quality metric, then (set, metric, start, end, ratio) per speed
    metric and the sizes: the CLI's table and the model card read the same rows."""
    rows: list[tuple[str, str, float | None, float | None, float | None]] = []
    start, end, delta = comparison.get("start", {}), comparison.get("end", {}), comparison.get("delta", {})
    for name in sorted(set(start) | set(end)):
        for metric in sorted(set(start.get(name, {})) | set(end.get(name, {}))):
            rows.append(
                (
                    name,
                    metric,
                    start.get(name, {}).get(metric),
                    end.get(name, {}).get(metric),
                    delta.get(name, {}).get(metric),
                )
            )
    for name, metrics in sorted(comparison.get("speed", {}).items()):
        for metric, pair in sorted(metrics.items()):
            rows.append((name, f"{metric} (x)", pair.get("start"), pair.get("end"), pair.get("ratio")))
    for size in ("params", "weight_bytes"):
        pair = comparison.get(size) or {}
        if pair.get("start") is not None or pair.get("end") is not None:
            rows.append(("model", f"{size} (x)", pair.get("start"), pair.get("end"), pair.get("ratio")))
    return rows


def describe_reference(comparison: Mapping[str, Any]) -> str:
    """One line: what the run started from, and why it has no start score when it has none."""
    ref = comparison.get("reference") or {}
    role, path = ref.get("role") or "start model", ref.get("path") or "?"
    if ref.get("fresh_head"):
        return f"{role} {path}: no start score ({ref['fresh_head']})"
    return f"{role} {path}"
