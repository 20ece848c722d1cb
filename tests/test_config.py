"""Spec of the job config: what a valid file looks like and how every kind of mistake is reported."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import JobConfig, config_from_dict, json_schema, load_config, parse_override
from orchestrator.errors import ConfigError, ConfigIssue

MINIMAL_YAML = """\
name: demo
model:
  path: minilm
data:
  train:
    path: data/train.tsv
"""


def write_yaml(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def minimal_dict(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "demo", "model": {"path": "minilm"}, "data": {"train": {"path": "train.tsv"}}}
    data.update(sections)
    return data


def issue_at(error: ConfigError, location: str) -> ConfigIssue:
    matches = [issue for issue in error.issues if issue.location == location]
    assert matches, f"no issue at {location!r}; issues: {error.issues}"
    return matches[0]


# --------------------------------------------------------------------------------------------------
# A valid file
# --------------------------------------------------------------------------------------------------


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, MINIMAL_YAML))

    assert isinstance(config, JobConfig)
    assert config.name == "demo"
    assert config.model.path == "minilm"
    assert config.model.task == "sequence-classification"
    assert config.data.train.path == "data/train.tsv"
    assert config.data.train.text_column == "text"
    assert config.data.train.label_column == "label"
    assert config.data.eval == []
    assert config.data.on_bad_rows == "error"
    assert config.method == "full"
    assert config.training.lr == 5e-5
    assert config.training.batch_size_per_worker == 16
    assert config.training.lr_schedule == "linear"
    assert config.deepspeed.stage == 0
    assert config.deepspeed.precision == "auto"
    assert config.scaling.num_workers == 2
    assert config.output.dir == "runs"
    assert config.run_dir == Path("runs") / "demo"


def test_to_dict_round_trips_through_validation() -> None:
    config = config_from_dict(minimal_dict(training={"lr": 1e-3}))

    assert config_from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------------------------------
# Every mistake reported at once, with path, line and hint
# --------------------------------------------------------------------------------------------------

FIVE_MISTAKES_YAML = """\
name: demo
model:
  task: sequence-classification
data:
  train:
    path: train.tsv
trainig:
  epochs: 2
training:
  lr: fast
  batch_size_per_worker: 0
deepspeed:
  stage: 4
