"""Non-finite values stop a run with a named error (issue 11): config values at load, a nan loss
or gradient at the first step it appears, keeping the last completed task's checkpoint."""

from __future__ import annotations

import pytest
import torch

from moe_lora.cli import main
from moe_lora.continual.module import NonFiniteLossError
from moe_lora.continual.runner import ContinualRunner, run_continual
from moe_lora.continual.settings import ConfigError, load_config

BASE = ["strategies.run=[naive,experts-taskid]", "train.epochs=2", "output.plots=false"]


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lora_plus_ratio=nan",
                                      "model.alpha=nan", "train.aux_coef=nan",
                                      "strategies.experts.retrieval.prior_weight=nan",
                                      "strategies.olora.lambda1=inf"])
def test_non_finite_config_values_fail_at_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config("configs/split_digits.yaml", [override])


def _poison(runner: ContinualRunner, task: int) -> None:
    """Replace task ``task``'s first training input by nan (a corrupt data row)."""
    states = runner.ctx.tasks[task].train.states
    states[0] = torch.full_like(states[0], float("nan"))


def test_a_nan_row_stops_the_run_naming_strategy_task_and_step(tmp_path, monkeypatch):
    cfg = load_config("configs/split_digits.yaml", [f"output.dir={tmp_path}", *BASE])
    real_init = ContinualRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _poison(self, 1)

    monkeypatch.setattr(ContinualRunner, "__init__", init)
    with pytest.raises(NonFiniteLossError, match=r"naive/task2: non-finite loss at step \d+"):
        run_continual(cfg, progress=False)
    # the first task's checkpoint stays, committed and loadable
    assert (tmp_path / "checkpoints" / "naive" / "CURRENT").is_file()


def test_skip_batch_finishes_with_finite_experts(tmp_path, monkeypatch):
    cfg = load_config("configs/split_digits.yaml", [f"output.dir={tmp_path}", *BASE,
                                                    "train.on_nonfinite=skip_batch"])
    real_init = ContinualRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        _poison(self, 1)

    monkeypatch.setattr(ContinualRunner, "__init__", init)
    results = run_continual(cfg, progress=False)["strategies"]
    assert results["experts-taskid"]["average_accuracy"] > 0.5


def test_one_task_stream_runs(tmp_path):
    assert main(["continual", "configs/split_digits.yaml", f"output.dir={tmp_path}",
                 "data.n_tasks=1", "strategies.run=[naive,ncm,experts-taskid,experts-stats]",
                 "train.epochs=1", "-q"]) == 0
    assert (tmp_path / "results.json").is_file()


def test_router_aux_losses_ignore_non_finite_and_masked_rows():
    from moe_lora.routers.base import token_mask
    from moe_lora.routers.mole import balance_loss
    from moe_lora.routers.topk import load_balancing_loss, z_loss

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    attention = torch.tensor([1, 1, 1, 1, 1, 0])
    mask = token_mask(x, attention)
    assert mask.tolist() == [1, 1, 0, 1, 1, 0]
    logits = torch.randn(6, 3)
    logits[2] = float("nan")  # what a nan input row gives a gate
    probs = logits.softmax(-1)
    top = logits.nan_to_num().topk(2, -1).indices
    keep = torch.tensor([0, 1, 3, 4])
    ones = torch.ones(4)
    assert torch.isfinite(balance_loss(probs, mask))
    torch.testing.assert_close(balance_loss(probs, mask), balance_loss(probs[keep], ones))
    torch.testing.assert_close(load_balancing_loss(probs, top, mask),
                               load_balancing_loss(probs[keep], top[keep], ones))
    torch.testing.assert_close(z_loss(logits, mask), z_loss(logits[keep], ones))
