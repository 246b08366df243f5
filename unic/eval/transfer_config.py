"""Configuration schemas of the transfer evaluation's two entry points (``eval_transfer/main_ft_extract.py``,
``eval_transfer/main_clf.py``), made of the shared groups of :mod:`unic.config` (``run``, ``model``, ``data``)
and one group of their own (``features``, ``clf``). The defaults are UNIC's (``eval_transfer/`` in naver/unic):
fp32 extraction, the t-ReX centre crop, seed 22 and 40 Optuna trials for the classifier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from unic.config import ConfigError, LoaderConfig, ModelConfig, RunConfig, check_choices, check_range
from unic.data.registry import dataset_names, get_dataset
from unic.eval.transfer import (
    CLF_TYPES,
    DEFAULT_SEED,
    FEATURES_NORMS,
    HOLDOUT_FRACTION,
    SKLEARN_MAX_ITER,
    TOKEN_TYPES,
    TORCH_BATCH_SIZE,
    TORCH_EPOCHS,
)

SPLIT_NOS = range(1, 11)  # the DTD / SUN397 partitions
_SOURCE_FORMS = "a UNIC checkpoint.pth / student.pth / universal.pth, timm:<model>[.<tag>] or open_clip:<model>:<tag>"

# ------------------------------------------------------------------------------------------------------------
# main_ft_extract.py


@dataclass(kw_only=True)
class ExtractRunConfig(RunConfig):
    # None: <source folder>/transfer/features_<dataset>_<size>_<token_type>, or output/transfer/<model>/... for
    # a timm:/open_clip: baseline
    output_dir: Optional[str] = None  # the features folder (None: named after the model, data set, size, token)
    seed: int = 0  # not used: extraction draws nothing (EuroSAT's split has its own fixed seed)
    precision: str = "fp32"  # autocast dtype of the encoder: fp32 (UNIC's extraction) | auto | bf16 | fp16


@dataclass(kw_only=True)
class ExtractModelConfig(ModelConfig):
    embedding: str = "backbone"  # descriptor of a UNIC file: backbone (cls token) | universal | domain:<name> | auto


@dataclass(kw_only=True)
class TransferDataConfig(LoaderConfig):
    """The transfer data set, read in its official layout (the layouts are listed above)."""

    dataset: str = ""  # imagefolder (any ImageFolder layout) or a t-ReX data set of the registry (required)
    root: Optional[str] = None  # the data set's folder, in its official layout (required)
    img_size: Optional[int] = None  # input resolution (None: the encoder's)
    crop_ratio: float = 1.0  # short side to img_size / crop_ratio, centre crop: 1.0 t-ReX, 0.875 ImageNet's
    split_no: int = 1  # DTD / SUN397 partition (1-10)
    cog_levels_mapping_file: Optional[str] = None  # ImageNet-CoG cog_levels_mapping_file.pkl (None: in data.root)
    cog_concepts_split_file: Optional[str] = None  # ImageNet-CoG cog_concepts_split_file.pkl (None: in data.root)
    allow_partial: bool = False  # accept counts other than the official release's, drop missing listed images


@dataclass(kw_only=True)
class FeaturesConfig:
    """What one image's feature is."""

    token_type: str = "cls"  # cls token | patch (mean of the last block's patch tokens) | both (concatenated)


@dataclass(kw_only=True)
class ExtractConfig:
    run: ExtractRunConfig = field(default_factory=ExtractRunConfig)
    model: ExtractModelConfig = field(default_factory=ExtractModelConfig)
    data: TransferDataConfig = field(default_factory=TransferDataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        if not cfg.model.source:
            raise ConfigError(f"model.source is required: {_SOURCE_FORMS}")
        if not cfg.data.dataset:
            raise ConfigError(f"data.dataset is required: one of {', '.join(dataset_names(kind='transfer'))}")
        try:
            get_dataset(cfg.data.dataset, kinds=("transfer",), what="transfer data set")
        except ValueError as err:
            raise ConfigError(f"invalid value for 'data.dataset': {err}") from None
        if not cfg.data.root:
            raise ConfigError(f"data.root is required: the folder of {cfg.data.dataset}, in its official layout")
        check_choices(cfg, {"features.token_type": TOKEN_TYPES, "data.split_no": SPLIT_NOS})
        check_range(cfg, positive=["data.img_size", "data.crop_ratio"], unit=["data.crop_ratio"])


def source_file_exists(cfg: DictConfig) -> None:
    """A ``model.source`` that is a file must exist (checked before any data is read or output created)."""
    from unic.eval.encoders import is_named_model

    source = cfg.model.source
    if not is_named_model(source) and not os.path.isfile(os.path.expanduser(source)):
        raise FileNotFoundError(f"model.source: checkpoint file not found: {source} ({_SOURCE_FORMS})")


def default_features_dir(cfg: DictConfig, img_size: int) -> str:
    """``run.output_dir`` when unset: next to a UNIC file, else under ``output/transfer/<model>``."""
    name = f"features_{cfg.data.dataset}_{img_size}_{cfg.features.token_type}"
    source = cfg.model.source
    if os.path.isfile(os.path.expanduser(source)):
        return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(source))), "transfer", name)
    return os.path.join("output", "transfer", source.replace(":", "_").replace("/", "_"), name)


