"""LoRAHub: hand-computed compositions and objective, weights that beat uniform, both ways of
keeping the result."""

import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput, Routing
from moe_lora.routers import LoRAHubConfig, LoRAHubRouter, build_router
from moe_lora.routers.lorahub import compose_state

torch.set_num_threads(1)
NAMES = ["e0", "e1", "e2"]
W_TRUE = [1.0, -0.6, 0.2]  # the new task: this composition of the experts


def hub_bank(ranks=(2, 2, 2)) -> ExpertBank:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))
    bank = ExpertBank(model, targets="all-linear")
    for name, r in zip(NAMES, ranks, strict=True):
        bank.add_expert(
            name, ExpertConfig(rank=r, alpha=2.0 * r + 1, init="random"), trainable=False
        )
        for p in bank.expert_parameters(name).values():
            nn.init.normal_(p, std=0.5)
    return bank


def test_compositions_match_hand_computation():
    bank = hub_bank(ranks=(2, 2, 2))
    w = [0.7, -1.2, 0.3]
    for comp in ("parameter", "output"):
        state = compose_state(bank, NAMES, w, comp)
        for path, layer in bank.layers.items():
            fs = layer.experts
            a, b = state[f"{path}.lora_A"], state[f"{path}.lora_B"]
            if comp == "parameter":
                expected = sum(w[i] * fs[i].scale * fs[i].lora_B for i in range(3)) @ sum(
                    w[i] * fs[i].lora_A for i in range(3)
                )
            else:
                expected = sum(w[i] * fs[i].delta_weight() for i in range(3))
            torch.testing.assert_close(b @ a, expected.detach())
    with pytest.raises(ValueError, match="equal ranks"):
        compose_state(hub_bank(ranks=(2, 3, 2)), NAMES, w, "parameter")


def composed_output(bank: ExpertBank, w, composition: str, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` with the composition ``w`` of the experts (a temporary one)."""
    ranks = [bank.info(n).config.rank for n in NAMES]
    rank = ranks[0] if composition == "parameter" else sum(ranks)
    bank.add_expert("tmp", ExpertConfig(rank=rank, alpha=float(rank)), trainable=False)
    bank.set_expert_state("tmp", compose_state(bank, NAMES, w, composition))
    with torch.no_grad():
        y = bank(x, routing="tmp")
    bank.remove_expert("tmp")
    return y


def few_shot_task(bank: ExpertBank, w_true, composition: str):
    """A new task: MSE to the composition ``w_true`` of the bank's experts on 16 inputs."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    y = composed_output(bank, w_true, composition, x)
    return x, lambda: nn.functional.mse_loss(bank.model(x), y)


@pytest.mark.parametrize("composition", ["parameter", "output"])
def test_found_weights_beat_uniform_weights(composition):
    bank = hub_bank(ranks=(2, 2, 2) if composition == "parameter" else (2, 3, 1))
    x, loss_fn = few_shot_task(bank, W_TRUE, composition)
    keep = "expert" if composition == "parameter" else "weights"
    hub = LoRAHubRouter(LoRAHubConfig(composition=composition, keep=keep, budget=60), bank)
    result = hub.fit(loss_fn)
    assert result.evaluations == 60 and set(result.weights) == set(NAMES)
    assert all(abs(v) <= 1.5 for v in result.weights.values())

    target = composed_output(bank, W_TRUE, composition, x)
    uniform = nn.functional.mse_loss(composed_output(bank, [1 / 3] * 3, composition, x), target)
    assert result.task_loss < 0.1 * uniform.item(), (result.task_loss, uniform)
    # the objective adds 0.05 * mean|w| to the task loss
    mean_abs = sum(abs(v) for v in result.weights.values()) / 3
    assert result.objective == pytest.approx(result.task_loss + 0.05 * mean_abs, rel=1e-6)
    # and the router applies what it found
    batch = RouterInput(texts=["a"] * 16)
    with torch.no_grad(), bank.use(hub.routing(batch)):
        assert float(loss_fn()) == pytest.approx(result.task_loss, rel=1e-5)


def test_keep_weights_is_dense_routing_and_keep_expert_is_a_new_expert():
    bank = hub_bank(ranks=(2, 3, 1))
    _, loss_fn = few_shot_task(bank, [0.5, 0.5, -0.5], "output")
    hub = build_router("lorahub", {"composition": "output", "keep": "weights", "budget": 10}, bank)
    result = hub.fit(loss_fn)
    assert bank.names == NAMES  # the scratch expert is gone
    out = hub.route(RouterInput(texts=["x", "y"]))
    assert out.indices is None and out.weights.shape == (2, 3)
    torch.testing.assert_close(out.weights[1], torch.tensor([result.weights[n] for n in NAMES]))
    bank.add_expert("later", ExpertConfig(rank=2))  # keeps up: new expert gets weight 0
    assert hub.route(RouterInput(texts=["x"])).weights.tolist()[0][3] == 0.0
    assert hub.last_weights.shape == (1, 4)

    hub2 = LoRAHubRouter(LoRAHubConfig(composition="output", keep="expert", budget=10,
                                       experts=NAMES, expert_name="hub"), bank)  # fmt: skip
    res2 = hub2.fit(loss_fn)
    assert bank.names[-1] == "hub" and bank.info("hub").meta["lorahub"]["weights"] == res2.weights
    x = torch.randn(3, 6)
    dense = torch.tensor([[res2.weights[n] for n in NAMES] + [0.0, 0.0]] * 3)
    with torch.no_grad():
        torch.testing.assert_close(bank(x, routing="hub"), bank(x, routing=Routing.dense(dense)))
    assert hub2.route(RouterInput(texts=["q"])).indices.tolist() == [[bank.index("hub")]]


def test_errors_and_cleanup():
    with pytest.raises(ValueError, match="keep"):
        LoRAHubConfig(composition="parameter", keep="weights")
    with pytest.raises(ValueError, match="budget"):
        LoRAHubConfig(budget=0)
    bank = hub_bank()
    with pytest.raises(ValueError, match="optimizer"):
        LoRAHubRouter(LoRAHubConfig(optimizer="NoSuchOpt"), bank).fit(lambda: 0.0)
    with pytest.raises(RuntimeError, match="fit"):
        LoRAHubRouter(LoRAHubConfig(), bank).route(RouterInput(texts=["a"]))

    def broken():
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        LoRAHubRouter(LoRAHubConfig(budget=5), bank).fit(broken)
    assert bank.names == NAMES  # the scratch expert was removed
