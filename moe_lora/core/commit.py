"""One commit protocol for every multi-file artefact: versioned folders, one pointer, locks, checksums.

An artefact (an expert bank, an expert index, a replay buffer, a store catalogue, a checkpoint) is a
folder that only this module writes to::

    folder/
      CURRENT                  b"v000007 <sha256 of v000007/MANIFEST.json>\\n" (the commit pointer)
      .lock                    the writers' lock file (exclusive ``flock``); never removed
      v000007/                 the committed version; never modified once committed
        MANIFEST.json          {"format": "moe-lora-commit/1",
                                "files": {"<relative posix path>": {"sha256": ..., "size": ...}}}
        .pin                   readers hold a shared ``flock`` on it while they use the version
        ...                    the artefact's own files, in any sub-folders
      .tmp-v000008-<pid>-<hex>/    a version being written (a writer's, or a dead writer's)

Writing (:func:`write_version`, :func:`update_version`) holds the exclusive lock throughout:

1. remove every ``.tmp-*`` entry (their writers are dead: a live one would hold the lock) and every
   old version that no reader pins;
2. let the caller fill a fresh ``.tmp-*`` folder, list every file with its SHA-256 and size in
   ``MANIFEST.json``, fsync every file and folder;
3. rename the folder to the next version number and fsync ``folder``;
4. write ``CURRENT`` to a temp file, fsync it, ``os.replace`` it over the old one and fsync
   ``folder``: this rename is the commit point;
5. remove the old versions that no reader pins.

A crash before step 4 leaves ``CURRENT`` naming the previous version (the new folder is garbage and
goes at the next write or open); after it, the new version is complete on disk. Readers
(:func:`read_version`) read ``CURRENT``, pin the version it names with a shared lock (garbage
collection takes a non-blocking exclusive lock on ``.pin`` and skips pinned versions), then check
``MANIFEST.json`` against the digest in ``CURRENT`` and every file against ``MANIFEST.json``. So a
reader sees the old or the new version, never a mix, and every byte it loads is checksummed.

Names ``.lock`` and ``.pin`` are reserved at any depth (so an artefact may hold another one, as a
checkpoint holds a bank); ``MANIFEST.json`` is reserved at the top of a version. Symbolic links are
refused. Locks are POSIX ``flock`` through ``portalocker``; they are advisory and work between
processes and between threads (each lock is taken on its own open file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import portalocker

from moe_lora.core.io import CorruptFileError, sha256_bytes, sha256_file

__all__ = [
    "LockTimeoutError",
    "is_committed",
    "locked",
    "read_version",
    "update_version",
    "write_version",
]

FORMAT = "moe-lora-commit/1"
POINTER, LOCK, PIN, MANIFEST, TMP = "CURRENT", ".lock", ".pin", "MANIFEST.json", ".tmp-"
_RESERVED = (LOCK, PIN)
_VERSION = re.compile(r"v(\d{6,})")
_POINTER = re.compile(rb"(v\d{6,}) ([0-9a-f]{64})\n")
_POLL = 0.01


class LockTimeoutError(TimeoutError):
    """A lock on an artefact folder was not obtained within the timeout (names the folder)."""


# ------------------------------------------------------------------ locks
def _flock(fh: IO[Any], flags: portalocker.LockFlags, timeout: float, what: str) -> None:
    """Lock ``fh`` with ``flags`` (shared or exclusive), waiting at most ``timeout`` seconds.

    Raises:
        LockTimeoutError: the lock stayed held by another open file; ``what`` says which.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            portalocker.lock(fh, flags | portalocker.LOCK_NB)
            return
        except portalocker.AlreadyLocked:
            if time.monotonic() >= deadline:
                raise LockTimeoutError(f"{what}; gave up after {timeout:g} s") from None
            time.sleep(_POLL)


def _try_flock(fh: IO[Any], flags: portalocker.LockFlags) -> bool:
    try:
        portalocker.lock(fh, flags | portalocker.LOCK_NB)
    except portalocker.AlreadyLocked:
        return False
    return True


