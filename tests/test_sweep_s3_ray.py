"""Sweeps whose ``output.dir`` is a bucket, end to end on a local Ray cluster and the real S3 server (moto): Tune's
experiment state, every trial's run folder (metrics.jsonl, final/, best/, Train checkpoints) and the sweep's
results (table, plot, event log, best_model/) on the bucket, nothing in a local runs/; and a sweep whose driver was
killed, its local scratch deleted, resumed from the bucket's URI alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.config import config_from_dict
from orchestrator.run_outputs import is_published
from orchestrator.tracking import read_metrics
from orchestrator.tune.sweep import resume_sweep, run_sweep
from orchestrator.tune.sweep_events import read_events
from orchestrator.tune.sweep_plan import EVENTS_FILE, SWEEP_CONFIG_FILE
from tests.conftest import tiny_job
from tests.support.drivers import kill_driver_when

pytestmark = pytest.mark.slow
STEPS = 4


def _job(name: str, bucket: str, tiny_models: dict, shared_data: Path, tmp_path: Path, tune: dict) -> dict[str, Any]:
    # One worker per trial: two trials fit at once on the test cluster's 4 CPUs.
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, max_steps=STEPS, eval_every_steps=2,
                   checkpoint_every_steps=2, lr_schedule="constant")
    job["scaling"]["num_workers"] = 1
    job["output"] = {"dir": f"{bucket}/sweeps", "registry": None}
    job["tune"] = {"metric": "sst2/loss", "num_samples": 1, "scheduler": "none", **tune}
    return job


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (where a local runs/ would appear) and the driver's scratch beside it."""
    monkeypatch.setenv("ORCHESTRATOR_SCRATCH", str(tmp_path / "scratch"))
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _assert_nothing_local(workdir: Path, tmp_path: Path) -> None:
    assert sorted(os.listdir(workdir)) == []
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("s3*"))


@pytest.mark.ci
def test_a_sweep_on_a_bucket_keeps_its_experiment_trials_and_results_there(
    ray_cluster, s3_server, s3_bucket, tiny_models, shared_data, tmp_path, workdir
):
    tune = {"search_space": {"training.lr": "grid([0.001, 0.002])"}, "max_concurrent_trials": 2}
    result = run_sweep(config_from_dict(_job("sw-s3", s3_bucket, tiny_models, shared_data, tmp_path, tune)))

    folder = f"{s3_bucket}/sweeps/sw-s3"
    assert result.sweep_dir == folder
    assert [t.status for t in result.trials] == ["completed", "completed"]
    bucket, prefix = s3_bucket[5:], "sweeps/sw-s3/"
    keys = s3_server.keys(bucket, prefix)
    rel = [k[len(prefix):] for k in keys]
    # Tune's experiment state, restorable from the URI.
    assert any(k.startswith("tune/experiment_state") for k in rel) and "tune/tuner.pkl" in rel
    for t in result.trials:
        assert t.run_dir == f"{folder}/trials/sw-s3-{t.trial_id}" and t.steps == STEPS
        trial = f"trials/sw-s3-{t.trial_id}/"
        assert trial + "metrics.jsonl" in rel and trial + "final/config.json" in rel
        assert is_published(f"{t.run_dir}/final") and is_published(f"{t.run_dir}/best")
        assert any(k.startswith(f"{trial}ray/sw-s3-{t.trial_id}/checkpoint_") for k in rel), rel
        assert [r["step"] for r in read_metrics(t.run_dir) if r["kind"] == "eval"] == [2, 4]
    # The sweep's own results.
    for name in ("results.csv", "results.json", "learning_curves.png", EVENTS_FILE, SWEEP_CONFIG_FILE):
        assert name in rel, name
    assert result.results_json == f"{folder}/results.json" and result.results_csv == f"{folder}/results.csv"
    summary = json.loads(storage.read_text(result.results_json))
    assert result.best is not None and summary["best_trial"] == result.best.trial_id
    assert summary["best_model"] == f"{folder}/best_model" == result.best_model and is_published(result.best_model)
    assert storage.read_bytes(f"{folder}/learning_curves.png")[:4] == b"\x89PNG"
    assert sum(e["event"] == "complete" for e in read_events(folder)) == 2
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(storage.download(result.best_model, tmp_path / "best"))
    _assert_nothing_local(workdir, tmp_path)


def test_a_killed_bucket_sweep_resumes_from_the_uri_after_its_scratch_is_lost(
    ray_cluster, s3_server, s3_bucket, tiny_models, shared_data, tmp_path, workdir
):
    # Two trials, one at a time; the driver is killed while the second trains, its scratch deleted.
    tune = {"search_space": {"training.lr": "grid([0.001, 0.002])"}, "max_concurrent_trials": 1}
    job = _job("sw-s3r", s3_bucket, tiny_models, shared_data, tmp_path, tune)
    job["training"]["max_steps"] = 12  # long enough for the kill to land mid-trial
    folder = f"{s3_bucket}/sweeps/sw-s3r"

    def second_trial_checkpointed() -> tuple[list[dict[str, Any]], str] | None:
        """The sweep's events and its second trial, once that trial registered a checkpoint on the bucket (the
        resume must continue from it)."""
        events = read_events(folder)
        started = list(dict.fromkeys(e["trial_id"] for e in events if e["event"] == "start"))
        second = started[1] if len(started) > 1 else None
        snapshot = f"{folder}/trials/sw-s3r-{second}/ray/sw-s3r-{second}/checkpoint_manager_snapshot.json"
        return (events, second) if second and storage.exists(snapshot) else None

    events, second = kill_driver_when("orchestrator.tune.sweep:run_sweep", job, ray=ray_cluster, workdir=workdir,
                              ready=second_trial_checkpointed, poll=0.5)  # fmt: skip
    assert [e["event"] for e in events].count("complete") == 1
    first_id = next(e["trial_id"] for e in events if e["event"] == "complete")
    shutil.rmtree(tmp_path / "scratch")  # only the bucket knows the sweep now

    result = resume_sweep(folder + "/")

    assert result.sweep_dir == folder
    assert [t.status for t in result.trials] == ["completed", "completed"]
    assert all(t.steps == 12 for t in result.trials)
    first = next(t for t in result.trials if t.trial_id == first_id)
    assert [r["kind"] for r in read_metrics(first.run_dir)].count("start") == 1  # not re-run
    starts = [r for r in read_metrics(next(t for t in result.trials if t.trial_id == second).run_dir)
              if r["kind"] == "start"]  # fmt: skip
    # Continued from the checkpoint the killed driver's trial left on the bucket, not from scratch.
    assert starts[0]["resumed_from_step"] is None and (starts[-1]["resumed_from_step"] or 0) >= 2
    assert is_published(result.best_model) and storage.is_file(f"{folder}/results.json")
    assert [e["event"] for e in read_events(folder)].count("sweep_start") == 2
    _assert_nothing_local(workdir, tmp_path)
