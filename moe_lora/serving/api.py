"""The LitAPI of ``moe-lora serve``: four small methods around a :class:`Backend`.

Requests arrive already checked and typed (:mod:`moe_lora.serving.requests`, in the HTTP
process); one batch may mix routes, classifications and completions. ``predict`` yields, step by
step, one entry per request (None when nothing is new for it), which ``encode_response`` turns
into JSON. Batching is a flag: ``max_batch_size=1`` runs every request alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import litserve as ls
import torch

from moe_lora.serving.config import ServeConfig
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.loop import BatchLoop
from moe_lora.serving.metrics import Metrics
from moe_lora.serving.requests import Job

if TYPE_CHECKING:
    from moe_lora.serving.backend import Backend

__all__ = ["BankAPI"]


class BankAPI(ls.LitAPI):
    """Serves one folder (a bank or an adapter store, with heads and a router when present).

    Args:
        path: the served folder; config: the server's settings.
        metrics: shared counters (batch sizes, store statistics are written here).
        spec: the HTTP endpoints (:class:`moe_lora.serving.spec.BankSpec`).
    """

    def __init__(self, path: str | Path, config: ServeConfig, metrics: Metrics, spec: Any):
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout,
                         spec=spec, loop=BatchLoop())
        self.path, self.config, self.metrics = Path(path), config, metrics
        self.backend: Backend | None = None

    def setup(self, device: str) -> None:
        """Load the model, the experts, the router and the heads (once per worker)."""
        from moe_lora.serving.backend import Backend  # the HTTP processes never need it

        folder = ServedFolder(self.path, self.config.base, self.config.result)
        self.backend = Backend.open(folder, self.config, device)

    def decode_request(self, request: Job, **kwargs: Any) -> Job:
        """Requests come checked and typed from the HTTP process."""
        return request

    def batch(self, inputs: list[Job]) -> list[Job]:
        """A batch is the list of its jobs."""
        return list(inputs)

    @torch.inference_mode()
    def predict(self, jobs: list[Job], **kwargs: Any) -> Iterator[list[dict[str, Any] | None]]:
        """Per step, one answer (or None) per job."""
        assert self.backend is not None
        self.metrics.observe_batch(len(jobs))
        try:
            for part in self.backend.run(jobs):
                yield [part.get(i) for i in range(len(jobs))]
        finally:
            worker = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
            self.metrics.publish_store(worker, *self.backend.pool.stats())

    def unbatch(self, output: Iterator[list[Any]]) -> Iterator[list[Any]]:
        """Steps already hold one entry per job."""
        return output

    def encode_response(self, output: Iterator[list[Any]], **kwargs: Any
                        ) -> Iterator[list[str | None]]:
        """Each entry as a JSON string."""
        for step in output:
            yield [None if item is None else json.dumps(item) for item in step]