@contextlib.contextmanager
def locked(folder: str | os.PathLike[str], *, timeout: float = 60.0) -> Iterator[None]:
    """Hold ``folder``'s exclusive writer lock (creates ``folder``); garbage of dead writers and
    unpinned old versions are removed first.

    For maintenance that must not race a writer, such as removing what a killed writer of a
    related folder left. Do not call :func:`write_version` on ``folder`` inside the block (it
    would wait for this very lock).

    Raises:
        LockTimeoutError: another writer held the lock for ``timeout`` seconds (0: do not wait).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "ab") as fh:
        _flock(fh, portalocker.LOCK_EX, timeout,
               f"{folder}: another writer holds the lock {folder / LOCK}")
        try:
            _collect_garbage(folder)
            yield
        finally:
            portalocker.unlock(fh)


# ------------------------------------------------------------------ files and fsync
def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root`` (reserved names left out), keyed by relative posix path.

    Raises:
        CorruptFileError: a symbolic link or special file (names it).
    """
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise CorruptFileError(f"{path}: not a regular file or folder (links are refused)")
            if stat.S_ISREG(mode) and name not in _RESERVED:
                out[path.relative_to(root).as_posix()] = path
    return out


def _check_relative(folder: Path, rel: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise CorruptFileError(f"{folder / MANIFEST}: path {rel!r} leaves the folder")


def _seal(tmp: Path) -> bytes:
    """Write ``MANIFEST.json`` and ``.pin`` into ``tmp``, fsync everything; return the manifest."""
    for reserved in (MANIFEST, PIN):
        if (tmp / reserved).exists():
            raise ValueError(f"{tmp}: an artefact may not write {reserved!r} at its top level")
    files = {}
    for rel, path in sorted(_list_files(tmp).items()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = (json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n").encode()
    for name, data in ((MANIFEST, manifest), (PIN, b"")):
        with open(tmp / name, "wb") as fh:
            fh.write(data)
            os.fsync(fh.fileno())
    for dirpath, _, _ in os.walk(tmp):
        _fsync_dir(Path(dirpath))
    return manifest


# ------------------------------------------------------------------ versions and garbage
def _version_number(name: str) -> int | None:
    m = _VERSION.fullmatch(name)
    return int(m.group(1)) if m else None


def _read_pointer(folder: Path) -> tuple[str, str] | None:
    """``(version name, manifest digest)`` from ``CURRENT``; None when there is none.

    Raises:
        CorruptFileError: ``CURRENT`` is not a valid pointer.
    """
    try:
        data = (folder / POINTER).read_bytes()
    except FileNotFoundError:
        return None
    m = _POINTER.fullmatch(data)
    if m is None:
        raise CorruptFileError(f"{folder / POINTER}: not a commit pointer ({data[:80]!r})")
    return m.group(1).decode(), m.group(2).decode()


def _remove(path: Path) -> None:
    """Delete ``path`` by renaming it to a ``.tmp-`` name first, so a crash leaves only garbage."""
    trash = path.parent / f"{TMP}gc-{path.name}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash) if trash.is_dir() else trash.unlink()


def _remove_unpinned(version: Path) -> None:
    try:
        fh = open(version / PIN, "rb")  # noqa: SIM115 - closed below, after the removal
    except FileNotFoundError:  # never sealed, or half removed: nobody can pin it
        _remove(version)
        return
    with fh:
        if _try_flock(fh, portalocker.LOCK_EX):
            _remove(version)
            portalocker.unlock(fh)


def _collect_garbage(folder: Path) -> None:
    """Remove temp entries, and every version but the committed one that no reader pins.

    Call with the writer lock held. Without ``CURRENT`` every version is garbage (a first commit
    killed before its pointer switch); with an unreadable ``CURRENT``, or one naming a missing
    version, versions stay: they may be all that is left of the data.
    """
    for entry in folder.iterdir():
        if entry.name.startswith(TMP):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    try:
        pointer = _read_pointer(folder)
    except CorruptFileError:
        return
    if pointer is not None and not (folder / pointer[0]).is_dir():
        return
    for entry in folder.iterdir():
        if _version_number(entry.name) is not None and (pointer is None or entry.name != pointer[0]):
            _remove_unpinned(entry)


def _next_version(folder: Path) -> str:
    numbers = [_version_number(p.name) for p in folder.iterdir()]
    return f"v{max([n for n in numbers if n is not None], default=0) + 1:06d}"


def _write_pointer(folder: Path, name: str, manifest: bytes) -> None:
    tmp = folder / f"{TMP}{POINTER}-{secrets.token_hex(4)}"
    with open(tmp, "wb") as fh:
        fh.write(f"{name} {sha256_bytes(manifest)}\n".encode())
        os.fsync(fh.fileno())
    os.replace(tmp, folder / POINTER)
    _fsync_dir(folder)


# ------------------------------------------------------------------ verification
def _verify(folder: Path, name: str, digest: str) -> None:
    """Check version ``name`` against ``digest`` and its manifest.

    Raises:
        CorruptFileError: names the file that is missing, extra, or fails its size or checksum.
    """
    version = folder / name
    data = (version / MANIFEST).read_bytes()
    if sha256_bytes(data) != digest:
        raise CorruptFileError(f"{version / MANIFEST}: checksum mismatch with {folder / POINTER}")
    files = _parse_manifest(version, data)
    found = _list_files(version)
    found.pop(MANIFEST, None)
    missing, extra = sorted(files.keys() - found.keys()), sorted(found.keys() - files.keys())
    if missing:
        raise CorruptFileError(f"{version / missing[0]}: listed in {MANIFEST} but missing")
    if extra:
        raise CorruptFileError(f"{version / extra[0]}: not listed in {MANIFEST} (extra file)")
    for rel, entry in sorted(files.items()):
        path = found[rel]
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise CorruptFileError(
                f"{path}: checksum mismatch with {MANIFEST}; the file is truncated or was modified"
            )


def _parse_manifest(version: Path, data: bytes) -> dict[str, dict[str, Any]]:
    try:
        manifest = json.loads(data)
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT!r}")
        files = {str(k): {"sha256": str(v["sha256"]), "size": int(v["size"])}
                 for k, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptFileError(f"{version / MANIFEST}: not a commit manifest ({err!r})") from err
    for rel in files:
        _check_relative(version, rel)
    return files


# ------------------------------------------------------------------ the public API
def is_committed(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a committed artefact (a ``CURRENT`` pointer); reads nothing else."""
    return (Path(folder) / POINTER).is_file()


def update_version(
    folder: str | os.PathLike[str],
    update: Callable[[Path | None, Path], None],
    *,
    timeout: float = 60.0,
) -> Path:
    """Read-modify-write: like :func:`write_version`, but ``update(current, tmp)`` also gets the
    committed version's folder (verified; None when nothing is committed yet), read under the same
    exclusive lock, so that concurrent updates never lose one another's changes.

    Raises:
        LockTimeoutError: another writer held the lock for ``timeout`` seconds.
        CorruptFileError: the committed version fails its checks (nothing is written).
        ValueError: ``update`` wrote a reserved name (``MANIFEST.json``, ``.pin``) at the top.
        Whatever ``update`` raises (the committed version is left as it was).
    """
    return _commit(Path(folder), update, timeout, read_current=True)


def _commit(
    folder: Path, fill: Callable[[Path | None, Path], None], timeout: float, read_current: bool
) -> Path:
    """Steps 1-5 of the module docstring, under the exclusive lock."""
    with locked(folder, timeout=timeout):
        current = None
        if read_current and (pointer := _read_pointer(folder)) is not None:
            _verify(folder, *pointer)
            current = folder / pointer[0]
        name = _next_version(folder)
        tmp = folder / f"{TMP}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            fill(current, tmp)
            manifest = _seal(tmp)
            os.rename(tmp, folder / name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        _fsync_dir(folder)
        _fsync_dir(folder.parent)
        _write_pointer(folder, name, manifest)
        _collect_garbage(folder)
    return folder / name


def write_version(
    folder: str | os.PathLike[str], write: Callable[[Path], None], *, timeout: float = 60.0
) -> Path:
    """Atomically replace the artefact at ``folder`` with what ``write(tmp)`` puts in ``tmp``.

    Takes the exclusive writer lock (waiting at most ``timeout`` seconds), calls ``write(tmp)`` to
    fill a fresh temp folder, records every file's SHA-256 and size in ``MANIFEST.json``, fsyncs
    files and folders, switches ``CURRENT`` with ``os.replace`` and garbage-collects old versions
    and dead writers' temp folders (see the module docstring for the layout).

    Returns:
        The new version's folder (``folder/vNNNNNN``); treat it as read-only.

    Raises:
        LockTimeoutError: another writer held the lock for ``timeout`` seconds.
        ValueError: ``write`` wrote a reserved name (``MANIFEST.json``, ``.pin``) at the top.
        CorruptFileError: ``write`` left a symbolic link or special file.
        Whatever ``write`` raises (the committed version is left as it was).
    """
    return _commit(Path(folder), lambda _current, tmp: write(tmp), timeout, read_current=False)


@contextlib.contextmanager
def read_version(folder: str | os.PathLike[str], *, timeout: float = 60.0) -> Iterator[Path]:
    """``with read_version(folder) as d:`` the committed version's folder, checked and pinned.

    Every file is checked against ``MANIFEST.json`` (checksum and size, nothing missing, nothing
    extra, no path outside the version) and ``MANIFEST.json`` against the digest in ``CURRENT``.
    While the block runs the version stays on disk: a concurrent writer commits a new one beside
    it, and garbage collection skips it. Dead writers' temp folders are removed first when no
    writer is active.

    Raises:
        FileNotFoundError: nothing is committed in ``folder``.
        CorruptFileError: a file fails its checks (names the file), ``CURRENT`` names a missing
            version, or ``folder`` holds files of an older moe-lora format (no ``CURRENT``).
        LockTimeoutError: the version could not be pinned within ``timeout`` seconds.
    """
    folder = Path(folder)
    _collect_if_idle(folder)
    with _pinned(folder, timeout) as (name, digest):
        _verify(folder, name, digest)
        yield folder / name


def _collect_if_idle(folder: Path) -> None:
    """Garbage-collect when no writer holds the lock (skipped on a read-only folder)."""
    try:
        fh = open(folder / LOCK, "ab")  # noqa: SIM115 - closed by the with below
    except OSError:
        return
    with fh:
        if _try_flock(fh, portalocker.LOCK_EX):
            try:
                _collect_garbage(folder)
            finally:
                portalocker.unlock(fh)


@contextlib.contextmanager
def _pinned(folder: Path, timeout: float) -> Iterator[tuple[str, str]]:
    """The current ``(version, digest)`` with a shared lock held on the version's ``.pin``."""
    deadline = time.monotonic() + timeout
    while True:  # each turn lost a race with a writer that committed and collected meanwhile
        pointer = _pointer_or_raise(folder)
        left = deadline - time.monotonic()
        what = f"{folder / pointer[0]}: could not be pinned for reading"
        try:
            fh = open(folder / pointer[0] / PIN, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            if _read_pointer(folder) == pointer:
                raise CorruptFileError(
                    f"{folder / POINTER}: names version {pointer[0]}, which is missing"
                ) from None
            if left <= 0:
                raise LockTimeoutError(f"{what}; gave up after {timeout:g} s") from None
            continue
        with fh:
            _flock(fh, portalocker.LOCK_SH, max(left, 0.0), what)
            try:
                if _same_file(fh, folder / pointer[0] / PIN):
                    yield pointer
                    return
            finally:
                portalocker.unlock(fh)


def _pointer_or_raise(folder: Path) -> tuple[str, str]:
    pointer = _read_pointer(folder)
    if pointer is not None:
        return pointer
    entries = folder.iterdir() if folder.is_dir() else iter(())
    visible = sorted(p.name for p in entries
                     if not p.name.startswith(".") and _version_number(p.name) is None)
    if visible:
        raise CorruptFileError(
            f"{folder}: holds {visible[:4]} but no {POINTER} pointer: written by an older "
            f"moe-lora storage format (before {FORMAT}); load it with that version and save again"
        )
    raise FileNotFoundError(f"{folder}: nothing committed (no {POINTER} file)")


def _same_file(fh: IO[Any], path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)
