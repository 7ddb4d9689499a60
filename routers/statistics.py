r"""Statistics-based heads and routers on feature tensors: no gradients, updated task by task.

Everything here works on plain feature tensors (frozen-model features, expert features, expert head
logits), so the continual engine only has to compute features and call ``update`` after each task.
All accumulators are sums, so updating task by task equals one computation over all the data.

* :class:`NCMHead`: nearest class mean, cosine similarity (SimpleCIL, arXiv 2303.07338).
* :class:`GaussianStats`: class means + one shared within-class covariance; LDA and Mahalanobis
  scores (the class statistics of SLCA, arXiv 2303.05118, and of RanPAC's LDA variant).
* :class:`RanPACHead`: random projection + ReLU, ridge regression on accumulated Gram and class
  sums, ridge ``lambda`` chosen on a validation set (RanPAC, arXiv 2307.02251)::

      h = ReLU(x W_rand)                 W_rand [D, M] ~ N(0, 1), fixed by a seed
      G = sum_i h_i h_i^T   [M, M]       Q = sum_i h_i y_i^T   [M, C]
      W = (G + lambda I)^-1 Q            logits = h W

* :class:`ExpertLogitGaussian`: the experts' evidence ``log p(z | f, c)``, where ``z``
  concatenates every expert's head logits and ``f`` is the frozen feature (a Gaussian model on
  class statistics and the replay buffer); added to a frozen classifier's log-posterior
  (:func:`factored_log_posterior`). Related: TPL (arXiv 2309.15048) scores each expert's claim on
  ``x`` from its own features, calibrated on the replay buffer, combined with a prior; here every
  expert's output enters one jointly calibrated Gaussian model instead.
* :func:`combine_task_class`: ``P(c|x) = sum_{t in top-k} P(t|x) P(c|x,t)``; :func:`task_posterior`.

Shapes: ``N`` samples, ``D`` feature dim, ``C`` classes seen so far (columns in the order of
``classes``: global class ids in order of first appearance), ``M`` random features, ``K`` expert
logits in all (the sum of the experts' head sizes), ``T`` tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ClassSums",
    "ExpertLogitGaussian",
    "GaussianStats",
    "NCMHead",
    "RanPACHead",
    "combine_task_class",
    "factored_log_posterior",
    "fit_temperature",
    "ridge_map",
    "shrink",
    "task_posterior",
]


def shrink(cov: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) cov + alpha * mean(diag(cov)) I`` for a ``[D, D]`` covariance."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return (1.0 - alpha) * cov + alpha * cov.diagonal().mean() * eye


class ClassSums:
    """Per-class feature sums and counts, growing as new class ids arrive.

    Args:
        dim: feature dimension ``D``.
        dtype: accumulation dtype (float64 by default: sums over many samples).
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64):
        self.dim, self.dtype = dim, dtype
        self.classes: list[int] = []
        self.sums = torch.zeros(0, dim, dtype=dtype)
        self.counts = torch.zeros(0, dtype=dtype)

    def columns(self, y: Tensor) -> Tensor:
        """Column of each label ``[N]`` (adding unseen class ids at the end)."""
        index = {c: i for i, c in enumerate(self.classes)}
        for c in y.tolist():
            if c not in index:
                index[c] = len(self.classes)
                self.classes.append(c)
        grow = len(self.classes) - len(self.counts)
        if grow:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.dim)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        return torch.tensor([index[c] for c in y.tolist()], dtype=torch.long)

    def update(self, x: Tensor, y: Tensor) -> Tensor:
        """Add samples ``x [N, D]`` with labels ``y [N]``; returns their columns ``[N]``."""
        cols = self.columns(y)
        self.sums.index_add_(0, cols, x.to(self.dtype))
        self.counts.index_add_(0, cols, torch.ones(len(cols), dtype=self.dtype))
        return cols

    def means(self) -> Tensor:
        """Class means ``[C, D]``."""
        return self.sums / self.counts.clamp_min(1.0)[:, None]


class NCMHead(ClassSums):
    """Nearest class mean by cosine similarity (SimpleCIL, arXiv 2303.07338).

    ``logits(x) [N, C] = cos(x, mean_c)``; ``update`` as :meth:`ClassSums.update`.
    """

    def logits(self, x: Tensor) -> Tensor:
        """Cosine similarity of ``x [N, D]`` to every class mean: ``[N, C]``."""
        return F.normalize(x.to(self.dtype), dim=-1) @ F.normalize(self.means(), dim=-1).T


