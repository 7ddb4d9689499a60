"""Retrieval routing (LoRARetriever): hand-computed weights, mixture and fusion forwards, and real
retrieval of WordNet glosses embedded by MiniLM."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from moe_lora import ExpertBank, ExpertConfig, RouterInput, Routing
from moe_lora.memory import ExpertIndex, IndexConfig
from moe_lora.routers import RetrievalConfig, RetrievalRouter, TopKConfig, TopKRouter

torch.set_num_threads(1)


class TableEncoder:
    """A fake embedder: each text's vector from a table (normalised); records the prefix used."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = {t: np.asarray(v, np.float32) / np.linalg.norm(v) for t, v in table.items()}
        self.prefixes: set[str | None] = set()

    def encode(self, texts, prefix=None):
        self.prefixes.add(prefix)
        return np.stack([self.table[t] for t in texts])


def small_bank(n_experts: int = 3, ranks=(2, 2, 2)) -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(nn.Sequential(nn.Linear(4, 3)), targets="all-linear")
    for e in range(n_experts):
        bank.add_expert(
            f"e{e}", ExpertConfig(rank=ranks[e], alpha=3, init="random"), trainable=False
        )
        for p in bank.expert_parameters(f"e{e}").values():
            nn.init.normal_(p, std=0.5)
    return bank


KEYS = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1]}
QUERIES = {"q0": [3, 1, 0], "q1": [0, 1, 2], "q2": [1, 2, 1.5]}  # no ties


def table_router(**cfg) -> tuple[RetrievalRouter, ExpertBank, TableEncoder]:
    bank = small_bank()
    enc = TableEncoder(KEYS | QUERIES)
    router = RetrievalRouter(RetrievalConfig(**cfg), bank, embedder=enc)
    for name, key in zip(["e2", "e0", "e1"], ["a", "b", "c"], strict=True):  # ids != bank order
        router.index_expert(name, [key])
    return router, bank, enc


def cosines(query: str) -> dict[str, float]:
    q = np.asarray(QUERIES[query], np.float32)
    q = q / np.linalg.norm(q)
    keys = {"e2": "a", "e0": "b", "e1": "c"}
    return {n: float(q @ np.asarray(KEYS[k], np.float32)) for n, k in keys.items()}


@pytest.mark.parametrize("weighting", ["uniform", "softmax"])
def test_weights_match_hand_computation(weighting):
    router, bank, enc = table_router(k=2, weighting=weighting, temperature=0.5, prefix="P: ")
    out = router.route(RouterInput(texts=list(QUERIES)))
    assert enc.prefixes == {"P: "}
    for b, q in enumerate(QUERIES):
        sims = cosines(q)
        top = sorted(sims, key=lambda n: -sims[n])[:2]
        assert out.indices[b].tolist() == [bank.index(n) for n in top]
        np.testing.assert_allclose(
            out.extras["scores"][b].numpy(), [sims[n] for n in top], rtol=1e-6
        )
        s = torch.tensor([sims[n] for n in top])
        expected = torch.full((2,), 0.5) if weighting == "uniform" else torch.softmax(s / 0.5, 0)
        torch.testing.assert_close(out.weights[b], expected)
        torch.testing.assert_close(router.last_weights[b, out.indices[b]], expected)
    assert router.last_weights.shape == (3, 3)


def hand_delta(layer, x_b, ids, ws, fuse: bool):
    fs = [layer.experts[i] for i in ids]
    if fuse:
        a = sum(w * f.lora_A for w, f in zip(ws, fs, strict=True))
        b = sum(w * f.scale * f.lora_B for w, f in zip(ws, fs, strict=True))
        return b @ (a @ x_b)
    return sum(w * f.scale * f.lora_B @ (f.lora_A @ x_b) for w, f in zip(ws, fs, strict=True))


@pytest.mark.parametrize("composition", ["mixture", "fusion"])
def test_mixture_and_fusion_forwards_match_hand_computation(composition):
    router, bank, _ = table_router(
        k=2, weighting="softmax", temperature=0.5, composition=composition
    )
    batch = RouterInput(texts=list(QUERIES))
    out = router.route(batch)
    x = torch.randn(3, 4)
    with torch.no_grad(), bank.use(router.routing(batch)):
        y = bank.model(x)
    layer = bank.layers["0"]
    with torch.no_grad():
        for b in range(3):
            ids, ws = out.indices[b].tolist(), out.weights[b].tolist()
            expected = layer.base(x[b]) + hand_delta(layer, x[b], ids, ws, composition == "fusion")
            torch.testing.assert_close(y[b], expected)
            other = layer.base(x[b]) + hand_delta(layer, x[b], ids, ws, composition != "fusion")
            assert not torch.allclose(y[b], other)  # fusion and mixture really differ


def test_fusion_refuses_other_gates_and_mixture_keeps_up_with_the_bank():
    router, bank, enc = table_router(k=1, composition="fusion")
    TopKRouter(TopKConfig(), bank).attach()
    with pytest.raises(RuntimeError, match="other gates"):
        router.routing(RouterInput(texts=["q0"]))
    bank.detach_gates()
    router.routing(RouterInput(texts=["q0"]))  # attaches its fusion gates

    router, bank, enc = table_router(k=1)
    enc.table["d"] = np.asarray([1, 0.1, 0], np.float32)
    bank.add_expert("late", ExpertConfig(rank=2))
    router.index_expert("late", ["d"])
    out = router.route(RouterInput(texts=["q0"]))
    assert out.indices.tolist() == [[bank.index("late")]]
    bank.remove_expert("e0")  # bank indices shift; names keep the index right
    router.remove_expert("e0")
    assert router.route(RouterInput(texts=["q0"])).indices.tolist() == [[bank.index("late")]]
    bank.remove_expert("e1")
    with pytest.raises(KeyError, match="e1"):
        router.route(RouterInput(texts=["q1"]))


