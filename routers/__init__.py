"""Routing strategies for the expert bank, all behind one interface (see ``docs/routers.md``).

Sample-level routers (:class:`moe_lora.routing.Router`): :class:`TaskRouter` (task id),
:class:`LoRAHubRouter` (LoRAHub, arXiv 2307.13269), :class:`RetrievalRouter` (LoRARetriever,
arXiv 2402.09997). Layer gates attached with ``ExpertBank.attach_gates``: :class:`MoLERouter`
(MoLE, arXiv 2404.13628) and :class:`TopKRouter` (MixLoRA, arXiv 2404.15159). Every router has
``routing(batch) -> Routing``, a config dataclass, a registry name and ``last_weights``.
"""

from .base import (
    GateRouter,
    LoRAHubConfig,
    MoLEConfig,
    RetrievalConfig,
    RouterConfig,
    TaskRouterConfig,
    TopKConfig,
    build_router,
    make_config,
    save_weights,
)
from .lorahub import LoRAHubResult, LoRAHubRouter
from .mole import MoLEGate, MoLERouter
from .retrieval import FusionGate, RetrievalRouter
from .task import TaskRouter, UnknownTaskError
from .topk import TopKGate, TopKRouter

__all__ = [
    "RouterConfig",
    "TaskRouterConfig",
    "LoRAHubConfig",
    "RetrievalConfig",
    "MoLEConfig",
    "TopKConfig",
    "build_router",
    "make_config",
    "save_weights",
    "GateRouter",
    "TaskRouter",
    "UnknownTaskError",
    "LoRAHubRouter",
    "LoRAHubResult",
    "RetrievalRouter",
    "FusionGate",
    "MoLERouter",
    "MoLEGate",
    "TopKRouter",
    "TopKGate",
]
