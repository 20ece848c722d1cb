"""The forgetting matrix of a continually retrained model: each eval set's score across rounds.

``orchestrator registry report NAME`` writes ``forgetting.csv`` (eval sets x models, with each model's
forgetting per eval set), ``forgetting.md`` (the same as a table) and ``forgetting.png`` (one line per eval
set across the model's versions; rejected candidates drawn as crosses, champions as stars). The folder may be a
URI (``s3://...``): the files are then written into a local staging folder and uploaded.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import orchestrator.storage as storage
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import ModelRecord, RegistryError


@dataclass
class ForgettingMatrix:
    metric: str
    models: list[ModelRecord]
    eval_sets: list[str]  # in the order they first appeared
    scores: dict[tuple[str, str], float]  # (eval set, model id) -> score
    forgetting: dict[tuple[str, str], float]  # (eval set, model id) -> forgetting recorded by its round

    def rows(self) -> list[list[str]]:
        """Table rows: header, then one row per eval set ('score (forgetting)'), then the decisions."""
        header = ["eval set", *(f"{m.id} ({m.status})" for m in self.models)]
        rows = [header]
        for eval_set in self.eval_sets:
            row = [eval_set]
            for m in self.models:
                score = self.scores.get((eval_set, m.id))
                forgot = self.forgetting.get((eval_set, m.id))
                cell = "" if score is None else f"{score:.4f}"
                if score is not None and forgot is not None:
                    cell += f" ({0.0 - forgot:+.4f})"
                row.append(cell)
            rows.append(row)
        rows.append(["decision", *((m.decision or "-") for m in self.models)])
        return rows


def forgetting_matrix(models: list[ModelRecord], metric: str) -> ForgettingMatrix:
    eval_sets: list[str] = []
    scores, forgetting = {}, {}
    for m in models:
        for eval_set, values in m.eval_metrics.items():
            if metric not in values:
                continue
            if eval_set not in eval_sets:
                eval_sets.append(eval_set)
            scores[(eval_set, m.id)] = float(values[metric])
        for eval_set, value in (m.metrics.get("forgetting") or {}).items():
            forgetting[(eval_set, m.id)] = float(value)
    return ForgettingMatrix(metric=metric, models=models, eval_sets=eval_sets, scores=scores, forgetting=forgetting)


@dataclass
class ReportFiles:
    """The files written: local paths, or URIs when the report went to object storage."""

    matrix: ForgettingMatrix
    csv: Path | str
    markdown: Path | str
    png: Path | str | None


def write_report(
    registry: Registry, name: str, out_dir: str | os.PathLike[str], *, metric: str | None = None
) -> ReportFiles:
    """Write the forgetting matrix of every version of ``name`` (oldest first) as CSV, Markdown and PNG, into a
    local folder or a URI (staged locally, then uploaded file by file).

    Raises:
        RegistryError: no models of that name.
        StorageError: the URI cannot be written (naming it).
    """
    if not storage.is_uri(out_dir):
        return _write_report_files(registry, name, Path(out_dir), metric=metric)
    with tempfile.TemporaryDirectory(prefix="forgetting-report-") as staging:
        local = _write_report_files(registry, name, Path(staging), metric=metric)

        def uploaded(path: Path | str | None) -> str | None:
            if path is None:
                return None
            target = storage.join(str(out_dir), Path(path).name)
            storage.write_bytes(target, Path(path).read_bytes())
            return target

        csv_uri, md_uri = uploaded(local.csv), uploaded(local.markdown)
        assert csv_uri is not None and md_uri is not None
        return ReportFiles(matrix=local.matrix, csv=csv_uri, markdown=md_uri, png=uploaded(local.png))


def _write_report_files(registry: Registry, name: str, out_dir: Path, *, metric: str | None) -> ReportFiles:
    """:func:`write_report` into a local folder."""
    models = sorted(registry.models(name), key=lambda m: m.version)
    if not models:
        raise RegistryError(f"no models named {name!r} in {registry.path}")
    if metric is None:
        gates = [m.metrics.get("gate", {}).get("metric") for m in models]
        metric = next((g for g in gates if g), "accuracy")
    matrix = forgetting_matrix(models, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = matrix.rows()
    csv_path = out_dir / "forgetting.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    md_path = out_dir / "forgetting.md"
    lines = [
        f"# {name}: {metric} per eval set and version",
        "",
        "Each cell: the score, and in brackets minus the forgetting its round measured (best earlier score "
        "- new score, so negative = forgot).",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(r) + " |" for r in rows[1:]),
        "",
    ]
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return ReportFiles(matrix=matrix, csv=csv_path, markdown=md_path, png=plot_matrix(matrix, name, out_dir))


def plot_matrix(matrix: ForgettingMatrix, name: str, out_dir: Path) -> Path | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:  # plotting is optional; the CSV and Markdown tables are always written
        return None
    if not matrix.eval_sets:
        return None
    fig = Figure(figsize=(max(6.0, 1.2 * len(matrix.models) + 3), 5))
    ax = fig.subplots()
    xs = list(range(len(matrix.models)))
    for eval_set in matrix.eval_sets:
        points = [(x, matrix.scores.get((eval_set, m.id))) for x, m in zip(xs, matrix.models)]
        points = [(x, y) for x, y in points if y is not None]
        (line,) = ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=eval_set)
        for x, y in points:
            status = matrix.models[x].status
            if status == "rejected":
                ax.scatter([x], [y], marker="x", s=90, color=line.get_color(), zorder=3)
            elif status == "champion":
                ax.scatter([x], [y], marker="*", s=160, color=line.get_color(), zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{m.id}\n{m.status}" for m in matrix.models], fontsize="small")
    ax.set_ylabel(matrix.metric)
    ax.set_title(f"{name}: {matrix.metric} per eval set across versions (x: rejected, *: champion)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    path = out_dir / "forgetting.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
