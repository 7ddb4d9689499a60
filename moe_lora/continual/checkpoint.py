"""Per-task checkpoints of a continual family run, written atomically; resumed exactly.

A family's checkpoint folder holds ``latest.json`` (which task folder is complete) and one
``task<k>/`` folder (``k`` tasks completed)::

    task<k>/state.json          the run's config, completed tasks, accuracy matrices so far,
                                router accuracy, train seconds, FWT baseline, Python RNG state,
                                index names
    task<k>/bank/               the experts (ExpertBank.save)
    task<k>/heads.safetensors   the task heads
    task<k>/rng.safetensors     torch and numpy RNG states
    task<k>/replay/             the replay buffer (when the family keeps one)
    task<k>/index/              the retrieval index (when the family keeps one)
    task<k>/mole.safetensors    the MoLE gates (when the family trains them)

The task folder is written under a temporary name and renamed into place, then ``latest.json`` is
replaced atomically, so a crash at any moment leaves the previous complete checkpoint in charge.
Nothing is pickled. A resume must use the config the checkpoints were made with (up to the keys
in :data:`RESUMABLE_KEYS`, which do not change results); :func:`check_resume_config` names the
keys that differ.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moe_lora.core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

if TYPE_CHECKING:
    from moe_lora.continual.module import TaskHeads
    from moe_lora.continual.settings import RunConfig
    from moe_lora.core.bank import ExpertBank

__all__ = ["FamilyState", "RESUMABLE_KEYS", "check_resume_config", "load_family", "save_family",
           "saved_config"]

RESUMABLE_KEYS = ("output.", "train.progress_bar", "train.threads", "train.loggers",
                  "train.eval_batch_size")
"""Config keys (or key prefixes) a resume may change: they do not change the results."""


@dataclass
class FamilyState:
    """Everything a family run carries from task to task (besides the bank and heads).

    Attributes:
        matrices: strategy -> setting (``agnostic``/``aware``) -> ``R`` as nested lists (nan: not
            evaluated).
        router: strategy -> router accuracy after each task (None where no router decides).
    """

    family: str
    names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    completed: int = 0
    train_seconds: float = 0.0
    baseline: list[float] | None = None
    matrices: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    router: dict[str, list[float | None]] = field(default_factory=dict)
    index_names: dict[int, str] = field(default_factory=dict)
    replay: Any = None
    retrieval: Any = None
    index: Any = None
    mole_router: Any = None

    def matrix(self, name: str, setting: str, n_tasks: int) -> list[list[float]]:
        """``R`` of ``name`` in ``setting`` (created full of nan)."""
        per = self.matrices.setdefault(name, {})
        return per.setdefault(setting, [[float("nan")] * n_tasks for _ in range(n_tasks)])

    def replay_buffer(self, size: int, seed: int, needed: bool) -> Any:
        """The family's replay buffer (restored, new, or None when not needed)."""
        if not needed:
            return None
        if self.replay is None:
            from moe_lora.memory.replay import ReplayBuffer, ReplayConfig

            self.replay = ReplayBuffer(ReplayConfig(capacity=size, balance="class", seed=seed))
        return self.replay

    def retrieval_router(self, bank: ExpertBank, cfg: RunConfig, encoder: Any, dim: int) -> Any:
        """A RetrievalRouter (k=1) over the family's index (restored or new)."""
        from moe_lora.memory.index import ExpertIndex, IndexConfig
        from moe_lora.routers import RetrievalConfig, RetrievalRouter

        rc = cfg.strategies.retrieval
        if self.index is None:
            self.index = ExpertIndex(IndexConfig(dim=dim, mode=rc.mode,  # type: ignore[arg-type]
                                                 n_neighbors=rc.n_neighbors,
                                                 temperature=rc.temperature))
        self.retrieval = RetrievalRouter(
            RetrievalConfig(k=1, prefix="", mode=rc.mode, n_neighbors=rc.n_neighbors,
                            temperature=rc.temperature),
            bank, embedder=encoder, index=self.index, names=self.index_names,
        )
        return self.retrieval


def _rng_tensors() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": torch.tensor([int(np_state[2])], dtype=torch.int64),
    }


def _restore_rng(tensors: dict[str, torch.Tensor], py_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(tensors["numpy_pos"][0]), 0, 0.0))
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


