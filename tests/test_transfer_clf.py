"""Logistic-regression transfer evaluation (t-ReX protocol): splits, classifiers, search, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unic.eval.transfer import (
    classification_metrics,
    normalize_features,
    run_logreg,
    stratified_holdout,
)

CLF_TYPES = ["logreg_sklearn", "logreg_torch"]
# Tiny search and a short torch schedule keep each run well under a second on CPU.
FAST = {"n_trials": 3, "torch_epochs": 20, "torch_batch_size": 64}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices gain nothing from intra-op threads, and thread spinning slows shared CI cores."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def make_blobs(num_classes: int, per_class: int, dim: int, spread: float, seed: int) -> dict:
    """Gaussian blobs around random unit-norm class centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1) * 3.0
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    X = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return {"X": X.float(), "Y": labels.long()}


def _easy_problem() -> tuple[dict, dict]:
    # Same centres for trainval and test: generate once and split.
    data = make_blobs(5, 60, 16, 0.2, seed=0)
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(data["Y"]), generator=gen)
    train, test = perm[:200], perm[200:]
    return {"X": data["X"][train], "Y": data["Y"][train]}, {"X": data["X"][test], "Y": data["Y"][test]}


def test_stratified_holdout_sizes_per_class():
    counts = {0: 10, 1: 5, 2: 2, 3: 1, 4: 7, 5: 13}  # round(0.2 n): 2, 1, max(0, 1)=1, 0, 1, 3
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    np.random.RandomState(0).shuffle(labels)
    train_idx, val_idx = stratified_holdout(labels, fraction=0.2, seed=3)
    expected_val = {0: 2, 1: 1, 2: 1, 3: 0, 4: 1, 5: 3}
    for cls, num in counts.items():
        assert (labels[val_idx] == cls).sum() == expected_val[cls]
        assert (labels[train_idx] == cls).sum() == num - expected_val[cls]
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == len(labels)
    # Deterministic for a seed, different for another seed.
    again = stratified_holdout(torch.from_numpy(labels), fraction=0.2, seed=3)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    other = stratified_holdout(labels, fraction=0.2, seed=4)
    assert not np.array_equal(other[1], val_idx)


def test_normalize_features_standard_uses_train_statistics_only():
    X_train = torch.tensor([[0.0, 10.0], [2.0, 30.0]])
    X_eval = torch.tensor([[1.0, 20.0], [4.0, 50.0]])
    train_n, eval_n = normalize_features(X_train, X_eval, "standard")
    assert torch.allclose(train_n, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.allclose(eval_n, torch.tensor([[0.0, 0.0], [3.0, 3.0]]))
    l2_train, _ = normalize_features(X_train, X_eval, "l2")
    assert torch.allclose(l2_train.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="features_norm"):
        normalize_features(X_train, X_eval, "minmax")


def test_classification_metrics_hand_computed():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 0, 1, 2])
    metrics = classification_metrics(pred, target)
    assert metrics["top1"] == pytest.approx(5 / 7)
    assert metrics["mean_per_class_acc"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)


@pytest.mark.parametrize("clf_type", CLF_TYPES)
def test_separable_features_reach_full_accuracy(clf_type):
    trainval, test = _easy_problem()
    result = run_logreg(trainval, test, clf_type=clf_type, seed=0, **FAST)
    assert result["top1"] >= 0.99
    assert result["mean_per_class_acc"] >= 0.99
    assert result["clf_type"] == clf_type
    assert result["features_norm"] == ("none" if clf_type == "logreg_sklearn" else "l2")
    assert result["n_trials"] == FAST["n_trials"]
    assert result["num_train"] == 200 and result["num_test"] == 100
    expected_keys = {"C"} if clf_type == "logreg_sklearn" else {"lr", "wd"}
    assert set(result["best_params"]) == expected_keys
    if clf_type == "logreg_sklearn":
        assert 1e-5 <= result["best_params"]["C"] <= 1e6
    else:
        assert 0.1 <= result["best_params"]["lr"] <= 100 and 1e-12 <= result["best_params"]["wd"] <= 1e-4


@pytest.mark.parametrize("clf_type", CLF_TYPES)
def test_random_labels_stay_near_chance(clf_type):
    gen = torch.Generator().manual_seed(0)
    num_classes = 4
    trainval = {"X": torch.randn(200, 16, generator=gen), "Y": torch.randint(num_classes, (200,), generator=gen)}
    test = {"X": torch.randn(400, 16, generator=gen), "Y": torch.randint(num_classes, (400,), generator=gen)}
    result = run_logreg(trainval, test, clf_type=clf_type, seed=0, **FAST)
    assert abs(result["top1"] - 1 / num_classes) < 0.1


def test_sklearn_and_torch_agree_on_easy_problem():
    data = make_blobs(6, 60, 16, 1.0, seed=5)  # overlapping blobs: accuracy well below 100 %
    gen = torch.Generator().manual_seed(2)
    perm = torch.randperm(len(data["Y"]), generator=gen)
    trainval = {"X": data["X"][perm[:240]], "Y": data["Y"][perm[:240]]}
    test = {"X": data["X"][perm[240:]], "Y": data["Y"][perm[240:]]}
    sk = run_logreg(trainval, test, clf_type="logreg_sklearn", features_norm="l2", seed=0, **FAST)
    tc = run_logreg(trainval, test, clf_type="logreg_torch", features_norm="l2", seed=0, **FAST)
    assert abs(sk["top1"] - tc["top1"]) <= 0.01 + 1e-9
    assert sk["top1"] > 0.8


@pytest.mark.parametrize("clf_type", CLF_TYPES)
@pytest.mark.parametrize("features_norm", ["none", "standard"])
def test_same_seed_same_numbers(clf_type, features_norm):
    data = make_blobs(4, 40, 8, 1.5, seed=7)
    perm = torch.randperm(len(data["Y"]), generator=torch.Generator().manual_seed(0))
    trainval = {"X": data["X"][perm[:120]], "Y": data["Y"][perm[:120]]}
    test = {"X": data["X"][perm[120:]], "Y": data["Y"][perm[120:]]}
    # Interleave the global RNG: the results must not depend on it.
    torch.manual_seed(123)
    first = run_logreg(trainval, test, clf_type=clf_type, features_norm=features_norm, seed=1, **FAST)
    torch.manual_seed(456)
    np.random.seed(456)
    second = run_logreg(trainval, test, clf_type=clf_type, features_norm=features_norm, seed=1, **FAST)
    assert first == second
    assert first["top1"] > 0.5  # a meaningful run, not a degenerate one


def test_bad_inputs_fail_clearly():
    trainval, test = _easy_problem()
    with pytest.raises(ValueError, match="clf_type"):
        run_logreg(trainval, test, clf_type="svm")
    with pytest.raises(ValueError, match="features_norm"):
        run_logreg(trainval, test, features_norm="pca")
    with pytest.raises(ValueError, match="'X'"):
        run_logreg({"X": trainval["X"]}, test)
    with pytest.raises(ValueError, match="feature dims"):
        run_logreg(trainval, {"X": test["X"][:, :4], "Y": test["Y"]}, n_trials=1)
