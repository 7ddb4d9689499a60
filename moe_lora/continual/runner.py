"""The continual runner: a task stream through every strategy, with metrics, checkpoints and DDP.

For each task of the stream: add an expert (per the strategy), freeze the earlier ones, fit with a
Lightning ``Trainer``, index the task's inputs for retrieval, store exemplars in the replay buffer,
then evaluate every task seen so far and fill the accuracy matrix ``R[i][j]``.

Strategies and what they share (a *family* trains once; its strategies differ only at inference):

==================  =========  =============  ==============================================
strategy            family     setting        inference
==================  =========  =============  ==============================================
joint               joint      task-agnostic  one expert trained on all tasks at once (bound)
naive               naive      task-agnostic  one expert trained on task after task
replay              replay     task-agnostic  naive + a class-balanced replay buffer
olora               olora      task-agnostic  an expert per task, O-LoRA loss, all summed
experts-taskid      experts    task-aware     the task id picks the expert (TaskRouter)
experts-retrieval   experts    task-agnostic  RetrievalRouter (LoRARetriever) picks it
experts-confidence  experts    task-agnostic  the expert whose own head is most confident,
                                              times the retrieval prior
experts-mole        experts    task-agnostic  MoLE gates trained on the replay buffer
==================  =========  =============  ==============================================

Shared-head families (naive, replay, olora, joint) also report the task-aware setting (argmax over
the evaluated task's classes) under ``task_aware`` in ``results.json``.

After every task a family's state is checkpointed atomically (see :mod:`moe_lora.continual.checkpoint`);
``resume=True`` continues from the last completed task. With ``train.devices > 1`` every process
runs this same code; Lightning's DDP averages gradients, evaluation is sharded and the metrics are
summed across processes, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from moe_lora.continual.checkpoint import FamilyState, check_resume_config, load_family, save_family
from moe_lora.continual.evaluation import (
    class_mask,
    predict_confidence,
    predict_gated,
    predict_routed,
    predict_shared,
)
from moe_lora.continual.metrics import (
    AccuracyMatrix,
    RouterAccuracy,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)
from moe_lora.continual.module import ModuleConfig, MoELoRAModule, TaskHeads
from moe_lora.continual.prepared import Examples, PreparedTask, loader, prepare_stream
from moe_lora.continual.settings import RunConfig, to_dict
from moe_lora.core.bank import ExpertBank
from moe_lora.core.config import ExpertConfig
from moe_lora.core.routing import RouterInput
from moe_lora.data import (
    DigitsStreamConfig,
    FileStreamConfig,
    TaskStream,
    WordNetStreamConfig,
    build_stream,
)
from moe_lora.models.backbones import Backbone, EncoderBackbone, MLPBackbone

__all__ = ["FAMILY", "SETTING", "ContinualRunner", "LookupEncoder", "build_loggers", "group_families",
           "is_rank_zero", "run_continual"]

log = logging.getLogger(__name__)

FAMILY = {
    "joint": "joint", "naive": "naive", "replay": "replay", "olora": "olora",
    "experts-taskid": "experts", "experts-retrieval": "experts",
    "experts-confidence": "experts", "experts-mole": "experts",
}
SETTING = {name: "task-agnostic" for name in FAMILY} | {"experts-taskid": "task-aware"}


class LookupEncoder:
    """A :class:`moe_lora.routers.retrieval.TextEncoder` over precomputed base embeddings.

    The runner embeds every example once (the frozen base's pooled output, L2-normalised: for
    MiniLM exactly its sentence-transformers embedding) and the retrieval router looks them up by
    key (the text, or an example id for feature inputs). The prefix argument is ignored.
    """

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, texts: Any, prefix: str | None = None) -> np.ndarray:
        return np.stack([self.table[t] for t in texts])


def build_backbone(cfg: RunConfig, stream: TaskStream) -> Backbone:
    """The base model named by ``cfg.model`` as a :class:`Backbone`."""
    m = cfg.model
    if m.name == "mlp":
        first = stream[0].train.inputs
        if not isinstance(first, torch.Tensor):
            raise ValueError("model.name=mlp needs feature inputs (e.g. split-digits)")
        return MLPBackbone(first.shape[1], m.mlp_hidden, m.mlp_depth, seed=cfg.train.seed)
    from moe_lora.models import load_base

    base = load_base(m.name, task="encoder")
    return EncoderBackbone(base.model, base.tokenizer, m.lora_layers, m.max_length)


def stream_config(cfg: RunConfig) -> WordNetStreamConfig | DigitsStreamConfig | FileStreamConfig:
    """The data package's stream config for ``cfg.data``."""
    d = cfg.data
    if d.benchmark == "split-wordnet":
        return WordNetStreamConfig(d.n_tasks, d.classes_per_task, d.min_count, d.train_per_class,
                                   d.val_per_class, d.test_per_class, d.seed)
    if d.benchmark == "split-digits":
        return DigitsStreamConfig(d.n_tasks, d.classes_per_task, seed=d.seed)
    assert d.path is not None
    return FileStreamConfig(d.path, seed=d.seed)


