"""The bank file format: safetensors for tensors, a JSON manifest for everything else.

A saved bank is a folder::

    manifest.json          format, base identity, layer shapes, experts (config + metadata),
                           sha256 of the tensor file
    experts.safetensors    "<expert>/<layer path>/lora_A" [r, in] and ".../lora_B" [out, r]

Both files are written atomically (temp file, fsync, rename), the tensor file first. This module
knows files, not banks: :meth:`moe_lora.core.bank.ExpertBank.save` builds the manifest and tensors
and checks the base identity on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_lora.core.io import (
    CorruptFileError,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
)

__all__ = ["FORMAT", "read_bank_tensors", "read_manifest", "write_bank"]

FORMAT = "moe-lora-bank/1"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"


def write_bank(folder: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` then ``manifest`` (completed with format and tensor digest) to ``folder``."""
    digest = atomic_save_tensors(folder / TENSORS, tensors, metadata={"format": FORMAT})
    full = {"format": FORMAT, **manifest,
            "tensors": {"file": TENSORS, "sha256": digest, "count": len(tensors)}}
    atomic_write_json(folder / MANIFEST, full)
    return folder


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a bank folder's manifest.

    Raises:
        FileNotFoundError: no manifest in the folder.
        CorruptFileError: the manifest is not a moe-lora bank manifest.
    """
    file = Path(path) / MANIFEST
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{file}: not a moe-lora bank manifest (expected format {FORMAT})")
    for key in ("base", "layers", "experts", "tensors"):
        if key not in manifest:
            raise CorruptFileError(f"{file}: missing key {key!r}")
    return manifest


def read_bank_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a bank folder, checked against the manifest's SHA-256.

    Raises:
        CorruptFileError: the tensor file is truncated or modified.
    """
    return load_tensors(folder / TENSORS, manifest["tensors"]["sha256"])
