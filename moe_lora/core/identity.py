"""What identifies the base model a bank was saved for: its architecture and its target weights.

A saved bank records, for the modules it wraps (its *target layers*):

- ``layers``: each target's ``{"in": in_features, "out": out_features}``;
- ``base``: the base's ``id`` (a user-facing name), model ``class`` and ``fingerprint``, the
  SHA-256 over the architecture (model class; each target's path, module class, weight and bias
  shapes) and the bytes of every target's weight and bias (as float32).

Loading checks the layers always and the fingerprint when ``strict_base`` is set, before it touches
the bank or the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lora.core.layers import base_weight_shape

__all__ = ["base_fingerprint", "check_base", "layer_shapes"]


def layer_shapes(modules: Mapping[str, nn.Module]) -> dict[str, dict[str, int]]:
    """``{path: {"in": in_features, "out": out_features}}`` of the (unwrapped) target modules."""
    return {p: dict(zip(("out", "in"), base_weight_shape(m), strict=True))
            for p, m in modules.items()}


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


def base_fingerprint(model: nn.Module, modules: Mapping[str, nn.Module]) -> str:
    """SHA-256 of the architecture and of every target module's weight and bias (float32 bytes).

    Args:
        model: the base model (its class is part of the architecture).
        modules: the unwrapped target modules by dotted path.
    """
    h = hashlib.sha256()
    arch = [type(model).__name__] + [
        [p, type(m).__name__, _shape(m.weight), _shape(getattr(m, "bias", None))]
        for p, m in sorted(modules.items())
    ]
    h.update(json.dumps(arch).encode())
    for _, m in sorted(modules.items()):
        for t in (m.weight, getattr(m, "bias", None)):
            if t is not None:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().data)
    return h.hexdigest()


def check_base(
    saved: Mapping[str, Any], model: nn.Module, modules: Mapping[str, nn.Module], folder: Path,
    strict: bool,
) -> None:
    """Check a saved bank's ``layers`` (always) and base ``fingerprint`` (when ``strict``).

    Raises:
        ValueError: the target layers or their shapes differ, or (``strict``) the base model's
            architecture or weights differ; names the folder and what differs.
    """
    layers, now = saved["layers"], layer_shapes(modules)
    if set(layers) != set(now):
        raise ValueError(
            f"{folder}: saved for layers {sorted(layers)[:3]}... ({len(layers)}), but this model "
            f"has {sorted(now)[:3]}... ({len(now)})"
        )
    for p, shape in layers.items():
        if shape != now[p]:
            raise ValueError(
                f"{folder}: layer {p} was [in={shape['in']}, out={shape['out']}] when saved, "
                f"the model has [in={now[p]['in']}, out={now[p]['out']}]"
            )
    base = saved["base"]
    if strict and base["fingerprint"] != base_fingerprint(model, modules):
        raise ValueError(
            f"{folder}: saved for base model {base['id']!r} ({base['class']}), whose architecture "
            f"or weights differ from this {type(model).__name__}'s; pass strict_base=False to "
            "load anyway"
        )
