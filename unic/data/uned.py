"""UnED layout: ``root/info_files/<domain>/<split>.json`` (lists of {"path", "class_id"}) + ``root/images``."""

from __future__ import annotations

import json
import os
from typing import Callable, Sequence

from unic.data.folders import ImageListDataset

class DataFormatError(ValueError):
    """An info file that does not follow the UnED layout (or tries to leave the data root)."""


def list_domains(root: str) -> list[str]:
    info = os.path.join(root, "info_files")
    if not os.path.isdir(info):
        raise FileNotFoundError(f"no info_files folder in {root} (expected root/info_files/<domain>/<split>.json)")
    return sorted(e.name for e in os.scandir(info) if e.is_dir())


def read_info_file(root: str, domain: str, split: str) -> list[tuple[str, list[int]]]:
    """Entries of one split: (absolute image path, class ids). Paths may not escape ``root/images``."""
    path = os.path.join(root, "info_files", domain, f"{split}.json")
    if not os.path.isfile(path):
        available = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".json")) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise FileNotFoundError(f"missing split '{split}' of domain '{domain}': {path} (available: {available})")
    with open(path) as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise DataFormatError(f"{path}: expected a list of {{'path', 'class_id'}} entries")
    images = os.path.realpath(os.path.join(root, "images"))
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry or "class_id" not in entry:
            raise DataFormatError(f"{path}: entry {i} lacks 'path' or 'class_id'")
        full = os.path.realpath(os.path.join(images, entry["path"]))
        if os.path.commonpath([full, images]) != images:
            raise DataFormatError(f"{path}: entry {i} path {entry['path']!r} escapes {images}")
        labels = entry["class_id"] if isinstance(entry["class_id"], list) else [entry["class_id"]]
        if not labels or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
            raise DataFormatError(f"{path}: entry {i} has an invalid class_id {entry['class_id']!r}")
        out.append((full, labels))
    if not out:
        raise DataFormatError(f"{path}: split '{split}' of domain '{domain}' is empty")
    return out


def uned_dataset(
    root: str, split: str, domains: Sequence[str] | None = None, transform: Callable | None = None
) -> ImageListDataset:
    """All listed domains' ``split`` in one dataset; ``domain`` of an item indexes ``ds.domain_names``."""
    root = os.path.expanduser(root)
    domains = list(domains) if domains else list_domains(root)
    samples = []
    for d, domain in enumerate(domains):
        samples.extend((path, labels, d) for path, labels in read_info_file(root, domain, split))
    return ImageListDataset(samples, transform, domain_names=domains)
