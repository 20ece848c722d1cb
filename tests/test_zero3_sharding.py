"""Specs for models bigger than one worker: built partitioned, loaded tensor by tensor, exported shard by shard,
and planned before any resource is taken."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from orchestrator.cluster.memory_plan import ModelShape, model_states
from orchestrator.config.sections import parse_size
from orchestrator.models.weight_stream import INDEX_NAME, ShardedWriter, WeightStream, write_pretrained
from orchestrator.models.zero3_loading import _model_key, checkpoint_files
from tests.conftest import tiny_job
from tests.support.faults import RecordPartitions


def test_sizes_read_as_hugging_face_reads_max_shard_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    for bad in ("lots", "-1GB", "5 parsecs", ""):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_a_streamed_export_in_several_shards_loads_back_as_the_same_model(tiny_models, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    destination = tmp_path / "export"
    destination.mkdir()
    write_pretrained(model, WeightStream(model, is_rank0=True).tensors(), destination, max_shard_bytes=200_000)
    index = json.loads((destination / INDEX_NAME).read_text())
    shards = sorted(destination.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:  # no shard over the limit unless one tensor alone is larger
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
        assert len(sizes) == 1 or sum(math.prod(s) * 4 for s in sizes) <= 200_000
    loaded = AutoModelForCausalLM.from_pretrained(destination)
    expected = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    batch = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits)


def test_tied_weights_are_written_once_and_other_ranks_write_nothing(tiny_models, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])  # GPT-2 ties lm_head to wte
    names = [name for name, tensor in WeightStream(model, is_rank0=True).tensors()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert all(tensor is None for _, tensor in WeightStream(model, is_rank0=False).tensors())
    writer = ShardedWriter(None)
    writer.add("x", torch.ones(3))
    writer.close()
    assert writer.total_bytes == 0


def test_checkpoint_names_map_between_base_and_task_models(tmp_path) -> None:
    names = {"bert.embeddings.word_embeddings.weight": 1, "classifier.weight": 2}
    assert _model_key("embeddings.word_embeddings.weight", names, "bert") == "bert.embeddings.word_embeddings.weight"
    assert _model_key("bert.embeddings.word_embeddings.weight", {"embeddings.word_embeddings.weight": 1}, "bert") == (
        "embeddings.word_embeddings.weight"
    )
    assert _model_key("pooler.dense.weight", names, "bert") is None
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(Exception, match="no safetensors weights"):
        checkpoint_files(tmp_path)


def test_model_states_follow_the_zero_paper() -> None:
    shape = ModelShape(params=1000, trainable=1000, hidden=8, layers=2, heads=2, vocab=10, largest_block=400)
    gb = {stage: model_states(shape, stage=stage, workers=4, precision="bf16") for stage in (0, 1, 2, 3)}
    total = {stage: sum(v for k, v in s.items() if k != "host_offload") for stage, s in gb.items()}
    assert total == {0: 16_000, 1: 4_000 + 12_000 / 4, 2: 2_000 + 14_000 / 4, 3: 16_000 / 4}  # 2Ψ+2Ψ+12Ψ, /N
    fp32 = model_states(shape, stage=3, workers=2, precision="fp32")
    assert sum(v for k, v in fp32.items() if k != "host_offload") == 20 * 1000 / 2  # as benchmarks/zero.py measured
    offloaded = model_states(shape, stage=3, workers=4, precision="bf16", offload_optimizer=True, offload_params=True)
    assert offloaded["weights"] == offloaded["optimizer"] == offloaded["gradients"] == 0
    assert offloaded["host_offload"] == total[3]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize(("arch", "method"), [("llama", "lora"), ("bert", "full")])
def test_under_zero3_no_rank_ever_holds_a_parameter_whole(arch, method, ray_cluster, tiny_models, shared_data,
                                                           tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    task = "causal-lm" if arch == "llama" else "sequence-classification"
    job = tiny_job(f"z3-{arch}-{method}", tiny_models[arch], shared_data, tmp_path, task=task, stage=3, max_steps=2)
    job["method"] = method
    job["deepspeed"]["overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    job["output"]["max_shard_size"] = "100KB"  # several shards even for a tiny model
    result = run_training(config_from_dict(job), worker_callbacks=[RecordPartitions()])

    start = next(r for r in read_metrics(result.run_dir) if r["kind"] == "start")
    assert start["zero3/params_partitioned_at_load"] == 1.0  # built partitioned, not partitioned after a whole load
    for rank in (0, 1):
        sizes = json.loads((result.run_dir / f"partitions_rank{rank}.json").read_text())
        assert sizes
        for name, (full, held) in sizes.items():
            assert held <= math.ceil(full / 2), (rank, name, full, held)
    auto = AutoModelForCausalLM if arch == "llama" else AutoModelForSequenceClassification
    final = Path(result.final_model)
    assert (final / INDEX_NAME).is_file() and len(list(final.glob("model-*-of-*.safetensors"))) > 1
    auto.from_pretrained(final)  # loads with plain from_pretrained


def test_a_best_snapshot_restores_exactly_what_it_took() -> None:
    from orchestrator.train.best_snapshot import BestSnapshot

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    model[0].bias.requires_grad_(False)  # frozen: never copied, never written back
    snapshot = BestSnapshot(model, rank=0, world_size=1)
    taken = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot.take(step=3, metrics={"step": 3, "sst2/accuracy": 0.9})
    assert sum(s.numel() for s in snapshot.shares) == 3 * 5 + 5 * 2 + 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snapshot.restore()
    for name, p in model.named_parameters():
        expected = taken[name] + (1.0 if name == "0.bias" else 0.0)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=0)
    assert snapshot.step == 3 and snapshot.metrics["sst2/accuracy"] == 0.9


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.ci)])
def test_best_is_exported_once_after_training_with_the_best_steps_weights(stage, ray_cluster, tiny_models,
                                                                        shared_data, tmp_path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from orchestrator.cluster.launcher import run_training
    from orchestrator.config import config_from_dict
    from orchestrator.tracking import read_metrics

    name = f"best-z{stage}"
    job = tiny_job(name, tiny_models["bert"], shared_data, tmp_path, stage=stage, max_steps=4, eval_every_steps=1,
                   checkpoint_every_steps=1, lr=1e-3)
    # The best eval is the one with the *largest* loss: the first one, so best/ must hold the step-1 weights.
    job["training"].update(metric="sst2/loss", metric_mode="max")
    job["output"].update(keep_checkpoints=1, keep_checkpoints_by="best")
    job["deepspeed"]["overrides"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    exports = [(r["export/name"], r["step"]) for r in records if r["kind"] == "export"]
    assert exports == [("final", 4), ("best", 4)]  # nothing exported at the improvements themselves
    best_step = result.metrics["best_step"]
    kept = [c for c in (tmp_path / name / "ray" / name).glob("checkpoint_*") if c.is_dir()
            and json.loads((c / "train_state.json").read_text())["step"] == best_step]
    assert len(kept) == 1
    trained = get_fp32_state_dict_from_zero_checkpoint(str(kept[0]), tag="ds")
    exported = load_file(result.best_model / "model.safetensors")
    assert set(exported) <= set(trained)
    for key, value in exported.items():
        torch.testing.assert_close(value, trained[key].to(value.dtype), rtol=0, atol=0)
    assert json.loads((result.best_model / "orchestrator_metrics.json").read_text())["metrics"]["step"] == best_step
