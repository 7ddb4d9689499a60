"""Top-k token routing (MixLoRA): hand-computed weights and losses, sparsity, learning."""

import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput, Routing
from moe_lora.routers import TopKConfig, TopKRouter, build_router

torch.set_num_threads(1)


def one_layer_bank(n_experts: int = 4, d_in: int = 5, d_out: int = 3) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(d_in, d_out)), targets="all-linear")
    for e in range(n_experts):
        bank.add_expert(f"e{e}", ExpertConfig(rank=2, alpha=4, init="random"), trainable=False)
        for p in bank.expert_parameters(f"e{e}").values():
            nn.init.normal_(p, std=0.5)
    return bank


def set_router_weight(router: TopKRouter, w: torch.Tensor) -> None:
    (gate,) = router.gates.values()
    gate.grow(w.shape[0])
    with torch.no_grad():
        gate.weight.copy_(w)


@pytest.mark.parametrize("normalize", [True, False])
def test_weights_and_aux_loss_match_hand_computation(normalize):
    bank = one_layer_bank()
    cfg = TopKConfig(k=2, normalize=normalize, balance_coef=0.5, z_coef=0.1)
    router = TopKRouter(cfg, bank).attach()
    w_router = torch.randn(4, 5)
    set_router_weight(router, w_router)
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with bank.use(router.routing(RouterInput(attention_mask=mask))):
        y = bank.model(x)
    aux = bank.pop_aux_loss()

    layer = bank.layers["0"]
    n_exp, real = 4, [(b, t) for b in range(2) for t in range(3) if mask[b, t]]
    counts, prob_sum, z_sum = [0.0] * n_exp, [0.0] * n_exp, 0.0
    expected = layer.base(x).detach().clone()
    for b, t in real:
        logits = [float(w_router[e] @ x[b, t]) for e in range(n_exp)]
        z = torch.logsumexp(torch.tensor(logits), 0)
        probs = (torch.tensor(logits) - z).exp().tolist()
        top = sorted(range(n_exp), key=lambda e: -probs[e])[:2]
        for e in range(n_exp):
            prob_sum[e] += probs[e]
        z_sum += float(z) ** 2
        for e in top:
            counts[e] += 1
            f = layer.experts[e]
            delta = f.scale * (f.lora_B @ (f.lora_A @ x[b, t]))
            norm = sum(probs[j] for j in top) if normalize else 1.0
            expected[b, t] += probs[e] / norm * delta.detach()
    m = len(real)
    balance = n_exp * sum(counts[e] / m * prob_sum[e] / m for e in range(n_exp))
    assert aux.item() == pytest.approx(0.5 * balance + 0.1 * z_sum / m, rel=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # padding token: base only
    assert router.last_weights.shape == (1, 4)
    torch.testing.assert_close(router.last_weights[0], torch.tensor(prob_sum) / m)


def test_only_selected_experts_are_computed_and_equal_dense():
    bank = one_layer_bank(n_experts=5)
    router = TopKRouter(TopKConfig(k=1), bank).attach()
    w = torch.zeros(5, 5)
    w[1, 0], w[3, 0] = 5.0, -5.0  # sign of feature 0 picks expert 1 or 3
    set_router_weight(router, w)
    x = torch.randn(3, 4, 5)
    layer = bank.layers["0"]
    calls = layer.expert_calls
    with bank.use(router.routing()):
        y = bank.model(x)
    assert layer.expert_calls - calls == 2  # experts 1 and 3 only, once each

    chosen = torch.where(x[..., 0] > 0, 1, 3)
    dense = torch.zeros(3, 4, 5).scatter_(-1, chosen[..., None], 1.0)
    with bank.use(Routing.dense(dense)):
        torch.testing.assert_close(y, bank.model(x))
    outs = layer.expert_outputs(x)  # [B, T, E, out]
    manual = layer.base(x) + (dense[..., None] * outs).sum(-2)
    torch.testing.assert_close(y, manual.detach(), rtol=1e-5, atol=1e-5)
    with bank.use(router.routing()):  # [N, in] inputs: per-row routing, same result
        torch.testing.assert_close(bank.model(x.reshape(12, 5)), y.reshape(12, 3))


def test_jitter_only_in_training_and_new_expert_gets_a_row():
    bank = one_layer_bank(n_experts=2)
    router = build_router("topk", {"k": 2, "jitter": 0.5}, bank).attach()
    x = torch.randn(2, 3, 5)
    bank.eval()
    with bank.use(router.routing()):
        y1, y2 = bank.model(x), bank.model(x)
    torch.testing.assert_close(y1, y2)
    bank.train()
    with bank.use(router.routing()):
        y3 = bank.model(x)
    assert not torch.allclose(y1, y3)

    (gate,) = router.gates.values()
    old = gate.weight.detach().clone()
    bank.add_expert("e2", ExpertConfig(rank=2), trainable=False)
    with bank.use(router.routing()):
        bank.model(x)
    assert gate.weight.shape == (3, 5)
    torch.testing.assert_close(gate.weight[:2].detach(), old)
    assert router.last_weights.shape == (1, 3)


def test_inference_skips_the_auxiliary_losses():
    bank = one_layer_bank()
    router = TopKRouter(TopKConfig(k=2, balance_coef=1.0, z_coef=1.0), bank).attach()
    x = torch.randn(2, 3, 5)
    with bank.use(router.routing(RouterInput())):
        bank.model(x)
    assert bank.pop_aux_loss() > 0  # training mode with grad: the losses are computed
    bank.eval()
    with torch.no_grad(), bank.use(router.routing(RouterInput())):
        bank.model(x)
    assert bank.pop_aux_loss() == 0
    (gate,) = router.gates.values()
    torch.testing.assert_close(gate.last_load.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_matches_torch_topk_values_indices_and_grads(k):
    from moe_lora.routers.topk import top_k

    logits = torch.randn(50, 8, requires_grad=True)
    values, indices = top_k(logits, k)
    ref_v, ref_i = logits.topk(k, dim=-1)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(values, ref_v)
    w = torch.randn(50, k)
    (grad,) = torch.autograd.grad((values * w).sum(), logits)
    (ref,) = torch.autograd.grad((ref_v * w).sum(), logits)
    torch.testing.assert_close(grad, ref)
