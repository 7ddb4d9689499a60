"""``moe-lora serve`` over real HTTP (httpx) on a free loopback port.

Two servers start once for the module: a classifier served from an adapter store that may hold
only two of its four experts at a time (so concurrent requests for different experts evict), and
a tiny causal LM. Every answer is compared with the same computation done in-process, one
request at a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from serving_helpers import (
    TOPICS,
    random_smollm2_bank,
    running_servers,
    store_from_bank,
    tiny_encoder_folder,
    tiny_llama_folder,
)
from transformers import AutoTokenizer, BertModel, LlamaForCausalLM

from moe_lora import ExpertBank, Routing, generate
from moe_lora.serving.classify import load_heads
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.router import NamedRouter


@pytest.fixture(scope="module")
def encoder_bank(tmp_path_factory) -> Path:
    return tiny_encoder_folder(tmp_path_factory.mktemp("enc"))


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def servers(encoder_bank, lm_folder, tmp_path_factory):
    """Both servers, started together (their start-up overlaps)."""
    store = store_from_bank(encoder_bank, tmp_path_factory.mktemp("store") / "store")
    cls_flags = ("--max-resident", "2", "--max-batch-size", "8", "--batch-timeout", "0.05",
                 "--max-text-chars", "400", "--max-input-tokens", "40")
    lm_flags = ("--max-batch-size", "8", "--batch-timeout", "0.05", "--max-new-tokens", "32")
    with running_servers((store, cls_flags), (lm_folder, lm_flags)) as urls:
        yield urls


@pytest.fixture(scope="module")
def classifier(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def lm_server(servers) -> str:
    return servers[1]


@pytest.fixture(scope="module")
def reference(encoder_bank):
    """In-process answers: one text at a time, every expert resident."""
    folder = ServedFolder(encoder_bank)
    base = Path(folder.base_id)
    bank = ExpertBank.load(encoder_bank, BertModel.from_pretrained(base).eval())
    tok, heads = AutoTokenizer.from_pretrained(base), load_heads(folder)
    router = NamedRouter.load(encoder_bank, bank)

    def predict(text: str, choice: list[tuple[str, float]]) -> dict:
        idx = torch.tensor([[bank.index(n) for n, _ in choice]])
        w = torch.tensor([[float(x) for _, x in choice]])
        with torch.no_grad(), bank.use(Routing.per_sample(idx, w)):
            h = bank.model(**tok([text], return_tensors="pt")).last_hidden_state[0].mean(0)
        head = heads[max(choice, key=lambda c: c[1])[0]]
        probs = torch.softmax(head.weight @ h + head.bias, -1)
        return {"label": head.labels[int(probs.argmax())], "scores": probs.tolist()}

    return predict, router


def post(url: str, path: str, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})


def test_concurrent_mixed_experts_equal_in_process(classifier, reference) -> None:
    predict, router = reference
    texts = [t for ts in TOPICS.values() for t in ts]
    requests = [{"text": t, "expert": name} for t in texts for name in ("animals", "music")]
    requests += [{"text": t, "expert": "auto"} for t in texts]
    requests += [{"text": t, "task": 2} for t in texts[:4]]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: post(classifier, "/predict", b), requests))
    for body, r in zip(requests, answers, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        if body.get("expert") == "auto":
            route = router.route([body["text"]])[0]
            choice = list(zip(route.experts, route.weights, strict=True))
        else:
            choice = [(body.get("expert") or "music", 1.0)]
        want = predict(body["text"], choice)
        assert got["experts"] == [n for n, _ in choice]
        assert got["label"] == want["label"]
        torch.testing.assert_close(list(got["scores"].values()), want["scores"], atol=1e-5,
                                   rtol=1e-4)
    metrics = httpx.get(classifier + "/metrics").text
    store = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
             if line.startswith("moe_lora_store_")}
    assert store["moe_lora_store_evictions_total"] > 0  # 4 experts, 2 resident
    assert store["moe_lora_store_resident"] <= 2
    count = next(float(line.split()[1]) for line in metrics.splitlines()
                 if line.startswith("moe_lora_batch_size_count"))
    assert count < len(requests)  # requests were batched (mixed experts in one forward)


def test_route_names_the_router_choice(classifier, reference) -> None:
    _, router = reference
    r = post(classifier, "/route", {"text": "the drummer kept the rhythm", "k": 3})
    assert r.status_code == 200
    want = router.route(["the drummer kept the rhythm"], 3)[0]
    assert r.json()["experts"] == want.experts
    torch.testing.assert_close(r.json()["weights"], want.weights)
    assert want.experts[0] == "music"


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"text": "a cat"}, 200, ""),  # null expert: auto
    ({"text": "a cat", "expert": "unicorns"}, 404, "no expert named 'unicorns'"),
    ({"text": "a cat", "expert": "../../../etc/passwd"}, 404, "no expert named"),
    ({"text": "a cat", "task": 9}, 404, "no expert for task 9"),
    ({"text": "   "}, 400, "'text' is empty"),
    ({"text": "x" * 401}, 413, "401 characters, the limit is 400"),
    ({"text": "x" * 80_000}, 413, "the body is larger than 71936 bytes"),
    ({"text": "cat " * 60}, 413, "tokens, the limit is 40"),
    ({"text": 3}, 400, "'text' must be a string"),
    ({"text": "a cat", "expert": ["animals"]}, 400, "'expert' must be a string"),
    ({"text": "a cat", "path": "/tmp"}, 400, "unknown field 'path'"),
    ({"expert": "animals"}, 400, "'text' is required"),
])
def test_bad_predict_requests(classifier, body, status, says) -> None:
    r = post(classifier, "/predict", body)
    assert r.status_code == status, r.text
    if status != 200:
        assert says in r.json()["error"]["message"]
    assert post(classifier, "/predict", {"text": "still serving", "expert": "food"}).is_success


def test_other_endpoints(classifier) -> None:
    assert httpx.get(classifier + "/health").status_code == 200
    experts = httpx.get(classifier + "/experts").json()
    assert [e["name"] for e in experts["experts"]] == list(TOPICS)
    assert experts["router"] == "retrieval" and experts["kind"] == "store"
    r = post(classifier, "/v1/completions", {"model": "food", "prompt": "hi"})
    assert r.status_code == 404 and "classifier" in r.json()["error"]["message"]
    assert post(classifier, "/route", {"text": "a", "k": 9}).status_code == 400
    metrics = httpx.get(classifier + "/metrics").text
    assert 'moe_lora_requests_total{endpoint="/predict",code="4xx"}' in metrics
    assert "# TYPE moe_lora_request_seconds histogram" in metrics


# --------------------------------------------------------------------------- causal LM
@pytest.fixture(scope="module")
def lm_reference(lm_folder):
    folder = ServedFolder(lm_folder)
    bank = ExpertBank.load(lm_folder, LlamaForCausalLM.from_pretrained(folder.base_id).eval())
    tok = AutoTokenizer.from_pretrained(folder.base_id)

    def complete(prompt: str, expert: str, max_tokens: int) -> str:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = generate(bank, ids, routing=expert, max_new_tokens=max_tokens, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return complete, tok


PROMPTS = ["Once upon a time", "The weather today is", "def add(a, b):", "Paris is"]


def test_concurrent_greedy_completions_equal_generating_alone(lm_server, lm_reference) -> None:
    complete, _ = lm_reference
    jobs = [(p, e, 6 + 2 * i) for i, p in enumerate(PROMPTS) for e in ("a", "b", "c")]
    bodies = [{"model": e, "prompt": p, "max_tokens": m, "temperature": 0, "n": 2}
              for p, e, m in jobs]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda b: post(lm_server, "/v1/completions", b), bodies))
    for (prompt, expert, m), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        want = complete(prompt, expert, m)
        assert [c["text"] for c in body["choices"]] == [want, want]
        assert body["moe_lora"]["experts"] == [expert]
        assert body["usage"]["completion_tokens"] <= 2 * m


def test_stream_equals_the_whole_answer(lm_server) -> None:
    body = {"model": "b", "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 8, "temperature": 0}
    whole = post(lm_server, "/v1/chat/completions", body).json()
    text, finish = "", None
    with httpx.stream("POST", lm_server + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        for c in json.loads(e)["choices"]:
            text += c["delta"].get("content", "")
            finish = c["finish_reason"] or finish
    assert text == whole["choices"][0]["message"]["content"]
    assert finish == whole["choices"][0]["finish_reason"] == "length"


def test_sampling_choices_and_stop_strings(lm_server, lm_reference) -> None:
    complete, _ = lm_reference
    r = post(lm_server, "/v1/completions", {"model": "c", "prompt": "Paris is", "n": 3,
                                           "temperature": 1.0, "top_p": 0.9, "max_tokens": 5})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    full = complete("Paris is", "a", 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    r = post(lm_server, "/v1/completions", {"model": "a", "prompt": "Paris is", "max_tokens": 12,
                                           "temperature": 0, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "a", "prompt": "hi", "max_tokens": 33}, 400, "'max_tokens' must be in [1, 32]"),
    ({"model": "a", "prompt": "hi", "n": 0}, 400, "'n' must be in"),
    ({"model": "a", "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"model": "zzz", "prompt": "hi"}, 404, "no expert named 'zzz'"),
    ({"model": "auto", "prompt": "hi"}, 422, "needs a router"),
    ({"model": "a"}, 400, "'prompt' is required"),
    ({"model": "a", "prompt": "hi", "stop": [""]}, 400, "'stop'"),
])
def test_bad_completion_requests(lm_server, body, status, says) -> None:
    r = post(lm_server, "/v1/completions", body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]
    chat = post(lm_server, "/v1/chat/completions", {"model": "a", "messages": [{"role": "x"}]})
    assert chat.status_code == 400
    assert post(lm_server, "/predict", {"text": "hi", "expert": "a"}).status_code == 404


@pytest.mark.slow
def test_smollm2_bank_answers_completions(tmp_path, smollm2) -> None:
    """The embedded SmolLM2 with two experts: concurrent greedy completions per expert equal
    generating each prompt alone in-process."""
    model, tok = smollm2
    bank = random_smollm2_bank(model)
    bank.save(tmp_path / "smol")
    prompts = ["The capital of France is", "def fibonacci(n):", "Roses are red,"]
    jobs = [(p, e) for p in prompts for e in ("poet", "coder")]
    want = {}
    for p, e in jobs:
        ids = tok(p, return_tensors="pt")["input_ids"]
        out = generate(bank, ids, routing=e, max_new_tokens=8, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        want[p, e] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with running_servers((tmp_path / "smol", ("--max-batch-size", "8", "--batch-timeout",
                                              "0.1"))) as (url,):
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda j: post(url, "/v1/completions", {
                "model": j[1], "prompt": j[0], "max_tokens": 8, "temperature": 0}), jobs))
        chat = post(url, "/v1/chat/completions", {"model": "poet", "max_tokens": 4, "messages": [
            {"role": "user", "content": "Say hi"}]})
    for job, r in zip(jobs, answers, strict=True):
        assert r.json()["choices"][0]["text"] == want[job], job
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("which", ["classifier", "lm_server"])
def test_example_client_runs_fast(which, request) -> None:
    url = request.getfixturevalue(which)
    example = Path(__file__).resolve().parents[1] / "examples" / "serve_client.py"
    done = subprocess.run([sys.executable, str(example), "--url", url, "--fast"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "experts:" in done.stdout and "requests per batch" in done.stdout
    assert ("predict " in done.stdout) if which == "classifier" else ("stream " in done.stdout)
