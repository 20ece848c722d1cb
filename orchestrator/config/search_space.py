"""Search spaces of sweeps: ``training.lr: loguniform(1e-5, 1e-3)`` and friends, parsed and checked
against the job.

The expressions are parsed in :mod:`orchestrator.config.distributions` (re-exported here). Each dotted
path is checked against the job itself: every choice/grid value and both ends of every range are applied
with :func:`orchestrator.config.config_from_dict`, so an unknown field or a value the job refuses is
reported as ``tune.search_space.<path>`` before any cluster resources are taken (examples of the
expressions: :mod:`orchestrator.config.distributions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.config.distributions import DISTRIBUTIONS, Distribution, parse_expression, parse_search_space
from orchestrator.config.loader import config_from_dict
from orchestrator.errors import ConfigError, ConfigIssue

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "check_search_space",
    "parse_expression",
    "parse_search_space",
]

# Fields a trial must not change: they name, place and size the trial; the sweep sets them.
NOT_SEARCHABLE = ("name", "tune", "output", "tracking", "scaling")


def check_search_space(base: Mapping[str, Any], space: Mapping[str, Distribution]) -> list[ConfigIssue]:
    """Check every path and value of a parsed search space against the job (without its tune section).

    Every choice/grid value and both ends of each range are applied, with the other fields at a value
    that is valid on its own, so cross-field rules (``unfreeze.kind: gradual`` needs ``every_steps``) see
    the combinations trials will see.

    Returns:
        One issue per bad path, located at ``tune.search_space.<path>``; empty when all is well.
    """
    issues: list[ConfigIssue] = []
    usable: dict[str, Distribution] = {}
    for path, dist in space.items():
        root = path.split(".")[0]
        if root in NOT_SEARCHABLE:
            issues.append(
                ConfigIssue(
                    location=f"tune.search_space.{path}",
                    message=f"{root}.* cannot be searched: the sweep sets it for every trial",
                    hint="search fields of model, data, method, training, lora, unfreeze, distill or deepspeed",
                )
            )
        else:
            usable[path] = dist

    def first_problem(overrides: list[tuple[str, Any]]) -> ConfigIssue | None:
        try:
            config_from_dict(base, overrides)
        except ConfigError as exc:
            return exc.issues[0]
        return None

    # A value per path that is valid with the rest of the job as it is: the background for the others.
    background: dict[str, Any] = {}
    for path, dist in usable.items():
        valid_alone = [value for value in dist.candidates() if first_problem([(path, value)]) is None]
        if valid_alone:
            background[path] = valid_alone[0]
    for path, dist in usable.items():
        others = [(p, v) for p, v in background.items() if p != path]
        if others and first_problem(others) is not None:
            others = []  # the other fields' values clash among themselves: judge this path alone
        messages: list[str] = []
        hint = None
        for value in dist.candidates():
            problem = first_problem([*others, (path, value)])
            if problem is None:
                continue
            if problem.message.startswith("unknown key"):  # the path itself is wrong: no value will do
                messages, hint = [problem.message], problem.hint
                break
            where = "" if problem.location == path else f"{problem.location}: "
            messages.append(f"value {value!r}: {where}{problem.message}")
            hint = hint or problem.hint
        if messages:
            issues.append(ConfigIssue(location=f"tune.search_space.{path}", message="; ".join(messages), hint=hint))
    return issues
