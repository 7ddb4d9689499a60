"""The built-in strategies, one class each, registered by name on import.

=============  =========================================================================
result         strategy
=============  =========================================================================
joint          one expert on all tasks at once (upper bound) — :mod:`.shared`
naive          one expert, task after task — :mod:`.shared`
replay         naive + class-balanced replay — :mod:`.replay`
olora          an orthogonal expert per task, summed (O-LoRA) — :mod:`.olora`
experts-*      an expert per task, evaluated by each inference router — :mod:`.experts`
=============  =========================================================================

A new strategy is a new module with a :class:`~.base.Strategy` subclass registered by
:func:`moe_lora.continual.registry.register_strategy`, imported here (or by the user's code
before the config is loaded).
"""

from moe_lora.continual.strategies import experts, frozen, olora, replay, shared  # noqa: F401
from moe_lora.continual.strategies.base import Prediction, RunContext, Strategy

__all__ = ["Prediction", "RunContext", "Strategy"]