class GaussianStats(ClassSums):
    r"""Class means and a shared (pooled within-class) covariance, accumulated incrementally.

    Keeps ``sum_i x_i x_i^T`` besides the class sums, so the within-class scatter is
    ``S_w = sum_i x_i x_i^T - sum_c n_c mu_c mu_c^T`` and ``cov = S_w / (N - C)`` (numpy.cov of the
    class-centred data, pooled). Scores (shared covariance ``Sigma``, shrunk by ``alpha``):

        LDA:          s_c(x) = x^T Sigma^-1 mu_c - 1/2 mu_c^T Sigma^-1 mu_c      (log-likelihood + const)
        Mahalanobis:  d_c(x) = (x - mu_c)^T Sigma^-1 (x - mu_c)
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64):
        super().__init__(dim, dtype)
        self.outer = torch.zeros(dim, dim, dtype=dtype)

    def update(self, x: Tensor, y: Tensor) -> Tensor:
        """Add samples ``x [N, D]``, labels ``y [N]``; returns their columns ``[N]``."""
        x = x.to(self.dtype)
        self.outer += x.T @ x
        return super().update(x, y)

    def covariance(self, alpha: float = 0.0) -> Tensor:
        """Pooled within-class covariance ``[D, D]``, shrunk by ``alpha`` (see :func:`shrink`)."""
        mu = self.means()
        scatter = self.outer - (mu * self.counts[:, None]).T @ mu
        dof = max(float(self.counts.sum()) - len(self.classes), 1.0)
        return shrink(scatter / dof, alpha)

    def lda_scores(self, x: Tensor, alpha: float = 0.0) -> Tensor:
        """LDA scores ``[N, C]`` (class log-likelihoods up to one constant per sample)."""
        mu = self.means()
        proj = torch.linalg.solve(self.covariance(alpha), mu.T)  # [D, C]
        return x.to(self.dtype) @ proj - 0.5 * (mu * proj.T).sum(1)

    def mahalanobis(self, x: Tensor, alpha: float = 0.0) -> Tensor:
        """Squared Mahalanobis distances ``[N, C]`` to every class mean."""
        mu = self.means()
        chol = torch.linalg.cholesky(self.covariance(alpha))
        diff = x.to(self.dtype)[:, None, :] - mu[None]  # [N, C, D]
        white = torch.linalg.solve_triangular(chol, diff.reshape(-1, self.dim).T, upper=False)
        return (white**2).sum(0).reshape(len(x), len(mu))


class RanPACHead:
    """RanPAC (McDonnell et al., NeurIPS 2023, arXiv 2307.02251): random ReLU features + ridge.

    Args:
        in_dim: input dimension ``D``.
        n_proj: number of random features ``M`` (the paper uses 10000).
        seed: seed of ``W_rand [D, M]`` (so it need not be stored).
        dtype: dtype of ``G`` and ``Q`` (float64: G sums many outer products).

    State after each task (what to checkpoint): ``seed``, ``G [M, M]``, ``Q [M, C]``, ``classes``,
    ``lam`` (and ``weights [M, C]`` to skip one solve on resume).
    """

    def __init__(self, in_dim: int, n_proj: int = 5000, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
        gen = torch.Generator().manual_seed(seed)
        self.w_rand = torch.randn(in_dim, n_proj, generator=gen, dtype=torch.float32)
        self.dtype = dtype
        self.gram = torch.zeros(n_proj, n_proj, dtype=dtype)
        self.targets = ClassSums(n_proj, dtype)  # Q^T as per-class sums of h: [C, M]
        self.lam: float | None = None
        self.weights: Tensor | None = None

    @property
    def classes(self) -> list[int]:
        return self.targets.classes

    def features(self, x: Tensor) -> Tensor:
        """``h = ReLU(x W_rand)``: ``[N, M]``."""
        return torch.relu(x.to(torch.float32) @ self.w_rand).to(self.dtype)

    def update(self, x: Tensor, y: Tensor) -> None:
        """Accumulate ``G += H^T H`` and ``Q += H^T Y`` for ``x [N, D]``, labels ``y [N]``."""
        h = self.features(x)
        self.gram += h.T @ h
        self.targets.update(h, y)
        self.weights = None

    def solve(self, lam: float) -> Tensor:
        """Ridge weights ``W = (G + lam I)^-1 Q``: ``[M, C]`` (Cholesky)."""
        eye = torch.eye(len(self.gram), dtype=self.dtype)
        chol = torch.linalg.cholesky(self.gram + lam * eye)
        return torch.cholesky_solve(self.targets.sums.T, chol)

    def fit(self, lam: float) -> None:
        """Set ``lam`` and the ridge weights."""
        self.lam, self.weights = lam, self.solve(lam)

    def select_lambda(self, x_val: Tensor, y_val: Tensor, lambdas: Sequence[float]) -> float:
        """Fit with the ``lambdas`` value of best accuracy on ``(x_val [N, D], y_val [N])``.

        Ties go to the first (list the values in order of preference). Returns the chosen value.
        """
        h = self.features(x_val)
        cols = torch.tensor([self.classes.index(c) for c in y_val.tolist()])
        best: tuple[float, float, Tensor] | None = None
        for lam in lambdas:
            w = self.solve(lam)
            acc = float(((h @ w).argmax(1) == cols).double().mean())
            if best is None or acc > best[0]:
                best = (acc, lam, w)
        assert best is not None, "select_lambda needs at least one value"
        self.lam, self.weights = best[1], best[2]
        return best[1]

    def logits(self, x: Tensor) -> Tensor:
        """``h W``: ``[N, C]`` (call :meth:`fit` or :meth:`select_lambda` first)."""
        if self.weights is None:
            raise RuntimeError("RanPACHead: call fit(lam) or select_lambda(...) after update")
        return self.features(x) @ self.weights


def fit_temperature(logits: Tensor, labels: Tensor, grid: Sequence[float]) -> float:
    """The temperature ``T`` in ``grid`` minimising the NLL of ``softmax(logits / T)``.

    Args:
        logits: ``[N, C]``; labels: ``[N]`` column indices. Ties go to the first value.
    """
    nll = [float(F.cross_entropy(logits / t, labels)) for t in grid]
    return grid[min(range(len(grid)), key=nll.__getitem__)]


def ridge_map(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Affine ridge regression ``y ~ x A + a`` on centred data: ``A [D, K]``, ``a [K]``.

    ``A = (Xc^T Xc + lam I)^-1 Xc^T Yc`` with ``Xc, Yc`` centred; ``a = mean(y) - mean(x) A``.
    """
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    a_mat = torch.linalg.solve(xc.T @ xc + lam * eye, xc.T @ (y - ym))
    return a_mat, ym - xm @ a_mat


