"""The ``distill`` method without Ray: config checks, the DistillationModule on tiny BERTs (CPU), preflight, export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.methods import MethodContext, get_method
from orchestrator.methods.distillation import LINEAGE_FILE, DistillationModule, resolve_placement
from orchestrator.methods.teacher_student import HiddenProjector
from orchestrator.models.layers import find_blocks_module, find_layer_groups
from orchestrator.models.loading import load_model, load_tokenizer
from orchestrator.models.weight_stream import WeightStream
from tests.conftest import tiny_job

LABELS = ["negative", "positive"]
CPU = MethodContext(model_path="", device=torch.device("cpu"), precision="fp32", world_size=1)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4-block tiny BERTs: hidden 32 (the width of the 2-block tiny_models BERT) and hidden 64."""
    from tests.support.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("teachers")
    return {
        "bert4": make_tiny_model(root / "bert4", "bert", layers=4, seed=1),
        "bert4-wide": make_tiny_model(root / "bert4-wide", "bert", hidden=64, layers=4, seed=2),
    }


def _job(model: Path, tmp_path: Path, distill: dict[str, Any] | None, method: str = "distill") -> dict[str, Any]:
    job = tiny_job("distill-unit", model, tmp_path, tmp_path)  # data paths are not read here
    job["method"] = method
    job["data"]["label_names"] = LABELS
    if distill is not None:
        job["distill"] = distill
    return job


def _prepare(model_path: Path, tmp_path: Path, **distill: Any) -> tuple[DistillationModule, Any]:
    """The module built from the teacher at ``model_path`` (model.path too, for the tokenizer)."""
    config = config_from_dict(_job(model_path, tmp_path, {"teacher": str(model_path), **distill}))
    model = load_model(str(model_path), task="sequence-classification", label_names=LABELS)
    context = MethodContext(model_path=str(model_path), device=CPU.device, precision="fp32", world_size=1)
    module = get_method("distill").prepare_model(model, config, context)
    assert isinstance(module, DistillationModule)
    return module, config


def _batch(model_path: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(str(model_path))
    batch = dict(
        tokenizer(
            ["a gripping, funny film", "dull and far too long", "fine"], padding=True, return_tensors="pt"
        ).items()
    )
    batch["labels"] = torch.tensor([1, 0, 1])
    return batch


# --- config ---------------------------------------------------------------------------------------------------


def test_distill_method_needs_its_section_and_the_section_needs_the_method(tiny_models, tmp_path) -> None:
    with pytest.raises(ConfigError, match="method: distill needs a distill section"):
        config_from_dict(_job(tiny_models["bert"], tmp_path, None))
    with pytest.raises(ConfigError, match="a distill section is set but method is 'full'"):
        config_from_dict(_job(tiny_models["bert"], tmp_path, {"teacher": "minilm"}, method="full"))
    config = config_from_dict(_job(tiny_models["bert"], tmp_path, {"teacher": "minilm"}))
    d = config.distill
    assert (d.student_init, d.alpha, d.kd_weight, d.hidden_weight, d.temperature) == ("teacher_layers", 0.5, 0.5, 0, 2)
    assert (d.hidden_loss, d.layer_map, d.teacher_placement) == ("mse", "auto", "auto")


@pytest.mark.parametrize(
    ("distill", "expected"),
    [
        ({"teacher": "minilm", "keep_every": 2, "keep_layers": [1, 3]}, "not both"),
        ({"teacher": "minilm", "student_init": "pretrained", "keep_every": 2}, "teacher_layers only"),
        ({"teacher": "minilm", "alpha": 0, "kd_weight": 0}, "all 0"),
        ({"teacher": "minilm", "temperature": 0}, "distill.temperature"),
        ({"teacher": "minilm", "layer_map": "even"}, "distill.layer_map"),
        ({"teacher": "minilm", "teacher_placement": "everywhere"}, "distill.teacher_placement"),
        ({"teacher": "minilm", "tempreature": 2}, "did you mean 'temperature'"),
    ],
)
def test_distill_section_errors(distill, expected, tiny_models, tmp_path) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(_job(tiny_models["bert"], tmp_path, distill))


def test_explicit_layer_map_is_read_as_pairs(tiny_models, tmp_path) -> None:
    config = config_from_dict(_job(tiny_models["bert"], tmp_path, {"teacher": "minilm", "layer_map": [[0, 1], [1, 3]]}))
    assert [list(p) for p in config.distill.layer_map] == [[0, 1], [1, 3]]
    assert config.to_dict()["distill"]["layer_map"] == [[0, 1], [1, 3]]


# --- the module -----------------------------------------------------------------------------------------------


def test_student_from_teacher_layers_trains_and_the_teacher_stays_out(teachers, tmp_path) -> None:
    module, _ = _prepare(teachers["bert4"], tmp_path, keep_every=2, hidden_weight=1.0)
    teacher = module.teacher
    student = module.student

    # The student is teacher blocks 1 and 3 (head included); the teacher is outside the module tree.
    _, teacher_blocks = find_blocks_module(teacher)
    _, student_blocks = find_blocks_module(student)
    assert len(teacher_blocks) == 4 and len(student_blocks) == 2
    for j, i in enumerate([1, 3]):
        for (name, s), (_, t) in zip(student_blocks[j].named_parameters(), teacher_blocks[i].named_parameters()):
            assert torch.equal(s, t), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.config.id2label == teacher.config.id2label == {0: "negative", 1: "positive"}
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in module.parameters()}
    assert all(k.startswith(("student.", "projector.")) for k in module.state_dict())
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(p.requires_grad for p in module.parameters())
    assert module.layer_pairs == [(0, 1), (1, 3)]
    assert module.projector is not None and module.projector.is_identity  # same width: nothing to learn

    module.train()
    out = module(**_batch(teachers["bert4"]))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)
    assert set(out.components) == {"loss", "loss_ce", "loss_kd", "loss_hidden"}
    assert all(math.isfinite(float(v)) and v >= 0 for v in out.components.values())  # `v == v` let inf through
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.classifier.weight.grad is not None
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    assert not teacher.training  # module.train() does not reach the teacher


