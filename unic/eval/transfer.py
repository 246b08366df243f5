"""Logistic-regression transfer evaluation (t-ReX protocol).

Features are extracted by ``eval_transfer/main_ft_extract.py`` with :func:`token_encoder` (cls token, mean patch
token or both) and stored per split by :func:`save_features` as ``{"X": float32 (N, D), "Y": int64 (N,)}``.
The protocol:

1. split trainval into a stratified 20 % per-class hold-out (:func:`stratified_holdout`);
2. search the classifier's hyper-parameters with Optuna TPE, maximising hold-out top-1;
3. refit on the whole trainval with the best hyper-parameters and report test top-1 and mean per-class
   accuracy (both as fractions).

Two classifiers: scikit-learn's L-BFGS logistic regression (small data sets, C searched log-uniform in
[1e-5, 1e6]) and a torch linear layer trained with SGD (large data sets such as ImageNet; lr log-uniform in
[0.1, 100], weight decay log-uniform in [1e-12, 1e-4], 100 epochs, batch 1024, cosine schedule). Everything is
seeded: the same inputs and seed give the same numbers.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unic import distributed

logger = logging.getLogger(__name__)

CLF_TYPES = ("logreg_sklearn", "logreg_torch")
FEATURES_NORMS = ("none", "l2", "standard")
# Protocol defaults: sklearn on raw features, the SGD classifier on l2-normalised ones (t-ReX / UNIC scripts).
DEFAULT_FEATURES_NORM = {"logreg_sklearn": "none", "logreg_torch": "l2"}
DEFAULT_NUM_TRIALS = {"logreg_sklearn": 30, "logreg_torch": 20}

SKLEARN_C_RANGE = (1e-5, 1e6)
SKLEARN_MAX_ITER = 1000
TORCH_LR_RANGE = (0.1, 100.0)
TORCH_WD_RANGE = (1e-12, 1e-4)
TORCH_EPOCHS = 100
TORCH_BATCH_SIZE = 1024
TORCH_MOMENTUM = 0.9
EVAL_BATCH_SIZE = 65536


# --------------------------------------------------------------------------------------------------------------
# Feature descriptors and feature files
# --------------------------------------------------------------------------------------------------------------

TOKEN_TYPES = ("cls", "patch", "both")
FEATURE_SPLITS = ("trainval", "test")


def token_encoder(encoder: nn.Module, token_type: str = "cls") -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, 3, H, W) -> descriptors (B, D) for a :class:`unic.eval.encoders.Encoder`.

    ``cls``: the encoder's descriptor (final-normed cls token for ViTs); ``patch``: mean of the final-normed
    patch tokens of the last block; ``both``: the two concatenated (B, 2D), as in UNIC's transfer evaluation.
    """
    if token_type not in TOKEN_TYPES:
        raise ValueError(f"unknown token_type {token_type!r}, expected one of {TOKEN_TYPES}")
    if token_type != "cls" and not getattr(encoder, "is_vit", False):
        raise ValueError(f"token_type={token_type!r} needs patch tokens, which {encoder.name} has no (use cls)")

    def encode(images_BCHW: torch.Tensor) -> torch.Tensor:
        if token_type == "cls":
            return encoder(images_BCHW)
        cls_BD, patches_BND = encoder.descriptor_and_patches(images_BCHW)  # one backbone pass for both
        patch_BD = patches_BND.mean(dim=1)
        if token_type == "patch":
            return patch_BD
        return torch.cat([cls_BD.to(patch_BD.dtype), patch_BD], dim=1)

    return encode


def features_path(features_dir: str, split: str) -> str:
    return os.path.join(features_dir, f"features_{split}.pth")


def save_features(path: str, X: torch.Tensor, Y: torch.Tensor) -> None:
    """Write ``{"X": float32 (N, D), "Y": int64 (N,)}`` atomically (a reader never sees half a file)."""
    from unic.train.checkpoint import atomic_save

    X, Y = torch.as_tensor(X).float().cpu().contiguous(), torch.as_tensor(Y).long().cpu().reshape(-1)
    if X.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X must be (N, D) and Y (N,), got {tuple(X.shape)} and {tuple(Y.shape)}")
    atomic_save({"X": X, "Y": Y}, path)


