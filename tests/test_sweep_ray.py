"""Sweeps on a local Ray cluster: Ray Tune trials that are each a 2-worker DeepSpeed job (tiny BERT, real SST-2
rows). ASHA stops a trial, and the stopped trial's Train workers and placement group must be gone; every trial
streams to its own W&B run in the sweep's group; a failing trial is recorded and the sweep goes on; a sweep
whose driver was killed resumes without re-running finished trials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import config_from_dict
from orchestrator.tracking import read_metrics
from orchestrator.tune.sweep import resume_sweep, run_sweep
from orchestrator.tune.sweep_plan import EVENTS_FILE, SWEEP_CONFIG_FILE, TRIALS_DIR
from tests.conftest import REPO, tiny_job
from tests.support.wandb_offline import OfflineRun, find_offline_runs

pytestmark = pytest.mark.slow

GOOD_LRS = (1e-3, 2e-3)
BAD_LR = 0.3  # Adam steps of 0.3 wreck the tiny model: eval loss ~4 where good trials have ~0.69


def _sweep_job(name: str, model: Path, data: Path, out: Path, tune_section: dict[str, Any]) -> dict[str, Any]:
    job = tiny_job(
        name, model, data, out, max_steps=8, eval_every_steps=2, checkpoint_every_steps=2, lr_schedule="constant"
    )
    job["tune"] = {"metric": "sst2/loss", **tune_section}
    return job


def _assert_cluster_released(ray: Any, timeout_s: float = 90.0) -> None:
    """Every placement group removed, all CPUs free, no Train worker or controller left."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources()["CPU"]
        actors = list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE")],
            raise_on_missing_output=False,
        )
        train_actors = [a.class_name for a in actors if a.class_name in ("RayTrainWorker", "TrainController")]
        if not groups and free == total and not train_actors:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"resources still held: placement groups {groups}, CPU {free}/{total}, actors {train_actors}")
        time.sleep(2)


def _runs_by_id(root: Path) -> dict[str, list[OfflineRun]]:
    """Offline W&B runs grouped by run id (a run resumed to mark its status is a second folder, same id)."""
    runs: dict[str, list[OfflineRun]] = {}
    for run in find_offline_runs(root):
        runs.setdefault(run.run_id, []).append(run)
    return runs


