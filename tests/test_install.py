"""Installing the package: ``routers/`` and ``memory/`` land as ``moe_lora.routers``/``moe_lora.memory``.

Both install modes are checked once: a normal (wheel) install into a scratch folder, and the
editable install of the development environment. Imports run in a fresh interpreter started outside
the repository, so the repository's own folders cannot be picked up from the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "moe_lora", "routers", "memory")

PROBE = """
import importlib.util, json
import moe_lora, moe_lora.routers, moe_lora.memory
print(json.dumps({
    "moe_lora": moe_lora.__file__,
    "routers": moe_lora.routers.__file__,
    "memory": moe_lora.memory.__file__,
    "top_level_routers": importlib.util.find_spec("routers") is not None,
    "top_level_memory": importlib.util.find_spec("memory") is not None,
}))
"""


def _probe(
    cwd: Path, *, python_args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> dict:
    """Run :data:`PROBE` in a fresh interpreter in ``cwd``; returns what it found."""
    done = subprocess.run(
        [sys.executable, *python_args, "-c", PROBE],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _inside(file: str | None, folder: Path) -> bool:
    return file is not None and Path(file).resolve().is_relative_to(folder.resolve())


def test_wheel_install_nests_routers_and_memory(tmp_path: Path) -> None:
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(item, src / name, ignore=ignore)
        else:
            shutil.copy2(item, src / name)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    flags = ["--no-deps", "--no-build-isolation", "--no-compile", "--target", str(site), str(src)]
    done = subprocess.run(pip + flags, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    scripts = site / "bin"  # console scripts; --target puts them here
    installed = sorted(p.name for p in site.iterdir() if p != scripts and p.suffix != ".dist-info")
    assert installed == ["moe_lora"], f"top-level entries besides moe_lora: {installed}"
    assert (scripts / "moe-lora").is_file()
    assert (site / "moe_lora" / "py.typed").is_file()
    # -S: no .pth files, so the development environment's editable finder is not installed;
    # dependencies come from its site-packages, moe_lora only from the scratch install.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    )
    found = _probe(tmp_path, python_args=("-S",), env=env)
    assert _inside(found["moe_lora"], site / "moe_lora")
    assert _inside(found["routers"], site / "moe_lora" / "routers")
    assert _inside(found["memory"], site / "moe_lora" / "memory")
    assert not found["top_level_routers"] and not found["top_level_memory"]


def _editable() -> bool:
    """Whether this environment's site-packages holds an editable install of moe-lora.

    (Looked up there, not on ``sys.path``: the repository's own ``moe_lora.egg-info`` would answer.)
    """
    site = sysconfig.get_paths()["purelib"]
    for dist in metadata.distributions(name="moe-lora", path=[site]):
        direct_url = dist.read_text("direct_url.json")
        return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))
    return False


@pytest.mark.skipif(not _editable(), reason="moe-lora is not installed in editable mode here")
def test_editable_install_maps_the_repository_folders(tmp_path: Path) -> None:
    found = _probe(tmp_path)  # outside the repository: only the editable finder can resolve it
    assert _inside(found["moe_lora"], REPO / "moe_lora"), found
    assert _inside(found["routers"], REPO / "routers"), found
    assert _inside(found["memory"], REPO / "memory"), found
    assert not found["top_level_routers"] and not found["top_level_memory"]