class ExpertLogitGaussian:
    r"""The experts' evidence ``log p(z | f, c)`` under a shared-covariance Gaussian model.

    ``(f, z) | c`` is Gaussian with class means ``(mu^f_c, mu^z_c)`` and one shared covariance.
    Factorised, ``p(f, z | c) = p(f | c) p(z | f, c)`` with

        z | f, c ~ N(nu_c + B^T f, Sigma_r),     nu_c = mu^z_c - B^T mu^f_c,

    so ``log P(c | f, z) = log P(c | f) + log p(z | f, c) + const``: any calibrated frozen
    classifier (LDA, RanPAC) plus :meth:`scores` (see :func:`factored_log_posterior`).

    Estimated after each task from what a continual learner holds (``update``):

    * ``mu^z_c`` of the task just learned: means over all its data (every expert so far exists);
    * ``mu^z_c`` of older classes in the new expert's block (their data is gone): transported from
      their frozen means, ``a + A^T mu^f_c``, with the affine ridge map :func:`ridge_map` from ``f``
      to that block fitted on the current task and the replay buffer;
    * ``B`` (ridge, ``ridge_cond * N``) and ``Sigma_r`` (shrunk by ``alpha``): regression of the
      within-class residuals ``z - mu^z_y`` on ``f - mu^f_y`` over the current task and the buffer.

    Args:
        ridge_map: ridge of the transport map. ridge_cond: ridge of ``B``, per sample.
        alpha: shrinkage of ``Sigma_r`` (:func:`shrink`).

    State to checkpoint: ``classes``, ``mu_f [C, D]``, ``mu_z [C, K]``, ``cond [D, K]``,
    ``cov [K, K]`` (and the three knobs).
    """

    def __init__(self, ridge_map: float = 1.0, ridge_cond: float = 0.1, alpha: float = 0.3):
        self.ridge_map, self.ridge_cond, self.alpha = ridge_map, ridge_cond, alpha
        self.classes: list[int] = []
        self.mu_f = torch.zeros(0, 0, dtype=torch.float64)
        self.mu_z = torch.zeros(0, 0, dtype=torch.float64)
        self.cond = torch.zeros(0, 0, dtype=torch.float64)
        self.cov = torch.zeros(0, 0, dtype=torch.float64)

    def _frozen_means(self, frozen: ClassSums, classes: list[int]) -> Tensor:
        means = frozen.means()
        return means[[frozen.classes.index(c) for c in classes]].to(torch.float64)

    def _add_block(self, f: Tensor, z: Tensor) -> None:
        """Transport older classes' means into the new logit columns ``z[:, K_old:]``."""
        k_old = self.mu_z.shape[1]
        if not self.classes or z.shape[1] == k_old:
            return
        a_mat, bias = ridge_map(f, z[:, k_old:], self.ridge_map)
        self.mu_z = torch.cat([self.mu_z, bias + self.mu_f @ a_mat], 1)

    def _set_new_means(self, z: Tensor, y: Tensor, frozen: ClassSums) -> None:
        """Class means of the new task's rows (all ``K`` columns); adds unseen classes."""
        fresh = [c for c in dict.fromkeys(y.tolist()) if c not in self.classes]
        self.classes += fresh
        self.mu_z = torch.cat([self.mu_z.reshape(-1, z.shape[1]), z.new_zeros(len(fresh), z.shape[1])])
        for c in dict.fromkeys(y.tolist()):
            self.mu_z[self.classes.index(c)] = z[y == c].mean(0)
        self.mu_f = self._frozen_means(frozen, self.classes)

    def update(self, f: Tensor, z: Tensor, y: Tensor, new: Tensor, frozen: ClassSums) -> None:
        """After learning a task: ``f [N, D]``, ``z [N, K]`` (every expert so far, the new
        expert's columns last), labels ``y [N]`` over the task's data and the replay buffer;
        ``new [N]`` bool marks the task's own rows; ``frozen`` holds every class's frozen mean.
        """
        f, z = f.to(torch.float64), z.to(torch.float64)
        if self.classes:
            self.mu_f = self._frozen_means(frozen, self.classes)
        self._add_block(f, z)
        self._set_new_means(z[new], y[new], frozen)
        cols = torch.tensor([self.classes.index(c) for c in y.tolist()])
        r_f, r_z = f - self.mu_f[cols], z - self.mu_z[cols]
        eye = torch.eye(f.shape[1], dtype=torch.float64)
        self.cond = torch.linalg.solve(r_f.T @ r_f + self.ridge_cond * len(f) * eye, r_f.T @ r_z)
        res = r_z - r_f @ self.cond
        self.cov = shrink(res.T @ res / max(len(f) - len(set(y.tolist())), 1), self.alpha)

    def scores(self, f: Tensor, z: Tensor) -> Tensor:
        """``log p(z | f, c)`` up to one constant per sample: ``[N, C]`` (columns: ``classes``).

        LDA scores of the residual ``r = z - B^T f`` with class means ``nu_c``.
        """
        nu = self.mu_z - self.mu_f @ self.cond  # [C, K]
        proj = torch.linalg.solve(self.cov, nu.T)  # [K, C]
        r = z.to(torch.float64) - f.to(torch.float64) @ self.cond
        return r @ proj - 0.5 * (nu * proj.T).sum(1)


