"""The ``orchestrator`` command line: train, sweep, validate, submit, schema."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

import orchestrator.storage as storage
from orchestrator.cli_output import console, err_console
from orchestrator.cli_output import fail as _fail
from orchestrator.config import json_schema, load_config
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.registry_commands import registry_app
from orchestrator.terminal import ProgressView as _ProgressView
from orchestrator.terminal import logs_hint, ray_logs_dir
from orchestrator.tracking import SECRETS_FILE_ENV, VERBOSE_ENV

if TYPE_CHECKING:
    from orchestrator.lifecycle.quantization import QuantizeResult

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Distributed training orchestrator for derived models."
)
app.add_typer(registry_app, name="registry")

SetOption = typer.Option([], "--set", "-s", help="Override a config field: --set training.lr=1e-4 (repeatable).")


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
    table.add_column()
    table.add_column(overflow="fold")  # paths whole (to copy), not cut with an ellipsis
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    table.add_row("final model", str(result.final_model or "-"))
    table.add_row("best model", str(result.best_model or "-"))
    table.add_row("checkpoint", str(result.checkpoint_path or "-"))
    table.add_row("W&B", str(result.wandb or "disabled"))
    table.add_row("metrics", storage.join(str(result.run_dir), "metrics.jsonl"))  # a URI for a bucket's run
    table.add_row("Ray logs", ray_logs_dir() or "-")  # every worker's output, which -v shows while it runs
    skipped = result.data.get("train", {}).get("bad_rows_skipped", 0)
    if skipped:
        table.add_row("bad rows skipped (train)", str(skipped))
    console.print(table)
    if result.start_vs_end:
        console.print(_start_table(result.start_vs_end))


def _start_table(comparison: dict) -> Table:
    """The run's end against the model it started from: per eval set start, end and change (a ratio for sizes
    and speeds, marked x); a new classification head has no start score, which the title says."""
    from orchestrator.start_vs_end import describe_reference, table_rows

    table = Table(title=f"against the start: {describe_reference(comparison)}", title_justify="left")
    for heading in ("eval set", "metric", "start", "end", "change"):
        table.add_column(heading, overflow="fold")
    for name, metric, start, end, change in table_rows(comparison):
        ratio = metric.endswith("(x)")
        table.add_row(name, metric, _shown(start), _shown(end),
                      "-" if change is None else f"{change:.3f}x" if ratio else f"{change:+.4f}")
    return table


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


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
            echo=lambda text: console.print(text, highlight=False, markup=False, end="", soft_wrap=True),
            secrets_file=secrets_file,
        )
    except OrchestratorError as exc:
        _fail(str(exc))
    if follow and status != "SUCCEEDED":
        _fail(f"job ended with status {status}", code=1)


@app.command()
def predict(
    # A str, not a Path: Path("s3://bucket/x") would fold the URI's "//" into "s3:/bucket/x".
    model_dir: str = typer.Argument(..., help="An exported model folder (<run>/final or <run>/best), or its URI."),
    texts: list[str] = typer.Argument(..., help="Texts to classify, or prompts for a causal LM."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Causal LM: most tokens per answer."),
) -> None:
    """Classify texts with an exported classifier and print label names with probabilities; with a causal LM,
    print each text's greedy answer (a chat model reads each text as a user turn)."""
    from orchestrator.models.predict import generate, generates_text
    from orchestrator.models.predict import predict as run_predict

    try:
        if generates_text(model_dir):
            answers = generate(model_dir, texts, max_new_tokens=max_new_tokens)
            for text, answer in zip(texts, answers):
                console.print(f"{text}\n  -> {answer}", highlight=False, markup=False)
            return
        predictions = run_predict(model_dir, texts)
    except OrchestratorError as exc:
        _fail(str(exc))
    for text, (label, probability) in zip(texts, predictions):
        console.print(f"{label:>12}  {probability:.3f}  {text}", highlight=False, markup=False)


@app.command()
def quantize(
    model: str = typer.Argument(
        ..., help="An exported model folder (<run>/final), its s3:// or gs:// URI, or a registered model's id or name."
    ),
    out: str = typer.Option(..., "--out", "-o", help="New folder (or URI) for the quantized model."),
    method: str = typer.Option("int8-dynamic", "--method", help="int8-dynamic (int8 weights and activations) or "
                               "int8-weight (int8 weights only: smaller, not faster on CPU)."),  # fmt: skip
    embeddings: str = typer.Option(
        "auto", "--embeddings", help="Input embedding: auto (int8 for classifiers, fp32 for causal LMs), int8, fp32."
    ),
    registry: Path = typer.Option(
        None, "--registry", "-r", envvar="ORCHESTRATOR_REGISTRY",
        help="Registry (default: the one the model is registered in; runs/registry.sqlite for a model id).",
    ),  # fmt: skip
    name: str = typer.Option(None, "--name", help="Registry name of the result (default <source name>-<method>)."),
    threads: int = typer.Option(None, "--threads", min=1, help="Torch threads for scoring and timing both models."),
) -> None:
    """Quantize a trained model on CPU (torchao int8), score it against its source on the source's eval sets (same
    process, same threads), write its model card and register it with the source as parent (method quantize)."""
    from orchestrator.lifecycle.quantization import quantize_model

    try:
        result = quantize_model(
            model, out, method=method, embeddings=embeddings, registry=registry, name=name, threads=threads
        )
    except OrchestratorError as exc:
        _fail(str(exc))
    console.print(_quantize_table(result))


def _quantize_table(result: QuantizeResult) -> Table:
    """The quantized model's scores beside its source's, size and latency ratios, where it went."""
    summary = result.metrics["quantize"]
    table = Table(title=f"quantized {result.source} ({summary['method']})")
    for column in ("", "parent", "quantized", "ratio / delta"):
        table.add_column(column, overflow="fold")
    for eval_set, values in result.metrics["eval"].items():
        before = summary["parent_eval"].get(eval_set, {})
        for metric in ("accuracy", "f1_macro", "exact_match", "perplexity", "loss"):
            if metric in values:
                old, new = before.get(metric, float("nan")), values[metric]
                table.add_row(f"{eval_set}/{metric}", f"{old:.4f}", f"{new:.4f}", f"{new - old:+.4f}")
    w, t = summary["weight_bytes"], summary["latency_s"]
    table.add_row("weight bytes", f"{w['parent']:,}", f"{w['quantized']:,}", f"{w['ratio']:.3f}x")
    latency = f"s per batch of {summary['latency_batch']} ({summary['threads']} threads)"
    table.add_row(latency, f"{t['parent']:.4f}", f"{t['quantized']:.4f}", f"{t['ratio']:.3f}x")
    record = result.record
    table.add_row("registered", record.id if record else "no (the source is in no registry; pass --registry)", "", "")
    table.add_row("model", result.out, "", "")
    return table


@app.command()
def sweep(
    config_path: Path = typer.Argument(None, help="YAML job file with a tune section."),
    overrides: list[str] = SetOption,
    resume: str = typer.Option(
        None, "--resume", help="Continue the sweep in this folder or URI (s3://...) after its driver died; no config "
        "file needed."
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
    table = Table(title=f"sweep {Path(str(result.sweep_dir)).name}: {result.metric} ({result.mode})")
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
