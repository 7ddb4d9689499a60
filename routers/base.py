"""What every router shares: typed configs, construction by name, and observable decisions.

Two families of routers sit behind one calling convention, ``router.routing(batch) -> Routing``::

    with bank.use(router.routing(RouterInput(texts=texts, task_ids=tids, attention_mask=mask))):
        out = bank.model(**inputs)

* sample-level routers (task id, LoRAHub, retrieval) implement :class:`moe_lora.routing.Router`:
  ``route(batch) -> RouterOutput`` with one decision per sample, applied in every LoRA layer;
* layer-level gates (MoLE, top-k) are built per LoRA layer by a :class:`GateRouter` (a gate
  factory for :meth:`ExpertBank.attach_gates`) and decide inside each layer under
  ``Routing.gated()``.

Each router has a config dataclass, validated in ``__post_init__`` (a wrong value raises
``ValueError`` naming the field), and is registered by name, so :func:`build_router` makes one from
a YAML mapping. Each keeps its last decision in ``last_weights`` (``[rows, E]`` over the bank's
experts) and writes it as a CSV table and a PNG heatmap with ``save_weights``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moe_lora.core.report import plot_routing_weights, write_routing_weights_csv
from moe_lora.core.routing import RouterInput, Routing, get_router

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank
    from moe_lora.core.layers import LoRALayer

__all__ = [
    "RouterConfig",
    "TaskRouterConfig",
    "LoRAHubConfig",
    "RetrievalConfig",
    "MoLEConfig",
    "TopKConfig",
    "build_router",
    "make_config",
    "save_weights",
    "WeightLog",
    "GateRouter",
    "token_mask",
    "batch_size",
    "bank_device",
    "masked_mean",
    "dense_weights",
]


# --------------------------------------------------------------------------- configs
@dataclass
class RouterConfig:
    """Base of the router configs; subclasses validate their fields in ``__post_init__``."""

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name} {what}, got {getattr(self, name)!r}")

    def _choice(self, name: str, allowed: tuple[str, ...]) -> None:
        self._require(getattr(self, name) in allowed, name, f"must be one of {allowed}")


@dataclass
class TaskRouterConfig(RouterConfig):
    """Config of :class:`~moe_lora.routers.TaskRouter`.

    Attributes:
        fallback: what a sample without a known task gets: ``"error"`` (raise) or ``"uniform"``
            (the uniform average of ``experts``).
        experts: names of the experts averaged by ``average`` and the uniform fallback
            (None: every expert in the bank at call time).
    """

    fallback: str = "error"
    experts: list[str] | None = None

    def __post_init__(self) -> None:
        self._choice("fallback", ("error", "uniform"))
        self._require(self.experts is None or len(self.experts) > 0, "experts", "must be non-empty")


@dataclass
class LoRAHubConfig(RouterConfig):
    """Config of :class:`~moe_lora.routers.LoRAHubRouter` (LoRAHub, arXiv 2307.13269).

    Attributes:
        composition: ``"parameter"`` (LoRAHub: ``(sum w_i B_i)(sum w_i A_i)``, equal ranks) or
            ``"output"`` (``sum w_i B_i A_i``, any ranks).
        keep: ``"expert"`` (the result becomes a new bank expert) or ``"weights"`` (fixed routing
            weights; ``"output"`` composition only).
        budget: loss evaluations allowed to the optimiser (LoRAHub uses 40).
        l1: weight of the ``mean |w|`` regulariser added to the task loss (LoRAHub: 0.05).
        bound: the search box is ``[-bound, bound]^E`` (LoRAHub: 1.5).
        optimizer: a nevergrad optimiser name (LoRAHub: ``"NGOpt"``).
        expert_name: name of the expert created when ``keep == "expert"``.
        experts: names of the experts composed (None: every expert in the bank at fit time).
        seed: seeds the optimiser.
    """

    composition: str = "parameter"
    keep: str = "expert"
    budget: int = 40
    l1: float = 0.05
    bound: float = 1.5
    optimizer: str = "NGOpt"
    expert_name: str = "lorahub"
    experts: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._choice("composition", ("parameter", "output"))
        self._choice("keep", ("expert", "weights"))
        self._require(
            self.composition == "output" or self.keep == "expert",
            "keep",
            "must be 'expert' for parameter composition (it is not a weighting of the bank)",
        )
        self._require(self.budget >= 1, "budget", "must be >= 1")
        self._require(self.l1 >= 0, "l1", "must be >= 0")
        self._require(self.bound > 0, "bound", "must be > 0")
        self._require(bool(self.expert_name), "expert_name", "must be non-empty")
        self._require(self.experts is None or len(self.experts) > 0, "experts", "must be non-empty")


@dataclass
class RetrievalConfig(RouterConfig):
    """Config of :class:`~moe_lora.routers.RetrievalRouter` (LoRARetriever, arXiv 2402.09997).

    Attributes:
        k: experts retrieved per sample.
        weighting: ``"uniform"`` (1/k, as the paper) or ``"softmax"`` (``softmax(score / T)``).
        temperature: T of the softmax weighting and of the exemplar vote in the index it builds.
        composition: ``"mixture"`` (weighted expert outputs) or ``"fusion"`` (weighted
            parameters per sample).
        prefix: instruction put before every text (None: LoRARetriever's
            ``"Represent the sentence for similar task retrieval: "``; ``""`` for none).
        mode: index mode when the router builds its index, ``"centroid"`` or ``"exemplar"``.
        n_centroids: centroids per expert in centroid mode.
        n_neighbors: neighbours voting in exemplar mode.
    """

    k: int = 3
    weighting: str = "uniform"
    temperature: float = 0.05
    composition: str = "mixture"
    prefix: str | None = None
    mode: str = "centroid"
    n_centroids: int = 1
    n_neighbors: int = 32

    def __post_init__(self) -> None:
        self._require(self.k >= 1, "k", "must be >= 1")
        self._choice("weighting", ("uniform", "softmax"))
        self._require(self.temperature > 0, "temperature", "must be > 0")
        self._choice("composition", ("mixture", "fusion"))
        self._choice("mode", ("centroid", "exemplar"))
        self._require(self.n_centroids >= 1, "n_centroids", "must be >= 1")
        self._require(self.n_neighbors >= 1, "n_neighbors", "must be >= 1")


@dataclass
class MoLEConfig(RouterConfig):
    """Config of :class:`~moe_lora.routers.MoLERouter` (MoLE, arXiv 2404.13628).

    Attributes:
        granularity: ``"layer"`` (a gate per LoRA layer) or ``"block"`` (one gate per block,
            shared by its LoRA layers).
        block_regex: the block of a layer path is this pattern's first group (searched); paths
            that do not match are their own block. Default: up to the first numeric part
            (``encoder.layer.3``, ``model.layers.5``, ``transformer.h.2``, ``0``).
        temperature: initial softmax temperature tau.
        learn_temperature: train tau (as the paper) or keep it fixed.
        balance_coef: weight of the balance loss ``-sum_i log q_i`` in the reported aux loss.
        freeze_experts: freeze every expert when the gates are attached (MoLE trains gates only).
    """

    granularity: str = "layer"
    block_regex: str = r"^(.*?(?:^|\.)\d+)(?:\.|$)"
    temperature: float = 1.0
    learn_temperature: bool = True
    balance_coef: float = 0.01
    freeze_experts: bool = True

    def __post_init__(self) -> None:
        self._choice("granularity", ("layer", "block"))
        try:
            pattern = re.compile(self.block_regex)
        except re.error as err:
            raise ValueError(f"MoLEConfig.block_regex is not a valid regex: {err}") from err
        self._require(pattern.groups >= 1, "block_regex", "needs a capturing group")
        self._require(self.temperature > 0, "temperature", "must be > 0")
        self._require(self.balance_coef >= 0, "balance_coef", "must be >= 0")


@dataclass
class TopKConfig(RouterConfig):
    """Config of :class:`~moe_lora.routers.TopKRouter` (MixLoRA, arXiv 2404.15159).

    Attributes:
        k: experts per token (clipped to the bank size).
        normalize: renormalise the chosen k probabilities to sum 1 (MixLoRA, Mixtral); False
            keeps the softmax probabilities (Switch Transformer), which lets k=1 routers learn
            from the task loss (renormalised, a single weight is always 1).
        jitter: multiplicative noise ``U(1 - jitter, 1 + jitter)`` on the router input in
            training (0 disables it).
        balance_coef: weight of the load-balancing loss ``E * sum_e f_e P_e``.
        z_coef: weight of the router z-loss ``mean logsumexp(logits)^2`` (0 disables it).
        init_std: std of the normal init of a new expert's router row.
    """

    k: int = 2
    normalize: bool = True
    jitter: float = 0.0
    balance_coef: float = 0.01
    z_coef: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self._require(self.k >= 1, "k", "must be >= 1")
        self._require(0 <= self.jitter < 1, "jitter", "must be in [0, 1)")
        self._require(self.balance_coef >= 0, "balance_coef", "must be >= 0")
        self._require(self.z_coef >= 0, "z_coef", "must be >= 0")
        self._require(self.init_std >= 0, "init_std", "must be >= 0")


def make_config(config_class: type[RouterConfig], config: Any) -> RouterConfig:
    """A validated ``config_class`` from an instance, a mapping (or DictConfig) or None (defaults).

    Mappings go through an OmegaConf structured config, so types are checked too.

    Raises:
        ValueError: an unknown key, a wrongly typed or invalid value (the message names the field).
        TypeError: ``config`` is an instance of another config class.
    """
    if config is None:
        return config_class()
    if is_dataclass(config) and not isinstance(config, type):
        if not isinstance(config, config_class):
            raise TypeError(f"expected a {config_class.__name__}, got {type(config).__name__}")
        return config
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_class), config)
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"{config_class.__name__}: {err}") from None
    assert isinstance(out, config_class)
    return out


def build_router(name: str, config: Any, bank: ExpertBank, **kwargs: Any) -> Any:
    """Build the router registered as ``name`` with ``config`` (dataclass, mapping or None).

    ``kwargs`` go to the router's constructor (e.g. ``embedder=`` for retrieval).

    Raises:
        KeyError: unknown router name (lists the registered ones).
        ValueError: invalid config (names the field).
    """
    cls = get_router(name)
    return cls(make_config(cls.config_class, config), bank, **kwargs)


# --------------------------------------------------------------------------- observability
def save_weights(
    weights: Tensor,
    path: str | Path,
    columns: Sequence[str],
    rows: Sequence[str] | None = None,
    title: str = "routing weights",
) -> tuple[Path, Path]:
    """Write ``weights`` [N, E] as ``<path>.csv`` and a heatmap ``<path>.png``, atomically.

    Args:
        weights: one row per sample (or layer), one column per expert.
        path: the files' common stem (a suffix is replaced).
        columns: E expert names; rows: N row labels (default ``0..N-1``).

    Returns:
        the CSV and PNG paths.

    Raises:
        ValueError: the labels do not match the shape of ``weights``.
    """
    w = weights.detach().float().cpu().reshape(-1, weights.shape[-1])
    stem = Path(path).with_suffix("")
    csv_path, png_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    write_routing_weights_csv(csv_path, w, columns, rows)
    plot_routing_weights(png_path, w, columns, rows, title)
    return csv_path, png_path


class WeightLog:
    """Mixin: ``last_weights`` [rows, E] of the last decision and :meth:`save_weights`."""

    bank: ExpertBank
    last_weights: Tensor | None

    def weight_rows(self) -> list[str] | None:
        """Labels of the rows of ``last_weights`` (None: sample numbers)."""
        return None

    def save_weights(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``last_weights`` as ``<path>.csv`` and ``<path>.png`` (see :func:`save_weights`).

        Raises:
            RuntimeError: no decision has been made yet.
        """
        if self.last_weights is None:
            raise RuntimeError(f"{type(self).__name__} has not routed a batch yet")
        return save_weights(
            self.last_weights, path, self.bank.names, self.weight_rows(), type(self).__name__
        )


