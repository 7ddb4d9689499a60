"""The strategy registry: every continual strategy is a class registered here once, by name.

A strategy trains once per run and may be *evaluated* several ways: the ``experts`` strategy
trains one bank and is evaluated with each of its inference routers (``experts-taskid``,
``experts-retrieval``, ...). A **result name** is what ``strategies.run`` lists and what
``results.json`` reports: the strategy's name for a single-evaluation strategy, else
``<strategy>-<evaluation>``.

::

    @register_strategy("replay", options=ReplayOptions)
    class Replay(SharedHeadStrategy): ...

    @register_strategy("experts", options=ExpertsOptions,
                       evaluations={"taskid": "task-aware", "mole": "task-agnostic"})
    class Experts(Strategy): ...

This module imports nothing of the engine, so the config loader can read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Setting", "StrategySpec", "options_of", "register_strategy", "resolve", "result_names", "specs",
           "strategy_spec"]

Setting = Literal["task-aware", "task-agnostic"]


@dataclass(frozen=True)
class StrategySpec:
    """One registered strategy.

    Attributes:
        name: the registry name, also its config section ``strategies.<name>``.
        cls: the :class:`~moe_lora.continual.strategies.base.Strategy` subclass.
        options: its config dataclass (None: no options).
        evaluations: evaluation name -> setting; empty for one evaluation named like the strategy.
        setting: the setting of the single evaluation (when ``evaluations`` is empty).
    """

    name: str
    cls: type
    options: type | None = None
    evaluations: dict[str, Setting] = field(default_factory=dict)
    setting: Setting = "task-agnostic"

    def result_names(self) -> list[str]:
        """The result names this strategy can produce."""
        if not self.evaluations:
            return [self.name]
        return [f"{self.name}-{e}" for e in self.evaluations]

    def setting_of(self, result: str) -> Setting:
        """The setting of result ``result`` (one of :meth:`result_names`)."""
        if not self.evaluations:
            return self.setting
        return self.evaluations[result.removeprefix(f"{self.name}-")]


_SPECS: dict[str, StrategySpec] = {}


def register_strategy(
    name: str, *, options: type | None = None, evaluations: dict[str, Setting] | None = None,
    setting: Setting = "task-agnostic",
) -> Callable[[type], type]:
    """Class decorator registering a strategy under ``name`` (see the module docstring).

    Raises:
        ValueError: ``name`` or one of its result names is taken.
    """

    def deco(cls: type) -> type:
        spec = StrategySpec(name, cls, options, dict(evaluations or {}), setting)
        clash = set(spec.result_names()) & set(result_names()) | ({name} & set(_SPECS))
        if clash:
            raise ValueError(f"strategy names {sorted(clash)} are already registered")
        _SPECS[name] = spec
        return cls

    return deco


def specs() -> list[StrategySpec]:
    """Every registered strategy, in registration order."""
    return list(_SPECS.values())


def strategy_spec(name: str) -> StrategySpec:
    """The strategy registered as ``name``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    if name not in _SPECS:
        raise KeyError(f"unknown strategy {name!r}; registered: {sorted(_SPECS)}")
    return _SPECS[name]


def result_names() -> list[str]:
    """Every result name of every registered strategy."""
    return [r for spec in _SPECS.values() for r in spec.result_names()]


def resolve(results: list[str]) -> list[tuple[StrategySpec, list[str]]]:
    """Group requested result names by the strategy that trains them (order of first mention).

    Raises:
        KeyError: a name no registered strategy produces.
    """
    owner = {r: spec for spec in _SPECS.values() for r in spec.result_names()}
    groups: dict[str, tuple[StrategySpec, list[str]]] = {}
    for r in results:
        if r not in owner:
            raise KeyError(f"unknown strategy {r!r}; choose from {result_names()}")
        spec = owner[r]
        groups.setdefault(spec.name, (spec, []))[1].append(r)
    return list(groups.values())


def options_of(spec: StrategySpec, strategies: Any) -> Any:
    """The options object of ``spec`` in a loaded ``strategies`` config section (None: none)."""
    return getattr(strategies, spec.name) if spec.options is not None else None