def factored_log_posterior(frozen_logp: Tensor, expert_scores: Tensor, weight: float) -> Tensor:
    """``log_softmax(log P(c | f) + weight * log p(z | f, c))``: ``[N, C]`` (same column order).

    ``weight = 1`` is Bayes' rule for the Gaussian model; ``weight = 0`` ignores the experts.
    """
    return (frozen_logp + weight * expert_scores).log_softmax(-1)


def task_posterior(class_probs: Tensor, task_of_column: Tensor, n_tasks: int) -> Tensor:
    """``P(t | x) = sum_{c in t} P(c | x)``: ``[N, T]`` from ``class_probs [N, C]`` and the task
    of every column ``task_of_column [C]``."""
    out = class_probs.new_zeros(class_probs.shape[0], n_tasks)
    return out.index_add_(1, task_of_column.to(class_probs.device), class_probs)


def combine_task_class(p_task: Tensor, p_class_given_task: list[Tensor], top_k: int) -> Tensor:
    r"""``P(c | x) = sum_{t in top-k(x)} P(t | x) P(c | x, t)`` over disjoint per-task classes.

    Args:
        p_task: ``[N, T]`` task posterior.
        p_class_given_task: ``T`` tensors ``[N, C_t]``: expert ``t``'s class posterior over its
            task's classes (e.g. its head's softmax with a fitted temperature).
        top_k: tasks kept per sample (the rest get weight 0); kept weights are renormalised.

    Returns:
        ``[N, sum_t C_t]``, columns in task order, rows summing to 1.
    """
    if len(p_class_given_task) != p_task.shape[1]:
        raise ValueError(f"{p_task.shape[1]} tasks but {len(p_class_given_task)} class posteriors")
    top = p_task.topk(min(top_k, p_task.shape[1]), dim=1).indices
    kept = torch.zeros_like(p_task).scatter_(1, top, 1.0) * p_task
    kept = kept / kept.sum(1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)
    return torch.cat([kept[:, t : t + 1] * p for t, p in enumerate(p_class_given_task)], 1)
