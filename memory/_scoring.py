"""How an :class:`~moe_lora.memory.ExpertIndex` turns FAISS hits into per-expert scores.

A search returns, per query, H hits: the expert each hit vector belongs to (``-1``: no hit) and
its similarity (higher is better). Centroid mode keeps each expert's best hit
(:func:`best_per_expert`); exemplar mode lets the hits vote (:func:`vote`). Both return the top
``k`` distinct experts per query, best first, ties broken by the lower id, padded with ``-1`` and
``-inf``.
"""

from __future__ import annotations

import numpy as np


def padded(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty results: ids ``[n, k]`` all ``-1``, scores ``[n, k]`` all ``-inf``."""
    return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)


def _reduce_row(
    experts: np.ndarray, scores: np.ndarray, k: int, reduce: np.ufunc, init: float
) -> tuple[np.ndarray, np.ndarray]:
    valid = experts >= 0
    uniq, inv = np.unique(experts[valid], return_inverse=True)
    agg = np.full(len(uniq), init, dtype=np.float64)
    reduce.at(agg, inv, scores[valid].astype(np.float64))
    order = np.lexsort((uniq, -agg))[:k]
    return uniq[order], agg[order].astype(np.float32)


def _fill(rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, scores = padded(len(rows), k)
    for b, (row_ids, row_scores) in enumerate(rows):
        ids[b, : len(row_ids)] = row_ids
        scores[b, : len(row_scores)] = row_scores
    return ids, scores


def best_per_expert(experts: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, each expert's best similarity among the hits ``[B, H]``; top ``k`` experts."""
    rows = [_reduce_row(e, s, k, np.maximum, -np.inf) for e, s in zip(experts, sims, strict=True)]
    return _fill(rows, k)


def distinct_hits(experts: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`best_per_expert` when every expert has one vector (hits are distinct experts).

    Vectorised over the batch: one ``lexsort`` per call instead of a reduction per row.
    """
    valid = experts >= 0
    s = np.where(valid, sims.astype(np.float32), -np.inf)
    e = np.where(valid, experts, np.iinfo(np.int64).max)
    order = np.lexsort((e, -s))[:, :k]  # per row: best score first, then lower id
    ids, scores = padded(len(experts), k)
    width = order.shape[1]
    top_e = np.take_along_axis(e, order, axis=1)
    top_s = np.take_along_axis(s, order, axis=1)
    keep = top_e != np.iinfo(np.int64).max
    ids[:, :width] = np.where(keep, top_e, -1)
    scores[:, :width] = np.where(keep, top_s, -np.inf)
    return ids, scores


def vote(
    experts: np.ndarray, sims: np.ndarray, k: int, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Similarity-weighted vote of the hits ``[B, H]``: ``softmax(s / T)`` summed per expert."""
    masked = np.where(experts >= 0, sims.astype(np.float64), -np.inf)
    top = masked.max(axis=1, keepdims=True)
    weights = np.exp((masked - np.where(np.isfinite(top), top, 0.0)) / temperature)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    rows = [_reduce_row(e, w, k, np.add, 0.0) for e, w in zip(experts, weights, strict=True)]
    return _fill(rows, k)
