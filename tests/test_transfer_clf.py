"""Logistic-regression transfer evaluation (t-ReX protocol): splits, classifiers, search, determinism.

The reference is UNIC's copy of t-ReX (naver/unic, eval_transfer/): the tests marked "reference" restate its
procedure (global seeding, split_trainval, LogregTorchTrainer) in a few lines and check that ours draws and
computes the same, bit for bit, on CPU.
"""

from __future__ import annotations

import math
import random

import numpy as np
import optuna
import pytest
import torch

from unic.eval import transfer
from unic.eval.transfer import (
    classification_metrics,
    init_linear,
    make_sklearn_logreg,
    make_torch_generators,
    normalize_features,
    run_logreg,
    stratified_holdout,
    torch_lr_at_epoch,
    tpe_sampler_options,
    train_torch_logreg,
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


def _per_class_counts(labels: np.ndarray, idx: np.ndarray) -> dict[int, int]:
    return {int(c): int((labels[idx] == c).sum()) for c in np.unique(labels)}


def test_stratified_holdout_truncates_and_carries_the_fraction():
    # Classes in label order: 3 samples -> int(0.6) = 0, so 1 held out and the fraction becomes 1/3 for the
    # classes after it: int(10/3) = 3, int(7/3) = 2, int(12/3) = 4. Without the carry-over: int(0.2 n).
    counts = {0: 3, 1: 10, 2: 7, 3: 12}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    labels = labels[np.random.RandomState(0).permutation(len(labels))]
    train_idx, val_idx = stratified_holdout(labels, fraction=0.2, seed=22)
    assert _per_class_counts(labels, val_idx) == {0: 1, 1: 3, 2: 2, 3: 4}
    assert _per_class_counts(labels, train_idx) == {0: 2, 1: 7, 2: 5, 3: 8}
    _, fixed_val = stratified_holdout(labels, fraction=0.2, seed=22, carry_over=False)
    assert _per_class_counts(labels, fixed_val) == {0: 1, 1: 2, 2: 1, 3: 2}
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == len(labels)

    # Truncation, not rounding: int(0.2 n) for n = 13, 9, 5 is 2, 1, 1 (round would give 3, 2, 1); a
    # one-sample class stays in train (the reference stops on it).
    counts = {0: 13, 1: 9, 2: 5, 3: 1}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    train_idx, val_idx = stratified_holdout(torch.from_numpy(labels), fraction=0.2, seed=0)
    assert _per_class_counts(labels, val_idx) == {0: 2, 1: 1, 2: 1, 3: 0}
    assert _per_class_counts(labels, train_idx) == {0: 11, 1: 8, 2: 4, 3: 1}


def _reference_split(Y: torch.Tensor, per_val: float) -> tuple[np.ndarray, np.ndarray]:
    """t-ReX's split_trainval, restated: classes in np.unique order, global random.shuffle per class, the
    last int(n * per_val) to val, at least 1, and the fraction overwritten by 1/n when that happens."""
    train, val = [], []
    for c in np.unique(Y):
        inds = np.where(Y == c)[0]
        random.shuffle(inds)
        n_val = int(len(inds) * per_val)
        if n_val == 0:
            n_val = 1
            per_val = n_val / len(inds)
        train += inds[:-n_val].tolist()
        val += inds[-n_val:].tolist()
    return np.array(train), np.array(val)


def test_stratified_holdout_draws_as_the_reference():
    counts = [30, 3, 17, 8, 2, 40, 11, 1000]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = torch.from_numpy(labels[np.random.RandomState(1).permutation(len(labels))])
    state = random.getstate()
    for seed in (22, 5):
        random.seed(seed)  # the reference seeds the global stream once, in main_clf's __main__
        ref_train, ref_val = _reference_split(labels, 0.2)
        random.setstate(state)
        train_idx, val_idx = stratified_holdout(labels, fraction=0.2, seed=seed)
        # Same indices in the same (class by class, shuffled) order, and the global stream is untouched.
        assert np.array_equal(train_idx, ref_train) and np.array_equal(val_idx, ref_val)
        assert random.getstate() == state
    other = stratified_holdout(labels, fraction=0.2, seed=23)
    assert not np.array_equal(other[1], val_idx)


def test_normalize_features_standard_uses_train_statistics_only():
    # t-ReX's "standard": train mean, unbiased train std (sqrt(2) and 10 sqrt(2) here), clipped at 1e-5.
    X_train = torch.tensor([[0.0, 10.0, 5.0], [2.0, 30.0, 5.0]])
    X_eval = torch.tensor([[1.0, 20.0, 5.0], [4.0, 50.0, 5.00001]])
    train_n, eval_n = normalize_features(X_train, X_eval, "standard")
    r = 1 / math.sqrt(2)
    assert torch.allclose(train_n, torch.tensor([[-r, -r, 0.0], [r, r, 0.0]]))
    assert torch.allclose(eval_n, torch.tensor([[0.0, 0.0, 0.0], [3 * r, 3 * r, 1.0]]), atol=0.05)
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


# --------------------------------------------------------------------------------------------------------------
# The torch classifier: schedule, init, training loop
# --------------------------------------------------------------------------------------------------------------


def test_torch_lr_is_set_per_epoch_as_the_reference():
    lr = 2.0
    # The reference applies the cosine of epoch e after training epoch e: epochs 0 and 1 at lr, then shifted.
    assert torch_lr_at_epoch(lr, 0, 100) == lr and torch_lr_at_epoch(lr, 1, 100) == lr
    assert torch_lr_at_epoch(lr, 2, 100) == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 100)), rel=1e-15)
    assert torch_lr_at_epoch(lr, 51, 100) == pytest.approx(lr / 2, rel=1e-12)
    assert torch_lr_at_epoch(lr, 99, 100) == pytest.approx(lr * 0.5 * (1 + math.cos(0.98 * math.pi)))
    assert torch_lr_at_epoch(lr, 99, 100) > 0  # never reaches 0
    assert [round(torch_lr_at_epoch(1.0, e, 4), 12) for e in range(4)] == [1.0, 1.0, 0.853553390593, 0.5]


