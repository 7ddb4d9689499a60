"""The :class:`Predictor` protocol: what ``POST /predict`` asks of a served model.

A continual run (``moe_lora.continual``) or any other model serves ``/predict`` by implementing
it; :class:`moe_lora.serving.classify.BankClassifier` implements it for a bank folder with heads.
This module imports nothing heavy, so that the HTTP processes can name the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Predictor"]


@runtime_checkable
class Predictor(Protocol):
    """What ``POST /predict`` asks of a served model (one call per batch of requests).

    ``predict(texts, experts, tasks)`` gets B texts; for row i, ``experts[i]`` is an expert name,
    or None: then ``tasks[i]`` (when not None) selects the task's experts, else the predictor
    routes by itself. It returns B dicts::

        {"label": str, "scores": {label: probability}, "experts": [name, ...],
         "weights": [float, ...]}

    or, for a row it cannot answer, ``{"error": message, "status": 4xx}``. Expert names and
    tasks arrive checked against ``GET /experts``.
    """

    def predict(self, texts: Sequence[str], experts: Sequence[str | None],
                tasks: Sequence[Any]) -> list[dict[str, Any]]:
        """One answer per text (see the class docstring)."""
        ...
