"""moe-lora: continual and mixture-of-experts LoRA adapters.

A frozen base model carries a growing :class:`ExpertBank` of LoRA experts; a :class:`Routing`
(set by hand or by a router from :mod:`moe_lora.routers`) decides which experts act per sample or
per token. See ``docs/architecture.md``.
"""

import moe_lora.routers  # noqa: E402,F401  (registers the built-in routers for get_router)
from moe_lora.core.bank import ExpertBank, ExpertInfo
from moe_lora.core.config import ExpertConfig
from moe_lora.core.generation import generate
from moe_lora.core.io import CorruptFileError
from moe_lora.core.layers import LoRALayer
from moe_lora.core.routing import (
    GateOutput,
    LayerGate,
    Router,
    RouterInput,
    RouterOutput,
    Routing,
    get_router,
    register_router,
)

__version__ = "0.1.0"

__all__ = [
    "ExpertBank",
    "ExpertInfo",
    "ExpertConfig",
    "CorruptFileError",
    "LoRALayer",
    "Routing",
    "Router",
    "RouterInput",
    "RouterOutput",
    "LayerGate",
    "GateOutput",
    "register_router",
    "get_router",
    "generate",
    "__version__",
]
