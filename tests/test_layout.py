"""The package tree is the architecture: layers import downwards only, no cycles,
no facades (tests/test_code_size.py holds the sizes).

Everything here reads the source with ``ast``: no module is imported, so a
layer rule fails with the file, line and import that breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chexlib"

# layer -> the layers it may import (itself always). Lower layers first.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "cluster": {"core"},  # the local cluster emulation: system tools only
    "data": {"core"},
    "report": {"core", "data", "records"},  # records: its manifest only (TENSORFLOW_FREE_MODULES)
    "study": {"core", "report"},
    "synth": {"core", "data"},
    "records": {"core", "data"},
    "pipeline": {"core", "data", "records"},
    "train": {"core", "data", "records", "pipeline", "report"},
    "explain": {"core", "data", "records", "pipeline", "train", "report"},
    "launch": {"core", "cluster", "data", "train", "report"},  # cluster: re-shaping links
    "bench": {"core", "data", "synth", "records", "pipeline", "train", "report"},
    "walkthrough": {
        "core", "data", "synth", "records", "pipeline", "train", "explain", "launch", "bench", "report",
    },
    "cli": {
        "core", "data", "synth", "records", "pipeline", "train", "explain", "launch", "bench",
        "report", "study",
    },
}  # fmt: skip
# Layers that run where TensorFlow is not installed (the summary, the study runner).
TENSORFLOW_FREE = {"core", "data", "synth", "report", "study", "cluster"}
# Modules of other layers that these may import: they never import TensorFlow either.
TENSORFLOW_FREE_MODULES = {"chexlib.records.manifest"}
HEAVY = ("tensorflow", "horovod", "keras")


def modules() -> dict[str, Path]:
    """``chexlib.layer.module`` -> its file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy_lines = {
        node.lineno
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            mod = node.module
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found += [(node.lineno, name, node.lineno in lazy_lines) for name in names]
    return found


MODULES = modules()


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "chexlib" else None


def test_every_module_lives_in_a_known_layer():
    loose = [m for m in MODULES if m != "chexlib" and layer(m) not in ALLOWED]
    assert not loose, f"modules outside a layer subpackage (add to ALLOWED or move): {loose}"
    for name in ALLOWED:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "Imports:" in doc, f"{init}: its docstring must say what it may import"


def test_layers_import_downwards_only():
    wrong = []
    for module, path in MODULES.items():
        own = layer(module)
        for line, target, _ in imports(path):
            other = layer(target)
            if own and other and other != own and other not in ALLOWED[own]:
                wrong.append(f"{_where(path)}:{line}: {own} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_tensorflow_free_layers_never_import_tensorflow():
    """Not even inside a function, and only through modules that are TensorFlow-free too."""
    wrong = []
    for module, path in MODULES.items():
        if layer(module) in TENSORFLOW_FREE or module in TENSORFLOW_FREE_MODULES:
            for line, target, _ in imports(path):
                tf_side = target.split(".")[0] in HEAVY or (
                    layer(target) not in (None, *TENSORFLOW_FREE)
                    and target not in TENSORFLOW_FREE_MODULES
                )
                if tf_side:
                    wrong.append(f"{_where(path)}:{line}: imports {target}")
    assert not wrong, "\n".join(wrong)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one path per back edge)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {t for _, t, _ in imports(path) if t in MODULES and t != module}
        graph[module] -= {
            m for m in graph[module] if m == "chexlib" or MODULES[m].name == "__init__.py"
        }
    return graph


def test_no_import_cycle_even_through_imports_inside_functions():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_an_import_inside_a_function_says_why():
    """A chexlib import inside a function is there for a reason (it would load
    TensorFlow, or close a cycle): a comment on it or just above says which."""
    silent = []
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for line, target, inside in imports(path):
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if inside and target.startswith("chexlib") and not said:
                silent.append(f"{_where(path)}:{line}: {lines[line - 1].strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(silent)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_facades_no_reexports_no_module_getattr():
    wrong = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        where = _where(path)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                wrong.append(f"{where}:{node.lineno}: module __getattr__")
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                wrong.append(
                    f"{where}:{node.lineno}: __all__ (names are imported from their owner)"
                )
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chexlib"):
                wrong += [
                    f"{where}:{node.lineno}: re-export {a.name} as {a.asname}"
                    for a in node.names
                    if a.asname == a.name
                ]
        if path.name == "__init__.py" and module != "chexlib":
            code = [n for n in tree.body if not isinstance(n, ast.Expr)]
            if code:
                wrong.append(f"{where}: a layer's __init__ holds only its docstring")
    assert not wrong, "\n".join(wrong)


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-export by the back door: ``from chexlib.a import X`` only when ``a`` defines X."""
    wrong = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in MODULES:
                owner = MODULES[node.module]
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full not in MODULES and alias.name not in defined_names(owner):
                        wrong.append(
                            f"{_where(path)}:{node.lineno}: {alias.name} from {node.module}"
                        )
    assert not wrong, "names imported from a module that does not define them:\n" + "\n".join(wrong)


def _where(path: Path) -> str:
    return (
        str(path.relative_to(PACKAGE.parent)) if path.is_relative_to(PACKAGE.parent) else str(path)
    )


@pytest.mark.parametrize("rule", ["layers", "cycle"])
def test_the_rules_fail_on_a_planted_violation(rule, tmp_path, monkeypatch):
    """The checks above can fail: plant a wrong import and see them catch it."""
    report = next(m for m in MODULES if m.startswith("chexlib.report."))
    bad = tmp_path / "bad.py"
    if rule == "layers":
        bad.write_text("from chexlib.train import recipe\n")
        monkeypatch.setitem(MODULES, report, bad)
        with pytest.raises(AssertionError, match="imports against the layer order"):
            test_layers_import_downwards_only()
    else:
        a, b = "chexlib.core.files", "chexlib.core.runs"
        (tmp_path / "a.py").write_text(f"import {b}\n")
        (tmp_path / "b.py").write_text(f"def f():\n    import {a}\n")
        monkeypatch.setitem(MODULES, a, tmp_path / "a.py")
        monkeypatch.setitem(MODULES, b, tmp_path / "b.py")
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycle_even_through_imports_inside_functions()


def test_every_module_is_tracked_by_git():
    """A module an ignore rule hides works here and is missing from a fresh clone."""
    import shutil
    import subprocess

    top = PACKAGE.parent
    if not (top / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(
        ["git", "check-ignore", *map(str, MODULES.values())],
        cwd=top, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert not ignored.stdout.strip(), "modules an ignore rule hides:\n" + ignored.stdout
