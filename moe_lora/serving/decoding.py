"""Completions for a batch of requests: one ``generate`` with per-row experts, sampling and stops.

Every request of a batch becomes ``n`` rows (its choices); all rows decode together in one
:func:`moe_lora.core.generation.generate` call under a per-sample routing, so requests for
different experts share every forward. What differs per row is handled per row:

* sampling: :class:`RowSampling` divides each row's logits by its temperature and keeps its
  top-p nucleus; a temperature of 0 keeps only the argmax (greedy);
* stopping: :class:`RowTracker` ends a row at EOS, at its own ``max_tokens``, or at one of its
  stop strings (cut from the text), and records the text each step adds, which is streamed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from moe_lora.core.generation import generate
from moe_lora.serving.experts import Choice, ExpertPool, ResidencyError
from moe_lora.serving.requests import GenerateJob, token_limit_errors

__all__ = ["BankGenerator", "RowSampling", "RowTracker"]

_DONE = object()


class RowSampling(LogitsProcessor):
    """Per-row temperature and top-p (nucleus, arXiv 1904.09751) on logits [N, V].

    Args:
        temperature: [N]; 0 means greedy (only the argmax keeps a finite logit).
        top_p: [N] in (0, 1]; the smallest set of tokens whose probability reaches it is kept.
    """

    def __init__(self, temperature: Tensor, top_p: Tensor):
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        t = self.temperature.to(scores)[:, None]
        scaled = scores / t.clamp_min(1e-5)
        probs, order = scaled.softmax(-1).sort(dim=-1, descending=True)
        drop_sorted = probs.cumsum(-1) - probs > self.top_p.to(scores)[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, -torch.inf)
        greedy = torch.full_like(scores, -torch.inf).scatter(1, scores.argmax(-1, keepdim=True), 0)
        return torch.where(t == 0, greedy, scaled)


@dataclass
class _Row:
    max_tokens: int
    stop: list[str]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already reported
    finish: str | None = None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string (not sent yet)."""
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
        return 1
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:n])), default=0)


