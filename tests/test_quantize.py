"""``orchestrator quantize`` without a cluster: tiny BERT classifiers and a tiny Llama quantized with torchao on CPU,
loaded back with plain ``from_pretrained``, scored against their source and registered with it as parent; bad input
refused before any model is loaded; a continual round quantizing the champion it promotes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.config.retrain import QuantizeSection, retrain_from_dict
from orchestrator.errors import ConfigError, ModelError
from orchestrator.lifecycle import quantization
from orchestrator.lifecycle.quantization import quantize_model
from orchestrator.lifecycle.registry import Registry
from orchestrator.models import quantize as quantize_module
from orchestrator.models.quantize import METHODS, weight_bytes

TEXTS = ["a charming and often affecting journey", "unflinchingly bleak and desperate", "it is a film", "no"]
NO_WANDB = {"wandb": {"mode": "disabled"}}


def _eval_file(folder: Path, rows: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.tsv"
    lines = ["sentence\tlabel"] + [f"{TEXTS[i % len(TEXTS)]} number {i}\t{i % 2}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _export(folder: Path, model: Any, tokenizer: Any, job: dict[str, Any]) -> Path:
    """A folder as a run exports it: weights, tokenizer and the job file."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "orchestrator_job.yaml").write_text(yaml.safe_dump(job))
    return folder


