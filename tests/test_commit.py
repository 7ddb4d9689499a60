"""The commit protocol on its own: layout, atomic switch, garbage, pins, locks, every check."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from storage_helpers import version_dir

from moe_lora.core.commit import (
    LockTimeoutError,
    is_committed,
    locked,
    read_version,
    update_version,
    write_version,
)
from moe_lora.core.io import CorruptFileError


def write_text(text: str):
    def write(tmp: Path) -> None:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(text.encode() * 3)

    return write


def read_text(folder: Path) -> str:
    with read_version(folder) as version:
        return (version / "a.txt").read_text()


def test_layout_and_replacement(tmp_path):
    folder = tmp_path / "art"
    assert not is_committed(folder)
    first = write_version(folder, write_text("one"))
    assert first == folder / "v000001" and is_committed(folder)
    assert sorted(os.listdir(first)) == [".pin", "MANIFEST.json", "a.txt", "sub"]
    manifest = json.loads((first / "MANIFEST.json").read_text())
    assert sorted(manifest["files"]) == ["a.txt", "sub/b.bin"]
    assert manifest["files"]["a.txt"]["size"] == 3
    second = write_version(folder, write_text("two"))
    assert second.name == "v000002" and read_text(folder) == "two"
    assert sorted(os.listdir(folder)) == [".lock", "CURRENT", "v000002"]  # old version collected
    name, digest = (folder / "CURRENT").read_text().split()
    assert name == "v000002" and len(digest) == 64


def test_nothing_committed_and_older_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing committed"):
        with read_version(tmp_path / "missing"):
            pass
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text("{}")
    with pytest.raises(CorruptFileError, match="older moe-lora storage format"):
        with read_version(tmp_path / "old"):
            pass


def test_a_failing_writer_leaves_the_committed_version(tmp_path):
    write_version(tmp_path, write_text("one"))

    def fail(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_version(tmp_path, fail)
    assert read_text(tmp_path) == "one"
    assert sorted(os.listdir(tmp_path)) == [".lock", "CURRENT", "v000001"]


def test_reserved_names_and_links_are_refused_on_write(tmp_path):
    with pytest.raises(ValueError, match="MANIFEST.json"):
        write_version(tmp_path, lambda tmp: (tmp / "MANIFEST.json").write_text("{}"))
    (tmp_path / "elsewhere").write_text("secret")
    with pytest.raises(CorruptFileError, match="links are refused"):
        write_version(tmp_path, lambda tmp: (tmp / "x").symlink_to(tmp_path / "elsewhere"))
    assert not is_committed(tmp_path)


def test_dead_writers_garbage_goes_at_the_next_open(tmp_path):
    write_version(tmp_path, write_text("one"))
    (tmp_path / ".tmp-v000002-999-dead").mkdir()
    (tmp_path / ".tmp-v000002-999-dead" / "a.txt").write_text("half")
    (tmp_path / "v000002").mkdir()  # renamed, but the writer died before the pointer switch
    (tmp_path / ".tmp-CURRENT-dead").write_text("v000002 ")
    assert read_text(tmp_path) == "one"
    assert sorted(os.listdir(tmp_path)) == [".lock", "CURRENT", "v000001"]


def test_a_pinned_version_outlives_newer_commits(tmp_path):
    write_version(tmp_path, write_text("one"))
    with read_version(tmp_path) as old:
        write_version(tmp_path, write_text("two"))
        write_version(tmp_path, write_text("three"))
        assert (old / "a.txt").read_text() == "one"  # still there while pinned
        assert read_text(tmp_path) == "three"
    write_version(tmp_path, write_text("four"))
    assert sorted(os.listdir(tmp_path)) == [".lock", "CURRENT", "v000004"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra", "missing", "escape"])
def test_every_damage_is_detected_and_named(tmp_path, damage):
    write_version(tmp_path, write_text("payload"))
    version = version_dir(tmp_path)
    if damage == "flip":
        data = bytearray((version / "sub" / "b.bin").read_bytes())
        data[4] ^= 0x10
        (version / "sub" / "b.bin").write_bytes(bytes(data))
        expected = r"sub/b\.bin: checksum mismatch"
    elif damage == "truncate":
        (version / "a.txt").write_text("pay")
        expected = r"a\.txt: checksum mismatch"
    elif damage == "extra":
        (version / "sub" / "c.txt").write_text("smuggled")
        expected = r"sub/c\.txt: not listed"
    elif damage == "missing":
        (version / "sub" / "b.bin").unlink()
        expected = r"sub/b\.bin: listed in MANIFEST\.json but missing"
    else:  # a manifest (and a pointer) rewritten so that a path leaves the folder
        manifest = json.loads((version / "MANIFEST.json").read_text())
        manifest["files"]["../outside"] = manifest["files"].pop("a.txt")
        (version / "MANIFEST.json").write_text(json.dumps(manifest))
        name = version.name
        digest = hashlib.sha256((version / "MANIFEST.json").read_bytes()).hexdigest()
        (tmp_path / "CURRENT").write_text(f"{name} {digest}\n")
        expected = r"path '\.\./outside' leaves the folder"
    with pytest.raises(CorruptFileError, match=expected):
        read_text(tmp_path)


def test_pointer_damage_is_detected_and_keeps_the_versions(tmp_path):
    write_version(tmp_path, write_text("payload"))
    good = (tmp_path / "CURRENT").read_bytes()
    (tmp_path / "CURRENT").write_bytes(good.replace(b"v000001", b"v000003"))
    with pytest.raises(CorruptFileError, match="names version v000003, which is missing"):
        read_text(tmp_path)
    (tmp_path / "CURRENT").write_bytes(good[:-1])
    with pytest.raises(CorruptFileError, match="not a commit pointer"):
        read_text(tmp_path)
    (tmp_path / "CURRENT").write_bytes(good[:10] + b"f" + good[11:])
    with pytest.raises(CorruptFileError, match="MANIFEST.json: checksum mismatch with"):
        read_text(tmp_path)
    (tmp_path / "CURRENT").write_bytes(good)  # repaired by hand: nothing was collected
    assert read_text(tmp_path) == "payload"


def test_a_held_lock_times_out_with_the_folder_named(tmp_path):
    write_version(tmp_path, write_text("one"))
    with locked(tmp_path):
        with pytest.raises(LockTimeoutError, match=f"{tmp_path}: another writer holds the lock"):
            write_version(tmp_path, write_text("two"), timeout=0.2)
        assert read_text(tmp_path) == "one"  # readers are not blocked by a writer


def test_concurrent_updates_lose_nothing(tmp_path):
    def add(item: str):
        def update(current: Path | None, tmp: Path) -> None:
            items = [] if current is None else json.loads((current / "list.json").read_text())
            (tmp / "list.json").write_text(json.dumps(items + [item]))

        return update

    threads = [threading.Thread(target=lambda i=i: [update_version(tmp_path, add(f"{i}.{j}"))
                                                     for j in range(10)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with read_version(tmp_path) as version:
        items = json.loads((version / "list.json").read_text())
    assert sorted(items) == sorted(f"{i}.{j}" for i in range(4) for j in range(10))


def test_a_nested_artefact_is_checksummed_by_both(tmp_path):
    def outer(tmp: Path) -> None:
        write_version(tmp / "inner", write_text("inside"))
        (tmp / "state.json").write_text("{}")

    write_version(tmp_path, outer)
    with read_version(tmp_path) as version:
        assert read_text(version / "inner") == "inside"
    with read_version(tmp_path) as version:  # reading the inner one left the outer one whole
        pass
    data = version_dir(version / "inner") / "a.txt"
    data.write_text("INSIDE")
    with pytest.raises(CorruptFileError, match=r"inner/v000001/a\.txt: checksum mismatch"):
        with read_version(tmp_path):
            pass
