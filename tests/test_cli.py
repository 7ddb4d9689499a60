"""The moe-lora command line: bad input fails fast naming the key or file; evaluate re-computes a
saved run's final accuracies exactly; route, export (loaded back by PEFT), info; loggers."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from moe_lora.cli import main
from moe_lora.continual.settings import ConfigError, load_config
from moe_lora.core.commit import read_version

DIGITS_RUN = load_config("configs/split_digits.yaml").strategies.run  # every built-in result


def test_bad_key_fails_before_any_work(tmp_path, capsys):
    assert main(["continual", "configs/split_wordnet.yaml", "train.epochz=1",
                 f"output.dir={tmp_path}"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert main(["continual", "configs/split_wordnet.yaml", "--profile", "nope"]) == 2


def test_missing_config_file_is_named(tmp_path, capsys):
    assert main(["continual", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing.yaml" in err and "not found" in err


def test_missing_data_file_is_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data file was checked")

    monkeypatch.setattr("moe_lora.models.load_base", no_model)
    missing = tmp_path / "x.jsonl"
    assert main(["continual", "configs/split_wordnet.yaml", f"data.path={missing}",
                 "data.benchmark=file", f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_unknown_logger_names_the_key():
    with pytest.raises(ConfigError, match="train.loggers"):
        load_config("configs/split_digits.yaml", ["train.loggers=[csv,wandb]"])


def test_loggers_csv_always_tensorboard_when_installed(tmp_path):
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from moe_lora.continual.runner import build_loggers

    kinds = [type(x) for x in build_loggers(["csv", "tensorboard"], tmp_path, "experts/task1")]
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert kinds == [CSVLogger, TensorBoardLogger] if has_tb else kinds == [CSVLogger]
    [csv_logger] = build_loggers(["csv"], tmp_path, "experts/task1")
    assert type(csv_logger) is CSVLogger
    assert csv_logger.log_dir == str(tmp_path / "experts" / "task1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["continual", "configs/split_digits.yaml", f"output.dir={out}",
                 "train.epochs=3", "output.plots=false"]) == 0
    return out


def test_continual_writes_results_logs_and_info(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["strategies"]) == set(DIGITS_RUN)
    assert {f"experts-{e}" for e in ("taskid", "retrieval", "confidence", "mole")} <= set(DIGITS_RUN)
    # log folders are numbered from 1, like every task a person reads
    logs = run_dir / "logs" / "experts"
    assert sorted(p.name for p in logs.iterdir() if p.is_dir()) == [f"task{k}" for k in range(1, 6)]
    assert (logs / "task5" / "metrics.csv").is_file()
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "experts-taskid" in out and "checkpoint experts: 5 steps done" in out
    assert "checkpoint joint: 1 step done" in out


def test_evaluate_equals_the_final_row_of_every_matrix(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())["strategies"]
    assert main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert set(evaluation["strategies"]) == set(results)
    for name, ran in results.items():
        ev = evaluation["strategies"][name]
        assert ev["accuracy"] == ran["accuracy_matrix"][-1], name
        assert ev["average_accuracy"] == pytest.approx(ran["average_accuracy"], abs=1e-6)
        assert ev["tp"] == ran["tp"], name
        if "task_aware" in ran:
            assert ev["task_aware"]["accuracy"] == ran["task_aware"]["accuracy_matrix"][-1], name
            assert ev["task_aware"]["average_accuracy"] == pytest.approx(
                ran["task_aware"]["average_accuracy"], abs=1e-6), name
        assert name in out
    assert evaluation["strategies"]["experts-taskid"]["average_accuracy"] > 0.9


def test_evaluate_in_a_fresh_process_reproduces_every_result(run_dir):
    """From the files alone (a new process: no state of the run in memory), ``evaluate`` gives
    results.json's last row for every result, the four experts-* inferences included."""
    results = json.loads((run_dir / "results.json").read_text())["strategies"]
    assert {f"experts-{e}" for e in ("taskid", "retrieval", "confidence", "mole")} <= set(results)
    (run_dir / "evaluation.json").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "moe_lora.cli", "evaluate", str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())["strategies"]
    assert set(evaluation) == set(results)
    for name, ran in results.items():
        ev = evaluation[name]
        n_steps = len([row for row in ran["accuracy_matrix"] if any(v is not None for v in row)])
        got = (ev["accuracy"], ev["average_accuracy"], ev["tp"], ev["setting"],
               ev["completed_tasks"])
        assert got == (ran["accuracy_matrix"][-1], ran["average_accuracy"], ran["tp"],
                       ran["setting"], n_steps), name
        if "task_aware" in ran:
            assert (ev["task_aware"]["accuracy"], ev["task_aware"]["average_accuracy"]) == (
                ran["task_aware"]["accuracy_matrix"][-1], ran["task_aware"]["average_accuracy"])
        assert name in proc.stdout


