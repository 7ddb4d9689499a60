"""Server metrics in shared memory, read by ``GET /metrics`` as Prometheus text.

LitServe answers HTTP in one set of processes and runs the model in others (inference workers).
Both write into the same shared arrays, created before the processes start:

* the HTTP side counts requests by endpoint and status class, and their latency (histogram);
* each inference worker counts its batches (histogram of batch sizes) and publishes its
  :class:`~moe_lora.memory.AdapterStore` counters (hits, misses, evictions, resident experts).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Sequence
from typing import Any

__all__ = ["ENDPOINTS", "Metrics"]

ENDPOINTS = ("/predict", "/route", "/v1/completions", "/v1/chat/completions", "/experts",
             "/metrics")
CODES = ("2xx", "4xx", "5xx")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, math.inf)
STORE_FIELDS = ("hits", "misses", "evictions", "resident")


def _bucket(value: float, bounds: Sequence[float]) -> int:
    return next(i for i, b in enumerate(bounds) if value <= b)


class Metrics:
    """Counters shared across processes (``multiprocessing`` arrays from the spawn context).

    Args:
        max_workers: inference workers that may publish store counters.
    """

    def __init__(self, max_workers: int = 1):
        ctx = mp.get_context("spawn")
        n_end, n_lat = len(ENDPOINTS), len(LATENCY_BUCKETS)
        self._requests = ctx.Array("d", n_end * len(CODES))
        self._latency = ctx.Array("d", n_end * (n_lat + 1))  # buckets, then the sum
        self._batches = ctx.Array("d", len(BATCH_BUCKETS) + 2)  # buckets, sum, count
        self._store = ctx.Array("d", max(1, max_workers) * len(STORE_FIELDS))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request of ``endpoint`` with HTTP ``status`` after ``seconds``."""
        if endpoint not in ENDPOINTS:
            return
        e = ENDPOINTS.index(endpoint)
        code = {4: 1, 5: 2}.get(status // 100, 0)
        width = len(LATENCY_BUCKETS) + 1
        with self._requests.get_lock():
            self._requests[e * len(CODES) + code] += 1
        with self._latency.get_lock():
            self._latency[e * width + _bucket(seconds, LATENCY_BUCKETS)] += 1
            self._latency[e * width + width - 1] += seconds

    def observe_batch(self, size: int) -> None:
        """Count one batch of ``size`` requests run by an inference worker."""
        n = len(BATCH_BUCKETS)
        with self._batches.get_lock():
            self._batches[_bucket(size, BATCH_BUCKETS)] += 1
            self._batches[n] += size
            self._batches[n + 1] += 1

    def publish_store(self, worker: int, hits: int, misses: int, evictions: int,
                      resident: int) -> None:
        """Set worker ``worker``'s adapter-store counters (cumulative values)."""
        base = (worker % (len(self._store) // len(STORE_FIELDS))) * len(STORE_FIELDS)
        with self._store.get_lock():
            for i, v in enumerate((hits, misses, evictions, resident)):
                self._store[base + i] = v

    def requests(self, endpoint: str, code: str = "2xx") -> int:
        """Requests of ``endpoint`` answered with status class ``code`` so far."""
        return int(self._requests[ENDPOINTS.index(endpoint) * len(CODES) + CODES.index(code)])

    def store(self) -> dict[str, int]:
        """Store counters summed over the workers."""
        k = len(STORE_FIELDS)
        vals = list(self._store)
        return {f: int(sum(vals[i::k])) for i, f in enumerate(STORE_FIELDS)}

    def batches(self) -> tuple[int, int]:
        """(batches run, requests in them) summed over the workers."""
        n = len(BATCH_BUCKETS)
        return int(self._batches[n + 1]), int(self._batches[n])

    def prometheus(self) -> str:
        """All metrics in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        lines += _counter("moe_lora_requests_total", "HTTP requests by endpoint and status class",
                          [({"endpoint": ep, "code": c}, self.requests(ep, c))
                           for ep in ENDPOINTS for c in CODES])
        lines += ["# HELP moe_lora_request_seconds Request latency seen by the HTTP server.",
                  "# TYPE moe_lora_request_seconds histogram"]
        width = len(LATENCY_BUCKETS) + 1
        for e, ep in enumerate(ENDPOINTS):
            row = list(self._latency[e * width : (e + 1) * width])
            lines += _histogram("moe_lora_request_seconds", {"endpoint": ep}, LATENCY_BUCKETS,
                                row[:-1], row[-1])
        lines += ["# HELP moe_lora_batch_size Requests per batch run by the inference workers.",
                  "# TYPE moe_lora_batch_size histogram"]
        b = list(self._batches)
        lines += _histogram("moe_lora_batch_size", {}, BATCH_BUCKETS, b[:-2], b[-2])
        store = self.store()
        for field in ("hits", "misses", "evictions"):
            lines += _counter(f"moe_lora_store_{field}_total", f"adapter store {field}",
                              [({}, store[field])])
        lines += ["# HELP moe_lora_store_resident Store experts resident in memory.",
                  "# TYPE moe_lora_store_resident gauge", f"moe_lora_store_resident {store['resident']}"]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _counter(name: str, help_text: str, samples: list[tuple[dict[str, Any], float]]) -> list[str]:
    out = [f"# HELP {name} {help_text}.", f"# TYPE {name} counter"]
    return out + [f"{name}{_labels(lab)} {value:g}" for lab, value in samples]


def _histogram(name: str, labels: dict[str, Any], bounds: Sequence[float],
               counts: Sequence[float], total: float) -> list[str]:
    out, running = [], 0.0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        le = "+Inf" if math.isinf(bound) else f"{bound:g}"
        out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running:g}")
    out.append(f"{name}_sum{_labels(labels)} {total:g}")
    out.append(f"{name}_count{_labels(labels)} {running:g}")
    return out
