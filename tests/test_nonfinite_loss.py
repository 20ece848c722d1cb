"""A NaN or inf loss ends the run with a clear error naming the first step where it happened; it is not a worker
failure, so Ray Train does not restart it (``scaling.max_failures: -1`` used to restart from the checkpoint
forever), and no checkpoint, eval or export is written after it. The check stays on the device between the
steps that log, evaluate or checkpoint: no host sync per micro-batch."""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from orchestrator.budget import StepBudget
from orchestrator.errors import TrainingError
from orchestrator.train.callbacks import ThroughputLog
from orchestrator.train.checkpointing import TrainState
from orchestrator.train.recipe import MicroBatch


class _Tracker:
    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict[str, Any]]] = []

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self.records.append((kind, step, metrics))

    def summary(self, values: dict[str, Any]) -> None:
        pass


@dataclass
class _Run:
    rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: Any = field(default_factory=lambda: SimpleNamespace(get_lr=lambda: [0.5]))
    budget: StepBudget = field(default_factory=lambda: StepBudget(total_steps=10, batches_per_epoch=4))
    state: TrainState = field(default_factory=TrainState)
    micro_batch: MicroBatch = field(default_factory=MicroBatch)
    tracker: _Tracker = field(default_factory=_Tracker)


@contextmanager
def _no_device_reads():
    """Fail on any read of a tensor's value by the host (``.item()``, ``float()``, ``bool()``, ``.tolist()``)."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the host read a tensor value")

    saved = {name: getattr(torch.Tensor, name) for name in ("item", "__float__", "__bool__", "tolist")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _micro_batches(guard: Any, run: _Run, losses: list[float], *, per_step: int = 2) -> list[int]:
    """Feed ``losses`` through the guard as the recipe does, ``per_step`` micro-batches to an optimizer step;
    returns the steps at which it read the check back."""
    checked = []
    for i, value in enumerate(losses):
        run.state.batch_in_epoch += 1
        run.micro_batch = MicroBatch(loss=torch.tensor(value), samples=8, tokens=64)
        guard.after_micro_batch(run)
        if (i + 1) % per_step == 0:
            run.state.step += 1
            guard.step_end(run)
            if guard.checked_at == run.state.step:
                checked.append(run.state.step)
    return checked


def test_a_nan_is_reported_at_the_next_step_that_logs_evaluates_or_checkpoints_naming_the_first_bad_step():
    from orchestrator.train.callbacks import NonFiniteLossGuard, StopRun

    guard, run = NonFiniteLossGuard(log_every=4, eval_every=None, checkpoint_every=6), _Run()
    with _no_device_reads():  # steps 1-3 neither log nor checkpoint: nothing is read back from the device
        _micro_batches(guard, run, [0.7, 0.6, 0.6, float("nan"), 0.5, float("inf")])
    assert run.state.step == 3
    with pytest.raises(StopRun) as stopped:
        _micro_batches(guard, run, [float("nan"), float("nan")])  # step 4 logs: the check happens here
    error = stopped.value.error
    assert isinstance(error, TrainingError)
    assert str(error).startswith("loss became nan at step 2 (epoch 0, batch 3")
    assert "training.lr" in str(error) and "no checkpoint was written" in str(error)
    assert stopped.value.step == 2
    assert [(kind, step) for kind, step, _ in run.tracker.records] == [("error", 2)]  # metrics.jsonl says it too


def test_every_check_point_syncs_and_finite_losses_never_stop_the_run():
    from orchestrator.train.callbacks import NonFiniteLossGuard, StopRun

    guard, run = NonFiniteLossGuard(log_every=5, eval_every=2, checkpoint_every=3), _Run()
    checked = _micro_batches(guard, run, [0.5] * 20, per_step=2)  # steps 1-10, the last is step 10: all finite
    assert run.state.step == 10
    assert checked == [2, 3, 4, 5, 6, 8, 9, 10]  # eval, checkpoint, log and the last step

    inf = NonFiniteLossGuard(log_every=100, eval_every=None, checkpoint_every=None)
    run = _Run()
    _micro_batches(inf, run, [1.0], per_step=1)
    inf.before_checkpoint(run)
    inf.after_checkpoint(run)  # a checkpoint at step 1 (say, a user's own schedule)
    _micro_batches(inf, run, [float("-inf")], per_step=1)
    with pytest.raises(StopRun, match=r"loss became -inf at step 2 .*the last checkpoint \(step 1\) is kept"):
        inf.before_checkpoint(run)  # whatever the schedule, a checkpoint is never written after a bad loss


def test_ranks_agree_on_the_earliest_bad_step(monkeypatch):
    from orchestrator.train.callbacks import NonFiniteLossGuard, StopRun

    """Each rank checks its own micro-batches; the gathered answer names the first bad step of any rank."""
    from orchestrator.train import callbacks

    def two_ranks(local: torch.Tensor) -> torch.Tensor:  # this rank saw nothing; the other one a NaN at step 3
        other = torch.tensor([3.0, 0.0, 5.0, float("nan")], dtype=local.dtype)
        return torch.stack([local, other])

    monkeypatch.setattr(callbacks, "_gather_from_ranks", two_ranks)
    guard, run = NonFiniteLossGuard(log_every=4, eval_every=None, checkpoint_every=None), _Run()
    with pytest.raises(StopRun, match=r"loss became nan at step 3 \(epoch 0, batch 5, rank 1\)"):
        _micro_batches(guard, run, [0.5] * 8)


def test_the_training_window_mean_loss_sums_on_the_device_and_logs_a_number():
    log, run = ThroughputLog(), _Run()
    with _no_device_reads():
        for value in (1.0, 3.0):
            run.micro_batch = MicroBatch(loss=torch.tensor(value), samples=8, tokens=100)
            log.after_micro_batch(run)
    values = log.log_values(run)
    assert values["train/loss"] == 2.0 and type(values["train/loss"]) is float
    json.dumps(values)  # metrics.jsonl takes it as it is


def test_the_driver_raises_the_training_error_a_run_returned():
    from orchestrator.cluster.launcher import training_error
    from orchestrator.tune.trial import _Fit

    returned = TrainingError("loss became nan at step 5 (epoch 0, batch 9, rank 1); lower training.lr")
    assert training_error(SimpleNamespace(return_value=returned)) is returned
    assert training_error(SimpleNamespace(return_value=None)) is None
    assert training_error(SimpleNamespace()) is None

    class Trainer:  # a sweep trial's Train run that ended on a non-finite loss
        def fit(self) -> Any:
            return SimpleNamespace(metrics=None, checkpoint=None, return_value=returned)

    fit = _Fit(Trainer())
    fit.start()
    fit.join()
    assert fit.error is returned  # the trial function raises it, and Tune records the trial as failed with it


@pytest.mark.slow
def test_a_nan_loss_with_unlimited_restarts_ends_with_the_error_and_keeps_the_last_good_checkpoint(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics
    from tests.conftest import tiny_job
    from tests.support.faults import PoisonLoss
    from tests.test_unfreeze_ray import _weights_at

    job = tiny_job("nan-loss", tiny_models["bert"], shared_data, tmp_path, stage=2, max_steps=6, log_every_steps=2)
    job["scaling"]["max_failures"] = -1
    job["output"]["keep_checkpoints"] = 5
    starts: list[int] = []
    restarted = threading.Event()

    def progress(records: list[dict[str, Any]]) -> None:  # fail fast instead of watching restarts forever
        starts[:] = [r["step"] for r in records if r["kind"] == "start"]
        if len(starts) > 1 and not restarted.is_set():
            restarted.set()
            raise AssertionError(f"Ray Train restarted the run: start records at steps {starts}")

    # Rank 1's loss is NaN at step 5, a step that neither logs nor checkpoints (log every 2, checkpoint every 3):
    # the check at step 6 (the last, which would log, evaluate, export and checkpoint) finds it.
    with pytest.raises(TrainingError, match=r"loss became nan at step 5 \(epoch 0, batch \d+, rank 1\)") as raised:
        run_training(config_from_dict(job), progress=progress, worker_callbacks=[PoisonLoss(step=5, rank=1)])
    assert "training.lr" in str(raised.value)

    run_dir = tmp_path / "nan-loss"
    records = read_metrics(run_dir)
    assert [r["kind"] for r in records].count("start") == 1  # no restart
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]  # step 6 was never logged
    errors = [r for r in records if r["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["step"] == 5 and "loss became nan" in errors[0]["message"]
    assert not (run_dir / "final").exists()
    checkpoints = sorted(p for p in (run_dir / "ray" / "nan-loss").glob("checkpoint_*") if p.is_dir())
    assert [json.loads((c / "train_state.json").read_text())["step"] for c in checkpoints] == [3]
    weights = _weights_at(checkpoints[0])  # the last good checkpoint loads, with finite weights
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_a_sweep_records_a_trial_whose_loss_became_nan_as_failed_with_the_error(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    """An Adam eps that is 0 in fp32 (1e-50) makes 0/0 of every weight whose gradient is 0 (the embedding rows of
    tokens not yet seen): the loss is NaN as soon as such a token comes. With unlimited restarts the trial's Train
    run must still end, and the sweep record the trial as failed with the message."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from orchestrator.tune.sweep_plan import TRIALS_DIR
    from tests.conftest import REPO
    from tests.test_sweep_ray import _sweep_job

    tune_section = {"search_space": {"training.lr": "grid([0.001])"}, "num_samples": 1, "scheduler": "none"}
    job = _sweep_job("sw-nan", tiny_models["bert"], shared_data, tmp_path / "out", tune_section)
    job["training"]["adam_eps"] = 1e-50
    job["scaling"]["max_failures"] = -1
    config_file = tmp_path / "sweep.json"
    config_file.write_text(json.dumps(job))
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, ray; from orchestrator.config import config_from_dict; "
            "from orchestrator.tune.sweep import run_sweep; ray.init(address=sys.argv[2], log_to_driver=False); "
            "result = run_sweep(config_from_dict(json.load(open(sys.argv[1]))), verbose=False); "
            "open(sys.argv[3], 'w').write(json.dumps([[t.status, t.error, t.stop_reason] for t in result.trials]))",
            str(config_file),
            ray_cluster.get_runtime_context().gcs_address,
            str(tmp_path / "trials.json"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "driver.log").open("w"),
    )
    trials = tmp_path / "out" / "sw-nan" / TRIALS_DIR
    try:
        deadline = time.monotonic() + 600
        while driver.poll() is None and time.monotonic() < deadline:
            starts = [line for f in trials.glob("*/metrics.jsonl") for line in f.read_text().splitlines()
                      if '"kind": "start"' in line]
            assert len(starts) <= 1, "Ray Train restarted the trial's run"
            time.sleep(1)
        assert driver.poll() is not None, "the sweep did not end"
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
    assert driver.returncode == 0, (tmp_path / "driver.log").read_text()[-3000:]
    [(status, error, stop_reason)] = json.loads((tmp_path / "trials.json").read_text())
    assert status == "error" and stop_reason == "nan"
    assert re.match(r"TrainingError: loss became nan at step \d+ \(epoch 0, batch \d+, rank \d\); lower training.lr",
                    error), error
