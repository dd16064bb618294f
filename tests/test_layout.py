"""The house's rules, read from the source: no import circle, each layer imports only below it,
a small top level, no file too long to read, and a file map that matches the tree.

Imports are read with ``ast`` from every module under ``src/parablock`` (those inside functions
too: a lazy import still ties two files together)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "parablock"
MAX_LINES = 500
MAX_TOP_MODULES = 4
# what a layer must never import: the core knows neither the config nor a transport
FORBIDDEN = {
    "core": ("config", "transport", "run", "backends", "flower", "tools", "cli", "evaluation"),
    "wire": ("core", "config", "transport", "run", "backends", "flower", "tools", "cli"),
    "model": ("core", "wire", "config", "transport", "run", "backends", "flower", "tools", "cli"),
    "data": ("core", "wire", "model", "config", "transport", "run", "backends", "flower", "cli"),
    "transport": ("config", "run", "backends", "flower", "tools", "cli"),
    "backends": ("config", "run", "cli", "tools", "flower"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ("parablock", *path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted import name lands in (the longest module prefix)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in modules:
            return head
    return None


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if not name.startswith("parablock"):
                    continue
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    found.add(target)
        graph[mod] = found
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _circles(imports()) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(layer):
    bad = []
    for mod, targets in imports().items():
        if not mod.startswith(f"parablock.{layer}"):
            continue
        for t in sorted(targets):
            top = t.split(".")[1] if "." in t else ""
            if top in FORBIDDEN[layer]:
                bad.append(f"{mod} -> {t}")
    assert bad == []


def test_the_top_level_is_small_and_no_file_is_too_long():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    long = {
        str(p.relative_to(PKG)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_file_map_names_every_folder_and_top_level_module():
    """docs/how-it-works.md's file map and ``ls src/parablock`` tell the same story."""
    text = (ROOT / "docs" / "how-it-works.md").read_text()
    section = text[text.index("## The code") :]
    named = set(re.findall(r"`([a-z_]+(?:/|\.py))`", section))
    present = {p.name + "/" for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    present |= {p.name for p in PKG.glob("*.py")}
    assert present <= named, sorted(present - named)
    for folder in (p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"):
        files = {p.name for p in folder.glob("*.py")} - {"__init__.py", "__main__.py"}
        missing = sorted(f for f in files if f"`{f}`" not in section)
        assert missing == [], (folder.name, missing)


def test_the_readme_names_every_folder_and_top_level_module():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The code") :]
    section = section[: section.index("\n## ", 1)]
    named = set(re.findall(r"`([a-z_]+(?:/|\.py))`", section))
    present = {p.name + "/" for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    present |= {p.name for p in PKG.glob("*.py")} - {"__init__.py"}
    assert present <= named, sorted(present - named)


def test_the_core_neither_configures_nor_transports():
    """The issue's own wording, checked on its own: core -> config and core -> transport."""
    for mod, targets in imports().items():
        if mod.startswith("parablock.core"):
            assert not any(
                t.startswith(("parablock.config", "parablock.transport")) for t in targets
            )
