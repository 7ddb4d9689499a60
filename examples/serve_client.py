"""Talk to a running ``moe-lora serve``: its experts, the router's choice, answers, metrics.

Start a server on a saved bank or adapter store first (docs/serving.md), then::

    moe-lora serve runs/my_bank --port 8000
    python examples/serve_client.py --url http://127.0.0.1:8000

A classification folder (with heads) gets concurrent ``/predict`` requests for different
experts, which the server batches into shared forwards; a causal-LM folder gets concurrent
completions for different experts and one streamed chat completion. ``--fast`` sends fewer
requests (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import httpx

TEXTS = ["a cat chased the mouse", "fresh bread from the oven", "the violin played softly",
         "the striker scored twice", "a storm hit the harbor", "she planted tomatoes"]


def show_experts(client: httpx.Client) -> dict:
    info = client.get("/experts").json()
    names = [e["name"] for e in info["experts"]]
    print(f"base {info['base']} ({info['kind']}), router: {info['router']}, experts: {names}")
    return info


def show_routes(client: httpx.Client, texts: list[str]) -> None:
    for text in texts:
        r = client.post("/route", json={"text": text}).json()
        picks = ", ".join(f"{n} {w:.2f}" for n, w in zip(r["experts"], r["weights"], strict=True))
        print(f"route  {text!r:32} -> {picks}")


def classify(client: httpx.Client, texts: list[str], experts: list[str]) -> None:
    bodies = [{"text": t, "expert": e} for t in texts for e in experts]
    with ThreadPoolExecutor(8) as pool:  # concurrent requests: batched by the server
        answers = list(pool.map(lambda b: client.post("/predict", json=b).json(), bodies))
    for body, a in zip(bodies, answers, strict=True):
        used = ", ".join(f"{n} {w:.2f}" for n, w in zip(a["experts"], a["weights"], strict=True))
        print(f"predict {body['text']!r:32} [{body['expert']}] -> {a['label']} "
              f"({a['scores'][a['label']]:.2f}) by {used}")


def complete(client: httpx.Client, experts: list[str], max_tokens: int) -> None:
    bodies = [{"model": e, "prompt": "Once upon a time", "max_tokens": max_tokens,
               "temperature": 0} for e in experts]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/completions", json=b).json(), bodies))
    for body, a in zip(bodies, answers, strict=True):
        print(f"complete [{body['model']}] {a['choices'][0]['text']!r}")
    chat = {"model": experts[0], "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me a short story."}]}
    print(f"stream   [{experts[0]}] ", end="")
    with client.stream("POST", "/v1/chat/completions", json=chat) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    print(c["delta"].get("content", ""), end="", flush=True)
    print()


def show_metrics(client: httpx.Client) -> None:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            values[name] = float(value)
    batches = values["moe_lora_batch_size_count"]
    mean = values["moe_lora_batch_size_sum"] / max(batches, 1)
    print(f"metrics: {batches:.0f} batches, {mean:.1f} requests per batch; store hits "
          f"{values['moe_lora_store_hits_total']:.0f}, misses "
          f"{values['moe_lora_store_misses_total']:.0f}, evictions "
          f"{values['moe_lora_store_evictions_total']:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--fast", action="store_true", help="fewer requests (for the tests)")
    args = p.parse_args()
    texts = TEXTS[:3] if args.fast else TEXTS
    with httpx.Client(base_url=args.url, timeout=120) as client:
        client.get("/health").raise_for_status()
        info = show_experts(client)
        experts = [e["name"] for e in info["experts"]][: 2 if args.fast else 4]
        if info["router"]:
            show_routes(client, texts)
            experts.append("auto")
        if info["experts"][0]["labels"]:
            classify(client, texts, experts)
        else:
            complete(client, [e for e in experts if e != "auto"], 8 if args.fast else 32)
        show_metrics(client)


if __name__ == "__main__":
    main()
