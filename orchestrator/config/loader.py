"""From a YAML file (or plain data) to a validated :class:`JobConfig`: YAML read with the line of every key,
``--set a.b=c`` overrides, ``${ENV:-default}`` interpolation, and every problem gathered into one
:class:`ConfigError` with its dotted path, line and fix hint; plus the JSON schema for editors.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.job import JobConfig
from orchestrator.errors import ConfigError, ConfigIssue

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# A config is saved with every model, checkpoint, registry entry and W&B run: a secret must never be copied
# into one. Variables whose names look like credentials are refused in ${...}; the product reads the ones it
# needs (WANDB_API_KEY, RAY_AUTH_TOKEN, cloud credentials) from the environment itself.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def _interpolate_env(value: Any, missing: list[str], secrets: list[str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in strings, recursively (secret-like names are collected in
    ``secrets`` and left unexpanded)."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if _SECRET_NAME.search(name):
                if secrets is not None:
                    secrets.append(name)
                return match.group(0)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            missing.append(name)
            return match.group(0)

        return _ENV_PATTERN.sub(repl, value)
    if isinstance(value, dict):
        return {k: _interpolate_env(v, missing, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(v, missing, secrets) for v in value]
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set a.b=c`` override; the value is read as YAML (``1e-4``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError([ConfigIssue(location=text, message="override must look like key.path=value")])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([ConfigIssue(location=text, message="override key must be a dotted path, e.g. training.lr")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(location=key, message=f"value {raw!r} is not valid YAML: {exc}")]) from exc
    return key, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted-path overrides applied (list items by index)."""
    data = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = _list_index(part, node, ".".join(parts[: i + 1]))
            node = node[index]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list[Any], where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(
            [ConfigIssue(location=where, message=f"{part!r} is not an index of this list of {len(node)} items")]
        )
    return int(part)


@dataclass
class _YamlDocument:
    data: Any
    lines: dict[tuple[str, ...], int]


def _read_yaml(path: Path) -> _YamlDocument:
    """Read YAML, keeping the line of every key so errors can point at it."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue(location="(yaml)", message=f"not valid YAML: {getattr(exc, 'problem', exc)}", line=line)],
            source=str(path),
        ) from exc
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node | None, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                key = (*prefix, str(i))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    walk(node, ())
    return _YamlDocument(data=data if data is not None else {}, lines=lines)


def _field_for(loc: Sequence[str | int]) -> Any:
    """The pydantic FieldInfo at a location, for its description (used as a fix hint)."""
    model: Any = JobConfig
    info = None
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        model = _inner_model(info.annotation)
    return info


def _inner_model(annotation: Any) -> Any:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in getattr(candidate, "__args__", ()):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    parent = _field_for(loc[:-1]) if len(loc) > 1 else None
    model = JobConfig if len(loc) <= 1 else _inner_model(parent.annotation) if parent else None
    return sorted(model.model_fields) if model else []


def issues_from_validation_error(
    exc: ValidationError, lines: Mapping[tuple[str, ...], int] | None = None
) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
        dotted = ".".join(loc) or "(top level)"
        line = None
        if lines:
            for n in range(len(loc), 0, -1):
                if tuple(loc[:n]) in lines:
                    line = lines[tuple(loc[:n])]
                    break
        message = err["msg"].removeprefix("Value error, ")
        hint = None
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(loc[-1], allowed, n=1)
            message = f"unknown key {loc[-1]!r}"
            hint = (f"did you mean {close[0]!r}? " if close else "") + (
                f"Allowed keys here: {', '.join(allowed)}" if allowed else "remove it"
            )
        elif err["type"] == "missing":
            info = _field_for(err["loc"])
            message = "required field is missing"
            hint = f"add it: {info.description}" if info is not None and info.description else "add it"
        else:
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
            info = _field_for(err["loc"])
            if info is not None and info.description:
                hint = f"give a valid value here; the field is: {info.description}"
        issues.append(ConfigIssue(location=dotted, message=message, line=line, hint=hint))
    return issues


def config_from_dict(
    data: Mapping[str, Any],
    overrides: Iterable[str | tuple[str, Any]] = (),
    *,
    source: str | None = None,
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> JobConfig:
    """Validate plain data (e.g. parsed YAML) into a JobConfig, or raise ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            [ConfigIssue(location="(top level)", message=f"expected a mapping of sections, got {type(data).__name__}")],
            source=source,
        )
    merged = apply_overrides(dict(data), overrides)
    missing_env: list[str] = []
    secret_env: list[str] = []
    merged = _interpolate_env(merged, missing_env, secret_env)
    issues = [
        ConfigIssue(
            location="(env)", message=f"environment variable {name} is not set", hint="export it or use ${VAR:-default}"
        )
        for name in sorted(set(missing_env))
    ]
    issues += [
        ConfigIssue(
            location="(env)",
            message=f"${{{name}}} looks like a secret; a config is saved with the model, checkpoints, the registry "
            "and W&B, so secrets are never interpolated into it",
            hint=f"remove it: keep {name} in the environment (or the Ray runtime env); the orchestrator and W&B read "
            "their credentials from there",
        )
        for name in sorted(set(secret_env))
    ]
    try:
        config = JobConfig.model_validate(merged)
    except ValidationError as exc:
        issues.extend(issues_from_validation_error(exc, lines))
        raise ConfigError(issues, source=source) from None
    if issues:
        raise ConfigError(issues, source=source)
    return config


def load_config(path: str | os.PathLike[str], overrides: Iterable[str | tuple[str, Any]] = ()) -> JobConfig:
    """Read, override, interpolate and validate a YAML job file.

    Raises:
        ConfigError: listing every problem with its dotted path, YAML line and a fix hint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            [ConfigIssue(location="(file)", message=f"config file not found: {path}", hint="check the path")],
            source=str(path),
        )
    document = _read_yaml(path)
    return config_from_dict(document.data, overrides, source=str(path), lines=document.lines)


def json_schema() -> dict[str, Any]:
    """JSON schema of the job file, for editors (``orchestrator schema > job.schema.json``)."""
    return JobConfig.model_json_schema()
