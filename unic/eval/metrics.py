"""Retrieval metrics of the UnED protocol (SPEC section 8) and the classic R@k / mAP@100 benchmarks.

Labels are int64 arrays, (N,) for one label per item or (N, L) padded with -1 for several (an item with no
valid label is relevant to nothing). A ranked neighbour of query q is relevant iff it belongs to q's domain and
shares at least one label with q; n_q is the number of relevant index items, q itself excluded. With ranked
relevance flags rel_1, rel_2, ... (self already excluded from the ranking) and P@i the precision at rank i:

- ``R@k``:   1 if any of rel_1..rel_k.
- ``mMP@k``: (rel_1 + ... + rel_m) / m with m = min(k, n_q); 0 when n_q = 0.
- ``mAP@k``: sum_{i<=k} P@i * rel_i / min(k, n_q); 0 when n_q = 0 (k = 5 for UnED, 100 for GLDv2).

Per-query values are averaged over a domain's queries; the headline is the unweighted mean over domains.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from unic.eval.search import SEARCH_CHUNK, ArrayLike, as_float32, search

logger = logging.getLogger(__name__)

UNED_DOMAINS = ("cars", "sop", "inat", "food2k", "rp2k", "inshop", "met", "gldv2")
# domain -> (query split, index split); equal splits mean leave-one-out (the query is excluded by identity).
UNED_TEST_PAIRS: dict[str, tuple[str, str]] = {
    "cars": ("test", "test"),
    "sop": ("test", "test"),
    "inat": ("test", "test"),
    "food2k": ("test", "test"),
    "rp2k": ("test", "test"),
    "inshop": ("test", "index"),
    "met": ("test", "index"),
    "gldv2": ("test", "index"),
}
UNED_VAL_PAIRS: dict[str, tuple[str, str]] = {
    domain: ("val", "small_index") if domain == "met" else ("val", "val") for domain in UNED_DOMAINS
}
UNED_PAIRS: dict[str, dict[str, tuple[str, str]]] = {"test": UNED_TEST_PAIRS, "val": UNED_VAL_PAIRS}

UNED_METRICS = ("R@1", "mMP@5", "mAP@5")
RECALL_KS = (1, 2, 4, 8, 10, 100)
ALL_METRICS = UNED_METRICS + tuple(f"R@{k}" for k in RECALL_KS[1:]) + ("mAP@100",)

# Bound on the (queries x neighbours x labels x labels) comparison buffer of ``relevance_matrix``.
_MAX_COMPARE_ELEMENTS = 1 << 24


class EmbeddingSet(NamedTuple):
    """Descriptors of one (domain, split): embeddings (N, D) and labels (N,) or (N, L) padded with -1."""

    embeddings: ArrayLike
    labels: ArrayLike | Sequence[int | Sequence[int]]


def as_label_matrix(labels: ArrayLike | Sequence[int | Sequence[int]]) -> np.ndarray:
    """Labels as an int64 (N, L) array padded with -1; also accepts a list mixing ints and lists of ints."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray):
        rows = [[label] if np.isscalar(label) else list(label) for label in labels]
        width = max((len(row) for row in rows), default=1)
        padded = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        labels = padded
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape (N,) or (N, L), got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64, copy=False)


def _int64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64)


def _domains_or_zeros(domains: ArrayLike | None, length: int, name: str) -> np.ndarray:
    if domains is None:
        return np.zeros(length, dtype=np.int64)
    domains = _int64(domains)
    if domains.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {domains.shape}")
    return domains


