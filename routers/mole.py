r"""MoLE: a learnable gate per layer over frozen LoRA experts' outputs (arXiv 2404.13628).

For a token with LoRA-layer input ``x`` and the E experts' outputs ``o_i = s_i B_i A_i x`` [d]::

    z_i = LayerNorm(o_i)                              (no affine; per expert)
    l_j = sum_i <z_i, W[i, :, j]> / sqrt(d) + b_j     (W [E, d, E]: linear map of the concatenation)
    p   = softmax(l / tau)                            (tau = exp(log_tau), learnable)
    y   = base(x) + sum_i p_i o_i

The ``1/sqrt(d)`` keeps the logits O(1) per unit of ``W``: each ``z_i`` has d unit-variance
entries, so without it one Adam step of size lr moves a logit by about ``lr * E * d`` (15 for
lr 1e-2, E = 5, d = 384) and saturates a fresh gate into a one-hot choice whose gradient vanishes.

MoLE's balance loss on the gate probabilities, with ``q_i`` the mean of ``p_i`` over the real
tokens of the batch, is ``L = -log prod_i q_i = -sum_i log q_i`` (computed as a sum of logs); each
gated layer reports ``balance_coef * L`` and :meth:`ExpertBank.pop_aux_loss` averages it over the
gated layers. At inference :meth:`MoLERouter.mask_experts` drops experts: their logits become
``-inf``, i.e. the remaining probabilities are renormalised.

Granularity: ``"layer"`` gives every LoRA layer its own gate. ``"block"`` gives one gate to all
LoRA layers of a block (``MoLEConfig.block_regex``): the block's first LoRA layer (its *leader*,
in bank order, which must also run first in the forward) computes the probabilities from its own
experts' outputs; the other layers of the block mix their experts with these probabilities.

Growth: gates are sized for the bank's experts when attached, so an optimiser built right after
:meth:`MoLERouter.attach` holds every gate parameter. When the bank gains an expert, each gate
grows ``W`` and ``b`` with zeros at its next forward (or :meth:`MoLERouter.grow`), keeping the
trained entries (new parameter tensors: rebuild the optimiser after adding experts). Normalising each expert's output separately keeps old experts' features unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lora.core.routing import GateOutput, register_router

from .base import GateRouter, MoLEConfig, masked_mean, token_mask

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank
    from moe_lora.core.layers import LoRALayer

__all__ = ["MoLERouter", "MoLEGate", "balance_loss"]


def balance_loss(probs: Tensor, mask: Tensor) -> Tensor:
    """MoLE's ``-sum_i log q_i``, ``q_i`` the mean of ``probs`` [N, E] over tokens with ``mask`` 1."""
    q = masked_mean(probs, mask)
    return -torch.log(q.clamp_min(1e-12)).sum()


class MoLEGate(nn.Module):
    """The gate of one LoRA layer (or of the leader of a block).

    Args:
        router: the owning :class:`MoLERouter` (config, attention mask, masked experts).
        out_features: d, the layer's output size.
        n_experts: E, the experts of the layer now (zero-initialised ``W`` and ``b``, i.e. a
            uniform gate); later experts are added by :meth:`grow`.

    Attributes:
        weight: [E, d, E]; bias: [E]; log_tau: scalar.
        last_probs: gate probabilities [N, E] of the last forward (detached).
        last_load: their mean over real tokens [E] (detached).
    """

    def __init__(self, router: MoLERouter, out_features: int, n_experts: int):
        super().__init__()
        cfg = router.config
        self.router = router
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(n_experts, out_features, n_experts))
        self.bias = nn.Parameter(torch.zeros(n_experts))
        tau = torch.tensor(math.log(cfg.temperature))
        self.log_tau = nn.Parameter(tau, requires_grad=cfg.learn_temperature)
        self.step = 0  # forwards run, read by the block's other layers
        self.shared: tuple[Tensor, Tensor] | None = None  # (probs, aux loss) of the last forward
        self.last_probs: Tensor | None = None
        self.last_load: Tensor | None = None

    @property
    def n_experts(self) -> int:
        """E, the experts the gate currently has columns for."""
        return int(self.bias.shape[0])

    @torch.no_grad()
    def grow(self, n_experts: int) -> None:
        """Widen to ``n_experts`` experts with zero entries, keeping the current ones."""
        e, d = self.n_experts, self.out_features
        if n_experts == e:
            return
        if n_experts < e:
            raise RuntimeError(
                f"the bank has {n_experts} experts but the gate has {e} columns; experts were "
                "removed: attach new gates"
            )
        w = self.weight.new_zeros(n_experts, d, n_experts)
        w[:e, :, :e] = self.weight
        b = self.bias.new_zeros(n_experts)
        b[:e] = self.bias
        self.weight, self.bias = nn.Parameter(w), nn.Parameter(b)

    @property
    def tau(self) -> Tensor:
        """The softmax temperature (positive)."""
        return self.log_tau.exp()

    def probs(self, outs: Tensor, dropped: list[int]) -> Tensor:
        """Gate probabilities [N, E] from the experts' outputs ``outs`` [N, E, d].

        Experts ``dropped`` (bank indices) get probability 0; the others are renormalised.
        """
        self.grow(outs.shape[1])
        z = F.layer_norm(outs, (self.out_features,))
        logits = torch.einsum("nid,idj->nj", z, self.weight) / math.sqrt(self.out_features)
        logits = logits + self.bias
        if dropped:
            logits = logits.index_fill(1, torch.tensor(dropped, device=logits.device), -math.inf)
        return torch.softmax(logits / self.tau, dim=-1)

    def forward(self, x: Tensor, layer: LoRALayer) -> GateOutput:
        outs = layer.expert_outputs(x)
        outs = outs.reshape(-1, *outs.shape[-2:])  # [N, E, d]
        mask = token_mask(x, self.router.attention_mask)
        dropped = self.router.masked_indices()
        probs = self.probs(outs, dropped)
        kept = [i for i in range(probs.shape[1]) if i not in dropped]
        loss = self.router.config.balance_coef * balance_loss(probs[:, kept], mask)
        self.step += 1
        self.shared = (probs, loss)
        return _mix(self, probs, outs, loss, mask)


