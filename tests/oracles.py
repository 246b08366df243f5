"""Dense references that the tests compare the library against (never imported by the library)."""

from __future__ import annotations

import numpy as np
import torch

from unic.eval.search import ArrayLike, IdPair, as_float32


def _ids(ids: ArrayLike) -> np.ndarray:
    return np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)


def search_torch(
    queries: ArrayLike, index: ArrayLike, k: int, exclude_self_ids: IdPair | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense reference for ``unic.eval.search.search``: full similarity matrix, stable sort, same tie and
    self-exclusion rules (equal scores in ascending index order, an index item whose id is the query's dropped)."""
    query_x, index_x = as_float32(queries, "queries"), as_float32(index, "index")
    similarity = torch.from_numpy(query_x) @ torch.from_numpy(index_x).T
    # A stable descending sort keeps equal scores in ascending index order.
    sorted_scores, order = torch.sort(similarity, dim=1, descending=True, stable=True)
    valid = torch.ones_like(order, dtype=torch.bool)
    if exclude_self_ids is not None:
        query_ids, index_ids = (torch.from_numpy(_ids(ids)) for ids in exclude_self_ids)
        valid = index_ids[order] != query_ids[:, None]
    keep = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    scores = torch.gather(sorted_scores, 1, keep)
    indices = torch.gather(order, 1, keep)
    missing = torch.arange(keep.shape[1])[None, :] >= valid.sum(dim=1, keepdim=True)
    scores[missing] = -torch.inf
    indices[missing] = -1
    pad = k - keep.shape[1]
    scores = torch.nn.functional.pad(scores, (0, pad), value=-torch.inf)
    indices = torch.nn.functional.pad(indices, (0, pad), value=-1)
    return scores.numpy(), indices.numpy().astype(np.int64)
