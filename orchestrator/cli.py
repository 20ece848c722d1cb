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
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.config import json_schema, load_config
from orchestrator.errors import ConfigError, OrchestratorError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Distributed training orchestrator for derived models."
)
console = Console()
err_console = Console(stderr=True)

SetOption = typer.Option([], "--set", "-s", help="Override a config field: --set training.lr=1e-4 (repeatable).")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


class _ProgressView:
    """Renders the run's metrics.jsonl as a progress bar (step, loss, samples/s, ETA) and eval lines."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task: Any = None
        self.seen = 0

    def __enter__(self) -> _ProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, records: list[dict[str, Any]]) -> None:
        for record in records[self.seen :]:
            kind = record.get("kind")
            if kind == "start":
                if self.task is None:
                    self.task = self.progress.add_task("train", total=record["total_steps"], loss="-", rate="-")
                self.progress.update(self.task, completed=record.get("step", 0))
                resumed = record.get("resumed_from_step")
                note = f", resumed at step {resumed}" if resumed is not None else ""
                self.progress.console.print(
                    f"workers: {record['world_size']}, precision {record['precision']}, parameters "
                    f"{record['params_trainable']:,} trainable / {record['params_total']:,}{note}"
                )
            elif kind == "train" and self.task is not None:
                self.progress.update(
                    self.task,
                    completed=record["step"],
                    loss=f"{record['train/loss']:.4f}",
                    rate=f"{record['train/samples_per_s']:.1f}",
                )
                if not self.enabled:
                    console.print(
                        f"step {record['step']}/{record['total_steps']} loss {record['train/loss']:.4f} "
                        f"lr {record['train/lr']:.2e} {record['train/samples_per_s']:.1f} samples/s"
                    )
            elif kind == "eval":
                shown = {k: v for k, v in record.items() if "/" in k and not k.endswith("samples_per_s")}
                text = "  ".join(f"{k} {v:.4f}" for k, v in shown.items() if isinstance(v, float))
                self.progress.console.print(f"eval @ step {record['step']}: {text}")
        self.seen = len(records)


@app.command()
def train(
    config_path: Path = typer.Argument(..., help="YAML job file."),
    overrides: list[str] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue a run from its latest checkpoint in storage."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)."
    ),
) -> None:
    """Train a model on a Ray cluster (a local one by default)."""
    from orchestrator.launcher import run_training

    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    with _ProgressView(enabled=console.is_terminal) as view:
        try:
            result = run_training(config, resume=resume, address=address, source=str(config_path), progress=view)
        except OrchestratorError as exc:
            _fail(str(exc))
        except Exception as exc:  # Ray wraps worker errors; show the root cause, not a Ray traceback
            _fail(_root_cause(exc), code=1)
    table = Table(title=f"run {config.name}", show_header=False)
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    table.add_row("final model", str(result.final_model or "-"))
    table.add_row("best model", str(result.best_model or "-"))
    table.add_row("checkpoint", str(result.checkpoint_path or "-"))
    table.add_row("W&B", str(result.wandb or "disabled"))
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
    from orchestrator.launcher import preflight

    failed = 0
    for path in config_paths:
        try:
            config = load_config(path, overrides)
            if check_data:
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
        [], "--env", help="Environment variable NAME passed through to the job (repeatable)."
    ),
    pip: list[str] = typer.Option([], "--pip", help="Extra pip requirement installed in the job's env (repeatable)."),
    entrypoint_num_cpus: float = typer.Option(0.0, help="CPUs reserved for the job driver."),
    entrypoint_num_gpus: float = typer.Option(0.0, help="GPUs reserved for the job driver (keep 0)."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Stream logs until the job ends."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its latest checkpoint."),
) -> None:
    """Submit a job to a Ray cluster through the Jobs API (token auth handled) and follow its logs."""
    from orchestrator.submit import submit_job

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
    from orchestrator.inference import predict as run_predict

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
    from orchestrator.sweep import resume_sweep, run_sweep

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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
