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
from torch import Tensor, nn

from moe_lora.core.routing import GateOutput, Routing, register_router

from .base import GateRouter, TopKConfig, masked_mean, token_mask

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank
    from moe_lora.core.layers import LoRALayer

__all__ = ["TopKRouter", "TopKGate", "load_balancing_loss", "z_loss"]


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest ``logits`` [N, E] per row and their indices, both [N, k], largest first.

    On the CPU, for k <= 4, k passes of ``max`` (about 3x faster than ``torch.topk`` for E = 64);
    on CUDA (one kernel instead of 2k + 1) and under ``torch.compile``, ``torch.topk``.
    """
    if k > 4 or logits.is_cuda or torch.compiler.is_compiling():
        return logits.topk(k, dim=-1)
    values, indices, rest = [], [], logits
    for j in range(k):
        v, i = rest.max(dim=-1, keepdim=True)
        values.append(v)
        indices.append(i)
        if j + 1 < k:
            rest = rest.scatter(-1, i, float("-inf"))
    return torch.cat(values, dim=-1), torch.cat(indices, dim=-1)


def load_balancing_loss(probs: Tensor, top: Tensor, mask: Tensor) -> Tensor:
    """``E * sum_e f_e P_e`` for ``probs`` [N, E], chosen experts ``top`` [N, k], ``mask`` [N]."""
    # membership counts [N, E] by a scatter: F.one_hot would check the index range on the host
    chosen = probs.new_zeros(probs.shape).scatter_add_(
        1, top, probs.new_ones(()).expand(top.shape))
    n_exp = probs.shape[-1]
    f = masked_mean(chosen, mask)
    return n_exp * (f * masked_mean(probs, mask)).sum()


def z_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """Router z-loss ``mean_n logsumexp(logits_n)^2`` over tokens with ``mask`` 1."""
    return masked_mean(torch.logsumexp(logits, -1).square()[:, None], mask)[0]


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
        self.last_indices: Tensor | None = None
        self._last_logits: Tensor | None = None
        self._last_mask: Tensor | None = None

    @property
    def last_probs(self) -> Tensor | None:
        """Softmax probabilities [N, E] of the last forward (detached; computed on access)."""
        return None if self._last_logits is None else torch.softmax(self._last_logits, dim=-1)

    @property
    def last_load(self) -> Tensor | None:
        """Mean gate probability per expert over the last forward's real tokens [E] (tokens whose
        logits are not finite do not count)."""
        probs = self.last_probs
        if probs is None or self._last_logits is None:
            return None
        mask = torch.isfinite(self._last_logits).all(-1).to(probs.dtype)
        if self._last_mask is not None:
            mask = mask * self._last_mask
        return masked_mean(probs, mask)

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
        k = min(cfg.k, logits.shape[-1])
        top_logits, top = top_k(logits, k)  # softmax is monotone: select on the logits
        if cfg.normalize:  # p_i / sum_top p_j = softmax over the chosen logits
            top_p = torch.softmax(top_logits, dim=-1)
        else:
            top_p = (top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        training = self.training and torch.is_grad_enabled()  # the losses only matter then
        # Training: real and finite tokens (the losses); inference: the attention mask alone,
        # converted once per batch for all gates (non-finite tokens are left out of last_load).
        mask = (token_mask(x, self.router.attention_mask) if training
                else self.router.float_mask(h))
        weights = top_p if mask is None else top_p * mask[:, None]
        aux, probs = self.router.zero(logits), None
        if training:
            assert mask is not None
            probs = torch.softmax(logits, dim=-1)
            aux = cfg.balance_coef * load_balancing_loss(probs, top, mask)
            if cfg.z_coef > 0:
                aux = aux + cfg.z_coef * z_loss(logits, mask)
        elif layer.ctx.record:
            probs = torch.softmax(logits, dim=-1)
        self._last_logits, self.last_indices, self._last_mask = logits.detach(), top, mask
        if x.dim() == 3:
            b, t = x.shape[:2]
            routing = Routing.per_token(top.reshape(b, t, k), weights.reshape(b, t, k), valid=True)
        else:
            routing = Routing.per_sample(top, weights, valid=True)
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
