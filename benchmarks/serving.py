"""Serving benchmark: ``moe-lora serve`` vs PEFT ``set_adapter``, over HTTP on loopback.

A bank of 64 random rank-8 experts on the embedded MiniLM (query/value, 6 layers) with a linear
head per expert answers classification requests ``{"text", "expert"}`` sent in random order by a
bounded load generator (a fixed number of requests, at most ``--concurrency`` in flight). Two
servers answer the same requests, both on LitServe with the same batching settings, one worker
and one torch thread each:

* ``moe-lora``: ``moe-lora serve`` (``POST /predict``): a batch of requests for different experts
  is one forward under a per-sample routing;
* ``PEFT``: the same experts as PEFT adapters; a batch is served one adapter at a time
  (``set_adapter`` then a forward of that adapter's requests), the way a PEFT model switches
  adapters.

Each also runs with every request for one expert. Reported: requests/s, p50/p99 latency, and
the goals: moe-lora >= 5x PEFT's requests/s with 64 experts, and moe-lora with 64 experts >= 90 %
of its own single-expert throughput. Before timing, both servers' answers to the same requests
are compared (labels and class scores).

    python benchmarks/serving.py                # 1024 requests per run; --quick: 256
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import litserve as ls
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fixtures import make_bank, peft_twin  # noqa: E402
from moe_lora.core.io import atomic_write_json  # noqa: E402
from moe_lora.serving.folder import Head, save_heads  # noqa: E402

WORDS = ("river stone bright quiet market engine garden silver window letter storm harbor winter "
         "forest signal copper lantern meadow violin thunder orbit canvas pepper marble falcon "
         "needle ribbon saddle candle basket mirror anchor ladder valley tunnel").split()
LABELS = ["a", "b", "c", "d", "e"]


def build_folder(root: Path, n_experts: int) -> Path:
    """A saved MiniLM bank of ``n_experts`` random experts with a random head each."""
    from moe_lora.models import load_base

    bank = make_bank(load_base("minilm", task="encoder").model.eval(), "minilm", n_experts)
    bank.freeze()
    folder = root / "bank"
    bank.save(folder)
    g = torch.Generator().manual_seed(0)
    hidden = int(bank.model.config.hidden_size)
    save_heads(folder, {n: Head(torch.randn(len(LABELS), hidden, generator=g),
                                torch.randn(len(LABELS), generator=g), LABELS)
                        for n in bank.names})
    return folder


WORKLOADS = {"short": (3, 8), "long": (12, 24)}  # words per text (about 1.3 tokens per word)


def make_requests(n: int, n_experts: int, words: tuple[int, int], single: bool,
                  seed: int = 1) -> list[dict[str, str]]:
    """``n`` requests in random order: texts of ``words`` words, experts uniform (or all
    ``e0``)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(WORDS, k=rng.randint(*words))),
             "expert": "e0" if single else f"e{rng.randrange(n_experts)}"} for _ in range(n)]


# --------------------------------------------------------------------------- the PEFT server
class PeftAPI(ls.LitAPI):
    """The folder's experts as PEFT adapters, served one adapter at a time (``set_adapter``)."""

    def __init__(self, folder: Path, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.folder = folder

    def setup(self, device: str) -> None:
        from moe_lora import ExpertBank
        from moe_lora.models import load_base
        from moe_lora.serving.classify import load_heads
        from moe_lora.serving.folder import ServedFolder

        torch.set_num_threads(1)
        bank = ExpertBank.load(self.folder, load_base("minilm", task="encoder").model)
        base = load_base("minilm", task="encoder")
        self.model = peft_twin(base.model.eval(), "minilm", bank, bank.names)
        self.tok, self.heads = base.tokenizer, load_heads(ServedFolder(self.folder))

    def decode_request(self, request: dict[str, str]) -> tuple[str, str]:
        return request["text"], request["expert"]

    def batch(self, inputs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return list(inputs)

    @torch.inference_mode()
    def predict(self, batch: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{}] * len(batch)
        for expert in dict.fromkeys(e for _, e in batch):
            rows = [i for i, (_, e) in enumerate(batch) if e == expert]
            self.model.set_adapter(expert)
            enc = self.tok([batch[i][0] for i in rows], padding=True, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            m = enc["attention_mask"][..., None].float()
            feats = (hidden * m).sum(1) / m.sum(1)
            head = self.heads[expert]
            probs = torch.softmax(feats @ head.weight.T + head.bias, -1)
            for j, i in enumerate(rows):
                out[i] = {"label": LABELS[int(probs[j].argmax())],
                          "scores": dict(zip(LABELS, probs[j].tolist(), strict=True))}
        return out

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def serve_peft(folder: Path, port: int, max_batch_size: int, batch_timeout: float) -> None:
    """Run the PEFT server (blocks)."""
    api = PeftAPI(folder, max_batch_size, batch_timeout)
    ls.LitServer(api, accelerator="cpu").run(host="127.0.0.1", port=port,
                                             generate_client_file=False, log_level="warning")


# --------------------------------------------------------------------------- load generation
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float = 180.0):
    """Run ``cmd`` (a server on ``port``) in its own process group until the block ends."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server failed: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not start")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Connection:
    """A minimal HTTP/1.1 keep-alive client: the load generator must not eat the CPU it
    measures (httpx costs about 5 ms of CPU per request here, as much as the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, host)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                          + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def _load(url: str, bodies: list[dict[str, str]], concurrency: int
                ) -> tuple[float, list[float], list[dict[str, Any]]]:
    host, port = url.removeprefix("http://").split(":")
    payloads = [json.dumps(b).encode() for b in bodies]
    latencies: list[float] = [0.0] * len(bodies)
    answers: list[dict[str, Any]] = [{}] * len(bodies)
    next_index = iter(range(len(bodies)))
    connections = [await _Connection.open(host, int(port)) for _ in range(concurrency)]

    async def worker(conn: _Connection) -> None:
        for i in next_index:
            t0 = time.perf_counter()
            status, data = await conn.post("/predict", payloads[i])
            latencies[i] = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
            answers[i] = json.loads(data)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - start
    for c in connections:
        c.close()
    return wall, latencies, answers


def measure(url: str, bodies: list[dict[str, str]], concurrency: int) -> dict[str, Any]:
    """Warm up, then send ``bodies`` with ``concurrency`` in flight; requests/s and latency."""
    asyncio.run(_load(url, bodies[: 2 * concurrency], concurrency))
    wall, lat, answers = asyncio.run(_load(url, bodies, concurrency))
    lat_ms = sorted(x * 1000 for x in lat)
    return {"requests": len(bodies), "wall_s": round(wall, 3),
            "requests_per_s": round(len(bodies) / wall, 1),
            "p50_ms": round(statistics.median(lat_ms), 1),
            "p99_ms": round(lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))], 1),
            "answers": answers}


