"""Chat and prompt/completion rows: where their columns are, and what makes one unusable (the driver's scan), and
a row's conversation as plain dicts (the workers' :class:`orchestrator.data.readers.RowReader`).

A conversation is a list of ``{role, content}`` objects, OpenAI style: roles ``system``, ``user``, ``assistant``
and ``tool``, ``content`` a non-empty string, at least one assistant turn (the answers the loss is on). jsonl rows
hold the list itself, parquet rows a list-of-struct column, tsv/csv rows the list as a JSON string.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from orchestrator.config import DataSource

ROLES = ("system", "user", "assistant", "tool")
CHAT_FIELDS = {"messages": "messages_column", "prompt": "prompt_column", "completion": "completion_column"}


class ChatRowError(ValueError):
    """What is wrong with one chat or prompt/completion row (the scan adds file and line)."""


def chat_columns(source: DataSource) -> dict[str, str]:
    """The configured chat columns by row key (``messages``, or ``prompt`` and ``completion``); empty for text
    rows."""
    return {key: getattr(source, name) for key, name in CHAT_FIELDS.items() if getattr(source, name)}


def chat_refs(source: DataSource, resolve: Callable[[str, str], int | str]) -> dict[str, int | str]:
    """Where each chat column sits in a row: ``resolve(column, field name)`` gives its index (tsv/csv) or key."""
    return {key: resolve(column, CHAT_FIELDS[key]) for key, column in chat_columns(source).items()}


def messages_of(value: Any) -> list[dict[str, Any]]:
    """A row's conversation as a list of dicts; a JSON string (a tsv/csv cell) is decoded first. Struct fields a
    message does not have (parquet fills them with None) are left out.

    Raises:
        ChatRowError: not a list of objects with a role and content.
    """
    if isinstance(value, str) and value.lstrip().startswith("["):  # a tsv/csv cell (or a jsonl string) of JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ChatRowError(f"the messages are not a JSON list ({exc.msg})") from None
    if not isinstance(value, list):
        hint = " (a tsv/csv cell holds the list as JSON)" if isinstance(value, str) else ""
        raise ChatRowError(f"messages must be a list of {{role, content}} objects, got {type(value).__name__}{hint}")
    messages = []
    for k, message in enumerate(value, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            shown = type(message).__name__ if not isinstance(message, dict) else f"keys {sorted(message)}"
            raise ChatRowError(f"message {k} is not a {{role, content}} object ({shown})")
        messages.append({key: v for key, v in message.items() if v is not None or key in ("role", "content")})
    return messages


def check_messages(value: Any, column: str) -> None:
    """Check one row's conversation: a list of ``{role, content}``, known roles, non-empty text, an answer.

    Raises:
        ChatRowError: saying which message is wrong and how.
    """
    try:
        messages = messages_of(value)
    except ChatRowError as exc:
        raise ChatRowError(f"column {column!r}: {exc}") from None
    if not messages:
        raise ChatRowError(f"column {column!r}: the conversation is empty")
    for k, message in enumerate(messages, start=1):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatRowError(
                f"column {column!r}: message {k} has the unknown role {role!r} (roles: {', '.join(ROLES)})"
            )
        if not isinstance(content, str):
            raise ChatRowError(
                f"column {column!r}: message {k} ({role}) has content of type {type(content).__name__}; "
                "content must be text"
            )
        if not content.strip():
            raise ChatRowError(f"column {column!r}: message {k} ({role}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatRowError(f"column {column!r}: the conversation has no assistant turn, so nothing to learn from")


def check_chat_row(row: Any, refs: dict[str, int | str], source: DataSource, value: Callable[[Any, Any], Any]) -> None:
    """Check a chat or prompt/completion row, ``value(row, ref)`` reading one of its columns.

    Raises:
        ChatRowError: saying which column is wrong and how.
    """
    if "messages" in refs:
        check_messages(value(row, refs["messages"]), str(source.messages_column))
        return
    for key in ("prompt", "completion"):
        column = getattr(source, CHAT_FIELDS[key])
        text = value(row, refs[key])
        if text is None or (isinstance(text, str) and not text.strip()):
            raise ChatRowError(f"empty {key} in column {column!r}")
        if isinstance(text, (list, dict)):
            raise ChatRowError(f"column {column!r}: the {key} must be text, got {type(text).__name__}")
