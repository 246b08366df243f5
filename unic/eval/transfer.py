"""Logistic-regression transfer evaluation (t-ReX protocol, as in UNIC's ``eval_transfer/``).

Features are extracted by ``eval_transfer/main_ft_extract.py`` (:func:`extract_split` with :func:`token_encoder`:
cls token, mean patch token or both) and stored per split by :func:`save_features` as
``{"X": float32 (N, D), "Y": int64 (N,)}``.
The protocol:

1. split trainval into a per-class hold-out (:func:`stratified_holdout`: ``int(0.2 n)`` samples of each class,
   at least 1, drawn by Python's ``random`` seeded with 22);
2. search the classifier's hyper-parameters with Optuna TPE (40 trials, seed 22), maximising hold-out top-1;
3. refit on the whole trainval with the best hyper-parameters and report test top-1 and mean per-class
   accuracy (both as fractions).

Two classifiers: scikit-learn's L-BFGS logistic regression (small data sets; C log-uniform in [1e-5, 1e6],
``max_iter=2000``) and a torch ``nn.Linear`` trained with SGD (large data sets such as ImageNet; lr log-uniform in
[0.1, 100], weight decay log-uniform in [1e-12, 1e-4], momentum 0.9, 100 epochs, batch 1024, cosine lr set once
per epoch). The constants are those of UNIC's copy of t-ReX (``eval_transfer/main_clf.py`` and
``logreg_trainer.py`` in naver/unic), which produced the published numbers; the random streams are laid out as
there (one ``random`` stream for the split, one torch stream for the inits and one for the shuffles, continued
from trial to trial and into the refit), so the same inputs and seed give the same numbers, without touching
the global RNGs.
"""

from __future__ import annotations

import logging
import math
import os
import random
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
from unic.data.folders import ImageListDataset
from unic.eval.features import extract_features
from unic.io import save_checkpoint

logger = logging.getLogger(__name__)

CLF_TYPES = ("logreg_sklearn", "logreg_torch")
FEATURES_NORMS = ("none", "l2", "standard")
# References are to naver/unic, eval_transfer/ (main_clf.py, logreg_trainer.py, data/utils.py) and
# scripts/eval_transfer.sh. The script pairs sklearn with raw features and the SGD classifier (in1k, inat*, cog_*)
# with l2-normalised ones; main_clf.py's own default is "none" for both.
DEFAULT_FEATURES_NORM = {"logreg_sklearn": "none", "logreg_torch": "l2"}
DEFAULT_NUM_TRIALS = {"logreg_sklearn": 40, "logreg_torch": 40}  # --n_optuna_trials 40 (t-ReX itself: 30)
DEFAULT_SEED = 22  # --seed 22: the hold-out split, the TPE sampler, the torch inits and shuffles
HOLDOUT_FRACTION = 0.2  # --val_perc 0.2

SKLEARN_C_RANGE = (1e-5, 1e6)  # --clf_C_min / --clf_C_max, log-uniform
SKLEARN_MAX_ITER = 2000  # --clf_max_iter
SKLEARN_TOL = 1e-4  # scikit-learn's default, not set there
TORCH_LR_RANGE = (0.1, 100.0)  # --clf_lr_min / --clf_lr_max, log-uniform
TORCH_WD_RANGE = (1e-12, 1e-4)  # --clf_wd_min / --clf_wd_max, log-uniform
TORCH_EPOCHS = 100  # --clf_epochs
TORCH_BATCH_SIZE = 1024  # --clf_batch_size (also the prediction chunk)
TORCH_MOMENTUM = 0.9  # --clf_mom
# TPESampler(multivariate=group=(clf is torch), seed=seed), the rest optuna's defaults of the time (3.x):
TPE_N_STARTUP_TRIALS = 10
TPE_CONSTANT_LIAR = False  # optuna 3.x default; 5.x turned it on (no effect with sequential trials)
STANDARD_STD_MIN = 1e-5  # features_norm="standard" (t-ReX only): (x - mean) / std.clip(1e-5), unbiased std


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


