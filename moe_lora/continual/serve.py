"""A finished run served: requests answered by a strategy's own evaluation code.

:class:`RunPredictor` loads one strategy's last checkpoint (without preparing the stream) and
answers texts with :meth:`Strategy.evaluate`, the code path of ``moe-lora evaluate``: a row that
names its expert or task goes through the strategy's task-aware result (``experts-taskid``), any
other row through its task-agnostic result (``--result``, default: the run's best task-agnostic
result of that strategy by average accuracy in results.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_lora.continual import registry
from moe_lora.continual.checkpoint import load_checkpoint
from moe_lora.continual.prepared import Examples, feature_layers, frozen_tables
from moe_lora.continual.runner import build_backbone, resolve_device
from moe_lora.continual.saved import run_config
from moe_lora.continual.strategies.base import Prediction, RunContext
from moe_lora.core.bank import ExpertBank
from moe_lora.core.io import read_json
from moe_lora.data import build_stream

__all__ = ["EMBED_CACHE_ROWS", "RunPredictor", "describe_run", "serve_choice"]

EMBED_CACHE_ROWS = 100_000
"""Most served inputs whose frozen embeddings and features :class:`RunPredictor` keeps."""


def _no_fit(*args: Any) -> None:
    raise RuntimeError("a served run does not train")


def serve_choice(run_dir: Path, result: str | None) -> tuple[registry.StrategySpec, list[str]]:
    """The strategy to serve and its results: ``result`` (or the best task-agnostic one in
    results.json) plus the same strategy's task-aware result, if it has one.

    Raises:
        ValueError: ``result`` is not a result of the run.
    """
    cfg = run_config(run_dir)
    plan = {r: spec for spec, rs in registry.resolve(cfg.strategies.run) for r in rs}
    if result is None:
        entries = read_json(run_dir / "results.json")["strategies"] \
            if (run_dir / "results.json").is_file() else {}
        agnostic = [r for r, s in plan.items() if s.setting_of(r) == "task-agnostic"
                    and len(s.result_names()) > 1]
        result = max(agnostic, key=lambda r: entries.get(r, {}).get("average_accuracy") or 0.0,
                     default=None)
    if result not in plan:
        raise ValueError(f"{run_dir}: no servable result {result!r}; the run has {sorted(plan)}")
    spec = plan[result]
    aware = [r for r in spec.result_names() if spec.setting_of(r) == "task-aware" and r in plan]
    return spec, [result, *aware]


class RunPredictor:
    """Answers ``/predict`` for the run in ``run_dir`` (implements
    :class:`moe_lora.serving.Predictor`).

    Args:
        run_dir: a finished (or resumable) run's output folder.
        result: the task-agnostic result that routes ``"auto"`` rows (see :func:`serve_choice`).
        device: ``cpu``, ``cuda`` or ``auto``.
    """

    def __init__(self, run_dir: str | Path, result: str | None = None, device: str = "cpu"):
        run_dir = Path(run_dir)
        spec, results = serve_choice(run_dir, result)
        cfg = run_config(run_dir)
        self.device = resolve_device(device)
        stream = build_stream(cfg.data.stream())
        backbone = build_backbone(cfg, stream)
        bank = ExpertBank(backbone.model, targets=backbone.lora_targets(cfg.model.targets),
                          base_id=cfg.model.name)
        self.ctx = RunContext(cfg, stream, backbone, bank, [], {}, _no_fit, self.device, {},
                              feature_layers(cfg.model.feature_layers, backbone))
        self.strategy = spec.cls(self.ctx, registry.options_of(spec, cfg.strategies), results)
        record = load_checkpoint(run_dir / "checkpoints" / spec.name, self.strategy, bank)
        if record is None or record.completed == 0:
            raise FileNotFoundError(f"{run_dir}: strategy {spec.name!r} has no completed step")
        backbone.to(self.device)
        self.step = self.strategy.row(record.completed - 1)
        self.auto, self.aware = results[0], (results[1] if len(results) > 1 else None)
        self.class_names = stream.class_names

    @property
    def bank(self) -> ExpertBank:
        """The served experts."""
        return self.ctx.bank

    @torch.no_grad()
    def _examples(self, texts: list[str], tasks: list[int]) -> Examples:
        states = self.ctx.backbone.prefix(texts)
        ex = Examples(states, torch.zeros(len(texts), dtype=torch.long),
                      torch.tensor(tasks, dtype=torch.long), list(texts))
        emb, feat = frozen_tables(ex, self.ctx.backbone, self.ctx.bank, self.ctx.feature_layers)
        if len(self.ctx.embeddings) > EMBED_CACHE_ROWS:  # a long-running server: stay bounded
            self.ctx.embeddings.clear()
            self.ctx.features.clear()
        self.ctx.embeddings.update(emb)
        self.ctx.features.update(feat)
        return ex

    def predict(self, texts: Sequence[str], experts: Sequence[str | None],
                tasks: Sequence[Any]) -> list[dict[str, Any]]:
        """One answer per text; rows naming an expert or a task (1-based) are task-aware."""
        task_ids = [self.bank.index(e) if e is not None else (int(t) - 1 if t is not None else -1)
                    for e, t in zip(experts, tasks, strict=True)]
        out: list[dict[str, Any]] = [{} for _ in texts]
        for result, rows in ((self.aware, [i for i, t in enumerate(task_ids) if t >= 0]),
                             (self.auto, [i for i, t in enumerate(task_ids) if t < 0])):
            if not rows:
                continue
            if result is None:
                for i in rows:
                    out[i] = {"error": "this run has no task-aware result", "status": 422}
                continue
            ex = self._examples([texts[i] for i in rows], [max(task_ids[i], 0) for i in rows])
            pred = self.strategy.evaluate(self.step, 0, ex)[result]
            for k, i in enumerate(rows):
                out[i] = self._answer(pred, k, result)
        return out

    def _answer(self, pred: Prediction, k: int, result: str) -> dict[str, Any]:
        label = self.class_names[int(pred.classes[k])]
        answer: dict[str, Any] = {"label": label, "result": result, "scores": None}
        if pred.task_weights is not None:
            w = pred.task_weights[k].cpu().numpy()
            order = np.argsort(-w)
            kept = [int(e) for e in order if w[e] > 0]
            answer["experts"] = [self.bank.names[e] for e in kept]
            answer["weights"] = [round(float(w[e]), 6) for e in kept]
        return answer


def describe_run(run_dir: str | Path, result: str | None = None) -> dict[str, Any]:
    """What serving a run offers, from its JSON files only (no model, no tensors).

    Returns:
        ``{"base", "result", "aware", "experts": [{"name", "task" (1-based), "rank",
        "labels"}]}``.

    Raises:
        FileNotFoundError: the run has no results.json or no checkpoint of the served strategy.
    """
    from moe_lora.core.commit import read_version
    from moe_lora.core.storage import read_manifest

    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no results.json (a finished continual run)")
    spec, results = serve_choice(run_dir, result)
    meta = read_json(run_dir / "results.json")
    names, per_task = meta["class_names"], meta["task_classes"]
    with read_version(run_dir / "checkpoints" / spec.name) as where:
        manifest = read_manifest(where / "bank")
    experts = [{"name": e["name"], "task": e["task"] + 1, "rank": e["config"]["rank"],
                "labels": [names[c] for c in per_task[e["task"]]]} for e in manifest["experts"]]
    return {"base": meta["config"]["model"]["name"], "result": results[0],
            "aware": results[1] if len(results) > 1 else None, "experts": experts}
