"""``orchestrator registry ...``: the registered models (list, show, lineage, promote, rollback, release, report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from orchestrator.cli_output import console
from orchestrator.cli_output import fail as _fail

registry_app = typer.Typer(
    no_args_is_help=True, help="Registered models: list, show, lineage, promote, rollback, report, release."
)

RegistryOption = typer.Option(
    Path("runs/registry.sqlite"),
    "--registry",
    "-r",
    envvar="ORCHESTRATOR_REGISTRY",
    help="Registry file (a job's output.registry; default: runs/registry.sqlite).",
)


def _open_registry(path: Path) -> Any:
    from orchestrator.lifecycle.registry import Registry

    if not path.is_file():
        _fail(f"no registry at {path}; pass --registry PATH (or set ORCHESTRATOR_REGISTRY)")
    return Registry(path)


def _headline(record: Any) -> str:
    """The record's scores, one per eval set (accuracy, else loss)."""
    parts = []
    for eval_set, values in record.eval_metrics.items():
        for metric in ("accuracy", "loss"):
            if metric in values:
                parts.append(f"{eval_set} {metric[:3]} {values[metric]:.3f}")
                break
    return ", ".join(parts)


@registry_app.command("list")
def registry_list(
    registry: Path = RegistryOption,
    name: str = typer.Option(None, "--name", help="Only models of this name."),
    status: str = typer.Option(None, "--status", help="Only candidate, champion, rejected or archived."),
) -> None:
    """List registered models, oldest first."""
    reg = _open_registry(registry)
    table = Table(title=f"models in {reg.path}")
    for column in ("id", "status", "method", "parent", "licence", "scores", "created"):
        table.add_column(column, overflow="fold")
    styles = {"champion": "bold green", "rejected": "red", "archived": "dim"}
    for m in reg.models(name, status):
        parent = m.parent_id or (Path(m.parent_ref).name if m.parent_ref else "-")
        table.add_row(
            m.id, m.status, m.method, parent, m.licence or "?", _headline(m), m.created_at, style=styles.get(m.status)
        )
    console.print(table)
    _print_quarantine(reg, name)


def _print_quarantine(reg: Any, name: str | None) -> None:
    """The continual shards quarantined after failed rounds (none: nothing printed)."""
    shards = reg.quarantined(name)
    if not shards:
        return
    table = Table(title="quarantined shards (rounds kept failing; orchestrator registry release SHA256 retries)")
    for column in ("name", "sha256", "file", "attempts", "reason", "since"):
        table.add_column(column, overflow="fold")
    for q in shards:
        table.add_row(q.name, q.sha256[:12], q.path or "-", str(q.attempts), q.reason, q.quarantined_at, style="red")
    console.print(table)


