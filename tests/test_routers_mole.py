"""MoLE gates: hand-computed probabilities, output and balance loss; masking; blocks; growth."""

import math

import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput
from moe_lora.routers import MoLEConfig, MoLERouter

torch.set_num_threads(1)


def add_random_experts(bank: ExpertBank, n: int) -> None:
    for e in range(len(bank), len(bank) + n):
        bank.add_expert(f"e{e}", ExpertConfig(rank=2, alpha=4, init="random"))
        for p in bank.expert_parameters(f"e{e}").values():
            nn.init.normal_(p, std=0.5)


def one_layer_bank(n_experts: int = 3) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(5, 4)), targets="all-linear")
    add_random_experts(bank, n_experts)
    return bank


def hand_mole(layer, x, weight, bias, tau, dropped=()):
    """Per token: expert outputs, per-expert layer norm, linear logits / sqrt(d), softmax(l / tau)."""
    rows, deltas = [], []
    for tok in x.reshape(-1, x.shape[-1]):
        outs = [f.scale * f.lora_B @ (f.lora_A @ tok) for f in layer.experts]
        z = [(o - o.mean()) / torch.sqrt(o.var(unbiased=False) + 1e-5) for o in outs]
        tok_out = outs[0]  # d entries: logits are scaled by 1 / sqrt(d)
        logits = [
            -math.inf
            if j in dropped
            else float(sum(z[i] @ weight[i, :, j] for i in range(len(z))) / math.sqrt(len(tok_out))
                       + bias[j])
            for j in range(len(z))
        ]
        p = torch.softmax(torch.tensor(logits) / tau, 0)
        rows.append(p)
        deltas.append(sum(p[i] * outs[i] for i in range(len(outs))))
    return torch.stack(rows), torch.stack(deltas).detach()


def set_gate(router: MoLERouter, weight, bias, log_tau):
    (gate,) = router.gates.values()
    with torch.no_grad():
        gate.weight.copy_(weight)
        gate.bias.copy_(bias)
        gate.log_tau.fill_(log_tau)


def test_probs_output_and_balance_loss_match_hand_computation():
    bank = one_layer_bank()
    router = MoLERouter(MoLEConfig(balance_coef=0.3), bank).attach()
    assert all(
        not p.requires_grad for name in bank.names for p in bank.expert_parameters(name).values()
    )
    weight, bias = torch.randn(3, 4, 3), torch.randn(3)
    set_gate(router, weight, bias, math.log(0.7))
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    with bank.use(router.routing(RouterInput(attention_mask=mask))):
        y = bank.model(x)
    aux = bank.pop_aux_loss()

    layer = bank.layers["0"]
    probs, deltas = hand_mole(layer, x, weight, bias, 0.7)
    torch.testing.assert_close(y, (layer.base(x) + deltas.reshape(2, 3, 4)).detach())
    m = mask.reshape(-1).float()
    q = (probs * m[:, None]).sum(0) / m.sum()
    assert aux.item() == pytest.approx(0.3 * -sum(math.log(v) for v in q.tolist()), rel=1e-5)
    torch.testing.assert_close(router.last_weights, q[None])


def test_masked_experts_are_dropped_and_the_rest_renormalised():
    bank = one_layer_bank()
    router = MoLERouter(MoLEConfig(), bank).attach()
    weight, bias = torch.randn(3, 4, 3), torch.randn(3)
    set_gate(router, weight, bias, 0.0)
    x = torch.randn(2, 5)
    router.mask_experts(["e1"])
    with torch.no_grad(), bank.use(router.routing()):
        y = bank.model(x)
    layer = bank.layers["0"]
    probs, deltas = hand_mole(layer, x, weight, bias, 1.0, dropped=(1,))
    full, _ = hand_mole(layer, x, weight, bias, 1.0)
    renorm = full[:, [0, 2]] / full[:, [0, 2]].sum(-1, keepdim=True)
    torch.testing.assert_close(probs[:, [0, 2]], renorm)
    (gate,) = router.gates.values()
    torch.testing.assert_close(gate.last_probs, probs)
    torch.testing.assert_close(y, layer.base(x) + deltas)
    with pytest.raises(ValueError, match="every expert"):
        router.mask_experts(bank.names)
    with pytest.raises(KeyError):
        router.mask_experts(["nope"])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def two_block_bank() -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(Block(), Block()), targets="all-linear")
    add_random_experts(bank, 2)
    return bank


