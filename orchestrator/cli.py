"""The ``orchestrator`` command line: train, sweep, validate, submit, schema."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.config import json_schema, load_config
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.terminal import ProgressView as _ProgressView
from orchestrator.terminal import logs_hint, ray_logs_dir
from orchestrator.tracking import SECRETS_FILE_ENV, VERBOSE_ENV

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Distributed training orchestrator for derived models."
)
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option([], "--set", "-s", help="Override a config field: --set training.lr=1e-4 (repeatable).")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


VerboseOption = typer.Option(
    False,
    "--verbose",
    "-v",
    help="Show everything: every worker's output and Ray's, torch's and DeepSpeed's logs. Without it: the run's "
    "progress, results and warnings (the full logs stay in the Ray session folder).",
)


def _set_verbose(verbose: bool) -> None:
    """-v: this process and the Ray processes it starts or submits to (ORCHESTRATOR_VERBOSE) show everything."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        logging.getLogger().setLevel(logging.INFO)


@app.command()
def train(
    config_path: Path = typer.Argument(..., help="YAML job file."),
    overrides: list[str] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue a run from its latest checkpoint in storage."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)."
    ),
    verbose: bool = VerboseOption,
) -> None:
    """Train a model on a Ray cluster (a local one by default)."""
    from orchestrator.cluster.launcher import run_training

    _set_verbose(verbose)
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    view = _ProgressView(enabled=console.is_terminal, eval_every_steps=config.training.eval_every_steps, out=console)
    with view:
        try:
            result = run_training(config, resume=resume, address=address, source=str(config_path), progress=view)
        except OrchestratorError as exc:
            _fail(str(exc))
        except Exception as exc:  # Ray wraps worker errors; show the root cause, not a Ray traceback
            _fail(_root_cause(exc) + logs_hint(), code=1)
    table = Table(title=f"run {config.name}", show_header=False)
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    table.add_row("final model", str(result.final_model or "-"))
    table.add_row("best model", str(result.best_model or "-"))
    table.add_row("checkpoint", str(result.checkpoint_path or "-"))
    table.add_row("W&B", str(result.wandb or "disabled"))
    table.add_row("metrics", str(result.run_dir / "metrics.jsonl"))
    table.add_row("Ray logs", ray_logs_dir() or "-")  # every worker's output, which -v shows while it runs
    skipped = result.data.get("train", {}).get("bad_rows_skipped", 0)
    if skipped:
        table.add_row("bad rows skipped (train)", str(skipped))
    console.print(table)


def _root_cause(exc: BaseException) -> str:
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    text = str(exc)
    for marker in ("TrainingError: ", "DataError: ", "ModelError: "):
        if marker in text:
            return text[text.rindex(marker) :].splitlines()[0]
    return f"{type(exc).__name__}: {text}"


@app.command()
def validate(
    config_paths: list[Path] = typer.Argument(..., help="YAML job files."),
    overrides: list[str] = SetOption,
    check_data: bool = typer.Option(True, "--check-data/--no-check-data", help="Also scan data files and model paths."),
) -> None:
    """Check job files and report every problem in every file at once."""
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config.retrain import is_retrain_file, load_retrain

    failed = 0
    for path in config_paths:
        try:
            if is_retrain_file(path):  # a continual-retraining file (issue #6): its base job is checked
                config = load_retrain(path, overrides).job
            else:
                config = load_config(path, overrides)
            if check_data and config.tune is not None:  # a sweep: its search space and metric are checked too
                from orchestrator.tune.sweep_plan import plan_sweep

                plan_sweep(config, resume=True, source=str(path))
            elif check_data:
                preflight(config, resume=True, source=str(path))
        except ConfigError as exc:
            failed += 1
            err_console.print(str(exc), highlight=False, markup=False)
            continue
        console.print(f"[green]ok[/] {path}")
    if failed:
        raise typer.Exit(1)


@app.command()
def schema(output: Path = typer.Option(None, "--output", "-o", help="Write here instead of stdout.")) -> None:
    """Print the JSON schema of job files (for editor completion and checks)."""
    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


