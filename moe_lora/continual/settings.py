"""Typed configuration of a continual run, loaded from YAML through OmegaConf structured configs.

A YAML file maps onto :class:`RunConfig` (sections ``model``, ``data``, ``train``, ``strategies``,
``output``) plus an optional ``profiles:`` block of named partial overrides (``--profile quick``).
:func:`load_config` merges, in order: the dataclass defaults, the YAML, the chosen profile, then
``key=value`` overrides from the command line. An unknown key, a wrong type or a value out of range
fails there, before any model or data is loaded, with a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoLEConfig",
    "OLoRAConfig",
    "OutputConfig",
    "ReplayConfig",
    "RetrievalConfig",
    "RunConfig",
    "STRATEGY_NAMES",
    "StrategiesConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "to_dict",
]

STRATEGY_NAMES = (
    "joint",
    "naive",
    "replay",
    "olora",
    "experts-taskid",
    "experts-retrieval",
    "experts-confidence",
    "experts-mole",
)
BENCHMARKS = ("split-wordnet", "split-digits", "file")
LOGGERS = ("csv", "tensorboard")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value (names the key)."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


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

    def __post_init__(self) -> None:
        _check(self.lora_layers >= 0, "model.lora_layers", "must be >= 0")
        _check(self.rank >= 1, "model.rank", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.max_length >= 4, "model.max_length", "must be >= 4")


@dataclass
class DataConfig:
    """The task stream (see :mod:`moe_lora.data`).

    Attributes:
        benchmark: ``split-wordnet``, ``split-digits`` or ``file`` (a JSONL/CSV at ``path``).
        path: the data file for ``file``.
        n_tasks, classes_per_task: stream shape (WordNet and digits).
        train_per_class, val_per_class, test_per_class, min_count: WordNet split sizes.
        seed: fixes the drawn classes and splits.
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

    def __post_init__(self) -> None:
        _check(self.benchmark in BENCHMARKS, "data.benchmark", f"must be one of {BENCHMARKS}")
        _check(
            self.benchmark != "file" or bool(self.path), "data.path", "is required for 'file'"
        )
        _check(self.benchmark != "file" or Path(str(self.path)).is_file(), "data.path",
               f"data file {self.path!r} not found")


@dataclass
class TrainConfig:
    """Optimisation and execution.

    Attributes:
        epochs: epochs per task (the joint strategy trains this many epochs on all tasks at once).
        batch_size: global training batch size (each of N processes takes 1/N of every batch).
        lr: learning rate of the LoRA ``A`` factors and the heads.
        lora_plus_ratio: LoRA+ (arXiv 2402.12354): ``B``'s learning rate is ``ratio * lr``.
        weight_decay: AdamW weight decay.
        aux_coef: weight of routers' auxiliary losses.
        seed: global seed.
        threads: torch intra-op threads (0 leaves torch's default).
        accelerator, devices, strategy: passed to ``lightning.Trainer`` (``ddp``/``ddp_spawn`` for
            several processes; gloo on CPU).
        progress_bar: show Lightning's progress bar.
        eval_batch_size: batch size of evaluation passes.
        loggers: Lightning loggers of every fit, under ``output.dir/logs``: ``csv`` and/or
            ``tensorboard`` (used only when the ``tensorboard`` package is importable).
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    lora_plus_ratio: float = 4.0
    weight_decay: float = 0.0
    aux_coef: float = 0.01
    seed: int = 0
    threads: int = 2
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    progress_bar: bool = True
    eval_batch_size: int = 256
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])

    def __post_init__(self) -> None:
        bad = [x for x in self.loggers if x not in LOGGERS]
        _check(not bad, "train.loggers", f"unknown {bad}; choose from {list(LOGGERS)}")
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.lora_plus_ratio > 0, "train.lora_plus_ratio", "must be > 0")
        _check(self.devices >= 1, "train.devices", "must be >= 1")
        _check(self.threads >= 0, "train.threads", "must be >= 0")


@dataclass
class ReplayConfig:
    """Replay buffer (``replay`` and ``experts-mole``): ``size`` examples, class-balanced."""

    size: int = 500

    def __post_init__(self) -> None:
        _check(self.size >= 1, "strategies.replay.size", "must be >= 1")


@dataclass
class OLoRAConfig:
    """O-LoRA (arXiv 2310.14152) loss weights: orthogonality ``lambda1``, L2 ``lambda2``."""

    lambda1: float = 0.5
    lambda2: float = 0.0


@dataclass
class RetrievalConfig:
    """Retrieval routing keys (LoRARetriever, arXiv 2402.09997) in the memory's ``ExpertIndex``.

    Attributes:
        mode: ``centroid`` (one mean key per expert) or ``exemplar`` (kNN vote over keys).
        keys_per_task: training inputs indexed per task.
        n_neighbors: kNN size in exemplar mode.
        temperature: vote temperature in exemplar mode.
        prior_weight: ``experts-confidence`` adds ``prior_weight * log(retrieval score)`` to each
            expert's confidence (0: confidence alone).
    """

    mode: str = "exemplar"
    keys_per_task: int = 200
    n_neighbors: int = 10
    temperature: float = 0.05
    prior_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.mode in ("centroid", "exemplar"), "strategies.retrieval.mode",
               "must be 'centroid' or 'exemplar'")
        _check(self.keys_per_task >= 1, "strategies.retrieval.keys_per_task", "must be >= 1")


@dataclass
class MoLEConfig:
    """MoLE gate (arXiv 2404.13628) trained on replayed exemplars after each task."""

    epochs: int = 3
    lr: float = 1e-2


@dataclass
class StrategiesConfig:
    """Which strategies run, and their knobs."""

    run: list[str] = field(default_factory=lambda: list(STRATEGY_NAMES))
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    olora: OLoRAConfig = field(default_factory=OLoRAConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    mole: MoLEConfig = field(default_factory=MoLEConfig)

    def __post_init__(self) -> None:
        bad = [s for s in self.run if s not in STRATEGY_NAMES]
        _check(not bad, "strategies.run", f"unknown {bad}; choose from {list(STRATEGY_NAMES)}")
        _check(bool(self.run), "strategies.run", "must name at least one strategy")


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
    schema = OmegaConf.structured(RunConfig)
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

    Raises:
        ConfigError: as :func:`load_config`.
    """
    return _merge(OmegaConf.structured(RunConfig), [
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
