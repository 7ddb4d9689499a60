"""``experts-stats``: the factored Bayes router over every class seen so far.

With ``f`` the frozen features of an input (``features: layers``, the default: the mean-pooled
outputs of the last ``model.feature_layers`` frozen layers, each L2-normalised, concatenated;
``sentence``: the base embedding, the retrieval keys' space) and ``z`` the logits of every seen
expert's own head (expert ``e`` alone, its classes)::

    log P(c | x) = alpha * log softmax(LDA(f) / tau_L) + (1 - alpha) * log softmax(RanPAC(f) / tau_R)
                 + w_z * log p(z | f, c)

* the frozen prior: shared-covariance LDA on class statistics (SLCA, arXiv 2303.05118) and a
  RanPAC ridge head (arXiv 2307.02251), each temperature-calibrated on the validation split of the
  seen tasks (:func:`moe_lora.routers.statistics.fit_temperature`);
* the experts' evidence: :class:`moe_lora.routers.statistics.ExpertLogitGaussian`, a Gaussian
  model of the experts' logits given ``f`` and the class, fitted after each task on the task's data
  and the replay buffer as it stood before the task (TPL, arXiv 2309.15048, scores each expert's
  claim from its own features calibrated on replay; here all experts enter one model);
* the decision: the argmax, or (``top_k > 0``) ``P(c|x) = sum_{t in top-k} P(t|x) P(c|x,t)`` with
  each expert's head as ``P(c|x,t)`` (temperature fitted on its task's validation split).

``alpha``, ``w_z`` and ``top_k`` are chosen after every task on the validation split of the tasks
seen so far, from small grids (``select: auto``; ``fixed`` uses the configured values). Nothing is
ever tuned on a test split. ``P(t|x) = sum_{c in t} P(c|x)`` is the router's task weight (TP).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_lora.continual.prepared import Examples
from moe_lora.continual.settings import check, check_finite
from moe_lora.continual.strategies.base import Prediction, check_features
from moe_lora.continual.strategies.inference import Inference, Shared
from moe_lora.routers.statistics import (
    ExpertLogitGaussian,
    GaussianStats,
    RanPACHead,
    combine_task_class,
    fit_temperature,
    task_posterior,
)

__all__ = ["FactoredBayes", "StatsOptions"]

TEMPS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LDA_TEMPS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
HEAD_TEMPS = (0.1, 0.3, 1.0, 3.0)


@dataclass
class StatsOptions:
    """``strategies.experts.stats``: the factored Bayes router (see the module docstring).

    Attributes:
        select: ``auto`` (choose alpha, w_z, top_k on the seen tasks' validation split after every
            task, from the grids below) or ``fixed`` (the values below).
        alpha, w_z, top_k: the fixed values (top_k 0: argmax over all classes).
        alphas, w_zs, top_ks: the grids of ``auto``.
        lda_shrinkage: shrinkage of the LDA covariance. n_proj: RanPAC random features.
        lambdas: RanPAC ridge values (chosen on validation after every task).
        features: the frozen features ``f``: ``layers`` (multi-layer) or ``sentence``.
    """

    select: str = "auto"
    alpha: float = 0.5
    w_z: float = 0.5
    top_k: int = 0
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    w_zs: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    top_ks: list[int] = field(default_factory=lambda: [0, 2])
    lda_shrinkage: float = 0.01
    n_proj: int = 5000
    lambdas: list[float] = field(default_factory=lambda: [10.0, 100.0, 1000.0, 10000.0])
    features: str = "layers"

    def __post_init__(self) -> None:
        s = "strategies.experts.stats"
        check_finite(self, s)
        check_features(self.features, f"{s}.features")
        check(self.select in ("auto", "fixed"), f"{s}.select", "must be 'auto' or 'fixed'")
        check(0.0 <= self.alpha <= 1.0, f"{s}.alpha", "must be in [0, 1]")
        check(all(0.0 <= a <= 1.0 for a in self.alphas) and bool(self.alphas), f"{s}.alphas",
              "must be values in [0, 1]")
        check(self.w_z >= 0 and all(w >= 0 for w in self.w_zs) and bool(self.w_zs), f"{s}.w_zs",
              "must be values >= 0")
        check(self.top_k >= 0 and all(k >= 0 for k in self.top_ks) and bool(self.top_ks),
              f"{s}.top_ks", "must be values >= 0")
        check(0.0 <= self.lda_shrinkage <= 1.0, f"{s}.lda_shrinkage", "must be in [0, 1]")
        check(self.n_proj >= 1, f"{s}.n_proj", "must be >= 1")
        check(bool(self.lambdas) and all(v > 0 for v in self.lambdas), f"{s}.lambdas",
              "must be values > 0")


class FactoredBayes(Inference):
    """The factored Bayes router (see the module docstring)."""

    needs = frozenset({"replay"})

    def __init__(self, shared: Shared):
        super().__init__(shared)
        self.opts: StatsOptions = shared.options.stats
        self._build(self.opts.features)
        self.tau = {"lda": 1.0, "ranpac": 1.0}
        self.head_tau: list[float] = []
        self.chosen = {"alpha": self.opts.alpha, "w_z": self.opts.w_z, "top_k": self.opts.top_k}
        self.task_of = {c: t.task_id for t in shared.ctx.stream for c in t.class_ids}

    def _build(self, kind: str) -> None:
        """Empty statistics over the ``kind`` frozen features."""
        self.kind = kind
        dim = self.shared.ctx.feature_dim(kind)
        self.gauss = GaussianStats(dim)
        self.ranpac = RanPACHead(dim, self.opts.n_proj, seed=self.shared.ctx.cfg.train.seed)
        self.elg = ExpertLogitGaussian()

    def features(self, ex: Examples) -> Tensor:
        """The frozen features ``f`` of ``ex``."""
        return self.shared.ctx.frozen_features(ex, self.kind)

    # ---------------------------------------------------------------- after a task
    def after_task(self, task: int) -> None:
        s, ctx = self.shared, self.shared.ctx
        train = ctx.tasks[task].train
        f = self.features(train)
        self.gauss.update(f, train.labels)
        self.ranpac.update(f, train.labels)
        pool = train if s.previous_replay is None else Examples.concat([train, s.previous_replay])
        new = torch.zeros(len(pool), dtype=torch.bool)
        new[: len(train)] = True
        self.elg.update(self.features(pool), s.expert_logits(task, pool), pool.labels, new,
                        self.gauss)
        val = Examples.concat([pt.val for pt in ctx.tasks[: task + 1]])
        if len(val):
            self._calibrate(task, val)
        else:  # no validation split: the fixed knobs, plain temperatures
            self.head_tau.append(1.0)

    def _calibrate(self, task: int, val: Examples) -> None:
        """λ, the temperatures and (``auto``) alpha, w_z, top_k on the seen tasks' validation."""
        f = self.features(val)
        self.ranpac.select_lambda(f, val.labels, self.opts.lambdas)
        cols = self._columns(val.labels)
        self.tau["ranpac"] = fit_temperature(self.ranpac.logits(f), cols, TEMPS)
        self.tau["lda"] = fit_temperature(self.gauss.lda_scores(f, self.opts.lda_shrinkage), cols,
                                          LDA_TEMPS)
        pt = self.shared.ctx.tasks[task].val
        if len(pt):
            block = self.shared.expert_logits(task, pt).split(self._sizes(task), 1)[task]
            local = torch.tensor([self.shared.heads.class_ids[task].index(int(c))
                                  for c in pt.labels])
            self.head_tau.append(fit_temperature(block.double(), local, HEAD_TEMPS))
        else:
            self.head_tau.append(1.0)
        if self.opts.select == "auto":
            self._select(task, val, f)

    def _select(self, task: int, val: Examples, f: Tensor) -> None:
        z = self.shared.expert_logits(task, val)
        parts = self._parts(f, z)  # once: every grid point only re-weighs them
        grid = itertools.product(self.opts.alphas, self.opts.w_zs, self.opts.top_ks)
        best = None
        for alpha, w_z, top_k in grid:  # ties go to the first (the simplest) setting
            pred = self._classes(parts, z, task, alpha, w_z, top_k)[0]
            acc = float((pred == val.labels).double().mean())
            if best is None or acc > best[0]:
                best = (acc, {"alpha": alpha, "w_z": w_z, "top_k": top_k})
        assert best is not None
        self.chosen = best[1]

    # ---------------------------------------------------------------- prediction
    def _sizes(self, step: int) -> list[int]:
        return [len(c) for c in self.shared.heads.class_ids[: step + 1]]

    def _columns(self, labels: Tensor) -> Tensor:
        return torch.tensor([self.gauss.classes.index(int(c)) for c in labels])

    def _parts(self, f: Tensor, z: Tensor) -> dict[str, Tensor]:
        """The three terms of the rule, ``[N, C]`` each: calibrated LDA and RanPAC
        log-posteriors and the experts' evidence."""
        lda = self.gauss.lda_scores(f, self.opts.lda_shrinkage) / self.tau["lda"]
        return {"lda": lda.log_softmax(1),
                "ranpac": (self.ranpac.logits(f) / self.tau["ranpac"]).log_softmax(1),
                "experts": self.elg.scores(f, z)}

    def _classes(self, parts: dict[str, Tensor], z: Tensor, step: int, alpha: float, w_z: float,
                 top_k: int) -> tuple[Tensor, Tensor]:
        """(predicted class ids ``[N]``, task weights ``[N, step+1]``) from :meth:`_parts`."""
        logp = torch.zeros_like(parts["lda"])
        if alpha > 0:
            logp = logp + alpha * parts["lda"]
        if alpha < 1:
            logp = logp + (1 - alpha) * parts["ranpac"]
        if w_z > 0:
            logp = logp + w_z * parts["experts"]
        probs = logp.softmax(1)
        task_of = torch.tensor([self.task_of[c] for c in self.gauss.classes])
        p_task = task_posterior(probs, task_of, step + 1)
        if top_k > 0:
            heads = [(b.double() / t).softmax(1) for b, t in
                     zip(z.split(self._sizes(step), 1), self.head_tau, strict=False)]
            probs = combine_task_class(p_task, heads, top_k)
            order = torch.tensor([c for ids in self.shared.heads.class_ids[: step + 1]
                                  for c in ids])
            return order[probs.argmax(1)], p_task
        return torch.tensor(self.gauss.classes)[probs.argmax(1)], p_task

    def predict(self, step: int, test: Examples) -> Prediction:
        f = self.features(test)
        z = self.shared.expert_logits(step, test)
        preds, p_task = self._classes(self._parts(f, z), z, step, **self.chosen)
        return Prediction(classes=preds, task_weights=p_task.float())

    def details(self) -> dict[str, Any]:
        """The knobs in force after the last task (chosen on validation) and the features."""
        return {"features": self.kind, "chosen": dict(self.chosen),
                "ranpac_lambda": self.ranpac.lam, "temperatures": dict(self.tau),
                "head_temperatures": list(self.head_tau)}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        g, r, e = self.gauss, self.ranpac, self.elg
        return {
            "features": self.kind,
            "gauss": {"sums": g.sums, "counts": g.counts, "outer": g.outer, "classes": g.classes},
            "ranpac": {"gram": r.gram, "sums": r.targets.sums, "counts": r.targets.counts,
                       "classes": r.classes, "lam": r.lam},
            "elg": {"classes": e.classes, "mu_f": e.mu_f, "mu_z": e.mu_z, "cond": e.cond,
                    "cov": e.cov},
            "tau": dict(self.tau), "head_tau": list(self.head_tau), "chosen": dict(self.chosen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build(state.get("features", "sentence"))  # runs saved before the option: sentence
        g, r, e = state["gauss"], state["ranpac"], state["elg"]
        self.gauss.sums, self.gauss.counts, self.gauss.outer = g["sums"], g["counts"], g["outer"]
        self.gauss.classes = list(g["classes"])
        self.ranpac.gram, self.ranpac.targets.sums = r["gram"], r["sums"]
        self.ranpac.targets.counts, self.ranpac.targets.classes = r["counts"], list(r["classes"])
        if r["lam"] is not None:
            self.ranpac.fit(r["lam"])
        self.elg.classes = list(e["classes"])
        self.elg.mu_f, self.elg.mu_z, self.elg.cond, self.elg.cov = (
            e["mu_f"], e["mu_z"], e["cond"], e["cov"])
        self.tau, self.head_tau = dict(state["tau"]), list(state["head_tau"])
        self.chosen = dict(state["chosen"])
