"""Error types users see. Each message says what is wrong, where, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a job config: dotted path, what is wrong, the YAML line and a hint."""

    location: str
    message: str
    line: int | None = None
    hint: str | None = None

    def format(self, source: str | None = None) -> str:
        where = f"{source}:{self.line}" if source and self.line else (source or "")
        prefix = f"{where}: " if where else ""
        text = f"{prefix}{self.location}: {self.message}"
        if self.hint:
            text += f"\n    fix: {self.hint}"
        return text


class OrchestratorError(Exception):
    """Base class for errors raised by the orchestrator on bad input or state."""


class ConfigError(OrchestratorError, ValueError):
    """A job config has one or more problems; all of them are listed."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None):
        self.issues = list(issues)
        self.source = source
        count = len(self.issues)
        header = f"{count} problem{'s' if count != 1 else ''} in {source or 'config'}:"
        super().__init__("\n".join([header, *(f"  - {i.format(source)}" for i in self.issues)]))

    def __reduce__(self) -> tuple:
        # Ray sends errors between processes by pickling; the default would rebuild it from the message.
        return (type(self), (self.issues, self.source))


class DataError(OrchestratorError, ValueError):
    """A data file is missing, malformed, or has a bad row (the message names file and line)."""


class ModelError(OrchestratorError, ValueError):
    """A model path or alias does not resolve to a loadable model."""


class TrainingError(OrchestratorError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the step."""
