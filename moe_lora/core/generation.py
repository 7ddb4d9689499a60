"""Text generation with mixed experts: Hugging Face ``generate`` on a bank, every row routed.

``generate`` expands a batch before its first forward (beams, returned sequences: row
``b * n + j`` belongs to sample b) and, with a KV cache, feeds one token per row after the prompt.
A routing built for the prompt fits neither. :func:`generate` sets the routing of every forward
from what that forward is fed (a forward pre-hook on the model)::

    forward  rows N = n * B, tokens T (the prompt, then 1 per step; all of them without a cache)
    sample / dense [B, E]        the prompt's routing, each sample's row repeated n times
    token / dense [B, T0, ...]   positions >= T0 (generated tokens) take the experts of the last
                                 prompt position T0 - 1; then repeated n times
    gated                        the attached gates decide on each forward's own tokens
    a router (``RoutingSource``) asked once with the prompt's ``RouterInput``; when it answers
                                 ``gated`` or per token, asked again at every forward with the
                                 expanded texts / task ids and the attention mask of the fed tokens

So row i of a mixed batch decodes as it would alone with its own experts (greedy and beam search
give the same tokens; sampling draws from the same distributions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from moe_lora.core.routing import RouterInput, Routing

if TYPE_CHECKING:
    from moe_lora.core.bank import ExpertBank

__all__ = ["RoutingSource", "StepRouting", "generate"]


@runtime_checkable
class RoutingSource(Protocol):
    """Anything with ``routing(RouterInput) -> Routing``: every router of ``moe_lora.routers``."""

    def routing(self, batch: RouterInput) -> Routing:
        """The routing for ``batch``."""
        ...


def _repeat_input(batch: RouterInput, n: int, mask: Tensor | None) -> RouterInput:
    """``batch`` with every sample repeated ``n`` times in a row, and ``mask`` as its mask."""
    texts = None if batch.texts is None else [t for t in batch.texts for _ in range(n)]
    hidden = None if batch.hidden is None else batch.hidden.repeat_interleave(n, dim=0)
    tasks = None if batch.task_ids is None else batch.task_ids.repeat_interleave(n, dim=0)
    return RouterInput(hidden=hidden, attention_mask=mask, texts=texts, task_ids=tasks)


def _per_token(routing: Routing) -> bool:
    return routing.kind == "token" or (
        routing.kind == "dense" and routing.weights is not None and routing.weights.dim() == 3
    )


def _take_positions(routing: Routing, start: int, stop: int) -> Routing:
    """The per-token ``routing`` [B, T0, ...] at positions ``start..stop-1``; later positions
    than the prompt's take its last position's experts."""
    t0 = int((routing.weights if routing.indices is None else routing.indices).shape[1])
    device = (routing.weights if routing.weights is not None else routing.indices).device
    pos = torch.arange(start, stop, device=device).clamp_max(t0 - 1)
    indices = None if routing.indices is None else routing.indices.index_select(1, pos)
    weights = None if routing.weights is None else routing.weights.index_select(1, pos)
    return replace(routing, indices=indices, weights=weights)


class StepRouting:
    """The routing of each forward of one ``generate`` call (see the module docstring).

    Args:
        routing: a :class:`Routing` for the prompt's B samples, or a :class:`RoutingSource`.
        batch_size: B, the number of prompts.
        router_input: what a source is asked with (its B samples); default: nothing but the
            prompt's attention mask.

    Raises (from :meth:`__call__`):
        ValueError: a forward's rows are not a multiple of B, or a per-token routing does not
            cover the prompt.
    """

    def __init__(self, routing: Routing | RoutingSource, batch_size: int,
                 router_input: RouterInput | None = None):
        self.source = routing if isinstance(routing, RoutingSource) else None
        self.fixed = None if self.source is not None else routing
        self.batch_size = batch_size
        self.router_input = router_input or RouterInput()
        self.prompt_length: int | None = None

    def __call__(self, rows: int, tokens: int, mask: Tensor | None, total: int) -> Routing:
        """Routing for a forward fed ``tokens`` per row of ``rows`` rows, ending at ``total``.

        ``mask`` is the forward's attention mask [rows, total] (None: all real tokens).
        """
        if rows % self.batch_size:
            raise ValueError(
                f"generate fed {rows} rows, not a multiple of the {self.batch_size} prompts"
            )
        n, start = rows // self.batch_size, total - tokens
        fed_mask = None if mask is None else mask[:, start:total]
        if self.prompt_length is None:  # the first forward is the prompt's
            self.prompt_length = tokens
            if self.source is not None:
                prompt_mask = None if fed_mask is None else fed_mask[::n]
                self.fixed = self.source.routing(
                    replace(self.router_input, attention_mask=prompt_mask))
        assert self.fixed is not None
        if self.fixed.kind == "gated" and self.source is not None:
            return self.source.routing(_repeat_input(self.router_input, n, fed_mask))
        routing = self.fixed
        if _per_token(routing):
            t0 = int((routing.weights if routing.indices is None else routing.indices).shape[1])
            if t0 != self.prompt_length:
                raise ValueError(
                    f"per-token routing covers {t0} positions, the prompt has {self.prompt_length}"
                )
            routing = _take_positions(routing, start, total)
        return routing.expand(n)


def _fed_shape(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    fed = ids if ids is not None else kwargs.get("inputs_embeds")
    if fed is None:
        raise ValueError("generate: a forward got neither input_ids nor inputs_embeds")
    return int(fed.shape[0]), int(fed.shape[1])


def _total_length(kwargs: dict[str, Any], tokens: int) -> int:
    """Positions seen so far including the fed ones: from the 2-D attention mask, else the cache
    positions, else the KV cache's length (``generate`` drops an all-ones mask)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return int(mask.shape[1])
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel():
        return int(cache_position[-1]) + 1
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length()) + tokens
    return tokens


