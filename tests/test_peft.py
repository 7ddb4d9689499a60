"""PEFT interop: our experts exported to PEFT and PEFT adapters imported give the same outputs.

Ground truth is PEFT itself: ``PeftModel.from_pretrained`` on an untouched copy of the base model,
and ``get_peft_model`` adapters saved with ``save_pretrained``.

Precision: with a power-of-two LoRA scale (alpha / r = 2 or 4) our fp32 outputs equal PEFT's bit for
bit, and those cases run in fp32 with atol 1e-5. Other scales (rsLoRA, weighted merges, folded
rank patterns) round differently in the last bit of each layer's update, and in fp32 MiniLM's
output is only reproducible to ~1e-5 anyway (fp32 vs fp64 of the base model alone: 9.7e-6), so those
cases run in float64 with atol 1e-10, where a wrong scale, factor or layer shows as > 1e-3.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.interop.peft import export_peft, import_peft

peft = pytest.importorskip("peft")

ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FP32, FP64 = torch.float32, torch.float64


# --------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def _randomise(module: nn.Module, std: float = 0.02) -> None:
    """Give every LoRA factor (``lora_A``/``lora_B``) of ``module`` random values."""
    for name, p in module.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.normal_(0.0, std)


def _bank(
    model: nn.Module, targets: list[str], experts: dict[str, ExpertConfig], std: float = 0.02
) -> ExpertBank:
    bank = ExpertBank(model, targets=targets)
    for i, (name, cfg) in enumerate(experts.items()):
        bank.add_expert(name, cfg, trainable=False)
        torch.manual_seed(100 + i)
        for layer in bank.layers.values():
            _randomise(layer.experts[i], std)
    return bank


def _hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _assert_close(ours: Tensor, theirs: Tensor, base: Tensor) -> float:
    """Outputs agree to ATOL while the adapter visibly changes the base output; returns the diff."""
    assert (theirs - base).abs().max() > 1e-2, "the adapter does not change the output: vacuous"
    diff = float((ours - theirs).abs().max())
    assert diff < ATOL[ours.dtype], f"max abs diff {diff:.3g} ({ours.dtype})"
    return diff


@pytest.fixture
def sentences(minilm):
    _, tok = minilm
    return dict(tok(["a cat sat on the mat", "LoRA experts"], return_tensors="pt", padding=True))


# ----------------------------------------------------------------------- export (ours -> PEFT)
@pytest.mark.parametrize(
    ("cfg", "dtype"),
    [(ExpertConfig(rank=4, alpha=8), FP32), (ExpertConfig(rank=6, alpha=3.5, rslora=True), FP64)],
    ids=["plain-fp32", "rslora-fp64"],
)
@torch.no_grad()
def test_export_one_expert_minilm(
    minilm, sentences, tmp_path: Path, cfg: ExpertConfig, dtype: torch.dtype
) -> None:
    model = minilm[0].to(dtype)
    base_model = copy.deepcopy(model)
    bank = _bank(model, ["query", "value"], {"e": cfg})
    export_peft(bank, tmp_path, "e")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query", "value"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
        cfg.rank,
        cfg.alpha,
        cfg.rslora,
    )
    pm = peft.PeftModel.from_pretrained(base_model, tmp_path).eval()
    theirs = _hidden(pm, sentences)
    with pm.disable_adapter():
        base = _hidden(pm, sentences)
    _assert_close(bank(**sentences, routing="e").last_hidden_state, theirs, base)


@torch.no_grad()
def test_export_weighted_merge_minilm(minilm, sentences, tmp_path: Path) -> None:
    model = minilm[0].to(FP64)
    base_model = copy.deepcopy(model)
    experts = {
        "a": ExpertConfig(rank=4, alpha=8),
        "b": ExpertConfig(rank=8, alpha=4, rslora=True),
        "c": ExpertConfig(rank=2, alpha=2),  # not in the merge
    }
    bank = _bank(model, ["query", "value"], experts)
    export_peft(bank, tmp_path, {"a": 0.7, "b": -0.4, "c": 0.0})

    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 12
    w = torch.tensor([[0.7, -0.4, 0.0]], dtype=FP64).expand(2, 3)
    ours = bank(**sentences, routing=Routing.dense(w)).last_hidden_state
    pm = peft.PeftModel.from_pretrained(base_model, tmp_path).eval()
    with pm.disable_adapter():
        base = _hidden(pm, sentences)
    _assert_close(ours, _hidden(pm, sentences), base)


@torch.no_grad()
def test_export_uses_full_paths_when_leaf_names_select_more(
    minilm, sentences, tmp_path: Path
) -> None:
    model, _ = minilm
    base_model = copy.deepcopy(model)
    path = "encoder.layer.0.attention.self.query"
    bank = _bank(model, [path], {"e": ExpertConfig(rank=4, alpha=8)})
    export_peft(bank, tmp_path, "e")

    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [path]
    pm = peft.PeftModel.from_pretrained(base_model, tmp_path).eval()
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped == [f"base_model.model.{path}"]
    with pm.disable_adapter():
        base = _hidden(pm, sentences)
    _assert_close(bank(**sentences, routing="e").last_hidden_state, _hidden(pm, sentences), base)


# ----------------------------------------------------------------------- import (PEFT -> ours)
def _peft_adapter(model: nn.Module, folder: Path, std: float = 0.02, **lora_kwargs) -> nn.Module:
    """A PEFT LoRA adapter with random A and B on ``model``, saved to ``folder``."""
    pm = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_kwargs)).eval()
    torch.manual_seed(7)
    _randomise(pm, std)
    pm.save_pretrained(folder)
    return pm


@pytest.mark.parametrize(
    ("lora_kwargs", "expected_config", "dtype"),
    [
        ({"r": 4, "lora_alpha": 16}, (4, 16.0, False), FP32),
        ({"r": 4, "lora_alpha": 5, "use_rslora": True}, (4, 5.0, True), FP64),
        # value layers rank 2, query layers alpha 3: padded to rank 4, scales folded into B
        (
            {"r": 4, "lora_alpha": 16, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3}},
            (4, 4.0, False),
            FP64,
        ),
        # one alpha for every layer via the pattern: an exact config with that alpha
        ({"r": 4, "lora_alpha": 16, "alpha_pattern": {"query|value": 3}}, (4, 3.0, False), FP64),
    ],
    ids=["plain-fp32", "rslora-fp64", "rank-and-alpha-pattern-fp64", "uniform-alpha-pattern-fp64"],
)
@torch.no_grad()
def test_import_peft_adapter_minilm(
    minilm, sentences, tmp_path: Path, lora_kwargs, expected_config, dtype
) -> None:
    model = minilm[0].to(dtype)
    pm = _peft_adapter(
        copy.deepcopy(model), tmp_path, target_modules=["query", "value"], **lora_kwargs
    )
    bank = ExpertBank(model, targets=["query", "value"])
    idx = import_peft(bank, tmp_path, "peft", task=3)

    assert (bank.names, idx, bank.info("peft").task) == (["peft"], 0, 3)
    assert not bank.trainable_parameters()
    cfg = bank.info("peft").config
    assert (cfg.rank, cfg.alpha, cfg.rslora) == expected_config
    theirs = _hidden(pm, sentences)
    with pm.disable_adapter():
        base = _hidden(pm, sentences)
    _assert_close(bank(**sentences, routing="peft").last_hidden_state, theirs, base)


# ---------------------------------------------------------------- GPT-2 Conv1D (fan_in_fan_out)
@torch.no_grad()
def test_gpt2_conv1d_round_trip(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    model = GPT2Model(cfg).eval().to(FP64)
    ids = {"input_ids": torch.randint(0, 64, (2, 7))}

    bank = _bank(copy.deepcopy(model), ["c_attn"], {"e": ExpertConfig(rank=3, alpha=5)}, std=0.2)
    export_peft(bank, tmp_path / "out", "e")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["fan_in_fan_out"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    with pm.disable_adapter():
        base = _hidden(pm, ids)
    _assert_close(bank(**ids, routing="e").last_hidden_state, _hidden(pm, ids), base)

    pm_in = _peft_adapter(
        copy.deepcopy(model),
        tmp_path / "in",
        std=0.2,
        r=2,
        lora_alpha=3,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
    )
    bank.add_expert("spare", ExpertConfig(rank=5))  # the import lands at index 2
    idx = import_peft(bank, tmp_path / "in", "peft")
    assert idx == 2
    _assert_close(bank(**ids, routing="peft").last_hidden_state, _hidden(pm_in, ids), base)


# ---------------------------------------------------------------------------- SmolLM2 (real LLM)
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_round_trip_both_ways(smollm2, tmp_path: Path) -> None:
    model, tok = smollm2
    ids = dict(tok(["The capital of France is"], return_tensors="pt"))
    targets = ["q_proj", "v_proj"]

    pm_in = _peft_adapter(
        copy.deepcopy(model), tmp_path / "in", r=4, lora_alpha=8, target_modules=targets
    )
    with pm_in.disable_adapter():
        base = _hidden(pm_in, ids)
    bank = ExpertBank(model, targets=targets)
    import_peft(bank, tmp_path / "in", "from_peft")
    diff_in = _assert_close(bank(**ids, routing="from_peft").logits, _hidden(pm_in, ids), base)

    base_copy = pm_in.unload()  # the untouched base, for PeftModel.from_pretrained
    bank.add_expert("ours", ExpertConfig(rank=8, alpha=16), trainable=False)
    torch.manual_seed(1)
    for layer in bank.layers.values():
        _randomise(layer.experts[1], std=0.05)
    export_peft(bank, tmp_path / "out", "ours", task_type="CAUSAL_LM")
    pm_out = peft.PeftModel.from_pretrained(base_copy, tmp_path / "out").eval()
    diff_out = _assert_close(bank(**ids, routing="ours").logits, _hidden(pm_out, ids), base)
    print(f"smollm2 max abs logit diff: import {diff_in:.2e}, export {diff_out:.2e}")


# ---------------------------------------------------------------------------------- clear errors
def test_pickled_weights_are_refused(minilm, tmp_path: Path) -> None:
    model, _ = minilm
    bank = _bank(model, ["query", "value"], {"e": ExpertConfig(rank=2)})
    export_peft(bank, tmp_path, "e")
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled.*adapter_model.bin"):
        import_peft(bank, tmp_path, "x")
    assert bank.names == ["e"]


@pytest.mark.parametrize(
    ("peft_targets", "message"),
    [(["query", "key"], "not layers of this bank.*key"), (["query"], "lacks 6 of the bank's")],
)
def test_import_refuses_other_targets(minilm, tmp_path: Path, peft_targets, message) -> None:
    model, _ = minilm
    _peft_adapter(copy.deepcopy(model), tmp_path, r=2, lora_alpha=2, target_modules=peft_targets)
    bank = ExpertBank(model, targets=["query", "value"])
    with pytest.raises(ValueError, match=message):
        import_peft(bank, tmp_path, "x")
    assert len(bank) == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["pooler"]}, "modules_to_save"),
        ({"bias": "all"}, "biases"),
        ({"peft_type": "IA3"}, "not a PEFT LoRA adapter"),
    ],
)
def test_import_refuses_unsupported_configs(minilm, tmp_path: Path, edit, message) -> None:
    model, _ = minilm
    bank = _bank(model, ["query", "value"], {"e": ExpertConfig(rank=2)})
    export_peft(bank, tmp_path, "e")
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | edit))
    with pytest.raises(ValueError, match=message):
        import_peft(bank, tmp_path, "x")


def test_export_errors(minilm, tmp_path: Path) -> None:
    model, _ = minilm
    bank = _bank(model, ["query", "value"], {"e": ExpertConfig(rank=2)})
    with pytest.raises(KeyError, match="nope"):
        export_peft(bank, tmp_path, {"e": 1.0, "nope": 0.0})
    with pytest.raises(ValueError, match="non-zero"):
        export_peft(bank, tmp_path, {"e": 0.0})
    with pytest.raises(ValueError, match="task_type"):
        export_peft(bank, tmp_path, "e", task_type="causal")
    assert not any(tmp_path.iterdir())
