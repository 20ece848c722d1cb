"""Running a job on a Ray cluster: checks first, then a Ray Train ``TorchTrainer`` of DeepSpeed workers.

``preflight`` does every check that can be done without the cluster (config, model, data, output dir)
and reports all failures together; only then is Ray started and are workers reserved.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.budget import best_metric_name
from orchestrator.cluster.output_paths import ray_storage, run_folder_of
from orchestrator.cluster.preflight import Preflight, check_cluster_fits, preflight
from orchestrator.cluster.results import TrainResult
from orchestrator.cluster.run_lock import run_lock
from orchestrator.config import JobConfig
from orchestrator.errors import TrainingError
from orchestrator.run_outputs import SCRATCH_ENV, is_published
from orchestrator.start_vs_end import COMPARISON_KIND
from orchestrator.tracking import METRICS_FILE, read_metrics, verbose_output

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None, *, verbose: bool | None = None) -> None:
    """Connect to Ray at ``address`` (default ``RAY_ADDRESS``), or start a local cluster; no-op if connected.

    Unless ``verbose`` (default: ``ORCHESTRATOR_VERBOSE``, which ``-v`` sets), what Ray's workers and actors print
    stays in the Ray session's log files (``<session>/logs``) instead of being copied here: the run's own
    progress and warnings reach the terminal through ``metrics.jsonl`` (``orchestrator.tracking.Tracker``), and
    Ray's driver-side INFO lines and its token-auth notice are left out too.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    verbose = verbose_output() if verbose is None else verbose
    if not verbose:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Workers and the local head get the same environment; W&B reads WANDB_API_KEY from it.
    ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)


def build_trainer(
    checked: Preflight,
    *,
    use_gpu: bool,
    callbacks: list[Any] | None = None,
    run_name: str | None = None,
    init_checkpoint: str | None = None,
    stop_signal: Any = None,
    worker_callbacks: list[Any] | None = None,
) -> Any:
    """The Ray Train ``TorchTrainer`` of a checked job.

    Args:
        checked: the job as returned by :func:`preflight`.
        use_gpu: whether workers take GPUs (see :func:`check_cluster_fits`).
        callbacks: Ray Train callbacks for the run (sweeps pass the ones that report to Ray Tune).
        run_name: the Ray Train run name in storage (default: the job name; a run of that name resumes
            from its latest checkpoint).
        init_checkpoint: a Train checkpoint folder to start from when the run has none of its own (a PBT
            trial continuing another trial's model with its own hyperparameters).
        stop_signal: an actor handle whose ``is_set()`` tells the workers to stop after the current step
            (a sweep trial stopped by Ray Tune ends cleanly instead of being killed).
        worker_callbacks: ``orchestrator.train.callbacks.Callback`` objects every worker adds to the built-in
            ones (pickled to the workers; tests inject faults this way).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train import train_loop_per_worker

    config = checked.config
    s = config.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    payload = {
        "config": config.to_dict(),
        "data": checked.data,
        "model_path": checked.model_path,
        "run_dir": checked.run_folder or str(checked.run_dir),  # a URI when output.dir is one
        "scratch_root": os.environ.get(SCRATCH_ENV),  # where workers stage it (as cache_dir below)
        "init_checkpoint": init_checkpoint,
        "stop_signal": stop_signal,
        "callbacks": list(worker_callbacks or []),
        # data.packing's tokenized-block cache: the driver's ORCHESTRATOR_CACHE if set (workers of a running
        # cluster do not see the driver's environment), else each node's default.
        "cache_dir": os.environ.get("ORCHESTRATOR_CACHE"),
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name or config.name,
            **ray_storage(checked.storage_path),  # a URI: the bucket path and its pyarrow filesystem
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=_checkpoint_config(checked),
            callbacks=callbacks,
        ),
    )


def _checkpoint_config(checked: Preflight) -> Any:
    """Ray Train's retention: the latest N, or the best N by the run's metric (output.keep_checkpoints_by)."""
    from ray.train import CheckpointConfig

    output = checked.config.output
    if output.keep_checkpoints_by != "best":
        return CheckpointConfig(num_to_keep=output.keep_checkpoints)
    # Ray Train keeps the N best by this metric (every checkpoint is reported with an eval, see the config
    # check) and always the latest one, which is what a resume continues from.
    metric, mode = best_metric_name(checked.config, checked.data)
    return CheckpointConfig(
        num_to_keep=output.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=mode
    )


def run_training(
    config: JobConfig,
    *,
    resume: bool = False,
    address: str | None = None,
    source: str | None = None,
    progress: Any = None,
    worker_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Run a job end to end on a Ray cluster (a local one is started if none is given).

    Args:
        config: the validated job.
        resume: continue a run whose checkpoints exist in storage (after a killed driver).
        address: Ray address; default RAY_ADDRESS or a new local cluster.
        source: the config file name, for error messages.
        progress: called with the run's metrics records while training runs (for progress bars).
        worker_callbacks: extra step-loop callbacks for every worker (see :func:`build_trainer`).
    """
    # One driver per run folder, from before preflight's checks until the model is registered (run_lock.py).
    with run_lock(run_folder_of(config), config.name):
        checked = preflight(config, resume=resume, source=source)
        if config.output.registry:  # a model registered at this run's final/ gets a folder this run cannot touch
            from orchestrator.lifecycle.run_registration import protect_registered_exports

            protect_registered_exports(config, checked.run_dir)
        ensure_ray(address)
        use_gpu = check_cluster_fits(config)
        trainer = build_trainer(checked, use_gpu=use_gpu, worker_callbacks=worker_callbacks)
        result = _fit_with_progress(trainer, checked, progress)
        train_result = _train_result(checked, result)
        from orchestrator.lifecycle.model_card import write_run_cards

        # Cards before registration: a registered model's version folder holds its card too.
        write_run_cards(checked.config, train_result.run_dir, model_path=checked.model_path, data=train_result.data)
        # Model registry (issue #6): every job that exports a model registers it as a candidate.
        if config.output.registry:
            from orchestrator.lifecycle.run_registration import register_run

            # The checked config: what the run used (W&B may have fallen back to offline in preflight).
            record = register_run(checked.config, train_result, checked)
            train_result.model_id = record.id if record is not None else None
    return train_result


