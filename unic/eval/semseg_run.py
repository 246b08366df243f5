"""The ADE20K linear probe as one run: its configuration schema, the two reference schedules, and
build -> train (or load a head) -> evaluate -> write results.

:class:`SemsegConfig` is the shared ``run`` / ``model`` / ``data`` groups of :mod:`unic.config` plus the probe's
own ``semseg`` group. The ``semseg`` settings a schedule sets (and ``data.global_batch``) default to null: left
unset they take the schedule's value (:data:`SCHEDULES`); the ones given are the run's ``schedule_overrides``.
:func:`resolve` turns a config into a :class:`Probe` (every value known), :func:`run` carries it out and writes
``results.json``, ``head.pth``, ``config.yaml``, ``log.txt``, ``metrics.jsonl``, TensorBoard logs and, with
``semseg.visualize=N``, ``visualizations/*.png``.

Re-scoring a saved head (``semseg.load_head``) writes by default next to the head, under names of its own that
never replace the training's files: ``results_eval.json``, ``eval_config.yaml``, ``visualizations_eval/*.png``;
it appends to ``log.txt`` and writes its metrics to ``metrics.jsonl`` / TensorBoard as split ``eval`` (see
:data:`OUTPUT_NAMES`).

Each training crop's augmentation is drawn from a generator seeded with (seed, epoch, image index)
(:class:`unic.eval.semseg.AugmentationSampler`), so the head does not depend on ``data.num_workers`` or on the
machine's CPU count (which caps it; results.json records the count used).

Units: every metric the run writes (results.json, metrics.jsonl) is a fraction in [0, 1], and results.json says
so (``"unit": "fraction"``); the log prints the same numbers as percentages, with a ``%`` sign
(``mIoU 39.60 %``). ``eval_dense/eval_semseg.py`` is the command line around this module.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from unic import distributed
from unic.cli import write_resolved_config
from unic.config import ConfigError, LoaderConfig, ModelConfig, RunConfig, check_choices, check_range
from unic.data.registry import dataset_names, get_dataset
from unic.eval.semseg import (
    ADE20K_CLASSES,
    DINOV2_ADE20K_SCALE,
    ADE20KDataset,
    FrozenPatchBackbone,
    LinearSegHead,
    SegEvalTransform,
    SegTrainTransform,
    broadcast_buffers,
    evaluate_segmentation,
    infinite_batches,
    max_label,
    palette,
    save_visualization,
    segment,
    slide_inference,
    train_linear_head,
)
from unic.io import CheckpointFormatError, save_checkpoint, write_json

logger = logging.getLogger(__name__)

LAYERS = {"last": 1, "last4": 4}
HEAD_FORMAT = "unic-semseg-linear-head"
# the files (and the metrics split) of a training run and of a re-scoring run (semseg.load_head): the latter
# may share the training's folder without replacing its config, results or visualizations
OUTPUT_NAMES = {
    "train": {"config": "config.yaml", "results": "results.json", "visualizations": "visualizations",
              "split": "val"},
    "eval": {"config": "eval_config.yaml", "results": "results_eval.json", "visualizations": "visualizations_eval",
             "split": "eval"},
}

# Settings shared by both references: DINOv2's published ADE20K linear configs (dinov2_vit{b,l}14_ade20k_linear_
# config.py, which UNIC's eval_dense/eval_semseg.py downloads and edits): AdamW lr 1e-3, wd 1e-4, poly (power 1,
# min_lr 0) with 1500 linear warm-up iterations (ratio 1e-6), Resize(img_scale=(99999999, 512),
# ratio_range=(0.5, 2.0)), 512x512 crops, slide test (512, stride 341), backbone out_indices = last 4 blocks with
# the head reading only the last (in_index=[3]), evaluation every 10000 iterations.
_REFERENCE = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_iters": 1500, "crop_size": 512, "stride": 341,
              "scale": DINOV2_ADE20K_SCALE, "layers": "last", "eval_every": 10_000}
SCHEDULES: dict[str, dict] = {
    # UNIC: samples_per_gpu=8 and max_iters = iter_with_8_gpu (10000) x 8 / len(gpu_ids) (1): 80k x 8 on 1 GPU;
    # lr left at the config's 1e-3, warm-up at 1500, evaluation every min(10000, max_iters).
    "unic": {"iterations": 80_000, "batch_size": 8, **_REFERENCE},
    # DINOv2: samples_per_gpu=2 on gpu_ids=range(0, 8), IterBasedRunner max_iters=40000.
    "dinov2": {"iterations": 40_000, "batch_size": 16, **_REFERENCE},
}
DEFAULT_SCHEDULE = "unic"
# where each schedule value is set: the global batch is a data setting, the rest the probe's
SCHEDULE_KEYS = {key: "data.global_batch" if key == "batch_size" else f"semseg.{key}" for key in SCHEDULES["unic"]}


# ------------------------------------------------------------------------------------------------------------
# configuration


@dataclass(kw_only=True)
class SemsegModelConfig(ModelConfig):
    """The frozen encoder (unic.eval.encoders.load_encoder); the probe reads its backbone's patch tokens."""

    source: Optional[str] = None  # UNIC checkpoint.pth / student.pth, or timm:<model>[.<tag>] (a ViT); required
    weights: Optional[str] = None  # local weights file of a timm: model (else the hub)
    embedding: str = "backbone"  # the probe reads the backbone's patch tokens: backbone only


