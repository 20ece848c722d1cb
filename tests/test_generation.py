"""Scoring by generation (``data.eval[].generate``): the normaliser, the exact-match count with the padding rows of
``eval_batch_indices``, left padding, and the config rules (eval sets of causal-LM jobs only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.models.predict import greedy_generate, left_padded
from orchestrator.train.generation import GenerationSet, exact_match_totals, generation_metrics, normalise_answer


def test_the_normaliser_ignores_case_and_whitespace_only() -> None:
    assert normalise_answer("  Sci/Tech \n") == normalise_answer("sci / tech") == "sci/tech"
    assert normalise_answer(" World") == normalise_answer("WORLD\t")
    assert normalise_answer("Sports") != normalise_answer("Sport")
    assert normalise_answer("Sci/Tech") != normalise_answer("Sci-Tech")


def test_exact_match_counts_hits_by_weight_and_padding_rows_count_for_nothing() -> None:
    hits, weight = exact_match_totals(
        ["world", " Sports ", "business", "world"], ["World", "sports", "Sci/Tech", "x"], [1.0, 1.0, 1.0, 0.0]
    )

    assert (hits, weight) == (2.0, 3.0)


def test_prompts_are_padded_on_the_left() -> None:
    input_ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)

    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class _Rows:
    """A reader of prompt/completion rows (RowReader's interface)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def close(self) -> None:
        pass


class _Encoder:
    """The encoder's prompt/reference: the prompt's tokens, the completion as text."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def prompt(self, row: dict[str, Any], where: Any = None) -> list[int]:
        return self.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]

    def reference(self, row: dict[str, Any]) -> str:
        return row["completion"]


class _Copier(torch.nn.Module):
    """A scripted model whose answer is its prompt again, then EOS: rows whose prompt is their reference hit."""

    def __init__(self, eos_id: int):
        super().__init__()
        self.config = type("Config", (), {"eos_token_id": eos_id})()
        self.calls: list[bool] = []

    def generate(self, *, input_ids, attention_mask, generation_config, synced_gpus):  # noqa: ANN001, ANN201
        self.calls.append(synced_gpus)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].tolist()
            rows.append(prompt + [self.config.eos_token_id] * (input_ids.size(1) - len(prompt) + 1))
        answers = torch.tensor(rows)[:, : input_ids.size(1)]
        return torch.cat([input_ids, answers, torch.full((len(rows), 1), self.config.eos_token_id)], dim=1)


ROWS = [
    {"prompt": "World", "completion": "world"},
    {"prompt": "Sports", "completion": "Business"},
    {"prompt": "Sci/Tech", "completion": " sci/tech "},
    {"prompt": "Business", "completion": "business"},
    {"prompt": "World", "completion": "Sports"},
]


def _score(tokenizer: Any, *, rank: int, world_size: int, zero_stage: int = 0) -> tuple[dict[str, float], _Copier]:
    model = _Copier(tokenizer.sep_token_id)
    generation_set = GenerationSet("agnews", _Rows(ROWS), _Encoder(tokenizer), max_new_tokens=8)
    metrics = generation_metrics(
        model,
        generation_set,
        tokenizer,
        batch_size=2,
        rank=rank,
        world_size=world_size,
        device=torch.device("cpu"),
        zero_stage=zero_stage,
    )
    return metrics, model


@pytest.fixture
def tokenizer(minilm_tokenizer: Any) -> Any:
    return minilm_tokenizer


def test_exact_match_is_the_share_of_rows_a_copying_model_gets_right(tokenizer: Any) -> None:
    metrics, model = _score(tokenizer, rank=0, world_size=1)

    assert metrics["exact_match"] == pytest.approx(3 / 5)  # rows 0, 2 and 3 copy to their reference
    assert model.calls == [False, False, False]  # 5 rows in batches of 2; one process: nothing to keep in step


def test_a_workers_share_weighs_its_padding_row_zero(tokenizer: Any) -> None:
    # Worker 1 of 2 gets rows 1 and 3, and row 0 again as padding (the same number of batches as worker 0).
    metrics, model = _score(tokenizer, rank=1, world_size=2, zero_stage=3)

    assert metrics["exact_match"] == pytest.approx(1 / 2)  # row 3 hits, row 1 misses; the padding row 0 would hit
    assert model.calls == [True, True]  # ZeRO-3 over 2 workers: every generate keeps the ranks in step


def test_greedy_generation_of_a_left_padded_batch_matches_each_prompt_alone(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    short = tokenizer("a film", add_special_tokens=False)["input_ids"]
    long = tokenizer("the longest of the two prompts here", add_special_tokens=False)["input_ids"]
    kwargs = {"max_new_tokens": 6, "device": torch.device("cpu"), "synced_gpus": False}

    with torch.no_grad():
        alone = greedy_generate(model, tokenizer, [short], **kwargs)
        batched = greedy_generate(model, tokenizer, [long, short], **kwargs)

    assert batched[1] == alone[0] and alone[0].strip()


def _job(task: str, eval_set: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    eval_set = {"path": "e.jsonl", "messages_column": "messages", "generate": True} if eval_set is None else eval_set
    return {
        "name": "demo",
        "model": {"path": "minilm", "task": task},
        "data": {"train": {"path": "t.jsonl", **train}, "eval": [eval_set]},
    }


def test_generate_is_for_eval_sets_of_causal_lm_jobs_with_reference_answers() -> None:
    config = config_from_dict(_job("causal-lm"))
    assert config.data.eval[0].generate and config.data.eval[0].max_new_tokens == 32

    with pytest.raises(ConfigError) as caught:
        config_from_dict(_job("sequence-classification"))
    assert "data.eval[0].generate: scoring by generation needs model.task: causal-lm" in str(caught.value)

    with pytest.raises(ConfigError, match="data.train.generate: only eval sets are scored by generation"):
        config_from_dict(_job("causal-lm", generate=True))

    with pytest.raises(ConfigError, match=r"needs a reference answer per row; set data.eval\[0\].messages_column"):
        config_from_dict(_job("causal-lm", {"path": "e.tsv", "text_column": "sentence", "generate": True}))
