"""``data.max_length`` beyond the positions a model embeds is refused in preflight, with both numbers and the fix,
for encoders and causal LMs (and a distillation teacher); models without such a limit pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cluster.preflight import preflight
from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from tests.conftest import tiny_job


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        ({"model_type": "bert", "max_position_embeddings": 512, "pad_token_id": 0}, 512),
        ({"model_type": "gpt2", "n_positions": 1024, "n_ctx": 1024}, 1024),
        ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),  # 2 rows before pos. 0
        ({"model_type": "llama", "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default"}}, 4096),
        ({"model_type": "llava", "text_config": {"model_type": "llama", "max_position_embeddings": 2048}}, 2048),
        ({"model_type": "t5", "d_model": 512}, None),  # relative positions: no table to run past
        ({"model_type": "llama", "max_position_embeddings": 2048, "rope_scaling": {"type": "dynamic"}}, None),
        ({}, None),  # no config at hand (a hub id not downloaded yet)
    ],
    ids=["bert", "gpt2", "roberta", "llama", "nested-text-config", "t5", "dynamic-rope", "no-config"],
)
def test_position_limit_of_each_kind_of_model(config: dict[str, Any], limit: int | None) -> None:
    from orchestrator.cluster.preflight import position_limit

    found = position_limit(config)
    assert (found[0] if found else None) == limit


def _job(model: Path, data: Path, out: Path, max_length: int, **kwargs: Any) -> dict[str, Any]:
    job = tiny_job("max-length", model, data, out, **kwargs)
    job["data"]["max_length"] = max_length
    return job


def _refusal(job: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        preflight(config_from_dict(job))
    return str(caught.value)


def test_minilm_with_100000_tokens_is_refused_with_both_numbers_and_the_fix(shared_data: Path, tmp_path: Path) -> None:
    from orchestrator.models.loading import resolve_model_path

    minilm = Path(resolve_model_path("minilm"))
    message = _refusal(_job(minilm, shared_data, tmp_path, 100000))

    assert "data.max_length: 100000 tokens per row, but the model of model.path" in message
    assert "has positions for 512 (max_position_embeddings in its config.json)" in message
    assert "fix: set data.max_length to 512 or less" in message
    assert preflight(config_from_dict(_job(minilm, shared_data, tmp_path, 512))).model_path == str(minilm)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_causal_lm_is_held_to_its_positions_too(
    arch: str, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    key = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    job = _job(tiny_models[arch], shared_data, tmp_path, 257, task="causal-lm")
    job["data"]["packing"] = True  # the block size is max_length: the same limit

    message = _refusal(job)

    assert "257 tokens per row" in message and f"has positions for 256 ({key} in its config.json)" in message
    job["data"]["max_length"] = 256
    preflight(config_from_dict(job))


def test_a_model_without_a_position_limit_passes(
    tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    model = tmp_path / "no-limit"
    shutil.copytree(tiny_models["llama"], model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}  # made to extend
    (model / "config.json").write_text(json.dumps(config))

    preflight(config_from_dict(_job(model, shared_data, tmp_path, 4096, task="causal-lm")))


def test_a_distillation_teacher_is_held_to_its_positions(
    tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    job = _job(tiny_models["bert"], shared_data, tmp_path, 300)
    job["method"] = "distill"
    job["distill"] = {"teacher": str(tiny_models["bert"]), "student_init": "teacher_layers"}

    message = _refusal(job)

    assert "the model of distill.teacher" in message and "model of model.path" not in message  # one issue, not two
    assert "has positions for 256" in message
