"""Routing types shared by the expert bank and every router.

A *routing* says which experts of the bank act on the next forward pass and with what weight. It is
one of five shapes (E is the number of experts in the bank, in bank order):

=================  ==========================  ================================================
kind               tensors                     meaning
=================  ==========================  ================================================
``base``           none                        no expert acts (the frozen base model)
``single``         ``expert: int``             one expert for every sample and token
``sample``         ``indices [B, k]``,         per sample, k experts with weights (k=1 is one
                   ``weights [B, k]``          expert per sample: a heterogeneous batch)
``dense``          ``weights [B, E]`` or       a weight for every expert, per sample or per token;
                   ``weights [B, T, E]``       zero columns are skipped
``token``          ``indices [B, T, k]``,      per token, k experts with weights (top-k token
                   ``weights [B, T, k]``       routing); only the chosen experts are computed
``gated``          none                        each LoRA layer's attached gate decides
=================  ==========================  ================================================

Indices are integer tensors; ``-1`` (and only ``-1``) means "no expert" in a slot. Weights are
floating tensors. A routing is checked three times, each check as cheap as it can be: its shapes
and dtypes when it is built (:class:`Routing`), its index values once when the bank takes it
(:func:`check_routing_values`, one host sync), and its batch size and token count against the
input of every LoRA layer at every forward (shape comparisons only).

Routers (``moe_lora.routers``) produce a :class:`RouterOutput`; sample-level routers are called once
per batch and their output is turned into a :class:`Routing` with :meth:`Routing.from_output`;
layer-level gates (MoLE, top-k) run inside each LoRA layer and implement :class:`LayerGate`.
The core only knows these protocols; it never imports a concrete router.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "Routing",
    "check_routing_values",
    "RouterInput",
    "RouterOutput",
    "Router",
    "LayerGate",
    "GateOutput",
    "register_router",
    "get_router",
    "router_names",
]


_KINDS = ("base", "gated", "single", "sample", "dense", "token")


@dataclass(frozen=True)
class Routing:
    """Which experts act on the next forward, and with what weight (see the module docstring).

    Build one with the classmethods rather than the constructor.

    Raises:
        ValueError: an unknown kind, a missing tensor, a float or bool index tensor, integer
            weights, or shapes that disagree (names the shapes).
    """

    kind: str = "base"
    expert: int | None = None
    indices: Tensor | None = None
    weights: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown routing kind {self.kind!r}; one of {_KINDS}")
        if self.kind == "single" and type(self.expert) is not int:
            raise ValueError(f"single routing needs an int expert index, got {self.expert!r}")
        ndim = {"sample": 2, "token": 3}.get(self.kind)
        if ndim is not None:
            _check_sparse(self.kind, self.indices, self.weights, ndim)
        if self.kind == "dense":
            _check_weights("dense", self.weights, (2, 3))

    @classmethod
    def base(cls) -> Routing:
        """No expert acts."""
        return cls("base")

    @classmethod
    def gated(cls) -> Routing:
        """Each LoRA layer asks its attached :class:`LayerGate` (see ``ExpertBank.attach_gates``)."""
        return cls("gated")

    @classmethod
    def single(cls, expert: int) -> Routing:
        """Expert ``expert`` (bank index) acts on the whole batch with weight 1.

        Raises:
            ValueError: ``expert`` is not an integer (a float such as ``1.0`` included); a Python,
                numpy or one-element integer tensor index is fine.
        """
        integral = isinstance(expert, numbers.Integral) and not isinstance(expert, bool)
        if isinstance(expert, Tensor) and expert.numel() == 1 and not expert.is_floating_point():
            integral = expert.dtype != torch.bool
        if not integral:
            raise ValueError(f"single routing needs an integer expert index, got {expert!r}")
        return cls("single", expert=int(expert))

    @classmethod
    def per_sample(cls, indices: Tensor, weights: Tensor | None = None, *, valid: bool = False
                   ) -> Routing:
        """Per-sample experts: ``indices`` [B] or [B, k] (integer; -1 = none), ``weights`` [B] or
        [B, k] (floating; default 1). ``valid=True`` promises that no index is -1 (a router's
        top-k): see :attr:`valid`.

        Raises:
            ValueError: shapes disagree, or a dtype is wrong (see :class:`Routing`).
        """
        if indices.dim() == 1:
            indices = indices[:, None]
        unit = weights is None
        if weights is None:
            weights = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
        elif weights.dim() == 1:
            weights = weights[:, None]
        _check_sparse("sample", indices, weights, 2)
        routing = cls("sample", indices=indices.long(), weights=weights)._promise(valid)
        if unit:  # known without looking at the values: the layers skip the weight product
            object.__setattr__(routing, "_unit", True)
        return routing

    @classmethod
    def dense(cls, weights: Tensor) -> Routing:
        """A weight for every expert: ``weights`` [B, E] (per sample) or [B, T, E] (per token).

        Raises:
            ValueError: another rank, or not a floating tensor.
        """
        return cls("dense", weights=weights)

    @classmethod
    def per_token(cls, indices: Tensor, weights: Tensor, *, valid: bool = False) -> Routing:
        """Top-k per token: ``indices`` (integer; -1 = none) and ``weights`` both [B, T, k].
        ``valid=True`` promises that no index is -1 (a router's top-k): see :attr:`valid`.

        Raises:
            ValueError: shapes disagree, or a dtype is wrong (see :class:`Routing`).
        """
        _check_sparse("token", indices, weights, 3)
        return cls("token", indices=indices.long(), weights=weights)._promise(valid)

    def _promise(self, valid: bool) -> Routing:
        if valid:
            object.__setattr__(self, "_valid", True)
        return self

    def for_layout(self, layout: int) -> Routing:
        """Stamp this routing with the bank layout its indices were computed for
        (``bank.ctx.layout``; routers do this): setting it after an expert was removed then
        raises instead of routing to the experts that moved into the old indices."""
        object.__setattr__(self, "_layout", int(layout))
        return self

    @property
    def layout(self) -> int | None:
        """The bank layout this routing was built for (:meth:`for_layout`), or None (unknown:
        routings built by hand are not checked)."""
        return self.__dict__.get("_layout")

    @property
    def valid(self) -> bool:
        """Whether the builder promised that no index is ``-1`` (``per_sample``/``per_token``
        with ``valid=True``): the layers then skip masking padding slots, two kernels fewer per
        layer. The bank still checks the index range when the routing is set."""
        return bool(self.__dict__.get("_valid", False))

    @classmethod
    def from_output(cls, out: RouterOutput) -> Routing:
        """Turn a router's output into a routing: sparse (indices given) or dense weights."""
        if out.indices is None:
            return cls.dense(out.weights)
        if out.indices.dim() == 3:
            return cls.per_token(out.indices, out.weights)
        return cls.per_sample(out.indices, out.weights)

    def uniform_expert(self) -> int | None:
        """For ``sample`` routing: the expert every sample uses alone with weight 1, else None.

        Computed once per routing (memoised), not once per LoRA layer.
        """
        if self.kind != "sample" or self.indices is None or self.weights is None:
            return None
        if "_uniform" not in self.__dict__:
            if torch.compiler.is_compiling():  # a host sync would break the graph: mixed path
                return None
            idx, w = self.indices, self.weights
            first = idx[:1, :1]
            same = idx.shape[1] == 1 and bool(((idx == first) & (first >= 0) & (w == 1)).all())
            object.__setattr__(self, "_uniform", int(first) if same else None)
        return self.__dict__["_uniform"]

    def sample_slots(self, n_experts: int, rank: int, dtype: torch.dtype, device: torch.device
                     ) -> tuple[Tensor, Tensor | None]:
        """For ``sample`` routing, what every LoRA layer of one forward shares (memoised per
        ``(n_experts, rank, dtype, device)``, so each layer launches no extra kernel for it; index
        tensors built on another device are moved once here):

        * the packed-stack row of each slot, flat ``[B*k]``: the expert index, ``-1`` mapped to
          ``n_experts`` (the stack's zero row);
        * the weight of each of the ``k * rank`` columns of ``h = x A^T``, ``[B, 1, k*rank]``, with
          padding slots at 0; ``None`` when the routing was built without weights (all 1).
        """
        assert self.kind == "sample" and self.indices is not None and self.weights is not None
        memo = self.__dict__.setdefault("_slots", {})
        key = (n_experts, rank, dtype, device)
        if key not in memo:
            indices = self.indices.to(device)
            rows = indices.remainder(n_experts + 1).reshape(-1)
            cols = None
            if not self.__dict__.get("_unit", False):
                w = self.weights.to(device=device, dtype=dtype).masked_fill(indices < 0, 0.0)
                cols = w.repeat_interleave(rank, dim=1)[:, None, :]
            memo[key] = (rows, cols)
        return memo[key]

    def expand(self, n: int) -> Routing:
        """Each sample's routing repeated ``n`` times in a row: row ``b * n + j`` gets sample b's.

        This is the row layout of Hugging Face ``generate`` for beams and returned sequences
        (``repeat_interleave`` on the batch axis). Kinds without a batch axis (``base``,
        ``single``, ``gated``) are returned unchanged.

        Raises:
            ValueError: ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"Routing.expand needs n >= 1, got {n}")
        if n == 1 or self.kind in ("base", "single", "gated"):
            return self
        indices = None if self.indices is None else self.indices.repeat_interleave(n, dim=0)
        weights = None if self.weights is None else self.weights.repeat_interleave(n, dim=0)
        routing = Routing(self.kind, self.expert, indices, weights)
        for key in ("_unit", "_valid", "_layout"):  # what the builder knew holds for the copy
            if key in self.__dict__:
                object.__setattr__(routing, key, self.__dict__[key])
        return routing

    @property
    def batch_size(self) -> int | None:
        """B for the kinds that fix it, else None."""
        t = self.indices if self.indices is not None else self.weights
        return None if t is None else int(t.shape[0])


_SPARSE_SHAPES = {2: "[B, k]", 3: "[B, T, k]"}


def _check_weights(kind: str, weights: Tensor | None, ndims: tuple[int, ...]) -> None:
    shapes = {2: "[B, E]", 3: "[B, T, E]"} if kind == "dense" else _SPARSE_SHAPES
    expected = " or ".join(shapes[n] for n in ndims)
    if weights is None or weights.dim() not in ndims:
        got = None if weights is None else tuple(weights.shape)
        raise ValueError(f"{kind} routing weights must be {expected}, got {got}")
    if not weights.is_floating_point():
        raise ValueError(f"{kind} routing weights must be floating, got {weights.dtype}")


def _check_sparse(kind: str, indices: Tensor | None, weights: Tensor | None, ndim: int) -> None:
    """Shapes and dtypes of a ``sample`` or ``token`` routing (no values: no host sync)."""
    expected = _SPARSE_SHAPES[ndim]
    if indices is None or indices.dim() != ndim:
        got = None if indices is None else tuple(indices.shape)
        raise ValueError(f"{kind} routing indices must be {expected}, got {got}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"{kind} routing indices must be an integer tensor, got {indices.dtype}")
    _check_weights(kind, weights, (ndim,))
    assert weights is not None
    if weights.shape != indices.shape:
        raise ValueError(
            f"{kind} routing weights {tuple(weights.shape)} must match indices "
            f"{tuple(indices.shape)} ({expected})"
        )


def check_routing_values(routing: Routing, n_experts: int) -> None:
    """Check that ``routing``'s experts exist among ``n_experts`` (``-1`` allowed in index tensors).

    One host sync for index tensors (``aminmax``), none for the other kinds.

    Raises:
        IndexError: an index outside ``[-1, n_experts)`` (``[0, n_experts)`` for ``single``).
        ValueError: dense weights whose last dimension is not ``n_experts``.
    """
    if routing.kind == "single":
        assert routing.expert is not None
        if not 0 <= routing.expert < n_experts:
            raise IndexError(f"expert index {routing.expert} out of range for {n_experts} experts")
    elif routing.kind == "dense":
        assert routing.weights is not None
        shape = tuple(routing.weights.shape)
        if shape[-1] != n_experts:
            raise ValueError(
                f"dense routing weights have shape {shape}, expected {(*shape[:-1], n_experts)} "
                f"(last dimension = the bank's {n_experts} experts)"
            )
    elif routing.indices is not None and routing.indices.numel():
        lo, hi = torch.stack(list(torch.aminmax(routing.indices))).tolist()
        if lo < -1 or hi >= n_experts:
            bad = lo if lo < -1 else hi
            raise IndexError(
                f"routing index {bad} out of range: indices must be in [0, {n_experts}) for "
                f"{n_experts} experts, or -1 for no expert"
            )
        if lo == -1 and routing.valid:
            raise ValueError(
                f"{routing.kind} routing was built with valid=True (no -1 slots) but holds "
                "index -1; build it without valid=True"
            )


@dataclass
class RouterInput:
    """What a router may look at. Each router uses the fields it needs and says which it requires.

    Attributes:
        hidden: hidden states [B, T, D] or pooled features [B, D].
        attention_mask: [B, T], 1 for real tokens, 0 for padding.
        texts: the raw input texts, length B (retrieval routing embeds these).
        task_ids: [B] long, the known task of each sample (task-id routing).
    """

    hidden: Tensor | None = None
    attention_mask: Tensor | None = None
    texts: list[str] | None = None
    task_ids: Tensor | None = None


@dataclass
class RouterOutput:
    """A router's decision.

    Attributes:
        weights: [B, E] / [B, T, E] dense over the bank's experts, or [B, k] / [B, T, k] when
            ``indices`` is given.
        aux_loss: scalar auxiliary loss (zero when the router has none).
        indices: optional [B, k] / [B, T, k] expert indices for sparse routing.
        extras: router-specific diagnostics (for logging), e.g. similarity scores.
    """

    weights: Tensor
    aux_loss: Tensor = field(default_factory=lambda: torch.zeros(()))
    indices: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Router(Protocol):
    """A sample-level router: one decision per batch, applied to every LoRA layer."""

    def route(self, batch: RouterInput) -> RouterOutput:
        """Return routing weights over the bank's experts for ``batch``."""
        ...


@dataclass
class GateOutput:
    """What a layer gate returns for one LoRA layer's input.

    Attributes:
        routing: the routing to apply in this layer (``dense`` or ``token`` kind), or None when the
            gate computed the layer's LoRA output itself (then ``delta`` is set).
        aux_loss: scalar auxiliary loss of this layer (zero when none).
        delta: optional LoRA output [..., out_features] already mixed by the gate.
        probs: the gate's probabilities [N, E] for observability (logged, plotted).
    """

    routing: Routing | None
    aux_loss: Tensor
    delta: Tensor | None = None
    probs: Tensor | None = None


class LayerGate(Protocol):
    """A gate that runs inside one LoRA layer and routes its tokens (MoLE, MixLoRA top-k).

    Called with the layer's input ``x`` [B, T, in] (or [N, in]) and the layer itself, so that it can
    ask for expert outputs (:meth:`moe_lora.layers.LoRALayer.expert_outputs`).
    """

    def __call__(self, x: Tensor, layer: Any) -> GateOutput: ...


_ROUTERS: dict[str, Callable[..., Any]] = {}


def register_router(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: make a router constructible by ``name`` from configs.

    Raises:
        ValueError: ``name`` is already registered to another class.
    """

    def deco(cls: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered to {_ROUTERS[name]}")
        _ROUTERS[name] = cls
        return cls

    return deco


def get_router(name: str) -> Callable[..., Any]:
    """The router class registered as ``name``.

    Raises:
        KeyError: unknown name; the message lists the registered ones.
    """
    if name not in _ROUTERS:
        raise KeyError(f"unknown router {name!r}; registered routers: {sorted(_ROUTERS)}")
    return _ROUTERS[name]


def router_names() -> list[str]:
    """Names of all registered routers."""
    return sorted(_ROUTERS)
