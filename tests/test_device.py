"""The library on a device: every mixing path, merge, O-LoRA, the gates, the index hand-over and
the continual engine, compared against a float64 CPU reference computation.

Run on the CPU always; ``pytest --device cuda tests/test_device.py`` adds the CUDA variants
(``scripts/gpu_check.sh`` does that on a GPU machine).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from stream_helpers import tiny_text_stream
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.continual.olora import olora_loss
from moe_lora.memory import ExpertIndex, IndexConfig
from moe_lora.routers import MoLEConfig, MoLERouter, TopKConfig, TopKRouter


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _bank(model: nn.Module, n: int = 3) -> ExpertBank:
    bank = ExpertBank(model, targets=["0", "2"])
    for e in range(n):
        bank.add_expert(f"e{e}", ExpertConfig(rank=2 + e, init="gaussian"))
        with torch.no_grad():  # non-zero B so every expert changes the output
            for layer in bank.layers.values():
                layer.experts[e].lora_B.normal_()
    bank.freeze()
    return bank


def _reference(model: nn.Module, bank: ExpertBank, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float64 forward with per-row dense weights ``w [B, E]``, written out layer by layer."""
    h = x.double()
    for i, mod in enumerate(model):
        if isinstance(mod, nn.Linear) or str(i) in bank.layers:
            layer = bank.layers.get(str(i))
            base = layer.base if layer is not None else mod
            y = h @ base.weight.double().t() + base.bias.double()
            if layer is not None:
                for e, f in enumerate(layer.experts):
                    delta = (h @ f.lora_A.double().t()) @ f.lora_B.double().t() * f.scale
                    y = y + w[:, e : e + 1].double() * delta
            h = y
        else:
            h = mod(h)
    return h


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_routing_mode_matches_the_reference(device, mode):
    """Training mode takes the gathered paths, eval mode the packed-stack inference paths."""
    model = _mlp()
    bank = _bank(model)
    bank.to(device)
    bank.train(mode == "train")
    x = torch.randn(6, 16)
    idx = torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.rand(6, 3)
    idx2 = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [1, 1], [2, 1]])
    w2 = torch.rand(6, 2)
    dense2 = torch.zeros(6, 3)
    for b in range(6):
        for j in range(2):
            if idx2[b, j] >= 0:
                dense2[b, idx2[b, j]] += w2[b, j]
    cases = {
        "single": (Routing.single(1), torch.tensor([[0.0, 1.0, 0.0]]).expand(6, 3)),
        "sample": (Routing.per_sample(idx.to(device)), nn.functional.one_hot(idx, 3).float()),
        "sample k=2": (Routing.per_sample(idx2.to(device), w2.to(device)), dense2),
        "sample, CPU index tensors": (Routing.per_sample(idx2, w2), dense2),
        "dense": (Routing.dense(w.to(device)), w),
    }
    bank_cpu = copy.deepcopy(bank).to("cpu")
    for name, (routing, weights) in cases.items():
        with bank.use(routing):
            out = bank(x.to(device)).float().cpu()
        ref = _reference(bank_cpu.model, bank_cpu, x, weights).float()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=name)


def test_merge_equals_dense_routing(device):
    bank = _bank(_mlp()).to(device)
    x = torch.randn(4, 16, device=device)
    with bank.use(Routing.dense(torch.tensor([[0.3, 0.7, 0.0]], device=device).expand(4, 3))):
        mixed = bank(x)
    bank.merge({"e0": 0.3, "e1": 0.7})
    with bank.use(Routing.base()):
        merged = bank(x)
    bank.unmerge()
    torch.testing.assert_close(merged, mixed, rtol=1e-4, atol=1e-4)


