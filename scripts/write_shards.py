"""Write a training split as webdataset tar shards for ``data.dataset=wds``.

    python scripts/write_shards.py --layout uned --root ~/data/uned --split train --out ~/data/uned_wds
    python scripts/write_shards.py --layout imagenet --root ~/data/imagenet --out ~/data/in1k_wds --num_workers 16
    python scripts/write_shards.py --layout csv --root ~/data/m4d --split m4d-35k_train --out ~/data/m4d_wds

The split is read with the package's own loaders (``uned``: root/info_files/<domain>/<split>.json and
root/images; ``imagenet``: root/<split>/<class>/<image>; ``csv``: root/<split>.csv), so the shards hold exactly
the samples, class ids and domains the folder path trains on. Each sample keeps its original encoded image
bytes (``<key>.jpg``/``.png``/...), ``<key>.cls`` (first class id) and ``<key>.json``; shards hold at most
``--max_count`` samples and ``--max_size`` bytes, the samples spread over them in a seeded random order (unless
``--no_shuffle``), and ``index.json`` (written last) lists the shards, their counts and the class/domain tables.
Train on them with ``data.dataset=wds data.root=<--out>`` (see unic/data/shards.py for the data order).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unic.data.shards import INDEX_NAME, write_shards  # noqa: E402

LAYOUTS = ("uned", "imagenet", "csv")


def _size(text: str) -> float | None:
    """``1e9``, ``500MB``, ``1GB`` or ``none``."""
    text = text.strip().upper()
    if text in ("NONE", "0"):
        return None
    for suffix, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="how the source folder is organised")
    parser.add_argument("--root", required=True, help="the source data folder (data.root of the folder path)")
    parser.add_argument("--split", default="train", help="the split to write (default: train)")
    parser.add_argument("--domains", default="", help="uned/csv: comma-separated domains (default: all)")
    parser.add_argument("--out", required=True, help="output folder (index.json and the shards)")
    parser.add_argument("--prefix", default=None, help="shard file prefix (default: the split)")
    parser.add_argument("--max_count", type=int, default=10_000, help="samples per shard at most")
    parser.add_argument("--max_size", type=_size, default=1e9, help="bytes per shard at most (1e9, 500MB, none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order of the samples over the shards")
    parser.add_argument("--no_shuffle", action="store_true", help="keep the source order (sorted by domain, class)")
    parser.add_argument("--group_by_domain", action="store_true",
                        help="one domain per shard (UDON's per-domain streams then read only their own shards)")
    parser.add_argument("--num_workers", type=int, default=0, help="processes writing shards in parallel")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index and its shards")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def read_split(layout: str, root: str, split: str, domains: list[str] | None):
    """The folder data set of the split (no transform) and its class names (ImageNet layout only)."""
    if layout == "uned":
        from unic.data.uned import uned_dataset

        return uned_dataset(root, split, domains), None
    if layout == "csv":
        from unic.data.csv_list import csv_dataset

        return csv_dataset(root, split, domains), None
    from unic.data.folders import image_folder_dataset

    ds = image_folder_dataset(os.path.join(root, split))
    return ds, ds.classes


def main(argv: list[str] | None = None) -> str:
    """Write the shards; returns the path of the index."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    root = os.path.abspath(os.path.expanduser(args.root))
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] or None
    if domains and args.layout == "imagenet":
        raise SystemExit("--domains: the ImageNet layout has a single domain")
    ds, classes = read_split(args.layout, root, args.split, domains)
    index = write_shards(
        ds.samples, ds.domain_names, args.out, classes=classes,
        source={"layout": args.layout, "root": root, "split": args.split}, prefix=args.prefix or args.split,
        max_count=args.max_count, max_size=args.max_size, shuffle=not args.no_shuffle, seed=args.seed,
        group_by_domain=args.group_by_domain, num_workers=args.num_workers, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    path = os.path.join(os.path.abspath(os.path.expanduser(args.out)), INDEX_NAME)
    logging.info("%d samples (%s) in %d shards: %s", index["num_samples"], ", ".join(index["domains"]),
                 len(index["shards"]), path)
    return path


def cli() -> None:
    try:
        main()
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
