"""``orchestrator predict`` on a causal LM generates text (greedy, up to ``--max-new-tokens``; a chat model's template
applied to each input as a user turn) instead of loading it as a classifier with a random head."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.errors import ModelError
from orchestrator.models.predict import generate, generates_text, prompt_ids

ORCHESTRATOR = str(Path(sys.executable).with_name("orchestrator"))
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _greedy(folder: Path, ids: list[int], max_new_tokens: int) -> str:
    """The model's greedy continuation of ``ids``, straight from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()


@pytest.fixture
def chat_llama(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    """The tiny Llama with a ChatML template saved in its tokenizer (what an export of a chat job holds)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "chat-llama"
    shutil.copytree(tiny_models["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


def test_a_causal_lm_answers_with_its_greedy_continuation(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    folder = tiny_models["llama"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("a gripping film")["input_ids"][:-1]  # [CLS] a gripping film, without the closing [SEP]

    answers = generate(folder, ["a gripping film", "a dull mess"], max_new_tokens=5)

    assert generates_text(folder) and not generates_text(tiny_models["bert"])
    assert len(answers) == 2 and answers[0] == _greedy(folder, ids, 5) and answers[0]
    assert generate(folder, ["a gripping film"], max_new_tokens=1) == [_greedy(folder, ids, 1)] != [answers[0]]


def test_a_chat_model_reads_the_input_as_a_user_turn(chat_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    rendered = "<|im_start|>user\nwhat is the topic?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]

    assert prompt_ids(tokenizer, "what is the topic?", [tokenizer.sep_token_id]) == ids
    assert generate(chat_llama, ["what is the topic?"], max_new_tokens=4) == [_greedy(chat_llama, ids, 4)]


def test_the_cli_prints_each_prompt_with_its_answer(tiny_models: dict[str, Path]) -> None:
    run = subprocess.run(
        [ORCHESTRATOR, "predict", str(tiny_models["llama"]), "a gripping film", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "a gripping film" and lines[1].startswith("  -> ")
    assert lines[1].removeprefix("  -> ") == generate(tiny_models["llama"], ["a gripping film"], max_new_tokens=3)[0]


def test_an_encoder_is_neither_generated_from_nor_classified(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="is a BertModel, not a causal LM"):
        generate(tiny_models["bert"], ["a text"])
