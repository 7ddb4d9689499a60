r"""Top-k token routing with a per-layer linear router, as MixLoRA (arXiv 2404.15159).

For the N tokens ``x_n`` [in] reaching a LoRA layer with E experts, router ``W`` [E, in]::

    x'  = x * U(1 - jitter, 1 + jitter)          (training only; as Switch / Mixtral / MixLoRA)
    l   = x' W^T                                  [N, E]
    p   = softmax(l)
    top = the k largest p_n,e;  w_n,e = p_n,e / sum_{e' in top_n} p_n,e'   (renormalised;
                                                      ``normalize=False``: w = p, as Switch)
    y   = base(x) + sum_{e in top_n} w_n,e s_e B_e A_e x

Only the chosen experts are computed (``Routing.per_token``: tokens are dispatched per expert).
Aux losses, over the real tokens (attention mask) only, with ``M`` the number of real tokens:

* load balancing (Switch/Mixtral form): ``E * sum_e f_e P_e``, ``f_e`` the fraction of real
  tokens whose top-k holds ``e``, ``P_e`` the mean of ``p_n,e`` (gradients flow through ``P``);
* router z-loss (ST-MoE): ``mean_n logsumexp(l_n)^2``.

The gate reports ``balance_coef * balance + z_coef * z``. Padding tokens get weight 0 (their LoRA
delta is not computed). A new bank expert gets a new router row (normal, ``init_std``) at the
gate's next forward; old rows are kept (new parameter tensor: rebuild the optimiser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lora.routing import GateOutput, Routing, register_router

from .base import GateRouter, TopKConfig, token_mask

if TYPE_CHECKING:
    from moe_lora.bank import ExpertBank
    from moe_lora.layers import LoRALayer

__all__ = ["TopKRouter", "TopKGate", "load_balancing_loss", "z_loss"]


def load_balancing_loss(probs: Tensor, top: Tensor, mask: Tensor) -> Tensor:
    """``E * sum_e f_e P_e`` for ``probs`` [N, E], chosen experts ``top`` [N, k], ``mask`` [N]."""
    n_exp = probs.shape[-1]
    m = mask[:, None]
    denom = mask.sum().clamp_min(1.0)
    f = (F.one_hot(top, n_exp).sum(1).to(probs.dtype) * m).sum(0) / denom
    p = (probs * m).sum(0) / denom
    return n_exp * (f * p).sum()


def z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Router z-loss ``mean_n logsumexp(logits_n)^2`` over tokens with ``mask`` 1."""
    return (torch.logsumexp(logits, -1).square() * mask).sum() / mask.sum().clamp_min(1.0)


class TopKGate(nn.Module):
    """The per-token router of one LoRA layer.

    Args:
        router: the owning :class:`TopKRouter` (config and attention mask).
        in_features: the layer's input size.

    Attributes:
        weight: [E, in].
        last_probs: softmax probabilities [N, E] of the last forward (detached).
        last_load: their mean over real tokens [E] (detached; computed on access).
        last_indices: chosen experts [N, k] of the last forward.
    """

    def __init__(self, router: TopKRouter, in_features: int):
        super().__init__()
        self.router = router
        self.weight = nn.Parameter(torch.zeros(0, in_features))
        self.last_probs: Tensor | None = None
        self.last_indices: Tensor | None = None
        self._last_mask: Tensor | None = None

    @property
    def last_load(self) -> Tensor | None:
        """Mean gate probability per expert over the last forward's real tokens [E]."""
        if self.last_probs is None or self._last_mask is None:
            return None
        m = self._last_mask[:, None]
        return (self.last_probs * m).sum(0) / self._last_mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def grow(self, n_experts: int) -> None:
        """Add router rows up to ``n_experts`` (normal init), keeping the current rows."""
        e = self.weight.shape[0]
        if n_experts == e:
            return
        if n_experts < e:
            raise RuntimeError(
                f"the bank has {n_experts} experts but the router has {e} rows; experts were "
                "removed: attach new gates"
            )
        new = self.weight.new_empty(n_experts - e, self.weight.shape[1])
        new.normal_(0.0, self.router.config.init_std)
        self.weight = nn.Parameter(torch.cat([self.weight, new]))

    def forward(self, x: Tensor, layer: LoRALayer) -> GateOutput:
        cfg = self.router.config
        self.grow(len(layer.experts))
        h = x.reshape(-1, x.shape[-1])
        if self.training and cfg.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        logits = h.float() @ self.weight.float().t()
        probs = torch.softmax(logits, dim=-1)
        k = min(cfg.k, probs.shape[-1])
        top_p, top = probs.topk(k, dim=-1)
        mask = token_mask(x, self.router.attention_mask)
        if cfg.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        weights = top_p * mask[:, None]
        aux = logits.new_zeros(())
        if self.training and torch.is_grad_enabled():  # the losses only matter when training
            aux = cfg.balance_coef * load_balancing_loss(probs, top, mask)
            if cfg.z_coef > 0:
                aux = aux + cfg.z_coef * z_loss(logits, mask)
        self.last_probs, self.last_indices, self._last_mask = probs.detach(), top, mask
        if x.dim() == 3:
            b, t = x.shape[:2]
            routing = Routing.per_token(top.reshape(b, t, k), weights.reshape(b, t, k))
        else:
            routing = Routing.per_sample(top, weights)
        return GateOutput(routing=routing, aux_loss=aux, probs=probs)


@register_router("topk")
class TopKRouter(GateRouter):
    """Gate factory for top-k token routing (MixLoRA, arXiv 2404.15159); see the module docstring.

    Args:
        config: the :class:`TopKConfig`.
        bank: the expert bank; its experts may be trainable (MixLoRA trains experts and routers
            together) or frozen.

    Usage::

        router = TopKRouter(TopKConfig(k=2), bank).attach()
        with bank.use(router.routing(RouterInput(attention_mask=mask))):
            loss = task_loss(bank.model(x)) + bank.pop_aux_loss()
    """

    config_class = TopKConfig

    def __init__(self, config: TopKConfig, bank: ExpertBank):
        super().__init__(bank)
        self.config = config

    def make_gate(self, path: str, layer: LoRALayer) -> nn.Module:
        gate = TopKGate(self, layer.in_features)
        gate.grow(len(layer.experts))
        return gate
