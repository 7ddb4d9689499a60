r"""Feature extractors split into a frozen, cacheable prefix and a LoRA-carrying suffix.

::

    inputs ──► prefix (frozen, no LoRA; run ONCE per dataset, outputs cached) ──► states
    states ──► collate (dynamic padding) ──► suffix (LoRA experts, trained) ──► pooled [B, D]

A continual run evaluates and trains on the same texts many times, but LoRA only sits in the top
``lora_layers`` blocks, so everything below them is a pure function of the input. Caching it turns
each training step into a forward/backward of the top blocks only. The cached path computes exactly
what the full model computes (``tests/test_continual_backbone.py`` checks ``suffix(prefix(x))``
against the whole model with the same experts active).

* :class:`EncoderBackbone`: a BERT-like encoder (``embeddings`` + ``encoder.layer``); the state of a
  text is its hidden states ``[T_i, D]`` after the frozen blocks; pooled output = masked mean over
  tokens (the sentence-transformers pooling of MiniLM).
* :class:`MLPBackbone`: a small frozen random MLP for feature inputs (Split-Digits); the state is the
  input row itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask

from moe_lora.core.targets import resolve_targets

__all__ = ["Backbone", "EncoderBackbone", "MLPBackbone", "States"]

States = list[Tensor]
"""Per-example cached prefix outputs (``[T_i, D]`` for text, ``[D_in]`` for features)."""


class Backbone(nn.Module):
    """Interface: ``prefix`` (cacheable), ``collate`` and ``forward`` (the suffix, pooled)."""

    dim: int
    model: nn.Module

    def lora_targets(self, names: Sequence[str]) -> list[str]:
        """Full module paths that carry LoRA (``names``: leaf names; empty: the defaults)."""
        raise NotImplementedError

    @torch.no_grad()
    def prefix(self, inputs: Sequence[str] | Tensor, batch_size: int = 256) -> States:
        """The frozen prefix's per-example outputs (computed without gradients)."""
        raise NotImplementedError

    def collate(self, states: Sequence[Tensor]) -> dict[str, Tensor]:
        """Stack per-example states into a batch (padding to the batch's longest)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Pooled features ``[B, dim]`` of a collated batch (LoRA applies per the bank routing)."""
        raise NotImplementedError

    @property
    def tap_layers(self) -> int:
        """How many layers :meth:`layer_features` can pool (the last of them is :meth:`forward`)."""
        return 1

    def layer_features(self, batch: dict[str, Tensor], count: int) -> list[Tensor]:
        """Pooled outputs ``[B, dim]`` of the last ``count`` layers, bottom first, in one pass.

        The last entry is :meth:`forward`'s output. Only layers from the cached state up can be
        tapped (``count <= tap_layers``).

        Raises:
            ValueError: ``count`` is not in ``1..tap_layers``.
        """
        _check_taps(count, self.tap_layers)
        return [self(batch)]


class MLPBackbone(Backbone):
    """A frozen random MLP ``in -> hidden (-> hidden)* `` with ReLU, for feature inputs.

    Args:
        in_dim: input features.
        hidden: width of every hidden layer (= ``dim``).
        depth: number of Linear+ReLU layers.
        seed: fixes the random weights (the "pretrained" base is this fixed random network).
    """

    def __init__(self, in_dim: int, hidden: int = 128, depth: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            lin = nn.Linear(in_dim if i == 0 else hidden, hidden)
            with torch.no_grad():
                fan_in = lin.in_features
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                lin.bias.zero_()
            layers += [lin, nn.ReLU()]
        self.model = nn.Sequential(*layers)
        self.model.requires_grad_(False)
        self.dim = hidden

    def lora_targets(self, names: Sequence[str]) -> list[str]:
        return resolve_targets(self.model, list(names) if names else "all-linear")

    @torch.no_grad()
    def prefix(self, inputs: Sequence[str] | Tensor, batch_size: int = 256) -> States:
        if not isinstance(inputs, Tensor):
            raise TypeError("MLPBackbone takes feature tensors [N, D], not texts")
        return list(inputs.float().unbind(0))

    def collate(self, states: Sequence[Tensor]) -> dict[str, Tensor]:
        return {"x": torch.stack(list(states))}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["x"])


