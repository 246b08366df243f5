"""Logistic-regression transfer classifier on pre-extracted features (t-ReX protocol).

    python eval_transfer/main_clf.py clf.features_dir=F [clf.clf_type=logreg_sklearn|logreg_torch]
        [clf.features_norm=none|l2|standard] [run.seed=22] [run.output_dir=R]

reads ``F/features_{trainval,test}.pth`` (from ``main_ft_extract.py``), picks the hyper-parameters with 40 Optuna
TPE trials on a per-class 20 % hold-out of trainval, refits on the whole trainval and writes ``R/results.json``
(``R`` = ``F`` by default): test ``top1`` and ``mean_per_class_acc`` (fractions), the chosen ``best_params``,
every trial and the settings, with the resolved ``R/clf_config.yaml``. The defaults are those of UNIC's
``eval_transfer/main_clf.py`` (seed 22, 40 trials, max_iter 2000, ...). The torch classifier trains on the GPU
when there is one. Same inputs and seed give the same numbers. UNIC ran it as
``python -m sklearnex eval_transfer/main_clf.py ...`` (Intel's scikit-learn patch, when installed).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from unic import distributed
from unic.cli import parse as parse_config, write_resolved_config
from unic.config import ConfigError
from unic.eval.transfer import FEATURE_SPLITS, features_path, load_features, run_logreg
from unic.eval.transfer_config import ClfConfig, with_values
from unic.io import write_json
from unic.train.logger import setup_logging

logger = logging.getLogger("main_clf")

EXAMPLE = "eval_transfer/main_clf.py clf.features_dir=F clf.clf_type=logreg_torch clf.n_trials=10"
CONFIG_NAME = "clf_config.yaml"
INFO_KEYS = ("dataset", "pretrained", "token_type", "image_size")  # copied from extract_info.json


def sklearn_backend() -> str:
    """Module of the LogisticRegression in use: ``sklearn...`` or, under ``python -m sklearnex``, Intel's."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression.__module__


def extraction_info(features_dir: str) -> dict:
    """Which data set / model the features came from (``extract_info.json``), for the summary table."""
    info_file = os.path.join(features_dir, "extract_info.json")
    if not os.path.isfile(info_file):
        return {}
    with open(info_file) as f:
        info = json.load(f)
    return {key: info[key] for key in INFO_KEYS if key in info}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_config(argv, ClfConfig, __doc__, EXAMPLE)
        device = distributed.resolve_device(cfg.run.device)
        clf, features_dir = cfg.clf, cfg.clf.features_dir
        splits = {split: load_features(features_path(features_dir, split)) for split in FEATURE_SPLITS}
        output_dir = cfg.run.output_dir or features_dir
        os.makedirs(output_dir, exist_ok=True)
        setup_logging(output_dir)
        for split, data in splits.items():
            logger.info("%-8s X %s, mean norm %.3f, %d classes", split, tuple(data["X"].shape),
                        data["X"].norm(dim=1).mean().item(), len(torch.unique(data["Y"])))
        start = time.perf_counter()
        result = run_logreg(
            splits["trainval"], splits["test"], clf_type=clf.clf_type, features_norm=clf.features_norm,
            n_trials=clf.n_trials, seed=cfg.run.seed, device=device, holdout_fraction=clf.holdout_fraction,
            torch_epochs=clf.torch_epochs, torch_batch_size=clf.torch_batch_size,
            sklearn_max_iter=clf.sklearn_max_iter, holdout_carry_over=not clf.holdout_fixed_fraction,
        )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update({
        "features_dir": os.path.abspath(features_dir),
        "holdout_fraction": clf.holdout_fraction,
        "holdout_rule": "fixed" if clf.holdout_fixed_fraction else "t-ReX",
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 2),
    })
    if clf.clf_type == "logreg_torch":
        result.update({"torch_epochs": clf.torch_epochs, "torch_batch_size": clf.torch_batch_size})
    else:
        result["sklearn_backend"] = sklearn_backend()
    result.update(extraction_info(features_dir))
    output = os.path.join(output_dir, "results.json")
    write_json(output, result)
    write_resolved_config(with_values(cfg, {"run.output_dir": output_dir}), output_dir, CONFIG_NAME)
    logger.info("test top-1 %.2f %%, mean per-class accuracy %.2f %% -> %s", 100 * result["top1"],
                100 * result["mean_per_class_acc"], output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