def test_compute_loss_reports_the_terms_and_eval_runs_only_the_student(teachers, tmp_path) -> None:
    module, _ = _prepare(teachers["bert4"], tmp_path, keep_layers=[0, 3], alpha=0.2, kd_weight=0.8)
    calls = []
    module.teacher.register_forward_hook(lambda *args: calls.append(1))
    batch = _batch(teachers["bert4"])

    module.train()
    output = get_method("distill").compute_loss(module, batch)
    assert set(output.extra) == {"loss_ce", "loss_kd"}  # no hidden term at hidden_weight 0
    expected = 0.2 * output.extra["loss_ce"] + 0.8 * output.extra["loss_kd"]
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)
    assert module.projector is None and calls == [1]

    module.eval()
    with torch.no_grad():
        out = module(**batch)
    assert calls == [1]  # evaluation does not run the teacher
    assert out.logits.shape == (3, 2)
    assert out.loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(out.logits, batch["labels"]).item(), rel=1e-5
    )


def test_pretrained_student_of_another_width_learns_a_projection(teachers, tiny_models, tmp_path) -> None:
    # Student: the 2-block, hidden-32 tiny BERT (model.path); teacher: 4 blocks of hidden 64, same tokenizer.
    config = config_from_dict(
        _job(
            tiny_models["bert"],
            tmp_path,
            {
                "teacher": str(teachers["bert4-wide"]),
                "student_init": "pretrained",
                "hidden_weight": 1.0,
                "hidden_loss": "cosine",
            },
        )
    )
    model = load_model(str(tiny_models["bert"]), task="sequence-classification", label_names=LABELS)
    context = MethodContext(model_path=str(tiny_models["bert"]), device=CPU.device, precision="fp32", world_size=1)
    module = get_method("distill").prepare_model(model, config, context)
    assert module.student is model
    assert module.layer_pairs == [(0, 1), (1, 3)]
    assert [tuple(module.projector[k].weight.shape) for k in range(2)] == [(64, 32), (64, 32)]
    out = module(**_batch(tiny_models["bert"]))
    out.loss.backward()
    assert module.projector[0].weight.grad is not None


def test_layer_groups_of_the_module_are_the_students_blocks(teachers, tmp_path) -> None:
    module, _ = _prepare(teachers["bert4"], tmp_path, keep_every=2, hidden_weight=1.0)
    groups = find_layer_groups(module)
    assert groups.block_modules == ["student.bert.encoder.layer.0", "student.bert.encoder.layer.1"]
    assert groups.embeddings and all(n.startswith("student.bert.embeddings.") for n in groups.embeddings)
    assert "student.classifier.weight" in groups.head

    # A projector with more (Linear) projections than the student has blocks does not steal the blocks.
    wide = DistillationModule(
        module.student,
        module.teacher,
        module.settings,
        task="sequence-classification",
        layer_pairs=module.layer_pairs,
        projector=HiddenProjector.from_sizes(32, 64, 5),
    )
    groups = find_layer_groups(wide)
    assert groups.num_blocks == 2 and groups.block_modules[0] == "student.bert.encoder.layer.0"
    assert "projector.projections.4.weight" in groups.head


