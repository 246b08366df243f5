"""Logistic-regression transfer classifier on pre-extracted features (t-ReX protocol).

    python eval_transfer/main_clf.py --features_dir F [--clf_type logreg_sklearn|logreg_torch]
        [--features_norm none|l2|standard] [--seed 22]

reads ``F/features_{trainval,test}.pth`` (from ``main_ft_extract.py``), picks the hyper-parameters with 40 Optuna
TPE trials on a per-class 20 % hold-out of trainval, refits on the whole trainval and writes ``F/results.json``:
test ``top1`` and ``mean_per_class_acc`` (fractions), the chosen ``best_params``, every trial and the settings.
The defaults are those of UNIC's ``eval_transfer/main_clf.py`` (seed 22, 40 trials, max_iter 2000, ...). The
torch classifier trains on the GPU when there is one. Same inputs and seed give the same numbers. UNIC ran it
as ``python -m sklearnex eval_transfer/main_clf.py ...`` (Intel's scikit-learn patch, when installed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from unic.eval.transfer import (
    CLF_TYPES,
    DEFAULT_FEATURES_NORM,
    DEFAULT_NUM_TRIALS,
    DEFAULT_SEED,
    FEATURE_SPLITS,
    FEATURES_NORMS,
    HOLDOUT_FRACTION,
    SKLEARN_MAX_ITER,
    TORCH_BATCH_SIZE,
    TORCH_EPOCHS,
    features_path,
    load_features,
    run_logreg,
)
from unic.train.logger import setup_logging

logger = logging.getLogger("main_clf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features_dir", required=True, help="folder with features_trainval.pth and features_test.pth")
    parser.add_argument("--clf_type", default="logreg_sklearn", choices=CLF_TYPES,
                        help="L-BFGS (scikit-learn, small data sets) or SGD (torch, GPU, ImageNet-size data sets)")
    parser.add_argument("--features_norm", default=None, choices=FEATURES_NORMS,
                        help=f"feature normalisation (default: {DEFAULT_FEATURES_NORM['logreg_sklearn']} for "
                             f"logreg_sklearn, {DEFAULT_FEATURES_NORM['logreg_torch']} for logreg_torch)")
    parser.add_argument("--n_trials", type=int, default=None,
                        help=f"Optuna trials (default: {DEFAULT_NUM_TRIALS['logreg_sklearn']} for logreg_sklearn, "
                             f"{DEFAULT_NUM_TRIALS['logreg_torch']} for logreg_torch)")
    parser.add_argument("--holdout_fraction", type=float, default=HOLDOUT_FRACTION,
                        help="per-class fraction of trainval held out for the hyper-parameter search (truncated, "
                             "at least 1 per class)")
    parser.add_argument("--holdout_fixed_fraction", action="store_true",
                        help="keep --holdout_fraction for every class (default, t-ReX's rule: after a class too "
                             "small for it holds out 1 of its n samples, the later classes use 1/n)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of the hold-out split, the search and the classifier (t-ReX/UNIC: 22)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="device of the torch classifier (auto: CUDA when available)")
    parser.add_argument("--torch_epochs", type=int, default=TORCH_EPOCHS, help="SGD epochs of logreg_torch")
    parser.add_argument("--torch_batch_size", type=int, default=TORCH_BATCH_SIZE, help="SGD batch of logreg_torch")
    parser.add_argument("--sklearn_max_iter", type=int, default=SKLEARN_MAX_ITER,
                        help="L-BFGS iterations of logreg_sklearn")
    parser.add_argument("--output", default=None, help="results file (default: <features_dir>/results.json)")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sklearn_backend() -> str:
    """Module of the LogisticRegression in use: ``sklearn...`` or, under ``python -m sklearnex``, Intel's."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression.__module__


def write_json(path: str, data: dict) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0.0 < args.holdout_fraction < 1.0:
            raise ValueError(f"--holdout_fraction must be in (0, 1), got {args.holdout_fraction}")
        if args.torch_epochs < 1 or args.torch_batch_size < 1 or args.sklearn_max_iter < 1:
            raise ValueError("--torch_epochs, --torch_batch_size and --sklearn_max_iter must be positive")
        device = resolve_device(args.device)
        splits = {split: load_features(features_path(args.features_dir, split)) for split in FEATURE_SPLITS}
        output = args.output or os.path.join(args.features_dir, "results.json")
        setup_logging(args.features_dir)
        for split, data in splits.items():
            logger.info("%-8s X %s, mean norm %.3f, %d classes", split, tuple(data["X"].shape),
                        data["X"].norm(dim=1).mean().item(), len(torch.unique(data["Y"])))
        start = time.perf_counter()
        result = run_logreg(
            splits["trainval"], splits["test"], clf_type=args.clf_type, features_norm=args.features_norm,
            n_trials=args.n_trials, seed=args.seed, device=device, holdout_fraction=args.holdout_fraction,
            torch_epochs=args.torch_epochs, torch_batch_size=args.torch_batch_size,
            sklearn_max_iter=args.sklearn_max_iter, holdout_carry_over=not args.holdout_fixed_fraction,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update({
        "features_dir": os.path.abspath(args.features_dir),
        "holdout_fraction": args.holdout_fraction,
        "holdout_rule": "fixed" if args.holdout_fixed_fraction else "t-ReX",
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 2),
    })
    if args.clf_type == "logreg_torch":
        result.update({"torch_epochs": args.torch_epochs, "torch_batch_size": args.torch_batch_size})
    else:
        result["sklearn_backend"] = sklearn_backend()
    info_file = os.path.join(args.features_dir, "extract_info.json")
    if os.path.isfile(info_file):  # which data set / model these features came from, for the summary table
        with open(info_file) as f:
            info = json.load(f)
        result.update({key: info[key] for key in ("dataset", "pretrained", "token_type", "image_size") if key in info})
    write_json(output, result)
    logger.info("test top-1 %.2f %%, mean per-class accuracy %.2f %% -> %s", 100 * result["top1"],
                100 * result["mean_per_class_acc"], output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
