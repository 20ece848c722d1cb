"""A derived model against where it started, on a real 2-worker run: a distilled student's start is its teacher,
scored before the first step on the same eval set as the student; the run's end is compared with it in
metrics.jsonl, the W&B summary, the registry and the model card, with the sizes of both read from their weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.lifecycle.registry import Registry
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job
from tests.support.wandb_offline import find_offline_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block BERT classifier with its own (seeded, untrained) head: a teacher whose start score is real."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.support.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("teacher")
    encoder = make_tiny_model(root / "bert4", "bert", layers=4, seed=1)
    torch.manual_seed(3)
    teacher = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=2)
    teacher.save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(encoder).save_pretrained(root / "teacher")
    return root / "teacher"


@pytest.mark.ci  # the one end-to-end check of start vs end (about 60 s)
def test_a_distilled_student_is_compared_with_its_teacher_scored_before_the_first_step(
    ray_cluster: Any, classifier_teacher: Path, shared_data: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    job = tiny_job("student", classifier_teacher, shared_data, tmp_path / "runs", stage=2)
    job["method"] = "distill"
    job["distill"] = {"teacher": str(classifier_teacher), "keep_every": 2}

    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    (start,) = [r for r in records if r["kind"] == "start_eval"]
    assert start["step"] == 0 and start["reference"] == "teacher" and start["fresh_head"] is None
    assert start["reference_path"] == str(classifier_teacher)
    # The teacher is frozen: its start accuracy is what every later eval reports for it on the same rows.
    end = [r for r in records if r["kind"] == "eval"][-1]
    assert start["sst2/accuracy"] == pytest.approx(end["sst2/teacher_accuracy"], abs=1e-9)
    assert start["sst2/loss"] > 0 and start["sst2/samples_per_s"] > 0
    teacher = AutoModelForSequenceClassification.from_pretrained(classifier_teacher)
    student = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert start["start/params"] == sum(p.numel() for p in teacher.parameters())
    assert start["start/weight_bytes"] == (classifier_teacher / "model.safetensors").stat().st_size

    (comparison,) = [r for r in records if r["kind"] == "start_vs_end"]
    assert comparison["step"] == 6
    assert comparison["delta"]["sst2"]["accuracy"] == pytest.approx(end["sst2/accuracy"] - start["sst2/accuracy"])
    assert comparison["params"]["end"] == sum(p.numel() for p in student.parameters()) < comparison["params"]["start"]
    assert comparison["weight_bytes"]["end"] == (result.final_model / "model.safetensors").stat().st_size
    assert comparison["speed"]["sst2"]["samples_per_s"]["ratio"] > 0
    assert {k: v for k, v in comparison.items() if k not in ("kind", "step", "time")} == result.start_vs_end

    (run,) = find_offline_runs(result.run_dir)
    assert run.summary["start/sst2/accuracy"] == pytest.approx(start["sst2/accuracy"])
    assert run.summary["delta/sst2/accuracy"] == pytest.approx(comparison["delta"]["sst2"]["accuracy"])
    assert run.summary["params_ratio"] == pytest.approx(comparison["params"]["ratio"])

    record = Registry(tmp_path / "runs" / "registry.sqlite").get(result.model_id)
    assert record.metrics["start_vs_end"]["delta"] == comparison["delta"]
    assert record.metrics["start_vs_end"]["reference"]["role"] == "teacher"

    card = ModelCard.load(result.final_model / "README.md")
    row = f"| sst2 | accuracy | {end['sst2/accuracy']:.4f} | {start['sst2/accuracy']:.4f} |"
    assert "start of run (teacher)" in card.text and row in card.text
    assert f"Started from teacher {classifier_teacher}." in card.text
