"""The main job's quick profile on the embedded MiniLM + Split-WordNet (under 2 minutes)."""

import json

import pytest

from moe_lora.cli import main
from moe_lora.continual.settings import load_config


@pytest.mark.slow
def test_quick_profile_main_job(tmp_path):
    assert main(["continual", "configs/split_wordnet.yaml", "--profile", "quick",
                 f"output.dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    s = results["strategies"]
    run = load_config("configs/split_wordnet.yaml", profile="quick").strategies.run
    assert results["benchmark"] == "split-wordnet" and set(s) == set(run) and len(s) == len(run)
    assert s["experts-taskid"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    assert s["naive"]["forgetting"] > 0.2  # task-agnostic naive forgets
    for name in ("experts-retrieval", "experts-confidence"):
        assert s[name]["tp"] > 0.3  # task prediction; 5 tasks: chance is 0.2
        assert s[name]["average_accuracy"] > s["naive"]["average_accuracy"]
    for name in s:
        assert (tmp_path / f"accuracy_matrix_{name}.png").is_file()
