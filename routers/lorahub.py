r"""LoRAHub: gradient-free search of composition weights for a new task (arXiv 2307.13269).

Given E existing experts and a few examples of a new task, LoRAHub searches ``w`` in
``[-1.5, 1.5]^E`` with nevergrad's NGOpt (starting from ``w = 0``) to minimise::

    L(w) = task_loss(composed experts) + 0.05 * mean_i |w_i|

Two compositions (``LoRAHubConfig.composition``), ``s_i`` each expert's scale:

* ``"parameter"`` (the paper): the factors are mixed separately,
  ``dW = (sum_i w_i s_i B_i) (sum_i w_i A_i)``; all experts must share one rank r and the result
  is a new rank-r expert (scale 1). The update has cross terms ``w_i w_j s_i B_i A_j``: it is not
  a weighted sum of the experts' updates, and depends on the experts' bases being aligned
  (e.g. LoRAs trained from one shared ``A`` init).
* ``"output"``: the updates are mixed, ``dW = sum_i w_i s_i B_i A_i`` (any ranks), exactly the
  bank's ``Routing.dense(w)``. It is kept either as fixed weights (``keep="weights"``: the router
  returns them for every batch; new experts added later get weight 0) or as a new expert of rank
  ``sum_i r_i`` (``keep="expert"``: ``A = [w_1 A_1; ...]``, ``B = [s_1 B_1, ...]``).

During the search each candidate is written into a scratch expert named
``LoRAHubConfig.expert_name`` and evaluated with ``Routing.single``; with ``keep="expert"`` that
expert stays in the bank with the best weights (in ``ExpertInfo.meta["lorahub"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from moe_lora.core.config import ExpertConfig
from moe_lora.core.routing import RouterInput, RouterOutput, Routing, register_router

from .base import LoRAHubConfig, WeightLog, bank_device, batch_size

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank

__all__ = ["LoRAHubRouter", "LoRAHubResult", "compose_state"]

LossFn = Callable[[], "float | Tensor"]


@dataclass
class LoRAHubResult:
    """Outcome of :meth:`LoRAHubRouter.fit`.

    Attributes:
        weights: expert name -> found weight.
        objective: ``task_loss + l1 * mean|w|`` at the found weights.
        task_loss: the task loss alone at the found weights.
        evaluations: loss evaluations spent (the budget).
    """

    weights: dict[str, float]
    objective: float
    task_loss: float
    evaluations: int


@torch.no_grad()
def compose_state(
    bank: ExpertBank, names: Sequence[str], weights: Sequence[float], composition: str
) -> dict[str, Tensor]:
    """The factors of the composed expert (scale 1), keyed as :meth:`ExpertBank.expert_state`.

    ``"parameter"``: ``A = sum w_i A_i`` [r, in], ``B = sum w_i s_i B_i`` [out, r];
    ``"output"``: ``A = cat_i w_i A_i`` [sum r_i, in], ``B = cat_i s_i B_i`` [out, sum r_i].

    Raises:
        ValueError: parameter composition of experts with different ranks.
    """
    ranks = {n: bank.info(n).config.rank for n in names}
    if composition == "parameter" and len(set(ranks.values())) > 1:
        raise ValueError(f"parameter composition needs equal ranks, got {ranks}; use 'output'")
    scales = [bank.info(n).config.scale for n in names]
    states = [bank.expert_parameters(n) for n in names]
    out: dict[str, Tensor] = {}
    for key in states[0]:
        if key.endswith(".lora_A"):
            parts = [w * s[key] for w, s in zip(weights, states, strict=True)]
            out[key] = sum(parts[1:], parts[0]) if composition == "parameter" else torch.cat(parts)
        elif composition == "parameter":
            parts = [w * c * s[key] for w, c, s in zip(weights, scales, states, strict=True)]
            out[key] = sum(parts[1:], parts[0])
        else:  # the weights are already in A
            out[key] = torch.cat([c * s[key] for c, s in zip(scales, states, strict=True)], 1)
    return {k: v.detach() for k, v in out.items()}


@register_router("lorahub")
class LoRAHubRouter(WeightLog):
    """Find composition weights for a new task with nevergrad, then route to the composition.

    Args:
        config: the :class:`LoRAHubConfig`.
        bank: the expert bank holding the experts to compose.

    Usage::

        hub = LoRAHubRouter(LoRAHubConfig(budget=40), bank)
        result = hub.fit(lambda: few_shot_loss(bank.model))   # bank routing is set by fit
        with bank.use(hub.routing(RouterInput(texts=batch_texts))): ...
    """

    config_class = LoRAHubConfig

    def __init__(self, config: LoRAHubConfig, bank: ExpertBank):
        self.config = config
        self.bank = bank
        self.result: LoRAHubResult | None = None
        self.last_weights: Tensor | None = None

    def _names(self) -> list[str]:
        names = list(self.config.experts) if self.config.experts is not None else self.bank.names
        for n in names:
            self.bank.index(n)
        return names

    def _scratch(self, names: list[str]) -> str:
        cfg = self.config
        if cfg.expert_name in self.bank:
            raise ValueError(f"LoRAHubConfig.expert_name {cfg.expert_name!r} is already an expert")
        ranks = [self.bank.info(n).config.rank for n in names]
        rank = ranks[0] if cfg.composition == "parameter" else sum(ranks)
        self.bank.add_expert(
            cfg.expert_name, ExpertConfig(rank=rank, alpha=float(rank)), trainable=False
        )
        return cfg.expert_name

    def objective(
        self, w: Sequence[float], loss_fn: LossFn, names: Sequence[str]
    ) -> tuple[float, float]:
        """``(task_loss + l1 * mean|w|, task_loss)`` of weights ``w`` over experts ``names``.

        The composition is written into the scratch expert, which must exist (inside :meth:`fit`).
        """
        name = self.config.expert_name
        self.bank.set_expert_state(
            name, compose_state(self.bank, names, w, self.config.composition)
        )
        with torch.no_grad(), self.bank.use(name):
            task = float(loss_fn())
        return task + self.config.l1 * float(np.mean(np.abs(w))), task

    def fit(self, loss_fn: LossFn) -> LoRAHubResult:
        """Search the weights; ``loss_fn()`` returns the few-shot task loss under the bank's routing.

        Raises:
            ValueError: unknown optimiser, taken ``expert_name``, or unequal ranks (parameter).
        """
        import nevergrad as ng

        cfg = self.config
        if cfg.optimizer not in ng.optimizers.registry:
            raise ValueError(
                f"LoRAHubConfig.optimizer: unknown nevergrad optimiser {cfg.optimizer!r}"
            )
        names = self._names()
        compose_state(self.bank, names, [0.0] * len(names), cfg.composition)  # checks ranks
        scratch = self._scratch(names)
        try:
            param = ng.p.Array(init=np.zeros(len(names)), lower=-cfg.bound, upper=cfg.bound)
            param.random_state = np.random.RandomState(cfg.seed)
            opt = ng.optimizers.registry[cfg.optimizer](parametrization=param, budget=cfg.budget)
            best = opt.minimize(lambda w: self.objective(w, loss_fn, names)[0]).value
            objective, task = self.objective(best, loss_fn, names)
        except BaseException:
            self.bank.remove_expert(scratch)
            raise
        weights = {n: float(v) for n, v in zip(names, best, strict=True)}
        if cfg.keep == "weights":
            self.bank.remove_expert(scratch)
        else:
            self.bank.info(scratch).meta["lorahub"] = {
                "weights": weights,
                "composition": cfg.composition,
            }
        self.result = LoRAHubResult(weights, objective, task, cfg.budget)
        return self.result

    def route(self, batch: RouterInput) -> RouterOutput:
        """The found composition for every sample of ``batch``.

        ``keep="expert"``: ``indices`` [B, 1] of the composed expert, weight 1;
        ``keep="weights"``: dense ``weights`` [B, E] over the current bank (0 for other experts).

        Raises:
            RuntimeError: :meth:`fit` has not run.
        """
        if self.result is None:
            raise RuntimeError("LoRAHubRouter: call fit() first")
        b, n = batch_size(batch), len(self.bank)
        device = bank_device(self.bank)
        if self.config.keep == "expert":
            i = self.bank.index(self.config.expert_name)
            self.last_weights = torch.zeros(b, n).index_fill_(1, torch.tensor([i]), 1.0)
            indices = torch.full((b, 1), i, device=device)
            return RouterOutput(weights=torch.ones(b, 1, device=device), indices=indices)
        row = torch.zeros(n)
        for name, w in self.result.weights.items():
            row[self.bank.index(name)] = w
        self.last_weights = row.expand(b, n).clone()
        return RouterOutput(weights=self.last_weights.to(device, copy=True))

    def routing(self, batch: RouterInput) -> Routing:
        """The :class:`Routing` to apply for ``batch``."""
        return Routing.from_output(self.route(batch)).for_layout(self.bank.ctx.layout)
