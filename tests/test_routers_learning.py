"""On a synthetic two-task problem, the MoLE gate and the top-k router learn to send each task to
its own frozen expert (> 90% of held-out samples)."""

import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, Routing
from moe_lora.routers import GateRouter, MoLEConfig, MoLERouter, TopKConfig, TopKRouter

torch.set_num_threads(1)
N_TOKENS = 4


def two_task_data(n: int, seed: int, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [n, T, d] around one of two fixed centres; the task of each sample [n]."""
    centre = torch.randn(2, d, generator=torch.Generator().manual_seed(0)) * 2.0
    g = torch.Generator().manual_seed(seed)
    task = torch.arange(n) % 2
    return centre[task][:, None, :] + 0.5 * torch.randn(n, N_TOKENS, d, generator=g), task


def two_task_bank(n_distractors: int) -> ExpertBank:
    """Experts e0, e1 define tasks 0, 1; distractors are far from both. One LoRA layer."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    bank = ExpertBank(model, targets=["0"])  # one gated layer: its decision is the sample's
    for e in range(2 + n_distractors):
        bank.add_expert(f"e{e}", ExpertConfig(rank=4, alpha=4, init="random"), trainable=False)
        for p in bank.expert_parameters(f"e{e}").values():
            nn.init.normal_(p, std=0.4 if e < 2 else 0.8)
    return bank


def train_and_measure(bank: ExpertBank, router: GateRouter, lr: float, steps: int) -> float:
    x, task = two_task_data(256, seed=0)
    with torch.no_grad(), bank.use(Routing.per_sample(task)):
        y = bank.model(x)  # task t's target: the model with expert t
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    bank.train()
    for step in range(steps):
        idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        with bank.use(router.routing()):
            loss = nn.functional.mse_loss(bank.model(x[idx]), y[idx]) + bank.pop_aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bank.eval()
    xt, tt = two_task_data(200, seed=1)
    with torch.no_grad(), bank.use(router.routing()):
        bank.model(xt)
    (gate,) = router.gates.values()
    picked = gate.last_probs.reshape(200, N_TOKENS, -1).mean(1).argmax(-1)
    return float((picked == tt).float().mean())


def test_topk_router_learns_the_task_experts():
    bank = two_task_bank(n_distractors=2)
    torch.manual_seed(0)
    cfg = TopKConfig(k=2, balance_coef=0.01, jitter=0.01, init_std=0.0)  # starts uniform
    router = TopKRouter(cfg, bank).attach()
    assert train_and_measure(bank, router, lr=0.05, steps=0) <= 0.6  # untrained: chance
    accuracy = train_and_measure(bank, router, lr=0.05, steps=150)
    assert accuracy > 0.9, accuracy


def test_mole_gate_learns_the_task_experts():
    bank = two_task_bank(n_distractors=1)
    router = MoLERouter(MoLEConfig(balance_coef=0.001), bank).attach()
    assert train_and_measure(bank, router, lr=0.02, steps=0) <= 0.6  # untrained: chance
    accuracy = train_and_measure(bank, router, lr=0.02, steps=150)
    assert accuracy > 0.9, accuracy
