r"""Retrieval routing: each input finds its own experts by embedding similarity (LoRARetriever).

LoRARetriever (arXiv 2402.09997) embeds each input with an instruction prefix, retrieves the k
experts whose keys (a few of their training inputs) are closest, and composes them per sample::

    e_b          = Embed(prefix + text_b)                          [d], normalised
    ids_b, s_b   = ExpertIndex.search(e_b, k)                      top-k experts and scores
    w_b,j        = 1 / k                      (uniform, as the paper)
                 | softmax_j(s_b,j / T)       (``weighting="softmax"``)
    mixture:  y_b = base(x_b) + sum_j w_b,j s_j B_j A_j x_b                      (outputs mixed)
    fusion:   y_b = base(x_b) + (sum_j w_b,j s_j B_j)(sum_j w_b,j A_j) x_b      (parameters mixed)

Mixture is ``Routing.per_sample(indices, weights)``. Fusion is done per layer by a
:class:`FusionGate`: the chosen experts' factors are gathered from the bank's stack
(``LoRALayer.stacked``, padded to a common rank, scale folded into B), weighted and summed per
sample, and applied with two batched ``bmm``; it runs under ``Routing.gated()``, so the router
attaches fusion gates to the bank (refusing if other gates are attached).

The index holds the router's own expert ids; ``index_expert(name, texts)`` adds a bank expert's
keys (embedded with the same prefix), so the index grows with the bank one expert at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from moe_lora.core.routing import GateOutput, RouterInput, RouterOutput, Routing, register_router

from .base import RetrievalConfig, WeightLog, bank_device, dense_weights

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank
    from moe_lora.core.layers import LoRALayer
    from moe_lora.memory import ExpertIndex

__all__ = ["RetrievalRouter", "FusionGate", "TextEncoder", "fused_delta"]


class TextEncoder(Protocol):
    """What the router needs from an embedder (:class:`moe_lora.memory.Embedder`)."""

    def encode(self, texts: Sequence[str], prefix: str | None = None) -> np.ndarray:
        """Embeddings [N, d] float32 of ``prefix + text``."""
        ...


def fused_delta(x: Tensor, layer: LoRALayer, indices: Tensor, weights: Tensor) -> Tensor:
    """Per-sample parameter fusion ``(sum_j w_bj B_j)(sum_j w_bj A_j) x_b`` for one layer.

    Args:
        x: the layer input [B, T, in] or [B, in].
        indices: [B, k] bank indices (``-1``: none); weights: [B, k].

    Returns:
        the LoRA delta [B, T, out] (or [B, out]).
    """
    bsz = indices.shape[0]
    if x.shape[0] != bsz:
        raise ValueError(f"{layer.path}: routing has {bsz} samples but the input has {x.shape[0]}")
    w = weights.to(x.dtype).masked_fill(indices < 0, 0.0)
    uniq, inv = torch.unique(indices.clamp_min(0), return_inverse=True)
    a_u, b_u = layer.stacked(uniq)  # [U, R, in], [U, out, R] (scale in B)
    a = torch.einsum("bk,bkri->bri", w, a_u[inv])  # fused A per sample [B, R, in]
    b = torch.einsum("bk,bkor->bor", w, b_u[inv])  # fused B per sample [B, out, R]
    x3 = x.reshape(bsz, -1, x.shape[-1])
    delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


class FusionGate(nn.Module):
    """A parameter-free layer gate applying the per-sample fusion set by its router."""

    def __init__(self, router: RetrievalRouter):
        super().__init__()
        self.router = router

    def forward(self, x: Tensor, layer: LoRALayer) -> GateOutput:
        plan = self.router.fusion_plan
        if plan is None:
            raise RuntimeError(
                "fusion gate: call RetrievalRouter.routing(batch) before the forward"
            )
        delta = fused_delta(x, layer, *plan)
        return GateOutput(routing=None, aux_loss=torch.zeros(()), delta=delta)


@register_router("retrieval")
class RetrievalRouter(WeightLog):
    """LoRARetriever routing over a :class:`moe_lora.memory.ExpertIndex` (see the module doc).

    Args:
        config: the :class:`RetrievalConfig`.
        bank: the expert bank; experts are found by name, so it may grow or shrink.
        embedder: a :class:`TextEncoder` (default: ``moe_lora.memory.Embedder()``, the embedded
            MiniLM).
        index: an existing index (default: a new exact one per ``config``, whose exemplar vote
            uses ``config.temperature`` too).
        names: for an existing index, its expert id -> bank expert name.

    ``route`` requires ``RouterInput.texts`` and returns ``indices`` [B, k] (bank indices, ``-1``
    where fewer than k experts are indexed) and ``weights`` [B, k]; ``extras["scores"]`` holds
    the similarity scores [B, k].
    """

    config_class = RetrievalConfig

    def __init__(
        self,
        config: RetrievalConfig,
        bank: ExpertBank,
        embedder: TextEncoder | None = None,
        index: ExpertIndex | None = None,
        names: Mapping[int, str] | None = None,
    ):
        from moe_lora.memory import RETRIEVAL_PREFIX, Embedder

        self.config = config
        self.bank = bank
        self.embedder = embedder if embedder is not None else Embedder()
        self.prefix = RETRIEVAL_PREFIX if config.prefix is None else config.prefix
        self.index = index
        self.names: dict[int, str] = dict(names or {})
        if index is not None and set(index.expert_ids) != set(self.names):
            raise ValueError(f"names must map every index id {index.expert_ids} to an expert")
        self.fusion_plan: tuple[Tensor, Tensor] | None = None
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ index
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Embeddings [N, d] of ``texts`` with the router's instruction prefix."""
        return torch.from_numpy(np.asarray(self.embedder.encode(list(texts), prefix=self.prefix)))

    def _new_index(self, dim: int) -> ExpertIndex:
        from moe_lora.memory import ExpertIndex, IndexConfig

        c = self.config
        return ExpertIndex(
            IndexConfig(dim=dim, mode=c.mode, n_centroids=c.n_centroids,  # type: ignore[arg-type]
                        n_neighbors=c.n_neighbors, temperature=c.temperature)
        )

    def id_of(self, name: str) -> int | None:
        """The index id of bank expert ``name`` (None if not indexed)."""
        return next((i for i, n in self.names.items() if n == name), None)

    def index_expert(self, name: str, texts: Sequence[str]) -> int:
        """Index bank expert ``name`` by a few of its training inputs; returns its index id.

        Replaces the keys of an expert already indexed.

        Raises:
            KeyError: ``name`` is not in the bank. ValueError: ``texts`` is empty.
        """
        self.bank.index(name)
        if not texts:
            raise ValueError(f"index_expert({name!r}): no texts")
        keys = self.embed(texts)
        if self.index is None:
            self.index = self._new_index(keys.shape[1])
        eid = self.id_of(name)
        if eid is not None:
            self.index.replace_expert(eid, keys)
            return eid
        eid = max(self.names, default=-1) + 1
        self.index.add_expert(eid, keys)
        self.names[eid] = name
        return eid

    def remove_expert(self, name: str) -> None:
        """Drop expert ``name`` from the index. Raises KeyError if it is not indexed."""
        eid = self.id_of(name)
        if eid is None or self.index is None:
            raise KeyError(f"expert {name!r} is not indexed")
        self.index.remove_expert(eid)
        del self.names[eid]

    # ------------------------------------------------------------------ routing
    def route(self, batch: RouterInput) -> RouterOutput:
        """Top-k experts of each text and their weights.

        Raises:
            ValueError: ``batch.texts`` is missing. RuntimeError: nothing is indexed.
            KeyError: an indexed expert is no longer in the bank (call :meth:`remove_expert`).
        """
        if batch.texts is None:
            raise ValueError("RetrievalRouter needs RouterInput.texts")
        if self.index is None or len(self.index) == 0:
            raise RuntimeError("RetrievalRouter: no expert is indexed; call index_expert first")
        ids, scores = self.index.search(self.embed(batch.texts).numpy(), self.config.k)
        bank_index = {i: self.bank.index(self.names[i]) for i in np.unique(ids[ids >= 0]).tolist()}
        indices = torch.tensor(
            [[bank_index[i] if i >= 0 else -1 for i in row] for row in ids.tolist()]
        )
        scores_t = torch.from_numpy(scores)
        weights = self.weigh(scores_t, indices >= 0)
        self.last_weights = dense_weights(indices, weights, len(self.bank))
        device = bank_device(self.bank)
        return RouterOutput(
            weights=weights.to(device), indices=indices.to(device), extras={"scores": scores_t}
        )

    def weigh(self, scores: Tensor, valid: Tensor) -> Tensor:
        """Weights [B, k] from ``scores`` [B, k]: uniform or ``softmax(scores / T)`` over ``valid``."""
        if self.config.weighting == "uniform":
            w = valid.float()
            return w / w.sum(-1, keepdim=True).clamp_min(1.0)
        logits = (scores.float() / self.config.temperature).masked_fill(~valid, -torch.inf)
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def routing(self, batch: RouterInput) -> Routing:
        """The :class:`Routing` to apply for ``batch`` (fusion: sets the plan and gates)."""
        out = self.route(batch)
        if self.config.composition == "mixture":
            return Routing.from_output(out).for_layout(self.bank.ctx.layout)
        assert out.indices is not None
        self._attach_fusion()
        self.fusion_plan = (out.indices, out.weights)
        return Routing.gated()

    def _attach_fusion(self) -> None:
        gates = [layer.gate for layer in self.bank.layers.values()]
        if all(isinstance(g, FusionGate) and g.router is self for g in gates):
            return
        if any(g is not None for g in gates):
            raise RuntimeError(
                "fusion composition runs as layer gates, but other gates are attached; "
                "call bank.detach_gates() first"
            )
        self.bank.attach_gates(lambda path, layer: FusionGate(self))
