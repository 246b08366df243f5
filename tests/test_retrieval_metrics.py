"""FAISS search and retrieval metrics against dense torch top-k and brute-force counts written plainly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unic.eval.metrics import (
    ALL_METRICS,
    UNED_DOMAINS,
    UNED_METRICS,
    UNED_TEST_PAIRS,
    UNED_VAL_PAIRS,
    EmbeddingSet,
    as_label_matrix,
    count_relevant,
    evaluate_uned,
    relevance_matrix,
    retrieval_metrics,
)
from tests.oracles import search_torch
from unic.eval.search import search


# ----------------------------------------------------------------------------------------------------------
# brute-force references: loops over queries, Python sets, no vectorisation


def label_set(row) -> set[int]:
    return {int(label) for label in np.atleast_1d(row) if label >= 0}


def brute_ranking(query, index_x, k, skip=None):
    """Indices of the k best items by (-score, position); integer data make scores exact."""
    candidates = [(-float(np.dot(query, item)), j) for j, item in enumerate(index_x) if j != skip]
    return [j for _, j in sorted(candidates)[:k]]


def brute_metrics(ranked_relevant: list[bool], num_relevant: int) -> dict[str, float]:
    result = {}
    for k in (1, 2, 4, 8, 10, 100):
        result[f"R@{k}"] = float(any(ranked_relevant[:k]))
    for k in (5, 100):
        if num_relevant == 0:
            result[f"mMP@{k}"] = result[f"mAP@{k}"] = 0.0
            continue
        m = min(k, num_relevant)
        result[f"mMP@{k}"] = sum(ranked_relevant[:m]) / m
        total, hits = 0.0, 0
        for i, rel in enumerate(ranked_relevant[:k], start=1):
            hits += rel
            if rel:
                total += hits / i
        result[f"mAP@{k}"] = total / m
    return result


def random_labels(rng, num_items, num_classes, multi=True):
    """Mixed single/multi-label rows padded with -1, with repeated labels and unlabelled rows."""
    labels = np.full((num_items, 3), -1, dtype=np.int64)
    for i in range(num_items):
        num_labels = rng.choice([0, 1, 1, 1, 2, 3]) if multi else 1
        labels[i, :num_labels] = rng.integers(0, num_classes, num_labels)
    return labels


# ----------------------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("k", [1, 5, 12, 60])
@pytest.mark.parametrize("margin", [0, 16])
def test_search_matches_dense_torch_with_ties_and_self_exclusion(k, margin):
    rng = np.random.default_rng(k + margin)
    # values in {-1, 0, 1}, dim 3: many duplicate embeddings and many equal scores; integer sums are exact
    index_x = rng.integers(-1, 2, (50, 3)).astype(np.float32)
    ids = np.arange(50)
    for exclude in (None, (ids, ids)):
        scores, indices = search(index_x, index_x, k, exclude, chunk_size=7, margin=margin, progress=False)
        ref_scores, ref_indices = search_torch(torch.from_numpy(index_x), index_x, k, exclude)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_array_equal(scores, ref_scores)
        assert scores.dtype == np.float32 and indices.dtype == np.int64
        for q in range(len(index_x)):
            expected = brute_ranking(index_x[q], index_x, k, skip=q if exclude else None)
            expected += [-1] * (k - len(expected))  # k > available neighbours: padded like FAISS
            assert indices[q].tolist() == expected


def test_search_self_excluded_by_identity_not_position():
    # the query's duplicate ranks before itself (lower position): only the item with the same id is dropped
    index_x = np.ones((6, 2), dtype=np.float32)
    query_ids = np.array([4, 0])
    scores, indices = search(index_x[[4, 0]], index_x, 3, (query_ids, np.arange(6)), margin=0)
    assert indices.tolist() == [[0, 1, 2], [1, 2, 3]]
    # ids need not be positions
    index_ids = np.array([10, 11, 12, 13, 14, 15])
    _, indices = search(index_x[[4]], index_x, 2, (np.array([10]), index_ids), margin=0)
    assert indices.tolist() == [[1, 2]]


def test_search_ties_straddling_the_fetch_boundary():
    # every score ties: FAISS returns ties in its own order, the exact answer is the k lowest positions
    index_x = np.zeros((300, 4), dtype=np.float32)
    queries = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    scores, indices = search(queries, index_x, 10, margin=0)
    assert (indices == np.arange(10)).all() and (scores == 0).all()
    # a tie group larger than k + margin around the k-th rank
    index_x[:, 0] = np.repeat([3.0, 2.0, 1.0], 100)
    queries = np.array([[1, 0, 0, 0]], dtype=np.float32)
    _, indices = search(queries, index_x, 150, margin=2)
    assert indices[0].tolist() == list(range(150))


def test_search_random_floats_and_chunks():
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    index_x = rng.normal(size=(200, 16)).astype(np.float32)
    scores, indices = search(queries, index_x, 10, chunk_size=8)
    ref_scores, ref_indices = search_torch(queries, index_x, 10)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_search_rejects_bad_inputs():
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="dim"):
        search(x, np.zeros((4, 2), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="empty"):
        search(x, np.zeros((0, 3), dtype=np.float32), 1)
    with pytest.raises(ValueError, match="ids"):
        search(x, x, 1, (np.arange(3), np.arange(4)))
    scores, indices = search(np.zeros((0, 3), dtype=np.float32), x, 2)
    assert scores.shape == indices.shape == (0, 2)


# ----------------------------------------------------------------------------------------------------------
# labels, relevance, counts


def test_as_label_matrix():
    assert as_label_matrix([3, [1, 2], [], 5]).tolist() == [[3, -1], [1, 2], [-1, -1], [5, -1]]
    assert as_label_matrix(torch.tensor([1, 2])).tolist() == [[1], [2]]
    with pytest.raises(ValueError):
        as_label_matrix(np.zeros((2, 2, 2), dtype=np.int64))


def test_relevance_and_counts_against_brute_force():
    rng = np.random.default_rng(0)
    num_queries, num_index = 60, 80
    query_labels = random_labels(rng, num_queries, 8)
    index_labels = random_labels(rng, num_index, 8)
    query_domains = rng.integers(0, 3, num_queries)
    index_domains = rng.integers(0, 3, num_index)
    index_domains[index_domains == 2] = 1  # domain 2 has queries but no index item: n_q = 0
    query_domains[:30] %= 2
    # the first 30 queries are also index items (ids 100..129 sit at index positions 10..39)
    index_ids = 90 + np.arange(num_index)
    query_ids = np.concatenate([100 + np.arange(30), -1 - np.arange(num_queries - 30)])
    index_labels[10:40] = query_labels[:30]
    index_domains[10:40] = query_domains[:30]
    neighbors = rng.integers(-1, num_index, (num_queries, 7))  # -1: missing neighbour

    relevant = relevance_matrix(neighbors, query_labels, index_labels, query_domains, index_domains)
    counts = count_relevant(query_labels, index_labels, query_domains, index_domains, query_ids, index_ids)
    for q in range(num_queries):
        for j in range(7):
            n = neighbors[q, j]
            expected = n >= 0 and index_domains[n] == query_domains[q] and bool(
                label_set(query_labels[q]) & label_set(index_labels[n])
            )
            assert relevant[q, j] == expected
        expected_count = sum(
            1
            for i in range(num_index)
            if index_ids[i] != query_ids[q]
            and index_domains[i] == query_domains[q]
            and label_set(query_labels[q]) & label_set(index_labels[i])
        )
        assert counts[q] == expected_count, q
    assert (counts[query_domains == 2] == 0).all()
    assert (counts > 0).any()


def test_counts_single_label_without_domains():
    labels = np.array([0, 0, 1, 2, 2, 2])
    ids = np.arange(6)
    assert count_relevant(labels, labels).tolist() == [2, 2, 1, 3, 3, 3]
    assert count_relevant(labels, labels, query_ids=ids, index_ids=ids).tolist() == [1, 1, 0, 2, 2, 2]


# ----------------------------------------------------------------------------------------------------------
# metrics


def test_metrics_hand_computed():
    relevant = np.array([[True, False, True, False, False], [False, True, False, False, False], [False] * 5])
    values = retrieval_metrics(relevant, np.array([3, 1, 0]), ["R@1", "R@2", "mMP@5", "mAP@5", "R@100"])
    assert values["R@1"].tolist() == [1, 0, 0]
    assert values["R@2"].tolist() == [1, 1, 0]
    np.testing.assert_allclose(values["mMP@5"], [2 / 3, 0, 0])  # query 2: min(5, n_q) = 1, r_1 not relevant
    np.testing.assert_allclose(values["mAP@5"], [(1 + 2 / 3) / 3, 1 / 2, 0])
    assert values["R@100"].tolist() == [1, 1, 0]  # ranks past the given 5 count as not relevant


def test_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    relevant = rng.random((200, 120)) < 0.15
    num_relevant = relevant.sum(1) + rng.integers(0, 4, 200)
    num_relevant[:20] = 0
    relevant[:20] = False
    num_relevant[20:40] = relevant[20:40, :3].sum(1)  # n_q < 5 with all relevant items early
    relevant[20:40, 3:] = False
    values = retrieval_metrics(relevant, num_relevant, ALL_METRICS + ("mMP@100",))
    for q in range(200):
        expected = brute_metrics(relevant[q].tolist(), int(num_relevant[q]))
        for name, value in expected.items():
            assert values[name][q] == pytest.approx(value), (name, q)
    with pytest.raises(ValueError, match="metric"):
        retrieval_metrics(relevant, num_relevant, ["P@5"])


# ----------------------------------------------------------------------------------------------------------
# UnED evaluation end to end


def make_features(rng):
    def item_set(num_items, num_classes, multi=False):
        x = rng.integers(-1, 2, (num_items, 3)).astype(np.float32)  # duplicates and exact score ties
        return EmbeddingSet(x, random_labels(rng, num_items, num_classes, multi))

    return {
        "cars": {"test": item_set(30, 4, multi=True)},  # leave-one-out, multi-label
        "met": {"test": item_set(12, 5), "index": item_set(25, 5, multi=True)},
        # labels of queries never appear in the index: n_q = 0 for every query
        "rp2k": {"test": item_set(10, 3)},
    }


def brute_uned(features, pairs, mode):
    """Rank every candidate of every query by (-score, position in the searched index) and count by hand."""
    domains = list(pairs)
    results = {}
    for d in domains:
        query_split, index_split = pairs[d]
        searched = domains if mode == "merged" else [d]
        # candidates in index order: (domain, position in its index set, embedding, label set)
        candidates = [
            (c, i, x, label_set(y))
            for c in searched
            for i, (x, y) in enumerate(zip(*features[c][pairs[c][1]]))
        ]
        per_query = []
        for q, (query, query_labels) in enumerate(zip(*features[d][query_split])):
            query_labels = label_set(query_labels)
            scored = []
            for order, (c, i, x, labels) in enumerate(candidates):
                if c == d and i == q and query_split == index_split:
                    continue  # the query itself
                scored.append((-float(np.dot(query, x)), order, c == d and bool(query_labels & labels)))
            scored.sort()
            ranked_relevant = [relevant for _, _, relevant in scored]
            per_query.append(brute_metrics(ranked_relevant, sum(ranked_relevant)))
        results[d] = {name: float(np.mean([m[name] for m in per_query])) for name in ALL_METRICS}
    results["average"] = {name: float(np.mean([results[d][name] for d in domains])) for name in ALL_METRICS}
    return results


@pytest.mark.parametrize("mode", ["separate", "merged"])
def test_evaluate_uned_against_brute_force(mode):
    rng = np.random.default_rng(3)
    features = make_features(rng)
    features["rp2k"]["test"].labels[:] = np.arange(10)[:, None] + 100  # absent from the test set itself too
    pairs = {"cars": ("test", "test"), "met": ("test", "index"), "rp2k": ("test", "test")}
    results = evaluate_uned(features, pairs, mode=mode, metrics=ALL_METRICS, normalize=False, progress=False)
    expected = brute_uned(features, pairs, mode)
    assert list(results) == ["cars", "met", "rp2k", "average"]
    for domain, scores in expected.items():
        for name, value in scores.items():
            assert results[domain][name] == pytest.approx(value, abs=1e-12), (domain, name)
            assert 0.0 <= results[domain][name] <= 1.0
    assert results["rp2k"]["mAP@5"] == 0.0 and results["cars"]["R@1"] > 0


def test_evaluate_uned_normalized_random_floats():
    rng = np.random.default_rng(4)
    features = {d: {"test": EmbeddingSet(rng.normal(size=(20, 8)), rng.integers(0, 3, 20))} for d in ("a", "b")}
    pairs = {"a": ("test", "test"), "b": ("test", "test")}
    results = evaluate_uned(features, pairs, mode="merged", progress=False)
    assert set(results["average"]) == set(UNED_METRICS)
    normalized = {
        d: {"test": EmbeddingSet(s["test"].embeddings / np.linalg.norm(s["test"].embeddings, axis=1, keepdims=True),
                                 s["test"].labels)}
        for d, s in features.items()
    }
    expected = brute_uned(normalized, pairs, "merged")
    for name in UNED_METRICS:
        assert results["average"][name] == pytest.approx(expected["average"][name])


def test_evaluate_uned_errors():
    rng = np.random.default_rng(5)
    features = make_features(rng)
    features["met"]["index"] = EmbeddingSet(np.zeros((0, 3), dtype=np.float32), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="met"):
        evaluate_uned(features, {"cars": ("test", "test"), "met": ("test", "index")})
    features = make_features(rng)
    features["cars"]["test"] = EmbeddingSet(features["cars"]["test"].embeddings, np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="cars"):
        evaluate_uned(features, {"cars": ("test", "test")}, mode="separate")
    with pytest.raises(ValueError, match="sop"):
        evaluate_uned(features, {"sop": ("test", "test")})
    with pytest.raises(ValueError, match="mode"):
        evaluate_uned(features, {"met": ("test", "index")}, mode="joint")


def test_uned_pair_tables():
    assert set(UNED_TEST_PAIRS) == set(UNED_VAL_PAIRS) == set(UNED_DOMAINS)
    assert {d for d, (q, i) in UNED_TEST_PAIRS.items() if i == "index"} == {"inshop", "met", "gldv2"}
    assert all(q == i == "test" for d, (q, i) in UNED_TEST_PAIRS.items() if d not in ("inshop", "met", "gldv2"))
    assert UNED_VAL_PAIRS["met"] == ("val", "small_index")
    assert all(pair == ("val", "val") for d, pair in UNED_VAL_PAIRS.items() if d != "met")
