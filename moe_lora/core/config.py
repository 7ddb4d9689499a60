"""Typed configuration of one LoRA expert."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ExpertConfig", "INITS"]

INITS = ("kaiming", "gaussian", "random")


@dataclass
class ExpertConfig:
    """Hyper-parameters of one LoRA expert (the same in every injected layer).

    The update of a layer ``W`` is ``scale * B @ A`` with ``A`` [rank, in], ``B`` [out, rank] and
    ``scale = alpha / rank`` (LoRA, arXiv 2106.09685) or ``alpha / sqrt(rank)`` with ``rslora``
    (rank-stabilised LoRA, arXiv 2312.03732).

    Attributes:
        rank: r > 0.
        alpha: scaling numerator.
        dropout: dropout probability on the expert's input, in [0, 1).
        init: ``kaiming`` (A Kaiming-uniform, B zero: starts as the base model, as PEFT),
            ``gaussian`` (A ~ N(0, 1/r), B zero), ``random`` (A and B random: for tests/probes).
        rslora: use ``alpha / sqrt(rank)``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"ExpertConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ExpertConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"ExpertConfig.init must be one of {INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """The factor multiplying ``B @ A``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
