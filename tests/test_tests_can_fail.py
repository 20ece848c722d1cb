"""Tests that hold whatever the code does are found in the tests' own syntax trees (issue 20, item 14):

* ``assert x == "a" if c else "b"`` parses as ``assert (x == "a") if c else "b"``: a branch that is no
  comparison (a string, a number) is always true;
* ``assert <constant>``, ``assert (x, "message")``, ``assert x or True``: always true;
* an ``assert`` inside ``try`` whose ``except`` catches AssertionError (or Exception, or everything): never fails;
* a ``pytest.raises`` block of several statements: an earlier line raising the expected error passes the test
  without the line under test ever running.

Each rule is checked on a deliberately bad snippet first, so the scan itself can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

TESTS = sorted((REPO / "tests").rglob("*.py"))
_BOOLEAN = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.Call, ast.Name, ast.Attribute, ast.Subscript)
_SWALLOWS = {"AssertionError", "Exception", "BaseException"}


def _caught_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:
        return {"BaseException"}
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types}


def _always_true_asserts(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        test = node.test
        if isinstance(test, ast.IfExp) and not (isinstance(test.body, _BOOLEAN) and isinstance(test.orelse, _BOOLEAN)):
            found.append((node.lineno, "`assert a == b if c else d` asserts d itself when c is false"))
        if isinstance(test, (ast.Constant, ast.Tuple, ast.List, ast.JoinedStr)):
            found.append((node.lineno, "assert on a constant or a tuple: always true"))
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
            if any(isinstance(v, ast.Constant) and v.value for v in test.values):
                found.append((node.lineno, "`assert ... or <true constant>`: always true"))
    return found


def _swallowed_asserts(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        if not any(_caught_names(h) & _SWALLOWS and not _fails(h) for h in node.handlers):
            continue
        for statement in node.body:
            for inner in ast.walk(statement):
                if isinstance(inner, ast.Assert):
                    found.append((inner.lineno, "assert inside a try whose except swallows AssertionError"))
    return found


def _fails(handler: ast.ExceptHandler) -> bool:
    """The handler raises again (or calls pytest.fail): the failed assert still fails the test."""
    return any(
        isinstance(n, ast.Raise) or (isinstance(n, ast.Call) and ast.unparse(n.func) == "pytest.fail")
        for n in ast.walk(handler)
    )


def _multi_statement_raises(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.With) or len(node.body) < 2:
            continue
        for item in node.items:
            call = item.context_expr
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "pytest.raises":
                found.append(
                    (
                        node.lineno,
                        f"pytest.raises around {len(node.body)} statements: keep only the one that must raise inside",
                    )
                )
    return found


RULES = (_always_true_asserts, _swallowed_asserts, _multi_statement_raises)


def _problems(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    return [p for rule in RULES for p in rule(tree)]


@pytest.mark.parametrize(
    "snippet",
    [
        'def test_x(start, ok):\n    assert start["precision"] == "bf16" if ok else "fp16"\n',
        "def test_x():\n    assert (1 + 1, 'two')\n",
        "def test_x(a):\n    assert a == 1 or True\n",
        "def test_x(f):\n    try:\n        assert f() == 1\n    except AssertionError:\n        pass\n",
        "def test_x(f):\n    try:\n        assert f() == 1\n    except Exception:\n        print('no')\n",
        "def test_x(reg):\n    with pytest.raises(KeyError):\n        reg.add('a')\n        reg.get('b')\n",
    ],
    ids=[
        "ifexp-with-a-string-branch",
        "assert-a-tuple",
        "or-true",
        "except-assertion-error",
        "except-exception",
        "raises-around-two-calls",
    ],
)
def test_the_scan_finds_each_kind(snippet: str) -> None:
    assert len(_problems(snippet)) == 1


@pytest.mark.parametrize(
    "snippet",
    [
        "def test_x(a, b, c):\n    assert a == b if c else a <= b\n",  # both branches compare: fine
        "def test_x(f):\n    try:\n        assert f()\n    except AssertionError:\n        raise\n",
        "def test_x(reg):\n    with pytest.raises(KeyError):\n        reg.get('b')\n",
    ],
    ids=["ifexp-of-two-comparisons", "reraised", "raises-around-one-call"],
)
def test_the_scan_leaves_sound_tests_alone(snippet: str) -> None:
    assert _problems(snippet) == []


@pytest.mark.parametrize("path", TESTS, ids=[str(p.relative_to(REPO)) for p in TESTS])
def test_no_test_holds_whatever_the_code_does(path: Path) -> None:
    problems = _problems(path.read_text())
    assert not problems, "\n".join(f"{path.relative_to(REPO)}:{line}: {why}" for line, why in problems)