"""


def test_all_mistakes_are_reported_in_one_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, FIVE_MISTAKES_YAML)

    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value

    assert error.source == str(path)
    assert sorted(i.location for i in error.issues) == sorted(
        ["trainig", "training.lr", "deepspeed.stage", "training.batch_size_per_worker", "model.path"]
    )
    assert all(issue.hint for issue in error.issues), error.issues
    assert str(error).startswith(f"5 problems in {path}:")


def test_typo_in_a_section_name_suggests_the_right_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path, FIVE_MISTAKES_YAML))

    issue = issue_at(caught.value, "trainig")
    assert issue.line == 7
    assert "unknown key 'trainig'" in issue.message
    assert "did you mean 'training'" in issue.hint


def test_wrong_type_names_the_value_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path, FIVE_MISTAKES_YAML))

    issue = issue_at(caught.value, "training.lr")
    assert issue.line == 10
    assert "'fast'" in issue.message
    assert "learning rate" in issue.hint.lower()


def test_out_of_range_values_say_what_is_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path, FIVE_MISTAKES_YAML))

    stage = issue_at(caught.value, "deepspeed.stage")
    assert stage.line == 13
    assert "0, 1, 2 or 3" in stage.message
    assert "got 4" in stage.message
    assert "ZeRO stage" in stage.hint

    batch = issue_at(caught.value, "training.batch_size_per_worker")
    assert batch.line == 11
    assert "greater than 0" in batch.message
    assert batch.hint


def test_missing_required_field_points_at_its_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_yaml(tmp_path, FIVE_MISTAKES_YAML))

    issue = issue_at(caught.value, "model.path")
    assert issue.line == 2  # the `model:` line: the key itself is absent
    assert issue.message == "required field is missing"
    assert issue.hint.startswith("add it:")
    assert "minilm" in issue.hint


def test_formatted_error_shows_file_line_and_fix(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, FIVE_MISTAKES_YAML)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    text = str(caught.value)
    assert f"{path}:13: deepspeed.stage:" in text
    assert "fix: did you mean 'training'?" in text


def test_typo_in_a_nested_key_lists_the_allowed_keys_of_that_section() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(data={"train": {"path": "t.tsv", "pth": "x"}}))

    issue = issue_at(caught.value, "data.train.pth")
    assert "did you mean 'path'" in issue.hint
    assert "text_column" in issue.hint


def test_mistakes_inside_list_items_use_the_index_in_the_path(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """\
        name: demo
        model: {path: minilm}
        data:
          train: {path: train.tsv}
          eval:
            - path: dev.tsv
            - pth: test.tsv
        """,
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert issue_at(caught.value, "data.eval.1.pth").line == 7
    assert issue_at(caught.value, "data.eval.1.path").message == "required field is missing"


# --------------------------------------------------------------------------------------------------
# --set overrides and ${ENV} interpolation
# --------------------------------------------------------------------------------------------------


def test_set_override_replaces_a_value_read_as_yaml(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, MINIMAL_YAML), ["training.lr=1e-4", "data.shuffle=false"])

    assert config.training.lr == pytest.approx(1e-4)
    assert isinstance(config.training.lr, float)
    assert config.data.shuffle is False


def test_set_override_addresses_list_items_by_index(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, MINIMAL_YAML + "  eval:\n    - path: dev.tsv\n")

    config = load_config(path, ["data.eval.0.path=other/dev.tsv"])

    assert config.data.eval[0].path == "other/dev.tsv"


def test_set_override_with_an_index_past_the_end_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(
            minimal_dict(data={"train": {"path": "t.tsv"}, "eval": [{"path": "dev.tsv"}]}), ["data.eval.3.path=x.tsv"]
        )

    issue = caught.value.issues[0]
    assert issue.location == "data.eval.3"
    assert "not an index of this list of 1 items" in issue.message


def test_set_override_without_equals_sign_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(), ["training.lr"])

    issue = caught.value.issues[0]
    assert issue.location == "training.lr"
    assert "key.path=value" in issue.message


def test_parse_override_reads_values_as_yaml() -> None:
    assert parse_override("training.seed=7") == ("training.seed", 7)
    assert parse_override("scaling.use_gpu=true") == ("scaling.use_gpu", True)
    assert parse_override("tracking.wandb.tags=[a, b]") == ("tracking.wandb.tags", ["a", "b"])
    assert parse_override("output.dir=a=b") == ("output.dir", "a=b")


def test_overridden_values_are_validated_too() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(), ["deepspeed.stage=5"])

    assert issue_at(caught.value, "deepspeed.stage")


def test_env_variables_are_interpolated_with_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORCH_TEST_DATA", "/data/sst2")
    monkeypatch.delenv("ORCH_TEST_UNSET", raising=False)
    path = write_yaml(
        tmp_path,
        """\
        name: demo
        model: {path: minilm}
        data:
          train: {path: "${ORCH_TEST_DATA}/train.tsv"}
        output:
          dir: ${ORCH_TEST_UNSET:-runs/default}
        """,
    )

    config = load_config(path)

    assert config.data.train.path == "/data/sst2/train.tsv"
    assert config.output.dir == "runs/default"


def test_missing_env_variable_without_default_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_TEST_UNSET", raising=False)

    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(output={"dir": "${ORCH_TEST_UNSET}/runs"}))

    issue = caught.value.issues[0]
    assert "ORCH_TEST_UNSET" in issue.message
    assert "${VAR:-default}" in issue.hint


# --------------------------------------------------------------------------------------------------
# Cross-field rules and registered names
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_params_needs_stage_3(stage: int) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(deepspeed={"stage": stage, "offload_params": True}))

    issue = issue_at(caught.value, "deepspeed")
    assert "offload_params needs stage: 3" in issue.message


def test_offload_params_with_stage_3_is_valid() -> None:
    config = config_from_dict(minimal_dict(deepspeed={"stage": 3, "offload_params": True}))

    assert config.deepspeed.offload_params


def test_offload_optimizer_needs_a_zero_stage() -> None:
    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO stage"):
        config_from_dict(minimal_dict(deepspeed={"stage": 0, "offload_optimizer": True}))


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(minimal_dict(method="no-such-method"))

    issue = issue_at(caught.value, "method")
    assert "unknown method 'no-such-method'" in issue.message
    assert "full" in issue.message


def test_duplicate_label_names_are_an_error() -> None:
    with pytest.raises(ConfigError, match="duplicates"):
        config_from_dict(minimal_dict(data={"train": {"path": "t.tsv"}, "label_names": ["a", "b", "a"]}))


# --------------------------------------------------------------------------------------------------
# Schema and YAML syntax
# --------------------------------------------------------------------------------------------------


def test_json_schema_describes_every_field() -> None:
    schema = json_schema()
    definitions = {"JobConfig": schema, **schema.get("$defs", {})}

    undescribed = [
        f"{model}.{name}"
        for model, definition in definitions.items()
        for name, prop in definition.get("properties", {}).items()
        if not str(prop.get("description", "")).strip()
    ]

    assert len(definitions) > 5  # nested sections are reached, not only the top level
    assert undescribed == []


def test_invalid_yaml_syntax_reports_the_line(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        """\
        name: demo
        model:
          path: minilm
           task: causal-lm
        data:
          train: {path: train.tsv}
        """,
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    issue = caught.value.issues[0]
    assert issue.location == "(yaml)"
    assert "not valid YAML" in issue.message
    assert issue.line == 4
    assert f"{path}:4:" in str(caught.value)


def test_a_yaml_list_at_top_level_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_secret_like_environment_variables_are_never_interpolated(monkeypatch, tmp_path):
    """A config is saved with the model, checkpoints, registry and W&B: ${WANDB_API_KEY} and the like are refused."""
    from orchestrator.config import config_from_dict
    from orchestrator.errors import ConfigError

    monkeypatch.setenv("WANDB_API_KEY", "planted-secret-value")
    monkeypatch.setenv("MY_DB_PASSWORD", "planted-secret-value")
    job = {"name": "x", "model": {"path": "minilm"}, "data": {"train": {"path": "${MY_DB_PASSWORD}/t.tsv"}},
           "tracking": {"wandb": {"project": "p-${WANDB_API_KEY}"}}, "output": {"dir": str(tmp_path)}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(job)
    text = str(caught.value)
    assert "${WANDB_API_KEY} looks like a secret" in text and "${MY_DB_PASSWORD} looks like a secret" in text
    assert "planted-secret-value" not in text