@pytest.mark.parametrize("temperature", [0.05, 2.0])
def test_exemplar_vote_uses_the_configured_temperature(temperature):
    """The index the router builds votes with ``softmax(s / T)``, T = ``config.temperature``."""
    bank = small_bank()
    enc = TableEncoder(KEYS | QUERIES)
    router = RetrievalRouter(
        RetrievalConfig(k=3, mode="exemplar", n_neighbors=3, temperature=temperature),
        bank, embedder=enc,
    )
    router.index_expert("e0", ["a", "b"])  # e0 gets two keys, e1 one
    router.index_expert("e1", ["c"])
    out = router.route(RouterInput(texts=["q2"]))
    sims = torch.tensor([cosines("q2")[n] for n in ("e2", "e0", "e1")])  # keys a, b, c
    votes = torch.softmax(sims / temperature, 0)
    expected = {"e0": float(votes[0] + votes[1]), "e1": float(votes[2])}
    got = {bank.names[i]: float(s) for i, s in zip(out.indices[0], out.extras["scores"][0], strict=True)
           if i >= 0}
    assert got == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- real text
GROUPS = {
    "nature": ["noun.animal", "noun.plant"],
    "people": ["noun.person", "noun.group"],
    "place_time": ["noun.location", "noun.time"],
    "movement": ["verb.motion", "verb.contact"],
    "food": ["noun.food", "verb.consumption"],
}
N_KEYS, N_QUERIES = 40, 30  # per supersense: 5 x 2 x 70 = 700 glosses embedded


@pytest.fixture(scope="module")
def glosses():
    from moe_lora.data.wordnet import load_glosses

    by_lex: dict[str, list[str]] = {}
    for g in load_glosses():
        by_lex.setdefault(g.lexname, []).append(g.text)
    rng = random.Random(0)
    keys, queries = {}, []
    for name, lexnames in GROUPS.items():
        keys[name] = []
        for lex in lexnames:
            texts = rng.sample(by_lex[lex], N_KEYS + N_QUERIES)
            keys[name] += texts[:N_KEYS]
            queries += [(t, name) for t in texts[N_KEYS:]]
    return keys, queries


@pytest.fixture(scope="module")
def embedder():
    from moe_lora.memory import Embedder

    return Embedder()


def gloss_bank() -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(nn.Sequential(nn.Linear(4, 3)), targets="all-linear")


@pytest.mark.parametrize("mode", ["centroid", "exemplar"])
def test_routes_wordnet_glosses_to_their_supersense_expert(glosses, embedder, mode):
    keys, queries = glosses
    bank = gloss_bank()
    router = RetrievalRouter(RetrievalConfig(k=1, mode=mode), bank, embedder=embedder)
    for name, texts in keys.items():
        bank.add_expert(name, ExpertConfig(rank=2))
        router.index_expert(name, texts)
    out = router.route(RouterInput(texts=[t for t, _ in queries]))
    gold = torch.tensor([bank.index(n) for _, n in queries])
    accuracy = float((out.indices[:, 0] == gold).float().mean())
    assert accuracy > 0.6, accuracy  # chance: 1 / 5 (measured: centroid 0.82, exemplar 0.75)


def test_index_grown_one_expert_at_a_time_matches_one_built_at_once(glosses, embedder):
    keys, queries = glosses
    texts = [t for t, _ in queries[::3]]
    bank = gloss_bank()
    grown = RetrievalRouter(RetrievalConfig(k=3), bank, embedder=embedder)
    for name, key_texts in keys.items():
        bank.add_expert(name, ExpertConfig(rank=2))
        grown.index_expert(name, key_texts)
        out = grown.route(RouterInput(texts=texts))  # usable after each step
        assert int(out.indices.max()) == len(bank) - 1 and out.indices.shape[1] == 3

    index = ExpertIndex(IndexConfig(dim=embedder.dim))
    for i, name in enumerate(keys):
        index.add_expert(i, grown.embed(keys[name]))
    at_once = RetrievalRouter(
        RetrievalConfig(k=3), bank, embedder=embedder, index=index, names=dict(enumerate(keys))
    )
    a, b = grown.route(RouterInput(texts=texts)), at_once.route(RouterInput(texts=texts))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.extras["scores"], b.extras["scores"])

    # ground truth: cosine to each expert's normalised mean key embedding
    cents = torch.stack([grown.embed(keys[n]).mean(0) for n in keys])
    cents = cents / cents.norm(dim=1, keepdim=True)
    sims = grown.embed(texts) @ cents.t()
    top = sims.topk(3, dim=1)
    assert torch.equal(a.indices, top.indices)
    torch.testing.assert_close(a.extras["scores"], top.values, rtol=1e-5, atol=1e-5)
    assert np.isclose(float(a.weights.sum(1).mean()), 1.0)
    with bank.use(Routing.from_output(a)):
        bank.model(torch.randn(len(texts), 4))
