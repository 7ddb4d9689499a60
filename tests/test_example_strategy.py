"""The "how to add a strategy" example: a strategy written against the public base class runs
through the registry, its options are typed config, and it does what it says."""

import importlib.util
import sys
from pathlib import Path

import pytest

from moe_lora.continual.registry import strategy_spec
from moe_lora.continual.settings import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_strategy.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("custom_strategy", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_strategy"] = module
    spec.loader.exec_module(module)  # registers "probe"
    return module


def test_registered_with_its_options(example):
    spec = strategy_spec("probe")
    assert spec.cls is example.Probe and spec.options is example.ProbeOptions
    cfg = load_config("configs/split_digits.yaml", ["strategies.run=[probe]",
                                                    "strategies.probe.classes=seen"])
    assert cfg.strategies.probe.classes == "seen"
    with pytest.raises(ConfigError, match="strategies.probe.classes"):
        load_config("configs/split_digits.yaml", ["strategies.probe.classes=all"])
    with pytest.raises(ConfigError, match="strategies.probe.clases"):
        load_config("configs/split_digits.yaml", ["strategies.probe.clases=seen"])


def test_probe_trains_only_its_head(example):
    results = example.main(["train.epochs=4"])["strategies"]
    probe, naive = results["probe"], results["naive"]
    # a linear probe on frozen features cannot forget task-aware: its old head rows do not move
    assert probe["task_aware"]["forgetting"] == pytest.approx(0.0, abs=1e-9)
    assert probe["task_aware"]["average_accuracy"] >= 0.8
    assert naive["task_aware"]["forgetting"] > 0.02
    assert probe["train_seconds"] >= 0