def test_torch_lr_changes_once_per_epoch_during_training(monkeypatch):
    seen = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    X = torch.nn.functional.normalize(torch.randn(70, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(70) % 3
    _, diverged = train_torch_logreg(X, y, 3, lr=0.8, wd=1e-6, epochs=5, batch_size=32)
    assert not diverged
    steps_per_epoch = 3  # 32 + 32 + 6: the last batch is partial, not dropped
    assert seen == [torch_lr_at_epoch(0.8, e, 5) for e in range(5) for _ in range(steps_per_epoch)]


def test_torch_init_is_nn_linear_default_from_its_own_stream():
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(7)
    ours = init_linear(48, 10, gen)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.manual_seed(7)
    ref = torch.nn.Linear(48, 10)
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
    assert torch.equal(gen.get_state(), torch.get_rng_state())  # the stream advanced as the global one
    bound = 1 / math.sqrt(48)  # kaiming-uniform(a = sqrt 5) weights and the bias: U(-1/sqrt(D), 1/sqrt(D))
    assert ours.weight.abs().max() <= bound and ours.bias.abs().max() <= bound
    assert ours.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    torch.set_rng_state(state)


def _reference_torch_fit(X, y, lr, wd, epochs, batch_size):
    """t-ReX's LogregTorchTrainer.fit on CPU, restated, on the global RNG: one shuffle, then nn.Linear, then per
    epoch the minibatches in that order, CrossEntropyLoss, SGD(momentum 0.9, wd), a new shuffle at the end of the
    epoch and the lr of cos(pi * epoch / epochs) set after it."""
    n = len(X)
    order = torch.zeros(n, dtype=torch.long)
    torch.randperm(n, out=order)
    clf = torch.nn.Linear(X.shape[1], int(y.max()) + 1)
    crit = torch.nn.CrossEntropyLoss()
    optim = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    for epoch in range(epochs):
        for start in range(0, n, min(batch_size, n)):
            inds = order[start : start + batch_size]
            loss = crit(clf(X[inds]), y[inds])
            optim.zero_grad()
            loss.backward()
            optim.step()
        torch.randperm(n, out=order)
        for group in optim.param_groups:
            group["lr"] = lr * (0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))
    return clf


def test_torch_training_matches_the_reference_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    X = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=1)
    y = torch.randint(0, 5, (300,), generator=gen)
    state = torch.get_rng_state()
    torch.manual_seed(22)
    # Two consecutive fits (two trials): the streams continue from one to the next.
    ref = [_reference_torch_fit(X, y, lr, wd, 6, 64) for lr, wd in ((3.0, 1e-6), (0.5, 1e-9))]
    torch.set_rng_state(state)
    generators = make_torch_generators(22, "cpu")
    for (lr, wd), ref_clf in zip(((3.0, 1e-6), (0.5, 1e-9)), ref):
        ours, diverged = train_torch_logreg(X, y, 5, lr=lr, wd=wd, epochs=6, batch_size=64, generators=generators)
        assert not diverged
        assert torch.equal(ours.weight, ref_clf.weight) and torch.equal(ours.bias, ref_clf.bias)
    assert torch.equal(torch.get_rng_state(), state)