def test_save_weights_writes_only_the_student_and_the_lineage(teachers, tmp_path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    module, config = _prepare(teachers["bert4"], tmp_path, keep_every=2, hidden_weight=1.0)
    destination = tmp_path / "export"
    destination.mkdir()
    get_method("distill").save_weights(module, WeightStream(module, is_rank0=True), destination, config)

    weights = load_file(destination / "model.safetensors")
    assert not any(k.startswith(("student.", "projector.", "teacher")) for k in weights)
    exported = AutoModelForSequenceClassification.from_pretrained(destination).eval()
    assert exported.config.num_hidden_layers == 2
    assert exported.config.id2label == {0: "negative", 1: "positive"}
    batch = {k: v for k, v in _batch(teachers["bert4"]).items() if k != "labels"}
    module.eval()
    with torch.no_grad():
        assert torch.allclose(exported(**batch).logits, module.student(**batch).logits, atol=1e-6)
    lineage = json.loads((destination / LINEAGE_FILE).read_text())
    assert lineage["teacher"] == str(teachers["bert4"])
    assert lineage["kept_teacher_layers"] == [1, 3]
    assert lineage["layer_map"] == [[0, 1], [1, 3]]
    assert lineage["teacher_placement"] == "replicated"


def test_placement_auto_is_replicated_on_cpu(teachers) -> None:
    teacher = load_model(str(teachers["bert4"]), task="sequence-classification", label_names=LABELS)
    for world_size in (1, 4):
        placement = resolve_placement(
            "auto", teacher, device=torch.device("cpu"), precision="fp32", world_size=world_size
        )
        assert placement == "replicated"
    assert resolve_placement("sharded", teacher, device="cpu", precision="fp32", world_size=2) == "sharded"


# --- vocabulary and preflight ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vocab_teacher(teachers, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-block teacher whose tokenizer has an extra token (a different vocabulary from model.path)."""
    folder = tmp_path_factory.mktemp("other-vocab") / "bert4"
    shutil.copytree(teachers["bert4"], folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.add_tokens(["<only-in-the-teacher>"])
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_with_another_vocabulary_is_refused(other_vocab_teacher, tiny_models, tmp_path) -> None:
    job = _job(tiny_models["bert"], tmp_path, {"teacher": str(other_vocab_teacher)})
    config = config_from_dict(job)
    issues = get_method("distill").preflight(config, str(tiny_models["bert"]))
    assert [i.location for i in issues] == ["distill.teacher"]
    assert "tokenizer has" in issues[0].message and "model.path" in issues[0].message

    model = load_model(str(tiny_models["bert"]), task="sequence-classification", label_names=LABELS)
    context = MethodContext(model_path=str(tiny_models["bert"]), device=CPU.device, precision="fp32", world_size=1)
    with pytest.raises(ConfigError, match="distill.teacher"):
        get_method("distill").prepare_model(model, config, context)


def test_preflight_reports_teacher_path_and_depth_problems(teachers, tiny_models, tmp_path) -> None:
    method = get_method("distill")
    model_path = str(tiny_models["bert"])

    missing = config_from_dict(_job(tiny_models["bert"], tmp_path, {"teacher": str(tmp_path / "nowhere")}))
    issues = method.preflight(missing, model_path)
    assert [i.location for i in issues] == ["distill.teacher"] and "does not exist" in issues[0].message

    ok = config_from_dict(_job(tiny_models["bert"], tmp_path, {"teacher": str(teachers["bert4"]), "hidden_weight": 1}))
    assert method.preflight(ok, model_path) == []

    bad_layers = config_from_dict(
        _job(tiny_models["bert"], tmp_path, {"teacher": str(teachers["bert4"]), "keep_layers": [1, 4]})
    )
    assert [i.location for i in method.preflight(bad_layers, model_path)] == ["distill.keep_layers"]

    bad_map = config_from_dict(
        _job(
            tiny_models["bert"],
            tmp_path,
            {"teacher": str(teachers["bert4"]), "hidden_weight": 1, "keep_every": 2, "layer_map": [[0, 1], [2, 3]]},
        )
    )
    issues = method.preflight(bad_map, model_path)
    assert [i.location for i in issues] == ["distill.layer_map"] and "student block 2" in issues[0].message


def test_unfreezing_schedules_the_students_blocks(teachers, tmp_path) -> None:
    from orchestrator.budget import StepBudget
    from orchestrator.train.unfreezing import build_unfreezing

    module, config = _prepare(teachers["bert4"], tmp_path, keep_every=2, hidden_weight=1.0)
    config.unfreeze = config.unfreeze.model_validate({"kind": "gradual", "every_steps": 2})
    unfreezing = build_unfreezing(module, config, StepBudget(total_steps=6, batches_per_epoch=6))
    assert unfreezing is not None and unfreezing.groups.num_blocks == 2
    assert unfreezing.stop.update(0) == 3  # head only: backward stops above the student's top block
    module.train()
    module(**_batch(teachers["bert4"])).loss.backward()
    assert module.student.classifier.weight.grad is not None
    assert module.student.bert.encoder.layer[1].attention.self.query.weight.grad is None
    unfreezing.stop.remove()


def test_lora_student_trains_only_adapters_and_head_and_exports_a_merged_model(teachers, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    config = config_from_dict(
        {
            **_job(teachers["bert4"], tmp_path, {"teacher": str(teachers["bert4"]), "hidden_weight": 1}),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        }
    )
    model = load_model(str(teachers["bert4"]), task="sequence-classification", label_names=LABELS)
    context = MethodContext(model_path=str(teachers["bert4"]), device=CPU.device, precision="fp32", world_size=1)
    module = get_method("distill").prepare_model(model, config, context)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n or n.startswith("projector.") for n in trainable)
    assert any("lora_A" in n for n in trainable)  # (same width as the teacher: the projector has no parameters)
    assert not any("teacher" in n for n, _ in module.named_parameters())

    out = get_method("distill").compute_loss(module, _batch(teachers["bert4"]))
    assert {"loss_ce", "loss_kd", "loss_hidden"} <= set(out.extra)
    out.loss.backward()
    with torch.no_grad():  # move the adapters off zero so the merge is visible
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)

    destination = tmp_path / "export"
    destination.mkdir()
    get_method("distill").save_weights(module, WeightStream(module, is_rank0=True), destination, config)
    assert (destination / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(destination).eval()
    assert merged.config.num_hidden_layers == 2
    batch = {k: v for k, v in _batch(teachers["bert4"]).items() if k != "labels"}
    module.eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, module.student(**batch).logits, atol=1e-5)
    assert json.loads((destination / LINEAGE_FILE).read_text())["student_lora"] == {"r": 4, "alpha": 8.0}


def test_eval_scores_the_teacher_side_by_side(teachers, tmp_path) -> None:
    """evaluate() on a distillation module: student metrics plus the teacher's accuracy, the agreement between
    them and each one's forward speed; off with distill.eval_teacher: false."""
    from orchestrator.train.evaluation import evaluate

    module, _ = _prepare(teachers["bert4"], tmp_path, keep_every=2)
    batch = _batch(teachers["bert4"])
    rows = batch["input_ids"].shape[0]

    class Reader:
        scanned = list(range(rows))

        def __len__(self):
            return rows

        def get(self, i):
            return i, None, int(batch["labels"][i])

    def collate(items):
        index = torch.tensor([r[0] for r in items])
        return {k: v[index] for k, v in batch.items()}

    common = dict(task="sequence-classification", num_labels=2, batch_size=2, rank=0, world_size=1,
                  device=torch.device("cpu"))
    metrics = evaluate(module, Reader(), collate, **common)
    module.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student = module.student(**inputs).logits.argmax(-1)
        teacher = module.teacher(**inputs).logits.argmax(-1)
    assert metrics["accuracy"] == pytest.approx((student == batch["labels"]).float().mean().item())
    assert metrics["teacher_accuracy"] == pytest.approx((teacher == batch["labels"]).float().mean().item())
    assert metrics["agreement"] == pytest.approx((student == teacher).float().mean().item())
    assert metrics["forward_samples_per_s"] > 0 and metrics["teacher_forward_samples_per_s"] > 0

    quiet, _ = _prepare(teachers["bert4"], tmp_path, keep_every=2, eval_teacher=False)
    assert "teacher_accuracy" not in evaluate(quiet, Reader(), collate, **common)
