"""Exchanging experts with PEFT: export to, and import from, PEFT LoRA adapter folders.

A PEFT LoRA adapter folder (what ``PeftModel.save_pretrained`` writes and
``PeftModel.from_pretrained(base_model, folder)`` reads) holds::

    adapter_config.json         the LoraConfig: r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors   "base_model.model.<module path>.lora_A.weight"  [r, in]
                                "base_model.model.<module path>.lora_B.weight"  [out, r]

PEFT adds ``s * B @ A @ x`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), the
same update as one of our experts, in the same [r, in] / [out, r] layout. For GPT-2's ``Conv1D``
(weight stored [in, out]) PEFT sets ``fan_in_fan_out``, which only transposes the *base* weight when
merging: the LoRA factors keep this layout, so no transpose is needed either way.

A weighted merge of experts ``{e: w_e}`` (ranks ``r_e`` may differ) is exported exactly by
concatenating along the rank::

    A_cat = [A_1; ...; A_n]                         [sum r_e, in]
    B_cat = [w_1 s_1 B_1, ..., w_n s_n B_n]         [out, sum r_e]
    s     = lora_alpha / r = 1                      (r = lora_alpha = sum r_e)

so that ``s * B_cat @ A_cat = sum_e w_e s_e B_e A_e``.

The module paths are those of ``bank.model``, so the PEFT base model must be the same class (a
``BertModel`` bank exchanges with a ``BertModel``, not a ``BertForSequenceClassification``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lora.core.config import ExpertConfig
from moe_lora.core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank

__all__ = ["export_peft", "import_peft", "peft_target_modules", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
_KEY = re.compile(r"(?P<path>.+)\.(?P<which>lora_A|lora_B)(\.default)?\.weight")

Factors = dict[str, tuple[Tensor, Tensor]]  # layer path -> (A [r, in], B [out, r])


# ---------------------------------------------------------------------------------------- export
def export_peft(
    bank: ExpertBank,
    path: str | Path,
    expert: str | Mapping[str, float],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write one expert, or a weighted merge of several, as a PEFT LoRA adapter folder.

    Args:
        bank: the bank holding the experts.
        path: the adapter folder (created; both files are written atomically, weights first).
        expert: an expert name (exported with its own r, lora_alpha, use_rslora and dropout), or
            ``{name: weight}``: exported exactly as one adapter of rank ``sum r_e`` (see the module
            docstring), with dropout 0.
        base_model_name_or_path: recorded in the config (default: the model's
            ``config._name_or_path``, else ``bank.base_id``).
        task_type: PEFT task type (e.g. ``"CAUSAL_LM"``) or None for a plain ``PeftModel``.

    Returns:
        The folder. Load it with ``peft.PeftModel.from_pretrained(base_model, folder)``.

    Raises:
        KeyError: an expert name is not in the bank.
        ValueError: an empty or all-zero merge, or an unknown ``task_type``.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    if isinstance(expert, str):
        factors, hyper = _single(bank, expert)
    else:
        factors, hyper = _weighted(bank, expert)
    folder = Path(path)
    tensors = {}
    for layer_path, (a, b) in factors.items():
        tensors[f"{PREFIX}{layer_path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{layer_path}.lora_B.weight"] = b
    atomic_save_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _base_name(bank),
        "target_modules": peft_target_modules(bank),
        "fan_in_fan_out": all(
            not isinstance(la.base, torch.nn.Linear) for la in bank.layers.values()
        ),
        "bias": "none",
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        **hyper,
    }
    atomic_write_json(folder / CONFIG_FILE, config)
    return folder


def _base_name(bank: ExpertBank) -> str:
    name = getattr(getattr(bank.model, "config", None), "_name_or_path", None)
    return str(name) if name else bank.base_id


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _single(bank: ExpertBank, name: str) -> tuple[Factors, dict[str, Any]]:
    cfg = bank.info(name).config
    i = bank.index(name)
    factors = {p: (la.experts[i].lora_A, la.experts[i].lora_B) for p, la in bank.layers.items()}
    hyper = {
        "r": cfg.rank,
        "lora_alpha": _number(cfg.alpha),
        "use_rslora": cfg.rslora,
        "lora_dropout": float(cfg.dropout),
    }
    return factors, hyper


@torch.no_grad()
def _weighted(bank: ExpertBank, weights: Mapping[str, float]) -> tuple[Factors, dict[str, Any]]:
    ids = {bank.index(n): float(w) for n, w in weights.items()}  # KeyError on unknown names
    used = {e: w for e, w in ids.items() if w != 0.0}
    if not used:
        raise ValueError(f"a weighted export needs at least one non-zero weight, got {weights}")
    factors: Factors = {}
    for p, la in bank.layers.items():
        fs = [(la.experts[e], w) for e, w in used.items()]
        a = torch.cat([f.lora_A for f, _ in fs], dim=0)
        b = torch.cat([f.lora_B * (w * f.scale) for f, w in fs], dim=1)
        factors[p] = (a, b)
    rank = int(next(iter(factors.values()))[0].shape[0])
    hyper = {"r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0}
    return factors, hyper


def peft_target_modules(bank: ExpertBank) -> list[str]:
    """PEFT ``target_modules`` selecting exactly the bank's layers.

    Leaf names (``["query", "value"]``) when they select no other module of the model, else the
    full dotted paths.
    """
    inside = tuple(p + "." for p in bank.layers)
    others = [
        p
        for p, _ in bank.model.named_modules()
        if p and p not in bank.layers and not p.startswith(inside)
    ]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in bank.layers})
    clash = [p for p in others if p.rsplit(".", 1)[-1] in leaves]
    return sorted(bank.layers) if clash else leaves


# ---------------------------------------------------------------------------------------- import
def import_peft(
    bank: ExpertBank,
    path: str | Path,
    name: str,
    *,
    trainable: bool = False,
    task: Any = None,
) -> int:
    """Add the PEFT LoRA adapter in folder ``path`` to ``bank`` as expert ``name``.

    The adapter must cover exactly the bank's layers. Its per-layer rank and scale come from the
    tensors and from ``r``/``lora_alpha``/``use_rslora``/``rank_pattern``/``alpha_pattern``. When
    every layer has the same rank and scale the expert gets that ``ExpertConfig``; otherwise (a
    ``rank_pattern`` or ``alpha_pattern`` that varies) the factors are zero-padded to the largest rank
    and each layer's scale is folded into its ``B`` under a scale-1 config (``alpha = rank``), which
    reproduces the adapter exactly.

    Returns:
        The new expert's bank index.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights in the folder.
        ValueError: pickled weights (``adapter_model.bin``), a non-LoRA or unsupported adapter
            (DoRA, trained biases, ``modules_to_save``, embedding LoRA), layers that differ from the
            bank's, or shapes that do not fit; the name is taken.
        moe_lora.io.CorruptFileError: unparsable config or weights.
    """
    folder = Path(path)
    config = _read_config(folder)
    factors = _read_factors(folder, config)
    _check_layers(bank, factors, folder)
    expert_cfg, state = _as_expert(factors, config)
    meta = {"source": "peft", "path": str(folder), "base": config.get("base_model_name_or_path")}
    idx = bank.add_expert(name, expert_cfg, task=task, trainable=trainable, meta=meta)
    try:
        bank.set_expert_state(name, state)
    except ValueError as err:
        bank.remove_expert(name)
        raise ValueError(f"{folder}: the adapter does not fit this model: {err}") from err
    return idx


def _read_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / CONFIG_FILE)
    where = folder / CONFIG_FILE
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{where}: not a PEFT LoRA adapter (peft_type {kind!r})")
    refused = {
        "use_dora": "DoRA magnitudes",
        "modules_to_save": "fully trained modules (modules_to_save)",
        "lora_bias": "LoRA biases",
        "target_parameters": "LoRA on parameters (target_parameters)",
        "trainable_token_indices": "trained token embeddings",
        "layer_replication": "layer replication",
    }
    for key, what in refused.items():
        if config.get(key):
            raise ValueError(f"{where}: the adapter uses {what}; moe-lora experts cannot hold that")
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{where}: the adapter trains biases (bias={config['bias']!r}); not supported"
        )
    return config


def _read_factors(folder: Path, config: dict[str, Any]) -> Factors:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        if pickles:
            raise ValueError(
                f"{folder}: only pickled weights {pickles}; moe-lora never unpickles files. Convert "
                f"the adapter to safetensors (PeftModel.save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{weights}: file not found")
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in load_tensors(weights).items():
        m = _KEY.fullmatch(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if m is None:
            raise ValueError(
                f"{weights}: unsupported tensor {key!r} (only lora_A/lora_B of Linear)"
            )
        parts.setdefault(m["path"], {})[m["which"]] = t
    factors: Factors = {}
    for p, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(
                f"{weights}: module {p!r} has {sorted(ab)} but needs lora_A and lora_B"
            )
        factors[p] = (ab["lora_A"], ab["lora_B"])
    return factors


def _check_layers(bank: ExpertBank, factors: Factors, folder: Path) -> None:
    extra = sorted(set(factors) - set(bank.layers))
    missing = sorted(set(bank.layers) - set(factors))
    if extra:
        raise ValueError(
            f"{folder}: the adapter targets {len(extra)} module(s) that are not layers of this bank, "
            f"e.g. {extra[:3]}; the bank wraps {sorted(bank.layers)[:3]}... ({len(bank.layers)})"
        )
    if missing:
        raise ValueError(
            f"{folder}: the adapter lacks {len(missing)} of the bank's layers, e.g. {missing[:3]}; "
            f"build the bank with the adapter's targets {sorted(factors)[:3]}..."
        )


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (``peft.utils.other.get_pattern_key``): first key matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _layer_alpha(config: dict[str, Any], path: str, rank: int) -> float:
    r = int(_pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8)))
    if r != rank:
        raise ValueError(f"module {path!r}: the config says rank {r}, the weights have rank {rank}")
    return float(
        _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    )


def _as_expert(factors: Factors, config: dict[str, Any]) -> tuple[ExpertConfig, dict[str, Tensor]]:
    """One ExpertConfig and state for the adapter: exact config if uniform, else padded and folded."""
    ranks = {p: int(a.shape[0]) for p, (a, _) in factors.items()}
    alphas = {p: _layer_alpha(config, p, r) for p, r in ranks.items()}
    dropout = float(config.get("lora_dropout") or 0.0)
    rslora = bool(config.get("use_rslora"))
    if len(set(ranks.values())) == 1 and len(set(alphas.values())) == 1:
        cfg = ExpertConfig(
            rank=next(iter(ranks.values())),
            alpha=next(iter(alphas.values())),
            dropout=dropout,
            rslora=rslora,
        )
        state = {f"{p}.lora_A": a for p, (a, _) in factors.items()}
        state |= {f"{p}.lora_B": b for p, (_, b) in factors.items()}
        return cfg, state
    rank = max(ranks.values())
    cfg = ExpertConfig(rank=rank, alpha=float(rank), dropout=dropout)  # scale 1
    state = {}
    for p, (a, b) in factors.items():
        scale = alphas[p] / (math.sqrt(ranks[p]) if rslora else ranks[p])
        pad = rank - ranks[p]
        state[f"{p}.lora_A"] = F.pad(a, (0, 0, 0, pad))
        state[f"{p}.lora_B"] = F.pad(b * scale, (0, pad))
    return cfg, state