def extract_split(
    encode: Callable[[torch.Tensor], torch.Tensor],
    samples: list,
    transform: Callable,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    autocast_dtype: torch.dtype | None,
    desc: str,
) -> dict[str, Any]:
    """The features of one split's ``(path, [label], domain)`` samples, sharded over the ranks and gathered in
    order (every rank gets them all). A row whose image was unreadable holds a copy of a later sample
    (:func:`unic.eval.features.extract_features`): it is dropped rather than counted twice. Returns ``X``
    (N, D) float32, ``Y`` (N,), ``skipped`` (unreadable images) and ``seconds``."""
    dataset = ImageListDataset(samples, transform)
    start = time.perf_counter()
    out = extract_features(encode, dataset, device, batch_size=batch_size, num_workers=num_workers,
                           autocast_dtype=autocast_dtype, desc=desc)
    seconds = time.perf_counter() - start
    skipped = int(out["skipped"])
    features, labels = out["features"], out["labels"]
    if skipped:
        keep = out["item_skipped"] == 0
        features, labels = features[keep], labels[keep]
        logger.warning("%s: %d unreadable image(s) skipped, %d rows dropped", desc, skipped, int((~keep).sum()))
    if not torch.isfinite(features).all():
        raise ValueError(f"non-finite features in {desc} (try run.precision=fp32)")
    logger.info("%s: %d x %d features in %.1f s (%.1f images/s)", desc, *features.shape, seconds,
                len(dataset) / max(seconds, 1e-9))
    return {"X": features, "Y": labels, "skipped": skipped, "seconds": seconds}


def features_path(features_dir: str, split: str) -> str:
    return os.path.join(features_dir, f"features_{split}.pth")


def save_features(path: str, X: torch.Tensor, Y: torch.Tensor) -> None:
    """Write ``{"X": float32 (N, D), "Y": int64 (N,)}`` atomically (a reader never sees half a file)."""
    X, Y = torch.as_tensor(X).float().cpu().contiguous(), torch.as_tensor(Y).long().cpu().reshape(-1)
    if X.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X must be (N, D) and Y (N,), got {tuple(X.shape)} and {tuple(Y.shape)}")
    save_checkpoint({"X": X, "Y": Y}, path)


def load_features(path: str) -> dict[str, torch.Tensor]:
    """Read a features file written by :func:`save_features` (weights-only), validating its content."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"features file not found: {path} (write it with eval_transfer/main_ft_extract.py run.output_dir="
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
    labels: torch.Tensor | np.ndarray,
    fraction: float = HOLDOUT_FRACTION,
    seed: int = DEFAULT_SEED,
    carry_over: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (train, hold-out) per class, by the rule of t-ReX's ``split_trainval``.

    Classes are visited in increasing label order; each class's indices (ascending) are shuffled with one
    ``random.Random(seed)`` stream (the same draws as ``random.seed(seed)`` then ``random.shuffle`` per class);
    the last ``int(n * fraction)`` (truncated) go to the hold-out, the others to train. A class where that is 0
    but ``n >= 2`` holds out 1 sample, and, with ``carry_over`` (the reference), the fraction used for all the
    classes after it becomes ``1 / n``: e.g. counts (3, 10, 7, 12) at 0.2 hold out (1, 3, 2, 4), not
    (1, 2, 1, 2). A class of one sample stays in train (the reference stops with an assertion). Indices come
    back in that order, class by class, not sorted: the SGD classifier's minibatches depend on it.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels_np = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    labels_np = labels_np.reshape(-1)
    rng = random.Random(seed)
    train_parts, val_parts, raised, singletons = [], [], [], 0
    # Group the indices by class once (a stable sort keeps each class's indices ascending, as np.where does):
    # O(N log N), not O(N x classes), which matters for iNaturalist (8142 classes).
    order = np.argsort(labels_np, kind="stable")
    _, starts, counts = np.unique(labels_np[order], return_index=True, return_counts=True)
    for start, num in zip(starts.tolist(), counts.tolist()):
        # random.shuffle's draws depend only on the length: shuffling a list is the reference's shuffle of the
        # numpy array, much faster.
        cls_idx = order[start : start + num].tolist()
        rng.shuffle(cls_idx)
        num_val = int(num * fraction)
        if num_val == 0:
            if num < 2:
                singletons += 1
                train_parts.append(cls_idx)
                continue
            num_val = 1
            if carry_over:
                fraction = num_val / num
                raised.append(num)
        train_parts.append(cls_idx[: num - num_val])
        val_parts.append(cls_idx[num - num_val :])
    if raised:
        logger.warning(
            "hold-out: %d class(es) with fewer than 1/fraction samples (e.g. %d) hold out 1 sample each, and the "
            "fraction for the classes after them rises to %.4g (t-ReX's rule; carry_over=False keeps it)",
            len(raised), raised[0], fraction,
        )
    if singletons:
        logger.warning("hold-out: %d class(es) with a single sample stay in train only", singletons)
    train_idx = np.fromiter((i for part in train_parts for i in part), dtype=np.int64)
    val_idx = np.fromiter((i for part in val_parts for i in part), dtype=np.int64)
    return train_idx, val_idx


def normalize_features(
    X_train: torch.Tensor, X_eval: torch.Tensor, features_norm: str, eps: float = STANDARD_STD_MIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``none``, ``l2`` (per sample) or ``standard`` (per dimension, fitted on ``X_train`` only).

    ``standard`` is t-ReX's: the unbiased standard deviation, clipped at ``eps`` = 1e-5.
    """
    if features_norm == "none":
        return X_train, X_eval
    if features_norm == "l2":
        return F.normalize(X_train, p=2, dim=1), F.normalize(X_eval, p=2, dim=1)
    if features_norm == "standard":
        mean = X_train.mean(dim=0)
        std = X_train.std(dim=0).clamp_min(eps)
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


