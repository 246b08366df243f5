"""ADE20K linear semantic segmentation on a frozen encoder (DINOv2 linear protocol, no mmcv/mmseg).

    [torchrun --nproc_per_node N] eval_dense/eval_semseg.py --data_dir ADEChallengeData2016 \\
        --pretrained run/checkpoint.pth [--schedule unic|dinov2] [--layers last|last4] [--visualize 8]

Trains BatchNorm + 1x1 conv on the final-normed patch tokens of the frozen backbone's last block (or last 4
concatenated): 512x512 crops of images rescaled 0.5-2.0 x (99999999, 512) (short side 512 x ratio), flip,
photometric distortion; AdamW lr 1e-3 wd 1e-4, poly schedule after 1500 linear warm-up iterations; then
evaluates on the validation split with sliding windows (512, stride 341). ``--schedule`` picks the length:

- ``unic`` (default): 80k iterations at a global batch of 8, UNIC's ``eval_dense/eval_semseg.py`` defaults
  (``samples_per_gpu=8``, ``iter_with_8_gpu=10000`` x 8 on its single GPU), the schedule behind UNIC's published
  39.6 (ViT-B/16) and UNIC-L's 48.3 (ViT-L/14) mIoU;
- ``dinov2``: 40k iterations at a global batch of 16 (2 per GPU x 8 GPUs), DINOv2's published
  ``dinov2_vit*14_ade20k_linear_config.py``.

Both see 640k crops and evaluate every 10k iterations; the reported numbers are those after the last one.
Explicit flags (``--iterations``, ``--batch_size``, ``--lr``, ...) override the preset. The global batch does
not depend on the number of processes (SyncBN on CUDA, so BN statistics are over the global batch too).

Writes to ``--output_dir``: ``results.json`` (mIoU, aAcc, mAcc as fractions, per-class IoU/accuracy, the
schedule and every resolved setting), ``head.pth``, ``log.txt``, ``metrics.jsonl``, TensorBoard logs and, with
``--visualize N``, ``visualizations/*.png`` (image | ground truth | prediction).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from PIL import Image
from torch import nn

from unic import distributed
from unic.eval.encoders import load_encoder
from unic.eval.semseg import (
    ADE20K_CLASSES,
    DINOV2_ADE20K_SCALE,
    IGNORE_INDEX,
    NUM_CLASSES,
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
from unic.train.logger import MetricsWriter, setup_logging

logger = logging.getLogger("eval_semseg")

LAYERS = {"last": 1, "last4": 4}
HEAD_FORMAT = "unic-semseg-linear-head"

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


def _preset_help(key: str) -> str:
    values = {name: preset[key] for name, preset in SCHEDULES.items()}
    shown = {name: " ".join(map(str, v)) if isinstance(v, tuple) else v for name, v in values.items()}
    if len(set(map(str, shown.values()))) == 1:
        return f"default: the schedule's ({next(iter(shown.values()))})"
    return "default: the schedule's (" + ", ".join(f"{name}: {v}" for name, v in shown.items()) + ")"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True,
                        help="ADEChallengeData2016 root: images/{training,validation}/*.jpg, "
                             "annotations/{training,validation}/*.png")
    parser.add_argument("--pretrained", required=True,
                        help="UNIC checkpoint.pth / student.pth, or a timm:<model>[.<tag>] ViT baseline")
    parser.add_argument("--weights", default=None, help="weights file for a timm: baseline (else the hub)")
    parser.add_argument("--output_dir", default=None,
                        help="default: <pretrained dir>/semseg_ade20k_<schedule>_<layers>, or "
                             "output/semseg/<model>_<schedule>_<layers>")
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=tuple(SCHEDULES),
                        help="reference protocol the settings below default to: unic (80k iterations at a global "
                             "batch of 8, UNIC's own, behind its published 39.6 / 48.3 mIoU) or dinov2 (40k x 16)")
    parser.add_argument("--layers", default=None, choices=tuple(LAYERS),
                        help="patch tokens of the last block, or of the last 4 blocks concatenated; "
                             + _preset_help("layers"))
    parser.add_argument("--num_classes", type=int, default=NUM_CLASSES,
                        help="classes after reduce_zero_label (ADE20K: 150); labels must lie below it or be 255")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations; " + _preset_help("iterations"))
    parser.add_argument("--batch_size", type=int, default=None,
                        help="global batch (split evenly over processes); " + _preset_help("batch_size"))
    parser.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate; " + _preset_help("lr"))
    parser.add_argument("--weight_decay", type=float, default=None,
                        help="AdamW weight decay; " + _preset_help("weight_decay"))
    parser.add_argument("--warmup_iters", type=int, default=None,
                        help="linear warm-up iterations of the poly schedule; " + _preset_help("warmup_iters"))
    parser.add_argument("--crop_size", type=int, default=None,
                        help="training crop and sliding-window size; " + _preset_help("crop_size"))
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride; " + _preset_help("stride"))
    parser.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                        help="mmseg img_scale: training rescales it by 0.5-2.0, evaluation resizes to it (the "
                             "largest size with long edge <= LONG and short edge <= SHORT); " + _preset_help("scale"))
    parser.add_argument("--windows_per_batch", type=int, default=4, help="sliding windows per forward pass")
    parser.add_argument("--eval_every", type=int, default=None,
                        help="also evaluate every N iterations (0: at the end only); " + _preset_help("eval_every"))
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="write image / ground truth / prediction PNGs of the first N validation images")
    parser.add_argument("--load_head", default=None, help="evaluate a saved head.pth instead of training one")
    parser.add_argument("--num_workers", type=int, default=8, help="data-loading workers per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast dtype of the frozen backbone (auto: bf16 on CUDA, fp32 on CPU); "
                             "the head trains in float32")
    parser.add_argument("--log_every", type=int, default=50, help="log the loss every N iterations")
    return resolve_schedule(parser.parse_args(argv))


def resolve_schedule(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every setting left unset (None) with ``--schedule``'s value; ``args.overridden`` lists the ones
    given explicitly."""
    preset = SCHEDULES[args.schedule]
    args.overridden = sorted(key for key in preset if getattr(args, key) is not None)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.scale = tuple(int(v) for v in args.scale)
    return args


