"""Helpers for tests of committed artefact folders (moe_lora.core.commit)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from moe_lora.core.commit import write_version


def version_dir(folder: Path) -> Path:
    """The version folder ``CURRENT`` names."""
    return folder / (folder / "CURRENT").read_text().split()[0]


def artefact_files(folder: Path) -> list[Path]:
    """Every file with content in an artefact folder: ``CURRENT`` and the committed version's."""
    version = version_dir(folder)
    return [folder / "CURRENT"] + sorted(p for p in version.rglob("*")
                                         if p.is_file() and p.stat().st_size)


def recommit(folder: Path, edit: Callable[[Path], None]) -> None:
    """Commit a copy of the current version changed by ``edit(tmp)``: a consistent, checksummed
    version whose files disagree with each other (what a buggy writer would leave)."""
    source = version_dir(folder)

    def write(tmp: Path) -> None:
        for path in source.iterdir():
            if path.name not in ("MANIFEST.json", ".pin"):
                copy = shutil.copytree if path.is_dir() else shutil.copy2
                copy(path, tmp / path.name)
        edit(tmp)

    write_version(folder, write)


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite JSON file ``path`` with ``edit`` applied to its object."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
