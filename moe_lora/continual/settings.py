"""Typed configuration of a continual run, loaded from YAML through OmegaConf structured configs.

A YAML file maps onto :class:`RunConfig` (sections ``model``, ``data``, ``train``, ``strategies``,
``output``) plus an optional ``profiles:`` block of named partial overrides (``--profile quick``).
``strategies`` holds ``run`` (the result names to produce) and one section per registered strategy,
typed by that strategy's own options dataclass (:mod:`moe_lora.continual.registry`).
:func:`load_config` merges, in order: the dataclass defaults, the YAML, the chosen profile, then
``key=value`` overrides from the command line. An unknown key, a wrong type or a value out of range
fails there, before any model or data is loaded, with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_lora.continual import registry
from moe_lora.data import DigitsStreamConfig, FileStreamConfig, WordNetStreamConfig
from moe_lora.data.files import ORDERS
from moe_lora.models.loading import check_model_name

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "RunConfig",
    "StrategiesConfig",
    "TrainConfig",
    "check",
    "check_finite",
    "config_from_dict",
    "load_config",
    "to_dict",
]

BENCHMARKS = ("split-wordnet", "split-digits", "file")
LOGGERS = ("csv", "tensorboard")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed")
TRAINER_STRATEGIES = ("auto", "ddp", "ddp_spawn")
DEFAULT_RUN = ("joint", "naive", "replay", "olora", "ncm", "ranpac", "experts-taskid",
               "experts-retrieval", "experts-confidence", "experts-mole", "experts-stats")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value (names the key)."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``"<key>: <msg>"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def check_finite(obj: Any, section: str) -> None:
    """Every float field of dataclass ``obj`` is finite (names the first that is not).

    Raises:
        ConfigError: ``<section>.<field>: must be finite, got nan``.
    """
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float):
            check(math.isfinite(v), f"{section}.{f.name}", f"must be finite, got {v}")


@dataclass
class ModelConfig:
    """The frozen base model and the experts' shape.

    Attributes:
        name: ``"minilm"``, ``"mlp"`` (a small random frozen MLP for feature inputs), or any name
            :func:`moe_lora.models.load_base` accepts (an encoder).
        lora_layers: LoRA goes into the top ``lora_layers`` transformer blocks only (0: all blocks).
            The frozen blocks below are run once per dataset and their outputs cached.
        targets: module names inside a block that carry LoRA; empty means the model's defaults.
        rank, alpha, dropout: every expert's LoRA hyper-parameters.
        max_length: tokens kept per text (texts are padded per batch, not to this length).
        mlp_hidden, mlp_depth: width and number of hidden layers of the ``mlp`` base.
        feature_layers: the multi-layer frozen features that statistics routers may use (their
            ``features: layers`` option): the mean-pooled outputs of the last ``feature_layers``
            frozen layers, each L2-normalised, concatenated. Only the cached state and the blocks
            above it can be tapped (no extra forward pass): at most ``lora_layers + 1``. ``0``:
            ``min(3, lora_layers + 1)`` for an encoder, 1 (the embedding) for the ``mlp``.
    """

    name: str = "minilm"
    lora_layers: int = 2
    targets: list[str] = field(default_factory=list)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    max_length: int = 64
    mlp_hidden: int = 128
    mlp_depth: int = 2
    feature_layers: int = 0

    def __post_init__(self) -> None:
        check_finite(self, "model")
        check(bool(self.name.strip()), "model.name", "must not be empty")
        if self.name != "mlp":
            try:
                check_model_name(self.name)
            except ValueError as err:
                raise ConfigError(f"model.name: {err}") from err
        check(self.lora_layers >= 0, "model.lora_layers", "must be >= 0")
        check(self.rank >= 1, "model.rank", "must be >= 1")
        check(self.alpha > 0, "model.alpha", "must be > 0")
        check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        check(self.max_length >= 4, "model.max_length", "must be >= 4")
        check(self.mlp_hidden >= 1, "model.mlp_hidden", "must be >= 1")
        check(self.mlp_depth >= 1, "model.mlp_depth", "must be >= 1")
        check(self.feature_layers >= 0, "model.feature_layers", "must be >= 0 (0: automatic)")


@dataclass
class DataConfig:
    """The task stream (see :mod:`moe_lora.data`).

    Attributes:
        benchmark: ``split-wordnet``, ``split-digits`` or ``file`` (a JSONL/CSV at ``path``).
        path: the data file for ``file``.
        n_tasks, classes_per_task: stream shape (WordNet and digits; a file brings its own).
        train_per_class, val_per_class, test_per_class, min_count: WordNet split sizes.
        seed: fixes the drawn classes and splits.
        max_text_length: ``file``: the longest text, label or task accepted, in characters (a
            longer one is refused naming the file and line).
        order: ``file``: ``appearance`` (tasks and classes in the file's order) or ``sorted``
            (task and class names sorted: no reordering of the file's rows changes a result).
            Rows within a task are always put in a canonical order (a hash of their content).
        val_from_train: ``file``: a task with train and test rows but no val gets 10 % of each
            class's training rows as validation (knobs are chosen there, never on test).
    """

    benchmark: str = "split-wordnet"
    path: str | None = None
    n_tasks: int = 5
    classes_per_task: int = 5
    train_per_class: int = 200
    val_per_class: int = 50
    test_per_class: int = 100
    min_count: int = 500
    seed: int = 0
    max_text_length: int = 100_000
    order: str = "appearance"
    val_from_train: bool = True

    def __post_init__(self) -> None:
        check(self.max_text_length >= 1, "data.max_text_length", "must be >= 1")
        check(self.order in ORDERS, "data.order", f"must be one of {', '.join(ORDERS)}")
        check(self.benchmark in BENCHMARKS, "data.benchmark", f"must be one of {BENCHMARKS}")
        check(self.benchmark != "file" or bool(self.path), "data.path", "is required for 'file'")
        check(self.benchmark != "file" or Path(str(self.path)).is_file(), "data.path",
              f"data file {self.path!r} not found")
        for key in ("n_tasks", "classes_per_task", "train_per_class", "test_per_class"):
            check(getattr(self, key) >= 1, f"data.{key}", "must be >= 1")
        check(self.val_per_class >= 0, "data.val_per_class", "must be >= 0")
        check(self.min_count >= 1, "data.min_count", "must be >= 1")
        try:
            self.stream()
        except ValueError as err:
            raise ConfigError(f"data: {err}") from err

    def stream(self) -> WordNetStreamConfig | DigitsStreamConfig | FileStreamConfig:
        """The data package's config of this stream (its own checks run on construction)."""
        if self.benchmark == "split-wordnet":
            return WordNetStreamConfig(
                n_tasks=self.n_tasks, classes_per_task=self.classes_per_task,
                min_count=self.min_count, train_per_class=self.train_per_class,
                val_per_class=self.val_per_class, test_per_class=self.test_per_class,
                seed=self.seed)
        if self.benchmark == "split-digits":
            return DigitsStreamConfig(n_tasks=self.n_tasks,
                                      classes_per_task=self.classes_per_task, seed=self.seed)
        return FileStreamConfig(str(self.path), seed=self.seed,
                                max_text_length=self.max_text_length, order=self.order,
                                val_from_train=self.val_from_train)


@dataclass
class TrainConfig:
    """Optimisation and execution (one source of truth: the Lightning module reads this object).

    Attributes:
        epochs: epochs per task (the joint strategy trains this many epochs on all tasks at once).
        batch_size: global training batch size (each of N processes takes 1/N of every batch).
        lr: learning rate of the LoRA ``A`` factors and the heads.
        lora_plus_ratio: LoRA+ (arXiv 2402.12354): ``B``'s learning rate is ``ratio * lr``.
        weight_decay: AdamW weight decay (>= 0).
        aux_coef: weight of routers' auxiliary losses.
        seed: global seed.
        threads: torch intra-op threads (0 leaves torch's default).
        accelerator: ``auto`` (a GPU when present), ``cpu``, ``gpu``/``cuda``.
        devices: processes per node (``ddp``/``ddp_spawn`` for several; gloo on CPU, NCCL on GPUs).
        num_nodes: machines (Lightning's multi-node launch).
        strategy: ``auto``, ``ddp`` or ``ddp_spawn``, passed to ``lightning.Trainer``.
        precision: ``32``, ``bf16-mixed`` or ``16-mixed``.
        progress_bar: show progress (the run's overall bar; Lightning's own with ``--verbose``).
        eval_batch_size: batch size of evaluation passes.
        loggers: Lightning loggers of every fit, under ``output.dir/logs``: ``csv`` and/or
            ``tensorboard`` (used only when the ``tensorboard`` package is importable).
        on_nonfinite: a non-finite loss or gradient ``stop``s the run with an error naming the
            strategy, task and step (the last completed task's checkpoint stays), or the batch is
            skipped (``skip_batch``).
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    lora_plus_ratio: float = 4.0
    weight_decay: float = 0.0
    aux_coef: float = 0.01
    seed: int = 0
    threads: int = 2
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32"
    progress_bar: bool = True
    eval_batch_size: int = 256
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    on_nonfinite: str = "stop"

    def __post_init__(self) -> None:
        check_finite(self, "train")
        bad = [x for x in self.loggers if x not in LOGGERS]
        check(not bad, "train.loggers", f"unknown {bad}; choose from {list(LOGGERS)}")
        for key in ("epochs", "batch_size", "devices", "num_nodes", "eval_batch_size"):
            check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.lora_plus_ratio > 0, "train.lora_plus_ratio", "must be > 0")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.aux_coef >= 0, "train.aux_coef", "must be >= 0")
        check(self.threads >= 0, "train.threads", "must be >= 0")
        check(self.accelerator in ACCELERATORS, "train.accelerator",
              f"must be one of {ACCELERATORS}")
        check(self.strategy in TRAINER_STRATEGIES, "train.strategy",
              f"must be one of {TRAINER_STRATEGIES}")
        check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        check(self.on_nonfinite in ("stop", "skip_batch"), "train.on_nonfinite",
              "must be 'stop' or 'skip_batch'")
        check(self.devices * self.num_nodes == 1 or self.strategy != "auto", "train.strategy",
              "must be 'ddp' or 'ddp_spawn' when train.devices * train.num_nodes > 1")


@dataclass
class StrategiesConfig:
    """Which results to produce (``run``); :func:`load_config` adds one typed section per
    registered strategy (``strategies.replay.size``, ``strategies.experts.mole.epochs``, ...)."""

    run: list[str] = field(default_factory=lambda: list(DEFAULT_RUN))

    def __post_init__(self) -> None:
        check(bool(self.run), "strategies.run", "must name at least one strategy")
        known = registry.result_names()
        bad = [s for s in self.run if s not in known]
        check(not bad, "strategies.run", f"unknown {bad}; choose from {known}")
        dup = sorted({s for s in self.run if self.run.count(s) > 1})
        check(not dup, "strategies.run", f"names {dup} more than once")


@dataclass
class OutputConfig:
    """Where results go: ``dir`` (results.json, CSVs, PNGs, logs, checkpoints)."""

    dir: str = "runs/continual"
    plots: bool = True


@dataclass
class RunConfig:
    """A whole continual run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategies: StrategiesConfig = field(default_factory=StrategiesConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        check(self.model.name != "mlp" or self.data.benchmark == "split-digits", "model.name",
              "'mlp' takes feature vectors: use it with data.benchmark=split-digits")


def _schema() -> Any:
    """The structured-config schema: :class:`RunConfig` whose ``strategies`` has a typed section
    per registered strategy (built from the registry, so a new strategy needs no edit here)."""
    sections = [(spec.name, spec.options, field(default_factory=spec.options))
                for spec in registry.specs() if spec.options is not None]
    strategies = make_dataclass("StrategiesConfig", sections, bases=(StrategiesConfig,))
    return OmegaConf.structured(RunConfig(strategies=strategies()))


def _wrap_error(err: Exception, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ConfigError(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    profile: str | None = None,
) -> RunConfig:
    """Load and validate a run config.

    Args:
        path: a YAML file (None: the defaults).
        overrides: ``key=value`` strings in OmegaConf dot-list syntax (``train.epochs=1``).
        profile: a name under the YAML's ``profiles:`` block, merged before ``overrides``.

    Raises:
        ConfigError: unknown key, wrong type, bad value or unknown profile (names the key).
        FileNotFoundError: ``path`` does not exist.
    """
    schema = _schema()
    layers: list[tuple[str, Any]] = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        raw = OmegaConf.load(Path(path))
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping")
        profiles = raw.pop("profiles", None) or {}
        layers.append((str(path), raw))
        if profile is not None:
            if profile not in profiles:
                raise ConfigError(f"{path}: unknown profile {profile!r}; has {sorted(profiles)}")
            layers.append((f"profile {profile!r}", profiles[profile]))
    elif profile is not None:
        raise ConfigError(f"profile {profile!r} needs a config file")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    return _merge(schema, layers)


def config_from_dict(saved: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from :func:`to_dict`'s output (e.g. a checkpoint's), with ``overrides``.

    The sections of strategies that this process has not registered (a strategy of the user's
    own that the saving process had imported) are dropped unless ``strategies.run`` names them.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    known = {spec.name for spec in registry.specs()} | {"run"}
    sections = dict(saved.get("strategies", {}))
    saved = {**saved, "strategies": {k: v for k, v in sections.items() if k in known}}
    return _merge(_schema(), [
        ("saved config", OmegaConf.create(saved)),
        ("overrides", OmegaConf.from_dotlist(list(overrides))),
    ])


def _merge(schema: Any, layers: list[tuple[str, Any]]) -> RunConfig:
    for where, layer in layers:
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as err:
            raise _wrap_error(err, where) from err
    try:
        obj = OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise _wrap_error(err, "config") from err
    assert isinstance(obj, RunConfig)
    return obj


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a plain JSON-ready dict (as written into results.json)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
