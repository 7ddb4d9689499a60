r"""The LoRA layer: a frozen base projection plus a bank of low-rank experts, mixed per forward.

::

    x ──► base(x) ──────────────────────────────────────────────┐
    │                                                           ▼
    └──► dropout ──► A_e [r_e, in] ──► B_e [out, r_e] · s_e ──► Σ_e w_e(b, t) · (…) ──► y

For expert e, ``delta_e(x) = s_e * B_e A_e x`` with ``s_e = alpha_e / r_e`` (or ``/ sqrt(r_e)``).
How the experts are weighted comes from the shared :class:`RoutingContext` (see
:mod:`moe_lora.core.routing`). Every mixed path is a batched tensor operation:

* ``single``: two matmuls, fused into ``addmm`` (the cheapest path; also taken by a uniform batch);
* ``sample`` (k experts per sample): the used experts' factors are gathered per row, padded to the
  largest rank, and applied with two ``bmm`` calls: ``[B, T, in] @ [B, in, kR] @ [B, kR, out]``;
* ``dense`` (weights over all experts): the used experts' factors are concatenated along the rank
  axis, ``h = x @ A_cat^T`` ([.., U*R]) is scaled column-wise by the weights and projected by
  ``B_cat``; all-zero weight columns are skipped and mostly-zero rows switch to the gathered path;
* ``token`` (top-k per token), three implementations (``RoutingContext.token_dispatch``):
  ``loop``: tokens are sorted by expert and each used expert runs once on its tokens (standard MoE
  dispatch): unused experts cost nothing, but the loop needs the used experts on the host;
  ``dense``: the top-k weights are scattered into ``[N, E]`` and every expert runs through one
  concatenated ``x @ A_cat^T`` / ``h @ B_cat^T`` pair, masked by them: three kernels and no host
  synchronisation, at ``2 * E * R / in`` times a base projection's FLOPs; ``grouped``: the
  (token, slot) rows sorted by expert once and both factors applied by ``torch._grouped_mm`` over
  per-expert row offsets: the loop's FLOPs in two kernels, no host synchronisation (inference only:
  used when nothing needs a gradient through it, and when the row strides are 16-byte aligned;
  otherwise the call falls back). ``auto`` (default) takes ``dense`` on CUDA, where small shapes are
  launch-bound, ``grouped`` on the CPU where it applies, and ``loop`` otherwise.

Frozen experts are read from a padded stack ``[E, R, in]`` / ``[E, out, R]`` built lazily and rebuilt
when the bank changes; trainable experts are stacked live so that gradients reach them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lora.core.config import ExpertConfig
from moe_lora.core.routing import GateOutput, Routing

__all__ = ["LoRALayer", "LoRAFactors", "RoutingContext", "TOKEN_DISPATCH", "is_supported",
           "base_weight_shape"]

TOKEN_DISPATCH = ("auto", "loop", "dense", "grouped")
"""Implementations of ``token`` routing (:attr:`RoutingContext.token_dispatch`)."""


@dataclass
class RoutingContext:
    """State shared by all LoRA layers of one bank (not a module; holds no parameters).

    Attributes:
        routing: what applies to the next forward.
        version: bumped on every change of the bank's experts (invalidates frozen stacks).
        layout: bumped whenever bank indices shift (an expert removed).
        routing_layout: the ``layout`` that ``routing`` was checked against; a forward under a
            routing that names experts raises when it differs from ``layout``.
        aux_losses: auxiliary losses reported by layer gates since the last pop (kept only from
            forwards with autograd on: a no-grad forward adds none).
        last_probs: each gated layer's last gate probabilities [N, E] (detached), for inspection.
        record: keep ``last_probs`` (off by default; it costs a copy per layer).
        token_dispatch: how ``token`` routing runs: ``auto``, ``loop``, ``dense`` or ``grouped``
            (see the module docstring).
    """

    routing: Routing = field(default_factory=Routing.base)
    version: int = 0
    layout: int = 0
    routing_layout: int = 0
    aux_losses: list[Tensor] = field(default_factory=list)
    last_probs: dict[str, Tensor] = field(default_factory=dict)
    record: bool = False
    token_dispatch: str = "auto"

    def __post_init__(self) -> None:
        if self.token_dispatch not in TOKEN_DISPATCH:
            raise ValueError(f"token_dispatch={self.token_dispatch!r}: expected one of "
                             f"{', '.join(TOKEN_DISPATCH)}")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_supported(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: ``nn.Linear`` or Hugging Face's GPT-2 ``Conv1D``."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def base_weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a supported module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    w = module.weight  # Conv1D stores [in, out]
    return int(w.shape[1]), int(w.shape[0])


def _check_fits(path: str, routing: Routing, x: Tensor, n_experts: int) -> None:
    """Check a ``sample``/``dense``/``token`` routing's shape against the layer input ``x``
    [B, in] / [B, T, in]: a few integer comparisons, no host sync.

    Raises:
        ValueError: names the routing's shape and the shape expected from ``x``.
    """
    t = routing.indices if routing.indices is not None else routing.weights
    assert t is not None
    dense = routing.kind == "dense"
    if t.dim() == 2:  # sample [B, k], dense [B, E]
        fits = t.shape[0] == x.shape[0] and (not dense or t.shape[1] == n_experts)
    else:  # token [B, T, k], dense [B, T, E]
        fits = (x.dim() == 3 and t.shape[:2] == x.shape[:2]
                and (not dense or t.shape[2] == n_experts))
    if fits:
        return
    shape = tuple(t.shape)
    if t.dim() == 3 and x.dim() != 3:
        raise ValueError(
            f"{path}: {routing.kind} routing of shape {shape} is per token, but the input "
            f"{tuple(x.shape)} has no token axis (expected [B, T, in])"
        )
    expected = (*x.shape[: t.dim() - 1], n_experts if dense else shape[-1])
    raise ValueError(
        f"{path}: {routing.kind} routing of shape {shape} does not fit the input "
        f"{tuple(x.shape)}; expected {expected}"
    )


class LoRAFactors(nn.Module):
    """One expert's factors in one layer: ``lora_A`` [rank, in] and ``lora_B`` [out, rank]."""

    def __init__(self, in_features: int, out_features: int, cfg: ExpertConfig, like: Tensor):
        super().__init__()
        kw = {"dtype": like.dtype, "device": like.device}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.rank, **kw))
        self.rank = cfg.rank
        self.scale = cfg.scale
        self.dropout = float(cfg.dropout)
        self.reset(cfg.init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        """Initialise the factors (see :class:`ExpertConfig.init`)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "random":
            nn.init.normal_(self.lora_B, std=0.02)
        else:
            self.lora_B.zero_()

    def delta_weight(self) -> Tensor:
        """``scale * B @ A`` as a dense [out, in] matrix."""
        return (self.lora_B @ self.lora_A) * self.scale


class LoRALayer(nn.Module):
    """A frozen ``nn.Linear`` (or ``Conv1D``) carrying the bank's experts for this position.

    Args:
        base: the wrapped module; its parameters are frozen by the bank.
        ctx: the bank's shared routing context.
        path: the module's dotted path in the model (for messages and logs).

    Shapes: input ``x`` [B, T, in] or [B, in]; output like ``base(x)``.
    """

    def __init__(self, base: nn.Module, ctx: RoutingContext, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.out_features, self.in_features = base_weight_shape(base)
        self.experts = nn.ModuleList()
        self.gate: nn.Module | None = None
        self.expert_calls = 0  # experts computed by the token path (observable sparsity)
        object.__setattr__(self, "ctx", ctx)  # shared plain object, not a submodule
        self._stack: tuple[tuple, Tensor] | None = None
        self.train(base.training)  # wrapping an eval-mode model keeps it in eval mode
        self._merged: Tensor | None = None
        self._ids: Tensor | None = None

    # ----------------------------------------------------------------- experts
    def add(self, cfg: ExpertConfig) -> LoRAFactors:
        """Append an expert's factors, initialised per ``cfg``."""
        f = LoRAFactors(self.in_features, self.out_features, cfg, self.base.weight)
        self.experts.append(f)
        return f

    def remove(self, index: int) -> None:
        """Drop the expert at ``index`` (later indices shift down by one)."""
        del self.experts[index]

    def delta_weight(self, weights: dict[int, float]) -> Tensor:
        """``sum_e w_e * s_e * B_e A_e`` as [out, in] for the given {expert index: weight}."""
        w = self.base.weight
        total = torch.zeros(self.out_features, self.in_features, dtype=w.dtype, device=w.device)
        for e, we in weights.items():
            total += float(we) * self.experts[e].delta_weight().detach()
        return total

    @torch.no_grad()
    def merge(self, weights: dict[int, float]) -> None:
        """Add the weighted experts' update into the base weight (undo with :meth:`unmerge`)."""
        if self._merged is not None:
            raise RuntimeError(f"{self.path}: already merged; call unmerge() first")
        delta = self.delta_weight(weights)
        self._add_to_base(delta)
        self._merged = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update from the base weight."""
        if self._merged is not None:
            self._add_to_base(-self._merged)
            self._merged = None

    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base.weight
        w.add_(delta if isinstance(self.base, nn.Linear) else delta.t())

    @property
    def merged(self) -> bool:
        """Whether an update is currently merged into the base weight."""
        return self._merged is not None

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """``base(x)`` plus the experts the context's routing selects (see the module docstring).

        Raises:
            RuntimeError: the routing was set before an expert was removed from the bank.
            ValueError: the routing does not fit ``x`` (see :meth:`apply_routing`).
        """
        y = self.base(x)
        ctx = self.ctx
        routing = ctx.routing
        if routing.kind == "base":
            return y
        if routing.kind == "gated":
            return self._gated(x, y) if len(self.experts) else y
        if ctx.routing_layout != ctx.layout:
            raise RuntimeError(
                f"{self.path}: the routing was set before an expert was removed from the bank, so "
                "its indices name other experts now; set the routing again (bank.use)"
            )
        return self.apply_routing(x, y, routing)

    def apply_routing(self, x: Tensor, y: Tensor, routing: Routing) -> Tensor:
        """``y + sum_e w_e delta_e(x)`` for ``routing`` (``y`` is the base output).

        Raises:
            ValueError: the routing's batch size (and token count) differ from ``x``'s
                ``[B, (T,) in]``, or dense weights do not have one column per expert.
        """
        if routing.kind == "single":
            assert routing.expert is not None
            return self._single(x, y, routing.expert)
        _check_fits(self.path, routing, x, len(self.experts))
        assert routing.weights is not None
        if routing.kind == "dense":
            return self._dense(x, y, routing.weights)
        assert routing.indices is not None
        if routing.kind == "sample":
            uniform = routing.uniform_expert()  # one expert, weight 1: the single path
            if uniform is not None:
                return self._single(x, y, uniform)
            return self._sample(x, y, routing)
        if routing.kind == "token":
            return self._token(x, y, routing.indices, routing.weights, routing.valid)
        raise ValueError(f"unknown routing kind {routing.kind!r}")

    def _gated(self, x: Tensor, y: Tensor) -> Tensor:
        if self.gate is None:
            raise RuntimeError(f"{self.path}: routing is 'gated' but no gate is attached")
        out: GateOutput = self.gate(x, self)
        if torch.is_grad_enabled():  # only a loss that can be backpropagated is kept: no-grad
            self.ctx.aux_losses.append(out.aux_loss)  # forwards (serving) must not pile them up
        if self.ctx.record and out.probs is not None:
            self.ctx.last_probs[self.path] = out.probs.detach()
        if out.delta is not None:
            return y + out.delta.reshape(y.shape)
        if out.routing is None:
            raise RuntimeError(f"{self.path}: gate returned neither routing nor delta")
        return self.apply_routing(x, y, out.routing)

    def _dropout(self, x: Tensor, experts: list[int] | None = None) -> Tensor:
        """Input dropout; mixed paths share one mask at the largest rate of the used experts."""
        if not self.training:
            return x
        fs = self.experts if experts is None else [self.experts[e] for e in experts]
        p = max((f.dropout for f in fs), default=0.0)
        return F.dropout(x, p, training=True) if p > 0 else x

    def _single(self, x: Tensor, y: Tensor, e: int) -> Tensor:
        f = self.experts[e]
        h = self._dropout(x, [e]).reshape(-1, self.in_features) @ f.lora_A.t()
        out = torch.addmm(y.reshape(-1, self.out_features), h, f.lora_B.t(), alpha=f.scale)
        return out.reshape(y.shape)

    def stacked(self, experts: Tensor) -> tuple[Tensor, Tensor]:
        """Factors of ``experts`` [U] padded to a common rank R, with the scale folded into B.

        Returns:
            ``A`` [U, R, in] and ``B`` [U, out, R]. Frozen experts come from a cached stack;
            if any is trainable, all are stacked live so gradients flow.
        """
        if self._live():
            ids = experts.tolist()
            if any(self.experts[e].lora_A.requires_grad for e in ids):
                return self._stack_live(ids)
        _, a_all, b_all = self._frozen_stack()
        experts = experts.to(a_all.device)
        return a_all.index_select(0, experts), b_all.index_select(0, experts)

    def _stack_live(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        """``A`` [U, R, in] and ``s·B`` [U, out, R] of experts ``ids``, stacked from the live
        parameters (gradients flow). Equal ranks need no padding and equal scales one product:
        two stacks and a multiply, however many experts (a training forward stacks every layer)."""
        fs = [self.experts[e] for e in ids]
        r = max(f.rank for f in fs)
        if all(f.rank == r for f in fs):
            a, b = torch.stack([f.lora_A for f in fs]), torch.stack([f.lora_B for f in fs])
        else:
            a = torch.stack([F.pad(f.lora_A, (0, 0, 0, r - f.rank)) for f in fs])
            b = torch.stack([F.pad(f.lora_B, (0, r - f.rank)) for f in fs])
        scales = [f.scale for f in fs]
        if all(sc == scales[0] for sc in scales):
            return a, b * scales[0]
        return a, b * torch.tensor(scales, dtype=b.dtype, device=b.device)[:, None, None]

    def _frozen_stack(self) -> tuple[int, Tensor, Tensor]:
        """(version, ``A`` [E, R, in], ``B`` [E, out, R]): views of :meth:`_packed` (no copy)."""
        packed = self._packed()[: len(self.experts)]
        a = packed[:, :, : self.in_features]
        return self.ctx.version, a, packed[:, :, self.in_features :].transpose(1, 2)

    def _packed(self) -> Tensor:
        """The frozen experts packed as ``[E + 1, R, in + out]``: row ``e`` holds ``A_e`` and
        ``(s_e B_e)^T``, zero-padded to R, the largest rank rounded up to 16 bytes (what grouped
        matmuls need); the last row is zero, so index ``-1`` (no expert) gathers nothing. One
        gather fetches both factors of any expert set.

        Built lazily, rebuilt when the bank changes or the experts move to another device/dtype.
        """
        ref = self.experts[0].lora_A if len(self.experts) else self.base.weight
        key = (self.ctx.version, ref.device, ref.dtype)
        if self._stack is None or self._stack[0] != key:
            with torch.no_grad():
                if len(self.experts):
                    a, b = self._stack_live(list(range(len(self.experts))))
                    pad_r = -a.shape[1] % (16 // a.element_size())  # 16-byte aligned rank rows
                    packed = F.pad(torch.cat([a, b.transpose(1, 2)], dim=2),
                                   (0, 0, 0, pad_r, 0, 1))
                else:
                    packed = ref.new_zeros(1, 1, self.in_features + self.out_features)
            self._stack = (key, packed)
        return self._stack[1]

    def clear_cache(self) -> None:
        """Free the cached frozen stack (rebuilt on the next mixed forward)."""
        self._stack = None

    def _sample(self, x: Tensor, y: Tensor, routing: Routing) -> Tensor:
        indices, weights = routing.indices, routing.weights
        assert indices is not None and weights is not None
        if self.training or self._live():
            return self._sample_gathered(x, y, indices, weights)
        # Frozen, at inference: one gather of both factors, two batched matmuls (BGMV-style).
        bsz, k = indices.shape
        packed = self._packed()
        r, d_in = packed.shape[1], self.in_features
        rows, w_cols = routing.sample_slots(len(self.experts), r, x.dtype, packed.device)
        g = packed.index_select(0, rows).view(bsz, k * r, d_in + self.out_features)
        h = torch.bmm(x.reshape(bsz, -1, d_in), g[:, :, :d_in].transpose(1, 2))  # [B, T, kR]
        if w_cols is not None:
            h = h * w_cols
        out = torch.baddbmm(y.reshape(bsz, -1, self.out_features), h, g[:, :, d_in:])
        return out.reshape(y.shape)

    def _sample_gathered(self, x: Tensor, y: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The ``sample`` path when experts train or dropout applies (see :meth:`_gathered`)."""
        bsz, k = indices.shape
        indices = indices.to(x.device)
        weights = weights.to(device=x.device, dtype=x.dtype).masked_fill(indices < 0, 0.0)
        indices = indices.clamp_min(0)
        a_g, b_g, used = self._gathered(indices)  # [B*k, R, in], [B*k, out, R]
        r = a_g.shape[1]
        a_g = a_g.reshape(bsz, k * r, self.in_features)  # [B, kR, in]
        b_g = b_g.reshape(bsz, k, self.out_features, r).permute(0, 2, 1, 3)
        b_g = b_g.reshape(bsz, self.out_features, k * r)  # [B, out, kR]
        x3 = self._dropout(x, used).reshape(bsz, -1, self.in_features)
        h = torch.bmm(x3, a_g.transpose(1, 2))  # [B, T, kR]
        h = h * weights.repeat_interleave(r, dim=1)[:, None, :]
        out = torch.baddbmm(y.reshape(bsz, -1, self.out_features), h, b_g.transpose(1, 2))
        return out.reshape(y.shape)

    def _live(self) -> bool:
        """Whether any expert trains (then factors are stacked live so gradients reach them)."""
        return any(f.lora_A.requires_grad for f in self.experts)

    def _gathered(self, indices: Tensor) -> tuple[Tensor, Tensor, list[int]]:
        """Each routing slot's factors, ``[B*k, R, in]`` and ``[B*k, out, R]`` (scale in B), and
        the used experts (one host synchronisation; this path serves training and dropout).

        If any used expert trains, the used experts are stacked live (gradients reach them) and
        gathered; otherwise the slots are gathered from the cached frozen stack.
        """
        uniq, inv = torch.unique(indices, return_inverse=True)
        ids = uniq.tolist()
        if any(self.experts[e].lora_A.requires_grad for e in ids):
            a_u, b_u = self._stack_live(ids)
            flat = inv.reshape(-1)
        else:
            _, a_u, b_u = self._frozen_stack()
            flat = indices.reshape(-1)
        return a_u.index_select(0, flat), b_u.index_select(0, flat), ids

    def _dense(self, x: Tensor, y: Tensor, weights: Tensor) -> Tensor:
        n_exp = len(self.experts)
        nonzero = weights != 0
        used = nonzero.reshape(-1, n_exp).any(0).nonzero().squeeze(1)
        if used.numel() == 0:
            return y
        k = int(nonzero.sum(-1).max())
        if 2 * k < used.numel():  # mostly-zero rows: gather per sample / dispatch per token
            w, idx = weights.topk(k, dim=-1)
            sparse = Routing.per_sample if weights.dim() == 2 else Routing.per_token
            return self.apply_routing(x, y, sparse(idx, w))
        a_u, b_u = self.stacked(used)
        u, r = a_u.shape[:2]
        a_cat = a_u.reshape(u * r, self.in_features)
        b_cat = b_u.permute(1, 0, 2).reshape(self.out_features, u * r)
        w_cols = weights.index_select(-1, used).to(x.dtype).repeat_interleave(r, dim=-1)
        if weights.dim() == 2 and x.dim() == 3:
            w_cols = w_cols[:, None, :]
        h = (self._dropout(x, used.tolist()) @ a_cat.t()) * w_cols
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, u * r), b_cat.t())
        return out.reshape(y.shape)

    def _token(self, x: Tensor, y: Tensor, indices: Tensor, weights: Tensor,
               valid: bool = False) -> Tensor:
        mode = self.ctx.token_dispatch
        indices, weights = indices.to(x.device), weights.to(x.device)  # no-ops on one device
        compiling = torch.compiler.is_compiling()  # the graph needs no host sync: dense
        if mode == "dense" or (mode in ("auto", "grouped") and compiling) or (
                mode == "auto" and x.is_cuda):
            return self._token_dense(x, y, indices, weights, valid)
        if mode in ("grouped", "auto") and self._groupable(x):
            return self._token_grouped(x, y, indices, weights, valid)
        k = indices.shape[-1]
        flat_e = indices.reshape(-1)
        flat_w = weights.reshape(-1).to(x.dtype)
        keep = (flat_e >= 0) & (flat_w != 0)
        slots = keep.nonzero().squeeze(1)
        order = slots[torch.argsort(flat_e[slots], stable=True)]
        experts, counts = torch.unique_consecutive(flat_e[order], return_counts=True)
        x2 = self._dropout(x, experts.tolist()).reshape(-1, self.in_features)
        delta = torch.zeros_like(y).reshape(-1, self.out_features)
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist(), strict=True):
            pos = order[start : start + c]
            start += c
            tok = pos // k
            f = self.experts[e]
            h = x2.index_select(0, tok) @ f.lora_A.t()
            d = (h @ f.lora_B.t()) * (f.scale * flat_w.index_select(0, pos))[:, None]
            delta.index_add_(0, tok, d)
            self.expert_calls += 1
        return y + delta.reshape(y.shape)

    def _token_dense(self, x: Tensor, y: Tensor, indices: Tensor, weights: Tensor,
                     valid: bool = False) -> Tensor:
        """The ``token`` path without host synchronisation: every expert, masked by the top-k
        weights scattered to ``[N, E]`` (see the module docstring). ``valid``: no -1 slots."""
        n_exp = len(self.experts)
        a_all, b_all = (self._stack_live(list(range(n_exp))) if self._live()
                        else self._frozen_stack()[1:])
        r = a_all.shape[1]
        w = weights.reshape(-1, indices.shape[-1]).to(x.dtype)
        idx = indices.reshape(-1, indices.shape[-1])
        if not valid:
            w, idx = w.masked_fill(idx < 0, 0.0), idx.clamp_min(0)
        w_full = w.new_zeros(idx.shape[0], n_exp).scatter_add_(1, idx, w)
        x2 = self._dropout(x).reshape(-1, self.in_features)
        h = (x2 @ a_all.reshape(n_exp * r, self.in_features).t()).view(-1, n_exp, r)
        h = (h * w_full.unsqueeze(-1)).reshape(-1, n_exp * r)
        b_cat = b_all.permute(1, 0, 2).reshape(self.out_features, n_exp * r)
        out = torch.addmm(y.reshape(-1, self.out_features), h, b_cat.t())
        return out.reshape(y.shape)

    def _groupable(self, x: Tensor) -> bool:
        """Whether :meth:`_token_grouped` applies: ``torch._grouped_mm`` exists, no gradient has to
        flow through it, and rows are 16-byte aligned."""
        align = 16 // x.element_size()
        return (hasattr(torch, "_grouped_mm") and not x.requires_grad and not self._live()
                and self.in_features % align == 0 and self.out_features % align == 0)

    def _token_grouped(self, x: Tensor, y: Tensor, indices: Tensor, weights: Tensor,
                       valid: bool = False) -> Tensor:
        """The ``token`` path as two grouped matmuls over the (token, slot) rows sorted by expert
        (see the module docstring); padding slots run expert 0 with weight 0."""
        n_exp, k = len(self.experts), indices.shape[-1]
        _, a_all, b_all = self._frozen_stack()
        align = 16 // x.element_size()
        pad = -a_all.shape[1] % align  # aligned when packed, unless x has another dtype
        if pad:
            a_all, b_all = F.pad(a_all, (0, 0, 0, pad)), F.pad(b_all, (0, pad))
        a_all, b_all = a_all.to(x.dtype), b_all.to(x.dtype)
        e, w = indices.reshape(-1), weights.reshape(-1).to(x.dtype)
        if not valid:
            w, e = w.masked_fill(e < 0, 0.0), e.clamp_min(0)
        sorted_e, order = torch.sort(e, stable=True)
        ends = torch.searchsorted(sorted_e, self._expert_ids(n_exp, x.device), right=True,
                                  out_int32=True)  # end row of each expert's group
        tok = order // k
        rows = self._dropout(x).reshape(-1, self.in_features).index_select(0, tok)
        h = torch._grouped_mm(rows, a_all.transpose(1, 2), offs=ends)
        d = torch._grouped_mm(h, b_all.transpose(1, 2), offs=ends)
        d = d * w.index_select(0, order)[:, None]
        return y.reshape(-1, self.out_features).index_add(0, tok, d).reshape(y.shape)

    def _expert_ids(self, n: int, device: torch.device) -> Tensor:
        """``arange(n)`` on ``device``, cached (the grouped path's group boundaries)."""
        ids = self._ids
        if ids is None or ids.numel() != n or ids.device != device:
            ids = self._ids = torch.arange(n, device=device)
        return ids

    def expert_outputs(self, x: Tensor, experts: Tensor | None = None) -> Tensor:
        """Each expert's own output ``delta_e(x)``, stacked: [..., U, out] (no base, no weights).

        ``experts`` [U] selects experts (default: all, in bank order). Used by gates that look at
        expert outputs (MoLE).
        """
        ids = torch.arange(len(self.experts), device=x.device) if experts is None else experts
        a_u, b_u = self.stacked(ids)
        used = None if experts is None or not self.training else experts.tolist()  # no host sync
        h = torch.einsum("...i,uri->...ur", self._dropout(x, used), a_u)  # at inference
        return torch.einsum("...ur,uor->...uo", h, b_u)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, in={self.in_features}, out={self.out_features}, experts={len(self.experts)}"
