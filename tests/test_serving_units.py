"""The serving pieces without a server: request checks, per-row sampling and stopping, metrics,
store chunking, OpenAI bodies, the CLI parser."""

from __future__ import annotations

import argparse
import queue
from pathlib import Path

import pytest
import torch
from serving_helpers import minilm_tokenizer, store_from_bank, tiny_encoder_folder

from moe_lora.serving import Predictor
from moe_lora.serving.classify import BankClassifier, load_heads
from moe_lora.serving.cli import add_serve_parser
from moe_lora.serving.config import ServeConfig
from moe_lora.serving.decoding import RowSampling, RowTracker
from moe_lora.serving.experts import ExpertPool, ResidencyError
from moe_lora.serving.folder import ServedFolder
from moe_lora.serving.metrics import Metrics
from moe_lora.serving.openai import CompletionFormat
from moe_lora.serving.requests import BadRequest, parse_body, parse_completion, parse_predict


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> ServedFolder:
    return ServedFolder(tiny_encoder_folder(tmp_path_factory.mktemp("units")))


def test_predict_selection(folder) -> None:
    cfg = ServeConfig()
    assert parse_predict({"text": "x", "expert": "food"}, folder, cfg).selection.expert == "food"
    assert parse_predict({"text": "x", "task": 1}, folder, cfg).selection.mode == "task"
    assert parse_predict({"text": "x", "task": "1"}, folder, cfg).selection.task == "1"
    assert parse_predict({"text": "x", "expert": None}, folder, cfg).selection.mode == "auto"
    with pytest.raises(BadRequest, match="'text' must be a string") as err:
        parse_predict({"text": True}, folder, cfg)
    assert err.value.status == 400
    with pytest.raises(BadRequest, match="malformed JSON"):
        parse_body(b"\xff\xfe")


def test_completion_limits(folder) -> None:
    cfg = ServeConfig(max_new_tokens=10, max_choices=2)
    job = parse_completion({"model": "food", "prompt": "hi", "stop": "\n", "temperature": 0},
                           folder, cfg, chat=False)
    assert (job.stop, job.temperature, job.max_tokens) == (["\n"], 0.0, 10)
    base = parse_completion({"model": folder.base_id, "prompt": "hi", "max_tokens": 10}, folder,
                            cfg, chat=False)
    assert base.selection.mode == "base"
    for bad, says in (({"n": 3}, "'n' must be in [1, 2]"), ({"top_p": 0}, "'top_p'"),
                      ({"max_tokens": True}, "must be an integer"),
                      ({"temperature": float("nan")}, "must be a number")):
        with pytest.raises(BadRequest, match=says.replace("[", r"\[").replace("]", r"\]")):
            parse_completion({"model": "food", "prompt": "hi", **bad}, folder, cfg, chat=False)


def test_row_sampling_greedy_rows_and_nucleus() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    out = RowSampling(torch.tensor([0.0, 1.0, 0.5]), torch.tensor([1.0, 0.6, 1.0]))(None, scores)
    assert torch.isfinite(out[0]).tolist() == [False, True, False, False]  # greedy: argmax
    assert torch.softmax(scores[1], -1)[1] > 0.6  # token 1 alone covers top-p 0.6
    assert torch.isfinite(out[1]).tolist() == [False, True, False, False]
    torch.testing.assert_close(out[2], scores[2] / 0.5)


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(i) for i in ids)


def test_row_tracker_stops_rows_and_holds_back_stop_prefixes() -> None:
    out: queue.Queue = queue.Queue()
    tracker = RowTracker(_CharTokenizer(), 1, [10, 3], [["END"], []], {0}, out)
    steps = []
    text = "abEND"
    for i in range(len(text)):
        ids = torch.tensor([[1] + [ord(c) for c in text[: i + 1]], [1] + [ord("x")] * (i + 1)])
        done = tracker(ids, None)
        steps.append(out.get())
    sent0 = "".join(s[0][0] for s in steps if 0 in s)
    assert sent0 == "ab" and tracker.rows[0].finish == "stop"
    assert [s[0] for s in steps[2:4]] == [("", None), ("", None)]  # "E", "EN" held back
    assert tracker.rows[1].finish == "length" and tracker.rows[1].text == "xxx"
    assert done.tolist() == [True, True]


