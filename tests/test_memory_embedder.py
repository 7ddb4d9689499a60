"""Embedder: equals SentenceTransformer on the embedded MiniLM; cache, prefix, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from moe_lora.memory import RETRIEVAL_PREFIX, Embedder, EmbedderConfig, default_model_path

torch.set_num_threads(1)

TEXTS = [
    "dog: a member of the genus Canis",
    "run: move fast by using one's feet",
    "red: having the colour of blood",
    "quickly: with rapid movements",
    "bank: sloping land beside a body of water",
]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    """The embedded MiniLM loaded directly, independently of the Embedder."""
    return SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def shared_model() -> SentenceTransformer:
    return Embedder().model  # the Embedder's own loading path


class CountingModel:
    """Wraps a SentenceTransformer, recording each encode call's texts and progress flag."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.model, self.calls = model, []

    def encode(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs["show_progress_bar"]))
        return self.model.encode(texts, **kwargs)

    def get_embedding_dimension(self):
        return self.model.get_embedding_dimension()


def counting(model, **config) -> tuple[Embedder, CountingModel]:
    spy = CountingModel(model)
    return Embedder(EmbedderConfig(**config), model=spy), spy  # type: ignore[arg-type]


def test_matches_sentence_transformer(shared_model, reference):
    embedder = Embedder(model=shared_model)
    out = embedder.encode(TEXTS)
    assert out.shape == (5, 384) and out.dtype == np.float32 and embedder.dim == 384
    ref = reference.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    raw = Embedder(EmbedderConfig(normalize=False), model=shared_model).encode(TEXTS)
    np.testing.assert_allclose(raw, reference.encode(TEXTS, convert_to_numpy=True), atol=1e-5)


def test_output_is_normalised_and_torch_output_agrees(shared_model):
    embedder = Embedder(model=shared_model)
    out = embedder.encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    as_torch = embedder.encode_torch(TEXTS)
    assert as_torch.dtype == torch.float32 and torch.equal(as_torch, torch.from_numpy(out))
    unnormalised = SentenceTransformer(modules=[shared_model[0], shared_model[1]])  # no Normalize
    raw = Embedder(EmbedderConfig(normalize=False), model=unnormalised).encode(TEXTS)
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 0.1
    unit = Embedder(model=unnormalised).encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert embedder.encode("dog: a member of the genus Canis").shape == (1, 384)
    assert embedder.encode([]).shape == (0, 384)


def test_cache_hits_are_not_re_encoded(shared_model):
    embedder, spy = counting(shared_model)
    first = embedder.encode(TEXTS + TEXTS[:2])  # duplicates inside one call: encoded once
    assert spy.calls[0][0] == TEXTS and embedder.n_encoded == 5
    again = embedder.encode(list(reversed(TEXTS)))
    assert len(spy.calls) == 1 and embedder.n_encoded == 5
    np.testing.assert_array_equal(again, first[:5][::-1])
    embedder.encode(TEXTS[:2] + ["new: not seen before"])
    assert spy.calls[1][0] == ["new: not seen before"] and embedder.cache_len == 6


def test_cache_is_bounded_least_recently_used_first(shared_model):
    embedder, spy = counting(shared_model, cache_size=3)
    embedder.encode(TEXTS[:3])
    embedder.encode(TEXTS[0])  # TEXTS[0] is now the most recently used
    embedder.encode(TEXTS[3])  # evicts TEXTS[1]
    assert embedder.cache_len == 3
    embedder.encode([TEXTS[0], TEXTS[2], TEXTS[3]])
    assert len(spy.calls) == 2
    embedder.encode(TEXTS[1])
    assert spy.calls[-1][0] == [TEXTS[1]]
    uncached, spy0 = counting(shared_model, cache_size=0)
    uncached.encode(TEXTS[:2])
    np.testing.assert_allclose(uncached.encode(TEXTS[:2]), embedder.encode(TEXTS[:2]), atol=1e-6)
    assert len(spy0.calls) == 2 and uncached.cache_len == 0


def test_prefix_changes_the_embedding_and_the_cache_key(shared_model, reference):
    embedder, spy = counting(shared_model)
    plain = embedder.encode(TEXTS)
    prefixed = embedder.encode(TEXTS, prefix=RETRIEVAL_PREFIX)
    assert len(spy.calls) == 2 and spy.calls[1][0][0] == RETRIEVAL_PREFIX + TEXTS[0]
    assert (plain * prefixed).sum(axis=1).max() < 0.99
    ref = reference.encode([RETRIEVAL_PREFIX + t for t in TEXTS], normalize_embeddings=True)
    np.testing.assert_allclose(prefixed, ref, atol=1e-5)
    configured = Embedder(EmbedderConfig(prefix=RETRIEVAL_PREFIX), model=shared_model)
    np.testing.assert_allclose(configured.encode(TEXTS), prefixed, atol=1e-6)


def test_progress_bar_only_on_large_inputs(shared_model):
    embedder, spy = counting(shared_model, progress_threshold=4)
    embedder.encode(TEXTS[:3])
    embedder.encode(TEXTS + ["x: y", "z: w"])  # 4 misses
    assert [shown for _, shown in spy.calls] == [False, True]


def test_bad_config_and_missing_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="EmbedderConfig.batch_size"):
        EmbedderConfig(batch_size=0)
    with pytest.raises(FileNotFoundError, match="EmbedderConfig.model"):
        Embedder(EmbedderConfig(model=str(tmp_path / "absent")))
