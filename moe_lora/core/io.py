"""Safe file I/O shared by every component: atomic writes, checksums, strict JSON and safetensors.

Nothing in moe-lora unpickles a file. Tensors go to safetensors, everything else to JSON, and every
write goes to a temporary file in the same folder that is fsynced and then renamed over the target,
so an interrupted save leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

__all__ = [
    "CorruptFileError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_tensors",
    "read_json",
    "load_tensors",
    "sha256_bytes",
    "sha256_file",
]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""The process umask at import: files written here get mode ``0o666 & ~UMASK``."""


class CorruptFileError(RuntimeError):
    """A file exists but cannot be trusted: truncated, unparsable or failing its checksum."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    Use it for writers that insist on a file name (``faiss.write_index``, ``savefig``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; outputs honour the umask
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing file raises FileNotFoundError, a broken one CorruptFileError."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{p}: not valid JSON ({err})") from err


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's contents, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """Save ``tensors`` as safetensors atomically and return the file's SHA-256.

    Tensors are made contiguous and moved to CPU first.
    """
    data = st_save_bytes(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata
    )
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_tensors(
    path: str | os.PathLike[str], expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its SHA-256 when ``expected_sha256`` is given.

    Raises:
        FileNotFoundError: the file does not exist.
        CorruptFileError: the checksum differs or the file is not valid safetensors.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    data = p.read_bytes()
    if expected_sha256 is not None and sha256_bytes(data) != expected_sha256:
        raise CorruptFileError(
            f"{p}: checksum mismatch (expected sha256 {expected_sha256[:12]}..., "
            f"got {sha256_bytes(data)[:12]}...); the file is truncated or was modified"
        )
    try:
        return st_load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CorruptFileError(f"{p}: not a valid safetensors file ({err})") from err
