# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""The package's shape: no import cycle, no import up a layer, small functions and modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medcbm"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (lazy imports inside functions included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + [node.module]) if node.module else ".".join(base)
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            # a package importing its own submodules (re-exports) is not a dependency of the submodules
            graph[m] |= {t for t in names if t in mods and t != m and not t.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_no_import_runs_up_a_layer():
    """Runners sit on top: nothing outside ``workflows`` imports them; research-data adapters never import the
    trainer; the core never imports the audit job or the research data."""
    up = []
    for m, targets in _import_graph().items():
        for t in targets:
            if t.startswith("medcbm.workflows") and not m.startswith("medcbm.workflows"):
                up.append((m, t))
            if m.startswith("medcbm.datasets") and t == "medcbm.pretrain":
                up.append((m, t))
            if m in ("medcbm.bundle", "medcbm.engine", "medcbm.networks") and t.startswith(
                ("medcbm.audit", "medcbm.datasets")
            ):
                up.append((m, t))
    assert up == []


def test_functions_and_modules_are_small():
    long_functions, long_modules = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", n))
    assert long_functions == [] and long_modules == []
