"""Saving and loading expert banks: safetensors for tensors, a JSON manifest for everything else.

A saved bank is a folder::

    manifest.json          format, base identity, layer shapes, experts (config + metadata),
                           sha256 of the tensor file
    experts.safetensors    "<expert>/<layer path>/lora_A" [r, in] and ".../lora_B" [out, r]

Both files are written atomically (temp file, fsync, rename), the tensor file first, so a crash
leaves either the old bank or the new one. Loading verifies the checksum, the base model's identity
(class, layer shapes and a fingerprint of its target weights) and every tensor's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_lora.io import (
    CorruptFileError,
    atomic_save_tensors,
    atomic_write_json,
    load_tensors,
    read_json,
    sha256_bytes,
)

if TYPE_CHECKING:
    from moe_lora.bank import ExpertBank

__all__ = ["FORMAT", "save_bank", "read_manifest", "load_experts_into", "base_fingerprint"]

FORMAT = "moe-lora-bank/1"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"


def base_fingerprint(bank: ExpertBank) -> str:
    """SHA-256 over the first two target layers' base weights (identifies the pretrained base)."""
    parts = []
    for layer in list(bank.layers.values())[:2]:
        w = layer.base.weight.detach().to("cpu", torch.float32).contiguous()
        parts.append(w.numpy().tobytes())
    return sha256_bytes(b"".join(parts))


def _base_identity(bank: ExpertBank) -> dict[str, Any]:
    return {
        "id": bank.base_id,
        "class": type(bank.model).__name__,
        "fingerprint": base_fingerprint(bank),
    }


def save_bank(bank: ExpertBank, path: str | Path, names: Sequence[str] | None = None) -> Path:
    """Write ``bank``'s experts (all, or ``names``) to folder ``path``; returns the folder.

    Raises:
        RuntimeError: the bank is merged (the base weights would not identify the base model).
    """
    if bank.merged is not None:
        raise RuntimeError("unmerge() the bank before saving it")
    folder = Path(path)
    chosen = list(bank.names if names is None else names)
    tensors: dict[str, torch.Tensor] = {}
    for name in chosen:
        for key, t in bank.expert_parameters(name).items():
            layer_path, _, which = key.rpartition(".")
            tensors[f"{name}/{layer_path}/{which}"] = t
    digest = atomic_save_tensors(folder / TENSORS, tensors, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "base": _base_identity(bank),
        "layers": {
            p: {"in": layer.in_features, "out": layer.out_features}
            for p, layer in bank.layers.items()
        },
        "experts": [bank.info(n).to_json() for n in chosen],
        "tensors": {"file": TENSORS, "sha256": digest, "count": len(tensors)},
    }
    atomic_write_json(folder / MANIFEST, manifest)
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


def _check_base(bank: ExpertBank, manifest: dict[str, Any], folder: Path, strict: bool) -> None:
    saved = manifest["layers"]
    if set(saved) != set(bank.layers):
        raise ValueError(
            f"{folder}: saved for layers {sorted(saved)[:3]}... ({len(saved)}), but this bank "
            f"wraps {sorted(bank.layers)[:3]}... ({len(bank.layers)})"
        )
    for p, shape in saved.items():
        layer = bank.layers[p]
        if (shape["in"], shape["out"]) != (layer.in_features, layer.out_features):
            raise ValueError(
                f"{folder}: layer {p} was [in={shape['in']}, out={shape['out']}] when saved, the "
                f"model has [in={layer.in_features}, out={layer.out_features}]"
            )
    base = manifest["base"]
    if strict and base["fingerprint"] != base_fingerprint(bank):
        raise ValueError(
            f"{folder}: saved for base model {base['id']!r} ({base['class']}), whose weights differ "
            f"from this model's; pass strict_base=False to load anyway"
        )


def load_experts_into(
    bank: ExpertBank,
    path: str | Path,
    names: Sequence[str] | None = None,
    *,
    strict_base: bool = True,
) -> list[int]:
    """Add experts saved in folder ``path`` to ``bank``; returns their bank indices.

    Raises:
        FileNotFoundError / CorruptFileError: missing, truncated or modified files.
        ValueError: base model, layer or tensor shapes disagree; a name is missing or taken.
    """
    from moe_lora.bank import ExpertInfo

    folder = Path(path)
    manifest = read_manifest(folder)
    _check_base(bank, manifest, folder, strict_base)
    infos = [ExpertInfo.from_json(d) for d in manifest["experts"]]
    available = [i.name for i in infos]
    wanted = available if names is None else list(names)
    for n in wanted:
        if n not in available:
            raise ValueError(f"{folder}: no expert {n!r}; it holds {available}")
    tensors = load_tensors(folder / manifest["tensors"]["file"], manifest["tensors"]["sha256"])
    ids = []
    for info in infos:
        if info.name not in wanted:
            continue
        idx = bank.add_expert(
            info.name, info.config, task=info.task, trainable=info.trainable, meta=info.meta
        )
        state = {}
        for layer_path in bank.layers:
            for which in ("lora_A", "lora_B"):
                key = f"{info.name}/{layer_path}/{which}"
                if key not in tensors:
                    bank.remove_expert(info.name)
                    raise CorruptFileError(f"{folder}: tensor {key!r} missing from {TENSORS}")
                state[f"{layer_path}.{which}"] = tensors[key]
        try:
            bank.set_expert_state(info.name, state)
        except ValueError:
            bank.remove_expert(info.name)
            raise
        saved = bank.info(info.name)
        saved.created, saved.trained_steps = info.created, info.trained_steps
        ids.append(idx)
    return ids