def load_features(path: str) -> dict[str, torch.Tensor]:
    """Read a features file written by :func:`save_features` (weights-only), validating its content."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"features file not found: {path} (write it with eval_transfer/main_ft_extract.py --output_dir "
            f"{os.path.dirname(path) or '.'})"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickled code, truncated zip, not a torch file at all
        raise ValueError(f"{path} is not a readable features file: {str(err).splitlines()[0]}") from None
    X, Y = _check_split(data, path)
    return {"X": X, "Y": Y}


# --------------------------------------------------------------------------------------------------------------
# Splits, normalisation, metrics
# --------------------------------------------------------------------------------------------------------------


def stratified_holdout(
    labels: torch.Tensor | np.ndarray, fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (train, hold-out), taking ``fraction`` of every class for the hold-out.

    Per class of ``n`` samples the hold-out gets ``round(fraction * n)`` of them, at least 1 when ``n >= 2`` and
    never all of them, so every class stays in the training part. Both index arrays are sorted; the split
    depends only on the labels and the seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels_np = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    labels_np = labels_np.reshape(-1)
    rng = np.random.RandomState(seed)
    train_parts, val_parts = [], []
    # Group the indices by class once (a stable sort keeps each class's indices ascending): O(N log N), not
    # O(N x classes), which matters for iNaturalist (8142 classes).
    order = np.argsort(labels_np, kind="stable")
    _, starts, counts = np.unique(labels_np[order], return_index=True, return_counts=True)
    for start, num in zip(starts, counts):  # classes in sorted order, so the RNG draws happen in a fixed order
        cls_idx = order[start : start + num]
        num_val = int(math.floor(fraction * num + 0.5))  # round half up (Python's round() is banker's)
        if num >= 2:
            num_val = min(max(num_val, 1), num - 1)
        else:
            num_val = 0
        perm = cls_idx[rng.permutation(num)]
        val_parts.append(perm[:num_val])
        train_parts.append(perm[num_val:])
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    return train_idx, val_idx


def normalize_features(
    X_train: torch.Tensor, X_eval: torch.Tensor, features_norm: str, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``none``, ``l2`` (per sample) or ``standard`` (per dimension, fitted on ``X_train`` only)."""
    if features_norm == "none":
        return X_train, X_eval
    if features_norm == "l2":
        return F.normalize(X_train, dim=1), F.normalize(X_eval, dim=1)
    if features_norm == "standard":
        mean = X_train.mean(dim=0, keepdim=True)
        std = X_train.std(dim=0, keepdim=True, unbiased=False).clamp_min(eps)
        return (X_train - mean) / std, (X_eval - mean) / std
    raise ValueError(f"unknown features_norm {features_norm!r}, expected one of {FEATURES_NORMS}")


def classification_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (over the classes present in ``target``), as fractions."""
    pred, target = pred.reshape(-1).cpu(), target.reshape(-1).cpu()
    correct = (pred == target).double()
    top1 = correct.mean().item()
    classes, inverse = torch.unique(target, return_inverse=True)
    per_class_correct = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, correct)
    per_class_count = torch.bincount(inverse, minlength=len(classes)).double()
    mean_per_class = (per_class_correct / per_class_count).mean().item()
    return {"top1": top1, "mean_per_class_acc": mean_per_class}


# --------------------------------------------------------------------------------------------------------------
# Classifiers: fit on (X_train, y_train), return predictions on X_eval
# --------------------------------------------------------------------------------------------------------------


def fit_predict_sklearn(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_eval: torch.Tensor,
    C: float,
    max_iter: int = SKLEARN_MAX_ITER,
) -> torch.Tensor:
    """scikit-learn L-BFGS multinomial logistic regression with inverse regularisation ``C``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    with warnings.catch_warnings():
        # Extreme C values hit max_iter; that is part of the search, not something to report per trial.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train.cpu().numpy(), y_train.cpu().numpy())
    return torch.from_numpy(clf.predict(X_eval.cpu().numpy()).astype(np.int64))


def train_torch_logreg(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    lr: float,
    wd: float,
    epochs: int = TORCH_EPOCHS,
    batch_size: int = TORCH_BATCH_SIZE,
    momentum: float = TORCH_MOMENTUM,
    seed: int = 0,
) -> nn.Linear:
    """Train a linear classifier with SGD + momentum and a per-iteration cosine schedule.

    ``X_train`` and ``y_train`` live on the training device; only minibatches of ``batch_size`` rows enter the
    graph, so ImageNet-size feature sets (1.28M x 768 float32, ~4 GB) fit on one GPU. Shuffling uses its own
    CPU ``torch.Generator`` and the weights a seeded init, so runs are reproducible and do not touch the global
    RNG.
    """
    device = X_train.device
    num_samples, dim = X_train.shape
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        model.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
        model.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    steps_per_epoch = math.ceil(num_samples / batch_size)
    num_steps = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(num_samples, generator=generator).to(device, non_blocking=True)
        for start in range(0, num_samples, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / num_steps))
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model