def build_loggers(names: list[str], root: Path, tag: str) -> list[Logger]:
    """Lightning loggers ``names`` (``csv``, ``tensorboard``) for fit ``tag`` (``family/task<k>``).

    CSV goes to ``root/<family>/task<k>/metrics.csv``, TensorBoard to
    ``root/tensorboard/<family>/task<k>/``; ``tensorboard`` is skipped when the package is missing.
    """
    name, version = tag.split("/")[0], tag.split("/")[-1]
    out: list[Logger] = []
    if "csv" in names:
        out.append(CSVLogger(root, name=name, version=version))
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is not None:
        out.append(TensorBoardLogger(root / "tensorboard", name=name, version=version))
    return out


def group_families(strategies: list[str]) -> dict[str, list[str]]:
    """Strategy names grouped by the family that trains them (in order of first appearance)."""
    families: dict[str, list[str]] = {}
    for name in strategies:
        families.setdefault(FAMILY[name], []).append(name)
    return families


def is_rank_zero() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return _rank_world()[0] == 0


def _launched_rank(devices: int) -> tuple[int, int]:
    """(rank, world) this process will have in a ``devices``-process run (before DDP starts).

    Lightning's launcher gives every process ``LOCAL_RANK`` (rank 0 gets it at the first fit,
    after its data loaders are built, hence the default 0).
    """
    if devices == 1:
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", 0)), devices


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("LOCAL_RANK", 0)), 1


