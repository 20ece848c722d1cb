"""Continual retraining without a cluster: new-data detection by hash, reproducible holdout and replay,
forgetting and the promotion gate, whole rounds with a fake trainer, the retrain file, the scheduler with
a fake clock and a fake Jobs API client, and the forgetting report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard

from orchestrator.cluster.results import TrainResult
from orchestrator.config.retrain import load_retrain, retrain_from_dict
from orchestrator.errors import ConfigError, DataError
from orchestrator.lifecycle.forgetting_gate import Gate, compute_forgetting, gate_decision
from orchestrator.lifecycle.label_space import label_groups, task_labels, union_label_names
from orchestrator.lifecycle.new_data import detect_new_data, scan_watch, trained_hashes
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.replay import PoolEntry, sample_replay, split_holdout
from orchestrator.lifecycle.report import write_report
from orchestrator.lifecycle.rounds import RoundBusyError, loaded_from_round, run_round
from orchestrator.lifecycle.scheduler import RetrainScheduler

# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------


def _shard(folder: Path, name: str, rows: int, *, start: int = 0, labels=("0", "1")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lines = ["sentence\tlabel"] + [
        f"sentence number {start + i} is here\t{labels[i % len(labels)]}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_new_data_is_found_by_content_hash_not_by_name(tmp_path):
    watch = tmp_path / "incoming"
    a = _shard(watch, "a.tsv", 10)
    _shard(watch, "b.tsv", 10, start=100)
    (watch / "copy-of-a.tsv").write_bytes(a.read_bytes())  # same content, another name
    (watch / "notes.txt").write_text("ignored by the glob")
    files = scan_watch(str(watch), "*.tsv")
    assert [Path(f.path).name for f in files] == ["a.tsv", "b.tsv", "copy-of-a.tsv"]
    new = detect_new_data(files, seen=set())
    assert [Path(f.path).name for f in new] == ["a.tsv", "b.tsv"]  # a copy counts once
    trained = {files[0].sha256}
    assert [Path(f.path).name for f in detect_new_data(files, trained)] == ["b.tsv"]
    a.write_text(a.read_text() + "one more row\t1\n")  # changed content is new data again
    assert "a.tsv" in [Path(f.path).name for f in detect_new_data(scan_watch(str(watch), "*.tsv"), trained)]


def test_files_still_being_written_are_skipped(tmp_path):
    watch = tmp_path / "w"
    path = _shard(watch, "fresh.tsv", 3)
    assert scan_watch(str(watch), "*.tsv", settle_s=60, now=path.stat().st_mtime + 5) == []
    assert len(scan_watch(str(watch), "*.tsv", settle_s=60, now=path.stat().st_mtime + 61)) == 1
    with pytest.raises(DataError, match="not a folder"):
        scan_watch(str(tmp_path / "missing"), "*.tsv")


def test_trained_hashes_cover_plain_jobs_round_files_and_running_rounds(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    base = {"method": "full", "config": {}, "metrics": {}}
    reg.register("m", artifact="/a", data={"train": {"sha256": "plain"}}, **base)
    reg.register(
        "m", artifact="/b", data={"train": {"sha256": "mix"}, "continual": {"new": [{"sha256": "s1"}]}}, **base
    )
    running = reg.claim_round("m", new_data=[{"sha256": "s2"}], submission_id="j")
    assert trained_hashes(reg.models("m"), reg.rounds("m")) == {"plain", "s1", "s2"}
    reg.update_round(running.id, status="failed")
    assert trained_hashes(reg.models("m"), reg.rounds("m")) == {"plain", "s1"}  # a failed round's data is retried


def test_holdout_split_is_fixed_by_seed_and_content():
    train, held = split_holdout(100, fraction=0.1, seed=0, sha256="ab" * 32)
    again_train, again_held = split_holdout(100, fraction=0.1, seed=0, sha256="ab" * 32)
    assert np.array_equal(held, again_held) and len(held) == 10
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    _, other = split_holdout(100, fraction=0.1, seed=1, sha256="ab" * 32)
    assert not np.array_equal(held, other)
    _, capped = split_holdout(100, fraction=0.5, seed=0, sha256="ab" * 32, max_rows=7)
    assert len(capped) == 7
    _, none = split_holdout(5, fraction=0.0, seed=0, sha256="ab" * 32)
    assert len(none) == 0


def test_replay_sample_is_reproducible_by_seed_and_independent_of_pool_order():
    pool = [PoolEntry({"path": "a"}, "aa", 50), PoolEntry({"path": "b"}, "bb", 30), PoolEntry({"path": "c"}, "cc", 20)]
    first = sample_replay(pool, 25, seed=7, round_no=3)
    same = sample_replay(list(reversed(pool)), 25, seed=7, round_no=3)
    assert first.keys() == same.keys() and all(np.array_equal(first[k], same[k]) for k in first)
    assert sum(len(v) for v in first.values()) == 25
    for sha, rows in first.items():
        size = {e.sha256: e.rows for e in pool}[sha]
        assert len(set(rows.tolist())) == len(rows) and rows.max() < size  # no duplicates, in range
    other_seed = sample_replay(pool, 25, seed=8, round_no=3)
    assert any(not np.array_equal(first.get(k, []), other_seed.get(k, [])) for k in ("aa", "bb", "cc"))
    assert sum(len(v) for v in sample_replay(pool, 1000, seed=0, round_no=1).values()) == 100  # capped
    assert sample_replay(pool, 0, seed=0, round_no=1) == {}


def test_forgetting_is_best_earlier_minus_new_with_the_sign_of_the_mode():
    history = {"old": [0.80, 0.86, 0.84], "older": [0.70]}
    new = {"old": 0.83, "older": 0.75, "fresh": 0.9}
    assert compute_forgetting(history, new, "max") == pytest.approx({"old": 0.03, "older": -0.05})
    assert compute_forgetting({"old": [0.5, 0.4]}, {"old": 0.45}, "min") == pytest.approx({"old": 0.05})


def test_gate_promotes_only_when_every_check_passes_and_says_why():
    gate = Gate(metric="accuracy", mode="max", min_new=0.8, max_forgetting=0.02, floor=0.6)
    ok, reason = gate_decision(gate, {"new": 0.85, "old": 0.79}, {"old": 0.01}, "new")
    assert ok == "promote" and "0.8500 ≥ 0.8" in reason and "max forgetting +0.0100 (old)" in reason

    bad, reason = gate_decision(gate, {"new": 0.85, "old": 0.70}, {"old": 0.1}, "new")
    assert bad == "reject" and "forgetting above 0.02 on old +0.1000" in reason

    bad, reason = gate_decision(gate, {"new": 0.75, "old": 0.5}, {"old": 0.0}, "new")
    assert bad == "reject" and "new 0.7500 not ≥ 0.8" in reason.replace("new data new accuracy", "new")
    assert "below the floor 0.6: old 0.5000" in reason

    loss_gate = Gate(metric="loss", mode="min", min_new=0.5, max_forgetting=0.1)
    assert gate_decision(loss_gate, {"new": 0.4, "old": 0.6}, {"old": 0.05}, "new")[0] == "promote"
    assert gate_decision(loss_gate, {"new": 0.6}, {}, "new")[0] == "reject"
    assert gate_decision(Gate("accuracy", "max"), {}, {}, None) == ("promote", "promoted: no gate checks configured")
    assert gate_decision(gate, {"old": 0.9}, {}, None)[0] == "reject"  # min_new set but no new eval set


# --------------------------------------------------------------------------------------------------
# Retrain file
# --------------------------------------------------------------------------------------------------


def _retrain_dict(tmp_path: Path, model: str = "/models/base", **extra: Any) -> dict[str, Any]:
    _shard(tmp_path / "seed", "eval.tsv", 20, start=5000)
    job = {
        "name": "sent",
        "model": {"path": model},
        "data": {
            "train": {"path": str(tmp_path / "seed" / "eval.tsv"), "text_column": "sentence"},
            "eval": [{"path": str(tmp_path / "seed" / "eval.tsv"), "text_column": "sentence", "name": "fixed"}],
            "label_names": ["negative", "positive"],
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    spec = {
        "job": job,
        "watch": {"dir": str(tmp_path / "incoming"), "settle_s": 0},
        "replay": {"fraction": 0.5, "seed": 3},
        "eval": {"holdout_fraction": 0.2},
        "gate": {"min_new": 0.6, "max_forgetting": 0.05, "floor": 0.5},
    }
    spec.update(extra)
    return spec


def test_retrain_file_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "retrain.yaml"
    path.write_text(
        "job: missing.yaml\n"
        "watch: {dri: x}\n"
        "replay: {fraction: 0.1, count: 5}\n"
        "gate: {max_forgeting: 0.1}\n"
        "schedule: {trigger: cron, cron: 'every day'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_retrain(path)
    text = str(info.value)
    for needle in (
        "watch.dir",
        "unknown key 'dri'",
        "did you mean 'dir'",
        "not both",
        "did you mean 'max_forgetting'",
        "not a valid cron expression",
        f"{path}:2:",
    ):
        assert needle in text, needle


def test_retrain_file_with_a_job_file_and_overrides(tmp_path):
    spec = _retrain_dict(tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec.pop("job")))
    spec["job"] = "job.yaml"  # relative to the retrain file
    spec["overrides"] = {"training.lr": 1e-5}
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = load_retrain(path)
    assert loaded.name == "sent" and loaded.job.training.lr == 1e-5
    resolved = loaded.resolved()
    assert resolved["job"]["training"]["lr"] == 1e-5 and resolved["overrides"] == {}
    assert retrain_from_dict(resolved).job == loaded.job  # what a submitted round runs is the same job

    spec["overrides"] = {"data.train.path": "x"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="set by each round"):
        load_retrain(path)


# --------------------------------------------------------------------------------------------------
# Whole rounds with a fake trainer (queued metrics, no cluster)
# --------------------------------------------------------------------------------------------------


class FakeTrainer:
    """Stands in for run_training: records each round job and returns queued scores per eval set."""

    def __init__(self, scores: list[dict[str, float]]):
        self.scores = list(scores)
        self.jobs: list[Any] = []

    def __call__(self, config, *, address=None, progress=None) -> TrainResult:
        from orchestrator.data.sources import prepare_data

        self.jobs.append(config)
        data = prepare_data(config.data, config.model.task)  # the round's files must be readable
        final = Path(config.output.dir) / config.name / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        queued = self.scores.pop(0)
        metrics = {"step": 3}
        for e in data.evals:
            metrics[f"{e.name}/accuracy"] = queued.get(e.name, queued.get("*", 0.9))
        return TrainResult(final.parent, metrics, None, final, None, None, None, data.summary())


def _base_model(tmp_path: Path) -> Path:
    base = tmp_path / "base-model"
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text("{}")
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    return base


def test_two_rounds_warm_start_replay_evaluate_everything_and_gate(tmp_path):
    loaded = retrain_from_dict(_retrain_dict(tmp_path, model=str(_base_model(tmp_path))))
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    _shard(tmp_path / "incoming", "shard1.tsv", 40)
    trainer = FakeTrainer([{"*": 0.9}, {"fixed": 0.88, "shard1": 0.80, "shard2": 0.9}, {"*": 0.9}])

    first = run_round(loaded, registry=reg, train=trainer)
    assert first.status == "succeeded" and first.decision == "promote", first.reason
    v1 = first.candidate
    assert v1.id == "sent-v1" and reg.champion("sent").id == v1.id
    job1 = trainer.jobs[0]
    assert job1.model.path == str(_base_model(tmp_path)) and job1.output.registry is None
    assert [e.name for e in job1.data.eval] == ["fixed", "shard1"]
    assert job1.data.label_names == ["negative", "positive"]
    assert v1.data["continual"]["new"][0]["sha256"] == first.new_files[0].sha256
    assert v1.data["continual"]["learned"]["rows"] == 32 and v1.data["continual"]["replay"] == []
    assert v1.licence == "apache-2.0" and v1.parent_ref == str(_base_model(tmp_path)) and v1.round == 1
    assert (first.run_dir / "round.yaml").read_text().startswith("# round 1 of sent")

    # Nothing new: the round is skipped and nothing is registered.
    assert run_round(loaded, registry=reg, train=trainer).status == "skipped"
    assert len(reg.models("sent")) == 1

    _shard(tmp_path / "incoming", "shard2.tsv", 30, start=1000)
    second = run_round(loaded, registry=reg, train=trainer)
    job2 = trainer.jobs[1]
    assert job2.model.path == v1.artifact  # warm start from the champion
    assert [e.name for e in job2.data.eval] == ["fixed", "shard1", "shard2"]  # all seen so far + the new one
    replay = second.candidate.data["continual"]["replay"]
    assert replay == [
        {
            "path": v1.data["continual"]["learned"]["source"]["path"],
            "sha256": v1.data["continual"]["learned"]["sha256"],
            "rows": 16,
        }
    ]  # 0.5 x 32 learned rows
    train_rows = (Path(job2.data.train.path)).read_text().splitlines()
    assert len(train_rows) == 24 + 16  # 30 new rows less a 20% holdout, plus the replay sample
    assert second.forgetting == pytest.approx({"fixed": 0.02, "shard1": 0.10})
    assert second.decision == "reject" and "shard1 +0.1000" in second.reason
    v2 = reg.get(second.candidate.id)
    assert (
        v2.status == "rejected" and v2.parent_id == v1.id and v2.metrics["forgetting"]["shard1"] == pytest.approx(0.1)
    )
    assert reg.champion("sent").id == v1.id  # the champion stays
    assert [r.status for r in reg.rounds("sent")] == ["succeeded", "skipped", "succeeded"]
    # The candidate's version folder carries its model card: the round's metrics, new data and registry lineage.
    card = ModelCard.load(Path(v2.artifact) / "README.md")
    shown = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert shown == {(s, m): v for s, values in v2.metrics["eval"].items() for m, v in values.items()}
    assert card.data.license == "apache-2.0" and card.data.base_model == v1.base_model
    assert f"`{v1.base_model}` -> `{v1.id}` -> " in card.text and second.new_files[0].sha256 in card.text

    # The report: every eval set across versions, as CSV, Markdown and PNG.
    files = write_report(reg, "sent", tmp_path / "report")
    assert files.matrix.eval_sets == ["fixed", "shard1", "shard2"]
    assert files.matrix.scores[("shard1", "sent-v2")] == pytest.approx(0.8)
    assert "(-0.1000)" in files.csv.read_text()
    assert files.png is not None and files.png.stat().st_size > 1000


def test_replay_sample_and_holdout_are_the_same_when_a_round_is_replayed(tmp_path):
    def one_run(root: Path) -> tuple[str, str]:
        loaded = retrain_from_dict(_retrain_dict(root, model=str(_base_model(root))))
        reg = Registry(root / "runs" / "registry.sqlite")
        _shard(root / "incoming", "s1.tsv", 40)
        run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
        _shard(root / "incoming", "s2.tsv", 40, start=400)
        second = run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
        data = second.run_dir / "data"
        return (data / "train.jsonl").read_text(), (data / "new_eval.jsonl").read_text()

    assert one_run(tmp_path / "a") == one_run(tmp_path / "b")


def test_new_labels_in_the_first_round_are_refused_with_both_label_sets(tmp_path):
    loaded = retrain_from_dict(_retrain_dict(tmp_path, model=str(_base_model(tmp_path))))
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    _shard(tmp_path / "incoming", "news.tsv", 12, labels=("World", "Sports", "Business"))
    with pytest.raises(DataError) as info:
        run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
    message = str(info.value)
    assert "news.tsv" in message and "['Business', 'Sports', 'World']" in message
    assert "['negative', 'positive']" in message and "no champion" in message  # no head to grow yet
    assert reg.rounds("sent")[-1].status == "failed"  # recorded, and not blocking the next round


def test_l2_to_the_champion_is_switched_on_from_round_two(tmp_path):
    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)), l2_to_champion=0.01)
    loaded = retrain_from_dict(spec)
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    trainer = FakeTrainer([{"*": 0.9}, {"*": 0.9}])
    _shard(tmp_path / "incoming", "a.tsv", 20)
    run_round(loaded, registry=reg, train=trainer)
    _shard(tmp_path / "incoming", "b.tsv", 20, start=50)
    run_round(loaded, registry=reg, train=trainer)
    assert [j.regularization.l2_to_start for j in trainer.jobs] == [0.0, 0.01]  # round 1 has no champion


# --------------------------------------------------------------------------------------------------
# A growing label space: union labels, an expanded head, evaluation per task
# --------------------------------------------------------------------------------------------------


def test_union_labels_keep_old_ids_and_add_new_ones_in_a_stable_order():
    news = ["World", "Sports", "World", "Business", "Sci/Tech"]
    union = union_label_names(["negative", "positive"], news)
    assert union == ["negative", "positive", "Business", "Sci/Tech", "Sports", "World"]
    assert union_label_names(["negative", "positive"], reversed(news)) == union  # row order does not matter
    assert union_label_names(union, ["positive", "World"]) == union  # nothing new: unchanged
    assert union_label_names(["0", "1"], ["10", "2", "1"]) == ["0", "1", "2", "10"]  # numbers numerically

    groups = label_groups([["negative", "positive"], ["negative", "positive"], union, None])
    assert groups == [["negative", "positive"], ["Business", "Sci/Tech", "Sports", "World"]]
    assert task_labels({"positive"}, groups) == ["negative", "positive"]  # one class present: its whole task
    assert task_labels({"World", "Sports"}, groups) == ["Business", "Sci/Tech", "Sports", "World"]
    assert task_labels({"negative", "World"}, groups) is None  # both tasks: every label
    assert task_labels({"positive"}, groups[:1]) is None  # one task: every label, as before
    assert task_labels({"neutral"}, [["negative", "positive"], ["neutral"]]) is None  # a 1-label task: all


def _classifier(tiny_model: Path, labels: list[str], destination: Path) -> Path:
    from orchestrator.models.loading import load_model, load_tokenizer

    model = load_model(str(tiny_model), task="sequence-classification", label_names=labels)
    model.save_pretrained(destination)
    load_tokenizer(str(tiny_model)).save_pretrained(destination)
    return destination


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_grow_classifier_keeps_the_old_labels_and_adds_fresh_rows(arch, tiny_models, tmp_path):
    import torch

    from orchestrator.errors import ModelError
    from orchestrator.models.loading import classifier_output_layer, load_model, load_tokenizer

    old, new = ["negative", "positive"], ["negative", "positive", "Business", "Sci/Tech", "Sports", "World"]
    champion = _classifier(tiny_models[arch], old, tmp_path / "champion")
    tokenizer = load_tokenizer(str(champion))
    batch = dict(tokenizer(["a fine film", "stocks fell on monday"], padding=True, return_tensors="pt"))
    if arch != "bert":
        batch.pop("token_type_ids", None)
    before = load_model(str(champion), task="sequence-classification", label_names=old).eval()
    torch.manual_seed(0)
    grown = load_model(str(champion), task="sequence-classification", label_names=new, grow_head=True).eval()

    _, _, head_before = classifier_output_layer(before)
    _, head_name, head = classifier_output_layer(grown)
    assert (head.out_features, head_before.out_features) == (6, 2)
    assert torch.equal(head.weight[:2], head_before.weight)  # old rows bit for bit
    if head.bias is not None:
        assert torch.equal(head.bias[:2], head_before.bias) and torch.equal(head.bias[2:], torch.zeros(4))
    std = grown.config.initializer_range
    assert 0.2 * std < head.weight[2:].std().item() < 5 * std  # new rows: a fresh head's init, not copies
    kept = {k: v for k, v in before.state_dict().items() if head_name not in k}
    assert all(torch.equal(v, grown.state_dict()[k]) for k, v in kept.items())  # the rest loaded as is
    with torch.no_grad():
        old_logits, new_logits = before(**batch).logits, grown(**batch).logits
    # Same inputs to the head, same rows: equal up to the matmul's rounding for a wider output (~1e-9).
    assert torch.allclose(new_logits[:, :2], old_logits, rtol=0, atol=1e-6)
    assert grown(**batch, labels=torch.tensor([0, 5])).loss.item() > 0  # the head trains on the union

    grown.save_pretrained(tmp_path / "exported")  # what export writes: the union label map
    saved = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert [saved["id2label"][str(i)] for i in range(6)] == new and saved["label2id"]["World"] == 5
    with pytest.raises(ModelError, match=r"trained on labels \['negative', 'positive'\].*do not start"):
        load_model(str(champion), task="sequence-classification", label_names=["positive", "x"], grow_head=True)


class _FixedLogits:
    """Stands in for the DeepSpeed engine in evaluate: returns queued logits for the rows of each batch."""

    def __init__(self, logits):
        self.logits = logits

    def eval(self) -> None: ...

    def train(self) -> None: ...

    def __call__(self, rows, labels):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[rows])


def test_evaluation_is_over_the_eval_sets_own_labels(tmp_path):
    import torch

    from orchestrator.train.evaluation import confusion_metrics, evaluate, restrict_logits

    # 6 labels: negative, positive (SST-2), then four news labels. Truths are SST-2 labels only.
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0, 5.0, 0.0, 0.0],  # truth 0: news label 3 wins overall; negative among {0, 1}
            [0.0, 1.0, 9.0, 0.0, 0.0, 0.0],  # truth 1: right among {0, 1}
            [3.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # truth 1: wrong either way
            [0.0, 2.0, 0.0, 0.0, 0.0, 7.0],  # truth 1: right among {0, 1}
        ]
    )
    truths = [0, 1, 1, 1]
    masked = restrict_logits(logits, [0, 1])
    assert masked.argmax(-1).tolist() == [0, 1, 0, 1] and logits.argmax(-1).tolist() == [3, 2, 0, 5]
    assert torch.equal(restrict_logits(logits, None), logits)

    class Reader:  # the rows are their own indices; the collator passes them on
        scanned = list(range(4))

        def __len__(self):
            return 4

        def get(self, i):
            return i, None, truths[i]

    def collate(rows):
        return {"rows": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[2] for r in rows])}

    common = dict(task="sequence-classification", num_labels=6, batch_size=3, rank=0, world_size=1)
    engine = _FixedLogits(logits)
    sst2 = evaluate(engine, Reader(), collate, **common, device=torch.device("cpu"), label_ids=[0, 1])
    everything = evaluate(engine, Reader(), collate, **common, device=torch.device("cpu"))
    assert sst2["accuracy"] == pytest.approx(0.75) and everything["accuracy"] == 0.0
    # macro-F1 over {negative, positive}: F1 2/3 (P 1/2, R 1) and 4/5 (P 1, R 2/3)
    assert sst2["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    expected_loss = torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor(truths)).item()
    assert sst2["loss"] == pytest.approx(expected_loss)  # the loss of the 2-way task
    confusion = torch.zeros(6, 6)
    confusion[0, 0] = confusion[1, 1] = 2
    assert confusion_metrics(confusion) == {"accuracy": 1.0, "f1_macro": pytest.approx(2 / 6)}  # absent labels
    assert confusion_metrics(confusion, [0, 1]) == {"accuracy": 1.0, "f1_macro": 1.0}


def test_an_eval_set_restricted_to_labels_is_checked_and_recorded(tmp_path):
    from orchestrator.config import DataConfig
    from orchestrator.data.sources import prepare_data

    train = _shard(tmp_path, "train.tsv", 12, labels=("negative", "positive", "World", "Sports"))
    sst = _shard(tmp_path, "sst.tsv", 6, labels=("0", "1"))  # ids of the first two labels
    data = {
        "train": {"path": str(train), "text_column": "sentence"},
        "eval": [{"path": str(sst), "text_column": "sentence", "name": "sst", "labels": ["positive", "negative"]}],
        "label_names": ["negative", "positive", "Sports", "World"],
    }
    prepared = prepare_data(DataConfig.model_validate(data), "sequence-classification")
    assert prepared.evals[0].label_subset == [0, 1]  # in id order
    assert prepared.summary()["eval"][0]["labels"] == ["negative", "positive"]

    data["eval"][0]["labels"] = ["Sports", "World"]
    with pytest.raises(DataError, match=r"6 rows have labels \['negative', 'positive'\] outside"):
        prepare_data(DataConfig.model_validate(data), "sequence-classification")
    data["eval"][0]["labels"] = ["negative", "neutral"]
    with pytest.raises(DataError, match=r"\['neutral'\] are not in the label set"):
        prepare_data(DataConfig.model_validate(data), "sequence-classification")


def test_a_round_with_new_labels_grows_the_head_and_scores_each_eval_set_over_its_labels(tmp_path):
    loaded = retrain_from_dict(_retrain_dict(tmp_path, model=str(_base_model(tmp_path))))
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    trainer = FakeTrainer([{"*": 0.9}, {"*": 0.9}, {"*": 0.9}])
    _shard(tmp_path / "incoming", "sst.tsv", 40)  # ids 0/1 of negative/positive
    first = run_round(loaded, registry=reg, train=trainer)
    assert first.candidate.data["continual"]["labels_added"] == []
    assert trainer.jobs[0].model.grow_head is False and all(e.labels is None for e in trainer.jobs[0].data.eval)

    _shard(tmp_path / "incoming", "news.tsv", 30, start=100, labels=("World", "Sports", "Business", "Sci/Tech"))
    second = run_round(loaded, registry=reg, train=trainer)
    job = trainer.jobs[1]
    union = ["negative", "positive", "Business", "Sci/Tech", "Sports", "World"]
    assert second.status == "succeeded" and job.model.grow_head and job.model.path == first.candidate.artifact
    assert job.data.label_names == union
    news = ["Business", "Sci/Tech", "Sports", "World"]
    assert {e.name: e.labels for e in job.data.eval} == {
        "fixed": ["negative", "positive"],
        "sst": ["negative", "positive"],
        "news": news,
    }
    v2 = second.candidate
    assert v2.data["label_names"] == union and v2.data["continual"]["labels_added"] == news
    assert {e["name"]: e["labels"] for e in v2.data["eval"]} == {e.name: e.labels for e in job.data.eval}
    assert set(second.scores) == {"fixed", "sst", "news"} and set(second.forgetting) == {"fixed", "sst"}
    train_labels = [json.loads(line)["label"] for line in Path(job.data.train.path).read_text().splitlines()]
    assert set(train_labels) == {"negative", "positive", *news}  # replayed SST rows keep their labels
    summary = json.loads((second.run_dir / "round.json").read_text())
    assert summary["labels_added"] == news and summary["label_names"] == union

    # A later round on the same union: no growth, and every eval set keeps its task (a new news shard too).
    _shard(tmp_path / "incoming", "news2.tsv", 30, start=500, labels=("Sports", "World"))
    run_round(loaded, registry=reg, train=trainer)
    job = trainer.jobs[2]
    assert job.model.grow_head is False and job.data.label_names == union
    assert {e.name: e.labels for e in job.data.eval} == {
        "fixed": ["negative", "positive"],
        "sst": ["negative", "positive"],
        "news": news,
        "news2": news,
    }


def test_new_labels_are_refused_where_the_head_cannot_grow(tmp_path):
    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)), new_labels="refuse")
    loaded = retrain_from_dict(spec)
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    _shard(tmp_path / "incoming", "sst.tsv", 20)
    run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
    _shard(tmp_path / "incoming", "news.tsv", 12, labels=("World", "Sports"))
    with pytest.raises(DataError) as info:
        run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
    message = str(info.value)
    assert "news.tsv" in message and "['Sports', 'World']" in message and "['negative', 'positive']" in message
    assert "new_labels: refuse" in message

    (tmp_path / "incoming" / "news.tsv").unlink()
    _shard(tmp_path / "incoming", "ids.tsv", 12, labels=("0", "1", "2"))  # is 2 a new label or a typo?
    with pytest.raises(DataError, match=r"include ids \['2'\] beyond the model's label set \['negative', 'posi"):
        run_round(retrain_from_dict({**spec, "new_labels": "grow"}), registry=reg, train=FakeTrainer([{"*": 0.9}]))


def test_a_second_local_round_of_the_same_model_is_refused_while_one_runs(tmp_path):
    loaded = retrain_from_dict(_retrain_dict(tmp_path, model=str(_base_model(tmp_path))))
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    reg.claim_round("sent", submission_id="somebody-else")
    _shard(tmp_path / "incoming", "a.tsv", 20)
    with pytest.raises(RoundBusyError, match="already running: round 1"):
        run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))


# --------------------------------------------------------------------------------------------------
# Scheduler with a fake clock and a fake Jobs API client
# --------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1_900_000_000.0):
        self.now = start

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeJobClient:
    """Records submissions; job states are set by the test (queued outcomes). It refuses what the real client
    refuses: arguments ``JobSubmissionClient.submit_job`` does not take, and a runtime env Ray would reject."""

    def __init__(self):
        self.submitted: list[dict[str, Any]] = []
        self.states: dict[str, str] = {}

    def submit_job(self, **kwargs: Any) -> str:
        import inspect

        from ray.job_submission import JobSubmissionClient
        from ray.runtime_env import RuntimeEnv

        inspect.signature(JobSubmissionClient.submit_job).bind(self, **kwargs)  # TypeError, as the real one raises
        RuntimeEnv(**(kwargs.get("runtime_env") or {}))  # e.g. env_vars values must be strings
        self.submitted.append(kwargs)
        self.states[kwargs["submission_id"]] = "PENDING"
        return kwargs["submission_id"]

    def get_job_status(self, job_id: str) -> str:
        if job_id not in self.states:
            raise RuntimeError("404 job not found")
        return self.states[job_id]


def _scheduler(tmp_path, client, clock, **schedule):
    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)), schedule={"poll_s": 30, **schedule})
    loaded = retrain_from_dict(spec)
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    work = tmp_path / "work"
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    (work / "jobs" / "retrain.py").write_text("")
    return RetrainScheduler(loaded, registry=reg, client=client, clock=clock, working_dir=work, echo=lambda t: None)


def _finish_round(scheduler, client, *, state="SUCCEEDED", record=True):
    """What the submitted job does: run the round (with a fake trainer), then the job ends."""
    sid = client.submitted[-1]["submission_id"]
    round_id = int(client.submitted[-1]["entrypoint"].split("--round-id ")[1])
    client.states[sid] = "RUNNING"
    if record:
        loaded = loaded_from_round(scheduler.registry, round_id)
        run_round(loaded, round_id=round_id, registry=scheduler.registry, train=FakeTrainer([{"*": 0.9}]))
    client.states[sid] = state


def test_scheduler_never_runs_two_rounds_of_one_model_at_once(tmp_path):
    client, clock = FakeJobClient(), FakeClock()
    scheduler = _scheduler(tmp_path, client, clock)
    assert scheduler.tick().startswith("cannot look for new data: watch.dir")  # not there yet: no crash
    (tmp_path / "incoming").mkdir()
    assert scheduler.tick() == "no new data"
    _shard(tmp_path / "incoming", "s1.tsv", 20)
    assert scheduler.tick().startswith("submitted round 1")
    submission = client.submitted[0]
    assert submission["entrypoint"].startswith(f"python jobs/retrain.py --registry {scheduler.registry.path}")
    assert submission["runtime_env"]["env_vars"]["ORCHESTRATOR_CODE_VERSION"]
    _shard(tmp_path / "incoming", "s2.tsv", 20, start=100)  # more data while round 1 runs
    for _ in range(3):
        clock.sleep(30)
        assert scheduler.tick().startswith("busy: round 1")
    assert len(client.submitted) == 1
    _finish_round(scheduler, client)
    assert scheduler.tick().startswith("submitted round 2")  # s2 only: s1 was trained on
    assert scheduler.registry.get_round(2).new_data[0]["path"].endswith("s2.tsv")


def test_scheduler_restart_carries_on_from_the_registry(tmp_path):
    client, clock = FakeJobClient(), FakeClock()
    first = _scheduler(tmp_path, client, clock)
    _shard(tmp_path / "incoming", "s1.tsv", 20)
    assert first.tick().startswith("submitted round 1")
    del first  # the scheduler process dies; its round goes on as a Ray job

    restarted = _scheduler(tmp_path, client, clock)
    assert restarted.tick().startswith("busy: round 1")  # no double round after the restart
    _finish_round(restarted, client)
    assert restarted.tick() == "no new data"
    rounds = restarted.registry.rounds("sent")
    assert [(r.round, r.status, r.decision) for r in rounds] == [(1, "succeeded", "promote")]
    assert len(client.submitted) == 1


def test_scheduler_marks_rounds_whose_job_died_or_never_started(tmp_path):
    client, clock = FakeJobClient(), FakeClock()
    scheduler = _scheduler(tmp_path, client, clock)
    _shard(tmp_path / "incoming", "s1.tsv", 20)
    scheduler.tick()
    _finish_round(scheduler, client, state="FAILED", record=False)  # the job died before recording anything
    # Round 1 is marked failed; its data is retried, after a back-off (no longer at the very next poll).
    assert scheduler.tick().startswith("backing off: s1.tsv failed 1 of 3 attempts (job retrain-sent-")
    assert scheduler.registry.rounds("sent")[0].status == "failed"
    assert "ended FAILED" in scheduler.registry.rounds("sent")[0].message
    clock.sleep(600)  # schedule.retry_backoff_s
    assert scheduler.tick().startswith("submitted round 2")

    # A claim whose submission never reached the cluster (scheduler killed in between) is abandoned.
    client.states.clear()
    assert scheduler.tick().startswith("submitted round 3")
    assert scheduler.registry.rounds("sent")[1].status == "abandoned"


def _drive(scheduler, client, clock, failing: set[str], ticks: int, start: float) -> list[tuple[float, list[str]]]:
    """Tick every poll_s; each submitted round's job fails if it trains on a file named in ``failing``, else
    runs the round. Returns (seconds since ``start``, file names) of each submission."""
    submitted: list[tuple[float, list[str]]] = []
    for _ in range(ticks):
        before = len(client.submitted)
        scheduler.tick()
        if len(client.submitted) > before:
            round_id = int(client.submitted[-1]["entrypoint"].split("--round-id ")[1])
            files = [Path(f["path"]).name for f in scheduler.registry.get_round(round_id).new_data]
            submitted.append((clock.now - start, files))
            if failing & set(files):
                _finish_round(scheduler, client, state="FAILED", record=False)
            else:
                _finish_round(scheduler, client)
        clock.sleep(scheduler.schedule.poll_s)
    return submitted


def test_a_shard_whose_rounds_keep_failing_backs_off_then_is_quarantined_by_content(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    client, clock = FakeJobClient(), FakeClock()
    start = clock.now
    notes: list[str] = []
    scheduler = _scheduler(tmp_path, client, clock)
    scheduler.echo = notes.append
    bad = _shard(tmp_path / "incoming", "s1.tsv", 20)
    _shard(tmp_path / "incoming", "s2.tsv", 20, start=100)

    # 2 hours of polls every 30 s. Round 1 trains both shards and fails; after the back-off (600 s) the shards
    # are retried one at a time: s1 fails again, s2 succeeds; s1's next try waits twice as long (1200 s), fails
    # a third time (schedule.max_attempts) and is quarantined: no more rounds.
    submitted = _drive(scheduler, client, clock, {"s1.tsv"}, ticks=240, start=start)
    assert submitted == [(0, ["s1.tsv", "s2.tsv"]), (630, ["s1.tsv"]), (660, ["s2.tsv"]), (1860, ["s1.tsv"])]
    reg = scheduler.registry
    assert [(r.round, r.status) for r in reg.rounds("sent")] == [
        (1, "failed"), (2, "failed"), (3, "succeeded"), (4, "failed")
    ]  # fmt: skip
    (shard,) = reg.quarantined("sent")
    assert shard.path.endswith("s1.tsv") and shard.attempts == 3 and "ended FAILED without a result" in shard.reason
    assert any("quarantined" in n and shard.sha256[:12] in n for n in notes)
    assert [e["kind"] for e in reg.events("sent")].count("quarantine") == 1

    (tmp_path / "incoming" / "s1-copy.tsv").write_bytes(bad.read_bytes())  # the same content, another name
    assert scheduler.tick() == "no new data"  # quarantined by content hash

    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()
    listing = runner.invoke(app, ["registry", "list", "--registry", str(reg.path)], catch_exceptions=False).output
    assert "quarantined shards" in listing and shard.sha256[:12] in listing and "ended FAILED" in listing
    shown = runner.invoke(app, ["registry", "show", "sent-v1", "--registry", str(reg.path)]).output
    assert "quarantined" in shown and shard.sha256[:12] in shown
    released = runner.invoke(app, ["registry", "release", shard.sha256[:12], "--registry", str(reg.path)])
    assert released.exit_code == 0 and "released" in released.output and reg.quarantined() == []
    assert scheduler.tick().startswith("submitted round 5 ")  # counted from zero again: no back-off

    # A submission that never reaches the cluster is no attempt of the data: retried at the next poll.
    client.states.clear()  # round 5's job is unknown to the cluster: abandoned
    client.submit_job = lambda **kw: (_ for _ in ()).throw(ConnectionError("cluster unreachable"))
    assert shard.sha256 not in reg.shard_attempts("sent")  # released: its attempts count from zero
    assert "failed: cluster unreachable" in scheduler.tick()
    assert reg.rounds("sent")[-1].status == "abandoned"
    assert shard.sha256 not in reg.shard_attempts("sent")
    assert scheduler.tick().startswith("submission of round 7 failed")  # next poll, no back-off


def test_interval_and_cron_triggers_follow_the_fake_clock_and_survive_restarts(tmp_path):
    client, clock = FakeJobClient(), FakeClock(start=1_900_000_000.0)  # 2030-03-17 17:46:40 UTC
    scheduler = _scheduler(tmp_path / "interval", client, clock, trigger="interval", interval_s=3600)
    _shard(tmp_path / "interval" / "incoming", "s1.tsv", 20)
    assert scheduler.tick().startswith("submitted round 1")  # first round at once
    _finish_round(scheduler, client)
    _shard(tmp_path / "interval" / "incoming", "s2.tsv", 20, start=100)
    clock.sleep(1800)
    assert scheduler.tick() == "not due"
    restarted = _scheduler(tmp_path / "interval", client, clock, trigger="interval", interval_s=3600)
    clock.sleep(1000)
    assert restarted.tick() == "not due"  # the interval counts from the last round in the registry
    clock.sleep(900)
    assert restarted.tick().startswith("submitted round 2")

    cron_client = FakeJobClient()
    cron = _scheduler(tmp_path / "cron", cron_client, clock, trigger="cron", cron="0 3 * * *")
    _shard(tmp_path / "cron" / "incoming", "s1.tsv", 20)
    assert cron.tick() == "not due"
    clock.now = _next_utc_0300(clock.now) + 1
    assert cron.tick().startswith("submitted round 1")


def _next_utc_0300(now: float) -> float:
    from datetime import datetime, timedelta, timezone

    t = datetime.fromtimestamp(now, tz=timezone.utc)
    target = t.replace(hour=3, minute=0, second=0, microsecond=0)
    if target <= t:
        target += timedelta(days=1)
    return target.timestamp()


def test_the_shipped_retrain_config_validates(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(shared_data))
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("WATCH_DIR", str(tmp_path / "incoming"))
    repo = Path(__file__).resolve().parents[1]
    loaded = load_retrain(repo / "configs" / "retrain.yaml")
    assert loaded.config.schedule.trigger in ("new_data", "interval", "cron")
    assert os.path.isabs(loaded.resolved()["watch"]["dir"])
    json.dumps(loaded.resolved())  # stored with each round: plain data


def test_l2_anchor_pulls_trainable_weights_toward_their_start():
    import torch

    from orchestrator.methods.base import TrainBatchOutput
    from orchestrator.train.weight_anchor import WeightAnchor

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)  # frozen parameters are not anchored
    assert WeightAnchor.capture(model, 0.0) is None  # off
    anchor = WeightAnchor.capture(model, 0.5)
    assert len(anchor.params) == 3
    assert anchor.penalty().item() == 0.0
    with torch.no_grad():
        model[1].weight += 2.0
    out = anchor.add_to(TrainBatchOutput(loss=torch.tensor(1.0), logits=torch.zeros(1)))
    assert out.extra["l2_to_start"] == pytest.approx(0.5 * 0.5 * 2 * 4.0)  # w/2 * sum((2)^2) over 2 weights
    out.loss.backward()
    assert torch.allclose(model[1].weight.grad, torch.full_like(model[1].weight, 0.5 * 2.0))  # w * (p - p0)


def test_cluster_cronjob_example_runs_one_scheduler_tick():
    repo = Path(__file__).resolve().parents[1]
    manifest = yaml.safe_load((repo / "cluster" / "retrain-cronjob.yaml").read_text())
    assert manifest["kind"] == "CronJob" and manifest["spec"]["concurrencyPolicy"] == "Forbid"
    container = manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["orchestrator", "schedule", "configs/retrain.yaml", "--once"]
    assert (repo / container["command"][2]).is_file()


def test_registry_and_retrain_commands(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    spec = _retrain_dict(tmp_path, model=str(_base_model(tmp_path)))
    loaded = retrain_from_dict(spec)
    reg = Registry(tmp_path / "runs" / "registry.sqlite")
    _shard(tmp_path / "incoming", "s1.tsv", 20)
    run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.9}]))
    _shard(tmp_path / "incoming", "s2.tsv", 20, start=100)
    run_round(loaded, registry=reg, train=FakeTrainer([{"*": 0.95}]))
    _shard(tmp_path / "incoming", "s3.tsv", 20, start=200)
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("ORCHESTRATOR_REGISTRY", str(reg.path))
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    listing = run("registry", "list")
    assert "sent-v1" in listing and "sent-v2" in listing and "champion" in listing and "apache-2.0" in listing
    shown = run("registry", "show", "sent-v2")
    assert "promote: promoted" in shown and "s2.tsv" in shown and "forgetting fixed" in shown
    assert json.loads(run("registry", "show", "sent-v1", "--json"))["parent_ref"] == str(_base_model(tmp_path))
    tree = run("registry", "lineage", "sent-v1")
    assert "(base model)" in tree and tree.index("sent-v1") < tree.index("sent-v2")
    assert "is the champion of sent again" in run("registry", "rollback")
    assert reg.champion("sent").id == "sent-v1"
    assert "sent-v2 is now the champion" in run("registry", "promote", "sent-v2")
    report = run("registry", "report", "sent", "--out", str(tmp_path / "rep"))
    assert "forgetting.png" in report and (tmp_path / "rep" / "forgetting.csv").is_file()
    dry = run("retrain", str(config), "--dry-run")
    assert "champion sent-v2" in dry and "s3.tsv" in dry and "s1.tsv" not in dry
    missing = runner.invoke(app, ["registry", "show", "sent-v9"])
    assert missing.exit_code == 2 and "no model 'sent-v9'" in missing.output
