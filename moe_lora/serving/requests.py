"""Request bodies checked in the HTTP process and turned into jobs for the inference workers.

Every check fails with :class:`BadRequest` carrying an HTTP status and one message naming the
field: malformed JSON and wrong types (400), an unknown expert or task (404), an oversized text
(413), a missing router (422). Requests name experts only by name, matched against the served
folder's list; nothing in a request is ever used as a path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from moe_lora.serving.config import ServeConfig
from moe_lora.serving.folder import ServedFolder

__all__ = ["BadRequest", "GenerateJob", "Job", "PredictJob", "RouteJob", "parse_body",
           "parse_completion", "parse_predict", "parse_route", "token_limit_errors"]

_MISSING = object()
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               list: "a list", dict: "an object"}


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Selection:
    """Which experts a request asks for: ``expert`` (a name), ``task``, ``auto`` or ``base``."""

    mode: str
    expert: str | None = None
    task: Any = None


@dataclass
class RouteJob:
    """``POST /route``: the router's choice for ``text`` (``k`` experts; None: the router's k)."""

    text: str
    k: int | None = None


@dataclass
class PredictJob:
    """``POST /predict``: classify ``text`` with the selected experts."""

    text: str
    selection: Selection


@dataclass
class GenerateJob:
    """``POST /v1/completions`` or ``/v1/chat/completions``: ``n`` continuations of a prompt."""

    selection: Selection
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stream: bool = False


Job = RouteJob | PredictJob | GenerateJob


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body.

    Raises:
        BadRequest: not JSON (400), or not an object (400).
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"malformed JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING
         ) -> Any:
    """``body[key]`` of type ``kind`` (an integer counts as a number; a boolean never does)."""
    if key not in body or (body[key] is None and default is not _MISSING):
        if default is _MISSING:
            raise BadRequest(400, f"'{key}' is required")
        return default
    value = body[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BadRequest(400, f"'{key}' must be {names}, got {json.dumps(body[key])[:40]}")
    return value


def _text(value: str, key: str, config: ServeConfig) -> str:
    if not value.strip():
        raise BadRequest(400, f"'{key}' is empty")
    if len(value) > config.max_text_chars:
        raise BadRequest(413, f"'{key}' has {len(value)} characters, the limit is "
                              f"{config.max_text_chars}")
    return value


def _refuse_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadRequest(400, f"unknown field '{extra[0]}'; allowed: {sorted(allowed)}")


def _expert(name: str, folder: ServedFolder) -> Selection:
    if name not in folder.names:
        shown = folder.names[:20]
        raise BadRequest(404, f"no expert named {name!r}; experts: {shown}"
                              f"{' ...' if len(folder.names) > 20 else ''}")
    return Selection("expert", expert=name)


def _auto(folder: ServedFolder) -> Selection:
    if not folder.has_router:
        raise BadRequest(422, "'auto' needs a router, and this folder has none (router/); "
                              "name an expert")
    return Selection("auto")


def parse_route(body: dict[str, Any], folder: ServedFolder, config: ServeConfig) -> RouteJob:
    """``{"text": str, "k": int (optional)}``."""
    _refuse_unknown(body, {"text", "k"})
    if not folder.has_router:
        raise BadRequest(422, "this folder has no router (router/); nothing to route with")
    k = _get(body, "k", int, None)
    if k is not None and not 1 <= k <= len(folder.names):
        raise BadRequest(400, f"'k' must be in [1, {len(folder.names)}], got {k}")
    return RouteJob(_text(_get(body, "text", str), "text", config), k)


def parse_predict(body: dict[str, Any], folder: ServedFolder, config: ServeConfig) -> PredictJob:
    """``{"text": str, "expert": NAME | "auto" | null, "task": any (optional)}``.

    ``expert`` null: the task's experts when ``task`` is given, else ``"auto"``.
    """
    _refuse_unknown(body, {"text", "expert", "task"})
    text = _text(_get(body, "text", str), "text", config)
    expert = _get(body, "expert", str, None)
    task = _get(body, "task", (str, int), None)
    if expert == "auto":
        return PredictJob(text, _auto(folder))
    if expert is not None:
        return PredictJob(text, _expert(expert, folder))
    if task is not None:
        if not folder.experts_of_task(task):
            tasks = sorted({str(e.task) for e in folder.experts if e.task is not None})
            raise BadRequest(404, f"no expert for task {task!r}; tasks: {tasks}")
        return PredictJob(text, Selection("task", task=task))
    return PredictJob(text, _auto(folder))


def _messages(body: dict[str, Any], config: ServeConfig) -> list[dict[str, str]]:
    messages = _get(body, "messages", list)
    if not messages:
        raise BadRequest(400, "'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "system", "user", "assistant"):
            raise BadRequest(400, f"'messages[{i}]' must be {{'role': system|user|assistant, "
                                  "'content': str}")
        out.append({"role": m["role"], "content": _text(m["content"], f"messages[{i}].content",
                                                         config)})
    return out


def _stop(body: dict[str, Any]) -> list[str]:
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
        raise BadRequest(400, "'stop' must be a string of 1 to 256 characters or a list of up "
                              "to 4 of them")
    return stop


def _model(model: str, folder: ServedFolder) -> Selection:
    if model == "auto":
        return _auto(folder)
    if model == folder.base_id and model not in folder.names:
        return Selection("base")
    return _expert(model, folder)


def _check_limits(job: GenerateJob, config: ServeConfig) -> None:
    limits = [("max_tokens", 1 <= job.max_tokens <= config.max_new_tokens,
               f"in [1, {config.max_new_tokens}]"),
              ("temperature", 0 <= job.temperature <= 2, "in [0, 2]"),
              ("top_p", 0 < job.top_p <= 1, "in (0, 1]"),
              ("n", 1 <= job.n <= config.max_choices, f"in [1, {config.max_choices}]")]
    for key, ok, what in limits:
        if not ok:
            raise BadRequest(400, f"'{key}' must be {what}, got {getattr(job, key)}")


def parse_completion(body: dict[str, Any], folder: ServedFolder, config: ServeConfig,
                     chat: bool) -> GenerateJob:
    """An OpenAI completion (``prompt``) or chat completion (``messages``) request.

    ``model``: an expert name, ``"auto"`` (the router picks from the prompt) or the base model's
    id (no expert). Fields of the OpenAI API not listed in the docs are ignored.
    """
    job = GenerateJob(
        _model(_get(body, "model", str), folder),
        prompt=None if chat else _text(_get(body, "prompt", str), "prompt", config),
        messages=_messages(body, config) if chat else None,
        max_tokens=_get(body, "max_tokens", int, min(16, config.max_new_tokens)),
        temperature=_get(body, "temperature", float, 1.0),
        top_p=_get(body, "top_p", float, 1.0),
        n=_get(body, "n", int, 1),
        stop=_stop(body),
        stream=_get(body, "stream", bool, False),
    )
    _check_limits(job, config)
    return job


def token_limit_errors(ids: list[list[int]], limit: int, what: str) -> dict[int, dict[str, Any]]:
    """Error answers (413) for the inputs of more than ``limit`` tokens, by position.

    Checked by the workers, which hold the tokenizer; ``what`` names the input in the message.
    """
    return {i: {"error": f"the {what} has {len(x)} tokens, the limit is {limit}", "status": 413}
            for i, x in enumerate(ids) if len(x) > limit}
