"""The user's terminal (issue 20, item 16): a run prints its own lines (progress with ETA for steps and
evaluation, scores, results, warnings that matter) and no other library's noise; ``-v`` shows everything.

Measured on the tiny job below (6 steps, 2 workers): 74 lines before (52 of them Ray/torch/DeepSpeed: the torch
FutureWarnings of every worker, Ray's PreemptionWatcher error line, "Reporting training result ..." dicts), 23
after, all the run's own.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from rich.console import Console

from orchestrator.terminal import ProgressView
from tests.conftest import tiny_job
from tests.test_wandb_failures import train_cli

START = {
    "kind": "start", "step": 0, "total_steps": 6, "resumed_from_step": None, "world_size": 2, "precision": "fp32",
    "params_trainable": 1000, "params_total": 1200, "data": {"eval": [{"name": "sst2", "rows": 96}]},
}


def _train(step: int) -> dict[str, Any]:
    return {"kind": "train", "step": step, "train/loss": 0.7, "train/lr": 1e-3, "train/samples_per_s": 50.0}


def _eval(step: int) -> dict[str, Any]:
    return {"kind": "eval", "step": step, "sst2/loss": 0.69, "sst2/accuracy": 0.5, "sst2/samples_per_s": 900.0}


WARNING = {"kind": "warning", "step": 2, "logger": "orchestrator.tracking", "message": "W&B failed at step 2 (...)"}


def test_without_a_terminal_the_view_prints_one_line_per_step_eval_and_warning():
    out = Console(record=True, width=200, force_terminal=False)
    records = [START, _train(1), _train(2), WARNING, _train(3), _eval(3)]
    with ProgressView(enabled=False, eval_every_steps=3, out=out) as view:
        view(records[:3])
        view(records)  # polled again: nothing printed twice
    assert out.export_text().splitlines() == [
        "workers: 2, precision fp32, parameters 1,000 trainable / 1,200",
        "step 1/6 loss 0.7000 lr 1.00e-03 50.0 samples/s",
        "step 2/6 loss 0.7000 lr 1.00e-03 50.0 samples/s",
        "warning: W&B failed at step 2 (...)",
        "step 3/6 loss 0.7000 lr 1.00e-03 50.0 samples/s",
        "eval @ step 3: sst2/loss 0.6900  sst2/accuracy 0.5000",
    ]


def test_on_a_terminal_evaluation_has_a_bar_whose_eta_is_the_last_evaluations_duration(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("orchestrator.terminal.time.monotonic", lambda: clock[0])
    out = Console(record=True, width=200, force_terminal=True)
    with ProgressView(enabled=True, eval_every_steps=3, out=out) as view:
        starting = view.progress.tasks[0]
        assert starting.description == "start" and starting.total is None  # a spinner until the workers report
        view([START, _train(1), _train(2), _train(3)])  # step 3 is an eval step: the evaluation runs now
        train, evaluation = view.progress.tasks
        assert (train.description, train.completed, train.total) == ("train", 3, 6)
        assert evaluation.description == "eval" and evaluation.total is None  # first one: no estimate yet
        clock[0] += 8.0
        view([START, _train(1), _train(2), _train(3), _eval(3)])  # it took 8 s
        assert not evaluation.visible
        records = [START, *map(_train, (1, 2, 3)), _eval(3), *map(_train, (4, 5, 6))]
        view(records)  # the last step: the final evaluation runs
        assert evaluation.visible and evaluation.total == 96 and evaluation.completed == 0
        clock[0] += 4.0
        view(records)
        assert evaluation.completed == pytest.approx(48)  # half of the 8 s the last one took
        clock[0] += 40.0
        view(records)
        assert evaluation.completed < 96  # slower than the estimate: never shown as done before it is
    assert "eval @ step 3: sst2/loss 0.6900" in out.export_text()


def test_the_eval_interval_is_learnt_from_the_first_evaluation_when_not_given(monkeypatch):
    view = ProgressView(enabled=True, out=Console(record=True, force_terminal=True))
    with view:
        view([START, _train(1), _train(2), _eval(2), _train(3), _train(4)])
        assert view.eval_every == 2 and view.eval_started is not None  # step 4 is an eval step


RUN_LINES = re.compile(
    r"^(workers: 2, precision fp32, parameters [\d,]+ trainable / [\d,]+"
    r"|step \d+/\d+ loss \d\.\d{4} lr \S+ [\d.]+ samples/s"
    r"|eval @ step \d+: (sst2/\w+ \d+\.\d{4}\s*)+"
    r"|\s*run quiet\s*"  # the result table: its title, then boxed rows
    r"|[┌│└├].*)$"
)
NOISE = ("(RayTrainWorker", "(TrainController", "FutureWarning", "PreemptionWatcher", "Reporting training result",
         "Token authentication", "Started a local Ray instance", "Setting accelerator")


@pytest.mark.slow
def test_a_run_prints_only_its_own_lines_and_verbose_shows_everything(tiny_models, shared_data, tmp_path):
    job = tiny_job("quiet", tiny_models["bert"], shared_data, tmp_path / "runs", stage=2)
    code, output = train_cli(job, tmp_path, {})
    assert code == 0, output[-4000:]
    lines = output.splitlines()
    assert [line for line in lines if not RUN_LINES.match(line)] == [], output
    assert len([line for line in lines if line.startswith("step ")]) == 6
    table = "".join(re.sub(r"[\s│]", "", line) for line in lines if line.startswith("│"))  # cells fold paths
    assert f"metrics{tmp_path / 'runs' / 'quiet' / 'metrics.jsonl'}" in table
    assert re.search(r"Raylogs/tmp/ray/session_[\w-]+/logs", table)  # where the workers' full output is

    job = tiny_job("loud", tiny_models["bert"], shared_data, tmp_path / "runs", stage=2, max_steps=2)
    code, output = train_cli(job, tmp_path, {}, "-v")
    assert code == 0, output[-4000:]
    shown = [marker for marker in NOISE if marker in output]
    assert {"(RayTrainWorker", "(TrainController", "Reporting training result", "FutureWarning"} <= set(shown), output
