"""The GPU path, correct by construction on CPU machines (GPUs faked where only the decision is tested), and
for real behind the `gpu` marker (skipped without a CUDA GPU): bf16, NCCL, `use_gpu: auto`, fused AdamW."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.train.engine import build_deepspeed_config, build_optimizer, resolve_precision
from tests.conftest import tiny_job


def test_auto_precision_is_bf16_on_gpus_that_have_it_else_fp16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"
    assert resolve_precision("auto", "cpu") == "fp32"


def test_bf16_deepspeed_config_has_bf16_on_and_fp16_off(tiny_models, tmp_path) -> None:
    config = config_from_dict(tiny_job("gpu-cfg", tiny_models["bert"], tmp_path, tmp_path, stage=2))
    ds = build_deepspeed_config(config, world_size=8, precision="bf16")
    assert ds["bf16"]["enabled"] is True and not ds.get("fp16", {}).get("enabled", False)
    assert ds["train_batch_size"] == 8 * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]


def test_fused_adamw_is_asked_for_on_cuda_and_cpu(tiny_models, tmp_path, monkeypatch) -> None:
    config = config_from_dict(tiny_job("gpu-opt", tiny_models["bert"], tmp_path, tmp_path))
    seen = {}

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.update(kwargs)
            kwargs["fused"] = False  # the decision is what is tested; CPU tensors here
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    build_optimizer(groups, config, device_type="cuda")
    assert seen["fused"] is True
    build_optimizer(groups, config, device_type="cpu")
    assert seen["fused"] is True


@pytest.mark.parametrize(("cluster_gpus", "setting", "expected"), [(8, "auto", True), (0, "auto", False),
                                                                   (8, False, False)])
def test_use_gpu_auto_follows_the_cluster_and_picks_nccl(cluster_gpus, setting, expected, tiny_models,
                                                         shared_data, tmp_path, monkeypatch) -> None:
    import ray

    from orchestrator.cluster.launcher import build_trainer
    from orchestrator.cluster.preflight import check_cluster_fits, preflight

    job = tiny_job("gpu-auto", tiny_models["bert"], shared_data, tmp_path)
    job["scaling"]["use_gpu"] = setting
    config = config_from_dict(job)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": float(cluster_gpus)})
    use_gpu = check_cluster_fits(config)
    assert use_gpu is expected
    trainer = build_trainer(preflight(config), use_gpu=use_gpu)
    assert trainer.scaling_config.use_gpu is expected
    assert trainer.backend_config.backend == ("nccl" if expected else "gloo")


@pytest.mark.parametrize(("change", "field"), [
    ({"deepspeed": {"stage": 3}}, "ZeRO-3"),
    ({"model": {"task": "sequence-classification"}}, "causal-lm"),
])
def test_liger_kernel_is_refused_where_it_cannot_work(change, field, tiny_models, shared_data, tmp_path) -> None:
    from orchestrator.errors import ConfigError

    job = tiny_job("liger", tiny_models["llama"], shared_data, tmp_path, task="causal-lm", stage=2)
    job["model"]["liger_kernel"] = True
    for section, values in change.items():
        job[section].update(values)
    with pytest.raises(ConfigError, match=rf"model.liger_kernel(.|\n)*{field}"):
        config_from_dict(job)


def test_liger_kernel_on_a_cluster_without_gpus_fails_before_taking_resources(tiny_models, shared_data, tmp_path,
                                                                               monkeypatch) -> None:
    import ray

    from orchestrator.cluster.preflight import check_cluster_fits
    from orchestrator.errors import OrchestratorError

    job = tiny_job("liger-cpu", tiny_models["llama"], shared_data, tmp_path, task="causal-lm", stage=2)
    job["model"]["liger_kernel"] = True
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    with pytest.raises(OrchestratorError, match="model.liger_kernel: .* GPU workers only"):
        check_cluster_fits(config_from_dict(job))


def test_liger_kernel_names_what_is_missing_for_an_unsupported_model(tiny_models) -> None:
    from transformers import AutoModelForSequenceClassification

    from orchestrator.errors import ModelError
    from orchestrator.models.loading import apply_liger_kernel

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"])
    with pytest.raises(ModelError, match="model.liger_kernel"):  # no package here, or no kernels for BERT
        apply_liger_kernel(model)


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_zero2_training_on_the_gpu(ray_cluster, tiny_models, shared_data, tmp_path) -> None:
    from orchestrator.cluster.launcher import run_training
    from orchestrator.tracking import read_metrics

    job = tiny_job("gpu-bf16", tiny_models["bert"], shared_data, tmp_path, stage=2)
    job["scaling"].update(num_workers=1, use_gpu="auto")
    job["tracking"]["wandb"]["mode"] = "disabled"  # the GPU path, not W&B (tested on CPU), is under test here
    result = run_training(config_from_dict(job))
    records = read_metrics(result.run_dir)
    start = next(r for r in records if r["kind"] == "start")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert start["precision"] == expected
    train = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["train/loss"]) for r in train)
    assert train[-1]["memory/peak_cuda_allocated_mb"] > 0


def _without_dropout(model: Path, destination: Path) -> Path:
    """A copy of a tiny BERT whose forward is deterministic (no dropout), so two runs can be compared number to
    number."""
    import json
    import shutil

    shutil.copytree(model, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL between GPUs)")
@pytest.mark.parametrize("stage", [2, 3])
def test_two_gpus_over_nccl_train_as_one_gpu_with_their_global_batch(stage, ray_cluster, tiny_models, shared_data,
                                                                     tmp_path) -> None:
    """Data parallelism over NCCL is exact: 2 GPU workers x 8 rows per step train like 1 GPU x 16 rows.

    Rank r reads rows r, r+2, ... of each epoch's seeded order, so the two workers' step k holds the same 16 rows
    as the single worker's step k; both start from the same weights (one seed on every rank), and averaging the
    two 8-row gradients (NCCL all-reduce / reduce-scatter, ZeRO-3's all-gathers) gives the 16-row gradient. In
    fp32 with no dropout the two runs then end with the same weights and eval losses to float rounding. Measured
    with the same construction on 2 CPU workers (gloo, ZeRO-2): weights 3e-8 apart; a 1 x 8-row run (what a rank
    that misses the other's gradient would train on) ends 5e-3 apart, and its eval loss 2e-4 (relative) away.
    """
    from safetensors.torch import load_file

    from orchestrator.cluster.launcher import run_training
    from orchestrator.tracking import read_metrics

    model = _without_dropout(tiny_models["bert"], tmp_path / "bert-no-dropout")
    records, weights = {}, {}
    for workers, batch in ((2, 8), (1, 16)):
        job = tiny_job(f"gpu-nccl-z{stage}-w{workers}", model, shared_data, tmp_path, stage=stage,
                       batch_size_per_worker=batch)
        job["deepspeed"]["precision"] = "fp32"  # bf16 rounding would hide a small difference
        job["scaling"].update(num_workers=workers, use_gpu=True)
        job["tracking"]["wandb"]["mode"] = "disabled"
        result = run_training(config_from_dict(job))
        records[workers] = read_metrics(result.run_dir)
        weights[workers] = load_file(str(result.final_model / "model.safetensors"))

    start = next(r for r in records[2] if r["kind"] == "start")
    assert start["world_size"] == 2 and len(set(start["worker_pids"])) == 2 and start["precision"] == "fp32"
    assert sorted(weights[2]) == sorted(weights[1])
    apart = max(float((weights[2][k] - weights[1][k]).abs().max()) for k in weights[2])
    assert apart < 2e-4, f"2 x 8 rows and 1 x 16 rows end {apart:.2e} apart"
    initial = load_file(str(model / "model.safetensors"))  # a BertModel: the classifier's keys less "bert."
    moved = max(float((weights[2][f"bert.{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # it trained (3.4e-3 on CPU): the agreement is not that of two untouched copies
    evals = {w: [r for r in records[w] if r["kind"] == "eval"] for w in records}
    assert [r["step"] for r in evals[2]] == [r["step"] for r in evals[1]] == [3, 6]
    for a, b in zip(evals[2], evals[1]):
        assert a["sst2/loss"] == pytest.approx(b["sst2/loss"], rel=2e-5), (a["step"], a["sst2/loss"], b["sst2/loss"])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(("stage", "liger", "compiled"), [(2, False, False), (3, False, False), (2, True, False),
                                                         (2, True, True)])
def test_packed_causal_lm_bf16_on_the_gpu(stage, liger, compiled, ray_cluster, tiny_models, shared_data,
                                          tmp_path) -> None:
    from orchestrator.cluster.launcher import run_training
    from orchestrator.tracking import read_metrics

    if liger:
        pytest.importorskip("liger_kernel")
    job = tiny_job(f"gpu-lm-z{stage}", tiny_models["llama"], shared_data, tmp_path, task="causal-lm", stage=stage,
                   lr=3e-3)
    job["model"].update(liger_kernel=liger, torch_compile=compiled)
    job["data"].update(packing=True, max_length=32)
    job["data"]["train"]["limit"] = 1200
    job["scaling"].update(num_workers=1, use_gpu="auto")
    job["tracking"]["wandb"]["mode"] = "disabled"
    result = run_training(config_from_dict(job))
    records = read_metrics(result.run_dir)
    start = next(r for r in records if r["kind"] == "start")
    assert start["precision"] == "bf16"
    train = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["train/loss"]) for r in train)
    # Blocks of whole documents: real tokens only, at most max_length per block (orchestrator.data.batching).
    assert 0.85 < train[-1]["train/tokens_per_s"] / (train[-1]["train/samples_per_s"] * 32) <= 1 + 1e-6
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["sst2/loss"] < evals[0]["sst2/loss"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(result.final_model).config.num_hidden_layers == 2


def test_compile_blocks_compiles_each_transformer_block_and_nothing_above(tiny_models, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from orchestrator.models.loading import compile_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))

    assert compile_blocks(model) == 2
    assert compiled == list(model.model.layers)  # the loss (Liger's fused one) stays outside every graph
