"""W&B lineage (issue 21, item 4): the W&B model registry tells the story the SQLite registry records.

Everything runs with W&B offline (tests/conftest.py) and is read back from the offline ``.wandb`` files
(tests/support/wandb_offline.py): artifacts logged and used, their digests (one digest = one W&B version) and
aliases, replayed as W&B applies them (an alias is unique within an artifact's versions). No Ray.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster.results import TrainResult
from orchestrator.config import config_from_dict
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.rounds import _register_candidate
from orchestrator.lifecycle.run_registration import register_run
from orchestrator.tracking import WANDB_ID_FILE
from tests.support.wandb_offline import OfflineArtifact, OfflineRun, find_offline_runs


def _job(tmp_path: Path, model: Path, **wandb: Any) -> Any:
    return config_from_dict(
        {
            "name": "job",
            "model": {"path": str(model)},
            "data": {"train": {"path": str(tmp_path / "train.tsv")}},
            "output": {"dir": str(tmp_path / "runs")},
            "tracking": {"wandb": {"project": "lineage", **wandb}},
        }
    )


def _trained(tmp_path: Path, folder: str, weights: str, *, run_id: str | None = None) -> TrainResult:
    """What a finished run leaves: an export in final/ and (when it had a W&B run) that run's id."""
    run_dir = tmp_path / "runs" / folder
    final = run_dir / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_text(weights)
    (final / "config.json").write_text('{"id2label": {"0": "0", "1": "1"}}')
    (final / "orchestrator_job.yaml").write_text("name: job\n")
    if run_id:
        (run_dir / WANDB_ID_FILE).write_text(run_id)
    return TrainResult(
        run_dir=run_dir,
        metrics={"sst2/accuracy": 0.8, "step": 6},
        best_metric=0.8,
        final_model=final,
        best_model=None,
        checkpoint_path=None,
        wandb=None,
        data={"train": {"path": "t.tsv", "sha256": "ab" * 32, "rows": 10}, "eval": []},
    )


def _round(tmp_path: Path, parent: Path, folder: str, weights: str, decision: str, registry: Registry) -> Any:
    """A continual round's candidate registered and judged as rounds.run_round does (its training faked)."""
    plan = types.SimpleNamespace(
        job=_job(tmp_path, parent), name="job", round=1, data_record=lambda data: {**data, "continual": {}}
    )
    verdict = types.SimpleNamespace(
        forgetting={}, gate=types.SimpleNamespace(metric="accuracy", mode="max"), decision=decision, reason="gate"
    )
    return _register_candidate(registry, plan, _trained(tmp_path, folder, weights), verdict)


def base_uri(tmp_path: Path) -> str:
    """The reference to the base model's file (a folder reference lists the folder's files)."""
    return (tmp_path / "base" / "config.json").resolve().as_uri()


def _cli(*args: str) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _aliases(runs: list[OfflineRun], name: str) -> dict[str, str]:
    """{alias: digest} of artifact ``name`` after every record, applied in order as W&B does (an alias set on
    one version leaves the version that had it)."""
    where: dict[str, str] = {}
    for run in runs:
        for artifact in run.artifacts:
            if artifact.name == name:
                where.update(dict.fromkeys(artifact.aliases, artifact.digest))
    return where


def _logged(runs: list[OfflineRun]) -> dict[str, tuple[OfflineRun, OfflineArtifact]]:
    """Registry id → (the run that logged it, the artifact): each registered version logged once."""
    found: dict[str, tuple[OfflineRun, OfflineArtifact]] = {}
    for run in runs:
        for artifact in run.artifacts:
            if not artifact.used:
                key = artifact.metadata["registry_id"]
                assert key not in found, f"{key} logged twice"
                found[key] = (run, artifact)
    return found


