"""Serving a trained bank over HTTP with LitServe: ``moe-lora serve`` (see docs/serving.md).

Light to import (no LitServe): the config, the served-folder helpers and the :class:`Predictor`
protocol. The server itself is :func:`moe_lora.serving.server.build_server` /
:func:`~moe_lora.serving.server.serve` (needs the ``serve`` extra: litserve, httpx).
"""

from moe_lora.serving.config import ServeConfig
from moe_lora.serving.folder import Head, ServedFolder, save_heads, save_router
from moe_lora.serving.protocol import Predictor

__all__ = ["Head", "Predictor", "ServeConfig", "ServedFolder", "save_heads", "save_router"]
