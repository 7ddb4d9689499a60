"""On-disk format of :class:`moe_lora.memory.ExpertIndex` and the checks its loader runs.

A saved index is a folder of three files:

- ``index.faiss``: the ``IndexIDMap2`` written by ``faiss.write_index``;
- ``keys.safetensors``: ``keys.<id>`` ``[N, d]`` per expert, plus ``centroids.<id>`` ``[M, d]`` in
  centroid mode (what the index holds), so remove / replace / k-means work after a load;
- ``index.json``: format, version, the ``IndexConfig`` fields, ``ntotal``, the experts
  (``id``, ``n_keys``, ``n_vectors``) and the SHA-256 of the two other files. Written last.

Every indexed vector's FAISS id is ``(expert_id << ID_SHIFT) | row``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from moe_lora.core.io import CorruptFileError, read_json, sha256_file

ID_SHIFT = 32
FORMAT, VERSION = "moe_lora.expert_index", 1
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
        for name in (INDEX_FILE, KEYS_FILE):
            if not isinstance(manifest["sha256"][name], str):
                raise TypeError(f"sha256.{name} is not a string")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path}: not an expert index manifest ({err!r})") from err
    return manifest


def read_faiss(path: Path, expected_sha256: str) -> faiss.Index:
    """Read ``index.faiss`` after checking its SHA-256.

    Raises:
        FileNotFoundError: the file is missing.
        CorruptFileError: checksum mismatch, or FAISS cannot parse it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if sha256_file(path) != expected_sha256:
        raise CorruptFileError(
            f"{path}: checksum mismatch with {MANIFEST_FILE}; the file is truncated or was modified"
        )
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        raise CorruptFileError(f"{path}: not a readable FAISS index ({err})") from err


def check_faiss(index: faiss.Index, manifest: dict[str, Any], folder: Path) -> None:
    """Check the FAISS index against the manifest: type, dimension, vector count, ids.

    Raises:
        IndexMismatchError: names both files and what differs.
    """
    where = f"{folder / INDEX_FILE} vs {folder / MANIFEST_FILE}"
    dim, experts = manifest["config"].get("dim"), manifest["experts"]
    if not isinstance(index, faiss.IndexIDMap2):
        raise IndexMismatchError(f"{where}: index is {type(index).__name__}, not IndexIDMap2")
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
