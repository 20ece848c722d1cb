"""Every shipped YAML validates (subfolders included), the config reference is current, and the CLI
reports every problem in every file at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster.preflight import preflight
from orchestrator.config import load_config
from orchestrator.config.retrain import is_retrain_file, load_retrain
from tests.conftest import REPO, SHARED_DATA


def yaml_files(root: Path) -> list[Path]:
    """Every YAML file under ``root``, subfolders included (both extensions YAML uses)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


CONFIGS = yaml_files(REPO / "configs")
ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))


def make_prerequisites(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a config's header comment says to make first: distill.yaml's teacher (the quickstart's export, here
    a copy of MiniLM at the path the quickstart writes), causal_lm.yaml's model (scripts/make_causal_lm.py),
    sft_chat*.yaml's chat rows and model (scripts/make_chat_data.py)."""
    import shutil

    from orchestrator.models.loading import resolve_model_path

    if path.name == "distill.yaml":
        shutil.copytree(resolve_model_path("minilm"), tmp_path / "quickstart" / "final")
    if path.name == "causal_lm.yaml":
        sys.path.insert(0, str(REPO / "scripts"))
        from make_causal_lm import build

        monkeypatch.setenv("CAUSAL_LM_PATH", str(build(tmp_path / "small-llama", hidden=64, layers=2)))
    if path.name.startswith("sft_chat"):
        sys.path.insert(0, str(REPO / "scripts"))
        from make_chat_data import build_chat_model, convert

        for split in ("train", "test"):
            convert(SHARED_DATA / "agnews" / f"{split}.tsv", tmp_path / "chat" / f"{split}.jsonl")
        monkeypatch.setenv("CHAT_DATA_DIR", str(tmp_path / "chat"))
        monkeypatch.setenv("CHAT_MODEL_PATH", str(build_chat_model(tmp_path / "chat-llama", hidden=64, layers=2)))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_shipped_config_is_valid_and_its_data_and_model_resolve(path, shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(shared_data))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path))
    assert path.read_text().startswith("# "), "a config starts with a comment showing the command that runs it"
    make_prerequisites(path, tmp_path, monkeypatch)
    if is_retrain_file(path):  # a continual-retraining file: its base job is checked like any job
        monkeypatch.setenv("WATCH_DIR", str(tmp_path / "incoming"))
        config = load_retrain(path).job
    else:
        config = load_config(path)
    if "tune" not in config.model_fields_set:
        preflight(config)


def test_there_are_shipped_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


def test_a_config_per_method_and_major_feature_is_shipped():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "full_finetune.yaml", "lora.yaml", "distill.yaml", "causal_lm.yaml"} <= names
    assert {"sweep_lr_unfreeze.yaml", "retrain.yaml"} <= names


def test_every_yaml_file_under_configs_is_checked_subfolders_included(tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    for name in ("a.yaml", "nested/b.yml", "nested/deeper/c.yaml", "notes.txt"):
        (tmp_path / name).write_text("# x\n")

    assert [str(p.relative_to(tmp_path)) for p in yaml_files(tmp_path)] == [
        "a.yaml", "nested/b.yml", "nested/deeper/c.yaml"
    ]


def test_each_config_names_its_command_in_the_first_lines():
    for path in CONFIGS:
        head = [line for line in path.read_text().splitlines()[:3] if line.startswith("# ")]
        rel = str(path.relative_to(REPO))
        assert any(rel in line and ("orchestrator " in line or "jobs/" in line) for line in head), rel


def test_config_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "scripts"))
    from gen_config_docs import render

    assert (REPO / "docs" / "CONFIG.md").read_text() == render(), "run: python scripts/gen_config_docs.py"


def test_cluster_runtime_env_parses_and_pins_the_stack():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    packages = " ".join(env["pip"]["packages"])
    assert "deepspeed" in packages and "transformers" in packages
    assert "WANDB_API_KEY" not in (REPO / "cluster" / "runtime_env.yaml").read_text().split("#")[0]


def test_validate_prints_all_mistakes_of_every_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\n"
        "model: {task: sequence-classification}\n"  # model.path missing
        "data:\n"
        "  train: {path: x.tsv}\n"
        "trainig: {lr: 1}\n"  # typo
        "training:\n"
        "  lr: fast\n"  # wrong type
        "  batch_size_per_worker: 0\n"  # out of range
        "deepspeed: {stage: 4}\n"  # no such stage
    )
    worse = tmp_path / "worse.yaml"
    worse.write_text("name: x\nmodel: {path: minilm}\ndata: {train: {path: y.tsv}}\nscaling: {num_workers: -1}\n")
    run = subprocess.run([ORCHESTRATOR, "validate", str(bad), str(worse)], capture_output=True, text=True)
    assert run.returncode == 1
    err = run.stderr
    assert "5 problems in" in err and str(bad) in err
    for needle in ("model.path", "unknown key 'trainig'", "did you mean 'training'", "training.lr",
                   "training.batch_size_per_worker", "deepspeed.stage"):
        assert needle in err, needle
    assert f"{bad}:5:" in err  # the line of the typo
    assert "scaling.num_workers" in err  # the second file is checked too


def test_validate_checks_data_and_model_before_any_cluster(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "name: x\nmodel: {path: /no/such/model}\ndata:\n  train: {path: /no/such/file.tsv}\n"
        f"output: {{dir: {tmp_path}}}\n"
    )
    run = subprocess.run([ORCHESTRATOR, "validate", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "model.path" in run.stderr and "/no/such/model" in run.stderr
    assert "/no/such/file.tsv: data file not found" in run.stderr
