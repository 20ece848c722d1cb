"""Chat and prompt/completion rows (issue 19): config fields, the scan's checks with file:line, rendering with a chat
template, which tokens carry loss (train_on), the end-of-text token after every answer, the truncation policy and
the preflight error for a model without a template."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import DataConfig, DataSource
from orchestrator.config.loader import config_from_dict
from orchestrator.data.encoding import IGNORE_INDEX, BadRowError, chat_template_issues, make_encoder
from orchestrator.data.readers import RowReader
from orchestrator.data.sources import prepare_data
from orchestrator.errors import ConfigError, DataError
from orchestrator.models.loading import load_tokenizer

# ChatML-style, as Qwen and others ship it; the MiniLM vocabulary of the tiny models splits its markers into pieces.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that ends each assistant turn with the end-of-text token itself (as Llama 3 and Qwen do).
EOS_TURNS = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, surely"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_models: dict[str, Path]) -> Any:
    return load_tokenizer(str(tiny_models["llama"]))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def encoder(
    tokenizer: Any,
    *,
    template: str | None = CHATML,
    max_length: int = 128,
    train_on: str = "completions",
    **columns: str,
) -> Any:
    source = DataSource(path="chat.jsonl", **(columns or {"messages_column": "messages"}))
    data = DataConfig(train=source, chat_template=template, max_length=max_length, train_on=train_on)
    return make_encoder(source, data, tokenizer, task="causal-lm")


def labelled_runs(example: dict[str, Any]) -> list[list[int]]:
    """The runs of consecutive labelled tokens (their ids)."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
            assert label == token  # the model shifts the labels itself
        previous = label
    return runs


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------
# Rendering and masks
# --------------------------------------------------------------------------------------------------


def test_multi_turn_chat_labels_exactly_the_assistant_turns_each_closed_by_eos(tokenizer: Any) -> None:
    example = encoder(tokenizer).encode({"messages": CHAT, "label": -1})
    eos = tokenizer.sep_token_id  # MiniLM's vocabulary has no EOS: SEP ends documents

    assert labelled_runs(example) == [
        ids(tokenizer, "Paris<|im_end|>") + [eos],
        ids(tokenizer, "Rome, surely<|im_end|>") + [eos],
    ]
    rendered = tokenizer.apply_chat_template(CHAT, chat_template=CHATML, tokenize=False)
    without_added_eos = [t for t in example["input_ids"] if t != eos]
    assert without_added_eos == ids(tokenizer, rendered)  # nothing else changed: the template's text, tokenized once
    assert len(example["input_ids"]) == len(example["labels"])


def test_a_template_that_ends_turns_with_eos_gets_no_second_one(tokenizer: Any) -> None:
    example = encoder(tokenizer, template=EOS_TURNS).encode({"messages": CHAT, "label": -1})
    eos = tokenizer.sep_token_id

    assert labelled_runs(example) == [ids(tokenizer, "Paris") + [eos], ids(tokenizer, "Rome, surely") + [eos]]
    assert example["input_ids"].count(eos) == 2


def test_train_on_all_labels_every_token(tokenizer: Any) -> None:
    example = encoder(tokenizer, train_on="all").encode({"messages": CHAT, "label": -1})

    assert example["labels"] == example["input_ids"]
    assert example["input_ids"] == encoder(tokenizer).encode({"messages": CHAT})["input_ids"]


