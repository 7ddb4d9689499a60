"""The continual runner: a task stream through every requested strategy, with metrics,
checkpoints, one progress bar and DDP.

For each strategy (:mod:`moe_lora.continual.strategies`) the runner calls the lifecycle of
:class:`~moe_lora.continual.strategies.base.Strategy` task after task, evaluates every result the
run asked of it on each task's test set (sharded over the processes of a DDP run, counts summed),
and commits a checkpoint after every step. The runner knows no strategy by name.

With ``train.devices > 1`` every process runs this same code; Lightning's DDP averages gradients,
evaluation is sharded and the metrics are summed across processes, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

from moe_lora.continual import registry
from moe_lora.continual.checkpoint import (
    check_resume,
    load_checkpoint,
    save_checkpoint,
    split_state,
)
from moe_lora.continual.console import EpochTicker, RunProgress
from moe_lora.continual.module import MoELoRAModule
from moe_lora.continual.prepared import Examples, feature_layers, loader, prepare_stream
from moe_lora.continual.record import StepMetrics, StrategyRecord
from moe_lora.continual.settings import ConfigError, RunConfig, to_dict
from moe_lora.continual.strategies.base import RunContext, Strategy
from moe_lora.core.bank import ExpertBank
from moe_lora.data import TaskStream, build_stream
from moe_lora.models.backbones import Backbone, EncoderBackbone, MLPBackbone

__all__ = ["ContinualRunner", "OUTPUTS", "build_backbone", "build_loggers", "is_rank_zero",
           "prepare_output", "resolve_device", "run_continual"]

log = logging.getLogger(__name__)

OUTPUTS = ("results.json", "evaluation.json", "strategies.png", "checkpoints", "logs")
"""What a run writes into its output folder (besides ``accuracy_matrix_*`` files)."""


def build_backbone(cfg: RunConfig, stream: TaskStream) -> Backbone:
    """The base model named by ``cfg.model`` as a :class:`Backbone`."""
    m = cfg.model
    if m.name == "mlp":
        first = stream[0].train.inputs
        if not isinstance(first, torch.Tensor):
            raise ConfigError("model.name: 'mlp' needs feature inputs (e.g. split-digits)")
        return MLPBackbone(first.shape[1], m.mlp_hidden, m.mlp_depth, seed=cfg.train.seed)
    from moe_lora.models import load_base

    base = load_base(m.name, task="encoder")
    return EncoderBackbone(base.model, base.tokenizer, m.lora_layers, m.max_length)


def resolve_device(accelerator: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``gpu``/``cuda`` -> CUDA (must exist).

    Raises:
        ConfigError: a GPU was asked for and none is available.
    """
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator: {accelerator!r} asked for, but no CUDA device")
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                                   and torch.cuda.is_available())
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda \
        else torch.device("cpu")


def build_loggers(names: list[str], root: Path, tag: str) -> list[Logger]:
    """Lightning loggers ``names`` (``csv``, ``tensorboard``) for fit ``tag`` (``strategy/task<k>``).

    CSV goes to ``root/<strategy>/task<k>/metrics.csv``, TensorBoard to
    ``root/tensorboard/<strategy>/task<k>/``; ``tensorboard`` is skipped when the package is missing.
    """
    name, version = tag.split("/")[0], tag.split("/")[-1]
    out: list[Logger] = []
    if "csv" in names:
        out.append(CSVLogger(root, name=name, version=version))
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is not None:
        out.append(TensorBoardLogger(root / "tensorboard", name=name, version=version))
    return out


def is_rank_zero() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return _rank_world()[0] == 0


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("LOCAL_RANK", 0)), 1


def _launched_rank(devices: int) -> tuple[int, int]:
    """(rank, world) this process will have in a ``devices``-process run (before DDP starts)."""
    if devices == 1:
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", 0)), devices


