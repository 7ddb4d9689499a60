"""Dynamic adapter retrieval at inference: each query gets its own LoRA experts, found by FAISS.

1. Train one LoRA expert of the real MiniLM per group of WordNet supersenses (a prototype
   classifier over the group's classes) and save every expert into an on-disk AdapterStore.
2. Index each expert by the MiniLM embeddings of a few of its training texts (LoRARetriever's
   expert keys, arXiv 2402.09997).
3. Answer a batch of mixed queries: embed, search top-1 expert per query, load the experts on
   demand (at most ``--resident`` in memory), and run ONE heterogeneous batch forward.

Run: ``python examples/dynamic_retrieval.py`` (about a minute on CPU) or ``--fast``.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
import torch.nn.functional as F

from moe_lora import ExpertBank, ExpertConfig
from moe_lora.data.wordnet import load_glosses
from moe_lora.memory import Embedder, ExpertIndex, IndexConfig
from moe_lora.memory.store import AdapterStore
from moe_lora.models import load_base

GROUPS = [
    ["noun.animal", "noun.plant", "noun.food"],
    ["noun.person", "noun.group", "noun.location"],
    ["verb.motion", "verb.communication", "verb.change"],
    ["noun.artifact", "noun.substance", "noun.body"],
]


def pooled(model, tok, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [N, 384] (sentence-transformers pooling)."""
    enc = tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def prototype_logits(emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    return emb @ protos.t() / 0.05


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="tiny sizes, for the test suite")
    ap.add_argument("--resident", type=int, default=2, help="experts held in memory at once")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    n_train, n_test, steps = (24, 6, 6) if args.fast else (96, 20, 30)

    by_class: dict[str, list[str]] = {}
    for g in load_glosses():
        by_class.setdefault(g.lexname, []).append(g.text)
    data = {c: rng.sample(by_class[c], n_train + n_test) for grp in GROUPS for c in grp}

    base = load_base("minilm")
    model, tok = base.model, base.tokenizer
    bank = ExpertBank(model, targets="auto", base_id="minilm")
    with torch.no_grad():  # class prototypes from the frozen base
        protos = {c: F.normalize(pooled(model, tok, t[:n_train]).mean(0), dim=0) for c, t in data.items()}

    store = AdapterStore(tempfile.mkdtemp(prefix="moe-lora-store-"), bank, max_experts=args.resident)
    embedder = Embedder()
    index = ExpertIndex(IndexConfig(dim=embedder.dim, mode="centroid"))
    for gi, group in enumerate(GROUPS):
        name = f"group{gi}"
        bank.add_expert(name, ExpertConfig(rank=8, alpha=16), task=gi)
        opt = torch.optim.AdamW(bank.trainable_parameters(), lr=2e-3)
        gp = torch.stack([protos[c] for c in group])
        texts = [(t, j) for j, c in enumerate(group) for t in data[c][:n_train]]
        with bank.use(name):
            for _ in range(steps):
                batch = rng.sample(texts, 16)
                logits = prototype_logits(pooled(model, tok, [t for t, _ in batch]), gp)
                loss = F.cross_entropy(logits, torch.tensor([j for _, j in batch]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        bank.info(name).trained_steps = steps
        bank.freeze(name)
        store.put(bank, name, expert_id=gi)
        index.add_expert(gi, embedder.encode([t for t, _ in texts[:: max(1, len(texts) // 32)]]))
        bank.remove_expert(name)  # the store owns it now; loaded back on demand

    queries = [(t, gi, j) for gi, grp in enumerate(GROUPS) for j, c in enumerate(grp)
               for t in data[c][n_train:]]
    rng.shuffle(queries)
    texts = [q for q, _, _ in queries]
    ids, _ = index.search(embedder.encode(texts), k=1)  # [N, 1] store expert ids
    ids_t = torch.from_numpy(ids)
    order = torch.argsort(ids_t[:, 0], stable=True)  # batches by expert: few swaps in the store
    adapted = torch.empty(len(texts), embedder.dim)
    with torch.no_grad():
        for chunk in order.split(16):  # each a heterogeneous batch of <= 2 experts
            with bank.use(store.routing(ids_t[chunk])):  # loads / evicts, store ids -> bank
                adapted[chunk] = pooled(model, tok, [texts[i] for i in chunk.tolist()])
        plain = pooled(model, tok, texts)
    right_expert = right_adapted = right_plain = 0
    for b, (_, gi, j) in enumerate(queries):
        g = int(ids[b, 0])
        gp = torch.stack([protos[c] for c in GROUPS[g]])
        right_expert += g == gi
        right_adapted += g == gi and int(prototype_logits(adapted[b], gp).argmax()) == j
        right_plain += g == gi and int(prototype_logits(plain[b], gp).argmax()) == j
    n = len(queries)
    result = {
        "queries": n,
        "retrieval_accuracy": right_expert / n,
        "accuracy_with_retrieved_expert": right_adapted / n,
        "accuracy_base_model": right_plain / n,
        "store_misses": store.stats.misses,
        "store_evictions": store.stats.evictions,
    }
    print(f"{n} queries, {len(GROUPS)} experts on disk, at most {args.resident} resident")
    for k, v in result.items():
        print(f"  {k:32s} {v:.3f}" if isinstance(v, float) else f"  {k:32s} {v}")
    return result


if __name__ == "__main__":
    main()