def test_block_granularity_shares_one_gate_per_block():
    bank = two_block_bank()
    router = MoLERouter(MoLEConfig(granularity="block"), bank).attach()
    assert router.block_of("0.down") == "0" and router.block_of("1.up") == "1"
    assert router.block_of("encoder.layer.11.attention.self.query") == "encoder.layer.11"
    n_gate_params = len(router.parameters())
    assert n_gate_params == 2 * 3  # two blocks x (weight, bias, log_tau)
    assert len(bank.trainable_parameters()) == n_gate_params  # shared gate counted once
    with torch.no_grad():
        for p in router.parameters():
            p.normal_()
    x = torch.randn(2, 3, 6)
    with torch.no_grad(), bank.use(router.routing()):
        y = bank.model(x)
    lead, member = router.gates["0.up"], router.gates["0.down"]
    torch.testing.assert_close(member.last_probs, lead.last_probs)
    assert not torch.allclose(router.gates["1.up"].last_probs, lead.last_probs)
    assert y.shape == x.shape
    # the member mixes its own experts' outputs with the leader's probabilities
    layer = bank.layers["0.down"]
    with torch.no_grad(), bank.use(router.routing()):
        h = torch.relu(bank.model[0].up(x))  # the leader runs first
        out = layer(h)
        mixed = (lead.last_probs.reshape(2, 3, 2, 1) * layer.expert_outputs(h)).sum(-2)
        torch.testing.assert_close(out, layer.base(h) + mixed)
        with pytest.raises(RuntimeError, match="first LoRA"):
            layer(h)  # the block's leader has not run again since


def test_new_expert_gets_a_new_gate_column_keeping_the_old_ones():
    bank = one_layer_bank(n_experts=2)
    router = MoLERouter(MoLEConfig(), bank).attach()
    (gate,) = router.gates.values()
    with torch.no_grad():
        gate.weight.normal_()
        gate.bias.normal_()
    old_w, old_b = gate.weight.detach().clone(), gate.bias.detach().clone()
    add_random_experts(bank, 1)
    bank.freeze()
    x = torch.randn(4, 5)
    with torch.no_grad(), bank.use(router.routing()):
        bank.model(x)
    assert gate.weight.shape == (3, 4, 3) and gate.last_probs.shape == (4, 3)
    torch.testing.assert_close(gate.weight[:2, :, :2], old_w)
    torch.testing.assert_close(gate.bias[:2], old_b)
    assert gate.weight[2].abs().sum().item() + gate.weight[:, :, 2].abs().sum().item() == 0.0


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_gates_are_sized_at_attach_so_an_optimiser_built_then_trains_them(granularity):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    bank = ExpertBank(nn.Sequential(block), targets="all-linear")  # layers 0.0, 0.2: one block
    add_random_experts(bank, 3)
    router = MoLERouter(MoLEConfig(granularity=granularity), bank).attach()
    shapes = sorted(tuple(p.shape) for p in router.parameters())
    expected = [(), (3,), (3, 4, 3)] + ([(), (3,), (3, 3, 3)] if granularity == "layer" else [])
    assert shapes == sorted(expected)
    opt = torch.optim.Adam(router.parameters(), lr=0.1)  # built before any forward
    before = [p.detach().clone() for p in router.parameters()]
    with bank.use(router.routing()):
        y = bank.model(torch.randn(6, 5))
    (y.pow(2).sum() + bank.pop_aux_loss()).backward()
    opt.step()
    assert [tuple(p.shape) for p in router.parameters()] == [tuple(b.shape) for b in before]
    assert all(not torch.equal(p, b) for p, b in zip(router.parameters(), before, strict=True)
               if p.ndim)  # W and b of every gate moved
    add_random_experts(bank, 1)  # later experts still grow lazily
    bank.freeze()
    assert {tuple(p.shape) for p in router.grow().parameters() if p.ndim == 1} == {(4,)}


def test_a_step_of_adam_does_not_saturate_a_fresh_gate():
    """Logits are scaled by 1/sqrt(d): one Adam step (lr 1e-2) moves them by O(E lr sqrt(d))."""
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(64, 256)), targets="all-linear")
    add_random_experts(bank, 5)
    router = MoLERouter(MoLEConfig(), bank).attach()
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    x = torch.randn(32, 64)
    target = torch.randint(0, 5, (32,))
    for _ in range(2):
        with bank.use(router.routing()):
            bank.model(x)
        bank.pop_aux_loss()
        (gate,) = router.gates.values()
        loss = torch.nn.functional.nll_loss(gate.shared[0].clamp_min(1e-9).log(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(gate.last_probs.max()) < 0.9, float(gate.last_probs.max())
