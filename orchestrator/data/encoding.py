"""One row becomes one training example: token ids and labels (workers' side, and the token cache's builder).

:func:`make_encoder` picks how a configured source's rows are encoded:

* **chat rows** (``data.*.messages_column``): rendered with ``data.chat_template`` or the tokenizer's own chat
  template (transformers' ``apply_chat_template`` with ``chat_template=``), then tokenized once.
* **prompt/completion rows** (``data.*.prompt_column`` + ``completion_column``): with a chat template (the data's
  or the tokenizer's), rendered as a two-turn chat, the prompt as the user turn and the completion as the
  assistant turn; without one, plain concatenation: the tokenizer's start tokens (BOS/CLS), the prompt, the
  completion and the end-of-text token, joined as they are (put any separator such as a space or newline in the
  data).
* **plain text rows** (causal-lm): the tokenizer's encoding of the text (and text pair), as before, plus the
  end-of-text token at the end of the document when the tokenizer did not end it with one.
* **classification rows**: the tokenizer's input ids (and token type ids) and the class id as ``labels``.

Labels (causal-lm; the model shifts them, so ``labels[i]`` is the target at position ``i``): ``-100`` on tokens
that carry no loss. ``data.train_on: completions`` (default) labels the assistant turns only (every assistant turn
of a multi-turn chat: its content and the template's end-of-turn markup, not the trailing whitespace after it) and
the completions; ``all`` labels every token. The end-of-text token (the tokenizer's EOS, else its SEP) closes
every answer and is labelled: when the template does not already end an assistant turn with it, it is inserted
right after the turn.

Which tokens are the assistant's: transformers can mark them (``return_assistant_tokens_mask``) only for
templates that wrap assistant turns in ``{% generation %}`` blocks, which most shipped templates do not. So this
module finds them itself, the way TRL and axolotl do, by rendering prefixes: assistant turn ``k`` spans from the
end of ``render(messages[:k], add_generation_prompt=True)`` to the end of ``render(messages[:k + 1])``, as
characters of the whole rendered conversation. The whole text is then tokenized once and a token belongs to a
turn when its character offsets overlap the turn. Character spans (rather than diffing token ids of prefixes) keep
the tokenization of the whole text, so a BPE merge across a turn boundary cannot shift every later label. A
template whose prefixes are not prefixes of the whole (one that rewrites earlier turns) falls back to finding the
turn's content in the rendered text after the previous turn.

Truncation policy (``TRUNCATION_POLICY``): keep the start, cut at ``data.max_length`` tokens. An answer cut short
keeps its first tokens (and loses its end-of-text token); a row in which no answer token is left within
``max_length`` (its prompt alone fills it) is a bad row: :class:`BadRowError` naming file and line, or, with
``data.on_bad_rows: skip``, dropped and counted by the caller.

Where a bad row is: ``encode(row, where=...)`` takes the row's location (``"path:line"``, or a callable that
returns it, e.g. ``lambda: reader.where(i)`` from :class:`orchestrator.data.readers.RowReader`, so the line is
only counted when there is an error); without it the message names the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import DataConfig, DataSource
from orchestrator.config.sections import looks_like_jinja
from orchestrator.errors import ConfigIssue, DataError

IGNORE_INDEX = -100  # the label Hugging Face's losses ignore
ENCODING_VERSION = 1  # bump when the same row would encode differently (part of :meth:`Encoder.fingerprint`)
TRUNCATION_POLICY = "keep-start-cut-at-max-length;no-answer-token-left-is-a-bad-row"
TEMPLATE_PREVIEW_CHARS = 160

Where = str | Callable[[], str] | None


class BadRowError(DataError):
    """A row that cannot become an example (its template fails to render it, or no answer token is left within
    ``data.max_length``); the message names file and line. With ``data.on_bad_rows: skip`` the caller drops the
    row and counts it; any other :class:`DataError` (a file that changed, a broken template) is not skippable."""


def end_of_text_id(tokenizer: Any) -> int:
    """The token that ends a document or an answer: EOS, else SEP (BERT-style vocabularies).

    Raises:
        DataError: the tokenizer has neither.
    """
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError(
        "the tokenizer of model.path has no eos or sep token to end documents and answers with; use a tokenizer "
        "with an eos_token"
    )


def data_template_text(data: DataConfig) -> str | None:
    """``data.chat_template`` as template text: the value itself when it is Jinja, else the file it names.

    Raises:
        DataError: the file cannot be read (it is read on every worker, so it must be at that path on every node).
    """
    value = data.chat_template
    if value is None or looks_like_jinja(value):
        return value
    try:
        return Path(value).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"data.chat_template: cannot read the template file {value} ({exc}); it must be readable at that path "
            "on every node, or put the template text itself in data.chat_template"
        ) from None


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (its ``default`` one when it ships several by name), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def template_source(data: DataConfig, tokenizer: Any) -> str:
    """Where the template in use comes from, for messages: ``data.chat_template (...)`` or the tokenizer's."""
    if data.chat_template is not None:
        inline = looks_like_jinja(data.chat_template)
        return "data.chat_template (inline)" if inline else f"data.chat_template ({data.chat_template})"
    return f"the chat template of the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'model.path'}"