def test_prompt_and_reference_for_generation(tokenizer: Any) -> None:
    enc = encoder(tokenizer)
    row = {"messages": CHAT, "label": -1}

    rendered = tokenizer.apply_chat_template(CHAT[:4], chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    prompt = enc.prompt(row)
    # The earlier answer is closed by the inserted end-of-text token, as in training: the training sequence's prefix.
    assert [t for t in prompt if t != tokenizer.sep_token_id] == ids(tokenizer, rendered)
    assert prompt.count(tokenizer.sep_token_id) == 1 and prompt == enc.encode(row)["input_ids"][: len(prompt)]
    assert rendered.endswith("<|im_start|>assistant\n")
    assert enc.reference(row) == "Rome, surely"


def test_prompt_completion_rows_concatenate_without_a_template_and_chat_with_one(tokenizer: Any) -> None:
    row = {"prompt": "Q: capital of France? A:", "completion": " Paris", "label": -1}
    plain = encoder(tokenizer, template=None, prompt_column="q", completion_column="a")
    example = plain.encode(row)

    prompt_ids = [tokenizer.cls_token_id] + ids(tokenizer, row["prompt"])  # the tokenizer's start token, then the text
    assert example["input_ids"] == prompt_ids + ids(tokenizer, " Paris") + [tokenizer.sep_token_id]
    assert labelled_runs(example) == [ids(tokenizer, " Paris") + [tokenizer.sep_token_id]]
    assert plain.prompt(row) == prompt_ids and plain.reference(row) == " Paris"

    chat = encoder(tokenizer, prompt_column="q", completion_column="a").encode(row)
    assert labelled_runs(chat) == [ids(tokenizer, "Paris<|im_end|>") + [tokenizer.sep_token_id]]
    assert chat["input_ids"][:7] == ids(tokenizer, "<|im_start|>")  # rendered as a user turn


def test_plain_text_rows_end_with_eos(tiny_models: dict[str, Path]) -> None:
    gpt2_style = load_tokenizer(str(tiny_models["gpt2"]))
    source = DataSource(path="t.jsonl")
    enc = make_encoder(source, DataConfig(train=source, max_length=16), gpt2_style, task="causal-lm")

    example = enc.encode({"text": "once upon a time", "text_pair": None, "label": -1})
    assert example["input_ids"][-1] == gpt2_style.sep_token_id
    assert example["input_ids"].count(gpt2_style.sep_token_id) == 1  # the tokenizer's own SEP is not doubled
    assert example["labels"] == example["input_ids"]
    long = enc.encode({"text": "word " * 40, "text_pair": None, "label": -1})
    assert len(long["input_ids"]) == 16


def test_fingerprint_changes_with_what_decides_the_encoding_and_the_encoder_pickles(tokenizer: Any) -> None:
    base = encoder(tokenizer)
    assert pickle.loads(pickle.dumps(base)).encode({"messages": CHAT}) == base.encode({"messages": CHAT})
    assert base.fingerprint() == encoder(tokenizer).fingerprint()
    others = [
        encoder(tokenizer, train_on="all"),
        encoder(tokenizer, max_length=64),
        encoder(tokenizer, template=EOS_TURNS),
    ]
    assert len({base.fingerprint(), *(e.fingerprint() for e in others)}) == 4


def test_template_file_path(tokenizer: Any, tmp_path: Path) -> None:
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    from_file = encoder(tokenizer, template=str(template)).encode({"messages": CHAT})

    assert from_file == encoder(tokenizer).encode({"messages": CHAT})


# --------------------------------------------------------------------------------------------------
# Truncation policy and rows that cannot be encoded (file and line from the reader)
# --------------------------------------------------------------------------------------------------


def scanned_reader(tmp_path: Path, rows: list[Any], **data: Any) -> tuple[RowReader, Path]:
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    config = DataConfig(train=DataSource(path=str(path), messages_column="messages"), **data)
    return RowReader(prepare_data(config, "causal-lm").train), path


def test_truncation_keeps_the_start_and_a_row_with_no_answer_left_is_a_bad_row(tokenizer: Any, tmp_path: Path) -> None:
    long_question = [{"role": "user", "content": "why " * 60}, {"role": "assistant", "content": "because"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 60}]
    reader, path = scanned_reader(tmp_path, [{"messages": short}, {"messages": long_question}])
    enc = encoder(tokenizer, max_length=32)

    cut = enc.encode(reader.get(0), where=lambda: reader.where(0))
    assert len(cut["input_ids"]) == 32 and cut["labels"][-1] != IGNORE_INDEX  # the answer's first tokens stay
    assert tokenizer.sep_token_id not in cut["input_ids"]  # cut short: it lost its end
    with pytest.raises(BadRowError, match=rf"{path}:2: no answer token is left within data.max_length \(32\)"):
        enc.encode(reader.get(1), where=lambda: reader.where(1))
    with pytest.raises(BadRowError, match=rf"{path}:2: the prompt is \d+ tokens"):
        enc.prompt(reader.get(1), where=lambda: reader.where(1))


def test_a_template_that_fails_to_render_names_file_line_and_template(tokenizer: Any, tmp_path: Path) -> None:
    failing = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reader, path = scanned_reader(tmp_path, [{"messages": ok}, "", {"messages": CHAT}])
    enc = encoder(tokenizer, template=failing)

    enc.encode(reader.get(0))
    with pytest.raises(BadRowError) as caught:
        enc.encode(reader.get(1), where=lambda: reader.where(1))
    message = str(caught.value)
    assert message.startswith(f"{path}:3: data.chat_template (inline) fails to render this row")  # line 2 is blank
    assert "no system turns" in message and "raise_exception" in message and "on_bad_rows: skip" in message


def test_a_template_that_does_not_compile_is_one_error_naming_it(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"data.chat_template \(inline\): the chat template does not compile"):
        encoder(tokenizer, template="{% for m in messages %}{{ m }")


# --------------------------------------------------------------------------------------------------
# The scan: bad chat rows with file and line, skipped and counted, in jsonl, parquet and tsv
# --------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_CHATS = {
    "not a list": ({"messages": "hello"}, "messages must be a list of {role, content} objects, got str"),
    "not role/content": ({"messages": [{"role": "user", "text": "hi"}]}, "message 1 is not a {role, content} object"),
    "not objects": ({"messages": ["hi", "there"]}, "message 1 is not a {role, content} object (str)"),
    "unknown role": (
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "message 1 has the unknown role 'human'",
    ),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
    "empty content": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        "message 2 (assistant) has empty content",
    ),
    "empty list": ({"messages": []}, "the conversation is empty"),
    "missing column": ({"text": "hi"}, "messages must be a list of {role, content} objects, got NoneType"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_a_bad_chat_row_is_an_error_with_file_and_line(tmp_path: Path, case: str) -> None:
    row, why = BAD_CHATS[case]
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, row])
    data = DataConfig(train=DataSource(path=str(path), messages_column="messages"))

    with pytest.raises(DataError) as caught:
        prepare_data(data, "causal-lm")
    assert str(caught.value).startswith(f"{path}:3: column 'messages': {why}")
    assert "data.on_bad_rows: skip" in str(caught.value)


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ({"q": "2+2?", "a": " "}, "empty completion in column 'a'"),
        ({"a": "4"}, "empty prompt in column 'q'"),
        ({"q": ["x"], "a": "4"}, "column 'q': the prompt must be text, got list"),
    ],
)
def test_a_bad_prompt_completion_row_is_an_error_with_file_and_line(tmp_path: Path, row: dict, why: str) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1?", "a": "2"}, row])
    data = DataConfig(train=DataSource(path=str(path), prompt_column="q", completion_column="a"))

    with pytest.raises(DataError, match=rf"^{path}:2: {why}"):
        prepare_data(data, "causal-lm")