@registry_app.command("show")
def registry_show(
    model_id: str = typer.Argument(..., help="Model id, e.g. sst2-v3."),
    registry: Path = RegistryOption,
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON (config included)."),
) -> None:
    """Show one model: its model card (the README.md its folder carries), then the registry's record: lineage,
    data with hashes, metrics per eval set, artifact, code version, decision."""
    from orchestrator.lifecycle.registry_records import RegistryError

    reg = _open_registry(registry)
    try:
        m = reg.get(model_id)
    except RegistryError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(m.to_dict(), indent=2, default=str) + "\n")
        return
    from orchestrator.lifecycle.model_card import card_of_record

    console.print(card_of_record(m, reg).content, markup=False, highlight=False, soft_wrap=True)
    table = Table(title=m.id, show_header=False)
    rows = [
        ("status", m.status),
        ("decision", f"{m.decision}: {m.decision_reason}" if m.decision else "-"),
        ("parent", m.parent or "-"),
        ("teacher", m.teacher_id or m.teacher_ref or "-"),
        ("method", m.method),
        ("base model", m.base_model or "-"),
        ("licence", m.licence or "unknown"),
        ("artifact", m.artifact),
        ("files sha256", f"{m.weights_sha256} ({len(m.files or {})} files)" if m.weights_sha256 else "-"),
        ("checkpoint", m.checkpoint or "-"),
        ("code version", m.code_version or "-"),
        ("created", m.created_at),
        ("round", str(m.round) if m.round is not None else "-"),
        ("W&B artifact", m.wandb_artifact or "-"),
    ]
    train = m.data.get("train") or {}
    rows.append(("train data", f"{train.get('path')} sha256 {str(train.get('sha256'))[:12]} rows {train.get('rows')}"))
    for item in (m.data.get("continual") or {}).get("new", []):
        rows.append(("  new file", f"{item['path']} sha256 {item['sha256'][:12]}"))
    for item in (m.data.get("continual") or {}).get("replay", []):
        rows.append(("  replayed", f"{item['rows']} rows of {item['path']} sha256 {item['sha256'][:12]}"))
    for e in m.data.get("eval", []):
        digest = str(e.get("sha256"))[:12]
        rows.append(("eval data", f"{e.get('name')}: {e.get('path')} sha256 {digest} rows {e.get('rows')}"))
    for eval_set, values in m.eval_metrics.items():
        shown = "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, (int, float)))
        rows.append((f"metrics {eval_set}", shown))
    for eval_set, value in (m.metrics.get("forgetting") or {}).items():
        rows.append((f"forgetting {eval_set}", f"{value:+.4f}"))
    for q in reg.quarantined(m.name):
        rows.append(("quarantined", f"{q.path} sha256 {q.sha256[:12]} after {q.attempts} attempts: {q.reason}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@registry_app.command("lineage")
def registry_lineage(
    model_id: str = typer.Argument(..., help="Any model of the tree."), registry: Path = RegistryOption
) -> None:
    """Print the tree from the base model to every model derived from it."""
    from rich.markup import escape
    from rich.tree import Tree

    from orchestrator.lifecycle.registry_records import RegistryError

    reg = _open_registry(registry)
    try:
        root = reg.lineage(model_id)
    except RegistryError as exc:
        _fail(str(exc))
    styles = {"champion": "bold green", "rejected": "red", "archived": "dim"}

    def label(node: Any) -> str:
        m = node.record
        teacher = f", distilled from {m.teacher_id or m.teacher_ref}" if m.teacher_id or m.teacher_ref else ""
        mark = " <" if m.id == model_id else ""
        style = styles.get(m.status, "")
        text = escape(f"{m.id} [{m.status}] {m.method}{teacher}  {_headline(m)}{mark}")
        return f"[{style}]{text}[/]" if style else text

    tree = Tree(f"[bold]{escape(root.label)}[/] (base model)")

    def add(parent: Any, node: Any) -> None:
        branch = parent.add(label(node))
        for child in node.children:
            add(branch, child)

    for child in root.children:
        add(tree, child)
    console.print(tree, highlight=False)


@registry_app.command("promote")
def registry_promote(
    model_id: str = typer.Argument(..., help="The model to make champion of its name."),
    registry: Path = RegistryOption,
    reason: str = typer.Option("promoted by hand", "--reason", help="Recorded with the promotion."),
) -> None:
    """Make a model the champion of its name (the current champion is archived)."""
    from orchestrator.lifecycle.registry_records import RegistryError
    from orchestrator.lifecycle.wandb_lineage import record_decision

    reg = _open_registry(registry)
    try:
        record = reg.promote(model_id, reason)
    except RegistryError as exc:
        _fail(str(exc))
    record_decision(reg, record.id)  # W&B: champion + production move to it (a warning if W&B fails)
    console.print(f"{record.id} is now the champion of {record.name}")


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(None, help="Model name (optional when only one name has a champion)."),
    registry: Path = RegistryOption,
    reason: str = typer.Option("rollback by hand", "--reason", help="Recorded with the rollback."),
) -> None:
    """Restore the previous champion; the current one is archived."""
    from orchestrator.lifecycle.registry_records import RegistryError
    from orchestrator.lifecycle.wandb_lineage import record_decision

    reg = _open_registry(registry)
    try:
        restored, demoted = reg.rollback(name, reason)
    except RegistryError as exc:
        _fail(str(exc))
    record_decision(reg, restored.id)  # W&B: champion back on it, rolled-back on the demoted one
    console.print(f"{restored.id} is the champion of {restored.name} again ({demoted.id} archived)")


@registry_app.command("release")
def registry_release(
    sha256: str = typer.Argument(..., help="The quarantined shard's sha256 (or its first characters, as listed)."),
    registry: Path = RegistryOption,
    name: str = typer.Option(None, "--name", help="Only the quarantine of this model name."),
) -> None:
    """Lift a shard's quarantine: the scheduler trains on it again, its failed attempts counted from zero."""
    from orchestrator.lifecycle.registry_records import RegistryError

    reg = _open_registry(registry)
    try:
        released = reg.release(sha256, name)
    except RegistryError as exc:
        _fail(str(exc))
    for q in released:
        console.print(f"released {q.path} (sha256 {q.sha256[:12]}) of {q.name}", highlight=False)


@registry_app.command("report")
def registry_report(
    name: str = typer.Argument(..., help="Model name (the retrained model)."),
    registry: Path = RegistryOption,
    out: str = typer.Option(  # a str, not a Path: Path("s3://b/x") would be s3:/b/x
        None, "--out", help="Folder for forgetting.csv/.md/.png, local or a URI (default: beside the registry)."
    ),
    metric: str = typer.Option(None, "--metric", help="Metric per eval set (default: the gate's, else accuracy)."),
) -> None:
    """The forgetting matrix: each eval set's score across the model's versions (table + PNG)."""
    from orchestrator.lifecycle.registry_records import RegistryError
    from orchestrator.lifecycle.report import write_report
    from orchestrator.storage import StorageError

    reg = _open_registry(registry)
    try:
        files = write_report(reg, name, out or reg.path.parent / f"{name}-report", metric=metric)
    except (RegistryError, StorageError) as exc:
        _fail(str(exc))
    rows = files.matrix.rows()
    table = Table(title=f"{name}: {files.matrix.metric} (in brackets: minus forgetting)")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    console.print(f"written: {files.csv}, {files.markdown}, {files.png or '(no plot: matplotlib missing)'}")
