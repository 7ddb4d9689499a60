"""``POST /predict`` for a bank folder with heads: :class:`BankClassifier`, a :class:`Predictor`.

:class:`BankClassifier` implements :class:`~moe_lora.serving.protocol.Predictor` for a folder
holding a bank and linear heads (:func:`moe_lora.serving.folder.save_heads`)::

    h_b      = pool(encoder(x_b) under the routing of every row)     one forward, [B, H]
    logits_b = W_e h_b + c_e     e = the row's expert of largest weight (or the shared head "*")
    scores_b = softmax(logits_b)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from moe_lora.core.io import load_tensors
from moe_lora.serving.experts import Choice, ExpertPool, ResidencyError
from moe_lora.serving.folder import Head, ServedFolder
from moe_lora.serving.requests import token_limit_errors

__all__ = ["BankClassifier", "load_heads", "pool_hidden"]

Resolver = Callable[[Sequence[str], Sequence[str | None], Sequence[Any]], list[Choice]]


def load_heads(folder: ServedFolder) -> dict[str, Head]:
    """The heads saved in ``folder`` (checked against their checksum)."""
    meta = folder.heads_meta
    if meta is None:
        raise FileNotFoundError(f"{folder.path}: no heads.json")
    tensors = load_tensors(folder.path / "heads.safetensors", meta["sha256"])
    return {name: Head(tensors[f"{name}.weight"], tensors[f"{name}.bias"], list(h["labels"]))
            for name, h in meta["heads"].items()}


def pool_hidden(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Sentence features [B, H] from token states [B, T, H]: mean over real tokens, or ``cls``."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class BankClassifier:
    """:class:`Predictor` over a bank folder with heads: the whole batch in one forward.

    Args:
        pool: the experts (resident or on demand).
        tokenizer: the base model's tokenizer.
        heads: expert name (or ``"*"``) -> head.
        resolve: turns (texts, experts, tasks) into each row's experts and weights.
        pooling: ``mean`` or ``cls``.
        max_input_tokens: longer texts get a 413 row error.
    """

    def __init__(self, pool: ExpertPool, tokenizer: Any, heads: dict[str, Head],
                 resolve: Resolver, pooling: str = "mean", max_input_tokens: int = 512):
        self.pool, self.tokenizer, self.heads = pool, tokenizer, heads
        self.resolve, self.pooling, self.max_input_tokens = resolve, pooling, max_input_tokens

    def predict(self, texts: Sequence[str], experts: Sequence[str | None],
                tasks: Sequence[Any]) -> list[dict[str, Any]]:
        """See :class:`Predictor`."""
        out: dict[int, dict[str, Any]] = {}
        for part in self.predict_chunks(texts, experts, tasks):
            out.update(part)
        return [out[i] for i in range(len(texts))]

    def predict_chunks(self, texts: Sequence[str], experts: Sequence[str | None],
                       tasks: Sequence[Any]) -> Iterator[dict[int, dict[str, Any]]]:
        """Answers by groups of rows whose experts fit in memory together, resident ones first."""
        ids = self.tokenizer(list(texts))["input_ids"]
        too_long = token_limit_errors(ids, self.max_input_tokens, "text")
        if too_long:
            yield too_long
        rows = [i for i in range(len(texts)) if i not in too_long]
        if not rows:
            return
        choices = self.resolve([texts[i] for i in rows], [experts[i] for i in rows],
                               [tasks[i] for i in rows])
        self.pool.prefetch([n for c in choices for n, _ in c])
        for chunk in self.pool.chunks(choices):
            try:
                answers = self._forward([ids[rows[j]] for j in chunk], [choices[j] for j in chunk])
            except ResidencyError as err:  # only this group's requests fail
                answers = [{"error": str(err), "status": 503}] * len(chunk)
            yield {rows[j]: a for j, a in zip(chunk, answers, strict=True)}

    @torch.no_grad()
    def _forward(self, ids: list[list[int]], choices: list[Choice]) -> list[dict[str, Any]]:
        device = next(iter(self.pool.bank.layers.values())).base.weight.device
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        with self.pool.bank.use(self.pool.routing(choices)):
            hidden = self.pool.bank.model(**batch).last_hidden_state
        features = pool_hidden(hidden, batch["attention_mask"], self.pooling)
        return [self._answer(features[b], choices[b]) for b in range(len(ids))]

    def _answer(self, feature: Tensor, choice: Choice) -> dict[str, Any]:
        top = max(choice, key=lambda c: c[1])[0] if choice else "*"
        head = self.heads.get(top, self.heads.get("*"))
        if head is None:
            return {"error": f"no head for expert {top!r} and no shared head '*'", "status": 422}
        probs = torch.softmax(head.weight.to(feature) @ feature + head.bias.to(feature), dim=-1)
        return {
            "label": head.labels[int(probs.argmax())],
            "scores": {label: float(p) for label, p in zip(head.labels, probs.tolist(),
                                                             strict=True)},
            "experts": [n for n, _ in choice],
            "weights": [float(w) for _, w in choice],
        }
