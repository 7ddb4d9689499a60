"""OpenAI response bodies for completions and chat completions, whole or as stream chunks.

The worker answers a completion with items ``{"choices": [{"index", "text", "finish_reason"}]}``
(the text each step added, per choice) and a last item that also holds ``"usage"`` and
``"route"`` (the experts used and their weights). This module turns them into the OpenAI
``text_completion`` / ``chat.completion`` objects, or into their ``.chunk`` stream events. The
experts used are reported under the extra key ``"moe_lora"``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["CompletionFormat"]


class CompletionFormat:
    """Formats one request's answers.

    Args:
        model: the ``model`` the request named (echoed).
        chat: chat completion (``message`` / ``delta``) or plain completion (``text``).
        n: choices requested.
    """

    def __init__(self, model: str, chat: bool, n: int = 1):
        self.model, self.chat, self.n = model, chat, n
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole response from all of the worker's items."""
        texts, finish = [""] * self.n, ["length"] * self.n
        extra: dict[str, Any] = {}
        for item in items:
            for c in item.get("choices", []):
                texts[c["index"]] += c["text"]
                finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
            extra.update({k: item[k] for k in ("usage", "route") if k in item})
        choices = [self._choice(i, t, f) for i, (t, f) in enumerate(zip(texts, finish,
                                                                         strict=True))]
        body = {**self._envelope(False), "choices": choices, "usage": extra.get("usage")}
        if "route" in extra:
            body["moe_lora"] = extra["route"]
        return body

    def _choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    def _delta(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {},
                    "finish_reason": finish}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    def chunks(self, item: dict[str, Any], opening: bool = False) -> list[dict[str, Any]]:
        """Stream events for one worker item (``opening``: first announce the assistant role)."""
        out = []
        if opening and self.chat:
            out += [{**self._envelope(True), "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""},
                 "finish_reason": None}]} for i in range(self.n)]
        for c in item.get("choices", []):
            out.append({**self._envelope(True),
                        "choices": [self._delta(c["index"], c["text"], c["finish_reason"])]})
        if "usage" in item:
            last = {**self._envelope(True), "choices": [], "usage": item["usage"]}
            if "route" in item:
                last["moe_lora"] = item["route"]
            out.append(last)
        return out
