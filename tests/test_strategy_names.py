"""No code outside the registry decides anything by a strategy's name: no ``== "joint"``,
``in ("naive", ...)``, ``family ==``, ``.startswith("experts")`` anywhere in moe_lora/.

A strategy is a registered class; the runner, checkpoints, results and CLI ask the registry
(:mod:`moe_lora.continual.registry`) what a strategy is, so adding one needs no edit elsewhere.
The only places that may spell a strategy's name are the registry and each strategy's own
``@register_strategy(...)`` line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import moe_lora.continual  # noqa: F401  (registers the built-in strategies)
from moe_lora.continual import registry

PACKAGE = Path(__file__).resolve().parents[1] / "moe_lora"
WHITELISTED_FILES = {PACKAGE / "continual" / "registry.py"}
BUILT_IN = {"joint", "naive", "replay", "olora", "experts", "experts-taskid", "experts-retrieval",
            "experts-confidence", "experts-mole"}
NAMES = BUILT_IN | {s.name for s in registry.specs()} | set(registry.result_names())
FORMER = {"family", "families"}  # the engine's old word for a strategy that trains once


def _name_literal(node: ast.AST) -> str | None:
    """The strategy name ``node`` spells: a string literal, or a literal collection holding one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
        if text in NAMES or text.rstrip("-_/") in NAMES:
            return text
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        for item in node.elts:
            if (found := _name_literal(item)) is not None:
                return found
    return None


def _identifier(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def name_comparisons(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every comparison of something with a strategy name in ``source``."""
    hits: list[tuple[int, str]] = []
    register_lines: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):  # the strategies' own register_strategy(...) calls
        if isinstance(node, ast.Call) and _identifier(node.func) == "register_strategy":
            register_lines |= set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in register_lines:
            continue
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, (a, b) in zip(node.ops, zip(operands, operands[1:], strict=False), strict=True):
                if isinstance(op, ast.Eq | ast.NotEq | ast.Is | ast.IsNot):
                    name = _name_literal(a) or _name_literal(b)
                    if name is not None:
                        hits.append((node.lineno, f"compares with {name!r}"))
                elif isinstance(op, ast.In | ast.NotIn):
                    name = _name_literal(b) if not isinstance(b, ast.Constant) else None
                    if name is not None:
                        hits.append((node.lineno, f"membership in a literal holding {name!r}"))
                    elif isinstance(a, ast.Constant) and _name_literal(a) is not None and \
                            (_identifier(b) or "").lower().startswith(("strateg", "famil", "run")):
                        hits.append((node.lineno, f"{a.value!r} in {_identifier(b)}"))
                for side in (a, b):
                    if (_identifier(side) or "") in FORMER:
                        hits.append((node.lineno, f"compares {_identifier(side)}"))
        elif isinstance(node, ast.Call) and _identifier(node.func) in ("startswith", "endswith"):
            for arg in node.args:
                if (name := _name_literal(arg)) is not None:
                    hits.append((node.lineno, f".{_identifier(node.func)}({name!r})"))
        elif isinstance(node, ast.Match):
            for case in node.cases:
                for sub in ast.walk(case.pattern):
                    if isinstance(sub, ast.MatchValue) and _name_literal(sub.value) is not None:
                        hits.append((sub.lineno, f"case {_name_literal(sub.value)!r}"))
    return sorted(set(hits))


def test_the_checker_finds_name_comparisons():
    bad = '''
if family == "joint":
    pass
if spec.name != 'experts':
    pass
x = strategy in ("naive", "replay")
y = name.startswith("experts-")
z = [r for r in results if "olora" == r]
if "joint" in strategies.run:
    pass
match name:
    case "replay":
        pass
'''
    lines = {line for line, _ in name_comparisons(bad)}
    assert lines == {2, 4, 6, 7, 8, 9, 12}, name_comparisons(bad)
    fine = '''
@register_strategy("replay", options=ReplayOptions)
class Replay: ...
if mode == "single" or self.benchmark == "file":
    tag = f"experts/task{task + 1}"
names = {r: r.removeprefix("experts-") for r in results}
'''
    assert name_comparisons(fine) == []


def test_no_strategy_name_comparisons_outside_the_registry():
    files = sorted(p for p in PACKAGE.rglob("*.py") if p not in WHITELISTED_FILES)
    assert len(files) > 30
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
             for path in files for line, what in name_comparisons(path.read_text())]
    assert not found, "strategy names compared outside the registry:\n" + "\n".join(found)