def test_bad_chat_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = [GOOD, *(row for row, _ in BAD_CHATS.values()), GOOD]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = DataConfig(train=DataSource(path=str(path), messages_column="messages"), on_bad_rows="skip")

    train = prepare_data(data, "causal-lm").train
    assert (len(train), train.bad_rows) == (2, len(BAD_CHATS))
    assert train.bad_examples[0].startswith(f"{path}:2: column 'messages'")
    reader = RowReader(train)
    assert [reader.get(i)["messages"] for i in range(2)] == [GOOD["messages"]] * 2
    assert reader.where(1) == f"{path}:{len(rows)}"


def test_parquet_list_of_struct_messages_and_tsv_json_cells(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [GOOD["messages"], CHAT, [{"role": "user", "content": "hi"}]]
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": chats, "id": [1, 2, 3]}), parquet, row_group_size=2)
    with pytest.raises(DataError, match=rf"^{parquet}:3: column 'messages': the conversation has no assistant turn"):
        prepare_data(DataConfig(train=DataSource(path=str(parquet), messages_column="messages")), "causal-lm")
    skip = DataConfig(train=DataSource(path=str(parquet), messages_column="messages"), on_bad_rows="skip")
    reader = RowReader(prepare_data(skip, "causal-lm").train)
    assert [reader.get(i)["messages"] for i in range(2)] == chats[:2]
    assert reader.where(1) == f"{parquet}:2"

    tsv = tmp_path / "chat.tsv"
    tsv.write_text("id\tchat\n" + "".join(f"{i}\t{json.dumps(c)}\n" for i, c in enumerate(chats[:2])) + "2\t[oops\n")
    with pytest.raises(DataError, match=rf"^{tsv}:4: column 'chat': the messages are not a JSON list"):
        prepare_data(DataConfig(train=DataSource(path=str(tsv), messages_column="chat")), "causal-lm")
    skip = DataConfig(train=DataSource(path=str(tsv), messages_column="chat"), on_bad_rows="skip")
    reader = RowReader(prepare_data(skip, "causal-lm").train)
    assert reader.get(1) == {"messages": CHAT, "label": -1}


def test_a_missing_chat_column_names_the_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"data.\*.messages_column 'conversation' is not a field of this file"):
        prepare_data(DataConfig(train=DataSource(path=str(path), messages_column="conversation")), "causal-lm")