class ContinualRunner:
    """Runs ``cfg.strategies.run`` on the configured stream; see the module docstring.

    Args:
        cfg: the run config (see :mod:`moe_lora.continual.settings`).
        resume: continue from the checkpoints in ``cfg.output.dir``.
    """

    def __init__(self, cfg: RunConfig, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.output.dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.stream = build_stream(stream_config(cfg))
        self.backbone = build_backbone(cfg, self.stream)
        targets = self.backbone.lora_targets(cfg.model.targets)
        self.bank = ExpertBank(self.backbone.model, targets=targets, base_id=cfg.model.name)
        t0 = time.perf_counter()
        self.tasks, self.table = prepare_stream(self.stream, self.backbone, self.bank)
        self.prepare_seconds = time.perf_counter() - t0
        self.n_classes = self.stream.n_classes
        self.digests: dict[str, list[str]] = {}
        self.expert_cfg = ExpertConfig(rank=cfg.model.rank, alpha=cfg.model.alpha,
                                       dropout=cfg.model.dropout)

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, Any]:
        """Run every requested family; returns (and on rank 0 writes) the results dict."""
        strategies: dict[str, Any] = {}
        for family, names in group_families(self.cfg.strategies.run).items():
            strategies |= self.run_family(family, names)
        results = {
            "benchmark": self.stream.benchmark,
            "config": to_dict(self.cfg),
            "tasks": [t.name for t in self.stream],
            "prepare_seconds": self.prepare_seconds,
            "strategies": strategies,
            "processes": {"world_size": _rank_world()[1], "state_sha256": self.digests},
        }
        return results

    # ------------------------------------------------------------------ a family
    def _reset(self) -> tuple[MoELoRAModule, TaskHeads]:
        self.bank.detach_gates()
        for name in self.bank.names:
            self.bank.remove_expert(name)
        heads = TaskHeads(self.backbone.dim, self.n_classes)
        t = self.cfg.train
        mcfg = ModuleConfig("classify", t.lr, t.lora_plus_ratio, t.weight_decay, t.aux_coef,
                            self.cfg.strategies.olora.lambda1, self.cfg.strategies.olora.lambda2)
        return MoELoRAModule(self.bank, mcfg, self.backbone, heads), heads

    def open_family(self, family: str, names: list[str]) -> _FamilyContext:
        """A family's context: its last checkpoint when resuming (if there is one), else fresh."""
        module, heads = self._reset()
        ckpt = self.out / "checkpoints" / family
        state = load_family(ckpt, self.bank, heads) if self.resume else None
        if state is None:
            state = FamilyState(family=family, names=names, config=to_dict(self.cfg))
            self._init_family(family, heads, state)
        return _FamilyContext(self, family, names, module, heads, state)

    def run_family(self, family: str, names: list[str]) -> dict[str, Any]:
        """Train a family task by task (resuming if asked) and return its strategies' entries."""
        ctx = self.open_family(family, names)
        state, heads = ctx.state, ctx.heads
        n_tasks = 1 if family == "joint" else len(self.tasks)
        ckpt = self.out / "checkpoints" / family
        for t in range(state.completed, n_tasks):
            log.info("[%s] task %d/%d", family, t + 1, n_tasks)
            t0 = time.perf_counter()
            ctx.learn(t)
            state.train_seconds += time.perf_counter() - t0
            ctx.evaluate(t)
            state.completed = t + 1
            if _rank_world()[0] == 0:
                save_family(ckpt, state, self.bank, heads)
        self.digests[family] = _gather(_digest(self.bank, state))
        return ctx.entries()

    def _init_family(self, family: str, heads: TaskHeads, state: FamilyState) -> None:
        if family == "experts":
            return
        for task in self.tasks:  # one shared head over every class, created up front
            heads.add(task.task.class_ids)
        if family in ("naive", "replay", "joint"):
            self.bank.add_expert("shared", self.expert_cfg, task="all")
        state.baseline = _baseline(self, heads)

    # ------------------------------------------------------------------ training
    def fit(self, module: MoELoRAModule, train: Examples, val: Examples, tag: str,
            seed: int) -> None:
        """One Lightning ``fit`` of ``module`` on ``train`` (validated once on ``val``)."""
        t = self.cfg.train
        strategy: Any = t.strategy
        if t.strategy in ("ddp", "ddp_spawn"):
            strategy = DDPStrategy(
                start_method="popen" if t.strategy == "ddp" else "spawn",
                find_unused_parameters=True, process_group_backend="gloo" if t.accelerator == "cpu" else None,
            )
        rank, world = _launched_rank(t.devices)
        trainer = L.Trainer(
            use_distributed_sampler=False,
            max_epochs=t.epochs,
            accelerator=t.accelerator, devices=t.devices, strategy=strategy,
            logger=build_loggers(t.loggers, self.out / "logs", tag),
            enable_checkpointing=False, enable_progress_bar=t.progress_bar,
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
            check_val_every_n_epoch=t.epochs,
        )
        trainer.fit(module, loader(train, self.backbone, t.batch_size, True, seed, rank, world),
                    loader(val, self.backbone, t.eval_batch_size) if len(val) else None)


