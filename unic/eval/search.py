"""Exact inner-product k-nearest-neighbour search with FAISS, with deterministic ties and self-exclusion.

Rows are ranked by descending score; equal scores are ordered by ascending index position, so results do not
depend on FAISS's heap order, on the number of threads or on GPU sharding. FAISS itself returns an arbitrary
subset of the items tied at its cut-off, so each row fetches ``k + margin`` neighbours (plus the self) and is
searched again with twice as many whenever its k-th kept score equals the last fetched score: the returned
top-k is then exact, ties at the boundary included (the tie-straddling case costs one more search for the rows
concerned, never a wrong answer).

Self-matches are excluded by identity: every query and every index item may carry an integer id and a
neighbour whose id equals the query's id is dropped, wherever it ranks (with duplicate embeddings the query
itself is not necessarily at rank 0).

When fewer than ``k`` neighbours exist (a small index), the missing slots hold index -1 and score -inf, as in
FAISS. The tests check it against a dense reference with the same rules (``tests/oracles.py``).
"""

from __future__ import annotations

import logging
import sys

import faiss
import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
IdPair = tuple[ArrayLike, ArrayLike]

# Queries per FAISS search call: the default of every caller (evaluation, retrieval.chunk_size).
SEARCH_CHUNK = 8192
# Largest k that FAISS GPU indexes accept; rows needing more (huge tie groups) are searched on the CPU copy.
GPU_MAX_K = 2048
# Bound on the (rows x fetched neighbours) buffers of one re-search, so a degenerate row (e.g. an all-zero
# embedding tied with the whole index) is re-searched a few rows at a time.
_MAX_FETCH_ELEMENTS = 1 << 25


