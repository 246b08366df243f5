"""Retrieval and weighted-kNN evaluation (SPEC section 8): image sets, descriptor files, protocols, reports.

``run`` is what ``main_retrieval.py`` does with its validated :class:`RetrievalConfig`: check every input
(creating nothing), build the (domain, split) image sets of a dataset registry entry (:func:`image_sets`, one
builder per kind) and the query/index pairs that evaluate them, extract descriptors with the one
shared routine (``unic.eval.features``, sharded over ranks, gathered in dataset order), save them to
``descriptors.npz``, then on rank 0 search them (exact FAISS, ``unic.eval.search``), score them
(``unic.eval.metrics``, ``unic.eval.knn``) and report: a table on stdout, ``results.json``, TensorBoard
scalars and neighbour figures, next to the resolved ``config.yaml``.

Benchmarks (kinds of ``unic.data.registry`` entries; the entry gives the task, metrics, crop and modes that
apply by default, so a new benchmark of one of these layouts is one registry entry)
- UnED layout (``root/info_files/<domain>/<split>.json`` + ``root/images``): the UnED pairs for the UnED
  domains (``UNED_TEST_PAIRS`` / ``UNED_VAL_PAIRS``); any other domain is searched in its ``index`` split
  (test) or ``small_index`` split (val) when it has one, else in its own query split (leave-one-out).
- Folders: ``root/<class>/<image>`` is one leave-one-out set (SOP, CUB, Cars: every image queries all the
  others); ``root/query/<class>/`` + ``root/gallery/<class>/`` is a query/gallery pair (In-Shop), classes
  matched by folder name. Stored as split ``test`` (the set, or the queries) and ``index`` (the gallery).
- ImageNet layout (``root/train/<class>/``, ``root/val/<class>/``): weighted kNN, val queries, train bank.

Descriptor file: for each ``<domain>:<split>`` an array ``<domain>:<split>:x`` (N, D) float32 and
``<domain>:<split>:y`` (N,) int64 or (N, L) int64 padded with -1 for images with several labels; optionally
``__meta__``: JSON as uint8 bytes (what produced the file, the task, pairs and metrics of the run, and the
image paths the figures need). Descriptors are stored as the encoder returns them; evaluation L2-normalises.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Collection, Mapping, Sequence
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from unic import distributed
from unic.cli import write_resolved_config
from unic.config import ConfigError, LoaderConfig, ModelConfig, RunConfig, check_choices, check_range
from unic.data.folders import ImageListDataset, scan_image_folder
from unic.data.registry import DATASETS, DatasetSpec, dataset_names, get_dataset
from unic.eval.encoders import Encoder, is_named_model, load_domain_encoders, load_encoder
from unic.eval.features import extract_features
from unic.eval.knn import weighted_knn
from unic.eval.metrics import (
    ALL_METRICS,
    RECALL_KS,
    UNED_METRICS,
    UNED_PAIRS,
    EmbeddingSet,
    as_label_matrix,
    evaluate_uned,
    l2_normalize,
    metrics_depth,
    relevance_matrix,
)
from unic.eval.search import SEARCH_CHUNK, search
from unic.io import atomic_write, write_json, safe_filename

logger = logging.getLogger(__name__)

Features = dict[str, dict[str, EmbeddingSet]]  # domain -> split -> (embeddings, labels)
Pairs = dict[str, tuple[str, str]]  # domain -> (query split, index split); kNN: (query split, train split)
ImageSets = dict[tuple[str, str], ImageListDataset]  # (domain, split) -> images

RECALL_METRICS = tuple(f"R@{k}" for k in RECALL_KS) + ("mAP@100",)
METRIC_PRESETS: dict[str, tuple[str, ...]] = {"uned": UNED_METRICS, "recall": RECALL_METRICS, "all": ALL_METRICS}
KNN_KS = (10, 20, 100, 200)
MODES = ("separate", "merged")
NUM_FIGURE_NEIGHBORS = 8
DESCRIPTOR_FILE = "descriptors.npz"
DESCRIPTOR_FORMAT = "unic-descriptors"
_META_KEY = "__meta__"
_ARRAY_KEY = re.compile(r"(?P<domain>.+):(?P<split>[^:]+):(?P<kind>x|y)")


class InputError(Exception):
    """A problem with the user's inputs (settings, files, data layout), found before anything is written."""


# ------------------------------------------------------------------------------------------------------------
# query/index pairs and metrics


def default_pairs(
    domains: Sequence[str], split: str, available: Mapping[str, Collection[str]], task: str = "retrieval"
) -> Pairs:
    """(query split, index split) per domain: the UnED table for UnED domains; otherwise ``index`` (test) or
    ``small_index`` (val) when the domain has that split, else the query split itself (leave-one-out).
    For kNN classification the bank is always ``train``."""
    pairs: Pairs = {}
    for domain in domains:
        splits = set(available.get(domain, ()))
        if task == "knn":
            pairs[domain] = (split, "train")
        elif split in UNED_PAIRS and domain in UNED_PAIRS[split]:
            pairs[domain] = UNED_PAIRS[split][domain]
        elif split == "test" and "index" in splits:
            pairs[domain] = ("test", "index")
        elif split == "val" and "small_index" in splits:
            pairs[domain] = ("val", "small_index")
        else:
            pairs[domain] = (split, split)
    return pairs


def parse_pairs(specs: Sequence[str]) -> Pairs:
    """``["cars=test:test", "met=test:index"]`` -> {"cars": ("test", "test"), "met": ("test", "index")}."""
    pairs: Pairs = {}
    for spec in specs:
        match = re.fullmatch(r"(.+)=([^:=]+):([^:=]+)", spec)
        if match is None:
            raise ValueError(f"data.pairs: expected DOMAIN=QUERY_SPLIT:INDEX_SPLIT, got {spec!r}")
        pairs[match.group(1)] = (match.group(2), match.group(3))
    return pairs


