"""On-disk format of :class:`moe_lora.memory.ExpertIndex` and the checks its loader runs.

A saved index is an artefact folder of :mod:`moe_lora.core.commit` (versions, a ``CURRENT``
pointer, a writers' lock, SHA-256 of every file); each version holds three files:

- ``index.faiss``: the ``IndexIDMap2`` written by ``faiss.write_index``;
- ``keys.safetensors``: ``keys.<id>`` ``[N, d]`` per expert, plus ``centroids.<id>`` ``[M, d]`` in
  centroid mode (what the index holds), so remove / replace / k-means work after a load;
- ``index.json``: format, version, the ``IndexConfig`` fields, ``ntotal`` and the experts
  (``id``, ``n_keys``, ``n_vectors``).

The loader checks that the three agree: the FAISS index's metric, backend and dimension against
the config, its vector count and ids against the experts, the key shapes against the experts.

Every indexed vector's FAISS id is ``(expert_id << ID_SHIFT) | row``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from moe_lora.core.io import CorruptFileError, read_json

ID_SHIFT = 32
FORMAT, VERSION = "moe_lora.expert_index", 2
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_KINDS = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}
INDEX_FILE, KEYS_FILE, MANIFEST_FILE = "index.faiss", "keys.safetensors", "index.json"


class IndexMismatchError(CorruptFileError):
    """The files of a saved index are each readable but disagree with each other."""


def read_manifest(path: Path) -> dict[str, Any]:
    """Read ``index.json`` and check its structure (not yet its agreement with the other files).

    Raises:
        FileNotFoundError: no manifest.
        CorruptFileError: not JSON, or a field is missing or of the wrong type (named).
    """
    manifest = read_json(path)
    try:
        if (manifest["format"], manifest["version"]) != (FORMAT, VERSION):
            raise ValueError(f"format {manifest['format']!r} version {manifest['version']}")
        if not isinstance(manifest["config"], dict):
            raise TypeError("config is not an object")
        manifest["ntotal"] = int(manifest["ntotal"])
        manifest["experts"] = [
            {f: int(e[f]) for f in ("id", "n_keys", "n_vectors")} for e in manifest["experts"]
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path}: not an expert index manifest ({err!r})") from err
    return manifest


def read_faiss(path: Path) -> faiss.Index:
    """Read ``index.faiss`` (its checksum was checked by the commit protocol).

    Raises:
        CorruptFileError: FAISS cannot parse it.
    """
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise CorruptFileError(f"{path}: not a readable FAISS index ({err})") from err


def check_faiss(index: faiss.Index, manifest: dict[str, Any], folder: Path) -> None:
    """Check the FAISS index against the manifest: type, metric, backend, dimension, vector count,
    ids.

    Raises:
        IndexMismatchError: names both files and what differs.
    """
    where = f"{folder / INDEX_FILE} vs {folder / MANIFEST_FILE}"
    config, experts = manifest["config"], manifest["experts"]
    dim = config.get("dim")
    _check_kind(index, config, where)
    if index.d != dim:
        raise IndexMismatchError(
            f"{where}: dimension differs (index.faiss d={index.d}, manifest config.dim={dim})"
        )
    counts = sum(e["n_vectors"] for e in experts)
    if not index.ntotal == manifest["ntotal"] == counts:
        raise IndexMismatchError(
            f"{where}: vector count differs (index.faiss ntotal={index.ntotal}, manifest "
            f"ntotal={manifest['ntotal']}, sum of the experts' n_vectors={counts})"
        )
    expected = {(e["id"] << ID_SHIFT) + j for e in experts for j in range(e["n_vectors"])}
    found = set(faiss.vector_to_array(index.id_map).tolist())
    if found != expected:
        only_index = sorted({i >> ID_SHIFT for i in found - expected})
        only_manifest = sorted({i >> ID_SHIFT for i in expected - found})
        raise IndexMismatchError(
            f"{where}: ids differ (experts with vectors only in index.faiss: {only_index}, "
            f"only in the manifest: {only_manifest})"
        )


def _check_kind(index: faiss.Index, config: dict[str, Any], where: str) -> None:
    """The FAISS file's wrapper, metric and backend against the manifest's config."""
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexMismatchError(f"{where}: index is {type(index).__name__}, not IndexIDMap2")
    if index.metric_type != _METRICS[config["metric"]]:
        found = {v: k for k, v in _METRICS.items()}.get(index.metric_type, index.metric_type)
        raise IndexMismatchError(
            f"{where}: metric differs (index.faiss {found!r}, manifest config.metric "
            f"{config['metric']!r})"
        )
    inner = faiss.downcast_index(index.index)
    if not isinstance(inner, _KINDS[config["kind"]]):
        raise IndexMismatchError(
            f"{where}: backend differs (index.faiss {type(inner).__name__}, manifest config.kind "
            f"{config['kind']!r})"
        )


def read_keys(
    tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: Path
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per expert id, ``(keys [N, d], indexed vectors [M, d])`` from ``keys.safetensors``.

    Raises:
        IndexMismatchError: a tensor is missing or its shape / dtype differs from the manifest.
    """
    dim, exemplar = manifest["config"].get("dim"), manifest["config"].get("mode") == "exemplar"
    out = {}
    for e in manifest["experts"]:
        i = e["id"]
        keys = _checked(tensors, f"keys.{i}", (e["n_keys"], dim), path)
        vecs = (
            keys if exemplar else _checked(tensors, f"centroids.{i}", (e["n_vectors"], dim), path)
        )
        out[i] = (keys.numpy().copy(), vecs.numpy().copy())
    return out


def _checked(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, int], path: Path
) -> torch.Tensor:
    t = tensors.get(name)
    if t is None or tuple(t.shape) != shape or t.dtype != torch.float32:
        got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise IndexMismatchError(
            f"{path}: tensor {name!r} is {got}, {MANIFEST_FILE} says float32 {list(shape)}"
        )
    return t