def _story(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """register -> promote -> a second candidate rejected -> another promoted -> rollback."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    registry_file = tmp_path / "runs" / "registry.sqlite"
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", str(registry_file))
    first = register_run(_job(tmp_path, base), _trained(tmp_path, "job", "w1", run_id="train001"))
    registry = Registry(registry_file)
    _cli("registry", "promote", first.id)
    _round(tmp_path, Path(first.artifact), "r1", "w2", "reject", registry)
    _round(tmp_path, Path(first.artifact), "r2", "w3", "promote", registry)
    _cli("registry", "rollback", "job")
    return registry


def test_registry_decisions_become_artifact_aliases_and_lineage_edges(tmp_path, monkeypatch):
    registry = _story(tmp_path, monkeypatch)
    models = {m.id: m for m in registry.models("job")}
    assert {m.id: m.status for m in models.values()} == {
        "job-v1": "champion", "job-v2": "rejected", "job-v3": "archived"
    }  # fmt: skip
    runs = sorted(find_offline_runs(tmp_path), key=lambda r: r.start_time)  # folder names have seconds only
    logged = _logged(runs)
    assert set(logged) == set(models)  # every registered version is one W&B version of the artifact "job"
    digests = {key: artifact.digest for key, (_, artifact) in logged.items()}
    assert len(set(digests.values())) == 3
    for key, (run, artifact) in logged.items():
        record = models[key]
        assert artifact.name == "job" and artifact.type == "model"
        assert artifact.metadata["method"] == record.method and artifact.metadata["parent"] == record.parent
        assert artifact.metadata["metrics"] == record.metrics and artifact.metadata["files"] == record.files
        assert artifact.metadata["data"]["train"]["sha256"] == "ab" * 32
        # The files by reference (nothing uploaded), each a file of the registered version folder.
        folder = Path(record.artifact).as_uri()
        assert artifact.references == {path: f"{folder}/{path}" for path in record.files}
        assert record.wandb_artifact == f"job:{key}"
        # The lineage edge: the run that logged a version used its parent's version first.
        used = [a for a in run.artifacts if a.used]
        if record.parent_id:
            assert [a.digest for a in used] == [digests[record.parent_id]]
        else:
            assert [(a.name, a.references) for a in used] == [("base-base", {"config.json": base_uri(tmp_path)})]
    # The first model was logged by its training run, resumed (the id it kept in its run folder).
    assert logged["job-v1"][0].run_id == "train001"

    # Aliases as W&B leaves them tell the registry's story: v1 champion again, v2 rejected, v3 rolled back.
    aliases = _aliases(runs, "job")
    assert aliases["champion"] == aliases["production"] == digests[registry.champion("job").id]
    assert aliases["rejected"] == digests["job-v2"] and aliases["rolled-back"] == digests["job-v3"]
    assert all(aliases[key] == digests[key] for key in models)  # the fixed alias of each version

    # One short registry run per decision, in the registry's order, each using the versions it judged.
    decisions = [r for r in runs if r.job_type == "registry" and "decision" in r.config]
    events = [e for e in registry.events("job") if e["kind"] in ("promote", "reject", "rollback")]
    assert [(r.config["decision"], r.config["model_id"]) for r in decisions] == [
        (e["kind"], e["model_id"]) for e in events
    ]
    assert [e["kind"] for e in events] == ["promote", "reject", "promote", "rollback"]
    assert decisions[-1].config["previous_id"] == "job-v3"
    assert {a.digest for a in decisions[-1].artifacts if a.used} == {digests["job-v1"], digests["job-v3"]}
    assert all(r.project == "lineage" for r in runs)


def test_a_quantized_model_uses_its_source_and_a_quantize_run_logs_it(tmp_path):
    from orchestrator.lifecycle.wandb_lineage import log_model_version

    base = tmp_path / "base"
    base.mkdir()
    source = register_run(_job(tmp_path, base), _trained(tmp_path, "job", "w1"))
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    quantized = registry.register(
        "job-int8",
        method="quantize",
        artifact=source.artifact,
        config=source.config,
        data=source.data,
        metrics={},
        parent_id=source.id,
        files=source.files,
    )
    assert log_model_version(registry, quantized) == "job-int8:job-int8-v1"
    runs = find_offline_runs(tmp_path)
    (run,) = [r for r in runs if r.job_type == "quantize"]
    (source_artifact,) = [
        a for r in runs for a in r.artifacts if not a.used and a.metadata.get("registry_id") == source.id
    ]
    assert [(a.name, a.used) for a in run.artifacts] == [("job", True), ("job-int8", False)]
    assert run.artifacts[0].digest == source_artifact.digest  # the same W&B version: the edge to the source
    assert run.artifacts[1].metadata["method"] == "quantize"


def test_wandb_failing_never_fails_a_promotion_or_a_rollback(tmp_path, monkeypatch, caplog):
    import wandb

    base = tmp_path / "base"
    base.mkdir()
    registry_file = tmp_path / "runs" / "registry.sqlite"
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", str(registry_file))
    first = register_run(_job(tmp_path, base), _trained(tmp_path, "job", "w1"))
    second = register_run(_job(tmp_path, base), _trained(tmp_path, "job2", "w2"))

    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        _cli("registry", "promote", first.id)
        _cli("registry", "promote", second.id)
        _cli("registry", "rollback")
    assert Registry(registry_file).champion("job").id == first.id
    failures = [r.getMessage() for r in caplog.records if "W&B could not start" in r.getMessage()]
    assert len(failures) == 3 and all("W&B is down" in m and "registry keeps the record" in m for m in failures)


def test_disabled_wandb_logs_no_lineage(tmp_path):
    from orchestrator.lifecycle.wandb_lineage import record_decision

    base = tmp_path / "base"
    base.mkdir()
    record = register_run(_job(tmp_path, base, mode="disabled"), _trained(tmp_path, "job", "w1", run_id="t1"))
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    registry.promote(record.id)
    assert record_decision(registry, record.id) is False
    assert record.wandb_artifact is None and find_offline_runs(tmp_path) == []
