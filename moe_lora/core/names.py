"""Expert names: a safe character set, so that a name is always a valid single folder name.

An expert name is 1 to :data:`MAX_NAME_LENGTH` characters from ``A-Z a-z 0-9 - _ .``, and not
``.`` or ``..``. :class:`~moe_lora.core.bank.ExpertBank` refuses other names, so a bank's experts
can be saved one folder each (:class:`~moe_lora.memory.AdapterStore`) on any file system.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["MAX_NAME_LENGTH", "check_expert_name", "child_path"]

MAX_NAME_LENGTH = 128
_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_LENGTH}}}")


def check_expert_name(name: object) -> str:
    """Return ``name`` if it is a valid expert name (see the module docstring).

    Raises:
        ValueError: not a string, empty, too long, ``.``/``..``, or another character (names it).
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in (".", ".."):
        raise ValueError(
            f"invalid expert name {name!r}: use 1 to {MAX_NAME_LENGTH} characters from "
            "A-Z a-z 0-9 '-' '_' '.', and not '.' or '..'"
        )
    return name


def child_path(folder: Path, name: str) -> Path:
    """``folder / name`` for a valid expert ``name``, checked to stay inside ``folder``.

    Raises:
        ValueError: ``name`` is not a valid expert name, or the path resolves outside ``folder``
            (``folder`` / ``name`` is a link pointing elsewhere).
    """
    path = folder / check_expert_name(name)
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{path}: resolves outside {folder}")
    return path