@app.command()
def submit(
    config_path: Path = typer.Argument(..., help="YAML job file (inside the working dir)."),
    address: str = typer.Option(
        None, "--address", help="Ray dashboard address, e.g. http://HEAD:8265 (default RAY_ADDRESS)."
    ),
    overrides: list[str] = SetOption,
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="Folder uploaded as the job's working dir."),
    env: list[str] = typer.Option(
        [], "--env", help="Environment variable NAME passed through to the job (repeatable); secrets are refused."
    ),
    pip: list[str] = typer.Option([], "--pip", help="Extra pip requirement installed in the job's env (repeatable)."),
    entrypoint_num_cpus: float = typer.Option(0.0, help="CPUs reserved for the job driver."),
    entrypoint_num_gpus: float = typer.Option(0.0, help="GPUs reserved for the job driver (keep 0)."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Stream logs until the job ends."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its latest checkpoint."),
    secrets_file: str = typer.Option(
        None,
        "--secrets-file",
        envvar=SECRETS_FILE_ENV,
        help="A file of NAME=value secrets (mode 0600) on storage the cluster's nodes mount: only its path travels "
        "with the job, and the job's processes read it at start. Without it, the job sees the nodes' environment.",
    ),
    verbose: bool = VerboseOption,
) -> None:
    """Submit a job to a Ray cluster through the Jobs API (token auth handled) and follow its logs.

    No secret is sent with the job (Ray shows a job's runtime env to every holder of the cluster token): the job
    reads secrets such as WANDB_API_KEY from the cluster's nodes, or from --secrets-file."""
    from orchestrator.cluster.jobs import submit_job

    _set_verbose(verbose)
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _fail("--address is required (or set RAY_ADDRESS), e.g. --address http://127.0.0.1:8265")
    try:
        status = submit_job(
            config,
            config_path=config_path,
            address=address,
            overrides=overrides,
            working_dir=working_dir,
            env_names=env,
            pip=pip,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            follow=follow,
            resume=resume,
            echo=lambda text: console.print(text, highlight=False, markup=False, end=""),
            secrets_file=secrets_file,
        )
    except OrchestratorError as exc:
        _fail(str(exc))
    if follow and status != "SUCCEEDED":
        _fail(f"job ended with status {status}", code=1)


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="An exported model folder (<run>/final or <run>/best)."),
    texts: list[str] = typer.Argument(..., help="Texts to classify."),
) -> None:
    """Classify texts with an exported model and print label names with probabilities."""
    from orchestrator.models.predict import predict as run_predict

    try:
        predictions = run_predict(model_dir, texts)
    except OrchestratorError as exc:
        _fail(str(exc))
    for text, (label, probability) in zip(texts, predictions):
        console.print(f"{label:>12}  {probability:.3f}  {text}", highlight=False, markup=False)


@app.command()
def sweep(
    config_path: Path = typer.Argument(None, help="YAML job file with a tune section."),
    overrides: list[str] = SetOption,
    resume: Path = typer.Option(
        None, "--resume", help="Continue the sweep in this folder (after its driver died); no config file needed."
    ),
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)."
    ),
) -> None:
    """Run a hyperparameter sweep (Ray Tune): each trial is the whole multi-worker job with sampled values."""
    from orchestrator.tune.sweep import resume_sweep, run_sweep

    if (config_path is None) == (resume is None):
        _fail("give a config file, or --resume <sweep dir> (not both)")
    try:
        if resume is not None:
            result = resume_sweep(resume, address=address)
        else:
            config = load_config(config_path, overrides)
            result = run_sweep(config, address=address, source=str(config_path))
    except OrchestratorError as exc:
        _fail(str(exc))
    except Exception as exc:  # Ray wraps errors; show the root cause, not a Ray traceback
        _fail(_root_cause(exc), code=1)
    params = sorted({p for t in result.trials for p in t.params})
    table = Table(title=f"sweep {result.sweep_dir.name}: {result.metric} ({result.mode})")
    for column in ("trial", "status", f"best {result.metric}", "steps", *params, "note"):
        table.add_column(column, overflow="fold")
    for t in result.trials:
        style = "bold green" if result.best is not None and t.trial_id == result.best.trial_id else None
        note = t.error or (f"stopped: {t.stop_reason}" if t.stop_reason else "")
        metric = f"{t.best_metric:.4f}" if t.best_metric is not None else "-"
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (t.params.get(p) for p in params)]
        table.add_row(t.trial_id, t.status.replace("_", " "), metric, str(t.steps or "-"), *values, note, style=style)
    console.print(table)
    if result.best is not None:
        console.print(f"best trial {result.best.trial_id}: {result.metric} {result.best.best_metric:.4f}")
    console.print(f"results: {result.results_csv}, {result.results_json}")
    console.print(f"learning curves: {result.plot or '-'}   best model: {result.best_model or '-'}")
    console.print(f"W&B: {result.wandb or 'disabled'}")