def layouts_help() -> str:
    """The expected layout of every transfer data set (``--help``), the five CoG levels on one line."""
    lines = ["expected layouts (D = data.root):"]
    for name in dataset_names(kind="transfer"):
        if name.startswith("cog_l") and name != "cog_l1":
            continue
        shown = "cog_l1..l5" if name == "cog_l1" else name
        lines.append(f"  {shown:12s} {get_dataset(name).layout}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# main_clf.py


@dataclass(kw_only=True)
class ClfRunConfig(RunConfig):
    output_dir: Optional[str] = None  # where results.json and clf_config.yaml go (None: clf.features_dir)
    seed: int = DEFAULT_SEED  # seed of the hold-out split, the search and the classifier (t-ReX/UNIC: 22)
    device: str = "auto"  # device of the torch classifier: auto (CUDA when available) | cpu | cuda
    precision: str = "fp32"  # the classifiers run in fp32 (auto means the same here)


@dataclass(kw_only=True)
class ClassifierConfig:
    """The logistic-regression classifier and its hyper-parameter search (t-ReX protocol)."""

    features_dir: Optional[str] = None  # folder with features_{trainval,test}.pth (main_ft_extract's; required)
    clf_type: str = "logreg_sklearn"  # logreg_sklearn (L-BFGS, small sets) | logreg_torch (SGD, GPU, ImageNet-size)
    features_norm: Optional[str] = None  # none | l2 | standard (None: none for logreg_sklearn, l2 for logreg_torch)
    n_trials: Optional[int] = None  # Optuna TPE trials (None: 40)
    holdout_fraction: float = HOLDOUT_FRACTION  # per-class fraction of trainval held out for the search
    # t-ReX's rule (false): after a class too small for the fraction holds out 1 of its n samples, the later
    # classes use 1/n
    holdout_fixed_fraction: bool = False  # keep holdout_fraction for every class (false: t-ReX's rule)
    torch_epochs: int = TORCH_EPOCHS  # SGD epochs of logreg_torch
    torch_batch_size: int = TORCH_BATCH_SIZE  # SGD batch of logreg_torch
    sklearn_max_iter: int = SKLEARN_MAX_ITER  # L-BFGS iterations of logreg_sklearn


@dataclass(kw_only=True)
class ClfConfig:
    run: ClfRunConfig = field(default_factory=ClfRunConfig)
    clf: ClassifierConfig = field(default_factory=ClassifierConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        if not cfg.clf.features_dir:
            raise ConfigError("clf.features_dir is required: the folder main_ft_extract.py wrote the features to")
        check_choices(cfg, {"clf.clf_type": CLF_TYPES, "run.precision": ("auto", "fp32")})
        if cfg.clf.features_norm is not None:
            check_choices(cfg, {"clf.features_norm": FEATURES_NORMS})
        if not 0.0 < cfg.clf.holdout_fraction < 1.0:
            raise ConfigError(f"invalid value for 'clf.holdout_fraction': must be in (0, 1), got "
                              f"{cfg.clf.holdout_fraction}")
        check_range(cfg, positive=["clf.n_trials", "clf.torch_epochs", "clf.torch_batch_size", "clf.sklearn_max_iter"])


def with_values(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with the settings resolved at run time (``{"run.output_dir": ...}``), to be written
    as the resolved config."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in values.items():
        OmegaConf.update(resolved, key, value)
    return resolved
