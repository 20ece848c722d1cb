"""Shared fixtures: W&B forced offline into a temp dir, tiny random models, real shared data, one Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: W&B offline, into a temp dir, with no API key."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_tokenizer() -> Any:
    """The real all-MiniLM-L6-v2 tokenizer (the demo extra's package), loaded once."""
    from orchestrator.errors import ModelError
    from orchestrator.models.loading import load_tokenizer, resolve_model_path

    try:
        return load_tokenizer(resolve_model_path("minilm"))
    except ModelError as exc:
        pytest.skip(f"MiniLM is not installed: {exc}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """2-layer, hidden-32 models with random weights: an encoder (BERT) and causal LMs (GPT-2, Llama)."""
    from tests.support.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("bert", "gpt2", "llama")}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real S3 endpoint (moto's standalone server on 127.0.0.1, authentication on) for the whole session.

    Its standard AWS variables are put in this process's environment before the Ray cluster starts, so Ray's
    workers see them as a cluster's nodes see theirs (secrets from the node environment, never in a config).
    """
    from tests.support.s3_server import start_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: Any, request: pytest.FixtureRequest) -> str:
    """A fresh bucket for one test: ``s3://<name>``."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{len(s3_server.buckets)}"
    return "s3://" + s3_server.create_bucket(name)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: Any) -> Any:
    """One local Ray cluster for every test that trains (start-up is paid once). 4 logical CPUs on
    2 cores, so a 2-worker job and its controller always fit. Started after the S3 server so its workers
    have the endpoint and credentials in their environment."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    ray.init(num_cpus=4, include_dashboard=None, configure_logging=False, log_to_driver=False)  # None: when installed
    yield ray
    ray.shutdown()


def tiny_job(
    name: str,
    model: Path,
    data: Path,
    out: Path,
    *,
    task: str = "sequence-classification",
    stage: int = 0,
    **training: Any,
) -> dict[str, Any]:
    """A small job dict on real SST-2 rows (a few seconds of training)."""
    job: dict[str, Any] = {
        "name": name,
        "model": {"path": str(model), "task": task},
        "data": {
            "train": {"path": str(data / "sst2" / "train.tsv"), "text_column": "sentence", "limit": 192},
            "eval": [{"path": str(data / "sst2" / "test.tsv"), "text_column": "sentence", "name": "sst2", "limit": 96}],
            "max_length": 32,
        },
        "training": {
            "max_steps": 6,
            "batch_size_per_worker": 8,
            "lr": 1e-3,
            "eval_every_steps": 3,
            "checkpoint_every_steps": 3,
            "log_every_steps": 1,
            **training,
        },
        "deepspeed": {"stage": stage},
        "scaling": {"num_workers": 2},
        "tracking": {"wandb": {"mode": "offline"}},
        "output": {"dir": str(out)},
    }
    if stage == 3:
        # ZeRO-3 keeps small parameters whole unless told not to; partition everything so bugs show.
        job["deepspeed"]["overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    return job