def _fit_with_progress(trainer: Any, checked: Preflight, progress: Any) -> Any:
    """``trainer.fit()`` in a thread, calling ``progress`` with the run's records every second meanwhile (from
    the local copy rank 0 writes when it runs on this node, else from the run folder, a bucket's copy lagging
    by up to one eval/checkpoint interval)."""
    outcome: dict[str, Any] = {}

    def records() -> list[dict[str, Any]]:
        local = checked.run_dir / METRICS_FILE
        return read_metrics(checked.run_dir if local.is_file() else checked.run_folder or checked.run_dir)

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # surfaced in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="orchestrator-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)
        if progress is not None:
            progress(records())
    if progress is not None:
        progress(records())
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def training_error(result: Any) -> TrainingError | None:
    """The error a run's workers stopped on without failing (a non-finite loss), if any: rank 0's return value
    (``train_loop_per_worker``). Such a run ends normally so that Ray Train does not restart it into the same
    error; its caller raises this instead (``run_training``; a sweep trial, recorded as failed)."""
    value = getattr(result, "return_value", None)
    return value if isinstance(value, TrainingError) else None


def _train_result(checked: Preflight, result: Any) -> TrainResult:
    """What the run left: final metrics (the last report, else the last eval record), exports, W&B run folder.

    Raises:
        TrainingError: when the workers stopped on an error of the run (a non-finite loss, naming the step).
    """
    error = training_error(result)
    if error is not None:
        raise error
    folder = checked.run_folder or str(checked.run_dir)  # a URI run: the bucket's copies, uploaded at the end
    records = read_metrics(folder)
    evals = [r for r in records if r.get("kind") == "eval"]
    final_metrics = dict(result.metrics or (evals[-1] if evals else {}))
    wandb_path = None
    wandb_dirs = sorted((checked.run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    if wandb_dirs:
        wandb_path = str(wandb_dirs[-1])
    exports = {name: _output(folder, name) for name in ("final", "best")}
    return TrainResult(
        run_dir=_output(folder),
        metrics=final_metrics,
        best_metric=final_metrics.get("best_metric"),
        final_model=exports["final"] if is_published(exports["final"]) else None,
        best_model=exports["best"] if is_published(exports["best"]) else None,
        checkpoint_path=_checkpoint_uri(checked, result.checkpoint),
        wandb=wandb_path,
        data=_data_summary(checked, records),
        start_vs_end=_comparison(records),
    )


def _comparison(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's last ``start_vs_end`` record (rank 0 writes one after its last eval), without its bookkeeping."""
    found = [r for r in records if r.get("kind") == COMPARISON_KIND]
    return {k: v for k, v in found[-1].items() if k not in ("kind", "step", "time")} if found else None


def _data_summary(checked: Preflight, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The data summary of the run's last start record (rank 0's: it counts the rows the workers' encoders
    dropped with ``data.on_bad_rows: skip`` besides the scan's), else the driver's scan."""
    starts = [r for r in records if r.get("kind") == "start" and isinstance(r.get("data"), dict)]
    return starts[-1]["data"] if starts else checked.data.summary()


def _output(folder: str, *parts: str) -> Path | str:
    """A path in the run folder: a ``Path`` for a local run (as before), the URI string for a bucket's."""
    joined = storage.join(folder, *parts)
    return joined if storage.is_uri(joined) else Path(joined)


def _checkpoint_uri(checked: Preflight, checkpoint: Any) -> str | None:
    """The run's last checkpoint as a path or URI (Ray gives a bucket's path without its scheme)."""
    if checkpoint is None:
        return None
    if storage.is_uri(checked.storage_path):
        return f"{storage.scheme_of(checked.storage_path)}://{checkpoint.path}"
    return checkpoint.path
