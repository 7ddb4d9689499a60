"""The server's settings: network, batching, workers and request limits."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeConfig"]


@dataclass
class ServeConfig:
    """Settings of ``moe-lora serve`` (every field is a command-line flag).

    Attributes:
        host: interface to bind; loopback by default (``0.0.0.0`` exposes the server).
        port: TCP port.
        max_batch_size: requests one forward may take (1: no batching).
        batch_timeout: seconds a worker waits to fill a batch.
        workers: inference workers per device (each loads the model).
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch threads per worker (None: torch's default).
        timeout: seconds a request may wait in the queue before a 504.
        max_text_chars: longest accepted text, prompt or chat content (characters).
        max_input_tokens: longest accepted input after tokenisation.
        max_new_tokens: the most tokens a completion may ask for (``max_tokens``).
        max_choices: the largest ``n`` of a completion.
        max_resident: store experts resident at once (a store folder; None: unbounded).
        max_resident_bytes: bytes of store experts resident at once (None: unbounded).
        base: the base model, overriding the bank manifest's base id (a name or a local folder).
        result: a continual run's result that answers ``"auto"`` (e.g. ``experts-confidence``;
            None: the run's best task-agnostic result by average accuracy).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.005
    workers: int = 1
    device: str = "cpu"
    threads: int | None = None
    timeout: float = 60.0
    max_text_chars: int = 8192
    max_input_tokens: int = 512
    max_new_tokens: int = 256
    max_choices: int = 8
    max_resident: int | None = None
    max_resident_bytes: int | None = None
    base: str | None = None
    result: str | None = None

    @property
    def max_body_bytes(self) -> int:
        """Largest request body accepted (413 beyond): room for a few texts at the limit."""
        return 16 * self.max_text_chars + 65536

    def __post_init__(self) -> None:
        checks = [
            ("host", self.host in ("127.0.0.1", "0.0.0.0", "::"), "must be 127.0.0.1, 0.0.0.0 or ::"),
            ("port", 1024 <= self.port <= 65535, "must be in [1024, 65535]"),
            ("max_batch_size", self.max_batch_size >= 1, "must be >= 1"),
            ("batch_timeout", 0 <= self.batch_timeout < self.timeout, "must be in [0, timeout)"),
            ("workers", self.workers >= 1, "must be >= 1"),
            ("device", self.device in ("cpu", "cuda", "auto"), "must be cpu, cuda or auto"),
            ("threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            ("max_text_chars", self.max_text_chars >= 1, "must be >= 1"),
            ("max_input_tokens", self.max_input_tokens >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("max_choices", self.max_choices >= 1, "must be >= 1"),
            ("max_resident", self.max_resident is None or self.max_resident >= 1, "must be >= 1"),
            ("max_resident_bytes", self.max_resident_bytes is None or self.max_resident_bytes >= 1,
             "must be >= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"ServeConfig.{name} {what}, got {getattr(self, name)!r}")