# --------------------------------------------------------------------------------------------------
# Config and preflight
# --------------------------------------------------------------------------------------------------


def job(tmp_path: Path, model: Path, task: str = "causal-lm", **data: Any) -> dict[str, Any]:
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD])
    train = {"path": str(path), "messages_column": "messages", **data.pop("train", {})}
    return {
        "name": "chat",
        "model": {"path": str(model), "task": task},
        "data": {"train": train, **data},
        "output": {"dir": str(tmp_path / "runs"), "registry": None},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def config_problems(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(document)
    return str(caught.value)


def test_config_rules_for_chat_fields(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    model = tiny_models["llama"]
    config = config_from_dict(job(tmp_path, model, chat_template=CHATML))
    assert (config.data.train_on, config.data.train.messages_column) == ("completions", "messages")

    both = config_problems(job(tmp_path, model, train={"prompt_column": "q", "completion_column": "a"}))
    assert "data.train" in both and "set messages_column or prompt_column + completion_column, not both" in both
    alone = config_problems(job(tmp_path, model, train={"messages_column": None, "prompt_column": "q"}))
    assert "prompt_column and completion_column go together" in alone
    text = config_problems(job(tmp_path, model, train={"text_column": "sentence"}))
    assert "text_column is not read from chat rows" in text
    missing = config_problems(job(tmp_path, model, chat_template="templates/nope.jinja"))
    assert "data.chat_template" in missing and "'templates/nope.jinja' is neither a Jinja template" in missing
    classifier = config_problems(job(tmp_path, model, task="sequence-classification", chat_template=CHATML))
    assert "data.train.messages_column, data.chat_template: they need model.task: causal-lm" in classifier


def test_preflight_refuses_chat_rows_without_any_chat_template(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from orchestrator.cluster.preflight import preflight

    with pytest.raises(ConfigError) as caught:
        preflight(config_from_dict(job(tmp_path, tiny_models["llama"])))
    message = str(caught.value)
    assert "data.chat_template: the tokenizer of" in message and "has no chat template" in message
    assert "set data.chat_template" in message
    data = DataConfig(train=DataSource(path="x.jsonl", messages_column="m"), chat_template=CHATML)
    assert chat_template_issues(data, str(tiny_models["llama"])) == []
    plain = DataConfig(train=DataSource(path="x.jsonl", prompt_column="q", completion_column="a"))
    assert chat_template_issues(plain, str(tiny_models["llama"])) == []  # plain concatenation
    broken = DataConfig(train=DataSource(path="x.jsonl", messages_column="m"), chat_template="{{ m }")
    assert "does not compile" in chat_template_issues(broken, str(tiny_models["llama"]))[0].message


def test_python_tokenizers_without_offsets_label_the_same_tokens(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = encoder(tokenizer).encode({"messages": CHAT})
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))

    assert encoder(tokenizer).encode({"messages": CHAT}) == fast
