"""One sweep trial: the whole job (a Ray Train run of DeepSpeed workers) inside a Ray Tune function trainable.

Ray 2.60 does not end the inner Train run when Tune stops a trial (ASHA, PBT, a stopper, the time budget):
its workers would train on and its placement group would stay reserved, so the next trial waits for
workers that never come. The trial therefore keeps a line to its Train run:

* :class:`ReportRelay` is a Train ``UserCallback`` that runs in the controller. Like
  ``ray.tune.integration.ray_train.TuneReportCallback`` it forwards rank 0's metrics (and the checkpoint
  path) of every report to Tune; unlike it, the trial function reports them with ``ray.tune.report`` (so a
  checkpoint can be registered for PBT, and a stop reaches this thread), and the controller waits until
  Tune has taken the result. Workers are then at most one report ahead of Tune's decision.
* When Tune stops the trial, ``ray.tune.report`` raises ``SystemExit`` here (or the session is found
  finished). The trial sets its :class:`StopSignal`; the workers leave their loop after the current step
  (rank 0 closes the W&B run marked early-stopped) and the run ends normally, freeing its placement group.
* If they do not within a grace time, the trial aborts the Train controller (``TrainController.abort``:
  workers shut down, placement group removed; its handle comes from :class:`ControllerAnnouncer`), and
  kills it if that does not finish either.
* :func:`trial_trainable` makes Tune's ``Trainable.stop`` wait for all this: by default it returns at once
  and the trial actor exits, cutting the cleanup short.

With ``output.dir`` on a bucket each trial is a bucket run (``orchestrator.run_outputs``): its run folder, Train
checkpoints and exports are there, the trial actor stages in a local scratch, and the trial's log is uploaded
beside its metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orchestrator.storage as storage
from orchestrator.config import JobConfig, config_from_dict
from orchestrator.run_outputs import SCRATCH_ENV, publish_file, remote_child, restore_file

# In a Tune checkpoint (PBT): which trial and Train run it came from, beside the Train checkpoint in train/.
POINTER_FILE = "origin.json"
GRACEFUL_STOP_S = 120.0  # a stopped trial's workers get this long to finish their step and close W&B
FINISH_TIMEOUT_S = 120.0  # a trial that already reported its last step gets this long to export and finish
ABORT_TIMEOUT_S = 20.0  # then each of: abort the controller, kill it
STOP_TIMEOUT_S = 240.0  # how long Trainable.stop waits for the trial function to end its Train run
TRIAL_LOG = "sweep_trial.log"
GRACEFUL_NOTE = "workers stopped after their step"

try:  # Train V2 callback base classes; the relay only runs with ray installed
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2.api.callback import UserCallback
except ImportError:  # pragma: no cover - ray is a dependency
    ControllerCallback = UserCallback = object  # type: ignore[misc,assignment]


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a sweep shares (sent to each trial actor).

    Attributes:
        base: the job as plain data, without its tune section, paths absolute.
        sweep_name: names the W&B group and prefixes every trial's job name.
        trials_dir: where each trial's run folder goes (``<trials_dir>/<sweep>-<trial id>``).
        metric: the metric Tune optimises (every forwarded result holds it).
        mode: 'max' or 'min'.
        use_gpu: whether trial workers take GPUs.
        checkpoints_to_tune: also hand every Train checkpoint to Tune (PBT exploits through them).
        scratch_root: the driver's ``ORCHESTRATOR_SCRATCH``, where a bucket trial stages its files (a trial actor
            runs in the cluster's environment, not the driver's; None: each node's default).
    """

    base: dict[str, Any]
    sweep_name: str
    trials_dir: str
    metric: str
    mode: str
    use_gpu: bool
    checkpoints_to_tune: bool = False
    scratch_root: str | None = None


def trial_job_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(plan: TrialPlan, params: dict[str, Any], trial_id: str) -> JobConfig:
    """The job a trial runs: the base job with the sampled values, named and tracked as part of the sweep."""
    overrides: list[tuple[str, Any]] = [(path, params[path]) for path in sorted(params)]
    overrides += [
        ("name", trial_job_name(plan.sweep_name, trial_id)),
        ("output.dir", plan.trials_dir),
        ("output.save_best", True),
        # A trial's result must reach Tune before it trains on: with async upload Ray reports a checkpointed result
        # only once its upload ends, so a trial ASHA (or a stopper, PBT) stops would train an interval or more past
        # the decision; that is the compute early stopping exists to save.
        ("output.checkpoint_upload", "sync"),
        ("training.metric", plan.metric),
        ("training.metric_mode", plan.mode),
        ("tracking.wandb.group", plan.sweep_name),
        ("tracking.wandb.run_name", trial_id),
        ("tracking.wandb.job_type", "trial"),
    ]
    return config_from_dict(plan.base, overrides)