def test_olora_loss_on_device(device):
    bank = _bank(_mlp()).to(device)
    bank.unfreeze("e2")
    loss = olora_loss(bank, 2, [0, 1], 0.5, 0.1)
    assert loss.device.type == device.type
    loss.backward()
    grads = [layer.experts[2].lora_A.grad for layer in bank.layers.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    bank_cpu = copy.deepcopy(bank).to("cpu")
    ref = olora_loss(bank_cpu, 2, [0, 1], 0.5, 0.1)
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["loop", "dense", "grouped"])
def test_token_dispatch_on_device_equals_the_reference(device, dispatch):
    """Top-k per token on the device, each dispatch, at inference: equals the per-expert sum."""
    bank = _bank(_mlp()).to(device).eval()
    bank.ctx.token_dispatch = dispatch
    layer = bank.layers["0"]
    x = torch.randn(3, 5, 16)
    idx = torch.randint(0, 3, (3, 5, 2))
    idx[1, 2:, 1] = -1
    w = torch.rand(3, 5, 2)
    with torch.no_grad():
        y = layer.base(x.to(device))
        out = layer.apply_routing(x.to(device), y, Routing.per_token(idx.to(device), w.to(device)))
        ref = y.cpu().double()
        for e, f in enumerate(layer.experts):
            delta = (x.double() @ f.lora_A.cpu().double().t()) @ f.lora_B.cpu().double().t()
            ref += (w * (idx == e)).sum(-1, keepdim=True).double() * delta * f.scale
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router", ["mole", "topk"])
def test_gates_run_on_device_and_equal_the_cpu(router, device):
    bank_cpu = _bank(_mlp())
    make = (lambda b: MoLERouter(MoLEConfig(), b)) if router == "mole" else \
        (lambda b: TopKRouter(TopKConfig(k=2), b))
    torch.manual_seed(1)
    make(bank_cpu).attach()
    bank = copy.deepcopy(bank_cpu).to(device)  # the same gate weights, on the device
    gates = [m for layer in bank.layers.values() for m in layer.modules() if m is not layer]
    assert all(p.device.type == device.type for g in gates for p in g.parameters())
    x = torch.randn(5, 16)
    with bank.use(Routing.gated()):
        out = bank(x.to(device)).cpu()
    with bank_cpu.use(Routing.gated()):
        ref = bank_cpu(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_index_hand_over_from_device_tensors(device):
    rng = np.random.default_rng(0)
    keys = {e: rng.normal(size=(10, 8)).astype(np.float32) for e in range(3)}
    index = ExpertIndex(IndexConfig(dim=8, mode="centroid"))
    for e, k in keys.items():
        index.add_expert(e, torch.from_numpy(k).to(device))
    q = torch.from_numpy(keys[1][:2]).to(device)
    ids, _ = index.search(q, 1)  # device tensors are handed over to faiss-cpu once
    centroids = [k.mean(0) / np.linalg.norm(k.mean(0)) for k in keys.values()]
    exact = [int(np.argmax([c @ v for c in centroids])) for v in keys[1][:2]]
    assert ids[:, 0].tolist() == exact


def test_continual_engine_on_device(device, tmp_path):
    from moe_lora.continual.runner import run_continual
    from moe_lora.continual.settings import load_config

    acc = "cpu" if device.type == "cpu" else "gpu"
    cfg = load_config("configs/split_digits.yaml", [
        f"output.dir={tmp_path}", f"train.accelerator={acc}", "train.epochs=3",
        "strategies.run=[replay,olora,experts-taskid,experts-retrieval,experts-confidence,"
        "experts-mole]", "output.plots=false"])
    results = run_continual(cfg, progress=False)["strategies"]
    assert results["experts-taskid"]["average_accuracy"] >= 0.9
    assert results["experts-taskid"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    assert results["experts-retrieval"]["tp"] >= 0.8


def test_engine_in_bf16_mixed_matches_fp32(device, tmp_path):
    """``train.precision=bf16-mixed`` (autocast: bf16 activations over fp32 experts and packed
    stacks) gives the fp32 run's accuracies within bf16 noise, on the CPU as on CUDA."""
    from moe_lora.continual.runner import run_continual
    from moe_lora.continual.settings import load_config

    acc = "cpu" if device.type == "cpu" else "gpu"
    results = {}
    for precision in ("32", "bf16-mixed"):
        cfg = load_config("configs/split_digits.yaml", [
            f"output.dir={tmp_path / precision}", f"train.accelerator={acc}", "train.epochs=2",
            f"train.precision={precision}", "strategies.run=[olora,experts-taskid,experts-stats]",
            "output.plots=false"])
        results[precision] = run_continual(cfg, progress=False)["strategies"]
    for name in ("olora", "experts-taskid", "experts-stats"):
        aa32 = results["32"][name]["average_accuracy"]
        aa16 = results["bf16-mixed"][name]["average_accuracy"]
        assert abs(aa32 - aa16) <= 0.03, (name, aa32, aa16)
    assert results["bf16-mixed"]["experts-taskid"]["average_accuracy"] >= 0.9


def test_text_engine_on_device(device, tmp_path):
    """The continual engine on a text stream (the issue's CUDA crash was O-LoRA on one): a
    MiniLM-architecture folder with random weights (what a GPU machine without the embedded
    packages can build), a two-task file stream, every kind of strategy. Frozen experts keep
    their task-aware accuracy exactly (forgetting 0) and every result is a finite number."""
    import math

    from benchmarks.fixtures import random_model_folder
    from moe_lora.continual.runner import run_continual
    from moe_lora.continual.settings import load_config

    model = random_model_folder(tmp_path / "minilm-random")
    tiny_text_stream(tmp_path / "stream.jsonl")
    acc = "cpu" if device.type == "cpu" else "gpu"
    cfg = load_config("configs/clinc150.yaml", [
        f"model.name={model}", f"data.path={tmp_path / 'stream.jsonl'}", "data.order=sorted",
        f"output.dir={tmp_path / 'run'}", f"train.accelerator={acc}", "train.epochs=1",
        "strategies.run=[replay,olora,ranpac,experts-taskid,experts-retrieval,experts-mole,"
        "experts-stats]", "strategies.experts.mole.epochs=1", "output.plots=false"])
    results = run_continual(cfg, progress=False)["strategies"]
    assert set(results) >= {"olora", "experts-taskid", "experts-stats", "experts-mole"}
    assert results["experts-taskid"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    for name, r in results.items():
        assert math.isfinite(r["average_accuracy"]), name


def test_engine_trains_lora_layers_in_train_mode_and_evaluates_in_eval_mode(tmp_path, monkeypatch):
    """The bank wraps the backbone's eval-mode model, so its LoRA layers start in eval mode, and
    Lightning keeps submodules' modes: the engine switches them to train mode for each fit
    (expert dropout applies) and back to eval mode after it (evaluation is deterministic)."""
    from benchmarks.fixtures import random_model_folder
    from moe_lora.continual.module import MoELoRAModule
    from moe_lora.continual.runner import run_continual
    from moe_lora.continual.settings import load_config

    seen: dict[str, set[bool]] = {"train": set(), "eval": set()}
    step, logits = MoELoRAModule.training_step, MoELoRAModule.logits

    def training_step(self, batch, batch_idx):
        seen["train"].add(all(layer.training for layer in self.bank.layers.values()))
        seen["train"].add(not any(layer.base.training for layer in self.bank.layers.values()))
        return step(self, batch, batch_idx)

    def eval_logits(self, batch, routing):
        if self._trainer is None or not self.trainer.training:  # outside a fit: evaluation
            seen["eval"].add(not any(layer.training for layer in self.bank.layers.values()))
        return logits(self, batch, routing)

    monkeypatch.setattr(MoELoRAModule, "training_step", training_step)
    monkeypatch.setattr(MoELoRAModule, "logits", eval_logits)
    model = random_model_folder(tmp_path / "minilm-random")
    tiny_text_stream(tmp_path / "stream.jsonl")
    cfg = load_config("configs/clinc150.yaml", [
        f"model.name={model}", f"data.path={tmp_path / 'stream.jsonl'}", "model.dropout=0.3",
        f"output.dir={tmp_path / 'run'}", "train.accelerator=cpu", "train.epochs=1",
        "strategies.run=[naive]", "output.plots=false"])
    run_continual(cfg, progress=False)
    assert seen == {"train": {True}, "eval": {True}}