@pytest.mark.ci
def test_asha_stops_a_trial_and_its_workers_and_placement_group_are_freed(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    # Two good learning rates run first (2 trials fit at once on 4 CPUs); the bad one starts when a slot
    # frees and is compared at ASHA's first rung against the good ones' results: stopped after 1 eval.
    space = {"training.lr": f"grid([{GOOD_LRS[0]}, {GOOD_LRS[1]}, {BAD_LR}])"}
    tune_section = {"search_space": space, "num_samples": 1, "scheduler": "asha", "max_concurrent_trials": 2}
    job = _sweep_job("sw-asha", tiny_models["bert"], shared_data, tmp_path, tune_section)
    result = run_sweep(config_from_dict(job))

    by_lr = {t.params["training.lr"]: t for t in result.trials}
    assert sorted(by_lr) == sorted([*GOOD_LRS, BAD_LR])
    stopped = by_lr[BAD_LR]
    assert (stopped.status, stopped.stop_reason) == ("early_stopped", "asha")
    assert [s for s, _ in stopped.history] == [2] and stopped.best_metric > 1.0
    assert stopped.steps < 8  # optimizer steps it trained: the eval interval ASHA judged, and at most a few more
    # The good trial that reaches a rung second may be stopped too (it trails the first by a hair); the
    # first one never is.
    completed = [t for t in result.trials if t.status == "completed"]
    assert completed and all(t.params["training.lr"] in GOOD_LRS for t in completed)
    for t in completed:
        assert t.steps == 8 and [s for s, _ in t.history] == [2, 4, 6, 8]
    early = [t for t in result.trials if t.status == "early_stopped"]
    assert all(t.stop_reason == "asha" for t in early) and len(early) + len(completed) == 3

    # Each stopped trial's Train run was ended: its workers stopped training (they would have reached step
    # 8 in seconds), and nothing any trial held is left on the cluster.
    _assert_cluster_released(ray_cluster)
    trained = {t.trial_id: [r["step"] for r in read_metrics(Path(t.run_dir)) if r["kind"] == "train"] for t in early}
    assert all(max(steps) < 8 for steps in trained.values())
    time.sleep(3)
    for t in early:
        assert [r["step"] for r in read_metrics(Path(t.run_dir)) if r["kind"] == "train"] == trained[t.trial_id]
        # Ended cleanly: the workers left their loop after Tune's stop, with no abort needed.
        assert "workers stopped after their step" in (Path(t.run_dir) / "sweep_trial.log").read_text()

    # The table (CSV + JSON), plot and best model.
    assert result.best is not None and result.best.params["training.lr"] in GOOD_LRS
    saved = json.loads(result.results_json.read_text())
    assert saved["best_trial"] == result.best.trial_id and len(saved["trials"]) == 3
    rows = result.results_csv.read_text().splitlines()
    assert rows[0].startswith("trial_id,status,stop_reason,best sst2/loss") and len(rows) == 4
    assert any(",early_stopped,asha," in row for row in rows)
    assert result.plot is not None and result.plot.read_bytes()[:4] == b"\x89PNG"
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(result.best_model)

    # W&B: one run per trial, grouped under the sweep, named by trial id, hyperparameters in the config;
    # the stopped trial marked; a summary run names the best trial.
    runs = _runs_by_id(result.sweep_dir)
    trial_runs = {rid: parts for rid, parts in runs.items() if parts[0].job_type == "trial"}
    assert len(trial_runs) == 3
    names = {}
    for parts in trial_runs.values():
        first = parts[0]
        assert first.group == "sw-asha"
        trial = next(t for t in result.trials if t.trial_id == first.name)
        names[first.name] = trial
        assert first.config["name"] == f"sw-asha-{trial.trial_id}"
        assert first.config["training"]["lr"] == pytest.approx(trial.params["training.lr"])
        evals = [h["_step"] for p in parts for h in p.history if "sst2/loss" in h]
        tune_evals = [s for s, _ in trial.history]
        if trial.status == "completed":
            assert evals == tune_evals  # streamed at every eval
        else:  # the workers may get one eval further before they see Tune's stop
            assert evals[: len(tune_evals)] == tune_evals and max(evals) <= trial.steps
        assert len(parts) == 1 and first.exit_code == 0  # closed by rank 0, stopped trials too
        if trial.status == "early_stopped":
            assert first.summary["sweep/status"] == "early_stopped"
    assert set(names) == {t.trial_id for t in result.trials}
    (summary,) = [parts[0] for parts in runs.values() if parts[0].job_type == "sweep"]
    assert summary.group == "sw-asha"
    assert summary.summary["best_trial"] == result.best.trial_id
    assert summary.summary["early_stopped"] == len(early)


def _copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def test_failed_trial_is_recorded_and_a_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    # Three trials, one at a time: a good model, a model folder that does not exist (the trial fails and
    # the sweep goes on), and a copy of the good model. The driver is killed once the first trial finished.
    good = tiny_models["bert"]
    other = _copy_model(good, tmp_path / "bert-copy")
    missing = tmp_path / "no-such-model"
    space = {"model.path": f"grid([{good}, {missing}, {other}])"}
    tune_section = {"search_space": space, "num_samples": 1, "scheduler": "none", "max_concurrent_trials": 1}
    job = _sweep_job("sw-resume", good, shared_data, tmp_path / "out", tune_section)
    config_file = tmp_path / "sweep.json"
    config_file.write_text(json.dumps(job))
    sweep_dir = tmp_path / "out" / "sw-resume"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, ray; from orchestrator.config import config_from_dict; "
            "from orchestrator.tune.sweep import run_sweep; ray.init(address=sys.argv[2], log_to_driver=False); "
            "run_sweep(config_from_dict(json.load(open(sys.argv[1]))))",
            str(config_file),
            ray_cluster.get_runtime_context().gcs_address,
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 400
        events: list[dict] = []
        while time.monotonic() < deadline and driver.poll() is None:
            if (sweep_dir / EVENTS_FILE).exists():
                events = [json.loads(line) for line in (sweep_dir / EVENTS_FILE).read_text().splitlines()]
            if sum(e["event"] in ("complete", "error") for e in events) >= 2:
                break
            time.sleep(1)
        assert driver.poll() is None, "the sweep ended before it could be interrupted"
        assert sum(e["event"] == "complete" for e in events) == 1
        time.sleep(8)  # the third trial is training now
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    first_id = next(e["trial_id"] for e in events if e["event"] == "complete")
    first_dir = sweep_dir / TRIALS_DIR / f"sw-resume-{first_id}"
    assert (sweep_dir / SWEEP_CONFIG_FILE).is_file()

    result = resume_sweep(sweep_dir)

    assert len(result.trials) == 3
    by_model = {Path(t.params["model.path"]).name: t for t in result.trials}
    assert by_model["no-such-model"].status == "error"
    assert "model.path" in by_model["no-such-model"].error
    assert by_model["bert"].status == "completed" and by_model["bert-copy"].status == "completed"
    assert by_model["bert"].trial_id == first_id
    # The finished trial ran once (one start record); the interrupted one ran on to the end.
    assert [r["kind"] for r in read_metrics(first_dir)].count("start") == 1
    assert by_model["bert-copy"].steps == 8
    _assert_cluster_released(ray_cluster)


def test_pbt_exploit_continues_the_donor_checkpoint_with_its_own_hyperparameters(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    # Two trials at once; at every 2nd eval the worse one (PBT's bottom half) takes the better one's
    # checkpoint and goes on with a mutated learning rate.
    tune_section = {
        "search_space": {"training.lr": "loguniform(1e-4, 1e-2)"},
        "num_samples": 2,
        "scheduler": "pbt",
        "pbt": {"perturbation_interval": 2, "quantile_fraction": 0.5, "resample_probability": 0.5},
        "max_concurrent_trials": 2,
        "seed": 0,
    }
    job = _sweep_job("sw-pbt", tiny_models["bert"], shared_data, tmp_path, tune_section)
    result = run_sweep(config_from_dict(job))

    assert [t.status for t in result.trials] == ["completed", "completed"]
    exploited = [t for t in result.trials if list((Path(t.run_dir) / "ray").glob("*-from-*"))]
    assert exploited, "no trial exploited another's checkpoint"
    for trial in exploited:
        (inherited,) = (Path(trial.run_dir) / "ray").glob("*-from-*")
        donor_id, donor_step = inherited.name.rsplit("-from-", 1)[1].rsplit("-", 1)
        assert donor_id != trial.trial_id and donor_id in {t.trial_id for t in result.trials}
        starts = [r for r in read_metrics(Path(trial.run_dir)) if r["kind"] == "start"]
        # The restart began at the donor's step, from its weights and optimizer state.
        assert starts[0]["resumed_from_step"] is None
        assert starts[-1]["resumed_from_step"] == int(donor_step) >= 4  # the donor's latest checkpoint
        assert trial.steps == 8
    _assert_cluster_released(ray_cluster)