def test_metrics_prometheus_text() -> None:
    m = Metrics()
    m.observe_request("/predict", 200, 0.02)
    m.observe_request("/predict", 404, 0.001)
    m.observe_request("/nowhere", 200, 1.0)  # ignored
    m.observe_batch(5)
    m.publish_store(0, 3, 2, 1, 2)
    text = m.prometheus()
    assert 'moe_lora_requests_total{endpoint="/predict",code="2xx"} 1' in text
    assert 'moe_lora_requests_total{endpoint="/predict",code="4xx"} 1' in text
    assert 'moe_lora_request_seconds_bucket{endpoint="/predict",le="0.025"} 2' in text
    assert 'moe_lora_batch_size_bucket{le="4"} 0' in text and "moe_lora_batch_size_sum 5" in text
    assert "moe_lora_store_evictions_total 1" in text and m.batches() == (1, 5)


def test_store_chunks_fit_the_bound_and_resident_go_first(folder, tmp_path) -> None:
    store = ServedFolder(store_from_bank(folder.path, tmp_path / "store"))
    from transformers import BertModel

    pool = ExpertPool.open(store, BertModel.from_pretrained(folder.base_id), max_resident=2)
    pool.routing([[("food", 1.0)]])
    choices = [[("animals", 1.0)], [("music", 0.5), ("sports", 0.5)], [("food", 1.0)],
               [("animals", 1.0)], []]
    chunks = pool.chunks(choices)
    assert sorted(i for c in chunks for i in c) == list(range(5))
    for c in chunks:
        assert len({n for i in c for n, _ in choices[i]}) <= 2
    assert 2 in chunks[0]  # "food" is resident: its chunk runs first
    assert pool.prefetch(["food"]) is None and pool.prefetch(["music"]).result() > 0
    routing = pool.routing([choices[1], []])
    assert routing.indices.tolist()[1] == [-1, -1] and pool.stats()[1] == 3
    three = [("animals", 0.4), ("music", 0.3), ("sports", 0.3)]
    with pytest.raises(ResidencyError, match="need 3 experts at once"):
        pool.routing([three])
    picks = {"a": three, "b": [("food", 1.0)]}
    clf = BankClassifier(pool, minilm_tokenizer(), load_heads(store),
                         lambda texts, e, t: [picks[x] for x in texts])
    answers = clf.predict(["a", "b"], [None, None], [None, None])
    assert answers[0]["status"] == 503 and answers[1]["experts"] == ["food"]


def test_bank_classifier_is_a_predictor(folder) -> None:
    assert isinstance(BankClassifier(None, minilm_tokenizer(), {}, lambda *a: []), Predictor)


def test_completion_format_collects_choices() -> None:
    fmt = CompletionFormat("a", chat=True, n=2)
    items = [{"choices": [{"index": 1, "text": "he", "finish_reason": None}]},
             {"choices": [{"index": 1, "text": "y", "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
              "route": {"experts": ["a"], "weights": [1.0]}}]
    body = fmt.response(items)
    assert [c["message"]["content"] for c in body["choices"]] == ["", "hey"]
    assert body["choices"][1]["finish_reason"] == "stop" and body["moe_lora"]["experts"] == ["a"]
    chunks = fmt.chunks(items[0], opening=True)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and len(chunks) == 3
    assert fmt.chunks(items[1])[-1]["usage"]["total_tokens"] == 3


def test_cli_flags_map_onto_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(tmp_path), "--port", "9001", "--max-resident", "3",
                              "--batch-timeout", "0.1"])
    assert (args.port, args.max_resident, args.batch_timeout, args.host) == (9001, 3, 0.1,
                                                                            "127.0.0.1")
    from moe_lora.serving.cli import cmd_serve

    assert cmd_serve(args) == 2  # not a bank folder: a clear error, no server
    with pytest.raises(ValueError, match="ServeConfig.port"):
        ServeConfig(port=80)
