"""Routing cases: a learned top-k router's own cost (7) and retrieval over expert keys (8)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from benchmarks.fixtures import load_model, make_bank, token_batch
from benchmarks.harness import Goal, Row, Settings, Timing, check_close, time_interleaved

__all__ = ["case_router", "case_retrieval"]


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _layer_inputs(bank: object, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each LoRA layer's input of one base forward, captured by hooks."""
    seen: dict[str, Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, p=path: seen.__setitem__(p, args[0]))
        for path, layer in bank.layers.items()  # type: ignore[attr-defined]
    ]
    with torch.no_grad(), bank.use(None):  # type: ignore[attr-defined]
        bank.model(**batch)  # type: ignore[attr-defined]
    for h in hooks:
        h.remove()
    return seen


def case_router(s: Settings) -> list[Row]:
    """7. A learned top-2 router over 64 experts: its gates' cost as a share of the base forward."""
    goal = Goal("<=", 5.0)
    topk = _optional("moe_lora.routers.topk")
    if topk is None:
        return [Row.pending("7", "learned router, 64 experts, % of base forward", goal,
                            "moe_lora.routers.topk not there yet")]
    b, t_len, n_exp = (16, 64, 64) if not s.quick else (2, 8, 8)
    bank = make_bank(load_model("minilm", s), "minilm", n_exp)
    router = topk.TopKRouter(topk.TopKConfig(k=2), bank).attach()
    router.gates = {p: g.to(s.device) for p, g in router.gates.items()}
    batch = token_batch(bank.model, b, t_len, s)
    xs = _layer_inputs(bank, batch)
    layers = bank.layers

    def gates() -> list[object]:
        with torch.no_grad():
            return [layers[p].gate(x, layers[p]) for p, x in xs.items()]  # type: ignore[misc]

    def base() -> Tensor:
        with torch.no_grad(), bank.use(None):
            return bank.model(**batch).last_hidden_state

    def gated() -> Tensor:
        with torch.no_grad(), bank.use(router.routing()):
            return bank.model(**batch).last_hidden_state

    def dispatched(mode: str) -> Callable[[], Tensor]:
        def run() -> Tensor:
            bank.ctx.token_dispatch = mode
            try:
                return gated()
            finally:
                bank.ctx.token_dispatch = "auto"
        return run

    path, x = next(iter(xs.items()))
    out = layers[path].gate(x, layers[path])  # type: ignore[misc]
    probs = torch.softmax(x.reshape(-1, x.shape[-1]).float() @ layers[path].gate.weight.t(), -1)
    top_p, top = probs.topk(2, -1)
    check_close("gate's top-2 ids vs softmax(x W^T).topk", out.routing.indices.reshape(-1, 2), top, s)
    check = check_close("gate's weights vs renormalised top-2 probs", out.routing.weights.reshape(
        -1, 2), top_p / top_p.sum(-1, keepdim=True), s)
    same = check_close("gated forward, dense token dispatch vs sorted loop",
                       dispatched("dense")(), dispatched("loop")(), s)
    same_g = check_close("gated forward, grouped token dispatch vs sorted loop",
                         dispatched("grouped")(), dispatched("loop")(), s)
    t = time_interleaved({"gates": gates, "base": base, "gated": gated,
                          "dense": dispatched("dense"), "grouped": dispatched("grouped"),
                          "loop": dispatched("loop")}, s)
    share = 100 * t["gates"].min_s / t["base"].min_s
    return [
        Row.measured("7", f"top-2 router, {n_exp} experts, {b}x{t_len}: gates as % of base fwd",
                     share, "%", goal, check, a_name="gates", b_name="base", a=t["gates"],
                     b=t["base"]),
        Row.ratio("7", f"gated forward (router + top-2 of {n_exp} experts) vs base (reference)",
                  ("gated", t["gated"]), ("base", t["base"]), None, "timing only"),
        Row.launches("7", f"gated forward vs base: kernels per forward (reference; dispatch "
                     f"{'dense' if s.device.startswith('cuda') else 'grouped'})", gated, base),
        Row.ratio("7", f"token dispatch, top-2 of {n_exp}: dense masked vs sorted loop (reference)",
                  ("dense", t["dense"]), ("loop", t["loop"]), None, same),
        Row.ratio("7", f"token dispatch, top-2 of {n_exp}: grouped matmuls vs sorted loop "
                  "(reference)", ("grouped", t["grouped"]), ("loop", t["loop"]), None, same_g),
    ]


