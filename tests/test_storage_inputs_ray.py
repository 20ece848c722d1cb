"""Inputs on object storage under Ray (issue 18, inputs): a 2-worker job whose data files and model folder are
all on the bucket (moto's server); the workers copy them once per node and train on the scanned bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from tests.conftest import tiny_job

pytestmark = pytest.mark.slow


def test_a_job_trains_on_data_and_a_model_read_from_the_bucket(
    ray_cluster, s3_bucket, tiny_models, shared_data, tmp_path
):
    storage.upload(shared_data / "sst2" / "train.tsv", f"{s3_bucket}/data/train.tsv")
    storage.upload(shared_data / "sst2" / "test.tsv", f"{s3_bucket}/data/test.tsv")
    storage.upload(tiny_models["bert"], f"{s3_bucket}/models/bert")
    spec = tiny_job("from-bucket", tiny_models["bert"], shared_data, tmp_path / "runs")
    spec["model"]["path"] = f"{s3_bucket}/models/bert"
    spec["data"]["train"]["path"] = f"{s3_bucket}/data/train.tsv"
    spec["data"]["eval"][0]["path"] = f"{s3_bucket}/data/test.tsv"
    spec["output"]["registry"] = str(tmp_path / "registry.sqlite")
    result = run_training(config_from_dict(spec))
    assert result.metrics["step"] == 6 and "sst2/accuracy" in result.metrics
    assert result.data["train"]["path"] == f"{s3_bucket}/data/train.tsv" and result.data["train"]["rows"] == 192
    assert Path(result.final_model, "model.safetensors").is_file()