# --------------------------------------------------------------------------------------------------
# Model registry, continual retraining and its scheduler (issue #6)
# --------------------------------------------------------------------------------------------------

@app.command()
def plan(
    config_path: Path = typer.Argument(..., help="YAML job file."),
    overrides: list[str] = SetOption,
    device_memory: str = typer.Option(
        None, "--device-memory", help="Memory of one worker's device, e.g. 80GB (default: this machine's first GPU, "
        "or its RAM shared by the job's workers when it has none)."
    ),
    gpu: bool = typer.Option(None, "--gpu/--cpu", help="Plan for GPU workers (bf16 by default) or CPU workers (fp32)."),
) -> None:
    """Expected memory per worker (model states by ZeRO stage and offload, activations with or without gradient
    checkpointing, logits) and whether it fits, before any resource is taken."""
    from orchestrator.cluster.memory_plan import plan_for_job

    try:
        config = load_config(config_path, overrides)
        table, fits_device = plan_for_job(config, device_memory=device_memory, gpu=gpu)
    except (ConfigError, OrchestratorError, ValueError) as exc:
        _fail(str(exc))
    console.print(table)
    if not fits_device:
        raise typer.Exit(1)


registry_app = typer.Typer(
    no_args_is_help=True, help="Registered models: list, show, lineage, promote, rollback, report, release."
)
app.add_typer(registry_app, name="registry")

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
    """Show one model: lineage, data with hashes, metrics per eval set, artifact, code version, decision."""
    from orchestrator.lifecycle.registry_records import RegistryError

    reg = _open_registry(registry)
    try:
        m = reg.get(model_id)
    except RegistryError as exc:
        _fail(str(exc))
    if as_json:
        sys.stdout.write(json.dumps(m.to_dict(), indent=2, default=str) + "\n")
        return
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

    reg = _open_registry(registry)
    try:
        record = reg.promote(model_id, reason)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{record.id} is now the champion of {record.name}")


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(None, help="Model name (optional when only one name has a champion)."),
    registry: Path = RegistryOption,
    reason: str = typer.Option("rollback by hand", "--reason", help="Recorded with the rollback."),
) -> None:
    """Restore the previous champion; the current one is archived."""
    from orchestrator.lifecycle.registry_records import RegistryError

    reg = _open_registry(registry)
    try:
        restored, demoted = reg.rollback(name, reason)
    except RegistryError as exc:
        _fail(str(exc))
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
    out: Path = typer.Option(None, "--out", help="Folder for forgetting.csv/.md/.png (default: beside the registry)."),
    metric: str = typer.Option(None, "--metric", help="Metric per eval set (default: the gate's, else accuracy)."),
) -> None:
    """The forgetting matrix: each eval set's score across the model's versions (table + PNG)."""
    from orchestrator.lifecycle.registry_records import RegistryError
    from orchestrator.lifecycle.report import write_report

    reg = _open_registry(registry)
    try:
        files = write_report(reg, name, out or reg.path.parent / f"{name}-report", metric=metric)
    except RegistryError as exc:
        _fail(str(exc))
    rows = files.matrix.rows()
    table = Table(title=f"{name}: {files.matrix.metric} (in brackets: minus forgetting)")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    console.print(f"written: {files.csv}, {files.markdown}, {files.png or '(no plot: matplotlib missing)'}")