def make_sklearn_logreg(C: float, max_iter: int = SKLEARN_MAX_ITER, seed: int = DEFAULT_SEED):
    """The reference's ``LogisticRegression``: l2 penalty (the default), primal L-BFGS, ``tol`` 1e-4, an intercept,
    ``max_iter`` 2000, ``random_state`` = seed (unused by L-BFGS); multinomial for more than two classes, which is
    what scikit-learn's ``multi_class="auto"`` picked then and the only choice since 1.8."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C, dual=False, tol=SKLEARN_TOL, fit_intercept=True, solver="lbfgs", max_iter=max_iter, random_state=seed
    )


def fit_predict_sklearn(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_eval: torch.Tensor,
    C: float,
    max_iter: int = SKLEARN_MAX_ITER,
    seed: int = DEFAULT_SEED,
) -> torch.Tensor:
    """Fit :func:`make_sklearn_logreg` on (X_train, y_train) and predict X_eval."""
    from sklearn.exceptions import ConvergenceWarning

    clf = make_sklearn_logreg(C, max_iter=max_iter, seed=seed)
    with warnings.catch_warnings():
        # Extreme C values hit max_iter; that is part of the search, not something to report per trial.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train.cpu().numpy(), y_train.cpu().numpy())
    return torch.from_numpy(clf.predict(X_eval.cpu().numpy()).astype(np.int64))


def torch_lr_at_epoch(lr: float, epoch: int, epochs: int = TORCH_EPOCHS) -> float:
    """Learning rate of epoch ``epoch`` (0-based): the reference sets the cosine value of epoch ``e`` *after*
    training epoch ``e``, so epochs 0 and 1 both run at ``lr`` and epoch ``e >= 1`` at
    ``lr * 0.5 * (1 + cos(pi * (e - 1) / epochs))``; the last one is not 0."""
    if epoch == 0:
        return lr
    return lr * (0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs)))


def make_torch_generators(seed: int, device: str | torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(init, shuffle) generators laid out as the reference's global streams after ``torch.manual_seed(seed)``:
    ``nn.Linear`` is built on the CPU (CPU stream); the shuffles draw on the features' device, so on CPU they
    share the init's stream and on CUDA they use the CUDA one. Pass the same pair to every fit of one run."""
    device = torch.device(device)
    init_gen = torch.Generator().manual_seed(seed)
    if device.type == "cpu":
        return init_gen, init_gen
    return init_gen, torch.Generator(device=device).manual_seed(seed)


def init_linear(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear(dim, num_classes)`` with PyTorch's default init (weights kaiming-uniform with a = sqrt(5), i.e.
    U(-1/sqrt(dim), 1/sqrt(dim)), bias U(-1/sqrt(dim), 1/sqrt(dim))) drawn from ``generator``, which advances
    exactly as the global CPU generator would; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        model = nn.Linear(dim, num_classes)
        generator.set_state(torch.get_rng_state())
    return model


