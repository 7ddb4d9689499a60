"""Statistics-based heads and routers against reference computations (numpy), in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_lora.routers.statistics import (
    ExpertLogitGaussian,
    GaussianStats,
    NCMHead,
    RanPACHead,
    combine_task_class,
    factored_log_posterior,
    fit_temperature,
    ridge_map,
    shrink,
    task_posterior,
)


def _blobs(n: int, dim: int, classes: list[int], seed: int, spread: float = 1.0):
    """Gaussian blobs: ``x [n, dim]`` float64, labels ``y [n]`` drawn from ``classes``."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(classes) + 1, dim, generator=gen, dtype=torch.float64) * spread
    y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
    return centres[y] + torch.randn(n, dim, generator=gen, dtype=torch.float64), y


def _ref_pooled(x: np.ndarray, y: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """numpy class means and pooled within-class covariance (np.cov of class-centred data)."""
    classes = list(dict.fromkeys(y.tolist()))
    means = {c: np.mean(x[y == c], axis=0) for c in classes}
    centred = np.concatenate([x[y == c] - means[c] for c in classes])
    return means, np.cov(centred, rowvar=False, ddof=len(classes))


# ---------------------------------------------------------------- GaussianStats
def test_gaussian_stats_match_numpy_mean_and_cov():
    x, y = _blobs(300, 6, [4, 1, 7], seed=0)
    gs = GaussianStats(6)
    gs.update(x, y)
    means, cov = _ref_pooled(x.numpy(), y.numpy())
    assert gs.classes == list(dict.fromkeys(y.tolist()))
    np.testing.assert_allclose(gs.means().numpy(), np.stack([means[c] for c in gs.classes]),
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gs.covariance().numpy(), cov, rtol=1e-9, atol=1e-12)


def test_gaussian_stats_incremental_equals_one_shot():
    x1, y1 = _blobs(200, 5, [0, 1], seed=1)
    x2, y2 = _blobs(150, 5, [2, 3, 1], seed=2)  # class 1 comes back in the second task
    inc, once = GaussianStats(5), GaussianStats(5)
    inc.update(x1, y1)
    inc.update(x2, y2)
    once.update(torch.cat([x1, x2]), torch.cat([y1, y2]))
    assert inc.classes == once.classes
    torch.testing.assert_close(inc.means(), once.means(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inc.covariance(0.2), once.covariance(0.2), rtol=1e-10, atol=1e-12)


def test_lda_and_mahalanobis_scores_match_formulas():
    x, y = _blobs(400, 4, [0, 1, 2], seed=3)
    q, _ = _blobs(7, 4, [0, 1, 2], seed=4)
    gs = GaussianStats(4)
    gs.update(x, y)
    means, cov = _ref_pooled(x.numpy(), y.numpy())
    cov = (1 - 0.3) * cov + 0.3 * np.trace(cov) / 4 * np.eye(4)
    mu = np.stack([means[c] for c in gs.classes])
    inv = np.linalg.inv(cov)
    diff = q.numpy()[:, None, :] - mu[None]
    md = np.einsum("ncd,de,nce->nc", diff, inv, diff)
    lda = q.numpy() @ inv @ mu.T - 0.5 * np.einsum("cd,de,ce->c", mu, inv, mu)
    np.testing.assert_allclose(gs.mahalanobis(q, 0.3).numpy(), md, rtol=1e-8)
    np.testing.assert_allclose(gs.lda_scores(q, 0.3).numpy(), lda, rtol=1e-8, atol=1e-10)


def test_shrink_formula():
    cov = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(shrink(cov, 0.5),
                               torch.tensor([[3.5, 0.5], [0.5, 2.5]], dtype=torch.float64))


def test_ncm_is_cosine_to_class_means():
    x, y = _blobs(120, 3, [2, 0], seed=5)
    q, _ = _blobs(5, 3, [0], seed=6)
    ncm = NCMHead(3)
    ncm.update(x[:60], y[:60])
    ncm.update(x[60:], y[60:])
    mu = np.stack([x.numpy()[y.numpy() == c].mean(0) for c in ncm.classes])
    ref = (q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)) @ (
        mu / np.linalg.norm(mu, axis=1, keepdims=True)).T
    np.testing.assert_allclose(ncm.logits(q).numpy(), ref, rtol=1e-10)


# ---------------------------------------------------------------- RanPAC
def _ref_ridge(head: RanPACHead, x: torch.Tensor, y: torch.Tensor, lam: float) -> np.ndarray:
    h = np.maximum(x.numpy().astype(np.float32) @ head.w_rand.numpy(), 0).astype(np.float64)
    onehot = (y.numpy()[:, None] == np.array(head.classes)[None]).astype(np.float64)
    return np.linalg.solve(h.T @ h + lam * np.eye(h.shape[1]), h.T @ onehot)


def test_ranpac_ridge_matches_numpy_solve():
    x, y = _blobs(80, 6, [3, 0, 5], seed=7)
    head = RanPACHead(6, n_proj=40, seed=1)
    head.update(x, y)
    head.fit(2.5)
    assert head.weights is not None
    np.testing.assert_allclose(head.weights.numpy(), _ref_ridge(head, x, y, 2.5), rtol=1e-6,
                               atol=1e-9)


def test_ranpac_incremental_equals_one_shot():
    x1, y1 = _blobs(60, 5, [0, 1], seed=8)
    x2, y2 = _blobs(70, 5, [2, 3], seed=9)
    inc, once = RanPACHead(5, 30, seed=3), RanPACHead(5, 30, seed=3)
    inc.update(x1, y1)
    inc.update(x2, y2)
    once.update(torch.cat([x1, x2]), torch.cat([y1, y2]))
    inc.fit(1.0)
    once.fit(1.0)
    torch.testing.assert_close(inc.gram, once.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(inc.logits(x2), once.logits(x2), rtol=1e-9, atol=1e-9)


def test_ranpac_select_lambda_picks_validation_best():
    x, y = _blobs(60, 8, [0, 1, 2, 3], seed=10, spread=0.6)
    xv, yv = _blobs(200, 8, [0, 1, 2, 3], seed=10, spread=0.6)  # same centres (same seed)
    head = RanPACHead(8, n_proj=200, seed=2)
    head.update(x, y)
    lambdas = [1e-3, 1e5, 1e1, 1e2]
    h = np.maximum(xv.numpy().astype(np.float32) @ head.w_rand.numpy(), 0).astype(np.float64)
    cols = np.array([head.classes.index(c) for c in yv.tolist()])
    accs = [np.mean((h @ _ref_ridge(head, x, y, lam)).argmax(1) == cols) for lam in lambdas]
    assert len(set(accs)) > 1, "the data must separate the lambdas for this test to mean anything"
    best = lambdas[int(np.argmax(accs))]
    assert head.select_lambda(xv, yv, lambdas) == best
    assert head.lam == best
    np.testing.assert_allclose(head.logits(xv).numpy(), h @ _ref_ridge(head, x, y, best),
                               rtol=1e-5, atol=1e-8)


def test_ranpac_logits_before_fit_raise():
    head = RanPACHead(3, 10)
    head.update(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(RuntimeError, match="fit"):
        head.logits(torch.randn(2, 3))


def test_fit_temperature_minimises_nll():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(300, 4, generator=gen, dtype=torch.float64) * 5
    labels = torch.randint(4, (300,), generator=gen)
    labels[:150] = logits[:150].argmax(1)  # half right: the best T is neither extreme
    grid = [0.1, 0.5, 1.0, 3.0, 10.0, 100.0]
    nll = [torch.nn.functional.cross_entropy(logits / t, labels).item() for t in grid]
    assert fit_temperature(logits, labels, grid) == grid[int(np.argmin(nll))]
    assert grid[int(np.argmin(nll))] not in (grid[0], grid[-1])


# ---------------------------------------------------------------- combination rule
def test_combine_task_class_worked_by_hand():
    p_task = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]], dtype=torch.float64)
    per_task = [torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64),
                torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64),
                torch.tensor([[1.0], [1.0]], dtype=torch.float64)]
    all3 = combine_task_class(p_task, per_task, top_k=3)
    torch.testing.assert_close(all3, torch.tensor(
        [[0.3, 0.3, 0.27, 0.03, 0.1], [0.2, 0.0, 0.05, 0.05, 0.7]], dtype=torch.float64))
    top2 = combine_task_class(p_task, per_task, top_k=2)  # row 1 keeps tasks 0, 1: 0.6/0.9, 0.3/0.9
    torch.testing.assert_close(top2, torch.tensor(
        [[1 / 3, 1 / 3, 0.3, 1 / 30, 0.0], [2 / 9, 0.0, 0.0, 0.0, 7 / 9]], dtype=torch.float64))
    top1 = combine_task_class(p_task, per_task, top_k=1)
    torch.testing.assert_close(top1, torch.tensor(
        [[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))


def test_combine_task_class_checks_task_count():
    with pytest.raises(ValueError, match="2 tasks but 1"):
        combine_task_class(torch.ones(1, 2) / 2, [torch.ones(1, 3) / 3], top_k=1)


def test_task_posterior_sums_classes_per_task():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    torch.testing.assert_close(task_posterior(probs, torch.tensor([1, 0, 1, 2]), 3),
                               torch.tensor([[0.2, 0.4, 0.4]]))


# ---------------------------------------------------------------- ExpertLogitGaussian
def _joint_data(n: int, seed: int, classes: list[int], dim_f: int = 4, dim_z: int = 3):
    f, y = _blobs(n, dim_f, classes, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    mix = torch.randn(dim_f, dim_z, generator=gen, dtype=torch.float64)
    shift = torch.randn(max(classes) + 1, dim_z, generator=gen, dtype=torch.float64)
    z = f @ mix + shift[y] + 0.5 * torch.randn(n, dim_z, generator=gen, dtype=torch.float64)
    return f, z, y


def test_expert_gaussian_factorises_the_joint_lda():
    """LDA on f plus log p(z | f, c) = LDA on [f, z] (same pooled covariance), per sample up to a
    constant: the Gaussian chain rule, with no ridge and no shrinkage."""
    f, z, y = _joint_data(500, 12, [0, 1, 2, 3])
    fq, zq, _ = _joint_data(9, 13, [0, 1, 2, 3])
    frozen, joint = GaussianStats(4), GaussianStats(7)
    frozen.update(f, y)
    joint.update(torch.cat([f, z], 1), y)
    model = ExpertLogitGaussian(ridge_map=1.0, ridge_cond=0.0, alpha=0.0)
    model.update(f, z, y, torch.ones(len(y), dtype=torch.bool), frozen)
    assert model.classes == frozen.classes == joint.classes
    ours = frozen.lda_scores(fq) + model.scores(fq, zq)
    ref = joint.lda_scores(torch.cat([fq, zq], 1))
    torch.testing.assert_close(ours - ours.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True),
                               rtol=1e-7, atol=1e-7)


def test_expert_gaussian_transports_old_means_into_a_new_block():
    f1, z1, y1 = _joint_data(200, 14, [0, 1])
    f2, z2, y2 = _joint_data(200, 15, [2, 3])
    frozen = GaussianStats(4)
    frozen.update(f1, y1)
    model = ExpertLogitGaussian(ridge_map=0.7, ridge_cond=0.1, alpha=0.1)
    model.update(f1, z1[:, :2], y1, torch.ones(200, dtype=torch.bool), frozen)  # expert 0: 2 logits
    frozen.update(f2, y2)
    buffer = torch.arange(0, 200, 4)  # replayed rows of task 0, seen through both experts
    f = torch.cat([f2, f1[buffer]])
    z = torch.cat([z2, z1[buffer]])  # expert 0's 2 logits, then expert 1's 1 logit
    new = torch.arange(len(f)) < 200
    model.update(f, z, torch.cat([y2, y1[buffer]]), new, frozen)
    assert model.classes == [c for c in dict.fromkeys(y1.tolist() + y2.tolist())]
    xc = f.numpy() - f.numpy().mean(0)
    a_mat = np.linalg.solve(xc.T @ xc + 0.7 * np.eye(4), xc.T @ (z[:, 2:].numpy() - z[:, 2:].numpy().mean(0)))
    bias = z[:, 2:].numpy().mean(0) - f.numpy().mean(0) @ a_mat
    for c in (0, 1):  # old classes: transported frozen means in the new column
        mu_f = f1[y1 == c].mean(0).numpy()
        np.testing.assert_allclose(model.mu_z[model.classes.index(c), 2:].numpy(),
                                   bias + mu_f @ a_mat, rtol=1e-9)
        np.testing.assert_allclose(model.mu_z[model.classes.index(c), :2].numpy(),
                                   z1[y1 == c][:, :2].mean(0).numpy(), rtol=1e-9)
    for c in (2, 3):  # new classes: full means over all columns
        np.testing.assert_allclose(model.mu_z[model.classes.index(c)].numpy(),
                                   z2[y2 == c].mean(0).numpy(), rtol=1e-9)
    assert model.scores(f2[:5], z2[:5]).shape == (5, 4)


def test_ridge_map_recovers_an_affine_map():
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    a_true = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]], dtype=torch.float64)
    a_mat, bias = ridge_map(x, x @ a_true + torch.tensor([4.0, -1.0], dtype=torch.float64), 0.0)
    torch.testing.assert_close(a_mat, a_true)
    torch.testing.assert_close(bias, torch.tensor([4.0, -1.0], dtype=torch.float64))


def test_factored_log_posterior_weight_zero_ignores_experts():
    frozen = torch.tensor([[0.0, 1.0, 2.0]])
    experts = torch.tensor([[5.0, 0.0, 0.0]])
    torch.testing.assert_close(factored_log_posterior(frozen, experts, 0.0), frozen.log_softmax(1))
    assert factored_log_posterior(frozen, experts, 1.0).argmax().item() == 0