def save_family(folder: Path, state: FamilyState, bank: ExpertBank, heads: TaskHeads) -> Path:
    """Write ``state`` (after ``state.completed`` tasks) atomically; returns the task folder."""
    final = folder / f"task{state.completed}"
    tmp = folder / f".task{state.completed}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if len(bank):
        bank.save(tmp / "bank")
    atomic_save_tensors(tmp / "heads.safetensors", heads.state() or {"empty": torch.zeros(0)})
    atomic_save_tensors(tmp / "rng.safetensors", _rng_tensors())
    if state.replay is not None:
        state.replay.save(tmp / "replay")
    if state.retrieval is not None and state.retrieval.index is not None:
        state.retrieval.index.save(tmp / "index")
    py = random.getstate()
    if state.mole_router is not None:
        atomic_save_tensors(tmp / "mole.safetensors", _gate_tensors(state.mole_router))
    atomic_write_json(tmp / "state.json", {
        "config": state.config,
        "family": state.family, "names": state.names, "completed": state.completed,
        "train_seconds": state.train_seconds, "baseline": state.baseline,
        "matrices": state.matrices, "router": state.router,
        "index_names": {str(k): v for k, v in
                        (state.retrieval.names.items() if state.retrieval else [])},
        "python_rng": [py[0], list(py[1]), py[2]],
    })
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_json(folder / "latest.json", {"completed": state.completed, "dir": final.name})
    for old in folder.glob("task*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_family(folder: Path, bank: ExpertBank, heads: TaskHeads) -> FamilyState | None:
    """Restore the last complete checkpoint into ``bank`` and ``heads`` (None when there is none).

    Every expert and head comes back frozen; the RNG states are restored.
    """
    if not (folder / "latest.json").is_file():
        return None
    where = folder / read_json(folder / "latest.json")["dir"]
    meta = read_json(where / "state.json")
    if (where / "bank").is_dir():
        bank.load_experts(where / "bank")
        bank.freeze()
    heads.load_state(load_tensors(where / "heads.safetensors"))
    state = FamilyState(
        family=meta["family"], names=meta["names"], config=meta["config"],
        completed=meta["completed"],
        train_seconds=meta["train_seconds"], baseline=meta["baseline"],
        matrices=meta["matrices"], router=meta["router"],
        index_names={int(k): v for k, v in meta["index_names"].items()},
    )
    if (where / "replay").is_dir():
        from moe_lora.memory.replay import ReplayBuffer

        state.replay = ReplayBuffer.load(where / "replay")
    if (where / "index").is_dir():
        from moe_lora.memory.index import ExpertIndex

        state.index = ExpertIndex.load(where / "index")
    if (where / "mole.safetensors").is_file():
        state.mole_router = _restore_gates(bank, load_tensors(where / "mole.safetensors"))
    _restore_rng(load_tensors(where / "rng.safetensors"), meta["python_rng"])
    return state


def _gate_tensors(router: Any) -> dict[str, torch.Tensor]:
    """The MoLE gates' tensors, ``<layer path>:<weight|bias|log_tau>`` (block leaders only)."""
    from moe_lora.routers import MoLEGate

    return {f"{path}:{k}": v.detach().clone() for path, gate in router.gates.items()
            if isinstance(gate, MoLEGate) for k, v in gate.state_dict().items()}


def _restore_gates(bank: ExpertBank, tensors: dict[str, torch.Tensor]) -> Any:
    """A frozen MoLE router attached to ``bank`` with the saved gate tensors."""
    from moe_lora.routers import MoLEConfig, MoLERouter

    router = MoLERouter(MoLEConfig(), bank).attach()
    for path, gate in router.gates.items():  # attached gates are sized for the bank's experts
        if f"{path}:weight" in tensors:
            gate.load_state_dict({k: tensors[f"{path}:{k}"] for k in gate.state_dict()})
    for p in router.parameters():
        p.requires_grad_(False)
    return router


def _checkpoint_states(root: Path) -> dict[str, dict[str, Any]]:
    """family -> state.json of its last complete checkpoint under ``root`` (``checkpoints/``)."""
    out = {}
    for latest in sorted(root.glob("*/latest.json")):
        out[latest.parent.name] = read_json(latest.parent / read_json(latest)["dir"] / "state.json")
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def check_resume_config(root: Path, config: dict[str, Any]) -> None:
    """Refuse to resume the checkpoints under ``root`` with a config that changes results.

    Raises:
        ConfigError: names every differing key with both values (keys in
            :data:`RESUMABLE_KEYS` may differ).
    """
    from moe_lora.continual.settings import ConfigError

    now = _flat(config)
    for family, meta in _checkpoint_states(root).items():
        saved = _flat(meta["config"])
        diff = [k for k in sorted(saved.keys() | now.keys())
                if saved.get(k) != now.get(k) and not k.startswith(RESUMABLE_KEYS)]
        if diff:
            what = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                             for k in diff)
            raise ConfigError(f"cannot resume {root / family}: the config differs ({what})")


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run was made with (from its checkpoints).

    Raises:
        FileNotFoundError: ``run_dir`` has no completed checkpoint.
    """
    states = _checkpoint_states(Path(run_dir) / "checkpoints")
    if not states:
        raise FileNotFoundError(f"{run_dir}: no completed checkpoint under checkpoints/")
    return next(iter(states.values()))["config"]
