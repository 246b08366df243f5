"""Weighted k-nearest-neighbour classification (the DINO protocol).

Features are L2-normalised, each test image votes with its k most similar train images, each vote weighted by
exp(cosine / temperature), and a class scores the sum of its votes. Predictions are ranked by score with ties
broken by the lower class id, and a class that received no vote is never counted as a correct prediction (DINO
lets zero-score classes fill the top-5 in arbitrary order; here the result does not depend on that order).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@torch.no_grad()
def weighted_knn(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (fractions) of weighted kNN for each k, computed on ``device``.

    ``device`` defaults to ``train_x``'s. k larger than the train set is capped at its size (the result stays
    keyed by the requested k). Test queries are processed ``chunk_size`` at a time, so memory is
    O(chunk_size x num_train).
    """
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, D) with one D, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if train_y.shape != (len(train_x),) or test_y.shape != (len(test_x),):
        raise ValueError("train_y / test_y must hold one class id per train / test feature")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("weighted kNN needs a non-empty train set and test set")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if min(train_y.min(), test_y.min()) < 0 or max(train_y.max(), test_y.max()) >= num_classes:
        raise ValueError(f"class ids must lie in [0, {num_classes})")
    num_train = len(train_x)
    if max(ks) > num_train:
        logger.warning("kNN: k > %d train images, capping k at %d", num_train, num_train)
    capped_ks = {k: min(k, num_train) for k in ks}
    max_k = max(capped_ks.values())

    device = torch.device(device) if device is not None else train_x.device
    train_x = F.normalize(train_x.to(device, torch.float32), dim=1)
    train_y = train_y.to(device)
    class_ids = torch.arange(num_classes, device=device)
    num_correct = {k: torch.zeros(2, dtype=torch.long, device=device) for k in ks}
    for start in range(0, len(test_x), chunk_size):
        queries = F.normalize(test_x[start : start + chunk_size].to(device, torch.float32), dim=1)
        targets = test_y[start : start + chunk_size].to(device)
        similarity, neighbors = (queries @ train_x.T).topk(max_k, dim=1)  # sorted, best first
        weights = (similarity / temperature).exp()
        neighbor_labels = train_y[neighbors]
        for k, capped in capped_ks.items():
            class_scores = torch.zeros(len(queries), num_classes, device=device)
            class_scores.scatter_add_(1, neighbor_labels[:, :capped], weights[:, :capped])
            target_score = class_scores.gather(1, targets[:, None])
            # Rank of the true class when sorting by (-score, class id).
            rank = (class_scores > target_score).sum(1) + (
                (class_scores == target_score) & (class_ids[None, :] < targets[:, None])
            ).sum(1)
            voted = (neighbor_labels[:, :capped] == targets[:, None]).any(1)
            num_correct[k] += torch.stack([(voted & (rank < 1)).sum(), (voted & (rank < 5)).sum()])
    return {
        k: {"top1": correct[0].item() / len(test_x), "top5": correct[1].item() / len(test_x)}
        for k, correct in num_correct.items()
    }