def _classifier(tmp_path: Path, tiny_models: dict[str, Path], name: str = "sst2") -> Path:
    """A tiny BERT sequence classifier exported with a job whose eval set is a small TSV file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = {0: "negative", 1: "positive"}
    # The new head is drawn here: seeded, or a draw nearly orthogonal to the pooled features (logits ~5e-4, where
    # int8's ~3e-4 absolute error is 30% of them) would make _close's relative bound fail one run in ten.
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_models["bert"], num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    data = _eval_file(tmp_path / "data")
    job = {
        "name": name,
        "model": {"path": str(tiny_models["bert"]), "task": "sequence-classification"},
        "data": {
            "train": {"path": str(data), "text_column": "sentence"},
            "eval": [{"path": str(data), "name": "tiny_eval", "text_column": "sentence"}],
            "label_names": ["negative", "positive"],
            "max_length": 32,
        },
        "tracking": NO_WANDB,
        "output": {"dir": str(tmp_path / "runs")},
    }
    return _export(tmp_path / "runs" / name / "final", model, AutoTokenizer.from_pretrained(tiny_models["bert"]), job)


def _register_parent(registry: Registry, folder: Path) -> Any:
    job = yaml.safe_load((folder / "orchestrator_job.yaml").read_text())
    evals = [{"name": e["name"], "path": e["path"], "rows": 24} for e in job["data"]["eval"]]
    return registry.register(
        job["name"], method="full", artifact=str(folder), config=job, data={"eval": evals}, metrics={},
        base_model=job["model"]["path"], licence="apache-2.0",
    )  # fmt: skip


def _logits(folder: Path, texts: list[str], causal: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder).eval()  # plain from_pretrained: the quantization config is in config.json
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)).logits


def _close(quantized: torch.Tensor, parent: torch.Tensor) -> None:
    """int8 rounding of a random 2-layer model moves its logits by a few percent of their spread, no more."""
    scale = parent.abs().max().item()
    assert (quantized - parent).abs().max().item() < 0.1 * scale
    assert torch.nn.functional.cosine_similarity(quantized.flatten(), parent.flatten(), dim=0) > 0.99


def test_a_registered_classifier_is_quantized_scored_against_it_and_registered_as_its_child(tmp_path, tiny_models):
    source = _classifier(tmp_path, tiny_models)
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    parent = _register_parent(registry, source)
    out = tmp_path / "quantized"

    result = quantize_model(parent.id, str(out), registry=registry.path, threads=1)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and not list(out.glob("*.bin"))
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(loaded.bert.encoder.layer[0].attention.self.query.weight, Int8Tensor)
    assert not isinstance(loaded.bert.encoder.layer[0].attention.self.query.bias, Int8Tensor)
    embedding = loaded.bert.embeddings.word_embeddings.weight
    assert isinstance(embedding, Int8Tensor) and embedding.act_quant_kwargs is None  # int8 rows, weight-only
    assert not isinstance(loaded.classifier.weight, Int8Tensor)  # the output layer stays fp32
    _close(_logits(out, TEXTS), _logits(source, TEXTS))

    record = result.record
    assert record is not None and record.id == "sst2-int8-dynamic-v1"
    assert record.parent_id == parent.id and record.method == "quantize" and record.status == "candidate"
    assert record.base_model == parent.base_model and record.licence == "apache-2.0"
    assert [c.id for c in registry.children(parent.id)] == [record.id]
    summary = record.metrics["quantize"]
    assert summary["method"] == "int8-dynamic" and summary["threads"] == 1 and summary["parent"] == parent.id
    assert summary["weight_bytes"]["parent"] == weight_bytes(source)
    assert summary["weight_bytes"]["quantized"] == weight_bytes(out)
    assert summary["weight_bytes"]["ratio"] < 0.4  # the embeddings (most of a tiny model) are int8 too
    assert summary["latency_s"]["parent"] > 0 and summary["latency_s"]["quantized"] > 0
    assert set(record.metrics["eval"]["tiny_eval"]) >= {"accuracy", "f1_macro", "loss"}
    assert set(summary["parent_eval"]["tiny_eval"]) >= {"accuracy", "f1_macro", "loss"}
    accuracy, before = record.metrics["eval"]["tiny_eval"]["accuracy"], summary["parent_eval"]["tiny_eval"]["accuracy"]
    assert summary["delta"]["tiny_eval"]["accuracy"] == pytest.approx(accuracy - before)

    registry.verify(record.id)  # the version folder holds what was registered, the card included
    card = ModelCard.load(Path(record.artifact) / "README.md")
    assert card.data.base_model == parent.base_model and "quantize" in card.data.tags
    assert f"{summary['weight_bytes']['ratio']:.3f}" in card.text and f"`{parent.id}`" in card.text
    shown = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert shown[("tiny_eval", "accuracy")] == record.metrics["eval"]["tiny_eval"]["accuracy"]


def test_the_weight_only_method_and_an_unregistered_export_folder(tmp_path, tiny_models):
    source = _classifier(tmp_path, tiny_models, name="plain")
    out = tmp_path / "quantized"

    result = quantize_model(str(source), str(out), method="int8-weight", embeddings="fp32")

    assert result.record is None  # the job registered nothing (no registry file): nothing to register beside
    from torchao.quantization import Int8Tensor
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    weight = loaded.bert.encoder.layer[0].intermediate.dense.weight
    assert isinstance(weight, Int8Tensor) and weight.act_quant_kwargs is None  # weights only
    assert not isinstance(loaded.bert.embeddings.word_embeddings.weight, Int8Tensor)
    _close(_logits(out, TEXTS), _logits(source, TEXTS))
    assert result.metrics["quantize"]["embeddings"] == "fp32" and (out / "README.md").is_file()


def test_an_export_on_a_bucket_is_quantized_onto_the_bucket(tmp_path, tiny_models, s3_bucket, monkeypatch):
    from orchestrator import storage

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    source = _classifier(tmp_path, tiny_models, name="remote")
    storage.upload(source, storage.join(s3_bucket, "runs", "remote", "final"))
    out = storage.join(s3_bucket, "quantized", "remote-int8")

    result = quantize_model(storage.join(s3_bucket, "runs", "remote", "final"), out)

    assert result.out == out and storage.exists(storage.join(out, "README.md"))
    local = storage.local_copy(out)
    assert json.loads((local / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    _close(_logits(local, TEXTS), _logits(source, TEXTS))


def test_a_causal_lm_is_quantized_with_its_generated_eval_sets_scored(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "data" / "qa.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"q": f"what is {i}", "a": f"{i}"}) + "\n" for i in range(6)))
    job = {
        "name": "sft",
        "model": {"path": str(tiny_models["llama"]), "task": "causal-lm"},
        "data": {
            "train": {"path": str(data), "prompt_column": "q", "completion_column": "a"},
            "eval": [
                {
                    "path": str(data),
                    "name": "qa",
                    "prompt_column": "q",
                    "completion_column": "a",
                    "generate": True,
                    "max_new_tokens": 3,
                }
            ],  # fmt: skip
            "max_length": 32,
        },
        "tracking": NO_WANDB,
        "output": {"dir": str(tmp_path / "runs"), "registry": None},
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    source = _export(tmp_path / "sft-final", model, AutoTokenizer.from_pretrained(tiny_models["llama"]), job)
    registry = Registry(tmp_path / "elsewhere" / "registry.sqlite")

    result = quantize_model(str(source), str(tmp_path / "q"), registry=registry.path)

    from torchao.quantization import Int8Tensor

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    assert not isinstance(loaded.lm_head.weight, Int8Tensor)  # the vocabulary logits stay fp32
    assert not isinstance(loaded.model.embed_tokens.weight, Int8Tensor)  # auto: fp32 embeddings for a causal LM
    _close(_logits(tmp_path / "q", TEXTS, causal=True), _logits(source, TEXTS, causal=True))
    assert set(result.metrics["eval"]["qa"]) >= {"exact_match", "perplexity", "loss"}
    assert set(result.metrics["quantize"]["parent_eval"]["qa"]) >= {"exact_match", "perplexity"}
    record = result.record
    assert record is not None and record.parent_id is None and record.parent_ref == str(source)
    assert record.method == "quantize" and record.name == "sft-int8-dynamic"


def test_int8_embedding_rows_are_looked_up_before_they_are_dequantized():
    from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, PerRow, quantize_

    embedding = torch.nn.Embedding(500, 24)
    quantize_(embedding, Int8WeightOnlyConfig(granularity=PerRow()), filter_fn=lambda m, _: m is embedding)
    weight = embedding.weight
    ids = torch.randint(500, (3, 7))
    whole_table = torch.nn.functional.embedding(ids, weight.dequantize())  # torchao's own path: all 500 rows
    quantize_module.use_rows_first_embeddings()
    quantize_module.use_rows_first_embeddings()  # once per process: a second call changes nothing
    calls = []
    original = Int8Tensor.dequantize
    try:
        Int8Tensor.dequantize = lambda self, *a, **k: calls.append(self.shape) or original(self, *a, **k)
        with torch.no_grad():
            rows_first = embedding(ids)
    finally:
        Int8Tensor.dequantize = original
    assert calls == []  # the table was never dequantized whole
    assert torch.equal(rows_first, whole_table)


def test_bad_input_is_refused_before_any_model_is_loaded(tmp_path, tiny_models, monkeypatch):
    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(quantize_module, "quantize_folder", no_work)
    source = _classifier(tmp_path, tiny_models)
    with pytest.raises(ModelError, match=r"unknown quantization method 'int4'; use one of int8-dynamic, int8-weight"):
        quantize_model(str(source), str(tmp_path / "a"), method="int4")
    with pytest.raises(ModelError, match="--embeddings: unknown choice 'bf16'"):
        quantize_model(str(source), str(tmp_path / "a"), embeddings="bf16")
    with pytest.raises(ModelError, match=r"'no-such-model' is not a model folder and there is no registry at"):
        quantize_model("no-such-model", str(tmp_path / "a"), registry=tmp_path / "none.sqlite")
    with pytest.raises(ModelError, match="does not exist"):
        quantize_model(str(tmp_path / "missing-folder"), str(tmp_path / "a"))
    registry = Registry(tmp_path / "reg.sqlite")
    _register_parent(registry, source)
    with pytest.raises(ModelError, match=r"no model 'sst3-v1' in .*did you mean sst2-v1"):
        quantize_model("sst3-v1", str(tmp_path / "a"), registry=registry.path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ModelError, match="--out: .* is not an empty folder"):
        quantize_model(str(source), str(tmp_path / "full"))
    (source / "orchestrator_job.yaml").unlink()
    with pytest.raises(ModelError, match="has no orchestrator_job.yaml, so its eval sets are unknown"):
        quantize_model(str(source), str(tmp_path / "a"))


def test_the_cli_quantizes_a_registered_model_and_names_bad_input(tmp_path, tiny_models):
    runner = CliRunner()
    missing = runner.invoke(app, ["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    method = runner.invoke(app, ["quantize", str(tmp_path), "--out", str(tmp_path / "o"), "--method", "fp4"])
    assert method.exit_code != 0 and "unknown quantization method 'fp4'" in method.output

    registry = Registry(tmp_path / "reg.sqlite")
    parent = _register_parent(registry, _classifier(tmp_path, tiny_models))
    args = ["quantize", parent.id, "--out", str(tmp_path / "q"), "--registry", str(registry.path), "--threads", "1"]
    done = runner.invoke(app, args, terminal_width=200)
    assert done.exit_code == 0, done.output
    assert "sst2-int8-dynamic-v1" in done.output and "tiny_eval/accuracy" in done.output
    assert "weight bytes" in done.output and registry.get("sst2-int8-dynamic-v1").parent_id == parent.id


def test_the_retrain_file_quantize_section(tmp_path):
    from tests.test_continual import _retrain_dict

    assert QuantizeSection.model_fields["method"].annotation.__args__ == METHODS  # the config offers every method
    loaded = retrain_from_dict(_retrain_dict(tmp_path, quantize={"method": "int8-weight", "threads": 2}))
    assert loaded.config.quantize == QuantizeSection(method="int8-weight", threads=2)
    assert retrain_from_dict(_retrain_dict(tmp_path)).config.quantize is None  # off unless asked for
    with pytest.raises(ConfigError, match="quantize.method"):
        retrain_from_dict(_retrain_dict(tmp_path, quantize={"method": "int4"}))


def test_a_round_quantizes_the_champion_it_promotes(tmp_path, tiny_models):
    from orchestrator.lifecycle.rounds import run_round
    from tests.test_continual import FakeTrainer, _retrain_dict, _shard

    base = _classifier(tmp_path / "base", tiny_models, name="base")

    class ExportingTrainer(FakeTrainer):
        """The fake trainer, exporting a real (tiny) classifier: the base model's files."""

        def __call__(self, config: Any, **kwargs: Any) -> Any:
            result = super().__call__(config, **kwargs)
            for file in base.iterdir():
                if file.name != "orchestrator_job.yaml":
                    (result.final_model / file.name).write_bytes(file.read_bytes())
            (result.final_model / "orchestrator_job.yaml").write_text(yaml.safe_dump(config.to_dict()))
            return result

    spec = _retrain_dict(tmp_path, model=str(base), quantize={"method": "int8-dynamic", "threads": 1})
    spec["job"]["tracking"] = NO_WANDB
    loaded = retrain_from_dict(spec)
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    _shard(tmp_path / "incoming", "shard1.tsv", 40)

    first = run_round(loaded, registry=registry, train=ExportingTrainer([{"*": 0.9}]))

    assert first.decision == "promote", first.reason
    quantized = first.quantized
    assert quantized is not None and quantized.id == "sent-int8-dynamic-v1" and quantized.status == "champion"
    assert quantized.parent_id == first.candidate.id and quantized.method == "quantize"
    assert registry.champion("sent-int8-dynamic").id == quantized.id
    assert registry.champion("sent").id == first.candidate.id  # the round's own champion stays
    assert set(quantized.metrics["eval"]) == {"fixed", "shard1"}  # the champion's eval sets
    assert Path(quantized.artifact).is_dir() and (first.run_dir / "quantized-int8-dynamic" / "config.json").is_file()
    assert json.loads((first.run_dir / "round.json").read_text())["quantized"] == quantized.id


def test_a_failed_quantization_leaves_the_promotion_standing(tmp_path, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ModelError("torchao is broken here")

    monkeypatch.setattr(quantization, "quantize_model", broken)
    record = Registry(tmp_path / "r.sqlite").register("m", method="full", artifact=str(tmp_path), config={}, data={},
                                                      metrics={}, status="champion")  # fmt: skip
    assert quantization.quantize_champion(Registry(tmp_path / "r.sqlite"), record, QuantizeSection(), tmp_path) is None
