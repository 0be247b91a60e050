"""The package's layout rules, read from the source (no imports executed):

  programs on top   a program is a module with an `if __name__ == "__main__":` block (train,
                    evaluate, explain, export, ...); no module of the package imports one, so
                    the library below never climbs back up into a CLI;
  no cycles         the module-level import graph of nla_jax is acyclic;
  imports at top    inside functions only optional dependencies are imported (within a `try`
                    that handles ImportError), so what a module needs is what its header says;
  errors.py         depends on nothing in the package (every module may import it).
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "nla_jax")


def _modules() -> dict[str, str]:
    """{dotted module name: path} for every .py file of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read(), path) for name, path in MODULES.items()}


def _is_program(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return True
    return False


PROGRAMS = {name for name, tree in TREES.items() if _is_program(tree)}


def _resolve(name: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The package modules an import statement in module `name` loads (a `from pkg import mod`
    counts as importing pkg.mod when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        parts = name.split(".")
        is_pkg = MODULES[name].endswith("__init__.py")
        parts = parts[:len(parts) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parts + ([node.module] if node.module else []))
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
            out.append(sub)
        elif base in MODULES:
            out.append(base)
    return out


def _top_imports(name: str) -> set[str]:
    """Package modules imported by module `name` at import time (module level, including inside
    module-level if/try blocks, excluding function and class bodies)."""
    found: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(_resolve(name, node))
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(TREES[name].body)
    found.discard(name)
    return found


GRAPH = {name: _top_imports(name) for name in MODULES}


def test_programs_are_found():
    # the test means something only if it sees the programs it protects
    assert {"nla_jax.train", "nla_jax.evaluate", "nla_jax.explain", "nla_jax.export", "nla_jax.extract",
            "nla_jax.aot"} <= PROGRAMS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_program(name):
    tree = TREES[name]
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bad += [m for m in _resolve(name, node) if m in PROGRAMS and m != name]
    assert not bad, f"{name} imports the program(s) {sorted(set(bad))}: move what it needs into the library"


def test_import_graph_is_acyclic():
    state: dict[str, int] = {}          # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def _optional_import(func: ast.AST, node: ast.AST) -> bool:
    """Whether `node` sits in a try block of `func` that handles ImportError (an optional dependency)."""
    for t in ast.walk(func):
        if isinstance(t, ast.Try) and any(node is n for s in t.body for n in ast.walk(s)):
            for h in t.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if any(isinstance(x, ast.Name) and x.id in ("ImportError", "ModuleNotFoundError") for x in names):
                    return True
    return False


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_at_module_top(name):
    tree = TREES[name]
    bad = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _optional_import(func, node):
                    bad.append(f"{MODULES[name]}:{node.lineno}")
    assert not bad, f"imports inside functions (move them to the top): {', '.join(bad)}"


def test_errors_depends_on_nothing():
    assert GRAPH["nla_jax.errors"] == set(), GRAPH["nla_jax.errors"]


def test_the_checks_catch_what_they_guard(tmp_path):
    """The cycle finder and the program detector on made-up sources (they would pass vacuously
    if they never fired)."""
    prog = ast.parse('import sys\nif __name__ == "__main__":\n    sys.exit(0)\n')
    lib = ast.parse("def f():\n    return 1\n")
    assert _is_program(prog) and not _is_program(lib)
    saved = dict(GRAPH)
    try:
        GRAPH.clear()
        GRAPH.update({"a": {"b"}, "b": {"c"}, "c": {"a"}})
        with pytest.raises(AssertionError, match="a -> b -> c -> a"):
            test_import_graph_is_acyclic()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
