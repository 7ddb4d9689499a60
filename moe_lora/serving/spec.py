"""The HTTP endpoints of ``moe-lora serve`` (a LitServe spec: routes in the HTTP processes).

Each POST endpoint checks its body (:mod:`moe_lora.serving.requests`; a refusal never reaches
the model), puts one typed job on the workers' queue and reads the answers the worker streams
back. ``GET /experts`` and ``GET /metrics`` are answered here from the folder's JSON files and
the shared counters; ``GET /health`` is LitServe's (200 once the workers are ready).

Errors are JSON ``{"error": {"message", "type", "code"}}`` with the HTTP status in ``code``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_lora.serving.config import ServeConfig
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.metrics import Metrics
from moe_lora.serving.openai import CompletionFormat
from moe_lora.serving.requests import (
    BadRequest,
    Job,
    parse_body,
    parse_completion,
    parse_predict,
    parse_route,
)

__all__ = ["BankSpec"]

Parser = Callable[[dict[str, Any], ServedFolder, ServeConfig], Job]


def error_response(status: int, message: str) -> JSONResponse:
    """The JSON error body every endpoint uses."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def _worker_error(data: Any) -> BadRequest:
    """The status and message of an error the worker sent (its exception, pickled by LitServe)."""
    try:
        err = pickle.loads(data) if isinstance(data, bytes) else data
    except Exception:
        err = None
    if isinstance(err, HTTPException):
        return BadRequest(err.status_code, str(err.detail))
    return BadRequest(500, "inference failed; the server log has the traceback")


class BankSpec(LitSpec):
    """The routes of a served folder; see the module docstring.

    Args:
        folder: the served folder (for checking requests and ``/experts``).
        config: limits; metrics: the shared counters.
    """

    def __init__(self, folder: ServedFolder, config: ServeConfig, metrics: Metrics):
        super().__init__()
        self.api_path = "/predict"  # LitServe names the workers' queue after it
        self.folder, self.config, self.counters = folder, config, metrics
        for path, handler in (("/predict", self.predict), ("/route", self.route),
                              ("/v1/completions", self.completions),
                              ("/v1/chat/completions", self.chat_completions)):
            self.add_endpoint(path, handler, ["POST"])
        self.add_endpoint("/experts", self.experts, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])

    @property
    def stream(self) -> bool:
        """Workers stream their answers (a completion token by token)."""
        return True

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        """Unused: the LitAPI receives typed jobs."""
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        """Unused: the LitAPI encodes its answers."""
        return output

    # ------------------------------------------------------------------ the queue
    def _submit(self, job: Job) -> tuple[str, deque, asyncio.Event]:
        uid, answers, event = str(uuid.uuid4()), deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=answers)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return uid, answers, event

    async def answers(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        """The worker's answers to ``job``, decoded; a worker error raises :class:`BadRequest`
        (its status: 4xx for a row the model refused, 500 otherwise)."""
        uid, answers, event = self._submit(job)
        try:
            async for data, status in self.data_streamer(answers, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise _worker_error(data)
                if data:
                    item = json.loads(data)
                    if "error" in item:
                        raise BadRequest(int(item.get("status", 500)), item["error"])
                    yield item
        finally:
            self.response_buffer.pop(uid, None)

    @staticmethod
    async def _next(items: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
        try:
            return await anext(items)
        except StopAsyncIteration:
            raise BadRequest(500, "the worker finished without an answer") from None

    def _observed(self, endpoint: str, response: Response, start: float) -> Response:
        self.counters.observe_request(endpoint, response.status_code, time.perf_counter() - start)
        return response

    # ------------------------------------------------------------------ endpoints
    async def _body(self, request: Request) -> dict[str, Any]:
        try:
            raw = await request.body()
        except StarletteHTTPException as err:  # LitServe's size limit, raised while reading
            raise BadRequest(err.status_code, f"the body is larger than "
                                              f"{self.config.max_body_bytes} bytes") from None
        return parse_body(raw)

    async def _single(self, endpoint: str, request: Request, parse: Parser) -> Response:
        start = time.perf_counter()
        try:
            job = parse(await self._body(request), self.folder, self.config)
            async with contextlib.aclosing(self.answers(job)) as items:
                response: Response = JSONResponse(await self._next(items))
        except BadRequest as err:
            response = error_response(err.status, err.message)
        return self._observed(endpoint, response, start)

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: label, class scores, experts used and their weights."""
        return await self._single("/predict", request, parse_predict)

    async def route(self, request: Request) -> Response:
        """``POST /route``: the router's experts, weights and scores for a text (no model)."""
        return await self._single("/route", request, parse_route)

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions`` (OpenAI subset)."""
        return await self._completion("/v1/completions", request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions`` (OpenAI subset)."""
        return await self._completion("/v1/chat/completions", request, chat=True)

    async def _completion(self, endpoint: str, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        items = None
        try:
            body = await self._body(request)
            job = parse_completion(body, self.folder, self.config, chat)
            fmt = CompletionFormat(body["model"], chat, job.n)
            items = self.answers(job)
            first = await self._next(items)  # a refused prompt is still a plain 4xx
            if job.stream:
                return StreamingResponse(self._sse(endpoint, fmt, first, items, start),
                                         media_type="text/event-stream")
            response: Response = JSONResponse(fmt.response([first] + [i async for i in items]))
        except BadRequest as err:
            response = error_response(err.status, err.message)
        if items is not None:
            await items.aclose()
        return self._observed(endpoint, response, start)

    async def _sse(self, endpoint: str, fmt: CompletionFormat, first: dict[str, Any],
                   items: AsyncIterator[dict[str, Any]], start: float) -> AsyncIterator[str]:
        status = 200
        try:
            for chunk in fmt.chunks(first, opening=True):
                yield f"data: {json.dumps(chunk)}\n\n"
            async for item in items:
                for chunk in fmt.chunks(item):
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except BadRequest as err:
            status = err.status
            yield f"data: {json.dumps({'error': {'message': err.message, 'code': status}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream
            await items.aclose()  # type: ignore[attr-defined]
            self.counters.observe_request(endpoint, status, time.perf_counter() - start)

    async def experts(self) -> Response:
        """``GET /experts``: the base model, the router and every expert (task, rank, labels)."""
        start = time.perf_counter()
        response = JSONResponse(self.folder.describe())
        self.counters.observe_request("/experts", 200, time.perf_counter() - start)
        return response

    async def metrics(self) -> Response:
        """``GET /metrics``: Prometheus text."""
        self.counters.observe_request("/metrics", 200, 0.0)
        return PlainTextResponse(self.counters.prometheus(),
                                 media_type="text/plain; version=0.0.4")

