"""Atomic multi-file commits (interim version; the storage work replaces it with locking).

``folder/vNNNNNN/`` holds versions, ``folder/CURRENT`` names the committed one and its manifest
digest; ``manifest.json`` inside a version lists every file's SHA-256.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_lora.core.io import CorruptFileError, atomic_write_json, read_json, sha256_file

__all__ = ["is_committed", "read_version", "write_version"]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def write_version(folder: str | Path, write: Callable[[Path], None], *,
                  timeout: float = 60.0) -> Path:
    """Write a new version with ``write(tmp)`` and switch ``CURRENT`` to it atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = max((int(p.name[1:]) for p in folder.glob("v[0-9]*") if p.name[1:].isdigit()), default=0)
    final = folder / f"v{n + 1:06d}"
    tmp = folder / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    atomic_write_json(tmp / "manifest.json", {"files": _files(tmp)})
    os.replace(tmp, final)
    atomic_write_json(folder / "CURRENT", {"version": final.name,
                                           "manifest_sha256": sha256_file(final / "manifest.json")})
    for old in folder.iterdir():
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def is_committed(folder: str | Path) -> bool:
    """Whether ``folder`` has a committed version."""
    return (Path(folder) / "CURRENT").is_file()


@contextmanager
def read_version(folder: str | Path, *, timeout: float = 60.0) -> Iterator[Path]:
    """The committed version's folder, every file checked against its manifest."""
    folder = Path(folder)
    if not is_committed(folder):
        raise FileNotFoundError(f"{folder}: nothing committed (no CURRENT)")
    current = read_json(folder / "CURRENT")
    where = folder / current["version"]
    if sha256_file(where / "manifest.json") != current["manifest_sha256"]:
        raise CorruptFileError(f"{where / 'manifest.json'}: checksum mismatch")
    if _files(where) != read_json(where / "manifest.json")["files"]:
        raise CorruptFileError(f"{where}: files differ from its manifest")
    yield where
