"""LoRA: default targets per architecture, a target that matches nothing is a clear error before any
cluster work, merged exports equal the adapter model; and under ZeRO 2/3 with 2 Ray workers."""

from __future__ import annotations

import pytest
import torch

from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError, ModelError
from orchestrator.methods.base import MethodContext
from orchestrator.methods.lora import LoraMethod, check_targets
from orchestrator.models.weight_stream import WeightStream
from tests.conftest import tiny_job


def _classifier(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def _context(path):
    return MethodContext(model_path=str(path), device=torch.device("cpu"), precision="fp32", world_size=1)


def test_lora_freezes_the_base_and_trains_adapters_and_head(tiny_models, shared_data, tmp_path):
    config = config_from_dict({**tiny_job("l", tiny_models["bert"], shared_data, tmp_path), "method": "lora"})
    model = LoraMethod().prepare_model(_classifier(tiny_models["bert"]), config, _context(tiny_models["bert"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("query.lora_A" in n for n in trainable) and any("value.lora_B" in n for n in trainable)
    assert not any("key.lora" in n for n in trainable)


def test_a_target_that_matches_nothing_names_the_models_modules(tiny_models, shared_data, tmp_path):
    with pytest.raises(ModelError, match=r"\['q_proj'\] match no module.*query.*value"):
        check_targets(_classifier(tiny_models["bert"]), ["q_proj"])
    job = {**tiny_job("l", tiny_models["bert"], shared_data, tmp_path), "method": "lora",
           "lora": {"target_modules": ["q_proj"]}}
    with pytest.raises(ConfigError, match="lora.target_modules"):
        preflight(config_from_dict(job))  # before any Ray worker exists


def test_merged_model_gives_the_adapter_models_logits(tiny_models, shared_data, tmp_path):
    config = config_from_dict({**tiny_job("l", tiny_models["bert"], shared_data, tmp_path), "method": "lora"})
    model = LoraMethod().prepare_model(_classifier(tiny_models["bert"]), config, _context(tiny_models["bert"]))
    with torch.no_grad():  # make the adapters non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    (tmp_path / "export").mkdir()
    LoraMethod().save_weights(model, WeightStream(model, is_rank0=True), tmp_path / "export", config)
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.ci
@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero_exports_adapter_and_merged_model(stage, ray_cluster, tiny_models, shared_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from orchestrator.cluster.launcher import run_training
    from orchestrator.tracking import read_metrics

    job = tiny_job(f"lora-z{stage}", tiny_models["bert"], shared_data, tmp_path, stage=stage, lr=5e-3)
    job["method"] = "lora"
    job["lora"] = {"r": 4, "alpha": 8}
    result = run_training(config_from_dict(job))

    start = next(r for r in read_metrics(result.run_dir) if r["kind"] == "start")
    assert start["params_trainable"] < start["params_total"] * 0.05
    final = result.final_model
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(final).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2,
                                                              id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
    adapted = PeftModel.from_pretrained(base, final / "adapter").eval()
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-4, rtol=1e-3)
