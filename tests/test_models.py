"""Resolving names to the embedded real models (MiniLM, SmolLM2-135M) and their LoRA targets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from moe_lora.models import default_targets, load_base, model_cache_dir


def test_minilm_loads_with_hidden_384() -> None:
    base = load_base("minilm")
    assert (type(base.model).__name__, base.family, base.name) == ("BertModel", "bert", "minilm")
    assert base.default_targets == ["query", "value"]
    assert not base.model.training
    batch = base.tokenizer(["dog: a domestic animal"], return_tensors="pt")
    with torch.no_grad():
        hidden = base.model(**batch).last_hidden_state
    assert hidden.shape == (1, batch["input_ids"].shape[1], 384)
    assert torch.isfinite(hidden).all()


def test_minilm_is_not_a_causal_lm() -> None:
    with pytest.raises(ValueError, match="encoder"):
        load_base("minilm", task="causal-lm")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/model", r"not an embedded model \['minilm', 'smollm2-135m'\].*does not exist"),
        ("minlm", "did you mean 'minilm'"),
    ],
)
def test_unknown_names_fail_with_embedded_list(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_base(name)


def test_bad_task_kind() -> None:
    with pytest.raises(ValueError, match="task must be"):
        load_base("minilm", task="seq2seq")  # type: ignore[arg-type]


def test_default_targets_by_architecture() -> None:
    tiny_gpt2 = GPT2Model(
        GPT2Config(
            n_layer=1,
            n_embd=16,
            n_head=2,
            vocab_size=50,
            n_positions=8,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    assert default_targets(tiny_gpt2) == ["c_attn"]
    assert (
        default_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == "all-linear"
    )


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path))
    assert model_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("MOE_LORA_CACHE")
    assert model_cache_dir("x") == Path.home() / ".cache" / "moe_lora" / "models" / "x"


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MOE_LORA_CACHE", str(tmp_path))
    start = time.perf_counter()
    first = load_base("smollm2-135m")
    first_s = time.perf_counter() - start
    cache = tmp_path / "models" / "smollm2-135m"
    assert {"model.safetensors", "config.json", "tokenizer.json", "moe_lora_cache.json"} <= {
        p.name for p in cache.iterdir()
    }
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert not list(cache.parent.glob(".smollm2-135m.*"))  # the temp dir was renamed away

    start = time.perf_counter()
    second = load_base("smollm2-135m")
    cached_s = time.perf_counter() - start
    print(f"smollm2-135m: first load {first_s:.1f} s, cached load {cached_s:.2f} s")
    assert cached_s < 5.0 and cached_s < first_s / 3

    model = second.model
    assert type(model).__name__ == "LlamaForCausalLM" and second.family == "llama"
    assert second.default_targets == ["q_proj", "v_proj"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    for (name, a), b in zip(
        first.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    ids = second.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert (
        logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    )
    encoder = load_base("smollm2-135m", task="encoder")
    assert type(encoder.model).__name__ == "LlamaModel"
