"""ADE20K linear semantic segmentation on a frozen encoder (DINOv2 linear protocol, no mmcv/mmseg).

    [torchrun --nproc_per_node N] eval_dense/eval_semseg.py --data_dir ADEChallengeData2016 \\
        --pretrained run/checkpoint.pth [--layers last|last4] [--visualize 8]

Trains BatchNorm + 1x1 conv on the patch tokens of the frozen backbone's last block (or last 4 concatenated)
for 40k iterations at a global batch of 16 (512x512 crops of images rescaled 0.5-2.0 x (2048, 512), flip,
photometric distortion; AdamW lr 1e-3 wd 1e-4, poly schedule after 1500 linear warm-up iterations), then
evaluates on the validation split with sliding windows (512, stride 341). Writes to ``--output_dir``:
``results.json`` (mIoU, aAcc, mAcc as fractions, per-class IoU/accuracy), ``head.pth``, ``log.txt``,
``metrics.jsonl``, TensorBoard logs and, with ``--visualize N``, ``visualizations/*.png``
(image | ground truth | prediction).
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True,
                        help="ADEChallengeData2016 root: images/{training,validation}/*.jpg, "
                             "annotations/{training,validation}/*.png")
    parser.add_argument("--pretrained", required=True,
                        help="UNIC checkpoint.pth / student.pth, or a timm:<model>[.<tag>] ViT baseline")
    parser.add_argument("--weights", default=None, help="weights file for a timm: baseline (else the hub)")
    parser.add_argument("--output_dir", default=None,
                        help="default: <pretrained dir>/semseg_ade20k_<layers>, or output/semseg/<model>_<layers>")
    parser.add_argument("--layers", default="last", choices=tuple(LAYERS),
                        help="patch tokens of the last block, or of the last 4 blocks concatenated")
    parser.add_argument("--num_classes", type=int, default=NUM_CLASSES,
                        help="classes after reduce_zero_label (ADE20K: 150); labels must lie below it or be 255")
    parser.add_argument("--iterations", type=int, default=40_000, help="training iterations")
    parser.add_argument("--batch_size", type=int, default=16, help="global batch (split evenly over processes)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    parser.add_argument("--warmup_iters", type=int, default=1500, help="linear warm-up iterations of the poly schedule")
    parser.add_argument("--crop_size", type=int, default=512, help="training crop and sliding-window size")
    parser.add_argument("--stride", type=int, default=341, help="sliding-window stride")
    parser.add_argument("--scale", type=int, nargs=2, default=(2048, 512), metavar=("LONG", "SHORT"),
                        help="mmseg img_scale: training rescales it by 0.5-2.0, evaluation resizes to it")
    parser.add_argument("--windows_per_batch", type=int, default=4, help="sliding windows per forward pass")
    parser.add_argument("--eval_every", type=int, default=0, help="also evaluate every N iterations (0: at the end)")
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
    return parser.parse_args(argv)


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
    if os.path.isfile(args.pretrained):
        return os.path.join(os.path.dirname(os.path.abspath(args.pretrained)), f"semseg_ade20k_{args.layers}")
    return os.path.join("output", "semseg", f"{args.pretrained.replace(':', '_').replace('/', '_')}_{args.layers}")


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
    }, path)


def load_head(path: str, head: nn.Module, backbone: FrozenPatchBackbone) -> int:
    """Load a saved head into ``head``; returns the iteration it was saved at."""
    from unic.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path} is not a linear-head file written by eval_semseg.py")
    if (ckpt["in_dim"], ckpt["num_classes"]) != (backbone.out_dim, head.num_classes):
        raise ValueError(
            f"{path} maps {ckpt['in_dim']} features to {ckpt['num_classes']} classes, but this backbone/--layers "
            f"give {backbone.out_dim} features and --num_classes is {head.num_classes}"
        )
    head.load_state_dict(ckpt["state_dict"])
    return int(ckpt.get("iteration", 0))


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
    if args.load_head is not None:
        iteration, train_seconds = load_head(args.load_head, head, backbone), 0.0
        logger.info("evaluating the head of %s", args.load_head)
    else:
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
            "pretrained": args.pretrained, "layers": args.layers, "iterations": iteration,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "warmup_iters": args.warmup_iters, "crop_size": args.crop_size, "stride": args.stride,
            "scale": list(args.scale), "seed": args.seed, "world_size": distributed.get_world_size(),
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