def parse_metrics(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A preset (``uned``, ``recall``, ``all``), a comma list such as ``R@1,mMP@5,mAP@100``, or a list."""
    if isinstance(spec, str) and spec in METRIC_PRESETS:
        return METRIC_PRESETS[spec]
    parts = spec.split(",") if isinstance(spec, str) else spec
    names = tuple(dict.fromkeys(name.strip() for name in parts if name.strip()))
    if not names:
        raise ValueError(f"retrieval.metrics: no metric in {spec!r}")
    metrics_depth(names)  # raises on an unknown name
    return names


def check_pairs(features: Features, pairs: Pairs, modes: Sequence[str] = ()) -> None:
    """Every pair's splits exist and are non-empty, with one embedding dim per domain (and across domains for a
    merged index); raises ``ValueError`` naming the domain and split otherwise."""
    if not pairs:
        raise ValueError("no domain to evaluate")
    for domain, splits in pairs.items():
        if domain not in features:
            raise ValueError(f"no descriptors for domain {domain!r} (available: {sorted(features)})")
        for split in splits:
            if split not in features[domain]:
                raise ValueError(
                    f"missing split {split!r} of domain {domain!r} (available: {sorted(features[domain])})"
                )
            if len(features[domain][split].embeddings) == 0:
                raise ValueError(f"domain {domain!r} is empty: split {split!r} has no descriptor")
        dims = {features[domain][split].embeddings.shape[1] for split in splits}
        if len(dims) > 1:
            raise ValueError(f"domain {domain!r}: splits {splits} have descriptors of different dims {sorted(dims)}")
    if "merged" in modes:
        dims = {features[domain][pairs[domain][0]].embeddings.shape[1] for domain in pairs}
        if len(dims) > 1:
            raise ValueError(f"a merged index needs one descriptor dim across domains, got {sorted(dims)} "
                             "(use retrieval.modes=[separate])")


# ------------------------------------------------------------------------------------------------------------
# image sets of a registry entry (kinds uned, folder, imagenet)


def available_splits(root: str, domains: Sequence[str]) -> dict[str, set[str]]:
    """The split files of each domain of a UnED-layout root; a missing or empty domain is an error."""
    info = os.path.join(root, "info_files")
    out = {}
    for domain in domains:
        folder = os.path.join(info, domain)
        if not os.path.isdir(folder):
            known = sorted(e.name for e in os.scandir(info) if e.is_dir()) if os.path.isdir(info) else []
            raise FileNotFoundError(f"domain {domain!r} not found: no folder {folder} (domains there: {known})")
        out[domain] = {f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json")}
        if not out[domain]:
            raise ValueError(f"domain {domain!r} is empty: no <split>.json in {folder}")
    return out


def benchmark_domains(
    spec: DatasetSpec, root: str, domains: Sequence[str] | None = None, pairs: Pairs | None = None,
    name: str | None = None,
) -> list[str]:
    """The domains :func:`image_sets` evaluates (what the encoders are loaded for): for the UnED layout the
    explicit pairs' domains (those of ``domains`` when given), else ``domains``, else every domain of ``root``;
    the one benchmark ``name`` of a folder or ImageNet layout."""
    if spec.kind != "uned":
        return [name]
    if pairs:
        return [domain for domain in pairs if not domains or domain in domains]
    from unic.data.uned import list_domains

    return list(domains) if domains else list_domains(root)


def image_sets(
    spec: DatasetSpec, root: str, split: str, transform, task: str = "retrieval",
    domains: Sequence[str] | None = None, pairs: Pairs | None = None, name: str | None = None,
) -> tuple[ImageSets, Pairs]:
    """The (domain, split) image sets of a registry entry and the query/index pairs that evaluate them (kNN:
    query/bank); one builder per kind, validated and in a fixed order. ``domains`` and ``pairs`` select
    within a UnED layout (see :func:`default_pairs`); ``name`` names a folder or ImageNet benchmark."""
    if spec.kind == "uned":
        return uned_image_sets(root, split, transform, task, domains or benchmark_domains(spec, root, None, pairs),
                               pairs)
    if spec.kind == "folder":
        return folder_image_sets(root, name, transform)
    if spec.kind == "imagenet":
        return imagenet_image_sets(root, split, transform, name, spec.defaults.get("bank_split", "train"))
    raise ValueError(f"dataset {spec.name!r} (kind {spec.kind}) has no retrieval image sets")


def uned_image_sets(
    root: str, split: str, transform, task: str, domains: Sequence[str], pairs: Pairs | None = None
) -> tuple[ImageSets, Pairs]:
    """One data set per (domain, split) the pairs use, read from ``root/info_files``: the explicit ``pairs``
    of ``domains``, else :func:`default_pairs` of ``domains`` from their split files."""
    from unic.data.uned import read_info_file

    available = available_splits(root, domains)
    if pairs:
        pairs = {domain: pair for domain, pair in pairs.items() if domain in domains}
    else:
        pairs = default_pairs(domains, split, available, task)
    sets: ImageSets = {}
    for domain, splits in pairs.items():
        for split_name in dict.fromkeys(splits):
            samples = [(path, labels, 0) for path, labels in read_info_file(root, domain, split_name)]
            sets[(domain, split_name)] = ImageListDataset(samples, transform, [domain])
    return sets, pairs


def _relabel(samples: list, classes: list[str], class_ids: Mapping[str, int]) -> list:
    return [(path, [class_ids[classes[labels[0]]]], 0) for path, labels, _ in samples]


def folder_image_sets(root: str, name: str, transform) -> tuple[ImageSets, Pairs]:
    """``root/<class>/*`` (leave-one-out) or ``root/query/<class>/*`` + ``root/gallery/<class>/*``."""
    query_dir, gallery_dir = os.path.join(root, "query"), os.path.join(root, "gallery")
    if not (os.path.isdir(query_dir) or os.path.isdir(gallery_dir)):
        samples, _ = scan_image_folder(root)
        return {(name, "test"): ImageListDataset(samples, transform, [name])}, {name: ("test", "test")}
    if not (os.path.isdir(query_dir) and os.path.isdir(gallery_dir)):
        raise FileNotFoundError(f"a query/gallery benchmark needs both {query_dir} and {gallery_dir}")
    query, query_classes = scan_image_folder(query_dir)
    gallery, gallery_classes = scan_image_folder(gallery_dir)
    class_ids = {c: i for i, c in enumerate(sorted(set(query_classes) | set(gallery_classes)))}
    without_match = set(query_classes) - set(gallery_classes)
    if without_match:
        logger.warning("%d query classes have no gallery image (their queries score 0)", len(without_match))
    sets = {
        (name, "test"): ImageListDataset(_relabel(query, query_classes, class_ids), transform, [name]),
        (name, "index"): ImageListDataset(_relabel(gallery, gallery_classes, class_ids), transform, [name]),
    }
    return sets, {name: ("test", "index")}


def imagenet_image_sets(
    root: str, split: str, transform, name: str = "imagenet", bank: str = "train"
) -> tuple[ImageSets, Pairs]:
    """ImageNet layout: ``root/<split>/<class>`` queries against the ``root/<bank>/<class>`` bank (same names)."""
    train, classes = scan_image_folder(os.path.join(root, bank))
    queries, query_classes = scan_image_folder(os.path.join(root, split))
    class_ids = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(query_classes) - set(class_ids))
    if unknown:
        raise ValueError(f"{os.path.join(root, split)} has classes absent from {bank}: {unknown[:5]}")
    sets = {
        (name, split): ImageListDataset(_relabel(queries, query_classes, class_ids), transform, [name]),
        (name, bank): ImageListDataset(train, transform, [name]),
    }
    return sets, {name: (split, bank)}


# ------------------------------------------------------------------------------------------------------------
# encoders and extraction


def load_encoders(
    source: str, embedding: str, domains: Sequence[str], weights: str | None = None, device="cpu"
) -> dict[str, Encoder]:
    """The encoder of each domain: one shared encoder, or for ``embedding="oracle"`` each domain's own
    teacher head on one shared backbone (the specialist row UDON reports)."""
    if is_named_model(source) and embedding not in ("auto", "backbone"):
        raise ValueError(f"{source} has only its image embedding (model.embedding={embedding} needs a UNIC file)")
    if embedding != "oracle":
        encoder = load_encoder(source, embedding, weights, device)
        return {domain: encoder for domain in domains}
    return load_domain_encoders(source, domains, device)


def extract_descriptors(
    encoders: Mapping[str, Encoder],
    sets: ImageSets,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Features, dict[str, list[str]], list[str]]:
    """Descriptors of every image set (each domain with its encoder), the image paths of their rows and the
    unreadable images.

    Labels come from the set's samples, so images with several labels keep them all. Unreadable images are
    left out (with a warning), since the loader replaced them by another image."""
    features: Features = {}
    paths: dict[str, list[str]] = {}
    unreadable: list[str] = []
    for (domain, split), dataset in sets.items():
        out = extract_features(encoders[domain], dataset, device, batch_size, num_workers, autocast_dtype,
                               desc=f"extract {domain}/{split}")
        keep = (out["item_skipped"] == 0).numpy()
        labels = as_label_matrix(dataset.labels())
        if not np.array_equal(out["labels"].numpy()[keep], labels[keep, 0]):
            raise RuntimeError(f"{domain}/{split}: extracted rows are not in the data set's order")
        if not keep.all():
            logger.warning("%s/%s: %d unreadable images left out", domain, split, int((~keep).sum()))
        if not keep.any():
            raise RuntimeError(f"{domain}/{split}: no readable image")
        if labels.shape[1] == 1:
            labels = labels[:, 0]
        features.setdefault(domain, {})[split] = EmbeddingSet(out["features"].numpy()[keep], labels[keep])
        paths[f"{domain}:{split}"] = [sample[0] for sample, kept in zip(dataset.samples, keep) if kept]
        unreadable += [sample[0] for sample, kept in zip(dataset.samples, keep) if not kept]
    return features, paths, unreadable


# ------------------------------------------------------------------------------------------------------------
# descriptor files


def save_descriptors(path: str, features: Features, meta: Mapping | None = None) -> None:
    """Write ``<domain>:<split>:x`` / ``:y`` arrays (+ ``__meta__``) to ``path`` (write, then rename)."""
    arrays: dict[str, np.ndarray] = {}
    for domain, splits in features.items():
        for split, (embeddings, labels) in splits.items():
            arrays[f"{domain}:{split}:x"] = np.ascontiguousarray(embeddings, dtype=np.float32)
            arrays[f"{domain}:{split}:y"] = np.asarray(labels, dtype=np.int64)
    if meta is not None:
        arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_descriptors(path: str) -> tuple[Features, dict]:
    """Read and validate a descriptor file; errors name the offending array."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"descriptor file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a .npz descriptor file: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not a .npz descriptor file")
    meta: dict = {}
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    with archive:
        for key in archive.files:
            if key == _META_KEY:
                try:
                    meta = json.loads(bytes(archive[key]).decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as err:
                    raise ValueError(f"{path}: unreadable {_META_KEY}: {err}") from None
                continue
            match = _ARRAY_KEY.fullmatch(key)
            if match is None:
                raise ValueError(f"{path}: unexpected array {key!r} (expected '<domain>:<split>:x' and ':y')")
            try:
                parts.setdefault((match["domain"], match["split"]), {})[match["kind"]] = archive[key]
            except ValueError as err:  # object arrays need pickle, which is refused
                raise ValueError(f"{path}: array {key!r} is not numeric: {err}") from None
    features: Features = {}
    for (domain, split), arrays in sorted(parts.items()):
        name = f"{domain}:{split}"
        for kind in ("x", "y"):
            if kind not in arrays:
                raise ValueError(f"{path}: '{name}:{'y' if kind == 'x' else 'x'}' has no matching '{name}:{kind}'")
        x, y = arrays["x"], arrays["y"]
        if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{path}: '{name}:x' must be a numeric (N, D) array, got {x.dtype} {x.shape}")
        if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: '{name}:y' must be an integer (N,) or (N, L) array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise ValueError(f"{path}: '{name}:x' has {len(x)} rows but '{name}:y' has {len(y)}")
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x.sum(axis=1, dtype=np.float64)).all():  # a float64 sum of finite float32 is finite
            raise ValueError(f"{path}: '{name}:x' holds NaN or infinite values")
        features.setdefault(domain, {})[split] = EmbeddingSet(x, y.astype(np.int64, copy=False))
    if not features:
        raise ValueError(f"{path} holds no descriptor")
    return features, meta


# ------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate_retrieval(
    features: Features,
    pairs: Pairs,
    modes: Sequence[str] = MODES,
    metrics: Sequence[str] = UNED_METRICS,
    chunk_size: int = SEARCH_CHUNK,
    progress: bool | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {domain | "average": {metric: value}}} for each of "separate" and "merged" (SPEC section 8)."""
    check_pairs(features, pairs, modes)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        if mode == "merged" and len(pairs) == 1 and "separate" in results:
            results[mode] = copy.deepcopy(results["separate"])  # one domain: the union is its own index
            continue
        results[mode] = evaluate_uned(features, pairs, mode, metrics, chunk_size=chunk_size, progress=progress)
    return results


def _class_ids(labels: np.ndarray, name: str) -> np.ndarray:
    labels = as_label_matrix(labels)
    if (labels[:, 0] < 0).any():
        raise ValueError(f"kNN classification needs a class for every image; {name} has unlabelled images")
    if labels.shape[1] > 1 and (labels[:, 1:] >= 0).any():
        logger.warning("%s has images with several labels: kNN classification uses the first", name)
    return labels[:, 0]


def evaluate_knn(
    features: Features,
    pairs: Pairs,
    ks: Sequence[int] = KNN_KS,
    temperature: float = 0.07,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Weighted kNN top-1/top-5 (DINO) per domain and their mean: ``{domain | "average": {"top1@k": ...}}``.

    ``pairs`` maps each domain to (query split, bank split)."""
    check_pairs(features, pairs)
    per_domain: dict[str, dict[str, float]] = {}
    for domain, (query_split, bank_split) in pairs.items():
        query, bank = features[domain][query_split], features[domain][bank_split]
        query_y = _class_ids(query.labels, f"{domain}/{query_split}")
        bank_y = _class_ids(bank.labels, f"{domain}/{bank_split}")
        # contiguous class ids, same order as the original ones (kNN breaks score ties by the lower id)
        classes, class_ids = np.unique(np.concatenate([bank_y, query_y]), return_inverse=True)
        scores = weighted_knn(
            torch.from_numpy(np.asarray(bank.embeddings)), torch.from_numpy(class_ids[: len(bank_y)]),
            torch.from_numpy(np.asarray(query.embeddings)), torch.from_numpy(class_ids[len(bank_y):]),
            ks=ks, temperature=temperature, num_classes=len(classes), device=device,
        )
        per_domain[domain] = {f"top{t}@{k}": scores[k][f"top{t}"] for k in ks for t in (1, 5)}
    names = list(next(iter(per_domain.values())))
    per_domain["average"] = {name: float(np.mean([per_domain[d][name] for d in pairs])) for name in names}
    return per_domain


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One block per section (``separate``, ``merged``, ``knn``): a row per domain, values in percent."""
    blocks = []
    for section, per_domain in results.items():
        names = list(next(iter(per_domain.values())))
        first = max(len("domain"), *(len(domain) for domain in per_domain))
        widths = [max(8, len(name) + 2) for name in names]
        title = {"separate": "separate index", "merged": "merged index", "knn": "weighted kNN"}.get(section, section)
        lines = [f"{title} (%)", f"{'domain':<{first}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        for domain, values in per_domain.items():
            lines.append(f"{domain:<{first}}" + "".join(f"{100 * values[n]:>{w}.2f}" for n, w in zip(names, widths)))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------------------------------------
# neighbour figures


def top_neighbors(
    features: Features, pairs: Pairs, domain: str, query_rows: np.ndarray, k: int = NUM_FIGURE_NEIGHBORS,
    merged: bool = False,
) -> dict[str, np.ndarray]:
    """The ranked neighbours of some queries of ``domain``, searched as the evaluation searches them.

    Returns ``scores`` (n, k), ``domain`` (n, k) position of the neighbour's domain in ``pairs`` (-1: none),
    ``row`` (n, k) its row in that domain's index set (-1: none) and ``relevant`` (n, k)."""
    searched = list(pairs) if merged else [domain]
    sizes = [len(features[d][pairs[d][1]].embeddings) for d in searched]
    offsets = dict(zip(searched, np.cumsum([0] + sizes[:-1]).tolist()))
    index_x = np.concatenate([l2_normalize(features[d][pairs[d][1]].embeddings) for d in searched])
    index_labels = [as_label_matrix(features[d][pairs[d][1]].labels) for d in searched]
    query_split, index_split = pairs[domain]
    query_labels = as_label_matrix(features[domain][query_split].labels)[query_rows]
    width = max(query_labels.shape[1], *(labels.shape[1] for labels in index_labels))

    def pad(labels: np.ndarray) -> np.ndarray:
        return np.pad(labels, ((0, 0), (0, width - labels.shape[1])), constant_values=-1)

    index_labels = np.concatenate([pad(labels) for labels in index_labels])
    index_domains = np.repeat(np.arange(len(searched)), sizes)
    # identities: a query is its own index item only when the domain searches its own query split
    query_ids = offsets[domain] + query_rows if query_split == index_split else np.full(len(query_rows), -1)
    scores, neighbors = search(
        l2_normalize(features[domain][query_split].embeddings[query_rows]), index_x, k,
        (query_ids, np.arange(len(index_x))), progress=False,
    )
    query_domain = np.full(len(query_rows), searched.index(domain))
    relevant = relevance_matrix(neighbors, pad(query_labels), index_labels, query_domain, index_domains)
    found = neighbors >= 0
    neighbor_domain = np.where(found, index_domains[np.maximum(neighbors, 0)], -1)
    starts = np.array([offsets[d] for d in searched])
    row = np.where(found, neighbors - starts[np.maximum(neighbor_domain, 0)], -1)
    position_in_pairs = np.array([list(pairs).index(d) for d in searched])
    return {"scores": scores, "domain": np.where(found, position_in_pairs[np.maximum(neighbor_domain, 0)], -1),
            "row": row, "relevant": relevant}


_FRAME = {"query": (40, 90, 200), "relevant": (30, 170, 60), "irrelevant": (215, 40, 40)}


def _thumbnail(path: str | None, color: tuple[int, int, int], size: int = 112) -> np.ndarray:
    from PIL import Image, ImageOps

    from unic.data.folders import BadImageError, load_image

    try:
        img = ImageOps.fit(load_image(path), (size, size)) if path else Image.new("RGB", (size, size), (128,) * 3)
    except BadImageError:
        img = Image.new("RGB", (size, size), (128, 128, 128))
    return np.asarray(ImageOps.expand(img, border=max(3, size // 14), fill=color))


def save_neighbor_figure(
    path: str, title: str, query_paths: Sequence[str], query_captions: Sequence[str],
    neighbor_paths: Sequence[Sequence[str | None]], neighbor_captions: Sequence[Sequence[str]], relevant: np.ndarray,
) -> None:
    """A grid: one query per row (blue frame) then its ranked neighbours, framed green (relevant) or red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_rows, k = relevant.shape
    fig = Figure(figsize=(1.45 * (k + 1), 1.65 * num_rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, k + 1, squeeze=False)
    for r in range(num_rows):
        cells = [(query_paths[r], _FRAME["query"], query_captions[r])]
        cells += [(neighbor_paths[r][j], _FRAME["relevant" if relevant[r, j] else "irrelevant"],
                   neighbor_captions[r][j]) for j in range(k)]
        for ax, (image_path, color, caption) in zip(axes[r], cells):
            ax.axis("off")
            if image_path is None and caption == "":
                continue  # fewer neighbours than k
            ax.imshow(_thumbnail(image_path, color))
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def visualize_neighbors(
    features: Features, pairs: Pairs, paths: Mapping[str, Sequence[str]], output_dir: str, num_queries: int,
    merged: bool, seed: int = 0,
) -> list[str]:
    """A PNG per domain: ``num_queries`` queries (seeded draw) and their top-8 neighbours; returns the files."""
    files = []
    domains = list(pairs)
    for domain, (query_split, index_split) in pairs.items():
        searched = domains if merged else [domain]
        needed = [f"{domain}:{query_split}"] + [f"{d}:{pairs[d][1]}" for d in searched]
        if any(key not in paths for key in needed):
            logger.warning("no image paths for %s: skipping its figure", domain)
            continue
        num_total = len(features[domain][query_split].embeddings)
        rows = np.sort(np.random.default_rng(seed).choice(num_total, min(num_queries, num_total), replace=False))
        nn = top_neighbors(features, pairs, domain, rows, NUM_FIGURE_NEIGHBORS, merged)
        query_labels = as_label_matrix(features[domain][query_split].labels)[rows]
        neighbor_paths, captions = [], []
        for r in range(len(rows)):
            row_paths, row_captions = [], []
            for j in range(NUM_FIGURE_NEIGHBORS):
                d = nn["domain"][r, j]
                if d < 0:
                    row_paths.append(None)
                    row_captions.append("")
                    continue
                name = domains[d]
                row_paths.append(paths[f"{name}:{pairs[name][1]}"][nn["row"][r, j]])
                row_captions.append(f"{nn['scores'][r, j]:.3f}" + ("" if name == domain else f"\n{name}"))
            neighbor_paths.append(row_paths)
            captions.append(row_captions)
        query_captions = [f"query {row}\nclass {','.join(str(c) for c in labels if c >= 0)}"
                          for row, labels in zip(rows, query_labels)]
        mode = "merged" if merged and len(domains) > 1 else "separate"
        file = os.path.join(output_dir, f"neighbors_{safe_filename(domain)}.png")
        save_neighbor_figure(
            file, f"{domain}: {query_split} -> {index_split}, {mode} index (green: relevant, red: not)",
            [paths[f"{domain}:{query_split}"][row] for row in rows], query_captions, neighbor_paths, captions,
            nn["relevant"],
        )
        files.append(file)
    return files


# ------------------------------------------------------------------------------------------------------------
# the configuration of main_retrieval.py

DEMO_CHECKPOINT = "output/demo/checkpoint.pth"
TASKS = ("retrieval", "knn")
RETRIEVAL_KINDS = ("uned", "folder", "imagenet")  # the registry kinds image_sets builds
# the tasks a layout supports: a folder benchmark has no train split, an ImageNet layout no retrieval pairs
KIND_TASKS = {"uned": TASKS, "folder": ("retrieval",), "imagenet": ("knn",)}


@dataclasses.dataclass(kw_only=True)
class RetrievalModelConfig(ModelConfig):
    """The encoder to evaluate (unic.eval.encoders.load_encoder), or saved descriptors instead."""

    source: Optional[str] = DEMO_CHECKPOINT  # UNIC .pth file, timm:<model>[.<tag>] or open_clip:<model>:<tag>
    descriptors: Optional[str] = None  # a saved descriptors.npz to evaluate (no model, no images)


@dataclasses.dataclass(kw_only=True)
class RetrievalDataConfig(LoaderConfig):
    """The benchmark: a dataset registry entry of kind uned, folder or imagenet (unic.data.registry)."""

    dataset: str = "demo"  # demo | uned | folder | imagenet, or any registry entry of those kinds
    root: Optional[str] = None  # the dataset's folder (demo: generated in the registry's folder)
    split: Optional[str] = None  # query split (null: test for retrieval, val for kNN)
    domains: Optional[list[str]] = None  # UnED layout: domains to evaluate (null: all)
    pairs: Optional[list[str]] = None  # UnED layout: DOMAIN=QUERY:INDEX splits, e.g. [met=test:index]
    name: Optional[str] = None  # benchmark name of a folder/imagenet dataset (null: the folder's name / imagenet)
    img_size: Optional[int] = None  # input size (null: the encoder's)
    crop_ratio: Optional[float] = None  # resize short side to img_size/ratio, centre crop (null: the dataset's)


@dataclasses.dataclass(kw_only=True)
class ProtocolConfig:
    """How the descriptors are scored (SPEC section 8)."""

    task: Optional[str] = None  # retrieval | knn (null: the dataset's protocol, knn for imagenet)
    metrics: Optional[str] = None  # uned (R@1,mMP@5,mAP@5), recall (R@1..100,mAP@100), all, or R@1,mAP@5,...
    modes: Optional[list[str]] = None  # indexes: [separate, merged] (null: both; separate for folders and oracle)
    knn_k: list[int] = dataclasses.field(default_factory=lambda: list(KNN_KS))  # kNN neighbours
    temperature: float = 0.07  # kNN vote temperature
    chunk_size: int = SEARCH_CHUNK  # queries per FAISS search call
    visualize: int = 0  # PNG per domain: N queries and their top-8 neighbours


@dataclasses.dataclass(kw_only=True)
class RetrievalConfig:
    """The schema of ``main_retrieval.py`` (``unic.cli.parse``)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: RetrievalModelConfig = dataclasses.field(default_factory=RetrievalModelConfig)
    data: RetrievalDataConfig = dataclasses.field(default_factory=RetrievalDataConfig)
    retrieval: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        check_choices(cfg, {"data.dataset": [n for kind in RETRIEVAL_KINDS for n in dataset_names(kind=kind)]})
        if cfg.retrieval.task is not None:
            check_choices(cfg, {"retrieval.task": TASKS})
        check_range(cfg, positive=["retrieval.chunk_size", "retrieval.temperature", "data.img_size", "data.crop_ratio"],
                    non_negative=["retrieval.visualize"], unit=["data.crop_ratio"])
        if not math.isfinite(cfg.retrieval.temperature):
            raise ConfigError(f"invalid value for 'retrieval.temperature': must be finite, got "
                              f"{cfg.retrieval.temperature}")
        if not cfg.retrieval.knn_k or min(cfg.retrieval.knn_k) < 1:
            raise ConfigError(f"invalid value for 'retrieval.knn_k': must be positive integers, got "
                              f"{list(cfg.retrieval.knn_k)}")
        unknown = [mode for mode in cfg.retrieval.modes or () if mode not in MODES]
        if unknown:
            raise ConfigError(f"invalid value for 'retrieval.modes': unknown {unknown}; choose from {', '.join(MODES)}")
        if cfg.model.descriptors and (cfg.model.source != DEMO_CHECKPOINT or cfg.data.dataset != "demo"
                                      or cfg.data.root is not None):
            raise ConfigError("model.descriptors evaluates saved descriptors: drop model.source, data.dataset and "
                              "data.root")
        spec = get_dataset(cfg.data.dataset)
        task = cfg.retrieval.task or spec.protocol
        if task not in KIND_TASKS[spec.kind]:
            raise ConfigError(f"data.dataset={spec.name} ({spec.kind} layout) is for retrieval.task="
                              f"{' or '.join(KIND_TASKS[spec.kind])}, not {task}")
        if spec.kind != "uned" and (cfg.data.pairs or cfg.data.domains):
            raise ConfigError(f"data.pairs/data.domains apply to UnED-layout data, not data.dataset={spec.name}")


# ------------------------------------------------------------------------------------------------------------
# the evaluation run


@dataclasses.dataclass(kw_only=True)
class Plan:
    """A validated evaluation: what to extract (or the loaded descriptors), how to score it, where to write."""

    task: str
    pairs: Pairs
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    output_dir: str
    meta: dict
    step: int = 0
    encoders: dict[str, Encoder] | None = None
    sets: ImageSets | None = None
    features: Features | None = None
    paths: dict[str, list[str]] = dataclasses.field(default_factory=dict)



def _checkpoint_step(source: str) -> int:
    """The training step of a UNIC checkpoint (0 for exports and named models), read lazily (mmap)."""
    if is_named_model(source):
        return 0
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safetensors or old zip formats: the step is only a TensorBoard x value
        return 0
    step = ckpt.get("step", 0) if isinstance(ckpt, dict) else 0
    return int(step) if isinstance(step, int) else 0


def _modes(requested: Sequence[str] | None, oracle: bool, default: Sequence[str]) -> tuple[str, ...]:
    """retrieval.modes, else the dataset's default (both unless its entry says otherwise); only "separate"
    for oracle descriptors."""
    if requested:
        modes = tuple(dict.fromkeys(requested))
        if oracle and "merged" in modes:
            raise ValueError("oracle descriptors live in one space per domain: a merged index is undefined "
                             "(use retrieval.modes=[separate])")
        return modes
    if oracle:
        logger.info("oracle embedding: each domain is searched in its own index only (separate)")
        return ("separate",)
    return tuple(default)


def _default_modes(spec: DatasetSpec | None) -> tuple[str, ...]:
    return tuple(spec.defaults.get("modes", MODES)) if spec is not None else MODES


def _plan_from_descriptors(cfg: DictConfig) -> Plan:
    data, protocol = cfg.data, cfg.retrieval
    features, meta = load_descriptors(cfg.model.descriptors)
    task = protocol.task or meta.get("task", "retrieval")
    split = data.split or ("val" if task == "knn" else "test")
    if data.pairs:
        pairs = parse_pairs(data.pairs)
    elif data.split or data.domains or not meta.get("pairs"):
        domains = list(data.domains or features)
        pairs = default_pairs(domains, split, {d: set(features.get(d, {})) for d in domains}, task)
    else:
        pairs = {domain: tuple(pair) for domain, pair in meta["pairs"].items()}
    metrics = parse_metrics(protocol.metrics or meta.get("metrics") or "uned")
    modes = _modes(protocol.modes, meta.get("embedding") == "oracle", _default_modes(DATASETS.get(meta.get("data"))))
    check_pairs(features, pairs, modes if task == "retrieval" else ())
    output_dir = cfg.run.output_dir or os.path.dirname(os.path.abspath(cfg.model.descriptors))
    return Plan(task=task, pairs=pairs, metrics=metrics, modes=modes, output_dir=output_dir, meta=meta,
                step=int(meta.get("step", 0)), features=features, paths=meta.get("paths", {}))


def _resolve_data_root(spec: DatasetSpec, root: str | None) -> str:
    """The dataset's folder: generated on first use for the demo (rank 0 writes it), else given and present."""
    if spec.generated:
        from unic.data.demo import ensure_demo_data

        root = root or spec.defaults["root"]
        if distributed.is_main_process():
            ensure_demo_data(root)
        distributed.barrier()
        return ensure_demo_data(root)
    if not root:
        raise ValueError(f"data.dataset={spec.name} needs data.root, a folder holding {spec.layout}")
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data.root not found: {root}")
    return root


def _model_source(source: str) -> str:
    if not is_named_model(source) and not os.path.isfile(os.path.expanduser(source)):
        hint = " (train one with: python main_unic.py)" if source == DEMO_CHECKPOINT else ""
        raise FileNotFoundError(f"checkpoint file not found: {source}{hint}")
    return source if is_named_model(source) else os.path.expanduser(source)


def _load_encoders(cfg: DictConfig, source: str, domains: list[str], device: torch.device) -> dict[str, Encoder]:
    try:
        return load_encoders(source, cfg.model.embedding, domains, cfg.model.weights, device)
    except (RuntimeError, OSError) as err:  # a UNIC file that does not fit its model (named models: ConfigError)
        raise ValueError(f"cannot load {source}: {err}") from err


def _output_dir(cfg: DictConfig, source: str, tag: str) -> str:
    """run.output_dir, else <checkpoint dir>/eval/<tag> (output/eval/<model>/<tag> for a named model)."""
    if cfg.run.output_dir:
        return cfg.run.output_dir
    if is_named_model(source):
        return os.path.join("output", "eval", safe_filename(source), tag)
    return os.path.join(os.path.dirname(os.path.abspath(source)), "eval", tag)


def _plan_from_images(cfg: DictConfig, device: torch.device) -> Plan:
    from unic.data.transforms import eval_transform, uned_eval_transform

    data, protocol = cfg.data, cfg.retrieval
    source = _model_source(cfg.model.source)
    spec = get_dataset(data.dataset, RETRIEVAL_KINDS)
    task = protocol.task or spec.protocol
    split = data.split or ("val" if task == "knn" else "test")
    root = _resolve_data_root(spec, data.root)
    name = data.name or spec.defaults.get("name") or os.path.basename(root.rstrip(os.sep))
    explicit = parse_pairs(data.pairs) if data.pairs else None
    encoders = _load_encoders(cfg, source, benchmark_domains(spec, root, data.domains, explicit, name), device)
    encoder = next(iter(encoders.values()))
    img_size = data.img_size or encoder.img_size
    crop_ratio = data.crop_ratio or spec.defaults["crop_ratio"]
    if spec.kind == "uned" and crop_ratio == 1.0:  # UnED: UDON's bilinear short-side resize, centre crop
        transform = uned_eval_transform(img_size, encoder.mean, encoder.std)
    else:
        transform = eval_transform(img_size, crop_ratio, encoder.mean, encoder.std)
    sets, pairs = image_sets(spec, root, split, transform, task, data.domains, explicit, name)

    oracle = cfg.model.embedding == "oracle"
    embedding = "oracle" if oracle else ("image" if encoder.kind == "open_clip" else encoder.kind)
    metrics = parse_metrics(protocol.metrics or spec.defaults.get("metrics", "uned"))
    modes = _modes(protocol.modes, oracle, _default_modes(spec))
    parts = [task, spec.name if spec.kind == "uned" else name] + ([] if spec.kind == "folder" else [split])
    output_dir = _output_dir(cfg, source, safe_filename("-".join(parts + [embedding])))
    meta = {"format": DESCRIPTOR_FORMAT, "version": 1, "source": source, "embedding": embedding,
            "data": spec.name, "root": root, "split": split, "task": task, "pairs": pairs, "metrics": list(metrics),
            "img_size": img_size, "crop_ratio": crop_ratio, "step": _checkpoint_step(source)}
    return Plan(task=task, pairs=pairs, metrics=metrics, modes=modes, output_dir=output_dir, meta=meta,
                step=meta["step"], encoders=encoders, sets=sets)


def prepare(cfg: DictConfig, device: torch.device) -> Plan:
    """Decide the whole evaluation of a validated :class:`RetrievalConfig`, checking every input; writes
    nothing. User errors: ``InputError``."""
    try:
        return _plan_from_descriptors(cfg) if cfg.model.descriptors else _plan_from_images(cfg, device)
    except InputError:
        raise
    except (ValueError, OSError) as err:
        raise InputError(str(err)) from err


def _extract(cfg: DictConfig, plan: Plan, device: torch.device) -> tuple[Features, dict[str, list[str]]]:
    """Descriptors of the plan's image sets (all ranks); rank 0 lists unreadable images and saves the file."""
    features, paths, unreadable = extract_descriptors(
        plan.encoders, plan.sets, device, cfg.data.batch_size_per_gpu, cfg.data.num_workers,
        distributed.autocast_dtype(cfg.run.precision, device),
    )
    plan.encoders = None  # frees the accelerator for the search
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not distributed.is_main_process():
        return features, paths
    if unreadable:
        bad = os.path.join(plan.output_dir, "bad_images.json")
        write_json(bad, {"count": len(unreadable), "files": sorted(unreadable)})
        logger.warning("%d unreadable images left out, listed in %s", len(unreadable), bad)
    descriptor_path = os.path.join(plan.output_dir, DESCRIPTOR_FILE)
    save_descriptors(descriptor_path, features, {**plan.meta, "paths": paths})
    logger.info("descriptors saved to %s (rerun the evaluation with model.descriptors=%s)",
                descriptor_path, descriptor_path)
    return features, paths


def _report(cfg: DictConfig, plan: Plan, results: dict, features: Features, paths: dict[str, list[str]]) -> None:
    """Rank 0: the table on stdout, results.json, TensorBoard scalars and the neighbour figures."""
    from unic.train.logger import MetricsWriter

    print(format_table(results), flush=True)
    write_json(os.path.join(plan.output_dir, "results.json"), results)
    writer = MetricsWriter(plan.output_dir)
    try:
        for section, per_domain in results.items():
            prefix = section if plan.task == "knn" else f"retrieval_{section}"
            writer.write(plan.step, {f"{d}/{m}": v for d, values in per_domain.items() for m, v in values.items()},
                         prefix=prefix)
    finally:
        writer.close()
    if cfg.retrieval.visualize:
        if plan.task != "retrieval":
            logger.warning("retrieval.visualize shows retrieval neighbours; ignored for kNN classification")
        else:
            for file in visualize_neighbors(features, plan.pairs, paths, plan.output_dir, cfg.retrieval.visualize,
                                            "merged" in plan.modes, cfg.run.seed):
                logger.info("neighbour figure: %s", file)
    logger.info("results written to %s", os.path.join(plan.output_dir, "results.json"))


def run(cfg: DictConfig, device: torch.device) -> dict:
    """Validate, extract (all ranks), save descriptors, evaluate and report (rank 0), next to the resolved
    config.yaml (``eval_config.yaml`` when evaluating saved descriptors, which keeps the extraction's). Returns the results on rank 0 (``{mode: {domain: {metric: value}}}`` or ``{"knn": ...}``)
    and ``{}`` on the other ranks."""
    from unic.train.logger import setup_logging

    setup_logging()
    plan = prepare(cfg, device)
    main_process = distributed.is_main_process()
    if main_process:  # a re-evaluation of saved descriptors keeps the extraction's config.yaml
        write_resolved_config(cfg, plan.output_dir, "eval_config.yaml" if cfg.model.descriptors else "config.yaml")
    setup_logging(plan.output_dir)
    logger.info("%s of %s: pairs %s -> %s", plan.task, plan.meta.get("source", cfg.model.descriptors), plan.pairs,
                plan.output_dir)
    features, paths = (plan.features, plan.paths) if plan.features is not None else _extract(cfg, plan, device)
    if not main_process:
        return {}
    protocol = cfg.retrieval
    if plan.task == "knn":
        results = {"knn": evaluate_knn(features, plan.pairs, protocol.knn_k, protocol.temperature, device)}
    else:
        results = evaluate_retrieval(features, plan.pairs, plan.modes, plan.metrics, protocol.chunk_size)
    _report(cfg, plan, results, features, paths)
    return results
