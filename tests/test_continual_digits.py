"""Split-Digits end to end: real continual behaviour in seconds (MLP base + LoRA experts)."""

import json
import math

import pytest
import torch

from moe_lora.continual.metrics import average_accuracy, backward_transfer, forgetting
from moe_lora.continual.runner import run_continual
from moe_lora.continual.settings import load_config

STRATEGIES = "[naive,replay,olora,experts-taskid,experts-retrieval,experts-confidence]"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = load_config("configs/split_digits.yaml",
                      [f"output.dir={out}", f"strategies.run={STRATEGIES}", "train.epochs=6"])
    return out, run_continual(cfg)


def test_results_shape_and_files(run):
    out, results = run
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "split-digits"
    assert set(saved["strategies"]) == set(STRATEGIES.strip("[]").split(","))
    for name, e in saved["strategies"].items():
        assert {"strategy", "setting", "accuracy_matrix", "average_accuracy", "forgetting", "bwt",
                "fwt", "tp", "tp_per_task", "wp", "wp_per_task", "train_seconds"} <= set(e)
        assert "router_accuracy" not in e and "family" not in e
        assert e["strategy"] == name.split("-")[0]
        assert e["setting"] in ("task-aware", "task-agnostic")
        assert len(e["accuracy_matrix"]) == 5
        assert (out / f"accuracy_matrix_{name}.csv").is_file()
        assert (out / f"accuracy_matrix_{name}.png").is_file()
    assert (out / "strategies.png").is_file()


ROUND = 1e-4  # results.json keeps 4 decimals: matrix entries and summaries are each rounded


def test_metrics_equal_hand_computation(run):
    _, results = run
    for e in results["strategies"].values():
        r = [[math.nan if v is None else v for v in row] for row in e["accuracy_matrix"]]
        t = len(r)
        assert e["average_accuracy"] == pytest.approx(sum(r[-1]) / t, abs=ROUND)
        hand_bwt = sum(r[-1][j] - r[j][j] for j in range(t - 1)) / (t - 1)
        hand_f = sum(max(r[i][j] for i in range(j, t - 1)) - r[-1][j] for j in range(t - 1)) / (t - 1)
        assert e["bwt"] == pytest.approx(hand_bwt, abs=ROUND)
        assert e["forgetting"] == pytest.approx(hand_f, abs=ROUND)
        r64 = torch.tensor(r, dtype=torch.float64)
        assert e["average_accuracy"] == pytest.approx(average_accuracy(r64), abs=ROUND)
        assert e["bwt"] == pytest.approx(backward_transfer(r64), abs=ROUND)
        assert e["forgetting"] == pytest.approx(forgetting(r64), abs=ROUND)
        # TP/WP: the last row's mean over the tasks, as reported per task
        for m in ("tp", "wp"):
            per = e[f"{m}_per_task"]
            assert len(per) == t and e[m] == pytest.approx(sum(per) / t, abs=ROUND)


def test_experts_with_task_id_forget_nothing_naive_forgets(run):
    s = run[1]["strategies"]
    assert s["experts-taskid"]["forgetting"] <= 0.01
    assert s["experts-taskid"]["average_accuracy"] >= 0.95
    assert s["experts-taskid"]["tp"] == 1.0  # the task id routes every input to its own expert
    assert s["naive"]["forgetting"] >= 0.3
    assert s["naive"]["average_accuracy"] <= 0.5
    assert s["replay"]["average_accuracy"] > s["naive"]["average_accuracy"] + 0.2


def test_task_agnostic_routing_beats_naive_and_olora(run):
    s = run[1]["strategies"]
    for name in ("experts-retrieval", "experts-confidence"):
        assert s[name]["tp"] >= 0.85
        # WP: accuracy with the right expert, whatever the router chose = experts-taskid's AA
        assert s[name]["wp"] == pytest.approx(s["experts-taskid"]["average_accuracy"], abs=ROUND)
        assert s[name]["average_accuracy"] > s["naive"]["average_accuracy"] + 0.3
        assert s[name]["average_accuracy"] > s["olora"]["average_accuracy"]
    # O-LoRA keeps the earlier tasks when the task id is known (its subspaces barely interfere)
    assert s["olora"]["task_aware"]["forgetting"] < s["naive"]["task_aware"]["forgetting"]
