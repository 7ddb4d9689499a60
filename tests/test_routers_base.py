"""Router configs, construction by name from YAML, and the saved routing weights (CSV + PNG)."""

import csv

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput
from moe_lora.core.routing import router_names
from moe_lora.routers import (
    LoRAHubConfig,
    MoLEConfig,
    MoLERouter,
    RetrievalConfig,
    TaskRouter,
    TaskRouterConfig,
    TopKConfig,
    TopKRouter,
    build_router,
    save_weights,
)

torch.set_num_threads(1)


def tiny_bank(n: int = 2) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(4, 4)), targets="all-linear")
    for e in range(n):
        bank.add_expert(f"e{e}", ExpertConfig(rank=2, init="random"), task=e)
    return bank


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (TaskRouterConfig, "fallback", "maybe"),
        (TaskRouterConfig, "experts", []),
        (LoRAHubConfig, "composition", "sum"),
        (LoRAHubConfig, "l1", -1.0),
        (LoRAHubConfig, "bound", 0.0),
        (RetrievalConfig, "k", 0),
        (RetrievalConfig, "weighting", "max"),
        (RetrievalConfig, "temperature", 0.0),
        (RetrievalConfig, "composition", "blend"),
        (MoLEConfig, "granularity", "token"),
        (MoLEConfig, "block_regex", "no group"),
        (MoLEConfig, "temperature", -1.0),
        (TopKConfig, "k", 0),
        (TopKConfig, "jitter", 1.0),
        (TopKConfig, "z_coef", -0.1),
    ],
)
def test_invalid_config_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field}"):
        cls(**{field: value})


def test_build_router_from_yaml():
    bank = tiny_bank()
    assert set(router_names()) >= {"task", "lorahub", "retrieval", "mole", "topk"}
    cfg = OmegaConf.create("router: topk\nk: 1\njitter: 0.1\n")
    router = build_router(cfg.pop("router"), cfg, bank)
    assert isinstance(router, TopKRouter) and router.config == TopKConfig(k=1, jitter=0.1)
    assert isinstance(build_router("task", None, bank), TaskRouter)
    with pytest.raises(ValueError, match="bogus"):
        build_router("topk", {"bogus": 1}, bank)
    with pytest.raises(ValueError, match="k"):
        build_router("topk", {"k": "two"}, bank)
    with pytest.raises(ValueError, match=r"TopKConfig\.k"):
        build_router("topk", {"k": 0}, bank)
    with pytest.raises(KeyError, match="registered routers"):
        build_router("nope", {}, bank)
    with pytest.raises(TypeError):
        build_router("topk", MoLEConfig(), bank)


def test_save_weights_writes_csv_and_png(tmp_path):
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]])
    csv_path, png_path = save_weights(w, tmp_path / "w", ["a", "b"], ["x", "y", "z"])
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["input", "a", "b"]
    assert [[float(v) for v in r[1:]] for r in rows[1:]] == w.tolist()
    assert [r[0] for r in rows[1:]] == ["x", "y", "z"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.csv", "w.png"]  # no temp files left
    with pytest.raises(ValueError, match="expert_names has 1 names for 2 experts"):
        save_weights(w, tmp_path / "bad", ["a"])


def test_routers_save_their_last_weights(tmp_path):
    bank = tiny_bank()
    task = TaskRouter(TaskRouterConfig(), bank)
    with pytest.raises(RuntimeError, match="not routed"):
        task.save_weights(tmp_path / "task")
    task.route(RouterInput(task_ids=torch.tensor([1, 0, 1])))
    csv_path, _ = task.save_weights(tmp_path / "task")
    assert csv_path.read_text().splitlines()[1:] == ["0,0.0,1.0", "1,1.0,0.0", "2,0.0,1.0"]

    mole = MoLERouter(MoLEConfig(), bank).attach()
    with torch.no_grad(), bank.use(mole.routing()):
        bank.model(torch.randn(2, 3, 4))
    assert mole.last_weights.shape == (1, 2) and mole.weight_rows() == ["0"]
    csv_path, png_path = mole.save_weights(tmp_path / "mole")
    assert csv_path.read_text().splitlines()[1].startswith("0,") and png_path.exists()