def _gloss_texts(n: int) -> list[str]:
    """``n`` WordNet gloss texts spread over the whole set."""
    from moe_lora.data.wordnet import load_glosses

    glosses = load_glosses()
    return [g.text for g in glosses[:: max(1, len(glosses) // n)][:n]]


@functools.lru_cache(maxsize=2)
def _gloss_embeddings(n: int) -> np.ndarray:
    """``n`` real MiniLM embeddings of WordNet glosses (cached across thread settings)."""
    from moe_lora.memory.embedder import Embedder

    return Embedder().encode(_gloss_texts(n))


def _index(memory: ModuleType, keys: np.ndarray, kind: str) -> object:
    index = memory.ExpertIndex(memory.IndexConfig(dim=keys.shape[1], kind=kind))
    for i, key in enumerate(keys):
        index.add_expert(i, key[None])
    return index


def _search_rows(memory: ModuleType, s: Settings) -> list[Row]:
    import faiss

    n_keys, d = (10_000, 384) if not s.quick else (1_000, 384)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n_keys, d)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = keys[rng.integers(0, n_keys, 64)] + 0.1 * rng.standard_normal((64, d)).astype(
        np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = _index(memory, keys, "flat")
    raw = faiss.IndexFlatIP(d)
    raw.add(keys)
    ids, _ = index.search(queries, 10)
    _, raw_ids = raw.search(queries, 10)
    if not np.array_equal(ids, raw_ids):
        raise AssertionError("ExpertIndex top-10 differs from faiss.IndexFlatIP")
    check = "top-10 ids equal to a bare faiss.IndexFlatIP"
    rounds = max(5 * s.rounds, 20)
    rows = []
    for n_q, goal in ((1, Goal("<=", 0.5)), (64, Goal("<=", 0.2))):
        q = queries[:n_q]
        fns: dict[str, Callable[[], object]] = {
            "ExpertIndex": lambda q=q: index.search(q, 10),
            "faiss flat": lambda q=q: raw.search(q, 10),
        }
        t = time_interleaved(fns, s, rounds)
        per_query = {k: Timing(v.min_s / n_q, v.median_s / n_q, v.rounds) for k, v in t.items()}
        rows.append(Row.measured(
            "8", f"exact top-10 over {n_keys} keys (d={d}), batch {n_q}: ms per query",
            1e3 * per_query["ExpertIndex"].min_s, "ms", goal, check, a_name="ExpertIndex",
            b_name="faiss flat", a=per_query["ExpertIndex"], b=per_query["faiss flat"]))
    return rows


def _recall_row(memory: ModuleType, s: Settings) -> Row:
    n_keys, n_q = (5_000, 200) if not s.quick else (300, 20)
    emb = _gloss_embeddings(n_keys + n_q)
    keys, queries = emb[:n_keys], emb[n_keys:]
    exact, _ = _index(memory, keys, "flat").search(queries, 10)
    approx, _ = _index(memory, keys, "hnsw").search(queries, 10)
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)]))
    return Row.measured("8", f"HNSW recall@10 vs exact, {n_keys} WordNet-gloss MiniLM keys",
                        recall, "recall", Goal(">=", 0.95),
                        f"{n_q} held-out gloss queries; default IndexConfig (M=32, efSearch=64)")


def _routing_rows(memory: ModuleType, s: Settings) -> list[Row]:
    goal = Goal("<=", 2.0)
    what = "retrieval routing as % of the base forward"
    retrieval = _optional("moe_lora.routers.retrieval")
    if retrieval is None:
        return [Row.pending("8", what, goal, "moe_lora.routers.retrieval not there yet")]
    return _retrieval_routing(retrieval, memory, what, goal, s)


def _retrieval_routing(retrieval: ModuleType, memory: ModuleType, what: str, goal: Goal,
                       s: Settings) -> list[Row]:
    from moe_lora import ExpertBank, ExpertConfig, RouterInput
    from moe_lora.routers.base import RetrievalConfig

    n_exp, b, t_len = (1000, 64, 32) if not s.quick else (20, 4, 8)
    holder = _Holder()
    bank = ExpertBank(holder, targets=["proj"])
    for i in range(n_exp):
        bank.add_expert(f"e{i}", ExpertConfig(rank=8), trainable=False)
    router = retrieval.RetrievalRouter(RetrievalConfig(k=3), bank)
    texts = _gloss_texts(n_exp + b)
    keys = router.embed(texts[:n_exp]).numpy()
    index = _index(memory, keys, "flat")
    router = retrieval.RetrievalRouter(RetrievalConfig(k=3), bank, router.embedder, index,
                                       {i: f"e{i}" for i in range(n_exp)})
    queries = RouterInput(texts=texts[n_exp:])
    model = load_model("minilm", s)
    batch = token_batch(model, b, t_len, s)
    out = router.route(queries)  # also warms the embedder's cache
    ref = np.argsort(-(router.embed(queries.texts).numpy() @ keys.T), axis=1, kind="stable")[:, :3]
    if not np.array_equal(out.indices.numpy(), ref):
        raise AssertionError("RetrievalRouter top-3 differs from brute-force similarity")
    check = "top-3 bank indices equal to brute-force argsort of q . keys"

    def cold() -> Tensor:
        router.embedder.clear_cache()
        return router.embed(queries.texts)

    def base() -> Tensor:
        with torch.no_grad():
            return model(**batch).last_hidden_state

    t = time_interleaved({"route": lambda: router.route(queries), "embed": cold, "base": base}, s)
    router.embed(queries.texts)
    share = 100 * t["route"].min_s / t["base"].min_s
    return [
        Row.measured("8", f"{what}, {n_exp} experts, texts' embeddings cached", share, "%", goal,
                     check, a_name="route", b_name=f"base {b}x{t_len}", a=t["route"], b=t["base"]),
        Row.measured("8", f"embedding the {b} texts (cold cache) as % of the base forward",
                     100 * t["embed"].min_s / t["base"].min_s, "%", None, "timing only",
                     a_name="embed", b_name=f"base {b}x{t_len}", a=t["embed"], b=t["base"]),
    ]


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)


def case_retrieval(s: Settings) -> list[Row]:
    """8. Exact top-10 search speed, HNSW recall on real embeddings, retrieval routing cost."""
    memory = _optional("moe_lora.memory.index")
    if memory is None:
        return [Row.pending("8", "retrieval", None, "moe_lora.memory not there yet")]
    import faiss

    faiss.omp_set_num_threads(s.threads)
    return [*_search_rows(memory, s), _recall_row(memory, s), *_routing_rows(memory, s)]

