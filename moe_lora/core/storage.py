"""The bank file format: safetensors for tensors, a JSON manifest for everything else.

A saved bank is an artefact folder of :mod:`moe_lora.core.commit` (versions, a ``CURRENT`` pointer,
a writers' lock, SHA-256 of every file); each version holds::

    manifest.json          format, base identity (see :mod:`moe_lora.core.identity`), layer
                           shapes ``{path: {"in", "out"}}``, experts (name, config, metadata)
    experts.safetensors    "<expert>/<layer path>/lora_A" [r, in] and ".../lora_B" [out, r]

A save replaces both files at once; a load reads both from one committed version, after every
byte was checked. This module knows files, not banks: :meth:`moe_lora.core.bank.ExpertBank.save`
builds the manifest and tensors and checks the base identity on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moe_lora.core.commit import read_version, write_version
from moe_lora.core.io import CorruptFileError, atomic_save_tensors, load_tensors, read_json
from moe_lora.core.names import check_expert_name

__all__ = ["FORMAT", "read_bank", "read_manifest", "write_bank"]

FORMAT = "moe-lora-bank/2"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"


def write_bank(
    folder: str | Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Commit ``manifest`` (completed with the format) and ``tensors`` as one new
    version of the bank at ``folder``; returns ``folder``.

    Raises:
        moe_lora.core.commit.LockTimeoutError: another process kept the folder locked.
    """
    full = {"format": FORMAT, **manifest}

    def write(tmp: Path) -> None:
        atomic_save_tensors(tmp / TENSORS, tensors, metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")

    write_version(folder, write)
    return Path(folder)


def _checked_manifest(file: Path) -> dict[str, Any]:
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{file}: not a moe-lora bank manifest (expected format {FORMAT})")
    for key, kind in (("base", dict), ("layers", dict), ("experts", list)):
        if not isinstance(manifest.get(key), kind):
            raise CorruptFileError(f"{file}: key {key!r} missing or not a JSON {kind.__name__}")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the bank at ``folder`` (its committed version, checksums checked).

    Raises:
        FileNotFoundError: nothing committed at ``folder``.
        CorruptFileError: a file fails its checksum, or the manifest is not a bank manifest.
    """
    with read_version(folder) as version:
        return _checked_manifest(version / MANIFEST)


def read_bank(
    folder: str | Path,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The manifest of the bank at ``folder`` and each expert's factors, from one committed
    version: ``{name: {"<layer path>.lora_A": [r, in], "<layer path>.lora_B": [out, r]}}``.

    Raises:
        FileNotFoundError: nothing committed at ``folder``.
        CorruptFileError: a file fails its checksum, the manifest is not a bank manifest (an
            expert entry is malformed, a name invalid or repeated), or a tensor is missing,
            mis-shaped or unlisted.
    """
    with read_version(folder) as version:
        manifest = _checked_manifest(version / MANIFEST)
        tensors = load_tensors(version / TENSORS)
    states = {}
    for entry in manifest["experts"]:
        name, rank = _name_and_rank(entry, folder)
        if name in states:
            raise CorruptFileError(f"{folder}: {MANIFEST} lists expert {name!r} twice")
        states[name] = _expert_state(name, rank, manifest["layers"], tensors, folder)
    if 2 * len(manifest["layers"]) * len(states) != len(tensors):
        raise CorruptFileError(f"{folder}: {TENSORS} holds tensors {MANIFEST} does not list")
    return manifest, states


def _name_and_rank(entry: Any, folder: Path | str) -> tuple[str, int]:
    try:
        name, rank = check_expert_name(entry["name"]), entry["config"]["rank"]
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank {rank!r}")
    except (TypeError, KeyError, ValueError) as err:
        raise CorruptFileError(f"{folder}: malformed expert entry in {MANIFEST} ({err})") from err
    return name, rank


def _expert_state(
    name: str, rank: int, layers: dict[str, Any], tensors: dict[str, torch.Tensor],
    folder: Path | str,
) -> dict[str, torch.Tensor]:
    state = {}
    for path, shape in layers.items():
        for which, dims in (("lora_A", (rank, shape["in"])), ("lora_B", (shape["out"], rank))):
            key = f"{name}/{path}/{which}"
            t = tensors.get(key)
            if t is None or tuple(t.shape) != dims:
                got = "missing" if t is None else f"of shape {tuple(t.shape)}"
                raise CorruptFileError(f"{folder}: tensor {key!r} is {got}, expected {dims}")
            state[f"{path}.{which}"] = t
    return state