def schedule_record(args: argparse.Namespace) -> dict:
    """The schedule and the resolved training settings, as written to results.json and head.pth."""
    return {
        "schedule": args.schedule, "schedule_overrides": list(args.overridden),
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
        "warmup_iters": args.warmup_iters, "crop_size": args.crop_size, "scale": list(args.scale),
        "eval_every": args.eval_every, "layers": args.layers, "seed": args.seed,
        "world_size": distributed.get_world_size(),
    }


def validate_args(args: argparse.Namespace) -> None:
    """Argument errors, raised before anything is read or written."""
    if not args.pretrained.startswith("timm:") and not os.path.isfile(args.pretrained):
        if args.pretrained.startswith("open_clip:"):
            raise ValueError("--pretrained: open_clip models expose no patch tokens; use a UNIC file or a timm: ViT")
        raise FileNotFoundError(f"--pretrained: checkpoint file not found: {args.pretrained}")
    if args.load_head is not None and not os.path.isfile(args.load_head):
        raise FileNotFoundError(f"--load_head: file not found: {args.load_head}")
    positive = {"num_classes": args.num_classes, "batch_size": args.batch_size, "crop_size": args.crop_size,
                "stride": args.stride, "windows_per_batch": args.windows_per_batch, "log_every": args.log_every,
                "lr": args.lr, "scale": min(args.scale)}
    for name, value in positive.items():
        if value <= 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if not 1 <= args.num_classes <= IGNORE_INDEX:
        raise ValueError(f"--num_classes must be in [1, {IGNORE_INDEX}], got {args.num_classes}")
    if args.iterations < 1 and args.load_head is None:
        raise ValueError(f"--iterations must be positive, got {args.iterations}")
    for name in ("warmup_iters", "eval_every", "visualize", "num_workers", "weight_decay"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be non-negative, got {getattr(args, name)}")
    world = distributed.get_world_size()
    if args.batch_size % world:
        raise ValueError(f"--batch_size {args.batch_size} is not divisible by the {world} processes")


def default_output_dir(args: argparse.Namespace) -> str:
    tag = f"{args.schedule}_{args.layers}"
    if os.path.isfile(args.pretrained):
        return os.path.join(os.path.dirname(os.path.abspath(args.pretrained)), f"semseg_ade20k_{tag}")
    return os.path.join("output", "semseg", f"{args.pretrained.replace(':', '_').replace('/', '_')}_{tag}")


def check_labels(datasets: dict[str, ADE20KDataset], num_classes: int, num_workers: int, device) -> None:
    """Every annotation must hold labels below ``num_classes`` (or the ignore label): a clear error now, not a
    CUDA assert or a silently wrong mIoU later."""
    for split, dataset in datasets.items():
        largest = max_label(dataset, num_workers=num_workers, device=device)
        if largest >= num_classes:
            raise ValueError(
                f"class-count mismatch: {dataset.root}/annotations/{split} holds label {largest + 1} (label "
                f"{largest} after reduce_zero_label), but --num_classes is {num_classes}"
            )
        if largest < 0:
            raise ValueError(f"{dataset.root}/annotations/{split}: every pixel is unlabelled (0)")


def class_names(num_classes: int) -> list[str]:
    return list(ADE20K_CLASSES) if num_classes == len(ADE20K_CLASSES) else [f"class_{i}" for i in range(num_classes)]


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def summarize(metrics: dict, num_classes: int) -> dict:
    """results.json content: headline metrics and per-class IoU / accuracy keyed by class name (null where
    undefined: a class absent from both ground truth and predictions)."""
    names = class_names(num_classes)
    return {
        "mIoU": _finite_or_none(metrics["mIoU"]),
        "aAcc": _finite_or_none(metrics["aAcc"]),
        "mAcc": _finite_or_none(metrics["mAcc"]),
        "per_class": {
            name: {"IoU": _finite_or_none(iou), "Acc": _finite_or_none(acc)}
            for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"])
        },
    }


def save_head(path: str, head: nn.Module, backbone: FrozenPatchBackbone, args: argparse.Namespace,
              iteration: int) -> None:
    from unic.train.checkpoint import atomic_save

    module = head.module if isinstance(head, nn.parallel.DistributedDataParallel) else head
    atomic_save({
        "format": HEAD_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "in_dim": backbone.out_dim,
        "num_classes": module.num_classes,
        "num_last_blocks": backbone.num_last_blocks,
        "iteration": iteration,
        "pretrained": args.pretrained,
        "training": schedule_record(args),
    }, path)


def load_head(path: str, head: nn.Module, backbone: FrozenPatchBackbone) -> tuple[int, dict | None]:
    """Load a saved head into ``head``; returns the iteration it was saved at and its training record (the
    schedule and resolved settings, None for heads saved before they were recorded)."""
    from unic.io import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a linear-head file written by eval_semseg.py")
    if (ckpt["in_dim"], ckpt["num_classes"]) != (backbone.out_dim, head.num_classes):
        raise ValueError(
            f"{path} maps {ckpt['in_dim']} features to {ckpt['num_classes']} classes, but this backbone/--layers "
            f"give {backbone.out_dim} features and --num_classes is {head.num_classes}"
        )
    head.load_state_dict(ckpt["state_dict"])
    return int(ckpt.get("iteration", 0)), ckpt.get("training")


@torch.no_grad()
def visualize(backbone, head, dataset: ADE20KDataset, args, device, output_dir: str) -> list[str]:
    """Rank 0 re-segments the first ``--visualize`` validation images and writes one PNG each."""
    head.eval()
    colors = palette(args.num_classes)
    paths = []
    for index in range(min(args.visualize, len(dataset))):
        image, label = dataset[index]
        logits = slide_inference(lambda crops: segment(backbone, head, crops), image[None].to(device),
                                 args.num_classes, crop=args.crop_size, stride=args.stride,
                                 windows_per_batch=args.windows_per_batch)
        logits = torch.nn.functional.interpolate(logits, size=tuple(label.shape), mode="bilinear",
                                                 align_corners=False)
        with Image.open(dataset.image_paths[index]) as raw:
            original = raw.convert("RGB")
        path = os.path.join(output_dir, "visualizations", f"{dataset.image_paths[index].stem}.png")
        save_visualization(path, original, label.numpy(), logits.argmax(1)[0].cpu().numpy(), colors)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    writer = None
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available")
        device = distributed.init_distributed(args.device)
        setup_logging()
        validate_args(args)  # after init: the batch must split evenly over the processes
        num_last_blocks = LAYERS[args.layers]
        dtype = distributed.autocast_dtype(args.precision, device)
        encoder = load_encoder(args.pretrained, "backbone", args.weights, device)
        backbone = FrozenPatchBackbone(encoder, num_last_blocks, autocast_dtype=dtype)
        mean_255 = [255.0 * m for m in encoder.mean]
        std_255 = [255.0 * s for s in encoder.std]
        scale = (max(args.scale), min(args.scale))
        datasets = {
            "validation": ADE20KDataset(args.data_dir, "validation", SegEvalTransform(scale, mean_255, std_255)),
        }
        if args.load_head is None:
            datasets["training"] = ADE20KDataset(
                args.data_dir, "training", SegTrainTransform(args.crop_size, scale, mean=mean_255, std=std_255)
            )
        check_labels(datasets, args.num_classes, args.num_workers, device)

        output_dir = args.output_dir or default_output_dir(args)
        if distributed.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
        distributed.barrier()
        setup_logging(output_dir)
        writer = MetricsWriter(output_dir)
        run(args, backbone, datasets, device, output_dir, writer)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.close()
        distributed.destroy_distributed()
    return 0


def run(args, backbone: FrozenPatchBackbone, datasets: dict, device: torch.device, output_dir: str,
        writer: MetricsWriter) -> None:
    """Build the head, train it (or load it), evaluate, and write results.json / head.pth / PNGs on rank 0."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)  # the same head initialisation on every rank
    head = LinearSegHead(backbone.out_dim, args.num_classes).to(device)
    torch.manual_seed(args.seed * 1000 + distributed.get_rank())  # augmentations drawn without loader workers
    logger.info("frozen %s, %s -> %d-d patch features; head %s", backbone.encoder.name, args.layers,
                backbone.out_dim, head)
    head_path = os.path.join(output_dir, "head.pth")
    record = schedule_record(args)
    if args.load_head is not None:
        (iteration, trained_with), train_seconds = load_head(args.load_head, head, backbone), 0.0
        # a head saved before the record existed: its training settings are unknown
        record = trained_with or {**{key: None for key in record}, "layers": args.layers}
        logger.info("evaluating the head of %s (trained with schedule %s)", args.load_head, record["schedule"])
    else:
        logger.info("schedule %s%s: %d iterations, global batch %d, lr %g, wd %g, warm-up %d, crop %d, stride %d, "
                    "scale %s, layers %s, eval every %d", args.schedule,
                    f" (overridden: {', '.join(args.overridden)})" if args.overridden else "", args.iterations,
                    args.batch_size, args.lr, args.weight_decay, args.warmup_iters, args.crop_size, args.stride,
                    tuple(args.scale), args.layers, args.eval_every)
        iteration, train_seconds = train(args, backbone, head, datasets, device, writer)
        broadcast_buffers(head)  # without SyncBN every rank ends with its own BN statistics: keep rank 0's
        if distributed.is_main_process():
            save_head(head_path, head, backbone, args, iteration)

    start = time.perf_counter()
    results = evaluate(args, backbone, head, datasets["validation"], device)
    eval_seconds = time.perf_counter() - start
    logger.info("%s: mIoU %s, aAcc %s, mAcc %s (%d validation images, %.0f s)", args.layers,
                _percent(results["mIoU"]), _percent(results["aAcc"]), _percent(results["mAcc"]),
                len(datasets["validation"]), eval_seconds)
    if distributed.is_main_process():
        writer.write(iteration, {k: v for k, v in results.items() if k != "per_class"}, prefix="val")
        results.update({
            "num_classes": args.num_classes, "num_validation_images": len(datasets["validation"]),
            "pretrained": args.pretrained, **record, "iterations": iteration,
            # evaluation settings of this run (with --load_head, the training ones above are the head's)
            "eval_crop_size": args.crop_size, "stride": args.stride, "eval_scale": list(args.scale),
            "precision": args.precision,
            "head": head_path if args.load_head is None else args.load_head,
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        })
        if args.visualize:
            results["visualizations"] = visualize(backbone, head, datasets["validation"], args, device, output_dir)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        logger.info("results written to %s", os.path.join(output_dir, "results.json"))
    distributed.barrier()


def train(args, backbone: FrozenPatchBackbone, head: LinearSegHead, datasets: dict, device: torch.device,
          writer: MetricsWriter) -> tuple[int, float]:
    """Train ``head`` in place (through DDP when distributed), evaluating every ``--eval_every`` iterations;
    returns (iterations, seconds)."""
    train_head: nn.Module = head
    if distributed.is_enabled():
        if device.type == "cuda":  # DINOv2 uses SyncBN; SyncBN has no CPU kernel, so gloo runs keep plain BN
            train_head = nn.SyncBatchNorm.convert_sync_batchnorm(head)  # converts head's BN in place
        train_head = nn.parallel.DistributedDataParallel(
            train_head, device_ids=[device.index] if device.type == "cuda" else None
        )
    # Only the head's parameters: the backbone has no gradients and no optimizer state.
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    per_rank = args.batch_size // distributed.get_world_size()
    batches = infinite_batches(datasets["training"], per_rank, num_workers=args.num_workers, seed=args.seed,
                               pin_memory=device.type == "cuda")
    logger.info("training %d iterations, global batch %d (%d per process), %d training images", args.iterations,
                args.batch_size, per_rank, len(datasets["training"]))

    def on_log(step: int, metrics: dict[str, float]) -> None:
        writer.write(step, metrics, prefix="train")
        remaining = (args.iterations - step) / max(metrics["iters_per_s"], 1e-9)
        logger.info("iter %d/%d  loss %.4f  lr %.2e  %.2f it/s  eta %.0f min", step, args.iterations,
                    metrics["loss"], metrics["lr"], metrics["iters_per_s"], remaining / 60)

    start, iteration = time.perf_counter(), 0
    eval_points = list(range(args.eval_every, args.iterations, args.eval_every)) if args.eval_every else []
    for stop in [*eval_points, args.iterations]:
        train_linear_head(backbone, train_head, optimizer, batches, args.iterations, args.lr, device,
                          warmup_iters=args.warmup_iters, start_iter=iteration, stop_iter=stop,
                          log_every=args.log_every, on_log=on_log)
        iteration = stop
        if stop < args.iterations:
            intermediate = evaluate(args, backbone, head, datasets["validation"], device)
            writer.write(stop, {k: v for k, v in intermediate.items() if k != "per_class"}, prefix="val")
            logger.info("iter %d: mIoU %s", stop, _percent(intermediate["mIoU"]))
    return iteration, time.perf_counter() - start


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def evaluate(args, backbone, head, dataset, device) -> dict:
    confusion = evaluate_segmentation(backbone, head, dataset, device, num_classes=args.num_classes,
                                      crop=args.crop_size, stride=args.stride,
                                      windows_per_batch=args.windows_per_batch, num_workers=args.num_workers)
    return summarize(confusion.compute(), args.num_classes)


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