class ReportRelay(UserCallback):
    """Runs in the Train controller: sends each report to the trial function and waits for it to be taken."""

    def __init__(self, inbox: Any, acks: Any):
        self._inbox = inbox
        self._acks = acks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray

        item = ("report", dict(metrics[0]), _checkpoint_location(checkpoint) if checkpoint else None)
        try:
            ray.get(self._inbox.actor.put_nowait.remote(item))
            self._acks.get(block=True, timeout=24 * 3600)
        except Exception:  # the trial is gone (its queues die with it): nothing to wait for
            return


def _checkpoint_location(checkpoint: Any) -> str:
    """A Train checkpoint's folder as a local path or a URI (Ray gives a bucket's path without its scheme)."""
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    if kind in ("s3", "gcs"):
        return f"{'gs' if kind == 'gcs' else 's3'}://{checkpoint.path}"
    return str(checkpoint.path)


class ControllerAnnouncer(ControllerCallback):
    """Runs in the Train controller: tells the trial function the controller's actor handle."""

    def __init__(self, inbox: Any):
        self._inbox = inbox

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        try:
            self._inbox.actor.put_nowait.remote(("controller", ray.get_runtime_context().current_actor, None))
        except Exception:
            return


class _Fit(threading.Thread):
    """``trainer.fit()`` in a thread, so the trial function can watch Tune while Train runs."""

    def __init__(self, trainer: Any):
        super().__init__(name="orchestrator-trial-fit", daemon=True)
        self.trainer = trainer
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from orchestrator.cluster.launcher import training_error

        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # re-raised by the trial function
            self.error = exc
            return
        # Workers that stopped on a non-finite loss end normally (so Train does not restart them); the trial failed
        # all the same: the trial function raises the error, and Tune records the trial as failed with its text.
        self.error = training_error(self.result)


class _Stopped(Exception):
    """Tune ended the trial's session while no report was in flight."""


def _tune_session_stopped() -> bool:
    # Tune's function trainable sets this event in Trainable.stop() (and drops the session afterwards);
    # no public API exposes it in Ray 2.60.
    from ray.train._internal.session import get_session

    session = get_session()
    return session is None or session.stop_event.is_set()


def _tune_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars only; the loop's ``done`` is renamed, since Tune reads ``done`` as 'stop this trial'."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            out["train_done" if key == "done" else key] = value
    return out


def _tune_checkpoint(folder: Path, train_checkpoint: str, trial_id: str, run_name: str, step: Any) -> Any:
    """A Tune checkpoint holding the trial's Train checkpoint (for PBT to hand to other trials) and where it
    came from. Tune persists it in the trial's folder, so it outlives Train's own checkpoint rotation."""
    from ray import tune

    if storage.is_uri(train_checkpoint):  # a bucket trial's checkpoint: Tune uploads this copy to its own folder
        storage.download(train_checkpoint, folder / "train")
    else:
        shutil.copytree(train_checkpoint, folder / "train", copy_function=_link_or_copy)
    (folder / POINTER_FILE).write_text(json.dumps({"trial_id": trial_id, "run_name": run_name, "step": step}))
    return tune.Checkpoint.from_directory(str(folder))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # Tune copies the folder right away; no need to copy twice
    except OSError:
        shutil.copy2(source, destination)


