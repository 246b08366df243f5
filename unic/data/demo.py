"""The embedded demo set: small multi-domain data generated on first use, written in the UnED layout.

Domains: ``digits`` (sklearn's bundled handwritten digits, a real data set), and three procedural ones,
``shapes`` (shape classes, random colour/position/size), ``gratings`` (stripe orientation x frequency classes)
and ``blobs`` (hue classes of random Gaussian blobs). Everything is generated from a fixed seed, so
every machine gets the same files; no download anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

DEMO_VERSION = 2  # 2: grating classes no longer mirror images of each other
DEMO_DOMAINS = ("digits", "shapes", "gratings", "blobs")
IMAGE_SIZE = 64
SPLITS = {"train": 0.6, "val": 0.2, "test": 0.2}
PER_CLASS = 30  # images per class for the procedural domains


def _shape(rng: np.random.Generator, cls: int) -> Image.Image:
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    fg = tuple(int(v) for v in rng.integers(120, 256, 3))
    r = rng.uniform(12, 24)
    cx, cy = rng.uniform(r, IMAGE_SIZE - r, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    kind = cls % 8
    if kind == 0:
        draw.ellipse(box, fill=fg)
    elif kind == 1:
        draw.rectangle(box, fill=fg)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == 3:
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=fg)
        draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=fg)
    elif kind == 4:
        draw.ellipse(box, outline=fg, width=4)
    elif kind == 5:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif kind == 6:
        draw.rectangle(box, outline=fg, width=4)
    else:
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=fg, width=5)
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=fg, width=5)
    noise = rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _grating(rng: np.random.Generator, cls: int) -> Image.Image:
    # vertical or horizontal stripes x 4 frequencies: unchanged by the horizontal flips of training crops
    # (oblique classes would be: a flip turns 45 degrees into 135)
    angle = (cls % 2) * np.pi / 2 + rng.normal(0, 0.08)
    freq = (1.5, 3.0, 4.5, 6.0)[cls // 2] + rng.normal(0, 0.15)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = (wave[..., None] + 1) / 2 * c1 + (1 - wave[..., None]) / 2 * c2
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _blobs(rng: np.random.Generator, cls: int) -> Image.Image:
    import colorsys

    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
    for _ in range(int(rng.integers(2, 5))):
        hue = (cls / 8 + rng.normal(0, 0.02)) % 1.0
        color = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.6, 1))) * 255
        cx, cy, s = rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE), rng.uniform(5, 14)
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2))[..., None] * color
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _digits(rng: np.random.Generator) -> list[tuple[Image.Image, int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    out = []
    for pixels, label in zip(data.images, data.target):
        gray = (pixels / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")
        out.append((img, int(label)))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _split(items: list[tuple[Image.Image, int]]) -> dict[str, list[tuple[Image.Image, int]]]:
    """Per class, the first 60 % train, next 20 % val, rest test (items already in random order)."""
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    splits = {name: [] for name in SPLITS}
    for members in by_class.values():
        n_train = round(len(members) * SPLITS["train"])
        n_val = round(len(members) * SPLITS["val"])
        splits["train"] += members[:n_train]
        splits["val"] += members[n_train:n_train + n_val]
        splits["test"] += members[n_train + n_val:]
    return splits


def _write(root: str) -> None:
    rng = np.random.default_rng(0)
    generators = {"shapes": _shape, "gratings": _grating, "blobs": _blobs}
    for domain in DEMO_DOMAINS:
        if domain == "digits":
            items = _digits(rng)
            ext = "png"
        else:
            items = [(generators[domain](rng, c), c) for c in range(8) for _ in range(PER_CLASS)]
            items = [items[i] for i in rng.permutation(len(items))]
            ext = "jpg"
        os.makedirs(os.path.join(root, "images", domain), exist_ok=True)
        os.makedirs(os.path.join(root, "info_files", domain), exist_ok=True)
        for split, members in _split(items).items():
            entries = []
            for i, (img, label) in enumerate(members):
                rel = f"{domain}/{split}_{i:05d}.{ext}"
                img.save(os.path.join(root, "images", rel), quality=92)
                entries.append({"path": rel, "class_id": label})
            with open(os.path.join(root, "info_files", domain, f"{split}.json"), "w") as f:
                json.dump(entries, f)


def ensure_demo_data(root: str) -> str:
    """Generate the demo set into ``root`` unless a complete copy is there; returns the absolute root.

    Generation happens in a temporary sibling folder that is renamed into place, so an interrupted run
    never leaves a half-written set behind.
    """
    root = os.path.abspath(os.path.expanduser(root))
    marker = os.path.join(root, "DEMO_COMPLETE")
    if os.path.isfile(marker) and open(marker).read().strip() == str(DEMO_VERSION):
        return root
    if os.path.exists(root) and os.listdir(root):
        if not os.path.isfile(marker):
            raise FileExistsError(f"{root} exists, is not empty and is not a complete demo set; remove it or pick another data.root")
        shutil.rmtree(root)  # an older demo version
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    logger.info("generating the demo data set in %s", root)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    try:
        _write(tmp)
        with open(os.path.join(tmp, "DEMO_COMPLETE"), "w") as f:
            f.write(str(DEMO_VERSION))
        if os.path.isdir(root):
            os.rmdir(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