def batch_size(batch: RouterInput) -> int:
    """B of a :class:`RouterInput`, from its texts, attention mask, hidden states or task ids.

    Raises:
        ValueError: the input has none of them.
    """
    for t in (batch.texts, batch.attention_mask, batch.hidden, batch.task_ids):
        if t is not None:
            return len(t)
    raise ValueError(
        "cannot tell the batch size: RouterInput has no texts, mask, hidden or task ids"
    )


def bank_device(bank: ExpertBank) -> torch.device:
    """The device of the bank's model (where routing tensors must live)."""
    return next(iter(bank.layers.values())).base.weight.device


def dense_weights(indices: Tensor, weights: Tensor, n_experts: int) -> Tensor:
    """Scatter sparse ``indices``/``weights`` [B, k] (``-1`` = none) into dense [B, E] on CPU."""
    indices, weights = indices.cpu(), weights.detach().cpu()
    dense = torch.zeros(indices.shape[0], n_experts, dtype=weights.dtype)
    valid = indices >= 0
    return dense.index_put_(
        (valid.nonzero()[:, 0], indices[valid]), weights[valid], accumulate=True
    )


# --------------------------------------------------------------------------- layer gates
def token_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """The attention mask as a float vector [N] over the N tokens of ``x`` [..., in] (1 = real).

    Tokens whose input holds nan or inf count as padding (0), so one corrupt row cannot turn a
    router's auxiliary loss or statistics non-finite.

    Raises:
        ValueError: the mask does not have one entry per token of ``x``.
    """
    n = x.numel() // x.shape[-1]
    finite = torch.isfinite(x.detach().reshape(n, -1)).all(-1).to(torch.float32)
    if mask is None:
        return finite
    if mask.numel() != n:
        raise ValueError(
            f"attention mask {tuple(mask.shape)} does not match the {n} tokens of the gate input "
            f"{tuple(x.shape)}"
        )
    return mask.reshape(n).to(device=x.device, dtype=torch.float32) * finite


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [N, E] over the rows where ``mask`` [N] is non-zero: ``[E]``.

    Rows with mask 0 contribute nothing, even when they hold nan or inf.
    """
    kept = torch.where(mask[:, None] > 0, values, values.new_zeros(()))
    return (kept * mask[:, None]).sum(0) / mask.sum().clamp_min(1.0)


class GateRouter(WeightLog):
    """Base of the layer-gate routers: a gate factory for :meth:`ExpertBank.attach_gates`.

    Subclasses implement :meth:`make_gate`. The router keeps its gates by layer path, carries the
    batch's attention mask to them (set by :meth:`routing` or :meth:`set_attention_mask`), and
    exposes ``last_weights`` [L, E]: each gated layer's mean gate probability per expert over the
    real tokens of the last forward.
    """

    def __init__(self, bank: ExpertBank):
        self.bank = bank
        self.gates: dict[str, nn.Module] = {}
        self.attention_mask: Tensor | None = None
        self._float_mask: tuple[tuple, Tensor] | None = None
        self._zero: Tensor | None = None

    def make_gate(self, path: str, layer: LoRALayer) -> nn.Module:
        """The gate of LoRA layer ``layer`` at ``path``."""
        raise NotImplementedError

    def __call__(self, path: str, layer: LoRALayer) -> nn.Module:
        gate = self.make_gate(path, layer).to(layer.base.weight.device)
        self.gates[path] = gate
        return gate

    def attach(self) -> GateRouter:
        """Attach a gate to every LoRA layer of the bank (replacing any previous gates)."""
        self.gates = {}
        self.bank.attach_gates(self)
        return self

    def set_attention_mask(self, mask: Tensor | None) -> None:
        """Tokens the gates count in their losses and statistics: ``mask`` [B, T] (None: all)."""
        self.attention_mask = mask
        self._float_mask: tuple[tuple, Tensor] | None = None

    def float_mask(self, x: Tensor) -> Tensor | None:
        """The attention mask as float [N] over the N tokens of ``x`` [..., in], or None without
        one; converted once per batch and device, and shared by the gates (no finiteness check:
        see :func:`token_mask` for that).

        Raises:
            ValueError: the mask does not have one entry per token of ``x``.
        """
        mask = self.attention_mask
        if mask is None:
            return None
        n = x.numel() // x.shape[-1]
        if mask.numel() != n:
            raise ValueError(
                f"attention mask {tuple(mask.shape)} does not match the {n} tokens of the gate "
                f"input {tuple(x.shape)}"
            )
        if torch.compiler.is_compiling():  # inside a graph the conversion is fused: no cache
            return mask.reshape(n).to(device=x.device, dtype=torch.float32)
        key = (id(mask), n, x.device)
        cached = self._float_mask
        if cached is None or cached[0] != key:
            cached = (key, mask.reshape(n).to(device=x.device, dtype=torch.float32))
            self._float_mask = cached
        return cached[1]

    def zero(self, like: Tensor) -> Tensor:
        """A cached scalar zero on ``like``'s device: the auxiliary loss of an inference forward."""
        z = self._zero
        if z is None or z.device != like.device or z.dtype != like.dtype:
            z = self._zero = like.new_zeros(())
        return z

    def routing(self, batch: RouterInput | None = None) -> Routing:
        """``Routing.gated()``, after taking the batch's attention mask (if any) for the gates."""
        self.set_attention_mask(None if batch is None else batch.attention_mask)
        return Routing.gated()

    def parameters(self) -> list[nn.Parameter]:
        """The gates' trainable parameters (shared block gates counted once)."""
        seen: dict[int, nn.Parameter] = {}
        for gate in self.gates.values():
            for p in gate.parameters():
                if p.requires_grad:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    @property
    def last_weights(self) -> Tensor | None:  # type: ignore[override]
        """Mean gate probabilities [L, E] of the last forward, one row per gated layer."""
        loads = [
            g.last_load for g in self.gates.values() if getattr(g, "last_load", None) is not None
        ]
        return torch.stack(loads) if loads else None

    def weight_rows(self) -> list[str]:
        return [p for p, g in self.gates.items() if getattr(g, "last_load", None) is not None]
