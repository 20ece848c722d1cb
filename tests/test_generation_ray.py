"""Scoring by generation on a real run: 2 workers under ZeRO-3 (every forward pass collective) generate their shares
of an eval set in step, and the exact match reported is the share of all rows answered right, each row once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.cluster.launcher import run_training
from orchestrator.config import DataConfig, DataSource, config_from_dict
from orchestrator.tracking import read_metrics
from tests.conftest import tiny_job

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = 31  # odd: worker 1 of 2 gets a padding row (row 0 again, weight 0)


def _questions(shared_data: Path) -> list[str]:
    lines = (shared_data / "agnews" / "test.tsv").read_text(encoding="utf-8").splitlines()[:ROWS]
    return [f"Topic? {' '.join(line.split(chr(9))[0].split()[:12])}" for line in lines]


def _answers(model: Path, questions: list[str]) -> list[str]:
    """The tiny model's own greedy answers to the questions, computed here in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.data.encoding import make_encoder
    from orchestrator.models.predict import greedy_generate

    tokenizer = AutoTokenizer.from_pretrained(model)
    source = DataSource(path="eval.jsonl", messages_column="messages")
    encoder = make_encoder(source, DataConfig(train=source, chat_template=CHATML), tokenizer, task="causal-lm")
    prompts = [encoder.prompt({"messages": _chat(q, "x")}) for q in questions]
    llm = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        return greedy_generate(llm, tokenizer, prompts, max_new_tokens=4, device=torch.device("cpu"), synced_gpus=False)


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _write(path: Path, rows: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.ci  # the one end-to-end check that generation under ZeRO-3 keeps the ranks in step (about 60 s)
def test_zero3_workers_generate_in_step_and_each_row_counts_once(
    ray_cluster: Any, tiny_models: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    from orchestrator.models.predict import generate

    questions = _questions(shared_data)
    answers = _answers(tiny_models["llama"], questions)
    # Every third row (row 0 among them, which the padding row repeats) has the model's own answer as reference.
    hit = [i % 3 == 0 and bool(a.strip()) for i, a in enumerate(answers)]
    rows = [_chat(q, a if h else "no such topic") for q, a, h in zip(questions, answers, hit)]
    job = tiny_job(
        "gen-zero3",
        tiny_models["llama"],
        shared_data,
        tmp_path / "runs",
        task="causal-lm",
        stage=3,
        max_steps=2,
        eval_every_steps=2,
        checkpoint_every_steps=2,
        batch_size_per_worker=4,
        eval_batch_size=4,
        lr=1e-9,
    )  # lr ~0: the trained model still answers as computed above
    job["data"] = {
        "train": {"path": str(_write(tmp_path / "train.jsonl", rows * 2)), "messages_column": "messages"},
        "eval": [
            {
                "name": "chat",
                "path": str(_write(tmp_path / "eval.jsonl", rows)),
                "messages_column": "messages",
                "generate": True,
                "max_new_tokens": 4,
            }
        ],
        "chat_template": CHATML,
        "max_length": 64,
    }

    result = run_training(config_from_dict(job))

    records = read_metrics(result.run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    assert sum(hit) >= 3 and evals[-1]["chat/exact_match"] == pytest.approx(sum(hit) / ROWS)
    # Before the first step the model it starts from was scored the same way, in step on both ranks too.
    (start,) = [r for r in records if r["kind"] == "start_eval"]
    assert start["step"] == 0 and start["reference"] == "model" and start["fresh_head"] is None
    assert start["chat/exact_match"] == pytest.approx(sum(hit) / ROWS) and start["chat/loss"] > 0
    assert result.start_vs_end["delta"]["chat"]["exact_match"] == pytest.approx(0.0)
    assert evals[-1]["chat/loss"] > 0 and evals[-1]["chat/perplexity"] > 1  # loss and perplexity beside it
    # The export carries the chat template: predict reads an input as the user turn and answers as in the eval.
    assert generate(result.final_model, questions[:3], max_new_tokens=4) == [a.strip() for a in answers[:3]]
