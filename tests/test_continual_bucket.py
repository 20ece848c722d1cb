"""Continual rounds whose base job's ``output.dir`` is a bucket (issue 18, outputs), without a cluster: a fake
trainer publishes each round's export to the bucket as a real run would, against a real S3 endpoint (moto's
server on 127.0.0.1). The round's own files (its training and replay data, eval holdout, ``round.yaml``,
``round.json``) go to the bucket, the champion is the bucket's version folder and the next round warm-starts
from its URI; the registry stays local, and bad output locations are refused before a round is claimed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import storage
from orchestrator.cluster.results import TrainResult
from orchestrator.config.retrain import retrain_from_dict
from orchestrator.errors import ConfigError, OrchestratorError
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.report import write_report
from orchestrator.lifecycle.rounds import run_round
from orchestrator.lifecycle.scheduler import RetrainScheduler
from orchestrator.run_outputs import publish_folder
from tests.test_continual import FakeClock, FakeJobClient, _base_model, _retrain_dict, _shard


@pytest.fixture(autouse=True)
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORCHESTRATOR_SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here: s3:/..., runs/
    return tmp_path / "cache"


class BucketTrainer:
    """Stands in for run_training on a bucket's output.dir: checks the round job's files can be read (as the
    preflight scan reads them), publishes a ``final/`` to the run folder on the bucket marker-last, and returns
    queued scores per eval set with the run folder and the export as URIs (as the launcher does)."""

    def __init__(self, scores: list[dict[str, float]]):
        self.scores = list(scores)
        self.jobs: list[Any] = []

    def __call__(self, config: Any, *, address: str | None = None, progress: Any = None) -> TrainResult:
        from orchestrator.data.sources import prepare_data

        self.jobs.append(config)
        data = prepare_data(config.data, config.model.task)
        folder = storage.join(config.output.dir, config.name)
        with tempfile.TemporaryDirectory() as staging:
            final = Path(staging) / "final"
            final.mkdir()
            (final / "config.json").write_text(json.dumps({"round": len(self.jobs)}))
            publish_folder(final, storage.join(folder, "final"))
        queued = self.scores.pop(0)
        metrics: dict[str, Any] = {"step": 3}
        for e in data.evals:
            metrics[f"{e.name}/accuracy"] = queued.get(e.name, queued.get("*", 0.9))
        return TrainResult(folder, metrics, None, storage.join(folder, "final"), None, None, None, data.summary())


def _bucket_spec(tmp_path: Path, bucket: str) -> dict[str, Any]:
    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)))
    spec["job"]["output"] = {"dir": f"{bucket}/runs", "registry": str(tmp_path / "registry" / "registry.sqlite")}
    spec["watch"] = {"dir": f"{bucket}/incoming", "settle_s": 0}
    return spec


def _upload_shard(tmp_path: Path, uri: str, rows: int, *, start: int = 0) -> str:
    storage.upload(_shard(tmp_path / "made", storage.name_of(uri), rows, start=start), uri)
    return uri


def test_two_rounds_on_a_bucket_write_every_round_file_there_and_warm_start_from_the_champion_uri(
    s3_bucket: str, tmp_path: Path
) -> None:
    loaded = retrain_from_dict(_bucket_spec(tmp_path, s3_bucket))
    registry = Registry(tmp_path / "registry" / "registry.sqlite")
    trainer = BucketTrainer([{"*": 0.9}, {"*": 0.9}])
    _upload_shard(tmp_path, f"{s3_bucket}/incoming/shard1.tsv", 40)

    first = run_round(loaded, registry=registry, train=trainer)
    assert first.status == "succeeded" and first.decision == "promote", first.reason
    round1 = f"{s3_bucket}/runs/sent-round1"
    assert first.run_dir == round1
    job1 = trainer.jobs[0]
    assert job1.output.dir == f"{s3_bucket}/runs" and job1.output.registry is None
    assert job1.data.train.path == f"{round1}/data/train.jsonl"
    assert [(e.name, e.path) for e in job1.data.eval][1] == ("shard1", f"{round1}/data/new_eval.jsonl")
    for name in ("data/train.jsonl", "data/new_train.jsonl", "data/new_eval.jsonl", "round.yaml", "round.json"):
        assert storage.is_file(f"{round1}/{name}"), name
    assert len(storage.read_text(f"{round1}/data/train.jsonl").splitlines()) == 32  # 40 rows less a 20% holdout
    assert yaml.safe_load(storage.read_text(f"{round1}/round.yaml"))["model"]["path"] == str(_base_model(tmp_path))
    assert json.loads(storage.read_text(f"{round1}/round.json"))["candidate"] == "sent-v1"
    v1 = registry.get("sent-v1")
    assert v1.status == "champion" and v1.artifact.startswith(f"{s3_bucket}/runs/registry-artifacts/sent/")
    assert json.loads(storage.read_text(f"{v1.artifact}/config.json")) == {"round": 1}  # the bucket's version folder
    learned = v1.data["continual"]["learned"]
    assert learned["source"]["path"] == f"{round1}/data/new_train.jsonl" and learned["rows"] == 32

    _upload_shard(tmp_path, f"{s3_bucket}/incoming/shard2.tsv", 30, start=1000)
    second = run_round(loaded, registry=registry, train=trainer)
    assert second.status == "succeeded" and second.decision == "promote", second.reason
    job2 = trainer.jobs[1]
    assert job2.model.path == v1.artifact  # warm start from the champion's URI on the bucket
    assert [e.name for e in job2.data.eval] == ["fixed", "shard1", "shard2"]  # round 1's holdout, read from the bucket
    v2 = registry.get(second.candidate.id)
    assert v2.parent_id == v1.id and v2.config["model"]["path"] == v1.artifact
    assert v2.data["continual"]["replay"] == [{"path": learned["source"]["path"], "sha256": learned["sha256"],
                                               "rows": 16}]  # fmt: skip
    assert len(storage.read_text(f"{s3_bucket}/runs/sent-round2/data/train.jsonl").splitlines()) == 24 + 16

    files = write_report(registry, "sent", f"{s3_bucket}/reports/sent")  # a report can go to the bucket too
    assert files.csv == f"{s3_bucket}/reports/sent/forgetting.csv" and "shard1" in storage.read_text(files.csv)
    assert storage.is_file(f"{s3_bucket}/reports/sent/forgetting.md")
    from typer.testing import CliRunner

    from orchestrator.cli import app

    cli = CliRunner().invoke(app, ["registry", "report", "sent", "--registry", str(registry.path),
                                   "--out", f"{s3_bucket}/reports/cli"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    assert storage.is_file(f"{s3_bucket}/reports/cli/forgetting.csv")  # the URI as given, not a local s3:/ folder

    local = sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file())
    assert set(local) <= {"seed", "base-model", "made", "registry", "cache"}, local  # nothing in runs/, s3:/, scratch


def test_a_bad_output_bucket_is_refused_naming_the_field_and_uri_before_a_round_is_claimed(
    s3_bucket: str, tmp_path: Path
) -> None:
    from orchestrator.lifecycle.round_plan import check_round_output  # new with the bucket rounds

    spec = _bucket_spec(tmp_path, s3_bucket)
    spec["job"]["output"]["dir"] = "s3://no-such-bucket-x/runs"
    loaded = retrain_from_dict(spec)
    registry = Registry(tmp_path / "registry" / "registry.sqlite")
    _upload_shard(tmp_path, f"{s3_bucket}/incoming/shard1.tsv", 20)
    with pytest.raises(OrchestratorError, match=r"job\.output\.dir: s3://no-such-bucket-x/runs: .*does not exist"):
        check_round_output(loaded)
    trainer = BucketTrainer([{"*": 0.9}])
    with pytest.raises(OrchestratorError, match=r"job\.output\.dir: s3://no-such-bucket-x/runs"):
        run_round(loaded, registry=registry, train=trainer)
    assert registry.rounds("sent") == [] and trainer.jobs == []  # nothing claimed, nothing trained

    spec["schedule"] = {"trigger": "new_data", "poll_s": 5}
    scheduler = RetrainScheduler(retrain_from_dict(spec), registry=registry, client=FakeJobClient(),
                                 clock=FakeClock(), echo=lambda _: None)  # fmt: skip
    outcome = scheduler.tick()
    assert outcome.startswith("cannot start a round: job.output.dir: s3://no-such-bucket-x/runs"), outcome
    assert registry.rounds("sent") == []
    claimed = registry.claim_round("sent", new_data=[{"sha256": "s1", "path": "x"}], submission_id="job-1")
    with pytest.raises(OrchestratorError, match=r"job\.output\.dir: s3://no-such-bucket-x/runs"):
        run_round(loaded, registry=registry, round_id=claimed.id, train=trainer)
    failed = registry.get_round(claimed.id)  # a claimed round (the scheduler's job) records why it never started
    assert failed.status == "failed" and "job.output.dir: s3://no-such-bucket-x/runs" in failed.message

    spec = _bucket_spec(tmp_path, s3_bucket)
    spec["job"]["output"]["registry"] = "auto"  # <output.dir>/registry.sqlite: on the bucket, refused by design
    with pytest.raises(ConfigError, match=rf"job\.output\.registry: the registry 'auto' \({s3_bucket}/runs/"):
        retrain_from_dict(spec)  # at validation (orchestrator validate), before any round
