"""What one inference worker runs: a served folder's model, experts, router and predictor.

:meth:`Backend.run` takes a batch of jobs of any kind and yields partial answers as they are
ready (``{job position: answer}``): routes first (no model), then classifications or
completions, each group in as few forwards as the resident experts allow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from moe_lora.models import load_base
from moe_lora.serving.classify import BankClassifier, load_heads
from moe_lora.serving.config import ServeConfig
from moe_lora.serving.decoding import BankGenerator
from moe_lora.serving.experts import Choice, ExpertPool
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.protocol import Predictor
from moe_lora.serving.requests import GenerateJob, Job, PredictJob, RouteJob, Selection

if TYPE_CHECKING:
    from moe_lora.serving.router import NamedRouter

__all__ = ["Backend"]


class _RunRouter:
    """``POST /route`` of a served run: the task weights of its task-agnostic result."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    def route(self, texts: Sequence[str], k: int | None = None) -> list[Any]:
        from moe_lora.serving.router import NamedRoute

        answers = self.predictor.predict(list(texts), [None] * len(texts), [None] * len(texts))
        return [NamedRoute(a.get("experts", [])[:k], a.get("weights", [])[:k],
                           a.get("weights", [])[:k]) for a in answers]

log = logging.getLogger(__name__)


class Backend:
    """A served folder loaded for inference.

    Args:
        folder: the folder's description.
        pool: its experts; router: its retrieval router (None: no ``"auto"``).
        predictor: answers ``/predict`` (a folder with heads), or None.
        generator: answers completions (a folder without heads), or None.
    """

    def __init__(self, folder: ServedFolder, pool: ExpertPool, router: NamedRouter | None,
                 predictor: Predictor | None = None, generator: BankGenerator | None = None):
        self.folder, self.pool, self.router = folder, pool, router
        self.predictor, self.generator = predictor, generator

    @classmethod
    def open(cls, folder: ServedFolder, config: ServeConfig, device: str = "cpu") -> Backend:
        """Load the base model, the experts, the router and the heads of ``folder``."""
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        if folder.kind == "run":
            return cls._open_run(folder, device)
        task = "encoder" if folder.has_heads else "causal-lm"
        base = load_base(folder.base_id, task=task)
        model = base.model.to(device).eval()
        pool = ExpertPool.open(folder, model, config.max_resident, config.max_resident_bytes)
        router = None
        if folder.has_router:  # imported here: the embedder (sentence-transformers) is heavy
            from moe_lora.serving.router import NamedRouter

            router = NamedRouter.load(folder.path, pool.bank, device)
        backend = cls(folder, pool, router)
        if folder.has_heads:
            pooling = (folder.heads_meta or {}).get("pooling", "mean")
            backend.predictor = BankClassifier(pool, base.tokenizer, load_heads(folder),
                                               backend.resolve, pooling, config.max_input_tokens)
        else:
            backend.generator = BankGenerator(pool, base.tokenizer, config.max_input_tokens)
        log.info("serving %s (%d experts, %s) on %s", folder.path, len(folder.names), task, device)
        return backend

    @classmethod
    def _open_run(cls, folder: ServedFolder, device: str) -> Backend:
        """A continual run: its strategy answers ``/predict`` and routes ``"auto"`` rows."""
        from moe_lora.continual.serve import RunPredictor

        predictor = RunPredictor(folder.path, folder.run["result"], device)
        log.info("serving run %s (%s, %d experts) on %s", folder.path, folder.run["result"],
                 len(folder.names), device)
        return cls(folder, None, _RunRouter(predictor), predictor=predictor)  # type: ignore[arg-type]

    def resolve(self, texts: Sequence[str], experts: Sequence[str | None],
                tasks: Sequence[Any]) -> list[Choice]:
        """Each row's experts and weights: the named expert, the task's experts (uniform), or
        the router's choice."""
        out: list[Choice | None] = []
        for expert, task in zip(experts, tasks, strict=True):
            if expert is not None:
                out.append([(expert, 1.0)])
            elif task is not None:
                names = self.folder.experts_of_task(task)
                out.append([(n, 1.0 / len(names)) for n in names])
            else:
                out.append(None)
        auto = [i for i, c in enumerate(out) if c is None]
        if auto:
            if self.router is None:
                raise ValueError("'auto' routing needs a router")
            for i, route in zip(auto, self.router.route([texts[i] for i in auto]), strict=True):
                out[i] = list(zip(route.experts, route.weights, strict=True))
        return [c if c is not None else [] for c in out]

    def selection_choices(self, selections: Sequence[Selection], texts: Sequence[str]
                          ) -> list[Choice]:
        """:meth:`resolve` for request selections (``base``: no expert)."""
        choices = self.resolve(texts, [s.expert for s in selections],
                               [s.task for s in selections])
        return [[] if s.mode == "base" else c for s, c in zip(selections, choices, strict=True)]

    def run(self, jobs: Sequence[Job]) -> Iterator[dict[int, dict[str, Any]]]:
        """Partial answers ``{position in jobs: answer}`` as they are ready."""
        routes = [i for i, j in enumerate(jobs) if isinstance(j, RouteJob)]
        if routes:
            yield self._route([jobs[i] for i in routes], routes)  # type: ignore[misc]
        predicts = [i for i, j in enumerate(jobs) if isinstance(j, PredictJob)]
        if predicts:
            yield from self._predict([jobs[i] for i in predicts], predicts)  # type: ignore[misc]
        generates = [i for i, j in enumerate(jobs) if isinstance(j, GenerateJob)]
        if generates:
            yield from self._generate([jobs[i] for i in generates], generates)  # type: ignore[misc]

    def _route(self, jobs: list[RouteJob], where: list[int]) -> dict[int, dict[str, Any]]:
        assert self.router is not None
        out = {}
        for k in sorted({j.k for j in jobs}, key=lambda k: k or 0):
            same = [i for i, j in enumerate(jobs) if j.k == k]
            for i, route in zip(same, self.router.route([jobs[i].text for i in same], k),
                                strict=True):
                out[where[i]] = route.to_json()
        return out

    def _predict(self, jobs: list[PredictJob], where: list[int]
                 ) -> Iterator[dict[int, dict[str, Any]]]:
        if self.predictor is None:
            yield {w: {"error": "this folder has no classification heads", "status": 404}
                   for w in where}
            return
        texts = [j.text for j in jobs]
        experts = [j.selection.expert for j in jobs]
        tasks = [j.selection.task for j in jobs]
        chunked = getattr(self.predictor, "predict_chunks", None)
        parts = chunked(texts, experts, tasks) if chunked else [
            dict(enumerate(self.predictor.predict(texts, experts, tasks)))]
        for part in parts:
            yield {where[i]: answer for i, answer in part.items()}

    def _generate(self, jobs: list[GenerateJob], where: list[int]
                  ) -> Iterator[dict[int, dict[str, Any]]]:
        if self.generator is None:
            yield {w: {"error": "this folder serves a classifier, not a causal LM", "status": 404}
                   for w in where}
            return
        texts = [j.prompt or j.messages[-1]["content"] for j in jobs]  # type: ignore[index]
        choices = self.selection_choices([j.selection for j in jobs], texts)
        for part in self.generator.run(jobs, choices):
            for i, answer in part.items():
                if "usage" in answer:
                    answer["route"] = {"experts": [n for n, _ in choices[i]],
                                       "weights": [w for _, w in choices[i]]}
            yield {where[i]: answer for i, answer in part.items()}