class EncoderBackbone(Backbone):
    """A BERT-like encoder whose bottom blocks are cached; LoRA lives in the top ``lora_layers``.

    Args:
        model: a transformers encoder with ``embeddings`` and ``encoder.layer`` (BERT, MiniLM).
        tokenizer: its tokenizer.
        lora_layers: number of top blocks that carry LoRA (0: all; then only embeddings cached).
        max_length: tokens kept per text.

    Raises:
        ValueError: the model has no ``encoder.layer`` list, or ``lora_layers`` exceeds it.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, lora_layers: int = 2, max_length: int = 64):
        super().__init__()
        blocks = getattr(getattr(model, "encoder", None), "layer", None)
        if not isinstance(blocks, nn.ModuleList) or not hasattr(model, "embeddings"):
            raise ValueError(
                f"{type(model).__name__}: expected a BERT-like encoder (embeddings, encoder.layer)"
            )
        n = len(blocks)
        if lora_layers > n:
            raise ValueError(f"model.lora_layers={lora_layers} but the model has {n} blocks")
        self.model = model
        self.tokenizer = tokenizer
        self.split = n - lora_layers if lora_layers else 0
        self.max_length = max_length
        self.dim = int(model.config.hidden_size)
        model.eval()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer  # type: ignore[no-any-return]

    def lora_targets(self, names: Sequence[str]) -> list[str]:
        from moe_lora.core.targets import default_target_names

        leaves = list(names) if names else default_target_names(self.model)
        top = [f"encoder.layer.{i}." for i in range(self.split, len(self.blocks))]
        paths = resolve_targets(self.model, leaves)
        return [p for p in paths if any(p.startswith(t) for t in top)]

    def _mask(self, hidden: Tensor, mask: Tensor) -> Tensor | None:
        return create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=mask
        )

    def _run_blocks(self, hidden: Tensor, mask: Tensor, lo: int, hi: int) -> Tensor:
        ext = self._mask(hidden, mask)
        for block in list(self.blocks)[lo:hi]:
            hidden = block(hidden, ext)
        return hidden

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Tokenise with padding to the batch's longest text (``max_length`` at most)."""
        return self.tokenizer(  # type: ignore[no-any-return]
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )

    @torch.no_grad()
    def prefix(self, inputs: Sequence[str] | Tensor, batch_size: int = 256) -> States:
        if isinstance(inputs, Tensor):
            raise TypeError("EncoderBackbone takes texts")
        texts = list(inputs)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
        out: list[Tensor | None] = [None] * len(texts)
        for s in range(0, len(order), batch_size):
            ids = order[s : s + batch_size]
            tok = self.tokenize([texts[i] for i in ids])
            hidden = self.model.embeddings(input_ids=tok["input_ids"],
                                           token_type_ids=tok.get("token_type_ids"))
            hidden = self._run_blocks(hidden, tok["attention_mask"], 0, self.split)
            lengths = tok["attention_mask"].sum(1).tolist()
            for row, i in enumerate(ids):
                out[i] = hidden[row, : lengths[row]].clone()
        return [t for t in out if t is not None]

    def collate(self, states: Sequence[Tensor]) -> dict[str, Tensor]:
        longest = max(s.shape[0] for s in states)
        hidden = states[0].new_zeros(len(states), longest, states[0].shape[1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for i, s in enumerate(states):
            hidden[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return {"hidden": hidden, "attention_mask": mask}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        hidden = self._run_blocks(batch["hidden"], mask, self.split, len(self.blocks))
        return mean_pool(hidden, mask)

    @property
    def tap_layers(self) -> int:
        """The cached state (the output of the last frozen block) and every block above it."""
        return len(self.blocks) - self.split + 1

    def layer_features(self, batch: dict[str, Tensor], count: int) -> list[Tensor]:
        _check_taps(count, self.tap_layers)
        mask = batch["attention_mask"]
        hidden = batch["hidden"]
        ext = self._mask(hidden, mask)
        first = self.tap_layers - count  # 0: the cached state itself
        out = [mean_pool(hidden, mask)] if first == 0 else []
        for i, block in enumerate(list(self.blocks)[self.split:], start=1):
            hidden = block(hidden, ext)
            if i >= first:
                out.append(mean_pool(hidden, mask))
        return out

    def full_forward(self, texts: Sequence[str]) -> Tensor:
        """The whole model on ``texts`` (no cache), mean-pooled ``[B, D]``: the reference path."""
        tok = self.tokenize(texts)
        out = self.model(**tok).last_hidden_state
        return mean_pool(out, tok["attention_mask"])


def _check_taps(count: int, available: int) -> None:
    if not 1 <= count <= available:
        raise ValueError(f"model.feature_layers={count}: this backbone can pool 1..{available} "
                         "layers (the cached state and the blocks above it)")


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [B, T, D] over the tokens where ``mask`` [B, T] is 1: [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