def relevance_matrix(
    neighbors: ArrayLike,
    query_labels: ArrayLike,
    index_labels: ArrayLike,
    query_domains: ArrayLike | None = None,
    index_domains: ArrayLike | None = None,
) -> np.ndarray:
    """Boolean (Nq, k): neighbour j of query q is in q's domain and shares a label with q (-1 slots: False)."""
    neighbors = _int64(neighbors)
    if neighbors.ndim != 2:
        raise ValueError(f"neighbors must be (Nq, k), got shape {neighbors.shape}")
    query_labels, index_labels = as_label_matrix(query_labels), as_label_matrix(index_labels)
    num_queries, k = neighbors.shape
    if len(query_labels) != num_queries:
        raise ValueError(f"{num_queries} neighbour rows but {len(query_labels)} query labels")
    query_domains = _domains_or_zeros(query_domains, num_queries, "query_domains")
    index_domains = _domains_or_zeros(index_domains, len(index_labels), "index_domains")
    relevant = np.empty((num_queries, k), dtype=bool)
    per_row = k * query_labels.shape[1] * index_labels.shape[1]
    chunk = max(1, _MAX_COMPARE_ELEMENTS // max(per_row, 1))
    for start in range(0, num_queries, chunk):
        rows = slice(start, start + chunk)
        neighbor_rows = neighbors[rows]
        exists = neighbor_rows >= 0
        safe = np.where(exists, neighbor_rows, 0)
        query_rows = query_labels[rows][:, None, :, None]  # (n, 1, Lq, 1)
        shared = (index_labels[safe][:, :, None, :] == query_rows) & (query_rows >= 0)  # (n, k, Lq, Li)
        same_domain = index_domains[safe] == query_domains[rows][:, None]
        relevant[rows] = shared.any(axis=(2, 3)) & same_domain & exists
    return relevant


def _item_keys(labels: np.ndarray, domains: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, key) pairs of each item's distinct valid labels, key = domain * num_labels + label."""
    sorted_labels = np.sort(labels, axis=1)
    distinct = sorted_labels >= 0
    distinct[:, 1:] &= sorted_labels[:, 1:] != sorted_labels[:, :-1]
    rows, cols = np.nonzero(distinct)
    return rows, domains[rows] * num_labels + sorted_labels[rows, cols]


def count_relevant(
    query_labels: ArrayLike,
    index_labels: ArrayLike,
    query_domains: ArrayLike | None = None,
    index_domains: ArrayLike | None = None,
    query_ids: ArrayLike | None = None,
    index_ids: ArrayLike | None = None,
) -> np.ndarray:
    """n_q: index items in q's domain sharing at least one label with q, q itself excluded (by id).

    Counted per (domain, label) key: a query's count is the sum of its keys' index counts, minus the index
    items counted more than once (those sharing several labels with q, found by a sparse product restricted
    to multi-label index items), minus the query itself when its id is in the index and it is relevant.
    """
    query_labels, index_labels = as_label_matrix(query_labels), as_label_matrix(index_labels)
    num_queries, num_index = len(query_labels), len(index_labels)
    query_domains = _domains_or_zeros(query_domains, num_queries, "query_domains")
    index_domains = _domains_or_zeros(index_domains, num_index, "index_domains")
    max_label = max(int(query_labels.max(initial=-1)), int(index_labels.max(initial=-1)))
    num_labels = max_label + 2  # >= 1 even without any valid label
    max_domain = max(int(query_domains.max(initial=0)), int(index_domains.max(initial=0)))
    if min(query_domains.min(initial=0), index_domains.min(initial=0)) < 0:
        raise ValueError("domain ids must be >= 0")
    if (max_domain + 1) * num_labels >= 2**62:
        raise ValueError("label or domain ids are too large to be combined into int64 keys")

    query_rows, query_keys = _item_keys(query_labels, query_domains, num_labels)
    index_rows, index_keys = _item_keys(index_labels, index_domains, num_labels)
    unique_keys, key_counts = np.unique(index_keys, return_counts=True)
    query_key_counts = np.zeros(len(query_keys), dtype=np.int64)
    if len(unique_keys):
        position = np.minimum(np.searchsorted(unique_keys, query_keys), len(unique_keys) - 1)
        query_key_counts = np.where(unique_keys[position] == query_keys, key_counts[position], 0)
    counts = np.bincount(query_rows, weights=query_key_counts, minlength=num_queries)

    index_keys_per_item = np.bincount(index_rows, minlength=num_index)
    query_keys_per_item = np.bincount(query_rows, minlength=num_queries)
    multi_label = index_keys_per_item[index_rows] > 1
    if multi_label.any() and query_keys_per_item.max(initial=0) > 1:
        from scipy import sparse  # scikit-learn's dependency; only needed for multi-label items

        all_keys, inverse = np.unique(np.concatenate([query_keys, index_keys[multi_label]]), return_inverse=True)
        query_inverse, index_inverse = inverse[: len(query_keys)], inverse[len(query_keys) :]
        query_incidence = sparse.csr_matrix(
            (np.ones(len(query_keys)), (query_rows, query_inverse)), shape=(num_queries, len(all_keys))
        )
        multi_rows = index_rows[multi_label]
        index_incidence = sparse.csr_matrix(
            (np.ones(len(multi_rows)), (multi_rows, index_inverse)), shape=(num_index, len(all_keys))
        )
        overlap = (query_incidence @ index_incidence.T).tocsr()  # |labels shared| per (query, index item)
        overlap.data = np.maximum(overlap.data - 1, 0)
        counts -= np.asarray(overlap.sum(axis=1)).ravel()

    counts = np.rint(counts).astype(np.int64)
    if query_ids is not None and index_ids is not None:
        counts -= _self_relevant(
            query_labels, index_labels, query_domains, index_domains, query_ids, index_ids
        ).astype(np.int64)
    return counts


def _self_relevant(
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    query_domains: np.ndarray,
    index_domains: np.ndarray,
    query_ids: ArrayLike,
    index_ids: ArrayLike,
) -> np.ndarray:
    """Whether each query's own item is in the index and relevant to it (so counted in n_q once too many)."""
    query_ids, index_ids = _int64(query_ids), _int64(index_ids)
    if query_ids.shape != (len(query_labels),) or index_ids.shape != (len(index_labels),):
        raise ValueError("query_ids / index_ids must have one id per query / index item")
    if len(index_ids) == 0:
        return np.zeros(len(query_ids), dtype=bool)
    order = np.argsort(index_ids, kind="stable")
    sorted_ids = index_ids[order]
    if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise ValueError("index ids must be unique")
    position = np.clip(np.searchsorted(sorted_ids, query_ids), 0, len(sorted_ids) - 1)
    in_index = sorted_ids[position] == query_ids
    self_position = np.where(in_index, order[position], -1)
    return relevance_matrix(self_position[:, None], query_labels, index_labels, query_domains, index_domains)[:, 0]


def _parse_metric(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(R|mMP|mAP)@(\d+)", name)
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"unknown metric {name!r}: expected R@k, mMP@k or mAP@k (k >= 1)")
    return match.group(1), int(match.group(2))


def metrics_depth(metrics: Sequence[str]) -> int:
    """Number of ranked neighbours the metrics need."""
    return max(_parse_metric(name)[1] for name in metrics)


def retrieval_metrics(
    relevant: np.ndarray, num_relevant: np.ndarray, metrics: Sequence[str] = ALL_METRICS
) -> dict[str, np.ndarray]:
    """Per-query float64 values of each metric from ranked relevance flags (Nq, k) and n_q (Nq,).

    Ranks beyond the given k count as not relevant.
    """
    relevant = np.asarray(relevant, dtype=bool)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if relevant.ndim != 2 or num_relevant.shape != (len(relevant),):
        raise ValueError(f"relevant must be (Nq, k) and num_relevant (Nq,), got {relevant.shape}, {num_relevant.shape}")
    depth = metrics_depth(metrics)
    if relevant.shape[1] < depth:
        relevant = np.pad(relevant, ((0, 0), (0, depth - relevant.shape[1])))
    relevant = relevant[:, :depth]
    hits = np.cumsum(relevant, axis=1)  # hits[:, i - 1] = relevant among the first i
    precision = hits / np.arange(1, depth + 1)
    rows = np.arange(len(relevant))
    results = {}
    for name in metrics:
        kind, k = _parse_metric(name)
        if kind == "R":
            results[name] = relevant[:, :k].any(axis=1).astype(np.float64)
            continue
        cutoff = np.minimum(k, num_relevant)
        safe_cutoff = np.maximum(cutoff, 1)
        if kind == "mMP":
            value = hits[rows, safe_cutoff - 1] / safe_cutoff
        else:
            value = (precision[:, :k] * relevant[:, :k]).sum(axis=1) / safe_cutoff
        results[name] = np.where(cutoff > 0, value, 0.0)
    return results


def _load_set(features: Mapping[str, Mapping[str, EmbeddingSet | tuple]], domain: str, split: str):
    if domain not in features or split not in features[domain]:
        raise ValueError(f"domain {domain!r}: no descriptors for split {split!r}")
    embeddings, labels = features[domain][split]
    embeddings = as_float32(embeddings, f"{domain}/{split} embeddings")
    labels = as_label_matrix(labels)
    if len(embeddings) == 0:
        raise ValueError(f"domain {domain!r}: split {split!r} is empty")
    if len(labels) != len(embeddings):
        raise ValueError(
            f"domain {domain!r}: split {split!r} has {len(embeddings)} embeddings but {len(labels)} labels"
        )
    return embeddings, labels


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pad_labels(labels: np.ndarray, width: int) -> np.ndarray:
    return np.pad(labels, ((0, 0), (0, width - labels.shape[1])), constant_values=-1)


def evaluate_uned(
    features: Mapping[str, Mapping[str, EmbeddingSet | tuple]],
    pairs: Mapping[str, tuple[str, str]] = UNED_TEST_PAIRS,
    mode: Literal["separate", "merged"] = "merged",
    metrics: Sequence[str] = UNED_METRICS,
    normalize: bool = True,
    chunk_size: int = SEARCH_CHUNK,
    progress: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Retrieval scores per domain and their unweighted mean over domains ("average").

    ``features[domain][split]`` holds an ``EmbeddingSet`` (or an (embeddings, labels) tuple); ``pairs`` maps
    each evaluated domain to its (query split, index split), e.g. ``UNED_TEST_PAIRS`` or ``UNED_VAL_PAIRS``.
    "separate" searches each domain in its own index; "merged" (the UnED standard) searches every query in
    the union of all domains' index sets, where only same-domain neighbours can be relevant. When a domain's
    query split is its index split, each query is excluded from its own neighbours by identity.
    """
    if mode not in ("separate", "merged"):
        raise ValueError(f"mode must be 'separate' or 'merged', got {mode!r}")
    if not pairs:
        raise ValueError("no domain to evaluate")
    depth = metrics_depth(metrics)
    domains = list(pairs)
    query_sets, index_sets = {}, {}
    for domain in domains:
        query_split, index_split = pairs[domain]
        query_sets[domain] = _load_set(features, domain, query_split)
        same_set = query_split == index_split
        index_sets[domain] = query_sets[domain] if same_set else _load_set(features, domain, index_split)
        if query_sets[domain][0].shape[1] != index_sets[domain][0].shape[1]:
            raise ValueError(f"domain {domain!r}: query and index embeddings have different dims")
    dims = {query_sets[domain][0].shape[1] for domain in domains}
    if mode == "merged" and len(dims) > 1:
        raise ValueError(f"merged mode needs one embedding dim across domains, got {sorted(dims)}")
    prepare = l2_normalize if normalize else (lambda x: x)

    def ids_for(domain: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Identity ids: the query set shares ids with the index set only when they are the same set."""
        num_index = len(index_sets[domain][0])
        index_ids = offset + np.arange(num_index, dtype=np.int64)
        if pairs[domain][0] == pairs[domain][1]:
            return index_ids, index_ids
        return -1 - np.arange(len(query_sets[domain][0]), dtype=np.int64), index_ids

    per_domain: dict[str, dict[str, float]] = {}
    if mode == "separate":
        for domain in domains:
            (query_x, query_labels), (index_x, index_labels) = query_sets[domain], index_sets[domain]
            query_ids, index_ids = ids_for(domain, 0)
            _, neighbors = search(
                prepare(query_x), prepare(index_x), depth, (query_ids, index_ids), chunk_size, progress=progress
            )
            relevant = relevance_matrix(neighbors, query_labels, index_labels)
            num_relevant = count_relevant(query_labels, index_labels, query_ids=query_ids, index_ids=index_ids)
            per_domain[domain] = _average(retrieval_metrics(relevant, num_relevant, metrics))
    else:
        width = max(max(query_sets[d][1].shape[1], index_sets[d][1].shape[1]) for d in domains)
        offsets = np.cumsum([0] + [len(index_sets[d][0]) for d in domains])
        id_pairs = [ids_for(domain, int(offset)) for domain, offset in zip(domains, offsets)]
        index_x = np.concatenate([prepare(index_sets[d][0]) for d in domains])
        index_labels = np.concatenate([_pad_labels(index_sets[d][1], width) for d in domains])
        index_domains = np.repeat(np.arange(len(domains)), [len(index_sets[d][0]) for d in domains])
        index_ids = np.concatenate([ids for _, ids in id_pairs])
        query_x = np.concatenate([prepare(query_sets[d][0]) for d in domains])
        query_labels = np.concatenate([_pad_labels(query_sets[d][1], width) for d in domains])
        query_sizes = [len(query_sets[d][0]) for d in domains]
        query_domains = np.repeat(np.arange(len(domains)), query_sizes)
        query_ids = np.concatenate([ids for ids, _ in id_pairs])
        _, neighbors = search(query_x, index_x, depth, (query_ids, index_ids), chunk_size, progress=progress)
        relevant = relevance_matrix(neighbors, query_labels, index_labels, query_domains, index_domains)
        num_relevant = count_relevant(query_labels, index_labels, query_domains, index_domains, query_ids, index_ids)
        values = retrieval_metrics(relevant, num_relevant, metrics)
        bounds = np.cumsum([0] + query_sizes)
        for i, domain in enumerate(domains):
            per_domain[domain] = _average({name: v[bounds[i] : bounds[i + 1]] for name, v in values.items()})

    for domain, scores in per_domain.items():
        logger.info("%s (%s): %s", domain, mode, ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    per_domain["average"] = {name: float(np.mean([per_domain[d][name] for d in domains])) for name in metrics}
    return per_domain


def _average(values: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.mean(per_query)) for name, per_query in values.items()}


def universal_recall(feats: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Leave-one-out R@1 of each domain's val set in its own index (SPEC section 8, "separate"): the universal
    embedding's score at validation during training."""
    per_domain = {}
    for d, name in enumerate(names):
        mask = domains == d
        if int(mask.sum()) >= 2:
            per_domain[name] = {"val": (feats[mask].numpy(), labels[mask].numpy())}
    if not per_domain:
        return {}
    results = evaluate_uned(per_domain, pairs={d: ("val", "val") for d in per_domain}, mode="separate",
                            metrics=("R@1",), progress=False)
    out = {f"universal_R@1/{d}": float(r["R@1"]) for d, r in results.items() if d != "average"}
    out["universal_R@1"] = float(results["average"]["R@1"])
    return out
