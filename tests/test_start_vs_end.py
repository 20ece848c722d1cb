"""Every derived model against the model it started from, without a cluster: the comparison of a start record with
the last eval (what metrics.jsonl, W&B, the registry, the card and the CLI show), which start models get no score
(a new classification head), sizes read from weight files, and the teacher scored as the student would be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.start_vs_end import compare, describe_reference, summary_values, table_rows
from orchestrator.train.start_eval import TeacherView, checkpoint_size, fresh_head_reason

START = {
    "kind": "start_eval", "step": 0, "reference": "model", "reference_path": "runs/champion", "fresh_head": None,
    "start/params": 1000, "start/weight_bytes": 4000,
    "sst2/accuracy": 0.80, "sst2/loss": 0.50, "sst2/samples_per_s": 100.0,
    "chat/exact_match": 0.25, "chat/generate_rows_per_s": 10.0,
}  # fmt: skip
END = {
    "step": 6, "epoch": 0, "sst2/accuracy": 0.85, "sst2/loss": 0.40, "sst2/samples_per_s": 50.0,
    "chat/exact_match": 0.5, "chat/generate_rows_per_s": 5.0, "train/loss": 0.3, "params": 500, "weight_bytes": 2000,
    "new_set/accuracy": 0.1,
}  # fmt: skip


def test_start_end_and_delta_per_eval_set_with_speed_and_size_as_ratios():
    result = compare(START, END)

    assert result["reference"] == {"role": "model", "path": "runs/champion", "fresh_head": None}
    assert result["start"] == {"sst2": {"accuracy": 0.80, "loss": 0.50}, "chat": {"exact_match": 0.25}}
    assert result["end"] == {"sst2": {"accuracy": 0.85, "loss": 0.40}, "chat": {"exact_match": 0.5}}
    assert result["delta"]["sst2"] == pytest.approx({"accuracy": 0.05, "loss": -0.10})
    assert result["delta"]["chat"] == pytest.approx({"exact_match": 0.25})
    assert result["speed"]["sst2"]["samples_per_s"] == {"start": 100.0, "end": 50.0, "ratio": 0.5}
    assert result["speed"]["chat"]["generate_rows_per_s"]["ratio"] == 0.5
    assert result["params"] == {"start": 1000, "end": 500, "ratio": 0.5}
    assert result["weight_bytes"] == {"start": 4000, "end": 2000, "ratio": 0.5}
    assert "train" not in result["end"] and "new_set" not in result["end"]  # only the sets the start was scored on


def test_the_wandb_summary_keys():
    values = summary_values(compare(START, END))

    assert values["start/sst2/accuracy"] == 0.80 and values["delta/sst2/accuracy"] == pytest.approx(0.05)
    assert values["sst2/samples_per_s_vs_start"] == 0.5 and values["chat/generate_rows_per_s_vs_start"] == 0.5
    assert values["start/params"] == 1000 and values["end/params"] == 500 and values["params_ratio"] == 0.5
    assert values["start/weight_bytes"] == 4000 and values["weight_bytes_ratio"] == 0.5
    assert not any(k.startswith("start/sst2/samples") for k in values)  # speed is a ratio, not a start score


def test_a_fresh_head_has_an_end_but_no_start_score_and_says_why():
    fresh = {"reference": "model", "reference_path": "base", "fresh_head": "the head is new",
             "start/params": 1000, "start/weight_bytes": 4000}  # fmt: skip

    result = compare(fresh, END)

    assert result["start"] == {} and result["delta"] == {}
    assert result["end"]["sst2"]["accuracy"] == 0.85 and result["end"]["new_set"]["accuracy"] == 0.1
    assert result["params"]["ratio"] == 0.5  # sizes compare all the same
    assert describe_reference(result) == "model base: no start score (the head is new)"
    rows = table_rows(result)
    assert ("sst2", "accuracy", None, 0.85, None) in rows
    assert ("model", "params (x)", 1000, 500, 0.5) in rows


def test_table_rows_list_quality_then_speed_then_size():
    rows = table_rows(compare(START, END))

    assert rows[0][:2] == ("chat", "exact_match") and rows[0][4] == pytest.approx(0.25)
    assert ("sst2", "samples_per_s (x)", 100.0, 50.0, 0.5) in rows
    assert rows[-1] == ("model", "weight_bytes (x)", 4000, 2000, 0.5)


def _classifier(folder: Path, base: Path, labels: int, seed: int = 0) -> Path:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels).save_pretrained(folder)
    return folder


def test_which_start_models_have_a_new_head(tmp_path, tiny_models):
    bare = tiny_models["bert"]  # an encoder without a classification head, as MiniLM ships
    trained = _classifier(tmp_path / "clf", bare, labels=2)

    def reason(path: Path, labels: list[str], grow_head: bool = False) -> str | None:
        return fresh_head_reason(str(path), task="sequence-classification", label_names=labels, grow_head=grow_head)

    assert "no classification head" in reason(bare, ["a", "b"])
    assert reason(trained, ["a", "b"]) is None
    assert reason(trained, ["a", "b", "c"]) == "the checkpoint's head has 2 labels, this job 3: the head is new"
    assert reason(trained, ["a", "b", "c"], grow_head=True) is None  # a grown head keeps the checkpoint's rows
    assert fresh_head_reason(str(bare), task="causal-lm", label_names=[], grow_head=False) is None


def test_sizes_come_from_the_weight_files_in_the_folder_only(tmp_path, tiny_models):
    from transformers import AutoModelForSequenceClassification

    folder = _classifier(tmp_path / "clf", tiny_models["bert"], labels=2)
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1000)  # a LoRA export's adapter: not counted
    model = AutoModelForSequenceClassification.from_pretrained(folder)

    params, size = checkpoint_size(folder)

    assert params == sum(p.numel() for p in model.parameters())
    assert size == (folder / "model.safetensors").stat().st_size
    assert checkpoint_size(tmp_path / "missing") == (None, None)


def test_the_teacher_is_called_as_an_engine_with_labels_and_stays_in_eval_mode(tmp_path, tiny_models):
    from transformers import AutoModelForSequenceClassification

    from orchestrator.config import DistillSection
    from orchestrator.methods.distillation import DistillationModule

    teacher = AutoModelForSequenceClassification.from_pretrained(_classifier(tmp_path / "t", tiny_models["bert"], 2))
    student = AutoModelForSequenceClassification.from_pretrained(_classifier(tmp_path / "s", tiny_models["bert"], 2, 1))
    module = DistillationModule(student, teacher.eval(), DistillSection(teacher=str(tmp_path / "t")),
                                task="sequence-classification")  # fmt: skip
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([1])}  # fmt: skip
    view = TeacherView(module)

    view.eval()
    out = view(**batch)
    view.train()

    expected = teacher(**batch)
    assert torch.equal(out.logits, expected.logits) and torch.allclose(out.loss, expected.loss)
    assert not torch.equal(out.logits, student(**batch).logits)  # the teacher, not the student
    assert view.module is teacher and not teacher.training


def test_the_cli_table_shows_start_end_and_change_and_why_a_start_has_no_score():
    from rich.console import Console

    from orchestrator.cli import _start_table

    console = Console(record=True, width=200)
    console.print(_start_table(compare(START, END)))
    fresh = {"reference": "model", "reference_path": "base", "fresh_head": "new head"}
    console.print(_start_table(compare(fresh, END)))
    text = " ".join(console.export_text().split())  # cells padded to their column's width: compare words

    assert "against the start: model runs/champion" in text
    assert "│ sst2 │ accuracy │ 0.8000 │ 0.8500 │ +0.0500 │" in text
    assert "│ sst2 │ samples_per_s (x) │ 100.0000 │ 50.0000 │ 0.500x │" in text
    assert "│ model │ params (x) │ 1,000 │ 500 │ 0.500x │" in text
    assert "against the start: model base: no start score (new head)" in text
