"""End-to-end training on a local Ray cluster: 2 CPU workers, real DeepSpeed engines (gloo), tiny models
with random weights, real SST-2 rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from orchestrator.cluster.launcher import run_training
from orchestrator.config import config_from_dict
from orchestrator.data.readers import RowReader
from orchestrator.data.sources import prepare_data
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job
from tests.support.faults import FailAfterCheckpoint
from tests.support.wandb_offline import find_offline_runs

pytestmark = pytest.mark.slow


def _plain_accuracy(model_dir: Path, config) -> float:
    """Accuracy of an exported folder on the job's first eval set, computed without the orchestrator loop."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    data = prepare_data(config.data, config.model.task)
    reader = RowReader(data.evals[0])
    rows = [reader.get(i) for i in range(len(data.evals[0]))]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            batch = tokenizer(
                [r["text"] for r in chunk],
                truncation=True,
                max_length=config.data.max_length,
                padding=True,
                return_tensors="pt",
            )
            predictions = model(**batch).logits.argmax(-1)
            correct += sum(int(p == r["label"]) for p, r in zip(predictions.tolist(), chunk))
    return correct / len(rows)


@pytest.mark.parametrize("stage", [0, 2])
def test_encoder_fine_tune_under_zero_stage(stage, ray_cluster, tiny_models, shared_data, tmp_path):
    config = config_from_dict(tiny_job(f"enc-z{stage}", tiny_models["bert"], shared_data, tmp_path, stage=stage))
    result = run_training(config)

    assert result.metrics["step"] == 6
    assert 0.0 <= result.metrics["sst2/accuracy"] <= 1.0
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    losses = [r["train/loss"] for r in records if r["kind"] == "train"]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)  # `loss == loss` let inf through
    # The exported folder is a plain HF model with the label map saved.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(result.final_model)
    assert model.config.id2label == {0: "0", 1: "1"}
    assert (result.final_model / "orchestrator_job.yaml").is_file()


@pytest.mark.ci
def test_zero3_export_matches_in_training_eval_and_wandb_has_config_and_metrics(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    job = tiny_job("enc-z3", tiny_models["bert"], shared_data, tmp_path, stage=3)
    job["data"]["label_names"] = ["negative", "positive"]
    config = config_from_dict(job)
    result = run_training(config)

    # ZeRO-3 shards every parameter; the export gathers them. Same accuracy outside the loop.
    assert result.final_model is not None
    reported = result.metrics["sst2/accuracy"]
    assert _plain_accuracy(result.final_model, config) == pytest.approx(reported, abs=1e-3)
    saved = json.loads((result.final_model / "orchestrator_metrics.json").read_text())
    assert saved["label_names"] == ["negative", "positive"]

    # One W&B offline run, with the validated config and every eval metric.
    runs = find_offline_runs(result.run_dir)
    assert len(runs) == 1
    run = runs[0]
    assert run.config["deepspeed"]["stage"] == 3
    assert run.config["training"]["max_steps"] == 6
    eval_steps = [h["_step"] for h in run.history if "sst2/accuracy" in h]
    assert eval_steps == [3, 6]
    assert run.summary["sst2/accuracy"] == pytest.approx(reported)


@pytest.mark.ci
@pytest.mark.parametrize(("arch", "stage"), [("gpt2", 2), ("llama", 3)])
def test_causal_lm_trains_and_reports_perplexity(arch, stage, ray_cluster, tiny_models, shared_data, tmp_path):
    job = tiny_job(f"lm-{arch}", tiny_models[arch], shared_data, tmp_path, task="causal-lm", stage=stage, lr=3e-3)
    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["sst2/perplexity"] < evals[0]["sst2/perplexity"] * 1.05
    assert evals[-1]["sst2/loss"] < 11.0  # ln(30522) = 10.3 is chance level for this vocabulary
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.final_model)
    assert model.config.num_hidden_layers == 2


@pytest.mark.ci
def test_packed_causal_lm_trains_on_blocks_of_whole_documents_and_counts_real_tokens(
    ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch
):
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))  # the workers inherit it (local cluster)
    job = tiny_job("lm-packed", tiny_models["llama"], shared_data, tmp_path, task="causal-lm", stage=2, lr=3e-3)
    job["data"].update(packing=True, max_length=32)
    job["data"]["train"]["limit"] = 1200  # SST-2 sentences are short: ~14 tokens each, ~500 blocks of 32
    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    train = [r for r in records if r["kind"] == "train"]
    # An example is a block of whole documents (none cut at a block's end, so a block may have room left): the
    # tokens counted are the real ones, at most max_length per block, and nearly that (best-fit packing).
    for record in train:
        fill = record["train/tokens_per_s"] / (record["train/samples_per_s"] * 32)
        assert 0.85 < fill <= 1 + 1e-6
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["sst2/loss"] < evals[0]["sst2/loss"]
    # The token cache of each file, built once per node (local rank 0) and memory-mapped by the other rank.
    assert len(list((tmp_path / "cache" / "tokens").glob("train-*/meta.json"))) == 1


# Not in CI: the SIGKILL restart and the resume-on-one-worker tests (tests/test_faults_ray.py, both `ci`) cover resume.
def test_resume_continues_from_the_latest_checkpoint(ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch):
    job = tiny_job("resume", tiny_models["bert"], shared_data, tmp_path, stage=2, checkpoint_every_steps=2)
    config = config_from_dict(job)

    with pytest.raises(Exception, match="injected fault"):
        run_training(config, worker_callbacks=[FailAfterCheckpoint(step=4)])
    first = read_metrics(tmp_path / "resume")
    assert max(r["step"] for r in first if r["kind"] == "train") == 4

    # Without --resume the existing run is protected.
    with pytest.raises(Exception, match="already has checkpoints"):
        run_training(config)

    result = run_training(config, resume=True)
    records = read_metrics(tmp_path / "resume")
    starts = [r for r in records if r["kind"] == "start"]
    assert starts[-1]["resumed_from_step"] == 4
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # continued at step 5, not from step 0
    assert result.metrics["step"] == 6
    # The start was scored once, by the first attempt (a new head: no score, and why); the resumed run's end is
    # compared with it from its checkpointed state.
    (start,) = [r for r in records if r["kind"] == "start_eval"]
    assert "no classification head" in start["fresh_head"] and "sst2/accuracy" not in start
    assert result.start_vs_end["reference"]["fresh_head"] == start["fresh_head"]
    assert result.start_vs_end["end"]["sst2"]["accuracy"] == result.metrics["sst2/accuracy"]
    assert result.start_vs_end["delta"] == {} and result.start_vs_end["params"]["start"] > 0


def test_worker_failure_restarts_from_checkpoint(ray_cluster, tiny_models, shared_data, tmp_path, monkeypatch):
    job = tiny_job("failover", tiny_models["bert"], shared_data, tmp_path, stage=0, checkpoint_every_steps=2)
    job["scaling"]["max_failures"] = 1
    result = run_training(config_from_dict(job), worker_callbacks=[FailAfterCheckpoint(step=2)])

    starts = [r for r in read_metrics(result.run_dir) if r["kind"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 2]
    assert result.metrics["step"] == 6
