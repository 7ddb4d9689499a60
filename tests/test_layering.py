"""The package's import graph: no cycles, and every arrow points down the layers.

Every ``import`` statement counts, also those inside functions and ``if TYPE_CHECKING:`` blocks.
Package ``__init__`` facades that only re-export are the one exception for the ``moe_lora``
top-level package (it re-exports the core and registers the built-in routers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"moe_lora": ROOT / "moe_lora", "moe_lora.routers": ROOT / "routers",
           "moe_lora.memory": ROOT / "memory"}

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "data": set(),
    "models": {"core"},
    "routers": {"core", "memory"},
    "memory": {"core"},
    "interop": {"core"},
    "continual": {"core", "data", "models", "routers", "memory", "interop"},
    "serving": {"core", "data", "models", "routers", "memory", "interop", "continual"},
    "cli": {"core", "data", "models", "routers", "memory", "interop", "continual", "serving"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for file in folder.rglob("*.py"):
            rel = file.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = file
    return out


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    """Modules of this package that ``file`` imports (resolved to known module names)."""
    found = set()
    is_pkg = file.name == "__init__.py"
    for node in ast.walk(ast.parse(file.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] in (["moe_lora", "routers"], ["moe_lora", "memory"]):
        return parts[1]
    if len(parts) == 1:
        return "facade"
    return parts[1] if parts[1] in ALLOWED else parts[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, f, set(mods)) for m, f in mods.items()}


def test_every_module_has_a_known_layer(graph: dict[str, set[str]]) -> None:
    unknown = sorted(m for m in graph if _layer(m) not in ALLOWED and _layer(m) != "facade")
    assert not unknown, f"modules outside the layer map {sorted(ALLOWED)}: {unknown}"


def test_arrows_point_down(graph: dict[str, set[str]]) -> None:
    bad = []
    for mod, deps in graph.items():
        src = _layer(mod)
        if src == "facade":
            continue
        for dep in deps:
            dst = _layer(dep)
            if dst == "facade" or (dst != src and dst not in ALLOWED[src]):
                bad.append(f"{mod} ({src}) -> {dep} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_core_names_no_concrete_router(graph: dict[str, set[str]]) -> None:
    core = [m for m in graph if _layer(m) == "core"]
    assert core, "no core modules found"
    for mod in core:
        text = _modules()[mod].read_text()
        assert "moe_lora.routers" not in text.replace("``moe_lora.routers``", "").replace(
            ":mod:`moe_lora.routers`", ""), mod


def test_no_cycles(graph: dict[str, set[str]]) -> None:
    # package __init__ files are followed like modules, except the top-level facade
    edges = {m: {d for d in deps if d != "moe_lora"} for m, deps in graph.items()
             if m != "moe_lora"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_check_finds_a_cycle(tmp_path: Path) -> None:
    """The parser sees function-level imports (so a hidden cycle cannot pass)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from moe_lora.core.bank import ExpertBank\n")
    assert _imports("moe_lora.core.layers", f, {"moe_lora.core.bank", "moe_lora.core.layers"}) \
        == {"moe_lora.core.bank"}