class _BlockMember(nn.Module):
    """A LoRA layer of a block whose probabilities come from the block's leader gate."""

    def __init__(self, leader: MoLEGate):
        super().__init__()
        object.__setattr__(self, "leader", leader)  # not a submodule: its parameters count once
        self.seen_step = 0
        self.last_probs: Tensor | None = None
        self.last_load: Tensor | None = None

    def forward(self, x: Tensor, layer: LoRALayer) -> GateOutput:
        leader: MoLEGate = self.leader  # type: ignore[assignment]
        if leader.shared is None or leader.step == self.seen_step:
            raise RuntimeError(
                f"{layer.path}: the block's first LoRA layer has not run in this forward; with "
                "granularity='block' it must run before the other layers of its block"
            )
        self.seen_step = leader.step
        probs, loss = leader.shared
        outs = layer.expert_outputs(x)
        outs = outs.reshape(-1, *outs.shape[-2:])
        if outs.shape[0] != probs.shape[0]:
            raise RuntimeError(
                f"{layer.path}: {outs.shape[0]} tokens, but the block gate routed {probs.shape[0]}"
            )
        return _mix(self, probs, outs, loss, token_mask(x, leader.router.attention_mask))


def _mix(
    gate: MoLEGate | _BlockMember, probs: Tensor, outs: Tensor, loss: Tensor, mask: Tensor
) -> GateOutput:
    gate.last_probs = probs.detach()
    gate.last_load = masked_mean(gate.last_probs, mask)
    delta = torch.einsum("ne,ned->nd", probs.to(outs.dtype), outs)
    return GateOutput(routing=None, aux_loss=loss, delta=delta, probs=probs)


@register_router("mole")
class MoLERouter(GateRouter):
    """Gate factory for MoLE (arXiv 2404.13628); see the module docstring.

    Args:
        config: the :class:`MoLEConfig`.
        bank: the expert bank (its experts should be trained; they are frozen on :meth:`attach`
            when ``config.freeze_experts``).

    Usage::

        router = MoLERouter(MoLEConfig(), bank).attach()
        opt = torch.optim.Adam(router.parameters(), lr=1e-2)
        with bank.use(router.routing(RouterInput(attention_mask=mask))):
            loss = task_loss(bank.model(x)) + bank.pop_aux_loss()
    """

    config_class = MoLEConfig

    def __init__(self, config: MoLEConfig, bank: ExpertBank):
        super().__init__(bank)
        self.config = config
        self.masked: set[str] = set()
        self._leaders: dict[str, MoLEGate] = {}
        self._pattern = re.compile(config.block_regex)

    def block_of(self, path: str) -> str:
        """The block a layer belongs to (its own path with ``granularity == "layer"``)."""
        if self.config.granularity == "layer":
            return path
        m = self._pattern.search(path)
        return m.group(1) if m else path

    def make_gate(self, path: str, layer: LoRALayer) -> nn.Module:
        block = self.block_of(path)
        leader = self._leaders.get(block)
        if leader is None:
            leader = MoLEGate(self, layer.out_features, len(layer.experts))
            self._leaders[block] = leader
            return leader
        return _BlockMember(leader)

    def attach(self) -> MoLERouter:
        """Freeze the experts (per config) and attach a gate to every LoRA layer."""
        if self.config.freeze_experts:
            self.bank.freeze()
        self._leaders = {}
        super().attach()
        return self

    def grow(self) -> MoLERouter:
        """Widen every gate to the bank's current experts now (zeros), keeping trained entries."""
        for leader in self._leaders.values():
            leader.grow(len(self.bank))
        return self

    def mask_experts(self, names: Iterable[str] | None) -> None:
        """Drop experts ``names`` from the gates (None: drop none); the rest are renormalised.

        Raises:
            KeyError: an unknown name. ValueError: every expert would be masked.
        """
        names = set(names or ())
        for n in names:
            self.bank.index(n)  # raises KeyError for unknown names
        if names and names >= set(self.bank.names):
            raise ValueError("cannot mask every expert of the bank")
        self.masked = names

    def masked_indices(self) -> list[int]:
        """Bank indices of the masked experts."""
        return sorted(self.bank.index(n) for n in self.masked)