@contextlib.contextmanager
def routed_forwards(bank: ExpertBank, plan: StepRouting) -> Iterator[None]:
    """Inside the block, every forward of ``bank.model`` is routed by ``plan``."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rows, tokens = _fed_shape(args, kwargs)
        total = _total_length(kwargs, tokens)
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        bank.set_routing(plan(rows, tokens, mask, total))

    previous = bank.routing
    handle = bank.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        bank.set_routing(previous)


def generate(
    bank: ExpertBank,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    routing: Routing | RoutingSource | str | int | None = None,
    router_input: RouterInput | None = None,
    **generate_kwargs: Any,
) -> Any:
    """``bank.model.generate`` with every row routed to its own experts at every decoding step.

    Args:
        bank: a bank over a causal LM (anything with ``generate``).
        input_ids: the prompts [B, T0] (left-padded for a batch); attention_mask: [B, T0].
        routing: for the B prompts: a :class:`Routing` (any kind), an expert name or index, a
            router (:class:`RoutingSource`), or None (the bank's current routing).
        router_input: what a router is asked with (texts, task ids) for the B prompts.
        **generate_kwargs: passed to Hugging Face ``generate`` (``max_new_tokens``,
            ``do_sample``, ``num_beams``, ``num_return_sequences``, ...).

    Returns:
        what ``generate`` returns: token ids [B * num_return_sequences, T] or its output dict.

    Raises:
        ValueError: the routing's batch is not B, or a per-token routing does not cover T0.
        KeyError: an unknown expert name.
    """
    spec = bank.routing if routing is None else routing
    if not isinstance(spec, RoutingSource):
        spec = bank.as_routing(spec)
        rows = spec.batch_size
        if rows is not None and rows != input_ids.shape[0]:
            raise ValueError(
                f"routing has {rows} samples but {input_ids.shape[0]} prompts were given"
            )
    plan = StepRouting(spec, int(input_ids.shape[0]), router_input)
    with routed_forwards(bank, plan):
        return bank.model.generate(  # type: ignore[operator]
            input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs
        )