def start_point(
    trial_id: str, run_dir: Path, job_name: str, run_folder: str | None = None
) -> tuple[str | None, str]:
    """Where a trial's Train run starts: ``(init_checkpoint, run_name)``.

    * A fresh trial: no checkpoint, the Train run named after the job.
    * PBT handed it another trial's checkpoint: that checkpoint (copied into the trial's folder: for a run folder
      on a bucket, ``run_folder``, uploaded there, so workers on any node read it) and a new Train run name, so
      Train does not resume the trial's own earlier run instead.
    * Tune restarts the trial from its own checkpoint (the sweep is resumed): the Train run it last used,
      which resumes from its own storage.
    """
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, job_name
    with checkpoint.as_directory() as folder:
        pointer_file = Path(folder) / POINTER_FILE
        if not pointer_file.is_file():
            return None, job_name
        pointer = json.loads(pointer_file.read_text())
        if pointer["trial_id"] == trial_id:
            return None, pointer["run_name"]
        run_name = f"{job_name}-from-{pointer['trial_id']}-{pointer['step']}"
        if run_folder is not None and storage.is_uri(run_folder):
            remote = storage.join(run_folder, "inherited", run_name)
            if not storage.list_files(remote):  # a trial restarted after the upload reuses it
                storage.upload(Path(folder) / "train", remote)
            return remote, run_name
        inherited = run_dir / "inherited" / run_name
        if not inherited.exists():
            shutil.copytree(Path(folder) / "train", inherited)
    return str(inherited), run_name


def trial_trainable(plan: TrialPlan) -> type:
    """The Tune trainable of a sweep: :func:`run_trial` as a function trainable whose stop waits for the
    trial's Train run to end.

    Tune's function trainable does not wait for the function when it stops a trial (``session.finish(
    timeout=0)``), and the trial actor exits right after; the abort of the Train run would be cut off, and
    the run's placement group outlive it (it belongs to the job, not to the trial actor).
    """
    from ray.train._internal.session import get_session
    from ray.tune.trainable.function_trainable import wrap_function

    def sweep_trial(config: dict[str, Any]) -> None:
        run_trial(config, plan)

    class SweepTrial(wrap_function(sweep_trial)):  # type: ignore[misc]
        def cleanup(self) -> None:
            session = get_session()
            if session is not None and session.training_started:
                try:  # sets the stop event, then waits for run_trial to end the Train run and return
                    session.finish(timeout=STOP_TIMEOUT_S)
                except BaseException:
                    pass  # a training error is raised (and reported) by the base cleanup below
            super().cleanup()

    return SweepTrial


class StopSignal:
    """A flag the trial sets when Tune stops it; rank 0 of the Train run reads it after every step."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable: one whole job with ``params`` applied (dotted path -> value)."""
    import ray
    from ray import tune
    from ray.util.queue import Empty, Queue

    from orchestrator.cluster.launcher import build_trainer
    from orchestrator.cluster.preflight import preflight

    trial_id = tune.get_context().get_trial_id()
    if plan.scratch_root:  # before preflight: it names the trial's scratch (and build_trainer passes it on)
        os.environ[SCRATCH_ENV] = plan.scratch_root
    config = trial_config(plan, params, trial_id)
    checked = preflight(config, resume=True)
    init_checkpoint, run_name = start_point(trial_id, checked.run_dir, config.name, checked.run_folder)
    inbox = Queue(actor_options={"num_cpus": 0})  # controller -> trial: reports, the controller's handle
    acks = Queue(actor_options={"num_cpus": 0})  # trial -> controller: "result taken"
    stop_signal = ray.remote(num_cpus=0)(StopSignal).remote()
    trainer = build_trainer(
        checked,
        use_gpu=plan.use_gpu,
        callbacks=[ReportRelay(inbox, acks), ControllerAnnouncer(inbox)],
        init_checkpoint=init_checkpoint,
        run_name=run_name,
        stop_signal=stop_signal,
    )
    fit = _Fit(trainer)
    fit.start()
    run = _TrainRun(fit, inbox, acks, stop_signal, checked.run_dir, remote_child(checked.run_folder, TRIAL_LOG))
    try:
        while True:
            try:
                kind, payload, checkpoint_path = inbox.get(block=True, timeout=0.5)
            except Empty:
                if not fit.is_alive() and inbox.empty():
                    break
                if _tune_session_stopped():
                    raise _Stopped() from None
                continue
            if kind == "controller":
                run.controller = payload
                continue
            run.finishing = run.finishing or bool(payload.get("done"))
            try:
                if plan.metric in payload:
                    metrics = _tune_metrics(payload)
                    if checkpoint_path and plan.checkpoints_to_tune:
                        with tempfile.TemporaryDirectory(prefix="orch-tune-ckpt-") as tmp:
                            step = payload.get("step")
                            checkpoint = _tune_checkpoint(Path(tmp), checkpoint_path, trial_id, run_name, step)
                            tune.report(metrics, checkpoint=checkpoint)
                    else:
                        tune.report(metrics)
            finally:
                acks.put("taken")
    except BaseException as exc:
        why = "Tune stopped the trial" if isinstance(exc, (SystemExit, _Stopped)) else f"the trial failed: {exc!r}"
        run.note(f"{why}; ending its Train run")
        run.end()
        raise
    fit.join()
    if fit.error is not None:
        raise fit.error
    from orchestrator.lifecycle.model_card import write_run_cards

    # The trial's exports get their cards here: the sweep's best_model is a copy of one of them.
    write_run_cards(checked.config, checked.run_folder or checked.run_dir, model_path=checked.model_path,
                    data=checked.data.summary())  # fmt: skip


