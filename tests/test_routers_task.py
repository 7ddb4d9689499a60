"""Task-id routing: weights by hand, unknown tasks, growth with the bank, equivalence of outputs."""

import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput, Routing
from moe_lora.routers import TaskRouter, TaskRouterConfig, UnknownTaskError, build_router

torch.set_num_threads(1)


def task_bank() -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), "all-linear")
    for name, task in [("t0", 0), ("t1", 1), ("t1b", 1), ("free", None)]:
        bank.add_expert(name, ExpertConfig(rank=2, init="random"), task=task, trainable=False)
    return bank


def test_weights_match_hand_computation():
    bank = task_bank()
    router = TaskRouter(TaskRouterConfig(), bank)
    out = router.route(RouterInput(task_ids=torch.tensor([1, 0, 1])))
    expected = torch.tensor([[0, 0.5, 0.5, 0], [1, 0, 0, 0], [0, 0.5, 0.5, 0]])
    torch.testing.assert_close(router.last_weights, expected)
    assert out.indices.tolist() == [[1, 2], [0, -1], [1, 2]]
    assert out.aux_loss.item() == 0.0

    avg = router.average(2)
    torch.testing.assert_close(router.last_weights, torch.full((2, 4), 0.25))
    assert avg.indices.shape == (2, 4)


def test_outputs_equal_each_expert_alone():
    bank = task_bank()
    router = build_router("task", {}, bank)
    x = torch.randn(3, 4)
    with torch.no_grad(), bank.use(router.routing(RouterInput(task_ids=torch.tensor([0, 1, 0])))):
        y = bank.model(x)
    with torch.no_grad():
        torch.testing.assert_close(y[[0, 2]], bank(x[[0, 2]], routing="t0"))
    dense = torch.tensor([[0.0, 0.5, 0.5, 0.0]])  # task 1: the mean of its experts in every layer
    with torch.no_grad():
        torch.testing.assert_close(y[1:2], bank(x[1:2], routing=Routing.dense(dense)))


def test_unknown_task_is_a_clear_error_or_the_uniform_fallback():
    bank = task_bank()
    with pytest.raises(UnknownTaskError, match=r"task 7.*\[0, 1\]"):
        TaskRouter(TaskRouterConfig(), bank).route(RouterInput(task_ids=torch.tensor([0, 7])))
    with pytest.raises(UnknownTaskError, match="task_ids"):
        TaskRouter(TaskRouterConfig(), bank).route(RouterInput(texts=["a"]))
    router = TaskRouter(TaskRouterConfig(fallback="uniform", experts=["t0", "free"]), bank)
    router.route(RouterInput(task_ids=torch.tensor([7, 0])))
    torch.testing.assert_close(router.last_weights, torch.tensor([[0.5, 0, 0, 0.5], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="fallback"):
        TaskRouterConfig(fallback="guess")


def test_new_task_expert_is_routed_without_rebuilding():
    bank = task_bank()
    router = TaskRouter(TaskRouterConfig(), bank)
    batch = RouterInput(task_ids=torch.tensor([2]))
    with pytest.raises(UnknownTaskError):
        router.route(batch)
    bank.add_expert("t2", ExpertConfig(rank=3), task=2)
    assert router.route(batch).indices.tolist() == [[4]]
    bank.remove_expert("t0")  # indices shift; the mapping follows
    assert router.route(batch).indices.tolist() == [[3]]
