"""A Hugging Face Hub id without an organisation (``gpt2``, ``distilbert-base-uncased-finetuned-sst-2-english``) is a
model path like ``org/name``: it resolves, loads, predicts and trains. The hub is never reached: each test builds a
local Hugging Face cache (``models--<id>/snapshots/<revision>/...`` and ``refs/main``, huggingface_hub's layout)
holding a tiny model saved under the id, with ``HF_HUB_OFFLINE=1``. huggingface_hub reads ``HF_HOME`` and
``HF_HUB_OFFLINE`` once, when imported: in-process tests set its constants, the others run a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import ConfigError, ModelError
from orchestrator.models.loading import read_model_config, resolve_model_path
from tests.conftest import REPO

ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))
REVISION = "0123456789abcdef0123456789abcdef01234567"
CLASSIFIER_ID = "distilbert-base-uncased-finetuned-sst-2-english"  # a real hub classifier's id: no organisation


def cache_model(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Put a saved model folder into a Hugging Face cache under ``repo_id``, as a download would; its snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def tiny_classifier(folder: Path, base: Path) -> Path:
    """The tiny BERT as a trained-looking sequence classifier with named labels (what a hub classifier is)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture
def hf_home(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A Hugging Face cache holding the tiny GPT-2 as ``gpt2`` and a tiny classifier under a hub classifier's id."""
    home = tmp_path / "hf"
    cache_model(home, "gpt2", tiny_models["gpt2"])
    cache_model(home, CLASSIFIER_ID, tiny_classifier(tmp_path / "classifier", tiny_models["bert"]))
    return home


@pytest.fixture
def offline_cache(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's huggingface_hub pointed at the cache, offline (its constants are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


# --------------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["gpt2", CLASSIFIER_ID])
def test_a_hub_id_without_an_organisation_resolves_to_itself(offline_cache: Path, repo_id: str) -> None:
    assert resolve_model_path(repo_id) == repo_id


def test_the_cached_config_of_a_hub_id_is_read(offline_cache: Path, tiny_models: dict[str, Path]) -> None:
    assert read_model_config("gpt2") == json.loads((tiny_models["gpt2"] / "config.json").read_text())
    assert read_model_config("not-in-the-cache") == {}


def test_an_id_the_offline_cache_does_not_hold_is_refused_with_the_fix(offline_cache: Path) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_model_path("bert-base-uncased")

    message = str(caught.value)
    assert "'bert-base-uncased' is not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download bert-base-uncased" in message and "HF_HOME" in message


@pytest.mark.parametrize("name", ["runs/old/final", "my model", "-starts-with-a-dash", "a--b"])
def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_a_clear_error(offline_cache: Path, name: str) -> None:
    with pytest.raises(ModelError) as caught:
        resolve_model_path(name)

    message = str(caught.value)
    assert f"model.path: {name!r} is not a local folder (none exists there) nor a valid Hugging Face Hub id" in message
    assert "the alias 'minilm', or a hub id such as 'gpt2' or 'org/name'" in message


def test_a_local_folder_named_like_a_hub_id_is_the_folder(
    offline_cache: Path, tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(tiny_models["bert"], tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)

    assert resolve_model_path("gpt2") == str((tmp_path / "gpt2").resolve())


def test_preflight_accepts_a_hub_id_as_model_path(
    offline_cache: Path, shared_data: Path, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    from orchestrator.cluster.preflight import preflight
    from orchestrator.config import config_from_dict
    from tests.conftest import tiny_job

    job = tiny_job("hub-id", tiny_models["gpt2"], shared_data, tmp_path, task="causal-lm")
    job["model"]["path"] = "gpt2"

    assert preflight(config_from_dict(job)).model_path == "gpt2"
    job["model"]["path"] = "bert-base-uncased"  # not cached, hub offline
    with pytest.raises(ConfigError, match="model.path: the hub id 'bert-base-uncased' is not in the local"):
        preflight(config_from_dict(job))


# --------------------------------------------------------------------------------------------------
# Loading and predicting, in a process of their own that sees only the offline cache
# --------------------------------------------------------------------------------------------------

_LOAD_GPT2 = """
from orchestrator.models.loading import load_model, load_tokenizer, resolve_model_path
path = resolve_model_path("gpt2")
tokenizer = load_tokenizer(path)
model = load_model(path, task="causal-lm")
batch = tokenizer(["a short text"], return_tensors="pt")
print(path, type(model).__name__, model.config.n_layer, tuple(model(**batch).logits.shape)[:2])
"""


def test_a_hub_id_loads_from_the_offline_cache(hf_home: Path) -> None:
    run = subprocess.run([sys.executable, "-c", _LOAD_GPT2], capture_output=True, text=True, env=offline_env(hf_home))

    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:3] == ["gpt2", "GPT2LMHeadModel", "2"]


def test_predict_takes_a_classifier_hub_id(hf_home: Path) -> None:
    run = subprocess.run(
        [ORCHESTRATOR, "predict", CLASSIFIER_ID, "a gripping film", "a dull mess"],
        capture_output=True,
        text=True,
        env=offline_env(hf_home),
    )

    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("a gripping film") and lines[1].endswith("a dull mess")
    assert all(line.split()[0] in ("NEGATIVE", "POSITIVE") for line in lines)  # the model's label names


def test_predict_refuses_a_model_that_is_not_a_classifier(offline_cache: Path) -> None:
    from orchestrator.models.predict import predict

    with pytest.raises(ModelError, match="gpt2 is a GPT2LMHeadModel, not a sequence classifier"):
        predict("gpt2", ["a text"])  # a fresh, untrained head would answer


def test_predict_names_a_missing_folder(tmp_path: Path) -> None:
    from orchestrator.models.predict import predict

    with pytest.raises(ModelError, match=r"does not exist .*predict takes an exported model folder"):
        predict(tmp_path / "no-such-run" / "final", ["a text"])


# --------------------------------------------------------------------------------------------------
# Training and exporting from a hub id (a local Ray cluster of the run's own, started by the CLI)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_on_a_hub_id_trains_and_exports(hf_home: Path, shared_data: Path, tmp_path: Path) -> None:
    import yaml

    from tests.conftest import tiny_job

    job: dict[str, Any] = tiny_job("hub-gpt2", Path("unused"), shared_data, tmp_path / "runs", task="causal-lm")
    job["model"]["path"] = "gpt2"
    job["training"].update(max_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
    job["tracking"]["wandb"]["mode"] = "disabled"
    job["output"]["registry"] = None
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))

    run = subprocess.run(
        [ORCHESTRATOR, "train", str(config)], capture_output=True, text=True, env=offline_env(hf_home), timeout=540
    )

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    final = tmp_path / "runs" / "hub-gpt2" / "final"
    exported = json.loads((final / "config.json").read_text())
    assert exported["architectures"] == ["GPT2LMHeadModel"] and exported["n_layer"] == 2
    assert yaml.safe_load((final / "orchestrator_job.yaml").read_text())["model"]["path"] == "gpt2"