def check_template_syntax(template: str, source: str) -> None:
    """Compile the template once, so a syntax error is one error naming the template, not one per row.

    Raises:
        DataError: naming ``source`` and the line of the template.
    """
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        # transformers' own compiler: its sandbox and extensions ({% generation %}) are those rendering uses.
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(
            f"{source}: the chat template does not compile: {exc.message} (template line {exc.lineno}); fix the "
            "template's Jinja syntax"
        ) from None


def make_encoder(source: DataSource, data: DataConfig, tokenizer: Any, *, task: str) -> Encoder:
    """The :class:`Encoder` of one configured source (train or eval set).

    Args:
        source: the configured file: which columns hold the rows (messages, prompt/completion or text).
        data: the data section: ``max_length``, ``train_on``, ``chat_template``.
        tokenizer: the model's (fast) Hugging Face tokenizer.
        task: ``"causal-lm"`` or ``"sequence-classification"``.

    Raises:
        DataError: chat rows with no chat template anywhere, an unreadable template file or a template that does
            not compile.
    """
    return Encoder(source, data, tokenizer, task=task)


class Encoder:
    """Turns rows (dicts from :meth:`orchestrator.data.readers.RowReader.get`) into examples; picklable (it holds
    the tokenizer, the template text and the settings), so it can go to the processes that build the cache."""

    def __init__(self, source: DataSource, data: DataConfig, tokenizer: Any, *, task: str):
        self.task = task
        self.tokenizer = tokenizer
        self.max_length = data.max_length
        self.train_on = data.train_on
        self.path = source.path
        self.kind = _row_kind(source, task)
        self.template: str | None = None
        self.template_source = ""
        if self.kind in ("chat", "prompt_completion"):
            self.template = data_template_text(data) or tokenizer_template(tokenizer)
            self.template_source = template_source(data, tokenizer)
            if self.template is None and self.kind == "chat":
                raise DataError(_no_template_message(tokenizer))
            if self.template is not None:
                check_template_syntax(self.template, self.template_source)
        self.eos_id = end_of_text_id(tokenizer) if task == "causal-lm" else None
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------------------------
    def encode(self, row: dict[str, Any], where: Where = None) -> dict[str, list[int] | int]:
        """One example, not padded, at most ``data.max_length`` tokens: ``input_ids``, ``labels`` (a list for
        causal-lm, the class id for classification) and, where the tokenizer makes them, ``token_type_ids``.

        Raises:
            BadRowError: the template fails on the row, or no answer token is left within max_length.
        """
        if self.kind == "classification":
            return self._encode_classification(row)
        if self.kind == "text":
            return self._encode_text(row)
        if self.kind == "prompt_completion" and self.template is None:
            return self._encode_concatenated(row, where)
        ids, owners = self._chat_tokens(self._messages(row), where)
        return self._finish(ids, [j is not None for j in owners], where)

    def prompt(self, row: dict[str, Any], where: Where = None) -> list[int]:
        """The token ids to generate the answer from: the training sequence of the conversation up to the first
        token of its last assistant turn (for prompt/completion rows, the prompt as encoded for training). So the
        model sees what it saw in training: the earlier answers closed by the inserted end-of-text token, and no
        lone trailing space where BPE merged the template's space into the answer's first token (`` Paris``).

        Raises:
            BadRowError: the template fails on the row, or the prompt leaves no room within max_length.
        """
        if self.kind in ("classification", "text"):
            raise ValueError(f"{self.path}: prompt() is for chat or prompt/completion rows, not {self.kind} rows")
        if self.template is None:
            ids = self._start_ids() + self._tokens(str(row["prompt"]))
        else:
            messages = self._messages(row)
            last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
            ids, owners = self._chat_tokens(messages[: last + 1], where)
            turn = sum(m["role"] == "assistant" for m in messages[:last])  # the last answer's span index
            ids = ids[: owners.index(turn)] if turn in owners else self._generation_prompt(messages[:last], where)
        if len(ids) >= self.max_length:
            raise self._bad(
                where,
                f"the prompt is {len(ids)} tokens, leaving no room for an answer within "
                f"data.max_length ({self.max_length})",
                fix=_LONGER,
            )
        return ids

    def reference(self, row: dict[str, Any]) -> str:
        """The answer a generation is scored against: the last assistant turn's content, or the completion."""
        if self.kind == "prompt_completion":
            return str(row["completion"])
        if self.kind == "chat":
            return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "assistant")
        raise ValueError(f"{self.path}: reference() is for chat or prompt/completion rows, not {self.kind} rows")

    def fingerprint(self) -> str:
        """A hex digest of everything that decides how a row encodes (for a token cache's key): the row kind,
        template text, train_on, max_length, the tokenizer (its whole serialized form when it has one), the
        end-of-text token and this module's encoding and truncation versions."""
        if self._fingerprint is None:
            parts = {
                "version": ENCODING_VERSION,
                "truncation": TRUNCATION_POLICY,
                "task": self.task,
                "kind": self.kind,
                "template": self.template,
                "train_on": self.train_on,
                "max_length": self.max_length,
                "eos_id": self.eos_id,
                "tokenizer": _tokenizer_identity(self.tokenizer),
            }
            self._fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    # ----------------------------------------------------------------------------------------------------------
    def _encode_classification(self, row: dict[str, Any]) -> dict[str, list[int] | int]:
        encoded = self.tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=self.max_length)
        out: dict[str, list[int] | int] = {"input_ids": list(encoded["input_ids"]), "labels": int(row["label"])}
        if "token_type_ids" in encoded:
            out["token_type_ids"] = list(encoded["token_type_ids"])
        return out

    def _encode_text(self, row: dict[str, Any]) -> dict[str, list[int] | int]:
        """A plain causal-LM document: every token labelled; EOS appended unless the document was cut (it did not
        end there) or the tokenizer already ended it (BERT's SEP)."""
        ids = list(
            self.tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=self.max_length)["input_ids"]
        )
        if (not ids or ids[-1] != self.eos_id) and len(ids) < self.max_length:
            ids.append(int(self.eos_id))  # type: ignore[arg-type]
        return {"input_ids": ids, "labels": list(ids)}

    def _encode_concatenated(self, row: dict[str, Any], where: Where) -> dict[str, list[int] | int]:
        prompt = self._start_ids() + self._tokens(str(row["prompt"]))
        answer = self._tokens(str(row["completion"])) + [int(self.eos_id)]  # type: ignore[arg-type]
        return self._finish(prompt + answer, [False] * len(prompt) + [True] * len(answer), where)

    def _finish(self, ids: list[int], answer: list[bool], where: Where) -> dict[str, list[int] | int]:
        """Apply the truncation policy and train_on to the whole example's ids and answer-token flags."""
        first = next((i for i, flag in enumerate(answer) if flag), len(ids))
        if first >= self.max_length:
            raise self._bad(
                where,
                f"no answer token is left within data.max_length ({self.max_length}): the answer starts at token "
                f"{first + 1} of {len(ids)} (the start is kept and the rest cut)",
                fix=_LONGER,
            )
        ids, answer = ids[: self.max_length], answer[: self.max_length]
        if self.train_on == "all":
            labels = list(ids)
        else:
            labels = [t if flag else IGNORE_INDEX for t, flag in zip(ids, answer)]
        return {"input_ids": ids, "labels": labels}

    def _messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if self.kind == "prompt_completion":
            return [
                {"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["completion"])},
            ]
        return list(row["messages"])

    def _generation_prompt(self, messages: list[dict[str, Any]], where: Where) -> list[int]:
        """The template's own generation prompt, tokenized (only when the answer left no token of its own)."""
        return self._tokens(self._render(messages, where, add_generation_prompt=True))

    def _chat_tokens(self, messages: list[dict[str, Any]], where: Where) -> tuple[list[int], list[int | None]]:
        """The whole conversation's token ids and, per token, the assistant turn it belongs to (its index among
        the assistant turns; None: not an assistant's), EOS inserted after every assistant turn that the template
        does not end with it."""
        text = self._render(messages, where)
        spans = self._assistant_spans(messages, text, where)
        ids, offsets = self._tokens_with_offsets(text, [c for span in spans for c in span])
        # The turn each token belongs to (None: not an assistant's): its characters overlap the turn's span.
        owner = [next((j for j, (s, e) in enumerate(spans) if start < e and end > s), None) for start, end in offsets]
        last = {j: k for k, j in enumerate(owner) if j is not None}
        closed = {j for j, token in zip(owner, ids) if j is not None and token == self.eos_id}
        out_ids: list[int] = []
        out_owners: list[int | None] = []
        for k, (token, j) in enumerate(zip(ids, owner)):
            out_ids.append(token)
            out_owners.append(j)
            if j is not None and last[j] == k and j not in closed:
                out_ids.append(int(self.eos_id))  # type: ignore[arg-type]
                out_owners.append(j)
        return out_ids, out_owners

    def _assistant_spans(self, messages: list[dict[str, Any]], text: str, where: Where) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered conversation (see the module docstring)."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:k], where, add_generation_prompt=True) if k else ""
            through = self._render(messages[: k + 1], where)
            if k and text.startswith(through) and through.startswith(before) and len(before) >= cursor:
                start, end = len(before), len(through)
            else:  # a template that rewrites earlier turns: find the content after the previous turn
                start = text.find(message["content"], cursor)
                if start < 0:
                    raise self._bad(
                        where,
                        f"{self.template_source} does not render assistant turn {k + 1}'s content "
                        "as it is, so its tokens cannot be told apart",
                        fix=_TEMPLATE,
                    )
                end = start + len(message["content"])
            while end > start and text[end - 1].isspace():
                end -= 1  # the newline between turns is the template's, not the answer's
            spans.append((start, end))
            cursor = end
        return spans

    def _render(self, messages: Sequence[dict[str, Any]], where: Where, *, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                eos_token=self.tokenizer.convert_ids_to_tokens(self.eos_id),
            )
        except Exception as exc:  # jinja2's errors, raise_exception() in templates, TypeErrors on odd values
            preview = " ".join((self.template or "").split())[:TEMPLATE_PREVIEW_CHARS]
            raise self._bad(
                where,
                f"{self.template_source} fails to render this row ({type(exc).__name__}: {exc}); template: {preview!r}",
                fix=_TEMPLATE,
            ) from None

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokens_with_offsets(self, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The text's token ids and each token's character span. Fast tokenizers tokenize the whole text and
        tell the offsets; Python ones cannot, so the pieces between the ``cuts`` (turn boundaries) are tokenized
        one by one, each token spanning its whole piece (a token then never straddles a boundary)."""
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        bounds = sorted({0, len(text), *cuts})
        for start, end in zip(bounds, bounds[1:]):
            piece = self._tokens(text[start:end])
            ids += piece
            offsets += [(start, end)] * len(piece)
        return ids, offsets

    def _start_ids(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS, CLS; none for GPT-2): found by encoding a
        probe with and without them."""
        with_special = list(self.tokenizer("a")["input_ids"])
        plain = self._tokens("a")
        start = next((i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0)
        return with_special[:start]

    def _bad(self, where: Where, why: str, *, fix: str) -> BadRowError:
        location = where() if callable(where) else (where or self.path)
        return BadRowError(f"{location}: {why}; {fix}, or set data.on_bad_rows: skip to drop such rows")


_LONGER = "raise data.max_length or shorten the prompt"
_TEMPLATE = "fix the row or the chat template"


def _row_kind(source: DataSource, task: str) -> str:
    if task != "causal-lm":
        return "classification"
    if source.messages_column:
        return "chat"
    if source.prompt_column:
        return "prompt_completion"
    return "text"


def _no_template_message(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "model.path"
    return (
        f"data.chat_template: the tokenizer of {name} has no chat template, and data.*.messages_column rows must be "
        "rendered with one; set data.chat_template to a Jinja template (the text, or a file path), e.g. a "
        "ChatML-style one, or use a model whose tokenizer ships a chat template"
    )


def _tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's whole serialized form when it is a fast tokenizer (vocabulary, merges, normalizer), else its
    class, name, size and init arguments; hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # Without the padding/truncation settings: the last call's (transformers sets them on the backend per call),
        # which differ between a rank that has tokenized and one that has not, so the keys would not match.
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = json.dumps(
            [
                type(tokenizer).__name__,
                getattr(tokenizer, "name_or_path", ""),
                len(tokenizer),
                getattr(tokenizer, "init_kwargs", {}),
            ],
            sort_keys=True,
            default=str,
        )
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    return hashlib.sha256((text + special).encode()).hexdigest()


def chat_template_issues(data: DataConfig, model_path: str, *, trust_remote_code: bool = False) -> list[ConfigIssue]:
    """Preflight (driver, before Ray starts): chat rows need a chat template, from data.chat_template or the
    tokenizer of model.path, and the template must compile.

    Returns:
        The problems found (none when no source has chat or prompt/completion columns).
    """
    sources = [data.train, *data.eval]
    chat = any(s.messages_column for s in sources)
    if not chat and not any(s.prompt_column for s in sources):
        return []
    try:
        template = data_template_text(data)
    except DataError as exc:
        return [ConfigIssue("data.chat_template", str(exc).removeprefix("data.chat_template: "))]
    tokenizer = None
    if template is None:
        from orchestrator.models.loading import load_tokenizer

        tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        template = tokenizer_template(tokenizer)
    if template is None:
        if not chat:
            return []  # prompt/completion rows without a template: plain concatenation
        return [
            ConfigIssue(
                "data.chat_template",
                _no_template_message(tokenizer).removeprefix("data.chat_template: "),
                hint="set data.chat_template: path/to/template.jinja (or the template text)",
            )
        ]
    try:
        check_template_syntax(template, template_source(data, tokenizer))
    except DataError as exc:
        return [ConfigIssue("data.chat_template", str(exc))]
    return []
