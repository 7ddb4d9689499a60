"""Per-step checkpoints of a strategy, written atomically; a resume continues exactly.

A strategy's checkpoint folder (``checkpoints/<strategy>/``) holds its last completed step::

    state.json            the run config, the strategy's record (matrices, progress), the JSON
                          part of Strategy.state_dict(), the Python RNG state
    tensors.safetensors   the tensor part of Strategy.state_dict() (heads, gates, statistics)
                          and the torch / numpy RNG states
    bank/                 the bank's experts (ExpertBank.save)
    ...                   the strategy's own artefacts (replay/, index/), Strategy.save_artifacts

The whole folder is one version written through :func:`moe_lora.core.commit.write_version`, so a
crash at any moment leaves the previous complete checkpoint in charge and every file is checksummed.
Nothing is pickled. A resume must use the config the checkpoint was made with, up to the keys that
do not change results (:func:`config_change`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_lora.continual.record import StrategyRecord
from moe_lora.continual.settings import ConfigError
from moe_lora.continual.strategies.base import Strategy
from moe_lora.core.bank import ExpertBank
from moe_lora.core.commit import is_committed, read_version, write_version
from moe_lora.core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json

__all__ = ["RESUMABLE_KEYS", "checkpoint_progress", "config_change", "load_checkpoint",
           "save_checkpoint", "saved_config", "split_state"]

RESUMABLE_KEYS = ("output.", "train.progress_bar", "train.threads", "train.loggers",
                  "train.eval_batch_size", "strategies.run")
"""Config keys (or prefixes) a resume may change: they do not change any result."""


def split_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON tree with ``{"$tensor": key}`` in place of tensors, the tensors by key)."""
    if isinstance(state, torch.Tensor):
        return {"$tensor": prefix}, {prefix: state.detach().cpu().contiguous()}
    if isinstance(state, dict):
        tree, tensors = {}, {}
        for k, v in state.items():
            tree[k], sub = split_state(v, f"{prefix}/{k}" if prefix else str(k))
            tensors |= sub
        return tree, tensors
    return state, {}


def _join_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict) and set(tree) == {"$tensor"}:
        return tensors[tree["$tensor"]]
    if isinstance(tree, dict):
        return {k: _join_state(v, tensors) for k, v in tree.items()}
    return tree


def _rng_state() -> tuple[dict[str, torch.Tensor], list[Any]]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "rng/torch": torch.get_rng_state(),
        "rng/numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "rng/numpy_pos": torch.tensor([int(np_state[2])], dtype=torch.int64),
    }, [py[0], list(py[1]), py[2]]


def _restore_rng(tensors: dict[str, torch.Tensor], py_state: list[Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    keys = tensors["rng/numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(tensors["rng/numpy_pos"][0]), 0, 0.0))
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


def save_checkpoint(folder: Path, config: dict[str, Any], strategy: Strategy,
                    record: StrategyRecord, bank: ExpertBank) -> Path:
    """Commit the strategy's state after ``record.completed`` steps; returns the version folder."""

    def write(tmp: Path) -> None:
        tree, tensors = split_state(strategy.state_dict(), "state")
        rng, py = _rng_state()
        atomic_save_tensors(tmp / "tensors.safetensors", tensors | rng)
        if len(bank):
            bank.save(tmp / "bank")
        strategy.save_artifacts(tmp)
        atomic_write_json(tmp / "state.json", {
            "config": config, "record": record.to_json(), "state": tree, "python_rng": py})

    return write_version(folder, write)


def load_checkpoint(folder: Path, strategy: Strategy, bank: ExpertBank) -> StrategyRecord | None:
    """Restore the last committed checkpoint into ``strategy`` and ``bank`` (None: none yet).

    Every expert comes back frozen; the RNG states are restored.

    Raises:
        CorruptFileError: a file fails its checksum. FileNotFoundError: an artefact is missing.
    """
    if not is_committed(folder):
        return None
    with read_version(folder) as where:
        meta = read_json(where / "state.json")
        tensors = load_tensors(where / "tensors.safetensors")
        if (where / "bank").is_dir():
            bank.load_experts(where / "bank")
            bank.freeze()
        strategy.load_state_dict(_join_state(meta["state"], tensors))
        strategy.load_artifacts(where)
    _restore_rng(tensors, meta["python_rng"])
    return StrategyRecord.from_json(meta["record"])


@contextmanager
def _saved_states(root: Path) -> Iterator[dict[str, dict[str, Any]]]:
    out = {}
    for folder in sorted(p for p in root.glob("*") if p.is_dir()):
        if is_committed(folder):
            with read_version(folder) as where:
                out[folder.name] = read_json(where / "state.json")
    yield out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def config_change(saved: dict[str, Any], now: dict[str, Any], strategy: str) -> list[str]:
    """Keys whose change alters ``strategy``'s results (other strategies' sections do not)."""
    a, b = _flat(saved), _flat(now)
    own = f"strategies.{strategy}."
    return [k for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_KEYS)
            and (not k.startswith("strategies.") or k.startswith(own))]


def check_resume(root: Path, config: dict[str, Any]) -> None:
    """Refuse to resume the checkpoints under ``root`` with a config that changes their results.

    Raises:
        ConfigError: names every differing key with both values.
    """
    with _saved_states(root) as states:
        for strategy, meta in states.items():
            diff = config_change(meta["config"], config, strategy)
            if diff:
                a, b = _flat(meta["config"]), _flat(config)
                what = ", ".join(f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
                                 for k in diff)
                raise ConfigError(f"cannot resume {root / strategy}: the config differs ({what})")


def checkpoint_progress(root: Path) -> dict[str, int]:
    """Steps completed by each strategy with a committed checkpoint under ``root``
    (``<run>/checkpoints``; every file checked against its manifest).

    Raises:
        CorruptFileError: a checkpoint file fails its checksum.
    """
    with _saved_states(Path(root)) as states:
        return {name: int(meta["record"]["completed"]) for name, meta in states.items()}


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run was made with (from its checkpoints).

    Raises:
        FileNotFoundError: ``run_dir`` has no completed checkpoint.
    """
    with _saved_states(Path(run_dir) / "checkpoints") as states:
        if not states:
            raise FileNotFoundError(f"{run_dir}: no completed checkpoint under checkpoints/")
        return next(iter(states.values()))["config"]
