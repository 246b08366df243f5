"""Image-list datasets that survive broken files, and the ImageNet-layout folder dataset."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_REPLACEMENTS = 32  # consecutive unreadable files tolerated before giving up on an item


class BadImageError(RuntimeError):
    """An image file that cannot be decoded."""


def to_rgb(img: Image.Image) -> Image.Image:
    """The RGB image training sees: transparency composited on white, 16/32-bit scaled to 8 bits by the max."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np

        array = np.asarray(img, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode an image to RGB (:func:`to_rgb`); any decoding problem (truncated, not an image, bomb, ...) is a
    BadImageError."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # FIFOs would block a worker forever, devices, folders
            raise OSError("not a regular file")
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Exception as err:  # noqa: BLE001 - hostile files raise anything from OSError to SyntaxError
        raise BadImageError(f"{path}: {type(err).__name__}: {err}") from None


class ImageListDataset(Dataset):
    """Samples ``(path, labels, domain)``; unreadable images are replaced by the next readable sample.

    Items are dicts: image, label (first class id), domain, index (the requested index), skipped (how
    many broken files were passed over for this item) and bad (those files and why, one per line), so skips
    are counted and reported even from inside worker processes.
    A key ``(index, seed)`` seeds the transform's randomness, making augmentations depend only on the
    sample and the step, not on worker count or world size.
    ``reader`` turns a path into what the transform takes (a BadImageError marks an unreadable file): PIL images
    by default, :func:`unic.data.gpu_decode.read_encoded` to decode JPEGs on the training device instead.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, Sequence[int], int]],
        transform: Callable | None = None,
        domain_names: Sequence[str] = ("default",),
        reader: Callable[[str], Any] = load_image,
    ):
        if len(samples) == 0:
            raise ValueError("dataset has no sample")
        self.samples = list(samples)
        self.transform = transform
        self.reader = reader
        self.domain_names = list(domain_names)
        self._reported: set[str] = set()
        # a broken image is replaced by the next one of the same domain (labels stay meaningful)
        members: dict[int, list[int]] = {}
        for i, (_, _, domain) in enumerate(self.samples):
            members.setdefault(domain, []).append(i)
        self._members = members
        self._position = {i: pos for idx in members.values() for pos, i in enumerate(idx)}

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> list[Sequence[int]]:
        return [labels for _, labels, _ in self.samples]

    def __getitem__(self, key) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, None)
        bad = []
        members = self._members[self.samples[index][2]]
        start = self._position[index]
        for skipped in range(MAX_REPLACEMENTS):
            path, labels, domain = self.samples[members[(start + skipped) % len(members)]]
            try:
                img = self.reader(path)
            except BadImageError as err:
                bad.append(str(err))
                if path not in self._reported:
                    self._reported.add(path)
                    logger.warning("skipping unreadable image %s", err)
                continue
            if self.transform is not None:
                rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
                with rng:
                    if seed is not None:
                        torch.manual_seed(seed)
                    img = self.transform(img)
            return {"image": img, "label": int(labels[0]), "domain": domain, "index": index, "skipped": skipped,
                    "bad": "\n".join(bad)}
        raise BadImageError(f"{MAX_REPLACEMENTS} consecutive unreadable images from index {index}")


def scan_image_folder(root: str) -> tuple[list[tuple[str, list[int], int]], list[str]]:
    """ImageNet layout ``root/<class>/<image>``: samples sorted by class then file name, and class names."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class sub-folder in {root} (expected root/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=False)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), [label], 0))
    if not samples:
        raise FileNotFoundError(f"no image file under {root}")
    return samples, classes


def image_folder_dataset(root: str, transform: Callable | None = None) -> ImageListDataset:
    samples, classes = scan_image_folder(root)
    ds = ImageListDataset(samples, transform)
    ds.classes = classes
    return ds
