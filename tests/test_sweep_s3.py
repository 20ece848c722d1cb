"""A sweep whose ``output.dir`` is a bucket, without Ray: the plan is accepted and names URIs (the sweep folder,
the trials' folder, Tune's experiment storage through orchestrator.storage's filesystem), the driver stages in a
local scratch, a missing bucket is reported at output.dir before anything runs, an earlier sweep of the name is
found on the bucket, and the event log survives the loss of the scratch. Against the real S3 server (moto)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.tune.sweep_events import log_event, read_events
from orchestrator.tune.sweep_plan import EVENTS_FILE, TUNE_DIR, plan_sweep
from tests.conftest import tiny_job


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "scratch"
    monkeypatch.setenv("ORCHESTRATOR_SCRATCH", str(root))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return root


def _sweep(output_dir: str, tiny_models: dict, shared_data: Path, tmp_path: Path) -> Any:
    job = tiny_job("sw-s3", tiny_models["bert"], shared_data, tmp_path, max_steps=4, eval_every_steps=2)
    job["output"] = {"dir": output_dir, "registry": None}
    job["tracking"]["wandb"]["mode"] = "disabled"
    job["tune"] = {"metric": "sst2/loss", "search_space": {"training.lr": "grid([1e-3, 2e-3])"}}
    return config_from_dict(job)


def test_a_sweep_on_a_bucket_is_planned_with_uris_and_a_local_scratch(
    s3_bucket, scratch, tiny_models, shared_data, tmp_path
):
    from orchestrator.tune.sweep import _new_tuner, _trainable

    plan = plan_sweep(_sweep(f"{s3_bucket}/sweeps/", tiny_models, shared_data, tmp_path))

    assert plan.folder == f"{s3_bucket}/sweeps/sw-s3" and plan.on_bucket  # not <cwd>/s3:/...
    assert plan.location(TUNE_DIR) == f"{s3_bucket}/sweeps/sw-s3/tune"
    assert plan.sweep_dir.parent == scratch and plan.sweep_dir.name.startswith("sw-s3-")
    tuner = _new_tuner(plan, _trainable(plan, use_gpu=False), 1, verbose=False)
    run_config = tuner._local_tuner._run_config
    # Tune's experiment state goes to the bucket through the orchestrator's own pyarrow filesystem (endpoint,
    # credentials and timeouts from the environment), not a local folder named after the URI.
    assert run_config.storage_path == f"{s3_bucket[5:]}/sweeps/sw-s3"
    assert run_config.storage_filesystem is storage.filesystem_for(s3_bucket)
    assert (run_config.stop.sweep_dir, run_config.callbacks[0].sweep_dir) == (plan.folder, plan.folder)
    assert sorted(p.name for p in Path.cwd().iterdir()) == [] and not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("problem", ["missing bucket", "wrong credentials"])
def test_a_bad_bucket_is_reported_at_output_dir_before_anything_runs(
    problem, s3_bucket, scratch, tiny_models, shared_data, tmp_path, monkeypatch
):
    # The same write probe as a train run's output.dir (cluster/output_paths.py), in the sweep's preflight.
    bucket, expected = s3_bucket, "access denied while trying to write"
    if problem == "missing bucket":
        bucket, expected = "s3://no-such-bucket-here", "the bucket 'no-such-bucket-here' does not exist"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(ConfigError) as caught:
        plan_sweep(_sweep(f"{bucket}/sweeps", tiny_models, shared_data, tmp_path))
    issues = [i for i in caught.value.issues if i.location == "output.dir"]
    assert len(issues) == 1, caught.value.issues  # the probe's error only (no refusal of buckets)
    assert issues[0].message.startswith(f"{bucket}/sweeps/sw-s3: ") and expected in issues[0].message


def test_a_sweep_name_that_already_ran_on_the_bucket_is_refused_unless_resuming(
    s3_bucket, scratch, tiny_models, shared_data, tmp_path
):
    config = _sweep(s3_bucket, tiny_models, shared_data, tmp_path)
    storage.write_text(f"{s3_bucket}/sw-s3/{TUNE_DIR}/experiment_state.json", "{}")

    with pytest.raises(ConfigError) as caught:
        plan_sweep(config)
    (issue,) = [i for i in caught.value.issues if i.location == "name"]
    assert f"already ran in {s3_bucket}/sw-s3" in issue.message
    assert f"orchestrator sweep --resume {s3_bucket}/sw-s3" in issue.hint
    assert plan_sweep(config, resume=True).folder == f"{s3_bucket}/sw-s3"


def test_the_event_log_is_on_the_bucket_and_continues_after_the_scratch_is_lost(s3_bucket, scratch):
    folder = f"{s3_bucket}/sweeps/ev"
    log_event(folder, {"event": "start", "trial_id": "a"})
    assert storage.is_file(f"{folder}/{EVENTS_FILE}")
    shutil.rmtree(scratch)  # the driver's machine is gone
    log_event(folder, {"event": "complete", "trial_id": "a"})
    assert [e["event"] for e in read_events(folder)] == ["start", "complete"]


def test_resuming_a_bucket_folder_without_a_sweep_names_the_uri(s3_bucket, scratch):
    from orchestrator.tune.sweep import resume_sweep

    with pytest.raises(OrchestratorError, match=f"{s3_bucket}/nothing-here is not a sweep folder"):
        resume_sweep(f"{s3_bucket}/nothing-here/")


def test_the_sweep_command_resumes_a_bucket_uri_as_given(monkeypatch):
    from typer.testing import CliRunner

    import orchestrator.tune.sweep
    from orchestrator.cli import app
    from orchestrator.tune.sweep_results import SweepResult

    uri = "s3://bucket/sweeps/sw-s3"
    asked = []
    fake = SweepResult(sweep_dir=uri, metric="sst2/loss", mode="min", trials=[], best=None, best_model=None,
                       results_csv=f"{uri}/results.csv", results_json=f"{uri}/results.json", plot=None, wandb=None)

    def resume(sweep_dir: str, address: str | None = None) -> SweepResult:
        asked.append(sweep_dir)
        return fake

    monkeypatch.setattr(orchestrator.tune.sweep, "resume_sweep", resume)
    result = CliRunner().invoke(app, ["sweep", "--resume", uri], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert [str(a) for a in asked] == [uri]  # not s3:/bucket/... (what a Path makes of it)
    assert "sweep sw-s3" in result.output and f"{uri}/results.csv" in result.output


def test_a_bucket_trials_log_is_on_the_bucket_and_says_how_it_ended(s3_bucket, scratch):
    from orchestrator.tune.trial import GRACEFUL_NOTE, TRIAL_LOG, _TrainRun, ended_gracefully

    folder = f"{s3_bucket}/sweeps/sw/trials/sw-a_00000"
    run = _TrainRun(fit=None, inbox=None, acks=None, stop_signal=None, run_dir=scratch / "trial",
                    log_uri=f"{folder}/{TRIAL_LOG}")
    run.note("Tune stopped the trial; ending its Train run")
    shutil.rmtree(scratch)  # the trial actor's node is gone; the trial resumes elsewhere
    run.note(GRACEFUL_NOTE)
    lines = storage.read_text(f"{folder}/{TRIAL_LOG}").splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["Tune stopped the trial; ending its Train run", GRACEFUL_NOTE]
    assert ended_gracefully(folder)  # read on the driver from the bucket, as sweep_wandb does


def test_a_pbt_trial_on_a_bucket_inherits_its_donors_checkpoint_through_the_bucket(s3_bucket, tmp_path, monkeypatch):
    """A PBT exploit hands a trial another trial's checkpoint: on a bucket the copy goes to the trial's run folder
    there (a worker on another node cannot read the driver's scratch), and the workers open it from its URI."""
    import json

    import ray.tune

    from orchestrator.train.checkpointing import checkpoint_at
    from orchestrator.tune import trial
    from orchestrator.tune.trial import POINTER_FILE, start_point

    donor = tmp_path / "donor"
    (donor / "train" / "step_4").mkdir(parents=True)
    (donor / "train" / "step_4" / "model_states.pt").write_bytes(b"weights")
    (donor / POINTER_FILE).write_text(json.dumps({"trial_id": "t1", "run_name": "job", "step": 4}))
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: ray.tune.Checkpoint(str(donor)))
    run_folder = f"{s3_bucket}/sweeps/s/trials/t2"

    init, run_name = start_point("t2", tmp_path / "scratch" / "t2", "job", run_folder)

    assert run_name == "job-from-t1-4" and init == f"{run_folder}/inherited/job-from-t1-4"
    assert storage.read_bytes(f"{init}/step_4/model_states.pt") == b"weights"
    assert not (tmp_path / "scratch").exists()  # nothing only this node could read
    with checkpoint_at(init).as_directory() as folder:  # what the trial's workers open
        assert (Path(folder) / "step_4" / "model_states.pt").read_bytes() == b"weights"
    assert trial.start_point("t2", tmp_path / "local", "job")[0] == str(tmp_path / "local" / "inherited" / run_name)