def agreement(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, float]:
    """Share of equal labels and the largest class-score difference between two runs."""
    same = sum(x["label"] == y["label"] for x, y in zip(a, b, strict=True)) / len(a)
    diff = max(abs(p - q) for x, y in zip(a, b, strict=True)
               for p, q in zip(x["scores"].values(), y["scores"].values(), strict=True))
    return {"labels_equal": same, "max_score_diff": diff}


# --------------------------------------------------------------------------- the runs
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the folder, run the four scenarios, check the answers and compute the goals."""
    work = Path(tempfile.mkdtemp(prefix="moe-lora-serving-bench-"))
    folder = build_folder(work, args.experts)
    batching = ["--max-batch-size", str(args.batch), "--batch-timeout", str(args.batch_timeout)]
    servers = {
        "moe-lora": lambda port: [sys.executable, "-m", "moe_lora.serving.cli", str(folder),
                                  "--port", str(port), "--threads", "1", *batching],
        "PEFT": lambda port: [sys.executable, __file__, "--serve-peft", str(folder), "--port",
                              str(port), "--batch", str(args.batch), "--batch-timeout",
                              str(args.batch_timeout)],
    }
    results: dict[str, Any] = {}
    for name, cmd in servers.items():
        port = _free_port()
        with server(cmd(port), port) as url:
            for workload, words in WORKLOADS.items():
                for mix in ("mixed", "single"):
                    bodies = make_requests(args.requests, args.experts, words, mix == "single")
                    key = f"{name} {workload} {mix}"
                    results[key] = measure(url, bodies, args.concurrency)
                    print(f"  {key}: {results[key]['requests_per_s']} req/s", flush=True)
    goals, checks = {}, {}
    for workload in WORKLOADS:
        checks[workload] = agreement(results[f"moe-lora {workload} mixed"]["answers"],
                                     results[f"PEFT {workload} mixed"]["answers"])
        rps = {k.replace(f" {workload}", ""): v["requests_per_s"] for k, v in results.items()
               if f" {workload} " in k}
        for label, value, goal in (
                ("moe-lora 64 / PEFT 64", rps["moe-lora mixed"] / rps["PEFT mixed"], 5.0),
                ("moe-lora 64 / moe-lora 1", rps["moe-lora mixed"] / rps["moe-lora single"], 0.9)):
            goals[f"{workload}: {label}"] = {"value": round(value, 3), "goal": f">= {goal:g}",
                                             "met": value >= goal}
    for r in results.values():
        del r["answers"]
    return {"runs": results, "goals": goals, "agreement": checks}


def table(report: dict[str, Any]) -> str:
    """The results as a Markdown table, then the goals."""
    lines = ["| server | texts | experts | requests/s | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        server_name, workload, mix = name.split()
        experts = "1" if mix == "single" else str(report["meta"]["experts"])
        lines.append(f"| {server_name} | {workload} | {experts} | {r['requests_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} |")
    lines.append("")
    for name, g in report["goals"].items():
        lines.append(f"{name}: {g['value']} (goal {g['goal']}: {'met' if g['met'] else 'MISSED'})")
    for workload, a in report["agreement"].items():
        lines.append(f"{workload}: answers moe-lora vs PEFT: labels equal {a['labels_equal']:.3f}, "
                     f"largest score difference {a['max_score_diff']:.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--serve-peft``, the PEFT server)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--requests", type=int, default=1024, help="per run")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="max batch size of both servers")
    p.add_argument("--batch-timeout", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="256 requests")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving-cpu.json"))
    p.add_argument("--serve-peft", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_peft:
        serve_peft(Path(args.serve_peft), args.port, args.batch, args.batch_timeout)
        return 0
    if args.quick:
        args.requests = 256
    start = time.time()
    report = run(args)
    report["meta"] = {
        "command": "python benchmarks/serving.py" + (" --quick" if args.quick else ""),
        "experts": args.experts, "workloads_words": WORKLOADS, "requests": args.requests, "concurrency": args.concurrency,
        "max_batch_size": args.batch, "batch_timeout": args.batch_timeout,
        "torch_threads_per_server": 1, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "load_average_at_end": list(os.getloadavg()), "wall_s": round(time.time() - start, 1),
        "created": datetime.now(timezone.utc).isoformat(),
    }
    print(table(report))
    atomic_write_json(args.out, report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
