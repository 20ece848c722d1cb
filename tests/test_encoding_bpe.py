"""Chat encoding with a byte-level BPE tokenizer (GPT-2 / Llama 3 style), not only MiniLM's WordPiece.

No BPE tokenizer ships offline, so one is trained here (seconds) with the ``tokenizers`` library on AG News
headlines and wrapped as a transformers ``PreTrainedTokenizerFast`` with a chat template and an end-of-text token.
Byte-level BPE differs from WordPiece where the encoder's offset mapping matters: a token carries its leading space
(``Ġword``), newlines are tokens of their own, offsets may or may not include that space (``trim_offsets``), and
the chat markers are added special tokens. The checks: exactly the assistant tokens and the end-of-text token are
labelled (every turn of a multi-turn chat), ``train_on: all`` labels everything, the generation prompt is the
training sequence's prefix, and truncation and packing behave, for three tokenizer set-ups:

* ``qwen``: ChatML, ``<|im_end|>`` is the EOS (the template closes every turn with it: no second EOS);
* ``gpt2``: ChatML with ``<|endoftext|>`` as EOS (not in the template: the encoder inserts it after each answer),
  offsets with the leading space (GPT-2's ``trim_offsets: false``);
* ``llama3``: a BOS post-processor, a Llama-3-like template (``{{ bos_token }}``, header markers, ``<|eot_id|>``
  as EOS, contents ``| trim``-ed);
* ``plain``: a template of plain words whose generation prompt ends with a space (``assistant: ``) and that ends
  answers with ``{{ eos_token }}``: BPE merges that space into the answer's first token (``ĠBusiness``), so the
  generation prompt must stop before it, as the training sequence does, not end with a lone space token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.config import DataConfig, DataSource
from orchestrator.data.batching import PackedExamples, PackingCollator, attention_kind
from orchestrator.data.encoding import IGNORE_INDEX, BadRowError, make_encoder
from orchestrator.data.sources import prepare_data
from orchestrator.data.token_cache import TokenCache

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
SETUPS = {  # name: (template, eos, offsets include the leading space, BOS post-processor)
    "qwen": (CHATML, "<|im_end|>", False, False),
    "gpt2": (CHATML, "<|endoftext|>", True, False),
    "llama3": (LLAMA3, "<|eot_id|>", False, True),
    "plain": (PLAIN, "<|endoftext|>", True, False),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
# Answers where byte-level BPE differs from WordPiece: leading-space tokens, punctuation runs, a digit group, a
# multi-byte character (split into byte tokens), a newline inside the answer, and the last answer's trailing space.
CHAT = [
    {"role": "system", "content": "Answer with the topic."},
    {"role": "user", "content": "Topic? Stocks fell on Wall St. as oil rose."},
    {"role": "assistant", "content": "Business"},
    {"role": "user", "content": "And: Federer wins in straight sets?"},
    {"role": "assistant", "content": "Sports, surely (98%) - café!\nNext?"},
    {"role": "user", "content": "One more: NASA probe lands."},
    {"role": "assistant", "content": "Sci/Tech "},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def bpe(shared_data: Path) -> Any:
    """A byte-level BPE tokenizer (vocabulary 2,000) trained on 3,000 AG News headlines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [line.split("\t")[0] for line in (shared_data / "agnews" / "train.tsv").read_text().splitlines()[:3000]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def wrap(bpe: Any, name: str) -> Any:
    """``bpe`` as the transformers tokenizer of set-up ``name`` (template, EOS, offsets, BOS)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    template, eos, leading_space, bos = SETUPS[name]
    backend = Tokenizer.from_str(bpe.to_str())
    steps = [processors.ByteLevel(trim_offsets=not leading_space)]
    if bos:
        steps.append(processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", backend.token_to_id("<|begin_of_text|>"))],
        ))  # fmt: skip
    backend.post_processor = processors.Sequence(steps)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>" if bos else None,
    )  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module", params=list(SETUPS))
def tokenizer(request: pytest.FixtureRequest, bpe: Any) -> Any:
    return wrap(bpe, request.param)


def encoder(tokenizer: Any, *, max_length: int = 256, train_on: str = "completions", **columns: str) -> Any:
    """The tokenizer's own chat template renders (no data.chat_template)."""
    source = DataSource(path="chat.jsonl", **(columns or {"messages_column": "messages"}))
    data = DataConfig(train=source, max_length=max_length, train_on=train_on)
    return make_encoder(source, data, tokenizer, task="causal-lm")


def labelled_runs(example: dict[str, Any]) -> list[list[int]]:
    """The runs of consecutive labelled tokens (their ids); every label is its own token (the model shifts)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
            assert label == token
        previous = label
    return runs


def closing(tokenizer: Any) -> str:
    """What the template writes right after an answer, before the next turn (its end-of-turn marker)."""
    return "<|im_end|>" if tokenizer.chat_template == CHATML else tokenizer.eos_token


def expected_answer_text(tokenizer: Any, answer: str) -> str:
    """An answer's labelled text: the answer and the template's end-of-turn marker, then the EOS when the marker
    is not the EOS itself (the encoder inserts it)."""
    if tokenizer.chat_template == LLAMA3:
        answer = answer.strip()  # the Llama-3-like template trims contents; the others write them as they are
    if tokenizer.chat_template == PLAIN:
        answer = " " + answer  # the template's space before the answer is part of its first token (ĠBusiness)
    text = answer + closing(tokenizer)
    return text if closing(tokenizer) == tokenizer.eos_token else text + tokenizer.eos_token


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------------
# Which tokens carry loss
# --------------------------------------------------------------------------------------------------


def test_the_trained_tokenizer_is_byte_level_bpe(tokenizer: Any) -> None:
    pieces = tokenizer.tokenize("Stocks fell on Wall St. café")
    assert "ĠWall" in pieces or "ĠW" in pieces  # the leading space travels with the word
    assert tokenizer.backend_tokenizer.model.__class__.__name__ == "BPE" and tokenizer.is_fast
    assert tokenizer.decode(tokenizer("café!\nNext?", add_special_tokens=False)["input_ids"]) == "café!\nNext?"


def test_multi_turn_chat_labels_exactly_each_answer_and_its_eos(tokenizer: Any) -> None:
    example = encoder(tokenizer).encode({"messages": CHAT})
    runs = labelled_runs(example)

    assert [decode(tokenizer, run) for run in runs] == [expected_answer_text(tokenizer, a) for a in ANSWERS]
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)  # every answer closed by the end-of-text token
    # Nothing else changed: the template's text tokenized once (with the BOS it renders), plus the inserted EOS.
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    whole = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if closing(tokenizer) == tokenizer.eos_token:
        assert example["input_ids"] == whole
    else:
        assert [t for t in example["input_ids"] if t != tokenizer.eos_token_id] == whole
        assert example["input_ids"].count(tokenizer.eos_token_id) == len(ANSWERS)


def test_no_prompt_token_is_labelled(tokenizer: Any) -> None:
    example = encoder(tokenizer).encode({"messages": CHAT})
    unlabelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    text = decode(tokenizer, unlabelled)

    for message in CHAT:
        if message["role"] != "assistant":
            assert message["content"] in text  # every prompt token is unlabelled ...
    for answer in ANSWERS:
        assert answer.strip() not in text  # ... and no answer token is


def test_train_on_all_labels_every_token_of_the_same_sequence(tokenizer: Any) -> None:
    everything = encoder(tokenizer, train_on="all").encode({"messages": CHAT})

    assert everything["labels"] == everything["input_ids"]
    assert everything["input_ids"] == encoder(tokenizer).encode({"messages": CHAT})["input_ids"]


def answer_positions(example: dict[str, Any]) -> list[list[int]]:
    """The positions of each answer's labelled tokens."""
    runs: list[list[int]] = []
    for i, label in enumerate(example["labels"]):
        if label != IGNORE_INDEX:
            if not i or example["labels"][i - 1] == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(i)
    return runs


def test_the_generation_prompt_is_the_training_sequence_up_to_the_last_answer(tokenizer: Any) -> None:
    enc = encoder(tokenizer)
    example = enc.encode({"messages": CHAT})
    prompt = enc.prompt({"messages": CHAT})

    assert prompt == example["input_ids"][: answer_positions(example)[-1][0]]
    assert enc.reference({"messages": CHAT}) == "Sci/Tech "


def test_prompt_completion_rows_through_the_template(tokenizer: Any) -> None:
    row = {"prompt": "Topic? Oil prices rise.", "completion": "Business"}
    example = encoder(tokenizer, prompt_column="q", completion_column="a").encode(row)

    assert [decode(tokenizer, run) for run in labelled_runs(example)] == [expected_answer_text(tokenizer, "Business")]


# --------------------------------------------------------------------------------------------------
# Truncation and packing
# --------------------------------------------------------------------------------------------------


def test_truncation_keeps_the_start_and_a_prompt_that_fills_max_length_is_a_bad_row(tokenizer: Any) -> None:
    whole = encoder(tokenizer).encode({"messages": CHAT})
    answers = answer_positions(whole)
    keep = answers[1][1] + 1  # the second answer's first two tokens
    cut = encoder(tokenizer, max_length=keep).encode({"messages": CHAT})

    assert cut["input_ids"] == whole["input_ids"][:keep] and cut["labels"] == whole["labels"][:keep]
    assert answer_positions(cut) == [answers[0], answers[1][:2]]  # the cut answer lost its end (and its EOS)
    labelled = [t for t, label in zip(cut["input_ids"], cut["labels"]) if label != IGNORE_INDEX]
    assert labelled.count(tokenizer.eos_token_id) == 1  # the first answer's
    with pytest.raises(BadRowError, match=r"no answer token is left within data.max_length"):
        encoder(tokenizer, max_length=answers[0][0]).encode({"messages": CHAT})  # the prompt alone fills it
    assert answer_positions(encoder(tokenizer, max_length=answers[0][0] + 1).encode({"messages": CHAT})) == [
        answers[0][:1]
    ]


def chats(n: int) -> list[dict[str, Any]]:
    """``n`` short chats of different lengths (AG News style)."""
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    return [
        {"messages": [{"role": "user", "content": "Topic? " + " ".join(["Oil prices rise"] * (1 + i % 4))},
                      {"role": "assistant", "content": topics[i % 4]}]}
        for i in range(n)
    ]  # fmt: skip


def test_packed_chats_score_like_the_chats_one_by_one(tokenizer: Any, tmp_path: Path) -> None:
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chats(9)))
    config = DataConfig(train=DataSource(path=str(path), messages_column="messages"), max_length=64, packing=True)
    scanned = prepare_data(config, "causal-lm").train
    enc = make_encoder(config.train, config, tokenizer, task="causal-lm")
    cache = TokenCache.open(scanned, enc, task="causal-lm", cache_dir=tmp_path / "cache", num_proc=1)
    packed = PackedExamples(cache, block_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa",
    )).eval()  # fmt: skip

    blocks = [packed.get(i) for i in range(len(packed))]
    assert sorted(i for b in packed.blocks for i in b.tolist()) == list(range(9))  # every chat once, whole
    assert len(blocks) < 9 and all(sum(len(d["input_ids"]) for d in b) <= 64 for b in blocks)
    assert [d for b in blocks for d in b] == [cache.get(i) for b in packed.blocks for i in b.tolist()]
    batch = PackingCollator(tokenizer.pad_token_id, attention=attention_kind(model), block_size=64)(blocks)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(9):
            doc = enc.encode(json.loads(path.read_text().splitlines()[i]))
            logits = model(input_ids=torch.tensor([doc["input_ids"]])).logits[0, :-1]
            target = torch.tensor(doc["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((target != IGNORE_INDEX).sum())
        assert model(**batch).loss.item() == pytest.approx(total.item() / count, abs=1e-5)
    assert count == sum(len(run) for i in range(9) for run in labelled_runs(cache.get(i)))  # answers + EOS only
    cache.close()
