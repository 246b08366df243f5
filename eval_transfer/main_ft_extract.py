"""Extract frozen-encoder features for transfer evaluation (t-ReX protocol).

    [torchrun --nproc_per_node N] eval_transfer/main_ft_extract.py --pretrained run/checkpoint.pth \\
        --dataset aircraft --data_dir /data/aircraft --output_dir F

writes ``F/features_trainval.pth`` and ``F/features_test.pth`` (``{"X": float32 (N, D), "Y": int64 (N,)}``) and
``F/extract_info.json``. ``--pretrained`` is a UNIC file (checkpoint.pth, student.pth, universal.pth) or a baseline
``timm:<model>[.<tag>]`` / ``open_clip:<model>:<tag>``. Then run ``eval_transfer/main_clf.py --features_dir F``.
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

from eval_transfer.datasets import COG_LEVELS, DATASETS, LAYOUTS, load_splits
from unic import distributed
from unic.data.folders import ImageListDataset
from unic.data.transforms import eval_transform
from unic.eval.encoders import load_encoder
from unic.eval.features import extract_features
from unic.eval.transfer import FEATURE_SPLITS, TOKEN_TYPES, features_path, save_features, token_encoder
from unic.train.logger import setup_logging

logger = logging.getLogger("main_ft_extract")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shown = {("cog_l1..l5" if name == "cog_l1" else name): layout for name, layout in LAYOUTS.items()
             if name not in COG_LEVELS[1:]}
    layouts = "\n".join(f"  {name:12s} {layout}" for name, layout in shown.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"expected layouts (D = --data_dir):\n{layouts}")
    parser.add_argument("--pretrained", required=True,
                        help="UNIC checkpoint.pth / student.pth / universal.pth, or timm:<model>[.<tag>] / "
                             "open_clip:<model>:<tag>")
    parser.add_argument("--weights", default=None, help="weights file for a timm:/open_clip: baseline (else the hub)")
    parser.add_argument("--embedding", default="backbone",
                        help="descriptor of a UNIC file: backbone (default), universal, domain:<name> or auto")
    parser.add_argument("--dataset", required=True, choices=DATASETS,
                        help="imagefolder (any ImageFolder layout) or a t-ReX data set (layouts below)")
    parser.add_argument("--data_dir", required=True, help="root folder of the data set, in its official layout")
    parser.add_argument("--output_dir", default=None,
                        help="where the features go (default: <pretrained dir>/transfer/features_<dataset>_<size>_"
                             "<token_type>, or output/transfer/<model>/... for baselines)")
    parser.add_argument("--token_type", default="cls", choices=TOKEN_TYPES,
                        help="cls token, mean of the last block's patch tokens, or both concatenated")
    parser.add_argument("--image_size", type=int, default=None, help="input resolution (default: the encoder's)")
    parser.add_argument("--crop_ratio", type=float, default=1.0,
                        help="resize the short side to image_size / crop_ratio, then centre-crop image_size; "
                             "1.0 is the t-ReX protocol, 0.875 the usual ImageNet evaluation")
    parser.add_argument("--batch_size", type=int, default=128, help="images per process and step")
    parser.add_argument("--num_workers", type=int, default=8, help="data-loading workers per process")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"),
                        help="autocast dtype of the encoder (default fp32, as UNIC's extraction; auto: bf16 on "
                             "CUDA, fp32 on CPU); features are float32")
    parser.add_argument("--split_no", type=int, default=1, help="DTD / SUN397 partition (1-10)")
    parser.add_argument("--cog_levels_mapping_file", default=None,
                        help="ImageNet-CoG cog_levels_mapping_file.pkl (default: in --data_dir)")
    parser.add_argument("--cog_concepts_split_file", default=None,
                        help="ImageNet-CoG cog_concepts_split_file.pkl (default: in --data_dir)")
    parser.add_argument("--allow_partial", action="store_true",
                        help="accept class/sample counts that differ from the official release and drop listed "
                             "images that are missing (default: such a mismatch is an error)")
    return parser.parse_args(argv)


def default_output_dir(args: argparse.Namespace, image_size: int | str) -> str:
    name = f"features_{args.dataset}_{image_size}_{args.token_type}"
    if os.path.isfile(args.pretrained):
        return os.path.join(os.path.dirname(os.path.abspath(args.pretrained)), "transfer", name)
    model = args.pretrained.replace(":", "_").replace("/", "_")
    return os.path.join("output", "transfer", model, name)


def validate_args(args: argparse.Namespace) -> None:
    """Fail on bad arguments before any data is read or any output is created."""
    if not args.pretrained.startswith(("timm:", "open_clip:")) and not os.path.isfile(args.pretrained):
        raise FileNotFoundError(f"--pretrained: checkpoint file not found: {args.pretrained}")
    if args.image_size is not None and args.image_size <= 0:
        raise ValueError(f"--image_size must be positive, got {args.image_size}")
    if not 0.0 < args.crop_ratio <= 1.0:
        raise ValueError(f"--crop_ratio must be in (0, 1], got {args.crop_ratio}")
    if args.batch_size <= 0 or args.num_workers < 0:
        raise ValueError("--batch_size must be positive and --num_workers non-negative")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if not 1 <= args.split_no <= 10:
        raise ValueError(f"--split_no must be in 1..10, got {args.split_no}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        validate_args(args)
        device = distributed.init_distributed(args.device)
        setup_logging()
        splits = load_splits(
            args.dataset, args.data_dir, strict=not args.allow_partial, split_no=args.split_no,
            cog_levels_mapping_file=args.cog_levels_mapping_file,
            cog_concepts_split_file=args.cog_concepts_split_file,
        )
        encoder = load_encoder(args.pretrained, args.embedding, args.weights, device)
        encode = token_encoder(encoder, args.token_type)
        image_size = args.image_size or encoder.img_size
        if image_size != encoder.img_size:
            if encoder.kind == "open_clip":
                raise ValueError(f"open_clip encoders run at their own resolution ({encoder.img_size}): drop "
                                 f"--image_size {image_size}")
            encoder.allow_any_input_size()  # timm baselines are built for one resolution
        output_dir = args.output_dir or default_output_dir(args, image_size)
        if distributed.is_main_process():
            os.makedirs(output_dir, exist_ok=True)
        distributed.barrier()
        setup_logging(output_dir)
        run(args, splits, encoder, encode, image_size, output_dir, device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()
    return 0


def run(args, splits, encoder, encode, image_size: int, output_dir: str, device: torch.device) -> None:
    """Extract both splits (sharded over ranks), then rank 0 writes the feature files and extract_info.json."""
    dtype = distributed.autocast_dtype(args.precision, device)
    transform = eval_transform(image_size, args.crop_ratio, encoder.mean, encoder.std)
    logger.info("encoder %s (%s tokens) at %d px on %s, %d process(es); %s: %d classes",
                encoder.name, args.token_type, image_size, device, distributed.get_world_size(), args.dataset,
                splits["trainval"].num_classes)
    info = {
        "dataset": args.dataset, "data_dir": os.path.abspath(args.data_dir), "pretrained": args.pretrained,
        "embedding": args.embedding, "token_type": args.token_type, "image_size": image_size,
        "crop_ratio": args.crop_ratio, "precision": args.precision, "mean": list(encoder.mean),
        "std": list(encoder.std),
        "num_classes": splits["trainval"].num_classes, "classes": splits["trainval"].classes,
        "world_size": distributed.get_world_size(), "splits": {},
    }
    for split in FEATURE_SPLITS:
        dataset = ImageListDataset(splits[split].samples, transform)
        start = time.perf_counter()
        out = extract_features(encode, dataset, device, batch_size=args.batch_size, num_workers=args.num_workers,
                               autocast_dtype=dtype, desc=f"{args.dataset} {split}")
        seconds = time.perf_counter() - start
        skipped = int(out["skipped"])
        features, labels = out["features"], out["labels"]
        if skipped and "item_skipped" in out:
            # A row whose image was unreadable holds a copy of a later sample: drop it rather than count it twice.
            keep = out["item_skipped"] == 0
            features, labels = features[keep], labels[keep]
            logger.warning("%s %s: %d unreadable image(s) skipped, %d rows dropped", args.dataset, split, skipped,
                           int((~keep).sum()))
        elif skipped:
            logger.warning("%s %s: %d unreadable image(s) replaced by their successor", args.dataset, split, skipped)
        if not torch.isfinite(features).all():
            raise ValueError(f"non-finite features in the {split} split (try --precision fp32)")
        logger.info("%s: %d x %d features in %.1f s (%.1f images/s)", split, *features.shape, seconds,
                    len(dataset) / max(seconds, 1e-9))
        if distributed.is_main_process():
            save_features(features_path(output_dir, split), features, labels)
        info["splits"][split] = {"num_images": len(features), "dim": int(features.shape[1]),
                                 "skipped_images": skipped, "seconds": round(seconds, 2)}
    if distributed.is_main_process():
        with open(os.path.join(output_dir, "extract_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        logger.info("features written to %s", output_dir)
    distributed.barrier()


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
