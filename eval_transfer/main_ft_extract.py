"""Extract frozen-encoder features for transfer evaluation (t-ReX protocol).

    [torchrun --nproc_per_node N] eval_transfer/main_ft_extract.py model.source=run/checkpoint.pth \\
        data.dataset=aircraft data.root=/data/aircraft run.output_dir=F [features.token_type=cls|patch|both]

writes ``F/features_trainval.pth`` and ``F/features_test.pth`` (``{"X": float32 (N, D), "Y": int64 (N,)}``),
``F/extract_info.json`` and the resolved ``F/extract_config.yaml``. ``model.source`` is a UNIC file
(checkpoint.pth, student.pth, universal.pth) or a baseline ``timm:<model>[.<tag>]`` (``model.weights=file``
offline) / ``open_clip:<model>:<tag>``. Then run ``eval_transfer/main_clf.py clf.features_dir=F``.
"""

from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from omegaconf import DictConfig

from unic import distributed
from unic.cli import parse as parse_config, write_resolved_config
from unic.config import ConfigError
from unic.data.transfer import load_splits
from unic.data.transforms import eval_transform
from unic.eval.encoders import load_encoder
from unic.eval.transfer import FEATURE_SPLITS, extract_split, features_path, save_features, token_encoder
from unic.eval.transfer_config import (
    ExtractConfig,
    default_features_dir,
    layouts_help,
    source_file_exists,
    with_values,
)
from unic.io import write_json
from unic.train.logger import setup_logging

logger = logging.getLogger("main_ft_extract")

EXAMPLE = ("eval_transfer/main_ft_extract.py model.source=output/demo/checkpoint.pth data.dataset=imagefolder "
           "data.root=/data/folder run.output_dir=F")
CONFIG_NAME = "extract_config.yaml"


def parse(argv: list[str] | None) -> DictConfig:
    """The validated config, then the check that its model file exists, before any work (the device is
    checked by ``init_distributed``)."""
    cfg, _ = parse_config(argv, ExtractConfig, f"{__doc__}\n{layouts_help()}", EXAMPLE)
    source_file_exists(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
        device = distributed.init_distributed(cfg.run.device)
        setup_logging()
        splits = load_splits(
            cfg.data.dataset, os.path.expanduser(cfg.data.root), strict=not cfg.data.allow_partial,
            split_no=cfg.data.split_no, cog_levels_mapping_file=cfg.data.cog_levels_mapping_file,
            cog_concepts_split_file=cfg.data.cog_concepts_split_file,
        )
        encoder = load_encoder(cfg.model.source, cfg.model.embedding, cfg.model.weights, device)
        img_size = cfg.data.img_size or encoder.img_size
        if img_size != encoder.img_size:
            if encoder.kind == "open_clip":
                raise ConfigError(f"open_clip encoders run at their own resolution ({encoder.img_size}): drop "
                                  f"data.img_size={img_size}")
            encoder.allow_any_input_size()  # timm baselines are built for one resolution
        output_dir = cfg.run.output_dir or default_features_dir(cfg, img_size)
        cfg = with_values(cfg, {"run.output_dir": output_dir, "data.img_size": img_size})
        if distributed.is_main_process():
            write_resolved_config(cfg, output_dir, CONFIG_NAME)
        distributed.barrier()
        setup_logging(output_dir)
        run(cfg, splits, encoder, device)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy_distributed()
    return 0


def run(cfg: DictConfig, splits: dict, encoder, device: torch.device) -> None:
    """Extract both splits (sharded over ranks), then rank 0 writes the feature files and extract_info.json."""
    data, output_dir = cfg.data, cfg.run.output_dir
    encode = token_encoder(encoder, cfg.features.token_type)
    transform = eval_transform(data.img_size, data.crop_ratio, encoder.mean, encoder.std)
    logger.info("encoder %s (%s tokens) at %d px on %s, %d process(es); %s: %d classes", encoder.name,
                cfg.features.token_type, data.img_size, device, distributed.get_world_size(), data.dataset,
                splits["trainval"].num_classes)
    info = {
        "dataset": data.dataset, "data_dir": os.path.abspath(os.path.expanduser(data.root)),
        "pretrained": cfg.model.source, "embedding": cfg.model.embedding, "token_type": cfg.features.token_type,
        "image_size": data.img_size, "crop_ratio": data.crop_ratio, "precision": cfg.run.precision,
        "mean": list(encoder.mean), "std": list(encoder.std),
        "num_classes": splits["trainval"].num_classes, "classes": splits["trainval"].classes,
        "world_size": distributed.get_world_size(), "splits": {},
    }
    for split in FEATURE_SPLITS:
        out = extract_split(encode, splits[split].samples, transform, device, data.batch_size_per_gpu,
                            data.num_workers, distributed.autocast_dtype(cfg.run.precision, device),
                            f"{data.dataset} {split}")
        if distributed.is_main_process():
            save_features(features_path(output_dir, split), out["X"], out["Y"])
        info["splits"][split] = {"num_images": len(out["X"]), "dim": int(out["X"].shape[1]),
                                 "skipped_images": out["skipped"], "seconds": round(out["seconds"], 2)}
    if distributed.is_main_process():
        write_json(os.path.join(output_dir, "extract_info.json"), info)
        logger.info("features written to %s", output_dir)
    distributed.barrier()


def cli() -> None:
    """Console-script and ``__main__`` entry: exits with main()'s code (see distributed.exit_process)."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