class ContinualRunner:
    """Runs ``cfg.strategies.run`` on the configured stream; see the module docstring.

    Args:
        cfg: the run config (see :mod:`moe_lora.continual.settings`).
        resume: continue from the checkpoints in ``cfg.output.dir``.
        progress: show the overall progress bar (rank 0 only).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.resume = cfg, resume
        self.out = Path(cfg.output.dir)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.device = resolve_device(cfg.train.accelerator)
        self.show = progress and cfg.train.progress_bar and is_rank_zero()
        t0 = time.perf_counter()
        self.stream = build_stream(cfg.data.stream())
        backbone = build_backbone(cfg, self.stream)
        targets = backbone.lora_targets(cfg.model.targets)
        bank = ExpertBank(backbone.model, targets=targets, base_id=cfg.model.name)
        layers = feature_layers(cfg.model.feature_layers, backbone)
        if not any("layers" in spec.cls.feature_kinds(registry.options_of(spec, cfg.strategies),
                                                      results)
                   for spec, results in registry.resolve(cfg.strategies.run)):
            layers = 1  # no strategy reads them: the features table is the embeddings' own rows
        tasks, table, features = prepare_stream(self.stream, backbone, bank, progress=self.show,
                                                layers=layers)
        backbone.to(self.device)
        self.ctx = RunContext(cfg, self.stream, backbone, bank, tasks, table, self.fit,
                              self.device, features, layers)
        self.prepare_seconds = time.perf_counter() - t0
        self.digests: dict[str, list[str]] = {}
        self.progress = RunProgress(0, enabled=False)

    # ---------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        """Run every requested strategy; returns the results dict."""
        plan = registry.resolve(self.cfg.strategies.run)
        self.progress = RunProgress(sum(self._units(spec) for spec, _ in plan), self.show)
        entries: dict[str, Any] = {}
        try:
            for spec, results in plan:
                entries |= self.run_strategy(spec, results)
        finally:
            self.progress.close()
        return {
            "benchmark": self.stream.benchmark,
            "config": to_dict(self.cfg),
            "tasks": [t.name for t in self.stream],
            "class_names": self.stream.class_names,
            "task_classes": [list(t.class_ids) for t in self.stream],
            "prepare_seconds": round(self.prepare_seconds, 1),
            "strategies": entries,
            "processes": {"world_size": _rank_world()[1], "state_sha256": self.digests},
        }

    def _units(self, spec: registry.StrategySpec) -> int:
        return spec.cls.steps(self.ctx.n_tasks) * (self.cfg.train.epochs + 1)

    def open_strategy(self, spec: registry.StrategySpec,
                      results: list[str]) -> tuple[Strategy, StrategyRecord]:
        """A strategy and its record: from its last checkpoint when resuming, else fresh."""
        self.ctx.reset_bank()
        strategy = spec.cls(self.ctx, registry.options_of(spec, self.cfg.strategies), results)
        record = None
        if self.resume:
            record = load_checkpoint(self.out / "checkpoints" / spec.name, strategy, self.ctx.bank)
        if record is None:
            strategy.setup()
            record = StrategyRecord(spec.name, results, self.ctx.n_tasks)
        return strategy, record

    def run_strategy(self, spec: registry.StrategySpec, results: list[str]) -> dict[str, Any]:
        """Train and evaluate one strategy step by step (resuming if asked); its entries."""
        strategy, record = self.open_strategy(spec, results)
        n = strategy.n_steps
        self.progress.advance(record.completed * (self.cfg.train.epochs + 1))
        t_start = time.perf_counter()
        for step in range(record.completed, n):
            self.progress.at(spec.name, step + 1, n)
            t0 = time.perf_counter()
            strategy.before_task(step)
            strategy.train_task(step)
            strategy.after_task(step)
            record.train_seconds += time.perf_counter() - t0
            self.progress.detail("evaluating")
            self.evaluate_step(strategy, record, step)
            self.progress.advance()
            record.completed = step + 1
            if is_rank_zero():
                save_checkpoint(self.out / "checkpoints" / spec.name, to_dict(self.cfg),
                                strategy, record, self.ctx.bank)
        self.digests[spec.name] = _gather(_digest(self.ctx.bank, strategy))
        entries = record.entries(spec, strategy.fwt_baseline, strategy.row(n - 1))
        for result, facts in strategy.details().items():
            if result in entries:
                entries[result]["details"] = facts
        self.progress.write(_done_line(spec.name, entries, time.perf_counter() - t_start))
        return entries

    def evaluate_step(self, strategy: Strategy, record: StrategyRecord, step: int) -> None:
        """Fill row ``strategy.row(step)`` of every matrix of ``record``."""
        rank, world = _rank_world()
        row = strategy.row(step)
        task_of_class = torch.zeros(self.ctx.n_classes, dtype=torch.long)
        for pt in self.ctx.tasks:
            task_of_class[pt.task.class_ids] = pt.task.task_id
        metrics = StepMetrics(record.results, self.ctx.n_tasks, task_of_class)
        for j in strategy.eval_tasks(step):
            test = self.ctx.tasks[j].test
            shard = test.select(range(rank, len(test), world))
            for result, pred in strategy.evaluate(step, j, shard).items():
                metrics.update(result, row, j, pred, shard.labels, shard.tasks)
        record.set_row(row, metrics.compute(row))

    # ---------------------------------------------------------------- training
    def fit(self, module: MoELoRAModule, train: Examples, val: Examples, tag: str,
            seed: int) -> None:
        """One Lightning ``fit`` of ``module`` on ``train`` (validated once on ``val``)."""
        t = self.cfg.train
        rank, world = _launched_rank(t.devices * t.num_nodes)
        trainer = L.Trainer(
            use_distributed_sampler=False, max_epochs=t.epochs,
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=t.devices, num_nodes=t.num_nodes, strategy=self._trainer_strategy(),
            precision=t.precision,  # type: ignore[arg-type]
            logger=build_loggers(t.loggers, self.out / "logs", tag),
            callbacks=[EpochTicker(self.progress, t.epochs)],
            enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=10,
            check_val_every_n_epoch=t.epochs,
        )
        trainer.fit(module, loader(train, self.ctx.backbone, t.batch_size, True, seed, rank, world),
                    loader(val, self.ctx.backbone, t.eval_batch_size) if len(val) else None)
        module.to(self.device)  # Lightning's teardown moves the module to the CPU

    def _trainer_strategy(self) -> Any:
        t = self.cfg.train
        if t.strategy not in ("ddp", "ddp_spawn"):
            return t.strategy
        return DDPStrategy(start_method="popen" if t.strategy == "ddp" else "spawn",
                           find_unused_parameters=True,
                           process_group_backend="gloo" if self.device.type == "cpu" else "nccl")


def _done_line(name: str, entries: dict[str, Any], seconds: float) -> str:
    parts = []
    for result, e in entries.items():
        aa = e.get("average_accuracy")
        parts.append(f"{result} AA {aa:.3f}" if aa is not None else result)
    return f"{name}: done in {seconds:.0f} s ({', '.join(parts)})"


def _digest(bank: ExpertBank, strategy: Strategy) -> str:
    """SHA-256 over the bank's expert tensors and every tensor of the strategy's checkpoint
    state (heads, gates, statistics): equal on every rank of a DDP run."""
    h = hashlib.sha256()
    tensors = {f"bank/{name}/{key}": t for name in bank.names
               for key, t in bank.expert_parameters(name).items()}
    tensors |= split_state(strategy.state_dict(), "state")[1]
    for key, t in sorted(tensors.items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gather(value: str) -> list[str]:
    """``value`` from every process (rank order); ``[value]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a folder holding a run needs ``resume`` or
    ``overwrite`` (which deletes only what a run writes).

    Raises:
        ConfigError: the folder holds a run and neither flag is given.
    """
    found = [n for n in OUTPUTS if (out / n).exists()] + [p.name for p in
                                                           out.glob("accuracy_matrix_*")]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"output.dir: {out} already holds a run ({', '.join(found[:4])}"
                          "); pass --resume to continue it or --overwrite to replace it")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_continual(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run a whole continual benchmark and write its results (rank 0); returns the results.

    Raises:
        ConfigError: the output folder holds another run (see :func:`prepare_output`), or a
            resume with a config that changes results.
    """
    from moe_lora.continual.results import write_results

    t0 = time.perf_counter()
    out = Path(cfg.output.dir)
    if is_rank_zero():
        prepare_output(out, resume, overwrite)
    if resume:  # refuse a different config before any model loads
        check_resume(out / "checkpoints", to_dict(cfg))
    if is_rank_zero():  # announced once the folder is accepted: a refusal is one line
        shape = (f"{cfg.data.path} (its own tasks)" if cfg.data.benchmark == "file"
                 else f"{cfg.data.n_tasks} tasks")
        log.info("%s: %s, %s -> %s", cfg.data.benchmark, shape, ", ".join(cfg.strategies.run), out)
    runner = ContinualRunner(cfg, resume=resume, progress=progress)
    results = runner.run()
    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if is_rank_zero():
        write_results(results, out, plots=cfg.output.plots)
    return results
