"""One sweep trial: the whole job (a Ray Train run of DeepSpeed workers) inside a Ray Tune function trainable.

Ray 2.60 does not end the inner Train run when Tune stops a trial (ASHA, PBT, a stopper, the time budget):
its workers would train on and its placement group would stay reserved, so the next trial waits for
workers that never come. The trial therefore keeps a line to its Train controller:

* :class:`ReportRelay` is a Train ``UserCallback`` that runs in the controller. Like
  ``ray.tune.integration.ray_train.TuneReportCallback`` it forwards rank 0's metrics (and the checkpoint
  path) of every report to Tune; unlike it, the trial function reports them with ``ray.tune.report`` (so a
  checkpoint can be registered for PBT, and a stop reaches this thread), and the controller waits until
  Tune has taken the result. Workers are then at most one report ahead of Tune's decision.
* :class:`ControllerAnnouncer` hands the controller's actor handle to the trial when the controller starts.
* When Tune stops the trial, ``ray.tune.report`` raises ``SystemExit`` here (or the session is found
  finished). The trial then aborts the controller (``TrainController.abort``: workers shut down, placement
  group removed), kills it if that does not finish in time, and waits for ``fit`` to return.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig, config_from_dict

# Name of the file in a Tune checkpoint that points at the trial's Ray Train checkpoint.
POINTER_FILE = "train_checkpoint.json"
ABORT_TIMEOUT_S = 30.0
FINISH_TIMEOUT_S = 300.0  # a trial that already reported its last step gets this long to export and finish

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
    """

    base: dict[str, Any]
    sweep_name: str
    trials_dir: str
    metric: str
    mode: str
    use_gpu: bool


def trial_job_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(plan: TrialPlan, params: dict[str, Any], trial_id: str) -> JobConfig:
    """The job a trial runs: the base job with the sampled values, named and tracked as part of the sweep."""
    overrides: list[tuple[str, Any]] = [(path, params[path]) for path in sorted(params)]
    overrides += [
        ("name", trial_job_name(plan.sweep_name, trial_id)),
        ("output.dir", plan.trials_dir),
        ("output.save_best", True),
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

        item = ("report", dict(metrics[0]), checkpoint.path if checkpoint else None)
        try:
            ray.get(self._inbox.actor.put_nowait.remote(item))
            self._acks.get(block=True, timeout=24 * 3600)
        except Exception:  # the trial is gone (its queues die with it): nothing to wait for
            return


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
        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # re-raised by the trial function
            self.error = exc


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


def _pointer_checkpoint(directory: Path, train_checkpoint: str, trial_id: str, step: Any) -> Any:
    from ray import tune

    (directory / POINTER_FILE).write_text(json.dumps({"path": train_checkpoint, "trial_id": trial_id, "step": step}))
    return tune.Checkpoint.from_directory(str(directory))


def donor_checkpoint(trial_id: str) -> dict[str, Any] | None:
    """The Train checkpoint another trial handed to this one (PBT exploit), or None.

    A pointer to this trial's own checkpoint (Tune restoring a trial after the driver died) is None too:
    the trial's Train run resumes from its own storage then.
    """
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        pointer_file = Path(folder) / POINTER_FILE
        if not pointer_file.is_file():
            return None
        pointer = json.loads(pointer_file.read_text())
    if pointer.get("trial_id") == trial_id:
        return None
    return pointer


def run_trial(params: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable: one whole job with ``params`` applied (dotted path -> value)."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from orchestrator.launcher import build_trainer, preflight

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(plan, params, trial_id)
    donor = donor_checkpoint(trial_id)
    checked = preflight(config, resume=True)
    inbox = Queue(actor_options={"num_cpus": 0})  # controller -> trial: reports, the controller's handle
    acks = Queue(actor_options={"num_cpus": 0})  # trial -> controller: "result taken"
    trainer = build_trainer(
        checked,
        use_gpu=plan.use_gpu,
        callbacks=[ReportRelay(inbox, acks), ControllerAnnouncer(inbox)],
        init_checkpoint=donor["path"] if donor else None,
        run_name=f"{config.name}-from-{donor['trial_id']}-{donor['step']}" if donor else None,
    )
    fit = _Fit(trainer)
    fit.start()
    controller = None
    finishing = False  # the last step was reported: the run is exporting and closing W&B
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
                controller = payload
                continue
            finishing = finishing or bool(payload.get("done"))
            try:
                if plan.metric in payload:
                    metrics = _tune_metrics(payload)
                    if checkpoint_path:
                        with tempfile.TemporaryDirectory(prefix="orch-pointer-") as tmp:
                            pointer = _pointer_checkpoint(Path(tmp), checkpoint_path, trial_id, payload.get("step"))
                            tune.report(metrics, checkpoint=pointer)
                    else:
                        tune.report(metrics)
            finally:
                acks.put("taken")
    except BaseException:
        _end_train_run(controller, fit, inbox, acks, finishing=finishing)
        raise
    fit.join()
    if fit.error is not None:
        raise fit.error


def _end_train_run(controller: Any, fit: _Fit, inbox: Any, acks: Any, *, finishing: bool) -> None:
    """End the trial's Train run: abort its controller (workers and placement group go), kill it if need be."""
    import ray

    if finishing:
        fit.join(timeout=FINISH_TIMEOUT_S)
        if not fit.is_alive():
            return
    for _ in range(3):  # release a relay waiting for "taken", so the controller can take the abort
        acks.put_nowait("stopping")
    deadline = time.monotonic() + ABORT_TIMEOUT_S
    while controller is None and fit.is_alive() and time.monotonic() < deadline:
        try:
            kind, payload, _ = inbox.get(block=True, timeout=0.5)
        except Exception:
            continue
        if kind == "controller":
            controller = payload
    if controller is None:
        return  # the controller never started (or the fit ended): nothing holds resources
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except Exception:
        pass  # abort ends with the actor exiting: an actor error is the normal outcome
    fit.join(timeout=ABORT_TIMEOUT_S)
    if fit.is_alive():
        ray.kill(controller, no_restart=True)  # its workers fate-share; Train's cleaner frees the placement group
        fit.join(timeout=ABORT_TIMEOUT_S)
