"""Weighted kNN classification against a brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch

from unic.eval.knn import weighted_knn


def brute_knn(train_x, train_y, test_x, test_y, k, temperature=0.07):
    """Plain loops: cosine in float64, votes per class, classes ranked by (-score, class id)."""
    top1 = top5 = 0
    train = [row / row.norm() for row in train_x.double()]
    for query, target in zip(test_x.double(), test_y.tolist()):
        query = query / query.norm()
        similarities = sorted(((float(query @ item), j) for j, item in enumerate(train)), reverse=True)[:k]
        votes: dict[int, float] = {}
        for similarity, j in similarities:
            label = int(train_y[j])
            votes[label] = votes.get(label, 0.0) + math.exp(similarity / temperature)
        ranking = sorted(votes, key=lambda label: (-votes[label], label))
        top1 += ranking[:1] == [target]
        top5 += target in ranking[:5]
    return {"top1": top1 / len(test_y), "top5": top5 / len(test_y)}


@pytest.mark.parametrize("num_classes", [3, 12])
def test_weighted_knn_against_brute_force(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    centers = torch.randn(num_classes, 16, generator=generator)
    train_y = torch.randint(0, num_classes, (150,), generator=generator)
    test_y = torch.randint(0, num_classes, (41,), generator=generator)
    train_x = centers[train_y] + 1.5 * torch.randn(150, 16, generator=generator)
    test_x = centers[test_y] + 1.5 * torch.randn(41, 16, generator=generator)
    ks = (1, 10, 20, 100, 200)  # 200 > 150 train images: capped
    results = weighted_knn(train_x, train_y, test_x, test_y, ks=ks, chunk_size=8)
    assert list(results) == list(ks)
    for k in ks:
        expected = brute_knn(train_x, train_y, test_x, test_y, min(k, 150))
        assert results[k] == pytest.approx(expected), k
        assert 0 <= results[k]["top1"] <= results[k]["top5"] <= 1
    assert results[10]["top1"] > 1.5 / num_classes  # clustered data: well above chance


def test_weighted_knn_hand_computed():
    # query [1, 0]; neighbours: class 0 at cos 1, class 1 at cos 0.8 twice (2 * e^(0.8/T) > e^(1/T) at T=0.5)
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    test_x = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    test_y = torch.tensor([1, 2])
    results = weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 3), temperature=0.5, num_classes=7)
    assert results[1] == {"top1": 0.0, "top5": 0.0}  # only class 0 voted; class 2 got no vote
    assert results[3] == {"top1": 0.5, "top5": 0.5}  # class 1 wins; class 2 never voted, not in the top-5


def test_weighted_knn_rejects_bad_inputs():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 2])
    with pytest.raises(ValueError):
        weighted_knn(x, y, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError):
        weighted_knn(x, y, x, y, num_classes=2)
    with pytest.raises(ValueError):
        weighted_knn(x, y[:4], x, y)
