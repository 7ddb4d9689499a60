"""Choosing which modules of a base model carry LoRA experts.

``targets`` is one of:

* ``"auto"``: per-architecture defaults (BERT ``query``/``value``, Llama/Mistral/Qwen
  ``q_proj``/``v_proj``, GPT-2 ``c_attn``, else ``all-linear``);
* ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except output heads (``lm_head``,
  ``classifier``, ``score``);
* a list of names: a module is chosen when its dotted path equals a name or ends with
  ``"." + name`` (``["query", "value"]`` or full paths);
* any other string: a regular expression matched (``re.fullmatch``) against dotted paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from moe_lora.core.layers import is_supported

__all__ = ["resolve_targets", "default_target_names", "HEAD_NAMES"]

HEAD_NAMES = ("lm_head", "classifier", "score", "cls")

_DEFAULTS: tuple[tuple[tuple[str, ...], list[str]], ...] = (
    (("query", "value"), ["query", "value"]),
    (("q_proj", "v_proj"), ["q_proj", "v_proj"]),
    (("c_attn",), ["c_attn"]),
    (("q", "v"), ["q", "v"]),
)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _supported_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_supported(m)]


def default_target_names(model: nn.Module) -> list[str] | str:
    """The per-architecture default targets of ``model`` (``"all-linear"`` when none match)."""
    leaves = {_leaf(p) for p in _supported_paths(model)}
    for needed, names in _DEFAULTS:
        if all(n in leaves for n in needed):
            return names
    return "all-linear"


def resolve_targets(model: nn.Module, targets: str | Sequence[str] = "auto") -> list[str]:
    """Dotted paths of the modules of ``model`` selected by ``targets`` (see the module docstring).

    Raises:
        ValueError: a name or pattern matches no module, or matches an unsupported module type;
            the message lists the available Linear/Conv1D module names.
    """
    paths = _supported_paths(model)
    if isinstance(targets, str) and targets == "auto":
        targets = default_target_names(model)
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [p for p in paths if not any(part in HEAD_NAMES for part in p.split("."))]
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [p for p in paths if pattern.fullmatch(p)]
        if not chosen:
            raise ValueError(_missing(f"target pattern {targets!r}", paths))
    else:
        chosen = _by_names(model, list(targets), paths)
    if not chosen:
        raise ValueError(_missing(f"targets {targets!r}", paths))
    return chosen


def _by_names(model: nn.Module, names: list[str], paths: list[str]) -> list[str]:
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for name in names:
        hits = [p for p in modules if p and (p == name or p.endswith("." + name))]
        if not hits:
            raise ValueError(_missing(f"target {name!r}", paths))
        bad = [p for p in hits if not is_supported(modules[p])]
        if bad:
            kinds = sorted({type(modules[p]).__name__ for p in bad})
            raise ValueError(
                f"target {name!r} matches {bad[0]!r} of type {kinds}; LoRA wraps nn.Linear and "
                f"Conv1D only. Available: {_names_summary(paths)}"
            )
        chosen.extend(p for p in hits if p not in chosen)
    return [p for p in paths if p in chosen]


def _names_summary(paths: list[str]) -> str:
    leaves = sorted({_leaf(p) for p in paths})
    return f"module names {leaves} (e.g. {paths[:3]})"


def _missing(what: str, paths: list[str]) -> str:
    return f"{what} matches no Linear/Conv1D module of the model; available {_names_summary(paths)}"
