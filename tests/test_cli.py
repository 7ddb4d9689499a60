"""The moe-lora command line: config errors fail fast naming the key; a run, info, evaluate, export."""

import json

import pytest
from safetensors.torch import load_file

from moe_lora.cli import main


def test_bad_key_fails_before_any_work(tmp_path, capsys):
    assert main(["continual", "configs/split_wordnet.yaml", "train.epochz=1",
                 f"output.dir={tmp_path}"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["continual", "configs/split_wordnet.yaml", "--profile", "nope"]) == 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["continual", "configs/split_digits.yaml", f"output.dir={out}",
                 "strategies.run=[naive,experts-taskid]", "train.epochs=3"]) == 0
    return out


def test_continual_writes_results_and_info(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["strategies"]) == {"naive", "experts-taskid"}
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "experts-taskid" in out and "checkpoint experts: 5 tasks done" in out


def test_evaluate_reproduces_the_table(run_dir, capsys):
    before = json.loads((run_dir / "results.json").read_text())["strategies"]
    assert main(["evaluate", str(run_dir)]) == 0
    after = json.loads((run_dir / "results.json").read_text())["strategies"]
    assert after["experts-taskid"]["accuracy_matrix"] == before["experts-taskid"]["accuracy_matrix"]


def test_export_peft(run_dir, tmp_path):
    assert main(["export", str(run_dir), "task2", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(k.endswith("lora_A.weight") for k in tensors)
    assert main(["info", str(run_dir / "checkpoints" / "experts" / "task5" / "bank")]) == 0