class RowTracker(StoppingCriteria):
    """Ends rows at EOS, ``max_tokens`` or a stop string, and queues each step's new text.

    Args:
        tokenizer: decodes the rows' tokens.
        prompt_length: T0, the (padded) prompt length of every row.
        max_tokens, stops: per row.
        eos: token ids that end a row.
        out: receives ``{row: (text added, finish reason or None)}`` after every step.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, max_tokens: Sequence[int],
                 stops: Sequence[list[str]], eos: set[int], out: queue.Queue):
        self.tokenizer, self.prompt_length, self.eos, self.out = tokenizer, prompt_length, eos, out
        self.rows = [_Row(m, list(s)) for m, s in zip(max_tokens, stops, strict=True)]

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        last = input_ids[:, -1].tolist()
        step: dict[int, tuple[str, str | None]] = {}
        for i, (row, token) in enumerate(zip(self.rows, last, strict=True)):
            if row.finish is None:
                step[i] = self._advance(row, token)
        self.out.put(step)
        return torch.tensor([r.finish is not None for r in self.rows], device=input_ids.device)

    def _advance(self, row: _Row, token: int) -> tuple[str, str | None]:
        if token in self.eos:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = min((row.text.find(s) for s in row.stop if s in row.text), default=-1)
            if cut >= 0:
                row.text, row.finish = row.text[:cut], "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish = "length"
        end = len(row.text) if row.finish else len(row.text) - _held_back(row.text, row.stop)
        delta, row.sent = row.text[row.sent : end], max(row.sent, end)
        return delta, row.finish


class BankGenerator:
    """Answers completion jobs with the pool's experts (see the module docstring).

    Args:
        pool: the experts; tokenizer: the base model's (left padding is set on it).
        max_input_tokens: longer prompts get a 413 error.
    """

    def __init__(self, pool: ExpertPool, tokenizer: Any, max_input_tokens: int = 512):
        self.pool, self.tokenizer, self.max_input_tokens = pool, tokenizer, max_input_tokens
        tokenizer.padding_side = "left"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()

    def prompt_text(self, job: GenerateJob) -> str:
        """The text the model continues: the prompt, or the chat rendered by its template."""
        if job.messages is None:
            assert job.prompt is not None
            return job.prompt
        return self.tokenizer.apply_chat_template(job.messages, tokenize=False,
                                                  add_generation_prompt=True)

    def run(self, jobs: Sequence[GenerateJob], choices: Sequence[Choice]
            ) -> Iterator[dict[int, dict[str, Any]]]:
        """Per step, ``{job: {"choices": [{"index", "text", "finish_reason"}], ...}}``; a job's
        last item adds ``"usage"``; a job that cannot run gets ``{"error", "status"}``."""
        ids = [self.tokenizer(self.prompt_text(j))["input_ids"] for j in jobs]
        bad = token_limit_errors(ids, self.max_input_tokens, "prompt")
        if bad:
            yield bad
        ok = [i for i in range(len(jobs)) if i not in bad]
        self.pool.prefetch([n for i in ok for n, _ in choices[i]])
        for chunk in self.pool.chunks([choices[i] for i in ok]):
            yield from self._run_chunk([ok[j] for j in chunk], jobs, ids, choices)

    def _run_chunk(self, members: list[int], jobs: Sequence[GenerateJob], ids: list[list[int]],
                   choices: Sequence[Choice]) -> Iterator[dict[int, dict[str, Any]]]:
        rows = [(m, c) for m in members for c in range(jobs[m].n)]  # (job, choice index)
        try:
            routing = self.pool.routing([choices[m] for m, _ in rows])
        except ResidencyError as err:  # only this group's requests fail
            yield {m: {"error": str(err), "status": 503} for m in members}
            return
        prompts = [{"input_ids": ids[m]} for m, _ in rows]
        batch = self.tokenizer.pad(prompts, return_tensors="pt")
        out: queue.Queue = queue.Queue()
        tracker = RowTracker(self.tokenizer, batch["input_ids"].shape[1],
                             [jobs[m].max_tokens for m, _ in rows],
                             [jobs[m].stop for m, _ in rows], self.eos, out)
        temps = torch.tensor([jobs[m].temperature for m, _ in rows])
        kwargs = {"max_new_tokens": max(jobs[m].max_tokens for m in members),
                  "pad_token_id": self.pad_id, "stopping_criteria": StoppingCriteriaList([tracker]),
                  "do_sample": bool((temps > 0).any()), "top_k": 0, "top_p": 1.0,
                  "temperature": 1.0, "logits_processor": LogitsProcessorList(
                      [RowSampling(temps, torch.tensor([jobs[m].top_p for m, _ in rows]))])}
        device = next(iter(self.pool.bank.layers.values())).base.weight.device
        thread = threading.Thread(target=self._generate, daemon=True, args=(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), routing, kwargs,
            out))
        thread.start()
        yield from self._steps(rows, tracker, out, [len(ids[m]) for m, _ in rows])
        thread.join()

    def _generate(self, ids: Tensor, mask: Tensor, routing: Any, kwargs: dict[str, Any],
                  out: queue.Queue) -> None:
        try:
            with torch.inference_mode():
                generate(self.pool.bank, ids, mask, routing=routing, **kwargs)
        except BaseException as err:  # handed to the consuming thread
            out.put(err)
        out.put(_DONE)

    def _steps(self, rows: list[tuple[int, int]], tracker: RowTracker, out: queue.Queue,
               prompt_tokens: list[int]) -> Iterator[dict[int, dict[str, Any]]]:
        while (step := out.get()) is not _DONE:
            if isinstance(step, BaseException):
                raise step
            items: dict[int, dict[str, Any]] = {}
            for r, (text, finish) in step.items():
                if text or finish:
                    job, index = rows[r]
                    items.setdefault(job, {"choices": []})["choices"].append(
                        {"index": index, "text": text, "finish_reason": finish})
            if items:
                yield items
        yield self._usage(rows, tracker, prompt_tokens)

    @staticmethod
    def _usage(rows: list[tuple[int, int]], tracker: RowTracker, prompt_tokens: list[int]
               ) -> dict[int, dict[str, Any]]:
        """Each job's token counts, and a finish reason for rows generate stopped itself."""
        usage: dict[int, dict[str, Any]] = {}
        for r, (job, index) in enumerate(rows):
            row = tracker.rows[r]
            item = usage.setdefault(job, {"choices": [], "usage": {
                "prompt_tokens": prompt_tokens[r], "completion_tokens": 0}})
            item["usage"]["completion_tokens"] += len(row.tokens)
            if row.finish is None:  # generate hit max_new_tokens
                tail = row.text[row.sent :]
                row.finish = "length"
                item["choices"].append({"index": index, "text": tail, "finish_reason": "length"})
        for item in usage.values():
            u = item["usage"]
            u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
        return usage