@app.command()
def retrain(
    config_path: Path = typer.Argument(None, help="Retrain YAML file (see configs/retrain.yaml)."),
    overrides: list[str] = SetOption,
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)."
    ),
    registry: Path = typer.Option(None, "--registry", help="With --round-id: the registry holding the round."),
    round_id: int = typer.Option(None, "--round-id", help="Run a round the scheduler claimed (its stored config)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the new data and the champion; train nothing."),
) -> None:
    """Run one continual-retraining round: new data, warm start from the champion, replay, gate."""
    from orchestrator.config.retrain import load_retrain
    from orchestrator.lifecycle.new_data import find_new_data
    from orchestrator.lifecycle.registry import Registry
    from orchestrator.lifecycle.rounds import loaded_from_round, open_round_registry, run_round

    try:
        if round_id is not None:
            if registry is None:
                _fail("--round-id needs --registry")
            reg = Registry(registry)
            loaded = loaded_from_round(reg, round_id)
        else:
            if config_path is None:
                _fail("give a retrain file, or --registry and --round-id")
            loaded = load_retrain(config_path, overrides)
            reg = open_round_registry(loaded)
        if dry_run:
            champion = reg.champion(loaded.name)
            console.print(f"model {loaded.name}: champion {champion.id if champion else '(none: starts from base)'}")
            for f in find_new_data(loaded, reg):
                console.print(f"  new: {f.path} (sha256 {f.sha256[:12]})")
            return
        with _ProgressView(enabled=console.is_terminal) as view:
            result = run_round(loaded, address=address, round_id=round_id, registry=reg, progress=view)
    except OrchestratorError as exc:
        _fail(str(exc))
    except Exception as exc:  # Ray wraps worker errors; show the root cause, not a Ray traceback
        _fail(_root_cause(exc), code=1)
    if result.status == "skipped":
        console.print(f"{loaded.name}: no new data in {loaded.config.watch.dir}; nothing to do")
        return
    table = Table(title=f"{loaded.name} round {result.round}: {result.candidate.id}", show_header=False)
    for eval_set, score in result.scores.items():
        forgot = result.forgetting.get(eval_set)
        table.add_row(eval_set, f"{score:.4f}" + (f"  forgetting {forgot:+.4f}" if forgot is not None else "  (new)"))
    table.add_row("decision", f"{result.decision}: {result.reason}")
    table.add_row("parent", result.candidate.parent or "-")
    table.add_row("model", result.candidate.artifact)
    console.print(table)


@app.command()
def schedule(
    config_path: Path = typer.Argument(..., help="Retrain YAML file with a schedule section."),
    overrides: list[str] = SetOption,
    address: str = typer.Option(
        None, "--address", help="Ray dashboard address (default: schedule.address, then RAY_ADDRESS)."
    ),
    once: bool = typer.Option(False, "--once", help="One tick and exit (for a Kubernetes CronJob)."),
) -> None:
    """Submit retraining rounds as Ray jobs on new data / an interval / a cron schedule (runs until stopped)."""
    from orchestrator.cluster.jobs import job_client
    from orchestrator.config.retrain import load_retrain
    from orchestrator.lifecycle.rounds import open_round_registry
    from orchestrator.lifecycle.scheduler import RetrainScheduler

    try:
        loaded = load_retrain(config_path, overrides)
        address = address or loaded.config.schedule.address or os.environ.get("RAY_ADDRESS")
        if not address:
            _fail("no Ray address: pass --address http://HEAD:8265, set schedule.address or RAY_ADDRESS")
        scheduler = RetrainScheduler(
            loaded,
            registry=open_round_registry(loaded),
            client=job_client(address),
            echo=lambda text: console.print(text, highlight=False, markup=False),
        )
        scheduler.run(once=once)
    except OrchestratorError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        console.print("stopped; a running round goes on as its Ray job, and a restart picks it up")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
