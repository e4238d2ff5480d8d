"""Module and function sizes: no module over 700 lines, no function over 60.

A module that grows past its limit is usually holding two ideas; a function
past 60 lines, several steps that want names. The few still over are listed
below with their size today, as a ceiling: they may shrink, not grow, and the
test fails when one is back under the limit and still listed, so the list only
gets shorter. ``make lint`` runs this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "chexlib"
MODULE_LINES = 700
FUNCTION_LINES = 60  # from ``def`` to its last line, docstring included

# Still over the limits, at most this size: {module: lines} and {"module:function": lines}.
MODULES_OVER: dict[str, int] = {}
FUNCTIONS_OVER: dict[str, int] = {}


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    modules, functions = {}, {}
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 40, f"{PACKAGE}: {len(paths)} modules found; is the layout walked?"
    for path in paths:
        source = path.read_text()
        name = path.relative_to(PACKAGE).as_posix()  # "train/recipe.py"
        modules[name] = len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{name}:{node.name}"
                lines = node.end_lineno - node.lineno + 1
                functions[key] = max(lines, functions.get(key, 0))
    return modules, functions


def _check(sizes: dict[str, int], limit: int, over: dict[str, int], what: str) -> list[str]:
    problems = []
    for name, lines in sorted(sizes.items()):
        ceiling = over.get(name, limit)
        if lines > ceiling:
            allowed = f"its ceiling {ceiling}" if name in over else f"the limit {limit}"
            problems.append(f"{what} {name}: {lines} lines, over {allowed}")
    for name in sorted(over):
        if sizes.get(name, 0) <= limit:
            problems.append(f"{what} {name} is within {limit} lines now: remove it from the list")
    return problems


def test_modules_and_functions_stay_small():
    modules, functions = _sizes()
    problems = _check(modules, MODULE_LINES, MODULES_OVER, "module")
    problems += _check(functions, FUNCTION_LINES, FUNCTIONS_OVER, "function")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "sizes,over,expected",
    [
        ({"a.py": 701}, {}, "over the limit 700"),
        ({"a.py": 750}, {"a.py": 720}, "over its ceiling 720"),
        ({"a.py": 600}, {"a.py": 720}, "remove it from the list"),
    ],
)
def test_the_check_reports_growth_and_stale_entries(sizes, over, expected):
    (problem,) = _check(sizes, MODULE_LINES, over, "module")
    assert expected in problem
