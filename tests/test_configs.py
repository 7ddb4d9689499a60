"""Every shipped YAML (and each of its profiles) loads onto the structured config; bad keys fail."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.continual.settings import ConfigError, RunConfig, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"split_wordnet.yaml", "split_digits.yaml"}


def _stand_in_data(path: Path, tmp_path: Path) -> list[str]:
    """A config that points at outside data (CLINC150) missing here gets a one-line stand-in."""
    data = OmegaConf.load(path).get("data", {}) or {}
    if not data.get("path") or Path(data["path"]).is_file():
        return []
    stand_in = tmp_path / "stand_in.jsonl"
    stand_in.write_text('{"text": "hello", "label": "greet", "task": 0}\n')
    return [f"data.path={stand_in}"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_with_every_profile(path, tmp_path):
    extra = _stand_in_data(path, tmp_path)
    assert isinstance(load_config(path, extra), RunConfig)
    for profile in OmegaConf.load(path).get("profiles", {}) or {}:
        assert isinstance(load_config(path, extra, profile=profile), RunConfig)


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
