"""ExpertIndex: exact search against brute force, id bookkeeping, persistence, approximate recall."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from storage_helpers import edit_json, recommit, version_dir

from moe_lora.core.io import CorruptFileError
from moe_lora.memory import Embedder, EmbedderConfig, ExpertIndex, IndexConfig, IndexMismatchError

torch.set_num_threads(1)
faiss.omp_set_num_threads(1)

DIM = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_experts(seed: int, ids=(3, 10, 11, 42, 7, 100, 5)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: unit(rng.normal(size=(int(rng.integers(1, 9)), DIM))) for i in ids}


def build(experts: dict[int, np.ndarray], **config) -> ExpertIndex:
    index = ExpertIndex(IndexConfig(dim=DIM, **config))
    for i, keys in experts.items():
        index.add_expert(i, keys)
    return index


def top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference ranking of one query: best score first, ties by lower id, padded to k."""
    order = np.lexsort((ids, -scores))[:k]
    out_ids, out_scores = np.full(k, -1), np.full(k, -np.inf, dtype=np.float32)
    out_ids[: len(order)], out_scores[: len(order)] = ids[order], scores[order]
    return out_ids, out_scores


def brute_centroid(experts, queries, k, metric="ip"):
    ids = np.array(sorted(experts))
    cents = np.stack([experts[i].mean(0) for i in ids])
    if metric == "ip":
        sims = queries @ unit(cents).T
    else:
        sims = -((queries[:, None, :] - cents[None]) ** 2).sum(-1)
    rows = [top_k(ids, s, k) for s in sims]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def brute_exemplar(experts, queries, k, n_neighbors, temperature):
    labels = np.concatenate([np.full(len(v), i) for i, v in sorted(experts.items())])
    keys = np.concatenate([v for _, v in sorted(experts.items())])
    rows = []
    for s in queries @ keys.T:
        near = np.argsort(-s, kind="stable")[:n_neighbors]
        w = np.exp((s[near] - s[near].max()) / temperature)
        w /= w.sum()
        ids = np.unique(labels[near])
        votes = np.array([w[labels[near] == i].sum() for i in ids])
        rows.append(top_k(ids, votes, k))
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


@pytest.mark.parametrize("field,value", [("mode", "nearest"), ("metric", "cos"), ("kind", "pq")])
def test_config_rejects_bad_choice_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"IndexConfig.{field}"):
        IndexConfig(dim=DIM, **{field: value})


