"""The expert bank's mechanics, checked against explicit per-expert reference computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_lora import CorruptFileError, ExpertBank, ExpertConfig, Routing

RANKS = [("a", 2), ("b", 4), ("c", 3)]


def tiny(in_f: int = 6, hidden: int = 8, out: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_f, hidden), nn.Tanh(), nn.Linear(hidden, out))


def tiny_bank(trainable: bool = False) -> ExpertBank:
    bank = ExpertBank(tiny(), targets="all-linear")
    for name, rank in RANKS:
        bank.add_expert(name, ExpertConfig(rank=rank, init="random"), trainable=trainable)
    return bank


def reference_delta(layer, x: torch.Tensor, e: int) -> torch.Tensor:
    """delta_e(x) = s_e * x A_e^T B_e^T, written out by hand."""
    f = layer.experts[e]
    return f.scale * (x @ f.lora_A.t() @ f.lora_B.t())


# ------------------------------------------------------------------ forward equivalences
def test_zero_init_equals_base():
    model = tiny()
    x = torch.randn(3, 5, 6)
    ref = model(x)
    bank = ExpertBank(model, targets="all-linear")
    bank.add_expert("z", ExpertConfig(rank=4))  # kaiming A, zero B
    with bank.use("z"):
        assert torch.equal(bank(x), ref)


def test_every_routing_kind_matches_reference_in_one_layer():
    bank = tiny_bank()
    layer = bank.layers["0"]
    x = torch.randn(5, 7, 6)
    y = layer.base(x)
    per = torch.stack([reference_delta(layer, x, e) for e in range(3)], dim=-2)  # [B,T,E,out]

    w_tok = torch.rand(5, 7, 3)
    got = layer.apply_routing(x, y, Routing.dense(w_tok))
    torch.testing.assert_close(got, y + (per * w_tok[..., None]).sum(-2), atol=1e-5, rtol=0)

    w_smp = torch.rand(5, 3)
    got = layer.apply_routing(x, y, Routing.dense(w_smp))
    torch.testing.assert_close(got, y + (per * w_smp[:, None, :, None]).sum(-2), atol=1e-5, rtol=0)

    idx = torch.tensor([[0, 2], [1, 0], [2, 2], [1, 1], [0, 1]])
    w = torch.rand(5, 2)
    got = layer.apply_routing(x, y, Routing.per_sample(idx, w))
    ref = y + sum(w[:, j, None, None] * per[torch.arange(5), :, idx[:, j]] for j in range(2))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    tw, ti = w_tok.topk(2, dim=-1)
    layer.expert_calls = 0
    got = layer.apply_routing(x, y, Routing.per_token(ti, tw))
    mask = torch.zeros_like(w_tok).scatter(-1, ti, tw)
    torch.testing.assert_close(got, y + (per * mask[..., None]).sum(-2), atol=1e-5, rtol=0)
    assert layer.expert_calls == len(ti.unique())


def test_token_routing_skips_unused_experts_and_padding():
    bank = tiny_bank()
    layer = bank.layers["0"]
    x = torch.randn(2, 4, 6)
    y = layer.base(x)
    idx = torch.zeros(2, 4, 1, dtype=torch.long)
    idx[1, 2:] = -1  # padding tokens: no expert
    w = torch.ones(2, 4, 1)
    layer.expert_calls = 0
    got = layer.apply_routing(x, y, Routing.per_token(idx, w))
    assert layer.expert_calls == 1
    torch.testing.assert_close(got[1, 2:], y[1, 2:])
    torch.testing.assert_close(got[0], y[0] + reference_delta(layer, x[0], 0), atol=1e-5, rtol=0)


def test_sparse_dense_rows_take_the_gathered_path_with_same_result():
    bank = ExpertBank(tiny(), targets="all-linear")
    for i in range(10):
        bank.add_expert(f"e{i}", ExpertConfig(rank=2, init="random"), trainable=False)
    x = torch.randn(4, 3, 6)
    w = torch.zeros(4, 10)
    w[0, 1], w[1, 5], w[2, 9], w[3, 0] = 0.5, 1.0, 2.0, 1.5
    with bank.use(Routing.dense(w)):
        dense = bank(x)
    idx = torch.tensor([1, 5, 9, 0])
    with bank.use(Routing.per_sample(idx, w[torch.arange(4), idx])):
        gathered = bank(x)
    torch.testing.assert_close(dense, gathered, atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_rows_run_alone_tiny():
    bank = tiny_bank()
    x = torch.randn(6, 5, 6)
    idx = torch.tensor([0, 2, 1, 1, 0, 2])
    with bank.use(Routing.per_sample(idx)):
        mixed = bank(x)
    for b, e in enumerate(idx.tolist()):
        with bank.use(e):
            torch.testing.assert_close(mixed[b], bank(x[b : b + 1])[0], atol=1e-5, rtol=0)


def _randomise(bank: ExpertBank, std: float = 0.05) -> None:
    with torch.no_grad():
        for layer in bank.layers.values():
            for f in layer.experts:
                f.lora_B.normal_(0, std)
    bank.ctx.version += 1


@pytest.mark.slow
def test_mixed_batch_on_real_minilm(minilm):
    model, tok = minilm
    texts = ["a cat sat on the mat", "stocks fell sharply today", "the enzyme binds", "hello"]
    enc = tok(texts, padding=True, return_tensors="pt")
    base_out = model(**enc).last_hidden_state
    bank = ExpertBank(model, base_id="minilm")
    assert sorted({p.rsplit(".", 1)[1] for p in bank.layers}) == ["query", "value"]
    for name, rank in RANKS:
        bank.add_expert(name, ExpertConfig(rank=rank), trainable=False)
    with bank.use(Routing.per_sample(torch.tensor([0, 1, 2, 0]))):
        torch.testing.assert_close(bank(**enc).last_hidden_state, base_out)  # B = 0: the base
    _randomise(bank)
    idx = torch.tensor([2, 0, 1, 2])
    with bank.use(Routing.per_sample(idx)):
        mixed = bank(**enc).last_hidden_state
    for b, e in enumerate(idx.tolist()):
        with bank.use(e):
            alone = bank(**{k: v[b : b + 1] for k, v in enc.items()}).last_hidden_state[0]
        n = int(enc["attention_mask"][b].sum())
        torch.testing.assert_close(mixed[b, :n], alone[:n], atol=1e-5, rtol=0)
    assert (mixed - base_out).abs().max() > 1e-3  # the experts did act


@pytest.mark.slow
def test_mixed_batch_on_real_smollm2(smollm2):
    model, tok = smollm2
    enc = tok(["The capital of France is", "2 + 2 ="], padding=True, return_tensors="pt")
    bank = ExpertBank(model, base_id="smollm2-135m")
    assert sorted({p.rsplit(".", 1)[1] for p in bank.layers}) == ["q_proj", "v_proj"]
    for name, rank in RANKS[:2]:
        bank.add_expert(name, ExpertConfig(rank=rank), trainable=False)
    _randomise(bank, 0.02)
    idx = torch.tensor([1, 0])
    with bank.use(Routing.per_sample(idx)):
        mixed = bank(**enc).logits
    for b, e in enumerate(idx.tolist()):
        with bank.use(e):
            alone = bank(**{k: v[b : b + 1] for k, v in enc.items()}).logits[0]
        keep = enc["attention_mask"][b].bool()
        torch.testing.assert_close(mixed[b][keep], alone[keep], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ merge
def test_merge_equals_unmerged_and_unmerge_restores():
    bank = tiny_bank()
    x = torch.randn(3, 6)
    before = {p: layer.base.weight.detach().clone() for p, layer in bank.layers.items()}
    mix = {"a": 0.3, "c": -0.7, "b": 1.2}
    w = torch.tensor([[mix[n] for n in bank.names]]).expand(3, -1)
    with bank.use(Routing.dense(w)):
        routed = bank(x)
    bank.merge(mix)
    torch.testing.assert_close(bank(x), routed, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="merged"):
        bank.set_routing("a")
    bank.unmerge()
    for p, layer in bank.layers.items():
        torch.testing.assert_close(layer.base.weight, before[p], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ gradients
def test_gradients_reach_exactly_the_used_trainable_experts():
    torch.manual_seed(1)
    bank = ExpertBank(nn.Sequential(nn.Linear(6, 4)), targets="all-linear")
    bank.add_expert("old", ExpertConfig(rank=2, init="random"), trainable=False)
    bank.add_expert("new", ExpertConfig(rank=3, init="random"), trainable=True)
    bank.add_expert("unused", ExpertConfig(rank=2, init="random"), trainable=True)
    layer = bank.layers["0"]
    x = torch.randn(5, 6)
    w = torch.tensor([[0.4, 0.6, 0.0]]).expand(5, -1)
    with bank.use(Routing.dense(w)):
        loss = bank(x).pow(2).sum()
    loss.backward()
    assert layer.base.weight.grad is None
    assert layer.experts[0].lora_A.grad is None  # frozen
    assert layer.experts[2].lora_A.grad is None  # weight 0: not computed
    # hand-written reference for the trainable expert
    old, new = layer.experts[0], layer.experts[1]
    a = new.lora_A.detach().clone().requires_grad_(True)
    b = new.lora_B.detach().clone().requires_grad_(True)
    y = layer.base(x) + 0.4 * old.scale * x @ old.lora_A.t() @ old.lora_B.t()
    y = y + 0.6 * new.scale * x @ a.t() @ b.t()
    y.pow(2).sum().backward()
    torch.testing.assert_close(new.lora_A.grad, a.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.lora_B.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_per_sample_routing_trains_only_routed_experts():
    bank = tiny_bank(trainable=True)
    x = torch.randn(4, 6)
    with bank.use(Routing.per_sample(torch.tensor([0, 0, 2, 2]))):
        bank(x).sum().backward()
    grads = [bank.layers["0"].experts[e].lora_A.grad for e in range(3)]
    assert grads[0] is not None and grads[2] is not None and grads[1] is None


def test_frozen_bank_costs_no_optimizer_state():
    bank = ExpertBank(tiny(), targets="all-linear")
    for i in range(100):
        bank.add_expert(f"old{i}", ExpertConfig(rank=4), trainable=False)
    bank.add_expert("new", ExpertConfig(rank=4))
    params = bank.trainable_parameters()
    assert len(params) == 4  # A and B in 2 layers
    opt = torch.optim.AdamW(params)
    with bank.use("new"):
        bank(torch.randn(2, 6)).sum().backward()
    opt.step()
    assert len(opt.state) == 4


# ------------------------------------------------------------------ bank management
def test_add_remove_freeze_and_metadata():
    bank = tiny_bank(trainable=True)
    assert bank.names == ["a", "b", "c"] and len(bank) == 3
    bank.freeze("b")
    assert not bank.info("b").trainable and bank.info("a").trainable
    bank.remove_expert("a")
    assert bank.names == ["b", "c"] and bank.index("c") == 1
    assert bank.layers["0"].experts[1].rank == 3
    with pytest.raises(ValueError, match="already exists"):
        bank.add_expert("b")
    with pytest.raises(KeyError, match="no expert named 'zz'"):
        bank.index("zz")
    with pytest.raises(IndexError):
        bank.set_routing(Routing.per_sample(torch.tensor([5])))
    assert ExpertConfig(rank=4, alpha=8, rslora=True).scale == pytest.approx(4.0)
    with pytest.raises(ValueError, match="rank"):
        ExpertConfig(rank=0)


def test_wrong_target_lists_available_names():
    with pytest.raises(ValueError, match=r"target 'qkv' matches no .*'0', '2'"):
        ExpertBank(tiny(), targets=["qkv"])
    with pytest.raises(ValueError, match="Linear and Conv1D only"):
        ExpertBank(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), targets=["1"])


def test_gpt2_conv1d_single_expert_matches_reference():
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    bank = ExpertBank(model.eval(), targets="auto")
    assert list(bank.layers) == ["h.0.attn.c_attn"]
    bank.add_expert("e", ExpertConfig(rank=2, init="random"))
    layer = bank.layers["h.0.attn.c_attn"]
    x = torch.randn(2, 3, 16)
    with bank.use("e"):
        got = layer(x)
    torch.testing.assert_close(got, layer.base(x) + reference_delta(layer, x, 0), atol=1e-6, rtol=0)
    bank.merge("e")
    torch.testing.assert_close(layer(x), got, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ storage
def test_save_load_is_bit_identical(tmp_path):
    torch.manual_seed(3)
    model = tiny()
    bank = ExpertBank(model, targets="all-linear", base_id="tiny")
    for name, rank in RANKS:
        bank.add_expert(name, ExpertConfig(rank=rank, init="random"), task=name, trainable=False)
    bank.info("b").meta["note"] = "kept"
    bank.save(tmp_path / "bank")
    fresh = tiny()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items()
                           if "experts" not in k})
    loaded = ExpertBank.load(tmp_path / "bank", fresh)
    assert loaded.names == bank.names and loaded.info("b").meta == {"note": "kept"}
    for n in bank.names:
        for k, v in bank.expert_state(n).items():
            assert torch.equal(loaded.expert_state(n)[k], v), k
    x = torch.randn(4, 6)
    idx = torch.tensor([0, 1, 2, 1])
    with bank.use(Routing.per_sample(idx)), loaded.use(Routing.per_sample(idx)):
        assert torch.equal(bank(x), loaded(x))


def test_single_expert_files_and_wrong_base(tmp_path):
    bank = tiny_bank()
    bank.save_expert("b", tmp_path / "b")
    other = ExpertBank(tiny(), targets="all-linear")  # same shapes, other weights
    with pytest.raises(ValueError, match="weights differ"):
        other.load_expert(tmp_path / "b")
    assert other.load_experts(tmp_path / "b", strict_base=False) == [0]
    wrong = ExpertBank(tiny(in_f=7), targets="all-linear")
    with pytest.raises(ValueError, match="layer 0 was"):
        wrong.load_expert(tmp_path / "b")


def test_corrupted_or_truncated_files_are_refused(tmp_path):
    bank = tiny_bank()
    folder = bank.save(tmp_path / "bank")
    version = folder / (folder / "CURRENT").read_text().split()[0]
    tensors = version / "experts.safetensors"
    good = tensors.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="experts.safetensors: checksum mismatch"):
        ExpertBank(tiny(), targets="all-linear").load_experts(folder, strict_base=False)
    tensors.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError, match="experts.safetensors"):
        ExpertBank(tiny(), targets="all-linear").load_experts(folder, strict_base=False)
    tensors.write_bytes(good)
    (version / "manifest.json").write_text('{"format": "moe-lora-bank/2", "base": ')
    with pytest.raises(CorruptFileError, match="manifest.json: checksum mismatch"):
        ExpertBank(tiny(), targets="all-linear").load_experts(folder, strict_base=False)


@pytest.mark.slow
def test_per_token_merge_and_grads_on_real_minilm(minilm):
    model, tok = minilm
    enc = tok(["the quick brown fox", "a bank of experts routes tokens"], padding=True,
              return_tensors="pt")
    bank = ExpertBank(model, base_id="minilm")
    for name, rank in RANKS:
        bank.add_expert(name, ExpertConfig(rank=rank), trainable=False)
    _randomise(bank)
    path = "encoder.layer.3.attention.self.query"
    layer = bank.layers[path]
    captured = {}
    hook = layer.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    with torch.no_grad():
        bank(**enc)
    hook.remove()
    x = captured["x"]  # real hidden states entering a real MiniLM projection [B, T, 384]
    y = layer.base(x)
    per = torch.stack([reference_delta(layer, x, e) for e in range(3)], dim=-2)
    w = torch.softmax(torch.randn(*x.shape[:2], 3), -1)
    torch.testing.assert_close(
        layer.apply_routing(x, y, Routing.dense(w)), y + (per * w[..., None]).sum(-2),
        atol=1e-5, rtol=0,
    )
    mix = {"a": 0.5, "b": 0.25, "c": 0.25}
    dense = torch.tensor([[mix[n] for n in bank.names]]).expand(2, -1)
    with torch.no_grad(), bank.use(Routing.dense(dense)):
        routed = bank(**enc).last_hidden_state
    bank.merge(mix)
    with torch.no_grad():
        merged = bank(**enc).last_hidden_state
    torch.testing.assert_close(merged, routed, atol=1e-4, rtol=1e-4)
    bank.unmerge()
    bank.unfreeze("b")
    with bank.use(Routing.per_sample(torch.tensor([1, 0]))):
        bank(**enc).last_hidden_state.pow(2).mean().backward()
    grads = {n: bank.expert_parameters(n)[f"{path}.lora_A"].grad for n in bank.names}
    assert grads["b"] is not None and grads["b"].abs().sum() > 0
    assert grads["a"] is None and grads["c"] is None
    assert all(p.grad is None for n, p in model.named_parameters() if "experts" not in n)


def test_uniform_per_sample_routing_takes_the_single_path():
    assert Routing.per_sample(torch.tensor([2, 2, 2])).uniform_expert() == 2
    assert Routing.per_sample(torch.tensor([2, 1, 2])).uniform_expert() is None
    assert Routing.per_sample(torch.tensor([2, 2]), torch.tensor([1.0, 0.5])).uniform_expert() is None
    assert Routing.per_sample(torch.tensor([-1, -1])).uniform_expert() is None
    assert Routing.per_sample(torch.tensor([[1, 1], [1, 1]])).uniform_expert() is None
    bank = tiny_bank()
    x = torch.randn(3, 6)
    with bank.use(1):
        single = bank(x)
    with bank.use(Routing.per_sample(torch.tensor([1, 1, 1]))):
        torch.testing.assert_close(bank(x), single, atol=0, rtol=0)


@pytest.mark.parametrize("trainable", [False, True])
def test_token_dispatches_equal_the_sorted_loop(trainable):
    """The sync-free token paths give the loop's output (and, where they apply, its gradients),
    padding slots included: ``dense`` (scatter the top-k weights, one masked pass over every
    expert) and ``grouped`` (two ``torch._grouped_mm`` calls over rows sorted by expert; frozen
    experts at inference only, else it falls back to the loop)."""
    from moe_lora.core.layers import RoutingContext

    bank = ExpertBank(tiny(in_f=8, hidden=12, out=4), targets="all-linear")
    for i, r in enumerate([2, 4, 3, 1, 2]):  # ranks padded to a common, then aligned, width
        bank.add_expert(f"e{i}", ExpertConfig(rank=r, init="random"), trainable=trainable)
    layer = bank.layers["0"]
    x = torch.randn(3, 5, 8)
    y = layer.base(x)
    idx = torch.randint(0, 5, (3, 5, 2))
    idx[2, 3:, 1] = -1  # padding slots
    w = torch.rand(3, 5, 2)
    outs, grads = {}, {}
    for mode in ("loop", "dense", "grouped"):
        bank.ctx.token_dispatch = mode
        for p in bank.parameters():
            p.grad = None
        layer.expert_calls = 0
        out = layer.apply_routing(x, y, Routing.per_token(idx, w))
        outs[mode] = out.detach()
        if mode == "grouped":  # trainable experts need gradients: grouped falls back to the loop
            assert (layer.expert_calls > 0) == trainable
        if trainable:
            out.square().sum().backward()
            grads[mode] = torch.cat([f.lora_A.grad.flatten() for f in layer.experts])
    for mode in ("dense", "grouped"):
        torch.testing.assert_close(outs[mode], outs["loop"], atol=1e-5, rtol=1e-5)
        if trainable:
            torch.testing.assert_close(grads[mode], grads["loop"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="token_dispatch='fast'"):
        RoutingContext(token_dispatch="fast")


# ------------------------------------------------------------------ launch-lean inference paths
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_per_sample_routing_matches_reference_at_inference_and_training(mode):
    """``sample`` routing has two paths: frozen experts at inference gather both factors from one
    packed stack (row -1 = a zero row), training gathers per used expert. Both equal the
    reference, with mixed ranks, k = 2, unit and given weights, and -1 slots (a non-finite weight
    on a -1 slot included: it must not reach the output)."""
    bank = tiny_bank()
    bank.train(mode == "train")
    layer = bank.layers["0"]
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        y = layer.base(x)
        per = torch.stack([reference_delta(layer, x, e) for e in range(3)], dim=-2)  # [B,T,E,out]
        idx = torch.tensor([[0, 2], [1, -1], [2, 2], [-1, -1]])
        w = torch.tensor([[0.3, 0.7], [0.5, float("nan")], [1.0, 0.25], [2.0, 3.0]])
        for weights in (None, w):
            got = layer.apply_routing(x, y, Routing.per_sample(idx, weights))
            wt = torch.ones(4, 2) if weights is None else weights
            ref = y.clone()
            for j in range(2):
                for b in range(4):
                    if idx[b, j] >= 0:
                        ref[b] += wt[b, j] * per[b, :, idx[b, j]]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        one = Routing.per_sample(torch.tensor([2, -1, 0, 1]))
        got = layer.apply_routing(x, y, one)
        ref = y + torch.stack([per[0, :, 2], torch.zeros_like(y[0]), per[2, :, 0], per[3, :, 1]])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_wrapping_keeps_the_model_mode_and_the_stack_follows_dtype_and_device():
    """A bank over an eval-mode model is in eval mode (no dropout, inference paths), and the
    cached frozen stack is rebuilt when the model moves to another dtype."""
    bank = ExpertBank(tiny().eval(), targets="all-linear")
    assert not any(layer.training for layer in bank.layers.values())
    for name, rank in RANKS:
        bank.add_expert(name, ExpertConfig(rank=rank, init="random"), trainable=False)
    x = torch.randn(3, 6)
    routing = Routing.per_sample(torch.tensor([0, 1, 2]), torch.tensor([0.5, 1.0, 2.0]))
    with torch.no_grad(), bank.use(routing):
        out32 = bank(x)
        bank.model.double()
        out64 = bank(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, atol=1e-5, rtol=1e-5)


def _kernels(fn) -> dict[str, int]:
    """The aten operations ``fn`` runs, by name (views excluded): the kernels it launches."""
    from benchmarks.harness import count_kernels

    return count_kernels(fn)


def test_mixed_inference_launches_few_kernels_per_layer():
    """Launch counts of one LoRA layer at inference, the bound that matters on a GPU where small
    shapes are launch-bound: ``sample`` routing is one gather and two batched matmuls (plus one
    product with weights) beside the base projection; a router's top-k (``valid``) routed
    densely is five kernels. Counted by the dispatcher, so the bound holds on any device."""
    bank = ExpertBank(tiny(in_f=16, hidden=16, out=4).eval(), targets=["0"])
    for i in range(8):
        bank.add_expert(f"e{i}", ExpertConfig(rank=4, init="random"), trainable=False)
    layer, x = bank.layers["0"], torch.randn(8, 5, 16)
    idx = torch.arange(8) % 8
    cases = {
        "sample": (Routing.per_sample(idx), {"addmm": 1, "index_select": 1, "bmm": 1,
                                             "baddbmm": 1}),
        "sample weighted": (Routing.per_sample(idx, torch.rand(8)),
                            {"addmm": 1, "index_select": 1, "bmm": 1, "mul": 1, "baddbmm": 1}),
        "token valid": (Routing.per_token(torch.randint(0, 8, (8, 5, 2)), torch.rand(8, 5, 2),
                                          valid=True),
                        {"addmm": 2, "new_zeros": 1, "scatter_add_": 1, "mm": 1, "mul": 1}),
    }
    bank.ctx.token_dispatch = "dense"
    for name, (routing, expected) in cases.items():
        with torch.no_grad(), bank.use(routing):
            layer(x)  # warm: the stack and the per-routing tables are built once

            assert _kernels(lambda: layer(x)) == expected, name


@pytest.mark.parametrize("kind", ["sample", "token", "gated"])
def test_inference_routing_compiles_as_one_graph(kind):
    """No host synchronisation on the inference paths: ``torch.compile(fullgraph=True)`` traces
    the whole forward (what CUDA graphs need), gives the eager output, and does not recompile
    for every new routing."""
    from torch._dynamo.utils import counters

    from moe_lora.core.routing import RouterInput
    from moe_lora.routers import TopKConfig, TopKRouter

    torch._dynamo.reset()
    counters.clear()
    bank = ExpertBank(tiny(in_f=16, hidden=16, out=4).eval(), targets="all-linear")
    for i in range(6):
        bank.add_expert(f"e{i}", ExpertConfig(rank=4, init="random"), trainable=False)
    if kind == "gated":
        router = TopKRouter(TopKConfig(k=2), bank).attach()
        bank.eval()
    compiled = torch.compile(bank.model, fullgraph=True, backend="eager")
    x = torch.randn(4, 5, 16)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        if kind == "sample":
            routing = Routing.per_sample(torch.randint(-1, 6, (4, 2), generator=g),
                                         torch.rand(4, 2, generator=g))
        elif kind == "token":
            routing = Routing.per_token(torch.randint(0, 6, (4, 5, 2), generator=g),
                                        torch.rand(4, 5, 2, generator=g))
        else:
            routing = router.routing(RouterInput(attention_mask=(torch.rand(4, 5, generator=g)
                                                                 > 0.2).long()))
        with torch.no_grad(), bank.use(routing):
            got = compiled(x)
            ref = bank.model(x)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2


def test_no_grad_forwards_keep_no_aux_losses():
    """Gates report auxiliary losses for training; a server running no-grad forwards must not
    pile them up (one tensor per layer per forward) until someone pops them."""
    from moe_lora.routers import TopKConfig, TopKRouter

    bank = tiny_bank(trainable=True)
    TopKRouter(TopKConfig(k=2), bank).attach()
    x = torch.randn(3, 5, 6)
    with bank.use(Routing.gated()):
        with torch.no_grad():
            for _ in range(3):
                bank(x)
        assert bank.ctx.aux_losses == []
        bank(x).sum().backward()
    assert len(bank.ctx.aux_losses) == 2  # one per gated layer
    assert bank.pop_aux_loss().requires_grad


def test_a_valid_promise_is_checked_when_the_routing_is_set():
    """``valid=True`` lets the layers skip the padding masks, so a -1 slot in such a routing is
    refused when the routing is set instead of indexing out of range."""
    bank = tiny_bank()
    with pytest.raises(ValueError, match="valid=True"):
        bank.set_routing(Routing.per_token(torch.tensor([[[0, -1]]]), torch.ones(1, 1, 2),
                                           valid=True))
    with pytest.raises(ValueError, match="valid=True"):
        bank.set_routing(Routing.per_sample(torch.tensor([1, -1]), valid=True))
    bank.set_routing(Routing.per_sample(torch.tensor([1, 2]), valid=True))  # a kept promise


_SYNCING = {"_local_scalar_dense", "aminmax", "nonzero", "_unique2", "unique_consecutive", "item"}


@pytest.mark.parametrize("router", ["topk", "mole"])
def test_gated_training_steps_never_wait_for_the_device(router):
    """A training step (forward and backward) through top-k gates over trainable experts
    (``dense`` dispatch, the CUDA default) or MoLE gates over frozen experts reads no value back
    to the host: no ``.item()``/``.tolist()``, ``nonzero``, ``unique`` or range check. Each would
    stall the GPU once per layer. Live stacks of equal-rank experts are two stacks and a product."""
    from moe_lora.core.routing import RouterInput
    from moe_lora.routers import MoLEConfig, MoLERouter, TopKConfig, TopKRouter

    bank = ExpertBank(tiny(in_f=16, hidden=16, out=4), targets="all-linear")
    for i in range(4):
        bank.add_expert(f"e{i}", ExpertConfig(rank=4, init="random"), trainable=router == "topk")
    gates = (TopKRouter(TopKConfig(k=2), bank) if router == "topk"
             else MoLERouter(MoLEConfig(), bank)).attach()
    bank.train()
    bank.ctx.token_dispatch = "dense"
    x, mask = torch.randn(3, 5, 16), torch.ones(3, 5)

    def step() -> None:
        with bank.use(gates.routing(RouterInput(attention_mask=mask))):
            loss = bank(x).square().mean() + bank.pop_aux_loss()
        loss.backward()

    step()
    ops = _kernels(step)
    assert not _SYNCING & set(ops), ops
    if router == "topk":
        assert "constant_pad_nd" not in ops  # equal ranks: stacked without padding
