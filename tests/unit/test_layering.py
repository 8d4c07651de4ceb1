"""The house's layering (DESIGN §1): pages → ttt_core → kernels, no import circles, small modules.

Read from the source with `ast` (module-level and function-level imports alike), so a lazy import
cannot hide an arrow that runs back up. What this catches: ttt_core importing streamlit or pages
(session state leaking into the core), kernels importing ttt_core, a cycle between two core
modules, or a module that grows past the size a reader can hold in mind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


CORE = _modules("ttt_core")
KERNELS = _modules("kernels")


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_never_imports_ui(name):
    bad = {m for m in _imports(CORE[name], name) if m.split(".")[0] in ("streamlit", "pages", "app")}
    assert not bad, f"{name} imports {sorted(bad)}: ttt_core must not know about the UI"


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_never_import_core(name):
    bad = {m for m in _imports(KERNELS[name], name) if m.split(".")[0] in ("ttt_core", "pages", "streamlit")}
    assert not bad, f"{name} imports {sorted(bad)}: kernels sit below ttt_core"


def _core_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in CORE.items():
        deps = set()
        for m in _imports(path, name):
            while m and m not in CORE:
                m = m.rsplit(".", 1)[0] if "." in m else ""
            if m and m != name and not name.startswith(m + ".") and m != "ttt_core":
                deps.add(m)
        graph[name] = deps
    return graph


def test_no_import_circles_in_the_core():
    graph = _core_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycle = stack[stack.index(v):] + [v]
                pytest.fail("import circle: " + " → ".join(cycle))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_modules_stay_small():
    long = {name: n for name, p in CORE.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