def train_torch_logreg(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    lr: float,
    wd: float,
    epochs: int = TORCH_EPOCHS,
    batch_size: int = TORCH_BATCH_SIZE,
    momentum: float = TORCH_MOMENTUM,
    seed: int = DEFAULT_SEED,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
) -> tuple[nn.Linear, bool]:
    """Train a linear classifier as t-ReX's ``LogregTorchTrainer``; returns (model, diverged).

    Order of the draws: one shuffle of the samples, then the ``nn.Linear`` init (:func:`init_linear`), then per
    epoch: minibatches of ``batch_size`` (the last one partial) in that order, mean cross-entropy, SGD (momentum
    0.9, no dampening or Nesterov, weight decay on weights and bias), and a new shuffle after the epoch; the lr of
    each epoch is :func:`torch_lr_at_epoch`. A non-finite loss stops the training before that step (``diverged``;
    the model is kept as it is, as there). ``generators`` (from :func:`make_torch_generators`) continue across
    calls; by default a fresh pair seeded with ``seed``. ``X_train`` stays on its device; only minibatches enter
    the graph, so ImageNet-size feature sets fit on one GPU.
    """
    device = X_train.device
    num_samples, dim = X_train.shape
    init_gen, perm_gen = generators if generators is not None else make_torch_generators(seed, device)
    batch_size = min(batch_size, num_samples)

    def shuffle() -> torch.Tensor:
        return torch.randperm(num_samples, generator=perm_gen, device=perm_gen.device).to(device)

    perm = shuffle()
    model = init_linear(dim, num_classes, init_gen).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = torch_lr_at_epoch(lr, epoch, epochs)
        for start in range(0, num_samples, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                logger.debug("loss %s at epoch %d (lr %.3g, wd %.3g): stopping", loss.item(), epoch, lr, wd)
                return model, True
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        perm = shuffle()
    return model, False


@torch.no_grad()
def predict_torch(model: nn.Module, X: torch.Tensor, batch_size: int = TORCH_BATCH_SIZE) -> torch.Tensor:
    """Arg-max predictions in chunks of ``batch_size``, returned on CPU."""
    preds = [model(X[start : start + batch_size]).argmax(dim=1).cpu() for start in range(0, len(X), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


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
    clf_type: str,
    seed: int,
    device: torch.device,
    torch_epochs: int,
    torch_batch_size: int,
    sklearn_max_iter: int,
) -> tuple[Callable[[optuna.Trial], dict[str, float]], Callable[..., tuple[torch.Tensor, bool]]]:
    """Return (suggest a trial's hyper-parameters, fit on train and predict eval -> (predictions, diverged)).

    The torch classifier's generators are made once here and shared by every trial and the refit, as the
    reference's global streams are.
    """
    if clf_type == "logreg_sklearn":

        def suggest(trial: optuna.Trial) -> dict[str, float]:
            return {"C": trial.suggest_float("C", *SKLEARN_C_RANGE, log=True)}

        def fit_predict(X_train, y_train, X_eval, params):
            pred = fit_predict_sklearn(X_train, y_train, X_eval, C=params["C"], max_iter=sklearn_max_iter, seed=seed)
            return pred, False

    else:
        generators = make_torch_generators(seed, device)

        def suggest(trial: optuna.Trial) -> dict[str, float]:
            return {
                "lr": trial.suggest_float("lr", *TORCH_LR_RANGE, log=True),
                "wd": trial.suggest_float("wd", *TORCH_WD_RANGE, log=True),
            }

        def fit_predict(X_train, y_train, X_eval, params):
            num_classes = int(y_train.max().item()) + 1  # the reference's output size
            model, diverged = train_torch_logreg(
                X_train.to(device), y_train.to(device), num_classes, lr=params["lr"], wd=params["wd"],
                epochs=torch_epochs, batch_size=torch_batch_size, generators=generators,
            )
            return predict_torch(model, X_eval.to(device), batch_size=torch_batch_size), diverged

    return suggest, fit_predict


def tpe_sampler_options(clf_type: str, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """The reference's ``TPESampler`` arguments: multivariate and grouped for the torch classifier's (lr, wd),
    independent for sklearn's C; constant_liar off and 10 random start-up trials (optuna 3.x defaults)."""
    joint = clf_type == "logreg_torch"
    return {
        "seed": seed,
        "n_startup_trials": TPE_N_STARTUP_TRIALS,
        "multivariate": joint,
        "group": joint,
        "constant_liar": TPE_CONSTANT_LIAR,
    }


def run_logreg(
    trainval: dict,
    test: dict,
    clf_type: str = "logreg_sklearn",
    features_norm: str | None = None,
    n_trials: int | None = None,
    seed: int = DEFAULT_SEED,
    device: str | torch.device = "cpu",
    holdout_fraction: float = HOLDOUT_FRACTION,
    torch_epochs: int = TORCH_EPOCHS,
    torch_batch_size: int = TORCH_BATCH_SIZE,
    sklearn_max_iter: int = SKLEARN_MAX_ITER,
    holdout_carry_over: bool = True,
) -> dict[str, Any]:
    """Search hyper-parameters on a stratified hold-out of ``trainval``, refit on all of it, score ``test``.

    ``features_norm=None`` picks the protocol default (``none`` for sklearn, ``l2`` for the torch classifier);
    ``n_trials=None`` picks 40. Each trial fits on the train part and scores hold-out top-1; the best trial's
    parameters (the first one on ties) are refitted on all of trainval (normalisation re-fitted too) and the
    test predictions scored. Returns ``top1`` and ``mean_per_class_acc`` (fractions), ``best_params``,
    ``holdout_top1`` (the best trial's hold-out top-1), every trial's ``params`` and ``value`` and the settings.
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

    train_idx, val_idx = stratified_holdout(
        Y_trainval, fraction=holdout_fraction, seed=seed, carry_over=holdout_carry_over
    )
    if len(val_idx) == 0:
        raise ValueError("the hold-out split is empty: every class has a single trainval sample")
    # The torch classifier's data moves to its device once, not once per trial.
    data_device = device if clf_type == "logreg_torch" else torch.device("cpu")
    X_trainval, Y_trainval = X_trainval.to(data_device), Y_trainval.to(data_device)
    train_idx_t = torch.from_numpy(train_idx).to(data_device)
    val_idx_t = torch.from_numpy(val_idx).to(data_device)
    X_fit, X_val = normalize_features(X_trainval[train_idx_t], X_trainval[val_idx_t], features_norm)
    Y_fit, Y_val_cpu = Y_trainval[train_idx_t], Y_trainval[val_idx_t].cpu()

    suggest, fit_predict = _make_fit_predict(
        clf_type, seed, device, torch_epochs, torch_batch_size, sklearn_max_iter
    )

    def objective(trial: optuna.Trial) -> float:
        pred, _ = fit_predict(X_fit, Y_fit, X_val, suggest(trial))
        return (pred == Y_val_cpu).double().mean().item()

    num_classes = len(torch.unique(Y_trainval))
    logger.info(
        "%s (features_norm=%s): %d trials on %d train / %d hold-out samples, %d classes",
        clf_type, features_norm, n_trials, len(train_idx), len(val_idx), num_classes,
    )
    start = time.perf_counter()
    sampler_options = tpe_sampler_options(clf_type, seed)
    study = _optimize(objective, n_trials=n_trials, sampler_options=sampler_options, desc=f"{clf_type} search")
    best_params = dict(study.best_params)
    logger.info("best hold-out top-1 %.4f with %s", study.best_value, best_params)

    # Refit on the whole trainval; "standard" statistics are re-fitted on it too.
    X_fit = X_val = None  # free the hold-out split before the refit (the objective's cells held it)
    X_all, X_eval = normalize_features(X_trainval, X_test.to(data_device), features_norm)
    pred_test, diverged = fit_predict(X_all, Y_trainval, X_eval, best_params)
    if diverged:
        logger.warning("the refit with %s diverged (non-finite loss); its test predictions are kept", best_params)
    metrics = classification_metrics(pred_test, Y_test)
    logger.info(
        "test top-1 %.4f, mean per-class acc %.4f (%.1f s)",
        metrics["top1"], metrics["mean_per_class_acc"], time.perf_counter() - start,
    )
    result = {
        "top1": metrics["top1"],
        "mean_per_class_acc": metrics["mean_per_class_acc"],
        "best_params": best_params,
        "holdout_top1": float(study.best_value),
        "trials": [{"params": dict(t.params), "value": t.value} for t in study.trials],
        "clf_type": clf_type,
        "features_norm": features_norm,
        "n_trials": n_trials,
        "num_train": int(len(X_trainval)),
        "num_test": int(len(X_test)),
        "num_holdout": int(len(val_idx)),
        "seed": seed,
        "tpe": sampler_options,
    }
    if clf_type == "logreg_torch":
        result["refit_diverged"] = diverged
    else:
        result["sklearn_max_iter"] = sklearn_max_iter
    return result


def _optimize(
    objective: Callable[[optuna.Trial], float], n_trials: int, sampler_options: dict[str, Any], desc: str
) -> optuna.Study:
    """Run a seeded TPE study (one trial at a time) with optuna's per-trial log lines replaced by a tqdm bar."""
    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            # multivariate / group are "experimental" arguments; the reference uses them.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(**sampler_options)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        with tqdm(total=n_trials, desc=desc, disable=not distributed.is_main_process(), leave=False) as bar:

            def update_bar(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                bar.update(1)
                bar.set_postfix(best=f"{study.best_value:.4f}")

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=n_trials, n_jobs=1, callbacks=[update_bar])
    finally:
        optuna.logging.set_verbosity(previous_verbosity)
    return study