@dataclass
class _TrainRun:
    """The trial's Train run as the trial function sees it, and how to end it early."""

    fit: _Fit
    inbox: Any
    acks: Any
    stop_signal: Any
    run_dir: Path
    log_uri: str | None = None  # on a bucket: where the trial's log is uploaded after every line
    controller: Any = None
    finishing: bool = False  # the last step was reported: the run is exporting and closing W&B

    def note(self, text: str) -> None:
        """A line in the trial's own log (``<run dir>/sweep_trial.log``): how its Train run ended."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.log_uri is not None:  # a resumed trial on a fresh scratch continues the bucket's log
            try:
                restore_file(self.log_uri, self.run_dir / TRIAL_LOG)
            except OSError:
                pass  # the line is still recorded locally; how a trial ended must not fail its cleanup
        with open(self.run_dir / TRIAL_LOG, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        if self.log_uri is not None:
            try:
                publish_file(self.run_dir / TRIAL_LOG, self.log_uri)
            except OSError:
                pass  # a log line is not worth failing the trial's cleanup; the next note uploads it again

    def end(self) -> None:
        """Ask the workers to stop after their current step (they close W&B and return, the run frees its
        placement group); if they have not within the grace time, abort the controller, then kill it."""
        import ray

        started = time.monotonic()
        try:
            ray.get(self.stop_signal.set.remote(), timeout=ABORT_TIMEOUT_S)
        except Exception as exc:
            self.note(f"could not set the stop signal: {exc!r}")
        self.acks.put_nowait("stopping")  # a relay may be waiting for its report to be taken
        self._wait(FINISH_TIMEOUT_S if self.finishing else GRACEFUL_STOP_S)
        if not self.fit.is_alive():
            self.note(f"Train run ended in {time.monotonic() - started:.1f}s ({GRACEFUL_NOTE})")
            return
        self._wait(ABORT_TIMEOUT_S, until_controller=True)
        if self.controller is None:
            self.note("no Train controller started; nothing to end")
            return
        try:
            ray.get(self.controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except Exception as exc:  # abort ends with the actor exiting: an actor error is the normal outcome
            self.note(f"aborted the controller ({type(exc).__name__})")
        self._wait(ABORT_TIMEOUT_S)
        if self.fit.is_alive():
            self.note("the controller did not abort in time; killing it")
            ray.kill(self.controller, no_restart=True)  # workers fate-share; Train's cleaner frees the group
            self._wait(ABORT_TIMEOUT_S)
        self.note(f"Train run ended in {time.monotonic() - started:.1f}s (fit thread alive: {self.fit.is_alive()})")

    def _wait(self, seconds: float, *, until_controller: bool = False) -> None:
        """Wait for the fit to end, taking (not reporting) whatever the controller still sends."""
        deadline = time.monotonic() + seconds
        while self.fit.is_alive() and time.monotonic() < deadline:
            if until_controller and self.controller is not None:
                return
            try:
                kind, payload, _ = self.inbox.get(block=True, timeout=0.5)
            except Exception:
                continue
            if kind == "controller":
                self.controller = payload
            else:
                self.acks.put_nowait("taken")


def ended_gracefully(run_dir: str | Path) -> bool:
    """Whether a stopped trial's workers ended on their own (so rank 0 closed and marked its W&B run); ``run_dir``
    is the trial's run folder, a local path or a URI."""
    log = storage.join(str(run_dir), TRIAL_LOG)
    return storage.is_file(log) and GRACEFUL_NOTE in storage.read_text(log)
