"""The inference workers' loop: collect a batch, run the LitAPI's four steps, stream the answers.

LitServe's own batching loops poll the request queue without blocking when idle; on a shared
CPU that keeps a core busy. This loop blocks for the first request, then waits at most
``batch_timeout`` for more (up to ``max_batch_size``), and runs the LitAPI's methods in
LitServe's order: ``decode_request`` per request, ``batch``, ``predict``, ``unbatch``,
``encode_response``. ``predict`` yields a list per step with one entry per request (None: nothing
new for it); every entry is sent as it comes, and every request is finished when the batch is.
"""

from __future__ import annotations

import logging
import time
from queue import Empty, Queue
from typing import Any

from fastapi import HTTPException
from litserve import LitAPI
from litserve.callbacks import CallbackRunner
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

__all__ = ["BatchLoop"]

log = logging.getLogger(__name__)
_STREAM = LoopResponseType.STREAMING


class BatchLoop(LitLoop):
    """A batching, streaming LitServe loop that sleeps while no request waits."""

    def __call__(self, lit_api: LitAPI, device: str, worker_id: int, request_queue: Queue,
                 transport: MessageTransport, workers_setup_status: dict[int, str],
                 callback_runner: CallbackRunner) -> None:
        while (batch := self.collect(lit_api, request_queue)) is not None:
            fresh = self._drop_expired(lit_api, batch, transport)
            if fresh:
                self.run_batch(lit_api, fresh, transport)

    def collect(self, lit_api: LitAPI, request_queue: Queue) -> list[tuple] | None:
        """The next batch (blocks for its first request); None when the server shuts down."""
        first = None
        while first is None:
            try:
                first = request_queue.get(timeout=1.0)
            except Empty:
                continue
        if first == _SENTINEL_VALUE:
            return None
        batch = [first]
        deadline = time.monotonic() + lit_api.batch_timeout
        while len(batch) < lit_api.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=remaining) if remaining > 0 \
                    else request_queue.get_nowait()
            except Empty:
                break
            if item == _SENTINEL_VALUE:
                request_queue.put(item)
                break
            batch.append(item)
        return batch

    def _drop_expired(self, lit_api: LitAPI, batch: list[tuple], transport: MessageTransport
                      ) -> list[tuple]:
        timeout = lit_api.request_timeout
        if timeout in (None, False, -1):
            return batch
        now, fresh = time.monotonic(), []
        for rq, uid, entered, payload in batch:
            if now - entered > timeout:
                self.put_error_response(transport, rq, uid, HTTPException(504, "request timed out "
                                        "in the queue"), _STREAM)
            else:
                fresh.append((rq, uid, entered, payload))
        return fresh

    def run_batch(self, lit_api: LitAPI, batch: list[tuple], transport: MessageTransport) -> None:
        """Run one batch and send every answer (an exception fails the whole batch)."""
        targets = [(rq, uid) for rq, uid, _, _ in batch]
        try:
            inputs = lit_api.batch([lit_api.decode_request(p) for _, _, _, p in batch])
            outputs = lit_api.encode_response(lit_api.unbatch(lit_api.predict(inputs)))
            for step in outputs:
                for (rq, uid), item in zip(targets, step, strict=True):
                    if item is not None:
                        self.put_response(transport, rq, uid, item, LitAPIStatus.OK, _STREAM)
            for rq, uid in targets:
                self.put_response(transport, rq, uid, "", LitAPIStatus.FINISH_STREAMING, _STREAM)
        except Exception as err:  # every request of the batch gets the error
            log.exception("inference failed for a batch of %d requests", len(batch))
            for rq, uid in targets:
                self.put_error_response(transport, rq, uid, err, _STREAM)

    def pre_setup(self, lit_api: LitAPI, spec: Any = None) -> None:
        """Nothing to check: the API is streaming and batched by construction."""
