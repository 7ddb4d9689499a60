"""What a served folder holds, read from its JSON files only (no model, no tensors).

A served folder is a saved bank or an adapter store, with optional extras next to it::

    PATH/CURRENT, PATH/v.../                  a bank saved by ``ExpertBank.save``   (or)
    PATH/catalogue/, PATH/experts/<name>/     an ``AdapterStore``: experts loaded on demand  (or)
    PATH/results.json, PATH/checkpoints/      a continual run (its ``experts`` strategy)
    PATH/heads.json, heads.safetensors        optional classification heads (:func:`save_heads`)
    PATH/router/router.json + index files     optional retrieval router (:func:`save_router`)

The HTTP processes read it to validate requests and answer ``GET /experts``; the inference
workers load the model, the experts, the heads and the router from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from moe_lora.core.commit import read_version
from moe_lora.core.io import atomic_save_tensors, atomic_write_json, read_json
from moe_lora.core.storage import read_manifest

if TYPE_CHECKING:
    from moe_lora.routers import RetrievalRouter

__all__ = ["ExpertEntry", "Head", "ServedFolder", "save_heads", "save_router"]

HEADS_FORMAT = "moe-lora-heads/1"
ROUTER_FORMAT = "moe-lora-router/1"


@dataclass(frozen=True)
class ExpertEntry:
    """One servable expert: its name, task, rank and metadata (from its manifest)."""

    name: str
    task: Any = None
    rank: int = 0
    meta: Mapping[str, Any] | None = None


@dataclass
class Head:
    """A linear classification head over pooled features: ``weight`` [C, H], ``bias`` [C]."""

    weight: Tensor
    bias: Tensor
    labels: list[str]


class ServedFolder:
    """The description of a served folder (see the module docstring).

    Args:
        path: the folder.
        base: overrides the base model id of the manifests.
        result: a continual run's result answering ``"auto"`` (None: its best task-agnostic one).

    Raises:
        FileNotFoundError: the folder holds neither a bank manifest nor a store catalogue.
        moe_lora.core.io.CorruptFileError: a manifest is not a moe-lora manifest.
    """

    def __init__(self, path: str | Path, base: str | None = None, result: str | None = None):
        self.path = Path(path)
        if (self.path / "CURRENT").is_file():
            self.kind = "bank"
            manifests = [read_manifest(self.path)]
        elif (self.path / "catalogue").is_dir():
            self.kind = "store"
            with read_version(self.path / "catalogue") as version:
                names = read_json(version / "store.json")["experts"]
            manifests = [read_manifest(self.path / "experts" / n) for n in names.values()]
        elif (self.path / "results.json").is_file() and (self.path / "checkpoints").is_dir():
            self._open_run(base, result)
            return
        else:
            raise FileNotFoundError(
                f"{self.path} is neither a saved bank (CURRENT), an adapter store "
                "(catalogue/) nor a continual run (results.json + checkpoints/)"
            )
        if not manifests:
            raise FileNotFoundError(f"{self.path}: the store holds no expert")
        self.base_id: str = base or manifests[0]["base"]["id"]
        self.experts = [
            ExpertEntry(e["name"], e.get("task"), int(e["config"]["rank"]), e.get("meta") or {})
            for m in manifests for e in m["experts"]
        ]
        self.heads_meta = read_json(self.path / "heads.json") if self.has_heads else None

    def _open_run(self, base: str | None, result: str | None) -> None:
        """A continual run: its served strategy's experts, labels and results."""
        from moe_lora.continual.serve import describe_run

        self.kind = "run"
        self.run = describe_run(self.path, result)
        self.base_id = base or self.run["base"]
        self.experts = [ExpertEntry(e["name"], e["task"], int(e["rank"]), {})
                        for e in self.run["experts"]]
        self.heads_meta = {"heads": {e["name"]: {"labels": e["labels"]}
                                     for e in self.run["experts"]}}

    @property
    def names(self) -> list[str]:
        """Expert names."""
        return [e.name for e in self.experts]

    @property
    def has_heads(self) -> bool:
        """Whether classification heads are saved next to the experts (a run always has them)."""
        return self.kind == "run" or (self.path / "heads.json").is_file()

    @property
    def has_router(self) -> bool:
        """Whether ``"auto"`` routing is available: a saved retrieval router (``router/``), or a
        run (its task-agnostic result routes)."""
        return self.kind == "run" or (self.path / "router" / "router.json").is_file()

    def experts_of_task(self, task: Any) -> list[str]:
        """Names of the experts whose task equals ``task`` (compared as strings too)."""
        return [e.name for e in self.experts if e.task == task or str(e.task) == str(task)]

    def describe(self) -> dict[str, Any]:
        """JSON for ``GET /experts``."""
        return {
            "base": self.base_id,
            "kind": self.kind,
            "router": self.run["result"] if self.kind == "run" else
            ("retrieval" if self.has_router else None),
            "experts": [
                {"name": e.name, "task": e.task, "rank": e.rank, "meta": dict(e.meta or {}),
                 "labels": self.labels_of(e.name)}
                for e in self.experts
            ],
        }

    def labels_of(self, name: str) -> list[str] | None:
        """The class labels of expert ``name``'s head (the shared head ``*`` otherwise)."""
        if self.heads_meta is None:
            return None
        heads = self.heads_meta["heads"]
        entry = heads.get(name, heads.get("*"))
        return None if entry is None else list(entry["labels"])


def save_heads(folder: str | Path, heads: Mapping[str, Head], pooling: str = "mean") -> None:
    """Write classification heads (one per expert name, or ``"*"`` for all) next to a bank.

    Raises:
        ValueError: a head's shapes and labels disagree, or ``pooling`` is unknown.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    tensors: dict[str, Tensor] = {}
    for name, h in heads.items():
        c = len(h.labels)
        if h.weight.dim() != 2 or h.weight.shape[0] != c or tuple(h.bias.shape) != (c,):
            raise ValueError(
                f"head {name!r}: weight {tuple(h.weight.shape)} and bias {tuple(h.bias.shape)} "
                f"do not fit {c} labels"
            )
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = h.weight, h.bias
    digest = atomic_save_tensors(Path(folder) / "heads.safetensors", tensors)
    atomic_write_json(Path(folder) / "heads.json", {
        "format": HEADS_FORMAT, "pooling": pooling, "sha256": digest,
        "heads": {name: {"labels": list(h.labels)} for name, h in heads.items()},
    })


def save_router(folder: str | Path, router: RetrievalRouter) -> None:
    """Write a retrieval router (its config, FAISS index and id -> expert names) to
    ``folder/router``, where ``moe-lora serve`` finds it for ``"auto"`` routing.

    Raises:
        ValueError: the router has no index yet.
    """
    if router.index is None:
        raise ValueError("the router has no index; call index_expert first")
    where = Path(folder) / "router"
    router.index.save(where)
    atomic_write_json(where / "router.json", {
        "format": ROUTER_FORMAT, "router": "retrieval", "config": asdict(router.config),
        "names": {str(k): v for k, v in router.names.items()},
    })