def test_resume_with_a_different_config_is_refused_naming_the_keys(run_dir, capsys):
    assert main(["continual", "configs/split_digits.yaml", f"output.dir={run_dir}",
                 "train.epochs=4", "model.rank=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "model.rank" in err and "output.dir" not in err
    before = (run_dir / "results.json").read_text()
    assert json.loads(before)["config"]["train"]["epochs"] == 3  # nothing was rewritten


def test_export_peft_loads_in_peft_with_the_same_outputs(run_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from moe_lora import ExpertBank, Routing
    from moe_lora.continual.runner import build_backbone
    from moe_lora.data import build_stream

    assert main(["export", str(run_dir), "task2", str(tmp_path / "peft")]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert any(k.endswith("lora_A.weight") for k in load_file(tmp_path / "peft" /
                                                             "adapter_model.safetensors"))
    run_cfg = load_config("configs/split_digits.yaml", ["train.epochs=3"])
    stream = build_stream(run_cfg.data.stream())

    def fresh():
        return build_backbone(run_cfg, stream).model

    ours = ExpertBank(fresh(), targets=["0", "2"])
    with read_version(run_dir / "checkpoints" / "experts") as version:
        bank_dir = version / "bank"
        ours.load_experts(bank_dir)
    assert ours.names == [f"task{k}" for k in range(1, 6)]  # expert names are 1-based
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft").eval()
    x = stream[1].test.inputs.float()  # task2 is the second task's expert
    with torch.no_grad(), ours.use(Routing.single(ours.index("task2"))):
        expected = ours.model(x)
    with torch.no_grad():
        got, base = theirs(x), fresh()(x)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert main(["info", str(bank_dir)]) == 0
    assert main(["info", str(run_dir / "checkpoints" / "experts")]) == 0  # its committed bank
    out = capsys.readouterr().out
    assert out.count("  task5: ") == 2
    assert main(["export", str(run_dir), "task0", str(tmp_path / "none")]) == 2  # no such expert
    assert "task0" in capsys.readouterr().err


TOPICS = {  # task -> label -> texts
    "animals": {"mammal": ["a dog barks at the mailman", "the cat sleeps on the sofa",
                           "a horse runs in the field", "the cow gives milk", "a lion hunts zebras",
                           "the bear catches salmon", "a mouse eats cheese", "the whale sings"],
                "bird": ["the eagle soars over mountains", "a parrot repeats words",
                         "the sparrow builds a nest", "a penguin swims in cold water",
                         "the owl hunts at night", "a robin sings at dawn",
                         "the crow collects shiny things", "a duck paddles on the pond"]},
    "food": {"fruit": ["a ripe banana is sweet", "the apple is crisp and red",
                       "oranges are full of juice", "a bowl of fresh strawberries",
                       "the mango tastes tropical", "grapes grow on vines",
                       "a slice of watermelon in summer", "the pear is soft and juicy"],
             "vegetable": ["carrots are crunchy", "a salad of green lettuce",
                           "roasted potatoes with salt", "the broccoli is steamed",
                           "spinach leaves in the soup", "a raw onion makes you cry",
                           "peppers add colour to the dish", "boiled cabbage smells strong"]},
}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("route")
    rows = [{"text": t, "label": label, "task": task, "split": "test" if i >= 6 else "train"}
            for task, labels in TOPICS.items() for label, texts in labels.items()
            for i, t in enumerate(texts)]
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["continual", "configs/split_wordnet.yaml", "data.benchmark=file",
                 f"data.path={data}", f"output.dir={out / 'run'}", "train.epochs=1",
                 "strategies.run=[experts-taskid,experts-retrieval]", "output.plots=false",
                 "train.progress_bar=false"]) == 0
    return out / "run"


def test_route_names_expert_task_and_weights(text_run, capsys):
    texts = ["a tiger stalks a deer in the jungle", "a bowl of cherries and plums"]
    assert main(["route", str(text_run), *texts, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in rows] == texts
    assert [r["chosen"]["task_name"] for r in rows] == ["animals", "food"]
    for r in rows:
        assert {e["expert"] for e in r["experts"]} == {"task1", "task2"}
        assert sum(e["weight"] for e in r["experts"]) == pytest.approx(1.0)
        assert r["experts"][0]["expert"] == r["chosen"]["expert"]  # the top weight is chosen
        assert r["experts"][0]["weight"] > 0.5
    assert main(["route", str(text_run), texts[0]]) == 0
    out = capsys.readouterr().out
    assert "routed to task1 (task 1: animals)" in out and "weight" in out
