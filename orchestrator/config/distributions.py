"""Search-space expressions of sweeps: ``training.lr: loguniform(1e-5, 1e-3)`` and friends, parsed without
``eval`` into :class:`Distribution` values.

An expression is ``name(args)``; the arguments are read as a YAML flow list (``yaml.safe_load("[args]")``),
so ``choice([none, gradual])`` holds the strings ``none`` and ``gradual``. Numbers written like ``1e-5``
(which YAML 1.1 reads as strings) are read as numbers. Checking a parsed space against the job is
:func:`orchestrator.config.search_space.check_search_space`.

Example:
    >>> parse_expression("loguniform(1e-5, 1e-3)")
    Distribution(kind='loguniform', args=(1e-05, 0.001))
    >>> parse_expression("choice([none, gradual])").candidates()
    ['none', 'gradual']
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "parse_expression",
    "parse_search_space",
]

_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class _Spec:
    params: tuple[str, ...]  # names of the numeric arguments; empty for choice/grid (one list)
    integer: bool = False  # bounds must be integers
    positive: bool = False  # bounds must be > 0 (log scale)
    help: str = ""


DISTRIBUTIONS: dict[str, _Spec] = {
    "uniform": _Spec(("low", "high"), help="uniform(low, high): any float in [low, high]"),
    "quniform": _Spec(("low", "high", "q"), help="quniform(low, high, q): uniform, rounded to a multiple of q"),
    "loguniform": _Spec(("low", "high"), positive=True, help="loguniform(low, high): uniform in log space, low > 0"),
    "qloguniform": _Spec(("low", "high", "q"), positive=True, help="qloguniform(low, high, q): loguniform, rounded"),
    "randn": _Spec(("mean", "sd"), help="randn(mean, sd): normal distribution"),
    "qrandn": _Spec(("mean", "sd", "q"), help="qrandn(mean, sd, q): normal, rounded to a multiple of q"),
    "randint": _Spec(
        ("low", "high"), integer=True, help="randint(low, high): an integer in [low, high), high excluded"
    ),
    "qrandint": _Spec(
        ("low", "high", "q"),
        integer=True,
        help="qrandint(low, high, q): integer multiple of q in [low, high], high included",
    ),
    "lograndint": _Spec(
        ("low", "high"), integer=True, positive=True, help="lograndint(low, high): integer, log scale, high excluded"
    ),
    "qlograndint": _Spec(("low", "high", "q"), integer=True, positive=True, help="qlograndint(low, high, q)"),
    "choice": _Spec((), help="choice([a, b, ...]): one of the values, drawn at random"),
    "grid": _Spec((), help="grid([a, b, ...]): every value in turn (x num_samples)"),
}


@dataclass(frozen=True)
class Distribution:
    """One parsed expression: the distribution's name and its arguments (numbers, or the values of a list)."""

    kind: str
    args: tuple[Any, ...]

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def candidates(self) -> list[Any]:
        """Values that stand for the whole distribution when checking it against the job: every value of
        a choice/grid, both ends of a range (the largest value drawn where the upper bound is excluded),
        the mean of a normal distribution."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind in ("randn", "qrandn"):
            return [self.args[0]]
        low, high = self.args[0], self.args[1]
        if self.kind in ("randint", "lograndint"):
            high = high - 1
        return [low, high]

    def to_tune(self) -> Any:
        """The Ray Tune domain (or grid search) for this distribution."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def __str__(self) -> str:
        if self.kind in ("choice", "grid"):
            return f"{self.kind}({json.dumps(list(self.args))})"
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


def _as_number(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if re.fullmatch(r"[-+]?\d+", value.strip()) else number
    return value


def parse_expression(text: Any) -> Distribution:
    """Parse one search-space expression.

    Args:
        text: e.g. ``"loguniform(1e-5, 1e-3)"`` or ``"choice([none, gradual])"``.

    Returns:
        The distribution with its checked arguments.

    Raises:
        ValueError: saying what is wrong and what would be right.
    """
    if not isinstance(text, str):
        shown = json.dumps(text) if isinstance(text, (list, dict, int, float, bool)) or text is None else repr(text)
        hint = f"; for a list of values write 'choice({shown})'" if isinstance(text, list) else ""
        raise ValueError(
            f"expected a distribution such as 'loguniform(1e-5, 1e-3)' or 'choice([a, b])', got {shown}{hint} "
            "(a fixed value belongs in the job's own section)"
        )
    match = _CALL.match(text)
    if not match:
        raise ValueError(f"{text!r} is not of the form name(arguments), e.g. 'uniform(0.6, 1.0)'")
    name, inner = match.group(1), match.group(2)
    spec = DISTRIBUTIONS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, DISTRIBUTIONS, n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown distribution {name!r}; {suggestion}choose one of: {', '.join(DISTRIBUTIONS)}")
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"the arguments of {text!r} are not valid YAML ({problem}); usage: {spec.help}") from None
    if not isinstance(args, list):  # e.g. "name(] [)" that YAML reads otherwise
        raise ValueError(f"the arguments of {text!r} are not a list; usage: {spec.help}")
    if not spec.params:
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        values = [_as_number(v) for v in values]
        if not values:
            raise ValueError(f"{name}() needs at least one value; usage: {spec.help}")
        if any(isinstance(v, (list, dict)) for v in values) and not all(isinstance(v, list) for v in values):
            raise ValueError(f"{text!r}: values must be plain values (or all lists); usage: {spec.help}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ValueError(f"{text!r} lists a value twice; list each value once")
        return Distribution(name, tuple(values))
    return Distribution(name, _check_numbers(name, spec, [_as_number(a) for a in args], text))


def _check_numbers(name: str, spec: _Spec, args: list[Any], text: str) -> tuple[Any, ...]:
    if len(args) != len(spec.params):
        raise ValueError(
            f"{name} takes {len(spec.params)} arguments ({', '.join(spec.params)}), got {len(args)} in {text!r}; "
            f"usage: {spec.help}"
        )
    for param, value in zip(spec.params, args):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: {param} must be a finite number, got {value!r} in {text!r}")
        if spec.integer and float(value) != int(value):
            raise ValueError(f"{name}: {param} must be an integer, got {value!r} in {text!r}")
    values = [int(v) if spec.integer else float(v) for v in args]
    bounds = dict(zip(spec.params, values))
    if "low" in bounds and not bounds["low"] < bounds["high"]:
        raise ValueError(f"{name}: low must be smaller than high, got {text!r}")
    if spec.positive and bounds["low"] <= 0:
        raise ValueError(f"{name} works in log space: low must be > 0, got {text!r}")
    if "sd" in bounds and bounds["sd"] <= 0:
        raise ValueError(f"{name}: sd must be > 0, got {text!r}")
    if "q" in bounds and bounds["q"] <= 0:
        raise ValueError(f"{name}: q must be > 0, got {text!r}")
    if name in ("randint", "lograndint") and bounds["high"] - bounds["low"] < 1:
        raise ValueError(f"{name}: high is excluded, so {text!r} holds no integer")
    return tuple(values)


def parse_search_space(space: Mapping[str, Any]) -> dict[str, Distribution]:
    """Parse every entry of ``tune.search_space``.

    Raises:
        ValueError: one line per bad entry, each starting with its dotted path.
    """
    parsed: dict[str, Distribution] = {}
    problems: list[str] = []
    for path, text in space.items():
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            problems.append(f"{path!r}: keys are dotted config paths such as training.lr")
            continue
        try:
            parsed[path] = parse_expression(text)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    return parsed