@dataclass(kw_only=True)
class SemsegDataConfig(LoaderConfig):
    """The segmentation set (a registry name) and how it is loaded."""

    dataset: str = "ade20k"  # a segmentation entry of the dataset registry (unic.data.registry)
    root: Optional[str] = None  # the dataset's folder (ADEChallengeData2016); required
    num_classes: Optional[int] = None  # classes after reduce_zero_label (null: the dataset's, ADE20K 150)
    global_batch: Optional[int] = None  # images per step over all processes, split evenly (null: the schedule's)
    batch_size_per_gpu: Optional[int] = None  # instead of data.global_batch: images per process and step
    num_workers: int = 8  # data-loading workers per process (at most the CPU count; the head does not depend on it)


@dataclass(kw_only=True)
class ProbeConfig:
    """The linear probe; settings left null take the schedule's value (listed above)."""

    schedule: str = DEFAULT_SCHEDULE  # unic (80k x 8, UNIC's own) | dinov2 (40k x 16, DINOv2's)
    layers: Optional[str] = None  # last (the last block's patch tokens) | last4 (the last 4 concatenated)
    iterations: Optional[int] = None  # training iterations
    lr: Optional[float] = None  # AdamW peak learning rate
    weight_decay: Optional[float] = None  # AdamW weight decay
    warmup_iters: Optional[int] = None  # linear warm-up iterations of the poly schedule
    crop_size: Optional[int] = None  # training crop and sliding-window size
    stride: Optional[int] = None  # sliding-window stride
    scale: Optional[list[int]] = None  # mmseg img_scale [LONG,SHORT]: training x 0.5-2.0, evaluation resizes to it
    windows_per_batch: int = 4  # sliding windows per forward pass
    eval_every: Optional[int] = None  # also evaluate every N iterations (0: at the end only)
    visualize: int = 0  # write image | ground truth | prediction PNGs of the first N validation images
    # evaluate this saved head.pth instead of training one (writes results_eval.json, eval_config.yaml)
    load_head: Optional[str] = None
    log_every: int = 50  # log the loss every N iterations