@torch.no_grad()
def predict_torch(model: nn.Module, X: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """Arg-max predictions in chunks, returned on CPU."""
    preds = [model(X[start : start + batch_size]).argmax(dim=1).cpu() for start in range(0, len(X), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def fit_predict_torch(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_eval: torch.Tensor,
    num_classes: int,
    lr: float,
    wd: float,
    seed: int = 0,
    epochs: int = TORCH_EPOCHS,
    batch_size: int = TORCH_BATCH_SIZE,
) -> torch.Tensor:
    """Train :func:`train_torch_logreg` and predict ``X_eval``; a diverged model predicts -1 (counts as wrong)."""
    model = train_torch_logreg(
        X_train, y_train, num_classes, lr=lr, wd=wd, epochs=epochs, batch_size=batch_size, seed=seed
    )
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return torch.full((len(X_eval),), -1, dtype=torch.long)
    return predict_torch(model, X_eval)


# --------------------------------------------------------------------------------------------------------------
# Search + refit
# --------------------------------------------------------------------------------------------------------------


def _check_split(split: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(split, dict) or "X" not in split or "Y" not in split:
        raise ValueError(f"{name} must be a dict with keys 'X' (N, D) and 'Y' (N,)")
    X = torch.as_tensor(split["X"]).float()
    Y = torch.as_tensor(split["Y"]).long().reshape(-1)
    if X.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"{name}: X must be (N, D) and Y (N,), got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if (Y < 0).any():
        raise ValueError(f"{name}: labels must be non-negative integers")
    return X, Y


def _make_fit_predict(
    clf_type: str, num_classes: int, seed: int, device: torch.device, torch_epochs: int, torch_batch_size: int
) -> tuple[Callable[[optuna.Trial], dict[str, float]], Callable[..., torch.Tensor]]:
    """Return (suggest hyper-parameters for a trial, fit on train and predict eval with given params)."""
    if clf_type == "logreg_sklearn":

        def suggest(trial: optuna.Trial) -> dict[str, float]:
            return {"C": trial.suggest_float("C", *SKLEARN_C_RANGE, log=True)}

        def fit_predict(X_train, y_train, X_eval, params):
            return fit_predict_sklearn(X_train, y_train, X_eval, C=params["C"])

    else:

        def suggest(trial: optuna.Trial) -> dict[str, float]:
            return {
                "lr": trial.suggest_float("lr", *TORCH_LR_RANGE, log=True),
                "wd": trial.suggest_float("wd", *TORCH_WD_RANGE, log=True),
            }

        def fit_predict(X_train, y_train, X_eval, params):
            return fit_predict_torch(
                X_train.to(device),
                y_train.to(device),
                X_eval.to(device),
                num_classes,
                lr=params["lr"],
                wd=params["wd"],
                seed=seed,
                epochs=torch_epochs,
                batch_size=torch_batch_size,
            )

    return suggest, fit_predict


def run_logreg(
    trainval: dict,
    test: dict,
    clf_type: str = "logreg_sklearn",
    features_norm: str | None = None,
    n_trials: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    holdout_fraction: float = 0.2,
    torch_epochs: int = TORCH_EPOCHS,
    torch_batch_size: int = TORCH_BATCH_SIZE,
) -> dict[str, Any]:
    """Search hyper-parameters on a stratified hold-out of ``trainval``, refit on all of it, score ``test``.

    ``features_norm=None`` picks the protocol default (``none`` for sklearn, ``l2`` for the torch classifier);
    ``n_trials=None`` picks 30 (sklearn) or 20 (torch). Returns ``top1`` and ``mean_per_class_acc`` (fractions),
    ``best_params``, ``holdout_top1`` (the best trial's hold-out top-1) and the run's settings.
    """
    if clf_type not in CLF_TYPES:
        raise ValueError(f"unknown clf_type {clf_type!r}, expected one of {CLF_TYPES}")
    if features_norm is None:
        features_norm = DEFAULT_FEATURES_NORM[clf_type]
    if features_norm not in FEATURES_NORMS:
        raise ValueError(f"unknown features_norm {features_norm!r}, expected one of {FEATURES_NORMS}")
    if clf_type == "logreg_torch" and features_norm != "l2":
        logger.warning(
            "logreg_torch with features_norm=%r: the t-ReX protocol uses l2-normalised features", features_norm
        )
    n_trials = DEFAULT_NUM_TRIALS[clf_type] if n_trials is None else int(n_trials)
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    device = torch.device(device)

    X_trainval, Y_trainval = _check_split(trainval, "trainval")
    X_test, Y_test = _check_split(test, "test")
    if X_trainval.shape[1] != X_test.shape[1]:
        raise ValueError(f"feature dims differ: trainval {X_trainval.shape[1]} vs test {X_test.shape[1]}")
    absent = sorted(set(Y_test.unique().tolist()) - set(Y_trainval.unique().tolist()))
    if absent:
        raise ValueError(
            f"class-count mismatch: {len(absent)} test class(es) have no trainval sample (e.g. {absent[:5]}); "
            "were both splits extracted with the same class list?"
        )
    num_classes = int(max(Y_trainval.max().item(), Y_test.max().item())) + 1

    train_idx, val_idx = stratified_holdout(Y_trainval, fraction=holdout_fraction, seed=seed)
    # The torch classifier's data moves to its device once, not once per trial.
    data_device = device if clf_type == "logreg_torch" else torch.device("cpu")
    X_trainval, Y_trainval = X_trainval.to(data_device), Y_trainval.to(data_device)
    train_idx_t = torch.from_numpy(train_idx).to(data_device)
    val_idx_t = torch.from_numpy(val_idx).to(data_device)
    X_fit, X_val = normalize_features(X_trainval[train_idx_t], X_trainval[val_idx_t], features_norm)
    Y_fit, Y_val_cpu = Y_trainval[train_idx_t], Y_trainval[val_idx_t].cpu()

    suggest, fit_predict = _make_fit_predict(clf_type, num_classes, seed, device, torch_epochs, torch_batch_size)

    def objective(trial: optuna.Trial) -> float:
        pred = fit_predict(X_fit, Y_fit, X_val, suggest(trial))
        return (pred == Y_val_cpu).double().mean().item()

    logger.info(
        "%s (features_norm=%s): %d trials on %d train / %d hold-out samples, %d classes",
        clf_type, features_norm, n_trials, len(train_idx), len(val_idx), num_classes,
    )
    start = time.perf_counter()
    study = _optimize(objective, n_trials=n_trials, seed=seed, desc=f"{clf_type} search")
    best_params = dict(study.best_params)
    logger.info("best hold-out top-1 %.4f with %s", study.best_value, best_params)

    # Refit on the whole trainval; "standard" statistics are re-fitted on it too.
    X_fit = X_val = None  # free the hold-out split before the refit (the objective's cells held it)
    X_all, X_eval = normalize_features(X_trainval, X_test.to(data_device), features_norm)
    pred_test = fit_predict(X_all, Y_trainval, X_eval, best_params)
    metrics = classification_metrics(pred_test, Y_test)
    logger.info(
        "test top-1 %.4f, mean per-class acc %.4f (%.1f s)",
        metrics["top1"], metrics["mean_per_class_acc"], time.perf_counter() - start,
    )
    return {
        "top1": metrics["top1"],
        "mean_per_class_acc": metrics["mean_per_class_acc"],
        "best_params": best_params,
        "holdout_top1": float(study.best_value),
        "clf_type": clf_type,
        "features_norm": features_norm,
        "n_trials": n_trials,
        "num_train": int(len(X_trainval)),
        "num_test": int(len(X_test)),
        "seed": seed,
    }


def _optimize(objective: Callable[[optuna.Trial], float], n_trials: int, seed: int, desc: str) -> optuna.Study:
    """Run a seeded TPE study with optuna's per-trial log lines replaced by one tqdm bar."""
    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        with tqdm(total=n_trials, desc=desc, disable=not distributed.is_main_process(), leave=False) as bar:

            def update_bar(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                bar.update(1)
                bar.set_postfix(best=f"{study.best_value:.4f}")

            study.optimize(objective, n_trials=n_trials, callbacks=[update_bar])
    finally:
        optuna.logging.set_verbosity(previous_verbosity)
    return study
