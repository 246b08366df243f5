"""Image lists in CSV files (UniFEx's ``m4d-35k_train.csv`` layout) and UniFEx's train transforms.

A split is ``root/<split>.csv`` with a header row and the columns ``img_path`` (relative to ``root``, as
UniFEx's ``M4D35k`` joins it) and ``label`` (an integer class id), plus an optional ``domain`` column.
Without one every row belongs to the domain ``default`` and the CSV's labels are one label space already
(UniFEx's M4D-35k labels its four source data sets with disjoint ids); with one, each domain has labels of
its own (see :class:`unic.models.unifex.MergedLabels` for how a run merges them). Paths may not leave ``root``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence

from torchvision import transforms as T

from unic.data.folders import ImageListDataset
from unic.data.uned import DataFormatError

DEFAULT_DOMAIN = "default"
REQUIRED_COLUMNS = ("img_path", "label")


def csv_path(root: str, split: str) -> str:
    """``root/<split>.csv`` (a split given with its ``.csv`` suffix is taken as is)."""
    return os.path.join(root, split if split.endswith(".csv") else f"{split}.csv")


def read_csv_split(root: str, split: str) -> list[tuple[str, list[int], str]]:
    """Rows of ``root/<split>.csv``: (absolute image path, [label], domain name)."""
    path = csv_path(root, split)
    if not os.path.isfile(path):
        available = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".csv")) if os.path.isdir(root) else []
        raise FileNotFoundError(f"missing split '{split}': {path} (CSV splits in {root}: {available})")
    base = os.path.realpath(root)
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(f"{path}: no column {missing} in the header {reader.fieldnames} "
                                  f"(expected {', '.join(REQUIRED_COLUMNS)}[, domain])")
        has_domain = "domain" in reader.fieldnames
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataFormatError(f"{path}, line {line}: label {row['label']!r} is not an integer") from None
            if label < 0:
                raise DataFormatError(f"{path}, line {line}: negative label {label}")
            rel = (row["img_path"] or "").strip()
            full = os.path.realpath(os.path.join(base, rel))
            if not rel or os.path.commonpath([full, base]) != base:
                raise DataFormatError(f"{path}, line {line}: img_path {rel!r} is empty or escapes {base}")
            domain = (row["domain"] or "").strip() if has_domain else DEFAULT_DOMAIN
            rows.append((full, [label], domain or DEFAULT_DOMAIN))
    if not rows:
        raise DataFormatError(f"{path}: split '{split}' lists no image")
    return rows


def csv_dataset(root: str, split: str, domains: Sequence[str] | None = None,
                transform: Callable | None = None) -> ImageListDataset:
    """The rows of one CSV split as a dataset; ``domains`` (default: every domain, sorted) picks and orders
    them, ``domain`` of an item indexes ``ds.domain_names``."""
    root = os.path.expanduser(root)
    rows = read_csv_split(root, split)
    present = sorted({domain for _, _, domain in rows})
    names = list(domains) if domains else present
    unknown = [d for d in names if d not in present]
    if unknown:
        raise DataFormatError(f"{csv_path(root, split)} has no row of domain {unknown} (domains: {present})")
    index = {name: d for d, name in enumerate(names)}
    samples = [(path, labels, index[domain]) for path, labels, domain in rows if domain in index]
    return ImageListDataset(samples, transform, domain_names=names)


def write_csv_split(path: str, rows: Sequence[tuple[str, int] | tuple[str, int, str]]) -> None:
    """Write ``(img_path, label[, domain])`` rows in UniFEx's layout (what :func:`read_csv_split` reads)."""
    import io

    from unic.io import write_text

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["img_path", "label", "domain"] if any(len(row) > 2 for row in rows) else ["img_path", "label"])
    writer.writerows(rows)
    write_text(path, text.getvalue())


# ------------------------------------------------------------------------------------------------ transforms
UNIFEX_TRANSFORMS = ("openai-clip", "openclip", "siglip", "custom")


def unifex_train_transform(name: str, img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """UniFEx's train transforms (``src/datasets/transforms.py``), then normalisation with ``mean``/``std``:

    - ``openai-clip`` (its paper recipe): resize the short side (bicubic, antialiased), centre crop; no
      augmentation;
    - ``openclip``: RandomResizedCrop(scale 0.9-1, square), bicubic;
    - ``siglip``: RandomResizedCrop (bicubic), ColorJitter(brightness, contrast, saturation 0.6-1.4);
    - ``custom``: ``openclip``'s crop, horizontal flip and ``siglip``'s colour jitter.
    """
    bicubic = T.InterpolationMode.BICUBIC
    jitter = T.ColorJitter(brightness=[0.6, 1.4], contrast=[0.6, 1.4], saturation=[0.6, 1.4])
    square_crop = T.RandomResizedCrop((img_size, img_size), scale=(0.9, 1.0), ratio=(1.0, 1.0), interpolation=bicubic)
    if name == "openai-clip":
        steps = [T.Resize(img_size, interpolation=bicubic, antialias=True), T.CenterCrop(img_size)]
    elif name == "openclip":
        steps = [square_crop]
    elif name == "siglip":
        steps = [T.RandomResizedCrop((img_size, img_size), interpolation=bicubic), jitter]
    elif name == "custom":
        steps = [square_crop, T.RandomHorizontalFlip(p=0.5), jitter]
    else:
        raise ValueError(f"unknown UniFEx transform {name!r}; choose one of {', '.join(UNIFEX_TRANSFORMS)}")
    return T.Compose([*steps, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])