@dataclass(kw_only=True)
class SemsegConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: SemsegModelConfig = field(default_factory=SemsegModelConfig)
    data: SemsegDataConfig = field(default_factory=SemsegDataConfig)
    semseg: ProbeConfig = field(default_factory=ProbeConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Setting errors, raised before anything is read or written."""
        check_choices(cfg, {"semseg.schedule": tuple(SCHEDULES), "model.embedding": ("backbone",),
                            "data.dataset": dataset_names(protocol="segmentation")})
        if cfg.semseg.layers is not None:
            check_choices(cfg, {"semseg.layers": tuple(LAYERS)})
        check_range(cfg, positive=["data.num_classes", "data.global_batch", "data.batch_size_per_gpu",
                                   "semseg.crop_size", "semseg.stride", "semseg.windows_per_batch",
                                   "semseg.log_every", "semseg.lr"],
                    non_negative=["semseg.warmup_iters", "semseg.eval_every", "semseg.visualize",
                                  "semseg.weight_decay"])
        ignore_index = get_dataset(cfg.data.dataset).defaults["ignore_index"]
        if cfg.data.num_classes is not None and cfg.data.num_classes > ignore_index:
            raise ConfigError(f"invalid value for 'data.num_classes': must be in [1, {ignore_index}] (label "
                              f"{ignore_index} is the ignore label), got {cfg.data.num_classes}")
        if cfg.semseg.iterations is not None and cfg.semseg.iterations < 1 and cfg.semseg.load_head is None:
            raise ConfigError(f"invalid value for 'semseg.iterations': must be > 0, got {cfg.semseg.iterations}")
        if cfg.semseg.scale is not None and (len(cfg.semseg.scale) != 2 or min(cfg.semseg.scale) <= 0):
            raise ConfigError(f"invalid value for 'semseg.scale': expected two numbers > 0 [LONG,SHORT], "
                              f"got {list(cfg.semseg.scale)}")
        if cfg.data.global_batch is not None and cfg.data.batch_size_per_gpu is not None:
            raise ConfigError("set data.global_batch or data.batch_size_per_gpu, not both")
        _check_inputs(cfg)


def _check_inputs(cfg: DictConfig) -> None:
    """The required inputs are given and of a usable kind (whether the files exist is :func:`check_files`'s:
    a saved config.yaml loads on any machine)."""
    for key, what in (("model.source", "a UNIC checkpoint.pth / student.pth or timm:<model>"),
                      ("data.root", get_dataset(cfg.data.dataset).layout)):
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"'{key}' is required: {what}")
    if cfg.model.source.startswith("open_clip:"):
        raise ConfigError("model.source: open_clip models expose no patch tokens; use a UNIC file or a timm: ViT")


def check_files(cfg: DictConfig) -> None:
    """The input files the config names exist (run() checks this before any work)."""
    from unic.eval.encoders import is_named_model

    source = cfg.model.source
    if not is_named_model(source) and not os.path.isfile(source):
        raise ConfigError(f"model.source: checkpoint file not found: {source}")
    if cfg.semseg.load_head is not None and not os.path.isfile(cfg.semseg.load_head):
        raise ConfigError(f"semseg.load_head: file not found: {cfg.semseg.load_head}")


def schedules_text() -> str:
    """The schedules' values, one paragraph each (for ``--help``)."""
    lines = ["schedules (the values of the settings left null):"]
    for name, preset in SCHEDULES.items():
        values = " ".join(f"{SCHEDULE_KEYS[key]}={_show(value)}" for key, value in preset.items())
        lines.append(textwrap.fill(values, 112, initial_indent=f"  {name + ':':<8}", subsequent_indent=" " * 10))
    return "\n".join(lines)


def _show(value) -> str:
    return f"[{','.join(map(str, value))}]" if isinstance(value, (tuple, list)) else str(value)


# ------------------------------------------------------------------------------------------------------------
# resolved settings


@dataclass(frozen=True)
class Probe:
    """The settings of one probe run, every schedule value resolved (``overridden``: those given)."""

    schedule: str
    overridden: tuple[str, ...]  # schedule keys (batch_size, lr, ...) that the config set
    layers: str
    iterations: int
    batch_size: int  # global
    lr: float
    weight_decay: float
    warmup_iters: int
    crop_size: int
    stride: int
    scale: tuple[int, int]
    eval_every: int
    dataset: str
    root: str
    num_classes: int
    num_workers: int  # per process, after distributed.worker_count
    windows_per_batch: int
    visualize: int
    load_head: str | None
    log_every: int
    source: str
    weights: str | None
    seed: int
    precision: str


def _global_batch(cfg: DictConfig, world_size: int) -> int | None:
    """The global batch the config sets (None: the schedule's); it must split evenly over the processes."""
    if cfg.data.batch_size_per_gpu is not None:
        return cfg.data.batch_size_per_gpu * world_size
    batch = cfg.data.global_batch or SCHEDULES[cfg.semseg.schedule]["batch_size"]
    if batch % world_size:
        raise ConfigError(f"data.global_batch={batch} is not divisible by the {world_size} processes; change the "
                          "number of processes or data.global_batch")
    return cfg.data.global_batch


def resolve(cfg: DictConfig, world_size: int = 1) -> Probe:
    """The probe ``cfg`` describes on ``world_size`` processes: null schedule settings take the schedule's."""
    preset = SCHEDULES[cfg.semseg.schedule]
    given = {key: OmegaConf.select(cfg, SCHEDULE_KEYS[key]) for key in preset}
    given["batch_size"] = _global_batch(cfg, world_size)
    values = {key: preset[key] if value is None else value for key, value in given.items()}
    spec = get_dataset(cfg.data.dataset)
    return Probe(
        schedule=cfg.semseg.schedule, overridden=tuple(sorted(k for k, v in given.items() if v is not None)),
        **{**values, "scale": tuple(int(v) for v in values["scale"])},
        dataset=spec.name, root=cfg.data.root, num_classes=cfg.data.num_classes or spec.defaults["num_classes"],
        num_workers=distributed.worker_count(cfg.data.num_workers), windows_per_batch=cfg.semseg.windows_per_batch,
        visualize=cfg.semseg.visualize, load_head=cfg.semseg.load_head, log_every=cfg.semseg.log_every,
        source=cfg.model.source, weights=cfg.model.weights, seed=cfg.run.seed, precision=cfg.run.precision,
    )


def schedule_record(probe: Probe) -> dict:
    """The schedule and the resolved training settings, as written to results.json and head.pth."""
    return {
        "schedule": probe.schedule, "schedule_overrides": list(probe.overridden),
        "batch_size": probe.batch_size, "lr": probe.lr, "weight_decay": probe.weight_decay,
        "warmup_iters": probe.warmup_iters, "crop_size": probe.crop_size, "scale": list(probe.scale),
        "eval_every": probe.eval_every, "layers": probe.layers, "seed": probe.seed,
        "world_size": distributed.get_world_size(),
        "num_workers": probe.num_workers,  # per process, as capped by the CPU count (the head does not depend on it)
    }


def default_output_dir(probe: Probe) -> str:
    """``<checkpoint dir>/semseg_<dataset>_<schedule>_<layers>``, or ``output/semseg/<model>_...`` for a hub model;
    with ``semseg.load_head``, the head's folder (whose training files the re-scoring names do not replace)."""
    if probe.load_head is not None:
        return os.path.dirname(os.path.abspath(probe.load_head))
    tag = f"{probe.schedule}_{probe.layers}"
    if os.path.isfile(probe.source):
        return os.path.join(os.path.dirname(os.path.abspath(probe.source)), f"semseg_{probe.dataset}_{tag}")
    return os.path.join("output", "semseg", f"{probe.source.replace(':', '_').replace('/', '_')}_{tag}")


# ------------------------------------------------------------------------------------------------------------
# data, labels, results


def build_datasets(probe: Probe, mean: tuple, std: tuple) -> dict[str, ADE20KDataset]:
    """The evaluation split (and the training split unless a head is loaded), normalised with ``mean``/``std``
    (the encoder's, in 0..1 units)."""
    train_split, eval_split = get_dataset(probe.dataset).splits
    mean_255, std_255 = [255.0 * m for m in mean], [255.0 * s for s in std]
    scale = (max(probe.scale), min(probe.scale))
    datasets = {eval_split: ADE20KDataset(probe.root, eval_split, SegEvalTransform(scale, mean_255, std_255))}
    if probe.load_head is None:
        datasets[train_split] = ADE20KDataset(
            probe.root, train_split, SegTrainTransform(probe.crop_size, scale, mean=mean_255, std=std_255)
        )
    return datasets


def check_labels(datasets: dict[str, ADE20KDataset], num_classes: int, num_workers: int, device) -> None:
    """Every annotation must hold labels below ``num_classes`` (or the ignore label): a clear error now, not a
    CUDA assert or a silently wrong mIoU later."""
    for split, dataset in datasets.items():
        largest = max_label(dataset, num_workers=num_workers, device=device)
        if largest >= num_classes:
            raise ValueError(
                f"class-count mismatch: {dataset.root}/annotations/{split} holds label {largest + 1} (label "
                f"{largest} after reduce_zero_label), but data.num_classes is {num_classes}"
            )
        if largest < 0:
            raise ValueError(f"{dataset.root}/annotations/{split}: every pixel is unlabelled (0)")


def class_names(num_classes: int) -> list[str]:
    return list(ADE20K_CLASSES) if num_classes == len(ADE20K_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def summarize(metrics: dict, num_classes: int) -> dict:
    """results.json content: headline metrics and per-class IoU / accuracy keyed by class name, fractions in
    [0, 1] (null where undefined: a class absent from both ground truth and predictions)."""
    names = class_names(num_classes)
    return {
        "mIoU": _finite_or_none(metrics["mIoU"]),
        "aAcc": _finite_or_none(metrics["aAcc"]),
        "mAcc": _finite_or_none(metrics["mAcc"]),
        "unit": "fraction",
        "per_class": {
            name: {"IoU": _finite_or_none(iou), "Acc": _finite_or_none(acc)}
            for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"])
        },
    }


def percent(value: float | None) -> str:
    """A fraction as the log prints it: ``0.396`` -> ``39.60 %`` (``n/a`` when undefined)."""
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _scalars(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("per_class", "unit")}


# ------------------------------------------------------------------------------------------------------------
# head files


def save_head(path: str, head: nn.Module, backbone: FrozenPatchBackbone, probe: Probe, iteration: int) -> None:
    module = head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
    save_checkpoint({
        "format": HEAD_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "in_dim": backbone.out_dim,
        "num_classes": module.num_classes,
        "num_last_blocks": backbone.num_last_blocks,
        "iteration": iteration,
        "pretrained": probe.source,
        "training": schedule_record(probe),
    }, path)


def read_head_file(path: str) -> dict:
    """A head file's content: ours (``save_head``), or UNIC's released ADE20K linear head (an mmseg checkpoint
    of DINOv2's BNHead, ``unic_head_ade20k.pth``) converted to ours (:func:`unic.models.published.convert_mmseg_head`)."""
    from unic.models.published import convert_mmseg_head, is_mmseg_bn_head, read_published_file

    ckpt = read_published_file(path)  # weights-only; also takes the plain metadata mmcv pickles
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path} is not a linear-head file (top level is {type(ckpt).__name__})")
    if ckpt.get("format") != HEAD_FORMAT and is_mmseg_bn_head(ckpt):
        ckpt = convert_mmseg_head(ckpt, path)
    if ckpt.get("format") != HEAD_FORMAT:
        raise CheckpointFormatError(f"{path} is not a linear-head file written by eval_semseg.py (nor an mmseg "
                                    "BNHead checkpoint such as UNIC's unic_head_ade20k.pth)")
    return ckpt


def load_head(path: str, head: nn.Module, backbone: FrozenPatchBackbone) -> tuple[int, dict | None]:
    """Load a saved head (ours, or UNIC's released mmseg head: :func:`read_head_file`) into ``head``; returns
    the iteration it was saved at and its training record (the schedule and resolved settings, None for heads
    saved before they were recorded and for released heads)."""
    ckpt = read_head_file(path)
    if (ckpt["in_dim"], ckpt["num_classes"]) != (backbone.out_dim, head.num_classes):
        raise CheckpointFormatError(
            f"{path} maps {ckpt['in_dim']} features to {ckpt['num_classes']} classes, but this backbone and "
            f"semseg.layers give {backbone.out_dim} features and data.num_classes is {head.num_classes}"
        )
    head.load_state_dict(ckpt["state_dict"])
    return int(ckpt.get("iteration", 0)), ckpt.get("training")


# ------------------------------------------------------------------------------------------------------------
# the run


def run(cfg: DictConfig) -> dict:
    """Check the input files, load the frozen encoder and the data, check the labels, then train (or load) the
    head, evaluate it and write the outputs (named by :data:`OUTPUT_NAMES`) to ``run.output_dir`` (default:
    :func:`default_output_dir`). Returns the results (rank 0: as written to results.json / results_eval.json)."""
    from unic.eval.encoders import load_encoder
    from unic.train.logger import MetricsWriter, setup_logging

    check_files(cfg)
    device = distributed.init_distributed(cfg.run.device)
    setup_logging()
    probe = resolve(cfg, distributed.get_world_size())  # after init: the batch must split over the processes
    encoder = load_encoder(probe.source, "backbone", probe.weights, device)
    backbone = FrozenPatchBackbone(encoder, LAYERS[probe.layers],
                                   autocast_dtype=distributed.autocast_dtype(probe.precision, device))
    datasets = build_datasets(probe, encoder.mean, encoder.std)
    check_labels(datasets, probe.num_classes, probe.num_workers, device)

    output_dir = cfg.run.output_dir or default_output_dir(probe)
    if distributed.is_main_process():
        resolved = OmegaConf.merge(cfg, {"run": {"output_dir": output_dir}})
        write_resolved_config(resolved, output_dir, output_names(probe)["config"])
    distributed.barrier()
    setup_logging(output_dir)
    writer = MetricsWriter(output_dir)
    try:
        return _train_and_evaluate(probe, backbone, datasets, device, output_dir, writer)
    finally:
        writer.close()


def output_names(probe: Probe) -> dict[str, str]:
    """The file names (and metrics split) of this run: a re-scoring run's never replace a training run's."""
    return OUTPUT_NAMES["train" if probe.load_head is None else "eval"]


def _train_and_evaluate(probe: Probe, backbone: FrozenPatchBackbone, datasets: dict, device: torch.device,
                        output_dir: str, writer) -> dict:
    """Build the head, train it (or load it), evaluate, and write the results / head.pth / PNGs on rank 0."""
    eval_set = datasets[get_dataset(probe.dataset).splits[1]]
    names = output_names(probe)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(probe.seed)  # the same head initialisation on every rank
    head = LinearSegHead(backbone.out_dim, probe.num_classes).to(device)
    logger.info("frozen %s, %s -> %d-d patch features; head %s", backbone.encoder.name, probe.layers,
                backbone.out_dim, head)
    head_path = os.path.join(output_dir, "head.pth")
    iteration, train_seconds, record = _fit_head(probe, backbone, head, datasets, device, writer, head_path)

    start = time.perf_counter()
    results = evaluate(probe, backbone, head, eval_set, device)
    eval_seconds = time.perf_counter() - start
    logger.info("%s: mIoU %s, aAcc %s, mAcc %s (%d validation images, %.0f s)", probe.layers,
                percent(results["mIoU"]), percent(results["aAcc"]), percent(results["mAcc"]),
                len(eval_set), eval_seconds)
    if distributed.is_main_process():
        writer.write(iteration, _scalars(results), prefix=names["split"])
        results.update({
            "num_classes": probe.num_classes, "num_validation_images": len(eval_set),
            "pretrained": probe.source, **record, "iterations": iteration,
            # evaluation settings of this run (with semseg.load_head, the training ones above are the head's)
            "eval_crop_size": probe.crop_size, "stride": probe.stride, "eval_scale": list(probe.scale),
            "precision": probe.precision,
            "head": head_path if probe.load_head is None else probe.load_head,
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        })
        if probe.visualize:
            folder = os.path.join(output_dir, names["visualizations"])
            results["visualizations"] = visualize(backbone, head, eval_set, probe, device, folder)
        results_path = os.path.join(output_dir, names["results"])
        write_json(results_path, results)
        logger.info("results written to %s", results_path)
    distributed.barrier()
    return results


def _fit_head(probe: Probe, backbone: FrozenPatchBackbone, head: LinearSegHead, datasets: dict,
              device: torch.device, writer, head_path: str) -> tuple[int, float, dict]:
    """Train ``head`` and save it to ``head_path`` (rank 0), or load ``semseg.load_head`` into it; returns
    (iterations, training seconds, the schedule record of its training)."""
    record = schedule_record(probe)
    if probe.load_head is not None:
        iteration, trained_with = load_head(probe.load_head, head, backbone)
        # a head saved before the record existed: its training settings are unknown
        record = trained_with or {**{key: None for key in record}, "layers": probe.layers}
        logger.info("evaluating the head of %s (trained with schedule %s)", probe.load_head, record["schedule"])
        return iteration, 0.0, record
    overridden = f" (overridden: {', '.join(probe.overridden)})" if probe.overridden else ""
    logger.info("schedule %s%s: %d iterations, global batch %d, lr %g, wd %g, warm-up %d, crop %d, stride %d, "
                "scale %s, layers %s, eval every %d", probe.schedule, overridden, probe.iterations,
                probe.batch_size, probe.lr, probe.weight_decay, probe.warmup_iters, probe.crop_size,
                probe.stride, probe.scale, probe.layers, probe.eval_every)
    train_split, eval_split = get_dataset(probe.dataset).splits
    iteration, seconds = train(probe, backbone, head, datasets[train_split], datasets[eval_split], device, writer)
    broadcast_buffers(head)  # without SyncBN every rank ends with its own BN statistics: keep rank 0's
    if distributed.is_main_process():
        save_head(head_path, head, backbone, probe, iteration)
    return iteration, seconds, record


def train(probe: Probe, backbone: FrozenPatchBackbone, head: LinearSegHead, train_set: ADE20KDataset,
          eval_set: ADE20KDataset, device: torch.device, writer) -> tuple[int, float]:
    """Train ``head`` in place (through DDP when distributed), evaluating on ``eval_set`` every
    ``eval_every`` iterations; returns (iterations, seconds)."""
    train_head: nn.Module = head
    if distributed.is_enabled():
        if device.type == "cuda":  # DINOv2 uses SyncBN; SyncBN has no CPU kernel, so gloo runs keep plain BN
            train_head = nn.SyncBatchNorm.convert_sync_batchnorm(head)  # converts head's BN in place
        train_head = nn.parallel.DistributedDataParallel(
            train_head, device_ids=[device.index] if device.type == "cuda" else None
        )
    # Only the head's parameters: the backbone has no gradients and no optimizer state.
    optimizer = torch.optim.AdamW(head.parameters(), lr=probe.lr, weight_decay=probe.weight_decay, betas=(0.9, 0.999))
    per_rank = probe.batch_size // distributed.get_world_size()
    batches = infinite_batches(train_set, per_rank, num_workers=probe.num_workers, seed=probe.seed,
                               pin_memory=device.type == "cuda")
    logger.info("training %d iterations, global batch %d (%d per process), %d training images", probe.iterations,
                probe.batch_size, per_rank, len(train_set))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        writer.write(step, metrics, prefix="train")
        remaining = (probe.iterations - step) / max(metrics["iters_per_s"], 1e-9)
        logger.info("iter %d/%d  loss %.4f  lr %.2e  %.2f it/s  eta %.0f min", step, probe.iterations,
                    metrics["loss"], metrics["lr"], metrics["iters_per_s"], remaining / 60)

    start, iteration = time.perf_counter(), 0
    eval_points = list(range(probe.eval_every, probe.iterations, probe.eval_every)) if probe.eval_every else []
    for stop in [*eval_points, probe.iterations]:
        train_linear_head(backbone, train_head, optimizer, batches, probe.iterations, probe.lr, device,
                          warmup_iters=probe.warmup_iters, start_iter=iteration, stop_iter=stop,
                          log_every=probe.log_every, on_log=on_log)
        iteration = stop
        if stop < probe.iterations:
            intermediate = evaluate(probe, backbone, head, eval_set, device)
            writer.write(stop, _scalars(intermediate), prefix="val")
            logger.info("iter %d: mIoU %s", stop, percent(intermediate["mIoU"]))
    return iteration, time.perf_counter() - start


def evaluate(probe: Probe, backbone: FrozenPatchBackbone, head: nn.Module, dataset: ADE20KDataset,
             device: torch.device) -> dict:
    confusion = evaluate_segmentation(backbone, head, dataset, device, num_classes=probe.num_classes,
                                      crop=probe.crop_size, stride=probe.stride,
                                      windows_per_batch=probe.windows_per_batch, num_workers=probe.num_workers)
    return summarize(confusion.compute(), probe.num_classes)


@torch.no_grad()
def visualize(backbone: FrozenPatchBackbone, head: nn.Module, dataset: ADE20KDataset, probe: Probe,
              device: torch.device, folder: str) -> list[str]:
    """Rank 0 re-segments the first ``visualize`` validation images and writes one PNG each to ``folder``."""
    head.eval()
    colors = palette(probe.num_classes)
    paths = []
    for index in range(min(probe.visualize, len(dataset))):
        image, label = dataset[index]
        logits = slide_inference(lambda crops: segment(backbone, head, crops), image[None].to(device),
                                 probe.num_classes, crop=probe.crop_size, stride=probe.stride,
                                 windows_per_batch=probe.windows_per_batch)
        logits = torch.nn.functional.interpolate(logits, size=tuple(label.shape), mode="bilinear",
                                                 align_corners=False)
        with Image.open(dataset.image_paths[index]) as raw:
            original = raw.convert("RGB")
        path = os.path.join(folder, f"{dataset.image_paths[index].stem}.png")
        save_visualization(path, original, label.numpy(), logits.argmax(1)[0].cpu().numpy(), colors)
        paths.append(path)
    return paths

