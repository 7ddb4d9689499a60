"""Routing without a task id (issue 10): the retrieval router against a brute-force kNN vote,
keys invariant to the data file's row order, and the frozen-feature baselines and the factored
Bayes router of a real engine run against reference computations in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_lora.continual.prepared import Examples
from moe_lora.continual.runner import ContinualRunner
from moe_lora.continual.settings import load_config
from moe_lora.continual.strategies.keys import KeyIndex, RetrievalOptions, stratified_keys


def _examples(n_per_class: int, classes: list[int], rng: np.random.Generator) -> Examples:
    labels = torch.tensor([c for c in classes for _ in range(n_per_class)])
    keys = [f"c{c}:{i}" for c in classes for i in range(n_per_class)]
    order = rng.permutation(len(keys))
    return Examples([torch.zeros(1)] * len(keys), labels[order], torch.zeros(len(keys)).long(),
                    [keys[i] for i in order])


def test_stratified_keys_cover_every_class_and_ignore_row_order():
    rng = np.random.default_rng(0)
    ex = _examples(50, [3, 4, 5, 6], rng)
    keys = stratified_keys(ex, 20, seed=7)
    assert sorted({k.split(":")[0] for k in keys}) == ["c3", "c4", "c5", "c6"]
    assert [sum(k.startswith(f"c{c}:") for k in keys) for c in (3, 4, 5, 6)] == [5, 5, 5, 5]
    grouped = ex.select(sorted(range(len(ex)), key=lambda i: ex.keys[i]))  # a file sorted by class
    assert stratified_keys(grouped, 20, seed=7) == keys
    # the old rule (first rows of the split) on a grouped file indexes a single class
    assert {k.split(":")[0] for k in grouped.keys[:20]} == {"c3"}


def test_key_index_task_prediction_equals_a_brute_force_knn_vote():
    rng = np.random.default_rng(1)
    opts = RetrievalOptions(keys_per_task=30, n_neighbors=10, temperature=0.05)
    centers = rng.normal(size=(4, 16))
    table, per_task = {}, []
    for t in range(4):
        keys = [f"t{t}:{i}" for i in range(30)]
        for k in keys:
            v = centers[t] + 0.9 * rng.normal(size=16)
            table[k] = (v / np.linalg.norm(v)).astype(np.float32)
        per_task.append(keys)
    index = KeyIndex(opts, table, dim=16)
    for t, keys in enumerate(per_task):
        index.index.add_expert(t, index.embed(keys))
    q = rng.normal(size=(200, 16)) + centers[rng.integers(0, 4, 200)]
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    got = index.weights(q, 4).numpy()
    all_keys = np.stack([table[k] for keys in per_task for k in keys])
    owner = np.repeat(np.arange(4), 30)
    sims = q @ all_keys.T
    want = np.zeros((200, 4))
    for i in range(200):
        top = np.argsort(-sims[i], kind="stable")[:10]
        w = np.exp((sims[i, top] - sims[i, top].max()) / 0.05)
        np.add.at(want[i], owner[top], w / w.sum())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    cfg = load_config("configs/split_digits.yaml", [
        f"output.dir={out}", "strategies.run=[ncm,ranpac,experts-taskid,experts-stats]",
        "train.epochs=4", "output.plots=false"])
    runner = ContinualRunner(cfg, progress=False)
    return runner, runner.run()["strategies"]


def _split(runner, name):
    ex = Examples.concat([getattr(pt, name) for pt in runner.ctx.tasks])
    x = np.stack([runner.ctx.embeddings[k] for k in ex.keys]).astype(np.float64)
    return x, ex.labels.numpy(), ex.tasks.numpy()


def test_ncm_equals_nearest_class_mean_in_numpy(digits):
    runner, results = digits
    xtr, ytr, _ = _split(runner, "train")
    xte, yte, tte = _split(runner, "test")
    means = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    pred = (xte / np.linalg.norm(xte, axis=1, keepdims=True) @ means.T).argmax(1)
    per_task = [float((pred[tte == t] == yte[tte == t]).mean()) for t in range(5)]
    assert results["ncm"]["accuracy_matrix"][-1] == pytest.approx(per_task, abs=1e-4)


def test_ranpac_equals_the_ridge_solution_in_numpy(digits):
    runner, results = digits
    xtr, ytr, _ = _split(runner, "train")
    xte, yte, tte = _split(runner, "test")
    opts = runner.cfg.strategies.ranpac
    w_rand = torch.randn(xtr.shape[1], opts.n_proj,
                         generator=torch.Generator().manual_seed(runner.cfg.train.seed)).numpy()
    h = np.maximum(xtr.astype(np.float32) @ w_rand, 0).astype(np.float64)
    ht = np.maximum(xte.astype(np.float32) @ w_rand, 0).astype(np.float64)
    order = list(dict.fromkeys(ytr.tolist()))  # columns in order of first appearance
    y = np.eye(10)[[order.index(c) for c in ytr]]
    xv, yv, _ = _split(runner, "val")
    hv = np.maximum(xv.astype(np.float32) @ w_rand, 0).astype(np.float64)
    best = None
    for lam in opts.lambdas:  # the choice on validation, as the strategy makes it
        w = np.linalg.solve(h.T @ h + lam * np.eye(len(h.T)), h.T @ y)
        acc = (np.array(order)[(hv @ w).argmax(1)] == yv).mean()
        if best is None or acc > best[0]:
            best = (acc, w)
    pred = np.array(order)[(ht @ best[1]).argmax(1)]
    per_task = [float((pred[tte == t] == yte[tte == t]).mean()) for t in range(5)]
    assert results["ranpac"]["accuracy_matrix"][-1] == pytest.approx(per_task, abs=1e-4)


def test_stats_router_reports_its_task_prediction_and_beats_chance(digits):
    runner, results = digits
    stats = results["experts-stats"]
    assert stats["setting"] == "task-agnostic"
    assert stats["wp"] == pytest.approx(results["experts-taskid"]["average_accuracy"], abs=1e-4)
    assert stats["tp"] >= 0.9 and stats["average_accuracy"] >= 0.9
    assert len(stats["tp_per_task"]) == 5
    facts = stats["details"]  # the knobs validation chose, reported with the numbers
    opts = runner.cfg.strategies.experts.stats
    assert facts["chosen"]["alpha"] in opts.alphas and facts["chosen"]["w_z"] in opts.w_zs
    assert facts["ranpac_lambda"] in opts.lambdas and len(facts["head_temperatures"]) == 5


def test_frozen_feature_kinds_read_their_own_table():
    """``sentence`` reads the embedding table, ``layers`` the multi-layer table (its width
    ``feature_layers * D``); with one layer both are the embedding."""
    from types import SimpleNamespace

    from moe_lora.continual.settings import ConfigError
    from moe_lora.continual.strategies.base import RunContext
    from moe_lora.continual.strategies.frozen import NCMOptions

    emb = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.0, 1.0], np.float32)}
    feat = {k: np.concatenate([v, -v, 2 * v]) for k, v in emb.items()}
    ex = Examples([torch.zeros(1)] * 2, torch.zeros(2).long(), torch.zeros(2).long(), ["b", "a"])
    ctx = RunContext(None, None, SimpleNamespace(dim=2), None, [], emb, None,  # type: ignore[arg-type]
                     features=feat, feature_layers=3)
    assert ctx.frozen_features(ex).tolist() == [[0, 1], [1, 0]]
    assert ctx.frozen_features(ex, "layers").tolist() == [[0, 1, 0, -1, 0, 2], [1, 0, -1, 0, 2, 0]]
    assert (ctx.feature_dim("sentence"), ctx.feature_dim("layers")) == (2, 6)
    one = RunContext(None, None, SimpleNamespace(dim=2), None, [], emb, None,  # type: ignore[arg-type]
                     features=emb, feature_layers=1)
    assert one.frozen_features(ex, "layers").tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ConfigError, match="strategies.ncm.features"):
        NCMOptions(features="penultimate")


def test_the_multi_layer_feature_table_is_built_only_when_a_strategy_reads_it(tmp_path):
    """Strategies declare the frozen feature kinds they read (``Strategy.feature_kinds``): the
    options' ``features`` fields, and for ``experts`` only ``experts-stats``'s. The runner pools
    the extra layers (``[feature_layers * D]`` per example) only when some strategy reads
    ``layers``; otherwise the features table holds the embeddings' own rows."""
    from stream_helpers import tiny_text_stream

    from benchmarks.fixtures import random_model_folder
    from moe_lora.continual.strategies.experts import Experts, ExpertsOptions
    from moe_lora.continual.strategies.frozen import NCM, NCMOptions

    assert NCM.feature_kinds(NCMOptions(), ["ncm"]) == {"sentence"}
    assert NCM.feature_kinds(NCMOptions(features="layers"), ["ncm"]) == {"layers"}
    assert Experts.feature_kinds(ExpertsOptions(), ["experts-taskid", "experts-mole"]) == set()
    assert Experts.feature_kinds(ExpertsOptions(), ["experts-stats"]) == {"layers"}
    model = random_model_folder(tmp_path / "minilm-random")
    tiny_text_stream(tmp_path / "stream.jsonl")
    for run, expected in (("[naive,ncm,experts-taskid]", 1), ("[naive,experts-stats]", 3)):
        cfg = load_config("configs/clinc150.yaml", [
            f"model.name={model}", f"data.path={tmp_path / 'stream.jsonl'}",
            f"output.dir={tmp_path / 'run'}", f"strategies.run={run}"])
        ctx = ContinualRunner(cfg, progress=False).ctx
        assert ctx.feature_layers == expected, run
        key = next(iter(ctx.embeddings))
        assert ctx.features[key].shape == (expected * ctx.backbone.dim,)
        assert np.shares_memory(ctx.features[key], ctx.embeddings[key]) == (expected == 1)