def as_float32(x: ArrayLike, name: str) -> np.ndarray:
    """A C-contiguous float32 numpy (N, D) array, as FAISS wants."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    return x


def _as_ids(ids: ArrayLike, length: int, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.shape != (length,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({length},), got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _check_inputs(
    queries: ArrayLike, index: ArrayLike, k: int, exclude_self_ids: IdPair | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    query_x = as_float32(queries, "queries")
    index_x = as_float32(index, "index")
    if query_x.shape[1] != index_x.shape[1]:
        raise ValueError(f"queries have dim {query_x.shape[1]} but the index has dim {index_x.shape[1]}")
    if index_x.shape[0] == 0:
        raise ValueError("the index is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude_self_ids is None:
        return query_x, index_x, None, None
    query_ids = _as_ids(exclude_self_ids[0], len(query_x), "query ids")
    index_ids = _as_ids(exclude_self_ids[1], len(index_x), "index ids")
    return query_x, index_x, query_ids, index_ids


def _keep_first_k(
    scores: np.ndarray, indices: np.ndarray, k: int, query_ids: np.ndarray | None, index_ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by (-score, index), drop self-matches, keep k. Returns scores, indices, number kept per row."""
    order = np.lexsort((indices, -scores), axis=-1)
    scores = np.take_along_axis(scores, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    valid = indices >= 0
    if query_ids is not None:
        valid &= index_ids[np.maximum(indices, 0)] != query_ids[:, None]
    # A stable sort of the "invalid" flags moves valid entries to the front without reordering them.
    keep = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    kept_scores = np.take_along_axis(scores, keep, axis=1)
    kept_indices = np.take_along_axis(indices, keep, axis=1)
    num_valid = valid.sum(axis=1)
    missing = np.arange(keep.shape[1])[None, :] >= num_valid[:, None]
    kept_scores[missing] = -np.inf
    kept_indices[missing] = -1
    if keep.shape[1] < k:  # fewer candidates than k in total: pad
        pad = k - keep.shape[1]
        kept_scores = np.pad(kept_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        kept_indices = np.pad(kept_indices, ((0, 0), (0, pad)), constant_values=-1)
    return kept_scores, kept_indices, num_valid


def build_index(index_x: np.ndarray) -> tuple[faiss.Index, faiss.Index | None]:
    """Exact inner-product index on the CPU and, when FAISS sees GPUs, a copy sharded over all of them."""
    cpu_index = faiss.IndexFlatIP(index_x.shape[1])
    cpu_index.add(index_x)
    num_gpus = faiss.get_num_gpus()
    if num_gpus == 0:
        return cpu_index, None
    cloner_options = faiss.GpuMultipleClonerOptions()
    cloner_options.shard = True  # each GPU holds 1/num_gpus of the index; results are merged by FAISS
    logger.info("sharding a %d x %d flat index over %d GPUs", *index_x.shape, num_gpus)
    return cpu_index, faiss.index_cpu_to_all_gpus(cpu_index, co=cloner_options)


def _search_rows(
    cpu_index: faiss.Index,
    gpu_index: faiss.Index | None,
    query_x: np.ndarray,
    query_ids: np.ndarray | None,
    index_ids: np.ndarray | None,
    k: int,
    num_fetch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of a block of queries: fetch ``num_fetch``, re-search rows whose boundary tie is unresolved."""
    num_index = cpu_index.ntotal
    out_scores = np.empty((len(query_x), k), dtype=np.float32)
    out_indices = np.empty((len(query_x), k), dtype=np.int64)
    pending = np.arange(len(query_x))
    num_fetch = min(num_fetch, num_index)
    while pending.size:
        use_gpu = gpu_index is not None and num_fetch <= GPU_MAX_K
        faiss_index = gpu_index if use_gpu else cpu_index
        rows_per_search = max(1, _MAX_FETCH_ELEMENTS // num_fetch)
        still_pending = []
        for start in range(0, pending.size, rows_per_search):
            rows = pending[start : start + rows_per_search]
            scores, indices = faiss_index.search(query_x[rows], num_fetch)
            lowest_fetched = scores.min(axis=1)
            row_ids = None if query_ids is None else query_ids[rows]
            scores, indices, num_valid = _keep_first_k(scores, indices, k, row_ids, index_ids)
            if num_fetch >= num_index:
                done = np.ones(len(rows), dtype=bool)
            else:
                # Every unfetched item scores <= the lowest fetched score; strictly below the k-th kept score
                # means no unfetched item can tie into the top-k.
                done = (num_valid >= k) & (lowest_fetched < scores[:, k - 1])
            out_scores[rows[done]] = scores[done]
            out_indices[rows[done]] = indices[done]
            still_pending.append(rows[~done])
        pending = np.concatenate(still_pending)
        num_fetch = min(2 * num_fetch, num_index)
    return out_scores, out_indices


def search(
    queries: ArrayLike,
    index: ArrayLike,
    k: int,
    exclude_self_ids: IdPair | None = None,
    chunk_size: int = SEARCH_CHUNK,
    margin: int = 16,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours of each query in ``index``.

    ``exclude_self_ids=(query_ids, index_ids)`` drops, for each query, the index items whose id equals the
    query's id. Queries are searched ``chunk_size`` at a time so memory stays bounded for million-item
    indexes; ``margin`` extra neighbours are fetched to settle ties at the k-th rank (more are fetched when
    that is not enough). ``progress=None`` shows a progress bar only on a terminal.
    Returns scores (Nq, k) float32 and indices (Nq, k) int64, best first; missing slots are -inf / -1.
    """
    query_x, index_x, query_ids, index_ids = _check_inputs(queries, index, k, exclude_self_ids)
    num_queries = len(query_x)
    scores = np.empty((num_queries, k), dtype=np.float32)
    indices = np.empty((num_queries, k), dtype=np.int64)
    if num_queries == 0:
        return scores, indices
    cpu_index, gpu_index = build_index(index_x)
    num_fetch = k + margin + (0 if query_ids is None else 1)
    if progress is None:
        progress = sys.stderr.isatty()
    starts = range(0, num_queries, chunk_size)
    for start in tqdm(starts, desc="knn search", unit="chunk", disable=not progress or len(starts) == 1):
        rows = slice(start, start + chunk_size)
        chunk_ids = None if query_ids is None else query_ids[rows]
        scores[rows], indices[rows] = _search_rows(
            cpu_index, gpu_index, query_x[rows], chunk_ids, index_ids, k, num_fetch
        )
    return scores, indices

