"""A finished run read back for use: its config, a strategy's bank, heads and key index.

``moe-lora route``, ``export`` and the server use this; no data is cached and no stream is
prepared (only the base model is loaded), so it starts in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_lora.continual import registry
from moe_lora.continual.checkpoint import saved_config
from moe_lora.continual.module import TaskHeads
from moe_lora.continual.record import StrategyRecord
from moe_lora.continual.runner import ContinualRunner, build_backbone
from moe_lora.continual.settings import RunConfig, config_from_dict
from moe_lora.continual.strategies.keys import KeyIndex
from moe_lora.core.bank import ExpertBank
from moe_lora.core.commit import is_committed, read_version
from moe_lora.core.io import load_tensors
from moe_lora.data import build_stream
from moe_lora.memory.index import ExpertIndex
from moe_lora.models.backbones import Backbone

__all__ = ["SavedRun", "evaluate_run", "open_saved", "run_config"]


def run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The config saved in a run's checkpoints, writing into ``run_dir``, without progress bar."""
    return config_from_dict(saved_config(run_dir),
                            [f"output.dir={run_dir}", "train.progress_bar=false",
                             *(overrides or [])])


@dataclass
class SavedRun:
    """One strategy of a finished run, loaded.

    Attributes:
        cfg: the run config. strategy: the strategy's name. backbone: the base model.
        bank: its experts (frozen). heads: its task heads. keys: the retrieval key index
        (None when the run kept none). class_names, task_names: the stream's.
    """

    cfg: RunConfig
    strategy: str
    backbone: Backbone
    bank: ExpertBank
    heads: TaskHeads
    keys: KeyIndex | None
    class_names: list[str]
    task_names: list[str]

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        """``[N, D]`` L2-normalised frozen base embeddings of ``texts`` (the retrieval keys' space)."""
        states = self.backbone.prefix(list(texts))
        with self.bank.use(None):
            feats = self.backbone(self.backbone.collate(states))
        return F.normalize(feats, dim=-1).cpu().numpy()

    def route(self, texts: list[str]) -> list[dict[str, Any]]:
        """Per text: every indexed expert with its weight (the key index's vote), best first.

        Raises:
            ValueError: the run kept no key index (it ran no retrieval-based result).
        """
        if self.keys is None:
            raise ValueError(f"{self.cfg.output.dir}: strategy {self.strategy!r} kept no key index "
                             "(run experts-retrieval or experts-confidence)")
        weights = self.keys.weights(self.embed(texts), len(self.bank)).tolist()
        rows = []
        for text, w in zip(texts, weights, strict=True):
            experts = [{"expert": self.bank.names[e], "task": e + 1,
                        "task_name": self.task_names[e], "weight": round(v, 6)}
                       for e, v in sorted(enumerate(w), key=lambda kv: -kv[1])]
            rows.append({"text": text, "chosen": experts[0], "experts": experts})
        return rows


def open_saved(run_dir: str | Path, strategy: str = "experts") -> SavedRun:
    """Load ``strategy``'s last checkpoint of the run in ``run_dir``.

    Raises:
        FileNotFoundError: no such run, strategy or checkpoint. CorruptFileError: a file fails
            its checksum.
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    folder = run_dir / "checkpoints" / strategy
    if not is_committed(folder):
        raise FileNotFoundError(f"{folder}: no completed checkpoint of strategy {strategy!r}")
    stream = build_stream(cfg.data.stream())
    backbone = build_backbone(cfg, stream)
    bank = ExpertBank(backbone.model, targets=backbone.lora_targets(cfg.model.targets),
                      base_id=cfg.model.name)
    heads = TaskHeads(backbone.dim, stream.n_classes)
    keys = None
    with read_version(folder) as where:
        if (where / "bank").is_dir():
            bank.load_experts(where / "bank")
            bank.freeze()
        heads.load_state(_heads(load_tensors(where / "tensors.safetensors")))
        if (where / "index").is_dir():
            keys = KeyIndex(_retrieval_options(cfg, strategy), {}, dim=backbone.dim)
            keys.index = ExpertIndex.load(where / "index")
    return SavedRun(cfg, strategy, backbone, bank, heads, keys, stream.class_names,
                    [t.name for t in stream])


def _heads(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state/heads/"): v for k, v in tensors.items()
            if k.startswith("state/heads/")}


def _retrieval_options(cfg: RunConfig, strategy: str) -> Any:
    return getattr(cfg.strategies, strategy).retrieval



def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Re-predict every result of the run in ``run_dir`` from its strategies' last checkpoints on
    every seen task's test set, through the runner's own evaluation path.

    Returns:
        ``{"run_dir", "benchmark", "tasks", "strategies": {RESULT: {"setting", "accuracy"
        (per task), "average_accuracy", "tp", "completed_tasks", "task_aware"?}}}``.

    Raises:
        FileNotFoundError: a strategy of the run has no completed checkpoint.
    """
    run_dir = Path(run_dir)
    runner = ContinualRunner(run_config(run_dir), resume=True, progress=False)
    out: dict[str, Any] = {}
    for spec, results in registry.resolve(runner.cfg.strategies.run):
        strategy, saved = runner.open_strategy(spec, results)
        if saved.completed == 0:
            raise FileNotFoundError(f"{run_dir / 'checkpoints' / spec.name}: no completed task")
        fresh = StrategyRecord(spec.name, results, saved.n_tasks)
        step = saved.completed - 1
        runner.evaluate_step(strategy, fresh, step)
        for result, entry in fresh.entries(spec, None, strategy.row(step)).items():
            out[result] = _evaluation_entry(entry, fresh.matrices.get(result, {}),
                                            strategy.row(step), saved.completed)
    return {"run_dir": str(run_dir), "benchmark": runner.stream.benchmark,
            "tasks": [t.name for t in runner.stream], "strategies": out}


def _evaluation_entry(entry: dict[str, Any], raw: dict[str, list[list[float]]], row: int,
                      completed: int) -> dict[str, Any]:
    def per_task(x: dict[str, Any], measure: str) -> dict[str, Any]:
        # the mean of the unrounded accuracies over the seen tasks, rounded like results.json
        seen = [a for a in raw[measure][row][: row + 1] if a == a]
        return {"accuracy": x["accuracy_matrix"][row],
                "average_accuracy": round(sum(seen) / len(seen), 4) if seen else None}

    out = {"setting": entry["setting"], "completed_tasks": completed, "tp": entry.get("tp"),
           **per_task(entry, "accuracy")}
    if "task_aware" in entry:
        out["task_aware"] = per_task(entry["task_aware"], "task_aware")
    return out