def test_config_rejects_bad_numbers():
    with pytest.raises(ValueError, match="IndexConfig.dim"):
        IndexConfig(dim=0)
    with pytest.raises(ValueError, match="IndexConfig.temperature"):
        IndexConfig(dim=DIM, temperature=0.0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_centroid_search_equals_brute_force(metric):
    experts = random_experts(0)
    queries = unit(np.random.default_rng(1).normal(size=(20, DIM)))
    ids, scores = build(experts, metric=metric).search(queries, 4)
    ref_ids, ref_scores = brute_centroid(experts, queries, 4, metric)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_exact_exemplar_search_equals_brute_force():
    experts = random_experts(2)
    queries = unit(np.random.default_rng(3).normal(size=(20, DIM)))
    index = build(experts, mode="exemplar", n_neighbors=6, temperature=0.2)
    ids, scores = index.search(torch.from_numpy(queries), 3)
    ref_ids, ref_scores = brute_exemplar(experts, queries, 3, 6, 0.2)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_multi_centroid_scores_are_the_best_centroid_and_find_the_clusters():
    rng = np.random.default_rng(4)
    centers = {i: unit(rng.normal(size=(3, DIM))) for i in (0, 1, 2)}
    experts = {
        i: unit(np.repeat(c, 20, 0) + 0.05 * rng.normal(size=(60, DIM))) for i, c in centers.items()
    }
    index = build(experts, n_centroids=3)
    for i, c in centers.items():
        vecs = index.vectors(i)
        assert vecs.shape == (3, DIM)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
        assert (c @ vecs.T).max(axis=1).min() > 0.99  # every true cluster has a centroid
    queries = unit(rng.normal(size=(10, DIM)))
    ids, scores = index.search(queries, 3)
    best = {i: (queries @ index.vectors(i).T).max(axis=1) for i in experts}
    for b in range(len(queries)):
        ref_ids, ref_scores = top_k(
            np.array([0, 1, 2]), np.array([best[i][b] for i in (0, 1, 2)]), 3
        )
        np.testing.assert_array_equal(ids[b], ref_ids)
        np.testing.assert_allclose(scores[b], ref_scores, atol=1e-5)


@pytest.mark.parametrize("mode", ["centroid", "exemplar"])
def test_fewer_experts_than_k_are_padded(mode):
    experts = random_experts(5, ids=(8, 9))
    ids, scores = build(experts, mode=mode).search(unit(np.ones((2, DIM))), 5)
    assert set(ids[:, :2].ravel()) == {8, 9}
    assert (ids[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    empty_ids, _ = ExpertIndex(IndexConfig(dim=DIM)).search(unit(np.ones((1, DIM))), 2)
    assert (empty_ids == -1).all()


def test_bad_inputs_are_refused():
    index = build(random_experts(6, ids=(1,)))
    with pytest.raises(ValueError, match="already indexed"):
        index.add_expert(1, unit(np.ones((1, DIM))))
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        index.add_expert(2, np.ones((3, DIM + 1)))
    with pytest.raises(ValueError, match="2\\*\\*31"):
        index.add_expert(-1, unit(np.ones((1, DIM))))
    with pytest.raises(KeyError, match="expert 5"):
        index.remove_expert(5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(unit(np.ones((1, DIM))), 0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("mode", ["centroid", "exemplar"])
def test_add_remove_replace_keep_ids(kind, mode):
    # small index: HNSW (ef_search 64 > n_neighbors) and IVF (nprobe = nlist) search exactly
    config = dict(kind=kind, mode=mode, nlist=4, nprobe=4, n_neighbors=20, temperature=0.2)
    experts = random_experts(7, ids=range(0, 40, 2))
    index = build(experts, **config)
    queries = unit(np.random.default_rng(8).normal(size=(15, DIM)))
    index.search(queries, 3)  # trains IVF, so the edits below go to a live index
    index.remove_expert(4)
    index.remove_expert(30)
    new_keys = unit(np.random.default_rng(9).normal(size=(5, DIM)))
    index.replace_expert(10, new_keys)
    index.add_expert(41, unit(np.random.default_rng(10).normal(size=(2, DIM))))
    expected = {i: v for i, v in experts.items() if i not in (4, 30)} | {10: new_keys}
    expected[41] = index.keys(41)
    assert index.expert_ids == sorted(expected) and len(index) == len(expected)
    n_vectors = sum(len(v) for v in expected.values()) if mode == "exemplar" else len(expected)
    assert index.ntotal == n_vectors
    np.testing.assert_array_equal(index.keys(10), new_keys)
    ids, scores = index.search(queries, 3)
    if mode == "centroid":
        ref_ids, ref_scores = brute_centroid(expected, queries, 3)
    else:
        ref_ids, ref_scores = brute_exemplar(expected, queries, 3, 20, 0.2)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("mode", ["centroid", "exemplar"])
def test_save_load_gives_identical_results_and_continues(tmp_path, kind, mode):
    config = dict(kind=kind, mode=mode, nlist=4, nprobe=2, n_centroids=2, hnsw_m=8, ef_search=8)
    index = build(random_experts(11, ids=range(30)), **config)
    queries = unit(np.random.default_rng(12).normal(size=(25, DIM)))
    before = index.search(queries, 5)
    index.save(tmp_path)
    loaded = ExpertIndex.load(tmp_path)
    assert loaded.config == index.config and loaded.expert_ids == index.expert_ids
    after = loaded.search(queries, 5)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    extra = unit(np.random.default_rng(13).normal(size=(4, DIM)))
    for ix in (index, loaded):
        ix.replace_expert(3, extra)
        ix.remove_expert(7)
    np.testing.assert_array_equal(index.search(queries, 5)[0], loaded.search(queries, 5)[0])


@pytest.fixture
def saved(tmp_path) -> Path:
    build(random_experts(14), mode="exemplar").save(tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_index_file_is_refused(saved, damage):
    path = version_dir(saved) / "index.faiss"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"index\.faiss: checksum mismatch"):
        ExpertIndex.load(saved)


def test_corrupted_keys_or_manifest_are_refused(saved):
    keys = version_dir(saved) / "keys.safetensors"
    keys.write_bytes(keys.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match=r"keys\.safetensors: checksum mismatch"):
        ExpertIndex.load(saved)
    (version_dir(saved) / "index.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"index\.json: checksum mismatch"):
        ExpertIndex.load(saved)


def edit_manifest(folder: Path, edit) -> None:
    """Commit a version whose index.json is edited (checksums fine, contents disagree)."""
    recommit(folder, lambda tmp: edit_json(tmp / "index.json", edit))


def test_manifest_dimension_mismatch_is_refused(saved):
    edit_manifest(saved, lambda m: m["config"].update(dim=DIM + 1))
    with pytest.raises(IndexMismatchError, match=r"index\.faiss.*dimension differs.*d=16.*dim=17"):
        ExpertIndex.load(saved)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("metric", "l2", r"metric differs \(index\.faiss 'ip', manifest config\.metric 'l2'\)"),
    ("kind", "hnsw", r"backend differs \(index\.faiss IndexFlatIP, manifest config\.kind"),
])
def test_manifest_metric_or_backend_mismatch_is_refused(saved, field, value, message):
    edit_manifest(saved, lambda m: m["config"].update({field: value}))
    with pytest.raises(IndexMismatchError, match=message):
        ExpertIndex.load(saved)


def test_manifest_count_and_id_mismatch_are_refused(saved):
    def drop_expert(m):
        gone = m["experts"].pop(0)
        m["ntotal"] -= gone["n_vectors"]

    edit_manifest(saved, drop_expert)
    with pytest.raises(IndexMismatchError, match="vector count differs"):
        ExpertIndex.load(saved)
    edit_manifest(saved, lambda m: m.update(ntotal=sum(e["n_vectors"] for e in m["experts"])))
    with pytest.raises(IndexMismatchError, match="vector count differs"):
        ExpertIndex.load(saved)


def test_index_with_other_ids_is_refused(tmp_path, saved):
    experts = random_experts(14)
    experts[99] = experts.pop(42)  # same vector count, one id differs
    build(experts, mode="exemplar").save(tmp_path / "other")
    other = (version_dir(tmp_path / "other") / "index.faiss").read_bytes()
    recommit(saved, lambda tmp: (tmp / "index.faiss").write_bytes(other))
    with pytest.raises(
        IndexMismatchError, match=r"ids differ.*only in index\.faiss: \[99\].*\[42\]"
    ):
        ExpertIndex.load(saved)


# ----------------------------------------------------------------- real MiniLM embeddings
N_GLOSSES, N_QUERIES = 3000, 500


@pytest.fixture(scope="module")
def gloss_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """Real MiniLM embeddings of 3000 WordNet glosses spread over the whole of WordNet, shuffled
    (the first N_QUERIES serve as queries), and their lexname labels."""
    from moe_lora.data.wordnet import load_glosses

    glosses = load_glosses()[:: 117659 // N_GLOSSES][:N_GLOSSES]
    order = np.random.default_rng(0).permutation(len(glosses))
    glosses = [glosses[i] for i in order]
    embedder = Embedder(EmbedderConfig(max_length=32, progress_threshold=10**9))
    names = sorted({g.lexname for g in glosses})
    labels = np.array([names.index(g.lexname) for g in glosses])
    return embedder.encode([g.text for g in glosses]), labels


def neighbour_ids(vectors: np.ndarray, queries: np.ndarray, **config) -> np.ndarray:
    index = ExpertIndex(IndexConfig(dim=vectors.shape[1], **config))
    for i, v in enumerate(vectors):
        index.add_expert(i, v[None])
    return index.search(queries, 10)[0]


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)]))


def test_exact_search_on_real_embeddings_equals_numpy(gloss_embeddings):
    x, _ = gloss_embeddings
    queries, base = x[:N_QUERIES], x[N_QUERIES:]
    ref = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(neighbour_ids(base, queries), ref)


@pytest.mark.parametrize(
    "config,floor",
    [
        (dict(kind="hnsw", hnsw_m=32, ef_search=64), 0.95),
        (dict(kind="ivf", nlist=32, nprobe=16), 0.9),
    ],
)
def test_approximate_recall_on_real_embeddings(gloss_embeddings, config, floor):
    x, _ = gloss_embeddings
    queries, base = x[:N_QUERIES], x[N_QUERIES:]
    recall = recall_at_10(neighbour_ids(base, queries, **config), neighbour_ids(base, queries))
    print(f"{config['kind']} recall@10 = {recall:.4f}")
    assert recall >= floor


def test_exemplar_retrieval_of_lexnames_on_real_embeddings(gloss_embeddings):
    """Experts = WordNet lexnames; held-out glosses retrieve their own lexname far above chance."""
    x, labels = gloss_embeddings
    test, train = slice(0, N_QUERIES), slice(N_QUERIES, None)
    accuracy = {}
    for mode in ("centroid", "exemplar"):
        index = ExpertIndex(IndexConfig(dim=x.shape[1], mode=mode, n_neighbors=10))
        for e in np.unique(labels[train]):
            index.add_expert(int(e), x[train][labels[train] == e])
        accuracy[mode] = float((index.search(x[test], 1)[0][:, 0] == labels[test]).mean())
    majority = np.bincount(labels[train]).max() / len(labels[train])
    print(f"lexname top-1 accuracy: {accuracy}, majority class {majority:.3f}")
    assert min(accuracy.values()) > 2 * majority


def test_distinct_hits_equals_the_per_row_reduction():
    from moe_lora.memory._scoring import best_per_expert, distinct_hits

    rng = np.random.default_rng(3)
    experts = np.stack([rng.permutation(50)[:12] for _ in range(40)]).astype(np.int64)
    experts[::7, -3:] = -1  # missing hits
    sims = rng.standard_normal((40, 12)).astype(np.float32)
    sims[5, 1] = sims[5, 0]  # a tie: the lower id must come first
    for k in (1, 5, 12, 15):
        ids, scores = distinct_hits(experts, sims, k)
        ref_ids, ref_scores = best_per_expert(experts, sims, k)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
