"""The main job's quick profile on the embedded MiniLM + Split-WordNet (under 2 minutes)."""

import json

import pytest

from moe_lora.cli import main


@pytest.mark.slow
def test_quick_profile_main_job(tmp_path):
    assert main(["continual", "configs/split_wordnet.yaml", "--profile", "quick",
                 f"output.dir={tmp_path}"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    s = results["strategies"]
    assert results["benchmark"] == "split-wordnet" and len(s) == 8
    assert s["experts-taskid"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    assert s["naive"]["forgetting"] > 0.2  # task-agnostic naive forgets
    for name in ("experts-retrieval", "experts-confidence"):
        assert s[name]["router_accuracy"] > 0.3  # 5 tasks: chance is 0.2
        assert s[name]["average_accuracy"] > s["naive"]["average_accuracy"]
    for name in s:
        assert (tmp_path / f"accuracy_matrix_{name}.png").is_file()
