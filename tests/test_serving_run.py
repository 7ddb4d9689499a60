"""`moe-lora serve RUN_DIR`: a continual run answers /predict exactly as its evaluation does.

A small Split-WordNet run on the real MiniLM is trained once; the served answers on every
task's test texts give the same accuracies as results.json's last row, for the task-agnostic
result ("auto") and for the task-aware one (the task given), and /experts lists the run's experts
with their classes.
"""

from __future__ import annotations

import json

import httpx
import pytest

from moe_lora.continual.runner import run_continual
from moe_lora.continual.serve import RunPredictor
from moe_lora.continual.settings import load_config
from moe_lora.data import build_stream
from tests.serving_helpers import running_servers

pytestmark = pytest.mark.slow

OVERRIDES = ["data.n_tasks=2", "data.classes_per_task=2", "data.train_per_class=12",
             "data.val_per_class=2", "data.test_per_class=8", "train.epochs=1",
             "strategies.run=[experts-taskid,experts-retrieval,experts-stats]",
             "output.plots=false", "strategies.experts.stats.n_proj=500",
             "strategies.experts.retrieval.keys_per_task=12"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/split_wordnet.yaml", [f"output.dir={out}", *OVERRIDES],
                      profile="quick")
    results = run_continual(cfg, progress=False)
    stream = build_stream(cfg.data.stream())
    return out, results, stream


def _accuracies(answers, stream):
    acc, k = [], 0
    for task in stream:
        labels = [stream.class_names[int(y)] for y in task.test.labels]
        got = [a["label"] for a in answers[k:k + len(labels)]]
        acc.append(sum(g == y for g, y in zip(got, labels, strict=True)) / len(labels))
        k += len(labels)
    return acc


def test_predictor_equals_the_evaluation(run):
    out, results, stream = run
    predictor = RunPredictor(out, result="experts-retrieval")
    texts = [t for task in stream for t in task.test.inputs]
    tasks = [task.task_id + 1 for task in stream for _ in task.test.inputs]
    auto = predictor.predict(texts, [None] * len(texts), [None] * len(texts))
    aware = predictor.predict(texts, [None] * len(texts), tasks)
    s = results["strategies"]
    assert _accuracies(auto, stream) == pytest.approx(s["experts-retrieval"]["accuracy_matrix"][-1],
                                                      abs=1e-4)
    assert _accuracies(aware, stream) == pytest.approx(s["experts-taskid"]["accuracy_matrix"][-1],
                                                       abs=1e-4)
    assert all(a["result"] == "experts-retrieval" and a["experts"] for a in auto)


def test_served_stats_router_equals_the_evaluation(run):
    """The factored Bayes router served: multi-layer frozen features computed for new texts, its
    statistics restored from the checkpoint; same accuracies as the run's last row."""
    out, results, stream = run
    predictor = RunPredictor(out, result="experts-stats")
    assert predictor.ctx.feature_layers == 3
    texts = [t for task in stream for t in task.test.inputs]
    auto = predictor.predict(texts, [None] * len(texts), [None] * len(texts))
    want = results["strategies"]["experts-stats"]["accuracy_matrix"][-1]
    assert _accuracies(auto, stream) == pytest.approx(want, abs=1e-4)
    assert results["strategies"]["experts-stats"]["details"]["features"] == "layers"


def test_http_server_answers_like_the_run(run):
    out, results, stream = run
    texts = [t for task in stream for t in task.test.inputs]
    with running_servers((out, ("--max-batch-size", "8", "--result", "experts-retrieval"))) as (url,):
        experts = httpx.get(url + "/experts", timeout=30).json()
        assert [e["name"] for e in experts["experts"]] == ["task1", "task2"]
        assert experts["experts"][0]["labels"] == [stream.class_names[c]
                                                   for c in stream[0].class_ids]
        answers = [httpx.post(url + "/predict", content=json.dumps({"text": t, "expert": "auto"}),
                              headers={"Content-Type": "application/json"}, timeout=60).json()
                   for t in texts]
        bad = httpx.post(url + "/predict", content=json.dumps({"text": "x", "expert": "task9"}),
                         headers={"Content-Type": "application/json"}, timeout=60)
    assert bad.status_code == 404
    want = results["strategies"]["experts-retrieval"]["accuracy_matrix"][-1]
    assert _accuracies(answers, stream) == pytest.approx(want, abs=1e-4)
