"""Every shipped YAML (and each of its profiles) loads onto the structured config; bad keys fail."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.continual.settings import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"split_wordnet.yaml", "split_digits.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_every_profile(path):
    assert isinstance(load_config(path), RunConfig)
    for profile in OmegaConf.load(path).get("profiles", {}) or {}:
        assert isinstance(load_config(path, profile=profile), RunConfig)


def test_quick_profile_overrides():
    cfg = load_config(CONFIGS[0].parent / "split_wordnet.yaml", ["train.epochs=1"], "quick")
    assert cfg.data.train_per_class == 40 and cfg.data.test_per_class == 20 and cfg.train.epochs == 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=2", "train.epoch"),
        ("train.epochs=many", "train.epochs"),
        ("strategies.run=[nope]", "strategies.run"),
        ("model.rank=0", "model.rank"),
        ("data.benchmark=mnist", "data.benchmark"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_profile_and_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(CONFIGS[0], profile="nope")
