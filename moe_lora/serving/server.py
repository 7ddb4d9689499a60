"""Build and run the LitServe server of ``moe-lora serve`` for one served folder."""

from __future__ import annotations

from pathlib import Path

import litserve as ls

from moe_lora.serving.api import BankAPI
from moe_lora.serving.config import ServeConfig
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.metrics import Metrics
from moe_lora.serving.spec import BankSpec

__all__ = ["build_server", "serve"]


def build_server(path: str | Path, config: ServeConfig | None = None) -> ls.LitServer:
    """A LitServer for the folder at ``path`` (not started; see :func:`serve`).

    Raises:
        FileNotFoundError: ``path`` is neither a saved bank nor an adapter store.
    """
    config = config or ServeConfig()
    folder = ServedFolder(path, config.base, config.result)
    metrics = Metrics(max_workers=config.workers * 16)
    api = BankAPI(folder.path, config, metrics, BankSpec(folder, config, metrics))
    return ls.LitServer(api, accelerator=config.device, workers_per_device=config.workers,
                        timeout=config.timeout, max_payload_size=config.max_body_bytes)


def serve(path: str | Path, config: ServeConfig | None = None, log_level: str = "warning") -> None:
    """Serve the folder at ``path`` until interrupted (blocks)."""
    config = config or ServeConfig()
    server = build_server(path, config)
    server.run(host=config.host, port=config.port, generate_client_file=False,
               log_level=log_level)