def _digest(bank: ExpertBank, state: FamilyState) -> str:
    """SHA-256 over the bank's expert tensors and the retrieval index's keys (rank equality)."""
    h = hashlib.sha256()
    for name in bank.names:
        for key, t in sorted(bank.expert_parameters(name).items()):
            h.update(key.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    if state.index is not None:
        for eid in state.index.expert_ids:
            h.update(np.ascontiguousarray(state.index.keys(eid)).tobytes())
    return h.hexdigest()


def _gather(value: str) -> list[str]:
    """``value`` from every process (rank order); ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def _baseline(runner: ContinualRunner, heads: TaskHeads) -> list[float]:
    """Task-aware accuracy of the untrained model on every task (the FWT baseline ``b_j``)."""
    module = MoELoRAModule(runner.bank, ModuleConfig(), runner.backbone, heads)
    out = []
    for j, pt in enumerate(runner.tasks):
        aware, _ = predict_shared(module, pt.test, class_mask(runner.n_classes, pt.task.class_ids),
                                  class_mask(runner.n_classes, pt.task.class_ids), "base")
        out.append(float((aware == pt.test.labels).double().mean()))
        del j
    return out


class _FamilyContext:
    """What one family run needs between tasks: its module, replay buffer, routers and metrics."""

    def __init__(self, runner: ContinualRunner, family: str, names: list[str],
                 module: MoELoRAModule, heads: TaskHeads, state: FamilyState):
        self.r, self.family, self.names = runner, family, names
        self.module, self.heads, self.state = module, heads, state
        cfg = runner.cfg
        self.bank = runner.bank
        self.nt = len(runner.tasks)
        self.rows: dict[str, dict[str, AccuracyMatrix]] = {}
        needs_replay = family == "replay" or "experts-mole" in names
        self.replay = state.replay_buffer(cfg.strategies.replay.size, cfg.train.seed, needs_replay)
        needs_index = any(n in names for n in ("experts-retrieval", "experts-confidence"))
        self.retrieval = state.retrieval_router(self.bank, cfg, LookupEncoder(runner.table),
                                                self._dim()) if needs_index else None
        self.pool = Examples.concat([pt.train for pt in runner.tasks])
        self.offsets = np.cumsum([0] + [len(pt.train) for pt in runner.tasks]).tolist()

    def _dim(self) -> int:
        return len(next(iter(self.r.table.values())))

    # ------------------------------------------------------------------ learn
    def learn(self, t: int) -> None:
        """Train task ``t`` (all tasks at once for joint) and update memory and gates."""
        m, bank, tasks = self.module, self.bank, self.r.tasks
        m.olora_new, m.olora_previous = None, []
        bank.detach_gates()
        if self.family == "joint":
            train = Examples.concat([pt.train for pt in tasks])
            val = Examples.concat([pt.val for pt in tasks])
            classes = list(range(self.r.n_classes))
        else:
            train, val, classes = tasks[t].train, tasks[t].val, list(tasks[t].task.class_ids)
        if self.family != "experts":  # one shared head over every class keeps training
            for h in range(len(self.heads)):
                self.heads.set_trainable(h, True)
        if self.family in ("naive", "replay", "joint"):
            bank.unfreeze("shared")
            m.train_routing, m.active = "single", 0
            if self.family == "replay" and self.replay is not None and len(self.replay):
                train = Examples.concat([train, self._replayed()])
                classes = sorted(set(classes) | set(self._replayed().labels.tolist()))
        elif self.family == "olora":
            bank.freeze()
            e = bank.add_expert(f"task{t}", self.r.expert_cfg, task=t)
            m.train_routing, m.active = "sum", e
            m.olora_new, m.olora_previous = e, list(range(e))
        else:  # experts
            bank.freeze()
            for h in range(len(self.heads)):
                self.heads.set_trainable(h, False)
            e = bank.add_expert(f"task{t}", self.r.expert_cfg, task=t)
            self.heads.add(tasks[t].task.class_ids)
            m.train_routing, m.active = "single", e
        m.train_classes = class_mask(self.r.n_classes, classes)
        seed = self.r.cfg.train.seed * 1000 + t
        self.r.fit(m, train, val, f"{self.family}/task{t}", seed)
        self._after_task(t)

    def _replayed(self) -> Examples:
        assert self.replay is not None
        ds = self.replay.as_dataset()
        return self.pool.select([int(ds[i]["pos"][0]) for i in range(len(ds))])

    def _after_task(self, t: int) -> None:
        if self.family == "joint":
            return
        pt = self.r.tasks[t]
        if self.replay is not None:
            pos = torch.arange(self.offsets[t], self.offsets[t + 1])[:, None]
            self.replay.add(pt.train.labels, t, pos=pos)
        if self.retrieval is not None:
            keys = pt.train.keys[: self.r.cfg.strategies.retrieval.keys_per_task]
            self.retrieval.index_expert(f"task{t}", keys)
        if "experts-mole" in self.names:
            self.state.mole_router = self._train_mole(t)

    def _train_mole(self, t: int) -> Any:
        from moe_lora.routers import MoLEConfig, MoLERouter

        router = MoLERouter(MoLEConfig(), self.bank).attach()  # gates sized for every expert
        cfg = self.r.cfg
        opt = torch.optim.Adam(router.parameters(), lr=cfg.strategies.mole.lr)
        seen = class_mask(self.r.n_classes, self.r.stream.seen_class_ids(t))
        data = self._replayed()
        for epoch in range(cfg.strategies.mole.epochs):
            for batch in loader(data, self.r.backbone, cfg.train.batch_size, True,
                                seed=cfg.train.seed * 1000 + 100 * t + epoch):
                routing = router.routing(RouterInput(attention_mask=batch.get("attention_mask")))
                logits = self.module.logits(batch, routing).masked_fill(~seen, float("-inf"))
                loss = F.cross_entropy(logits, batch["labels"])
                loss = loss + cfg.train.aux_coef * self.bank.pop_aux_loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
        for p in router.parameters():
            p.requires_grad_(False)
        return router

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, t: int) -> None:
        """Fill row ``t`` of every strategy's accuracy matrices (row T-1 for joint)."""
        row = self.nt - 1 if self.family == "joint" else t
        seen_t = self.nt - 1 if self.family == "joint" else t
        seen = class_mask(self.r.n_classes, self.r.stream.seen_class_ids(seen_t))
        rank, world = _rank_world()
        routers: dict[str, RouterAccuracy] = {n: RouterAccuracy() for n in self.names}
        self.rows = {n: {s: AccuracyMatrix(self.nt) for s in ("agnostic", "aware")}
                     for n in self.names}
        # seen tasks, plus the next one where FWT can use it (task-aware, shared head)
        upto = t + 1 if self.family == "experts" else min(row + 2, self.nt)
        eval_tasks = range(upto)
        for j in eval_tasks:
            pt = self.r.tasks[j]
            test = pt.test.select(range(rank, len(pt.test), world))
            if self.family == "experts":
                self._eval_experts(row, j, pt, test, seen, routers)
            else:
                self._eval_shared(row, j, pt, test, seen)
        for n in self.names:  # compute() sums the counts of every process
            for setting, metric in self.rows[n].items():
                if metric.update_called:
                    self.state.matrix(n, setting, self.nt)[row] = metric.compute()[row].tolist()
            acc = routers[n].compute() if routers[n].update_called else None
            self.state.router.setdefault(n, []).append(None if acc is None else float(acc))

    def _eval_shared(self, row: int, j: int, pt: PreparedTask, test: Examples,
                     seen: torch.Tensor) -> None:
        mode = "sum" if self.family == "olora" else "single"
        task_cls = class_mask(self.r.n_classes, pt.task.class_ids)
        aware, agnostic = predict_shared(self.module, test, task_cls, seen, mode)
        metrics = self.rows[self.names[0]]
        metrics["aware"].update(row, j, aware, test.labels)
        if j <= row:
            metrics["agnostic"].update(row, j, agnostic, test.labels)

    def _expert_classes(self) -> torch.Tensor:
        return torch.stack([class_mask(self.r.n_classes, ids) for ids in self.heads.class_ids])

    def _eval_experts(self, row: int, j: int, pt: PreparedTask, test: Examples,
                      seen: torch.Tensor, routers: dict[str, RouterAccuracy]) -> None:
        from moe_lora.routers import TaskRouter, TaskRouterConfig

        ec = self._expert_classes()
        by_task = TaskRouter(TaskRouterConfig(), self.bank)
        retr = self.retrieval
        for name in self.names:
            if name == "experts-taskid":
                preds, routed = predict_routed(
                    self.module, test,
                    lambda b, k: by_task.routing(RouterInput(task_ids=b["tasks"])), ec)
            elif name == "experts-retrieval":
                assert retr is not None
                preds, routed = predict_routed(
                    self.module, test, lambda b, k: retr.routing(RouterInput(texts=k)), ec)
            elif name == "experts-confidence":
                rc = self.r.cfg.strategies.retrieval
                preds, routed, _ = predict_confidence(self.module, test, ec, self._prior,
                                                      rc.prior_weight)
            else:
                preds, routed = predict_gated(self.module, test, self.state.mole_router, seen)
            self.rows[name]["agnostic"].update(row, j, preds, test.labels)
            routers[name].update(routed, test.tasks)

    def _prior(self, keys: list[str]) -> np.ndarray:
        """Retrieval prior over the bank's experts ``[N, E]`` (vote shares or softmax scores)."""
        assert self.retrieval is not None and self.retrieval.index is not None
        q = np.stack([self.r.table[k] for k in keys])
        n_exp = len(self.bank)
        ids, scores = self.retrieval.index.search(q, n_exp)
        rc = self.r.cfg.strategies.retrieval
        if rc.mode == "centroid":
            scores = np.exp((scores - scores.max(1, keepdims=True)) / rc.temperature)
        out = np.zeros((len(keys), n_exp), dtype=np.float32)
        names = self.retrieval.names
        for i in range(len(keys)):
            for eid, s in zip(ids[i], scores[i], strict=True):
                if eid >= 0:
                    out[i, self.bank.index(names[int(eid)])] = s
        return out / np.clip(out.sum(1, keepdims=True), 1e-12, None)

    # ------------------------------------------------------------------ results
    def entries(self) -> dict[str, Any]:
        """results.json entries of this family's strategies."""
        out = {}
        base = self.state.baseline
        joint = self.family == "joint"
        for name in self.names:
            routed = self.state.router.get(name, [])
            r = torch.tensor(self.state.matrix(name, "agnostic", self.nt), dtype=torch.float64)
            entry = _summary(r, None, joint)  # experts-taskid fills this one matrix, task-aware
            entry |= {"setting": SETTING[name], "router_accuracy": routed[-1] if routed else None,
                      "router_accuracy_per_task": routed,
                      "train_seconds": self.state.train_seconds, "family": self.family}
            if self.family != "experts":
                aware = torch.tensor(self.state.matrix(name, "aware", self.nt), dtype=torch.float64)
                entry["task_aware"] = _summary(aware, base, joint)
            out[name] = entry
        return out


def _summary(r: torch.Tensor, baseline: list[float] | None, joint: bool) -> dict[str, Any]:
    """Matrix (nan as None) and the scalar metrics."""
    if joint:
        last = r[-1:]
        return {"accuracy_matrix": _json_matrix(last), "average_accuracy": float(last.nanmean()),
                "forgetting": 0.0, "bwt": 0.0, "fwt": None}
    return {
        "accuracy_matrix": _json_matrix(r),
        "average_accuracy": average_accuracy(r),
        "forgetting": forgetting(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, baseline),
    }


def _json_matrix(r: torch.Tensor) -> list[list[float | None]]:
    return [[None if v != v else float(v) for v in row] for row in r.tolist()]


def run_continual(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run a whole continual benchmark and write its results (rank 0); returns the results."""
    from moe_lora.continual.results import write_results

    t0 = time.perf_counter()
    if resume:  # refuse a different config before any model loads
        check_resume_config(Path(cfg.output.dir) / "checkpoints", to_dict(cfg))
    runner = ContinualRunner(cfg, resume=resume)
    results = runner.run()
    results["wall_seconds"] = time.perf_counter() - t0
    if is_rank_zero():
        write_results(results, Path(cfg.output.dir), plots=cfg.output.plots)
    return results
