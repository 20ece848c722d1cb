"""Distillation end to end on a local Ray cluster: 2 CPU workers, DeepSpeed ZeRO 2 and 3, a 2-block student cut
from a 4-block tiny BERT teacher, real SST-2 rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job
from tests.support.faults import FailAfterCheckpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "bert4", "bert", layers=4, seed=1)


def _distill_job(name: str, teacher: Path, shared_data: Path, out: Path, stage: int, **distill) -> dict:
    job = tiny_job(name, teacher, shared_data, out, stage=stage)
    job["method"] = "distill"
    job["distill"] = {"teacher": str(teacher), "keep_every": 2, "hidden_weight": 1.0, **distill}
    return job


_FIRST_STEP: dict[str, dict[str, float]] = {}  # step-1 loss terms of each run below (same seed, data and teacher)


@pytest.mark.parametrize(
    ("stage", "placement"),
    [(2, "replicated"), pytest.param(3, "replicated", marks=pytest.mark.ci), (2, "sharded")],
)
def test_distill_two_block_student_under_zero(stage, placement, ray_cluster, teacher4, shared_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    job = _distill_job(
        f"distill-z{stage}-{placement}", teacher4, shared_data, tmp_path, stage, teacher_placement=placement
    )
    result = run_training(config_from_dict(job))

    assert result.metrics["step"] == 6
    records = read_metrics(result.run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for record in train:
        for key in ("train/loss", "train/loss_ce", "train/loss_kd", "train/loss_hidden"):
            assert math.isfinite(record[key]) and record[key] >= 0, (key, record)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert 0.0 <= result.metrics["sst2/accuracy"] <= 1.0
    # The teacher is scored on the same eval batches (sharded: gathered in step on every rank), side by side.
    assert 0.0 <= result.metrics["sst2/teacher_accuracy"] <= 1.0 and 0.0 <= result.metrics["sst2/agreement"] <= 1.0
    assert result.metrics["sst2/teacher_forward_samples_per_s"] > 0
    # Same first step whatever the ZeRO stage and wherever the teacher lives (sharded: gathered in forward).
    first = {k: v for k, v in train[0].items() if k.startswith("train/loss")}
    for other, values in _FIRST_STEP.items():
        assert first == pytest.approx(values, rel=1e-4), other
    _FIRST_STEP[f"z{stage}-{placement}"] = first

    # The export is the student alone, a plain HF classifier with 2 blocks.
    student = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert student.config.num_hidden_layers == 2
    assert student.config.id2label == {0: "0", 1: "1"}
    start = next(r for r in records if r["kind"] == "start")
    assert start["params_total"] == sum(p.numel() for p in student.parameters())  # teacher not counted
    lineage = json.loads((result.final_model / "distill_lineage.json").read_text())
    assert lineage["kept_teacher_layers"] == [1, 3]
    assert lineage["layer_map"] == [[0, 1], [1, 3]]
    assert lineage["teacher_placement"] == placement


def test_distill_resumes_after_a_worker_failure(ray_cluster, teacher4, shared_data, tmp_path, monkeypatch):
    job = _distill_job("distill-failover", teacher4, shared_data, tmp_path, 2)
    job["scaling"]["max_failures"] = 1
    result = run_training(config_from_dict(job), worker_callbacks=[FailAfterCheckpoint(step=3)])

    records = read_metrics(result.run_dir)
    assert [s["resumed_from_step"] for s in records if s["kind"] == "start"] == [None, 3]
    assert result.metrics["step"] == 6
    assert result.final_model is not None and (result.final_model / "distill_lineage.json").is_file()


def test_distill_into_a_lora_student_under_zero3(ray_cluster, teacher4, shared_data, tmp_path):
    """A LoRA student: only adapters and head train (ZeRO-3 shards them too); the export is a merged plain model."""
    from transformers import AutoModelForSequenceClassification

    job = _distill_job("distill-lora-z3", teacher4, shared_data, tmp_path, 3, teacher_placement="replicated")
    job["lora"] = {"r": 4, "alpha": 8}
    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    start = next(r for r in records if r["kind"] == "start")
    assert 0 < start["params_trainable"] < start["params_total"] / 2
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(math.isfinite(r["train/loss"]) for r in train)  # no train record would have passed
    student = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert student.config.num_hidden_layers == 2
    assert (result.final_model / "adapter" / "adapter_config.json").exists()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_rows(shared_data: Path, path: Path, rows: int, skip: int = 0) -> Path:
    """AG News headlines as chats: the headline in a user turn, the topic name as the answer."""
    topics = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    lines = (shared_data / "agnews" / "train.tsv").read_text(encoding="utf-8").splitlines()[skip : skip + rows]
    chats = []
    for line in lines:
        text, label = line.split("\t")[:2]
        chats.append([{"role": "user", "content": f"Topic? {' '.join(text.split()[:8])}"},
                      {"role": "assistant", "content": topics.get(label, label)}])  # fmt: skip
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    return path


def test_a_causal_lm_student_is_distilled_on_chat_answers_and_compared_with_its_teacher(
    ray_cluster, shared_data, tmp_path
):
    """Causal-LM distillation end to end: a 2-block student cut from a 4-block Llama teacher (same tokenizer), KD
    and hidden-state terms on the answer tokens only, an eval set scored by generation; the teacher, scored before
    the first step with the same generation, is what the student's end is compared with."""
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import make_tiny_model

    teacher = make_tiny_model(tmp_path / "llama4", "llama", layers=4, seed=2)
    job = tiny_job("chat-student", teacher, shared_data, tmp_path / "runs", task="causal-lm", stage=2, lr=3e-3)
    job["data"] = {
        "train": {"path": str(_chat_rows(shared_data, tmp_path / "train.jsonl", 96)), "messages_column": "messages"},
        "eval": [{"name": "chat", "path": str(_chat_rows(shared_data, tmp_path / "eval.jsonl", 24, skip=500)),
                  "messages_column": "messages", "generate": True, "max_new_tokens": 4}],
        "chat_template": CHATML,
        "max_length": 160,
    }  # fmt: skip
    job["method"] = "distill"
    # The teacher sharded across the workers (ZeRO-3 beside a ZeRO-2 student): its start generation is collective.
    job["distill"] = {"teacher": str(teacher), "keep_every": 2, "hidden_weight": 1.0, "teacher_placement": "sharded"}

    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for record in train:
        for key in ("train/loss_ce", "train/loss_kd", "train/loss_hidden"):
            assert math.isfinite(record[key]) and record[key] >= 0, (key, record)
    (start,) = [r for r in records if r["kind"] == "start_eval"]
    assert start["reference"] == "teacher" and start["fresh_head"] is None
    assert 0.0 <= start["chat/exact_match"] <= 1.0 and start["chat/loss"] > 0 and start["chat/perplexity"] > 1
    student = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert student.config.num_hidden_layers == 2
    compared = result.start_vs_end
    assert compared["params"]["end"] == sum(p.numel() for p in student.parameters()) < compared["params"]["start"]
    end = [r for r in records if r["kind"] == "eval"][-1]
    change = end["chat/exact_match"] - start["chat/exact_match"]
    assert compared["delta"]["chat"]["exact_match"] == pytest.approx(change)
    assert compared["speed"]["chat"]["generate_rows_per_s"]["ratio"] > 0