def test_torch_divergence_stops_and_still_predicts():
    gen = torch.Generator().manual_seed(0)
    X = 1e20 * torch.randn(64, 8, generator=gen)  # huge raw features: the logits overflow after one step
    y = torch.arange(64) % 4
    model, diverged = train_torch_logreg(X, y, 4, lr=100.0, wd=1e-4, epochs=50, batch_size=16)
    assert diverged
    pred = transfer.predict_torch(model, X)
    assert pred.shape == (64,) and pred.dtype == torch.long


# --------------------------------------------------------------------------------------------------------------
# Search and refit
# --------------------------------------------------------------------------------------------------------------


def test_reference_settings():
    assert transfer.DEFAULT_NUM_TRIALS == {"logreg_sklearn": 40, "logreg_torch": 40}
    assert transfer.DEFAULT_SEED == 22 and transfer.HOLDOUT_FRACTION == 0.2
    assert transfer.DEFAULT_FEATURES_NORM == {"logreg_sklearn": "none", "logreg_torch": "l2"}
    assert (transfer.SKLEARN_C_RANGE, transfer.TORCH_LR_RANGE, transfer.TORCH_WD_RANGE) == (
        (1e-5, 1e6), (0.1, 100.0), (1e-12, 1e-4))
    assert (transfer.TORCH_EPOCHS, transfer.TORCH_BATCH_SIZE, transfer.TORCH_MOMENTUM) == (100, 1024, 0.9)
    params = make_sklearn_logreg(3.0).get_params()
    assert {k: params[k] for k in ("C", "solver", "max_iter", "tol", "dual", "fit_intercept", "random_state",
                                   "class_weight", "warm_start")} == {
        "C": 3.0, "solver": "lbfgs", "max_iter": 2000, "tol": 1e-4, "dual": False, "fit_intercept": True,
        "random_state": 22, "class_weight": None, "warm_start": False}
    assert params.get("penalty") in ("l2", "deprecated") and params.get("l1_ratio") in (None, 0.0)
    assert tpe_sampler_options("logreg_sklearn") == {
        "seed": 22, "n_startup_trials": 10, "multivariate": False, "group": False, "constant_liar": False}
    assert tpe_sampler_options("logreg_torch", seed=3) == {
        "seed": 3, "n_startup_trials": 10, "multivariate": True, "group": True, "constant_liar": False}


def _search_problem() -> tuple[dict, dict]:
    """300 points, 4 overlapping classes: the hyper-parameters matter a little."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=gen) * 1.2
    labels = torch.arange(4).repeat_interleave(75)
    X = centres[labels] + torch.randn(len(labels), 8, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return ({"X": X[perm[:200]], "Y": labels[perm[:200]]}, {"X": X[perm[200:]], "Y": labels[perm[200:]]})


@pytest.mark.parametrize("clf_type", CLF_TYPES)
def test_default_search_runs_40_trials_reproducibly(clf_type, monkeypatch):
    samplers = []
    real_sampler = optuna.samplers.TPESampler

    def recording_sampler(**kwargs):
        samplers.append(kwargs)
        return real_sampler(**kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", recording_sampler)
    trainval, test = _search_problem()
    fast = {"torch_epochs": 5, "torch_batch_size": 32} if clf_type == "logreg_torch" else {}
    first = run_logreg(trainval, test, clf_type=clf_type, **fast)  # default trials, seed, hold-out
    assert samplers == [tpe_sampler_options(clf_type, 22)]
    assert first["n_trials"] == 40 and len(first["trials"]) == 40 and first["seed"] == 22
    # int(0.2 n) of each class's trainval samples are held out.
    counts = torch.bincount(trainval["Y"]).tolist()
    assert first["num_holdout"] == sum(int(0.2 * n) for n in counts)
    values = [t["value"] for t in first["trials"]]
    best = values.index(max(values))  # the first best trial wins ties
    assert first["best_params"] == first["trials"][best]["params"] and first["holdout_top1"] == max(values)
    name = "C" if clf_type == "logreg_sklearn" else "lr"
    assert len({t["params"][name] for t in first["trials"]}) == 40  # 40 distinct points were tried

    second = run_logreg(trainval, test, clf_type=clf_type, **fast)
    assert second == first  # same seed: same trials, best parameters and scores
    other = run_logreg(trainval, test, clf_type=clf_type, seed=23, n_trials=12, **fast)
    assert other["trials"][0]["params"] != first["trials"][0]["params"]
    assert first["top1"] > 0.7


def test_refit_scores_best_params_on_all_of_trainval():
    trainval, test = _search_problem()
    result = run_logreg(trainval, test, clf_type="logreg_sklearn", n_trials=15)
    pred = transfer.fit_predict_sklearn(trainval["X"], trainval["Y"], test["X"], C=result["best_params"]["C"])
    assert classification_metrics(pred, test["Y"]) == {
        "top1": result["top1"], "mean_per_class_acc": result["mean_per_class_acc"]}


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
