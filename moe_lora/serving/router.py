"""``"auto"`` routing and ``POST /route``: the folder's retrieval router, answering with names.

The router saved in ``PATH/router`` (:func:`moe_lora.serving.folder.save_router`) is a
:class:`~moe_lora.routers.RetrievalRouter` (LoRARetriever, arXiv 2402.09997): the text is embedded
with the router's instruction prefix (the embedded MiniLM), its FAISS
:class:`~moe_lora.memory.ExpertIndex` returns the k nearest experts and the router weighs them.
Answers name experts rather than bank indices, so a store's experts need not be resident, and
the model does not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_lora.core.bank import ExpertBank
from moe_lora.core.io import read_json
from moe_lora.memory import Embedder, EmbedderConfig, ExpertIndex
from moe_lora.routers import RetrievalConfig, RetrievalRouter, make_config

__all__ = ["NamedRoute", "NamedRouter"]


@dataclass
class NamedRoute:
    """The router's choice for one text: experts (best first), their weights and scores."""

    experts: list[str]
    weights: list[float]
    scores: list[float]

    def to_json(self) -> dict[str, list]:
        """JSON for ``POST /route``."""
        return {"experts": self.experts, "weights": self.weights, "scores": self.scores}


class NamedRouter:
    """A retrieval router whose answers are expert names.

    Args:
        router: the :class:`RetrievalRouter` (its index and id -> name map are used, not the
            bank it was built with).

    Raises:
        ValueError: the router composes by fusion (serving mixes expert outputs per sample).
    """

    def __init__(self, router: RetrievalRouter):
        if router.config.composition != "mixture":
            raise ValueError("serving routes by mixture; the saved router uses fusion")
        self.router = router

    @classmethod
    def load(cls, folder: str | Path, bank: ExpertBank, device: str = "cpu") -> NamedRouter:
        """The router saved in ``folder/router``.

        Raises:
            FileNotFoundError / CorruptFileError: missing or damaged files.
        """
        where = Path(folder) / "router"
        saved = read_json(where / "router.json")
        config = make_config(RetrievalConfig, saved["config"])
        assert isinstance(config, RetrievalConfig)
        embedder = Embedder(EmbedderConfig(device=device))
        names = {int(k): v for k, v in saved["names"].items()}
        return cls(RetrievalRouter(config, bank, embedder=embedder,
                                   index=ExpertIndex.load(where), names=names))

    @property
    def k(self) -> int:
        """Experts retrieved per text by default."""
        return self.router.config.k

    def route(self, texts: Sequence[str], k: int | None = None) -> list[NamedRoute]:
        """The ``k`` experts (default: the router's) for each text, with weights and scores."""
        assert self.router.index is not None
        k = min(k or self.k, len(self.router.index))
        ids, scores = self.router.index.search(self.router.embed(texts).numpy(), k)
        valid = torch.from_numpy(ids >= 0)
        weights = self.router.weigh(torch.from_numpy(np.ascontiguousarray(scores)), valid)
        out = []
        for row_ids, row_scores, row_w in zip(ids.tolist(), scores.tolist(), weights.tolist(),
                                              strict=True):
            keep = [j for j, i in enumerate(row_ids) if i >= 0]
            out.append(NamedRoute([self.router.names[row_ids[j]] for j in keep],
                                  [float(row_w[j]) for j in keep],
                                  [float(row_scores[j]) for j in keep]))
        return out
