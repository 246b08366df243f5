"""Sample lists of the t-ReX transfer suite, read from each data set's official on-disk layout.

Every reader returns a :class:`TransferSplit` for ``trainval`` or ``test``: samples ``(path, [label], 0)`` ready
for :class:`unic.data.folders.ImageListDataset`, and the class names (label = position). The splits are the
ones of t-ReX (``naver/trex``, ``transfer/data``): train and val merged into trainval where a data set has both,
the official test split as test, and a seeded per-class split for EuroSAT, which has none.

``strict=True`` (the default) requires the class and sample counts of the official release, as t-ReX asserts,
and every listed file to exist; ``strict=False`` only warns, and drops listed files that are missing, so a
partial copy or a toy version of a layout can be evaluated.

A data set's layout text, official counts and reader are its entry in :mod:`unic.data.registry`
(``get_dataset(name, kinds=("transfer",))``): adding a transfer data set is one entry there plus its
``read_<name>(name, data_dir, split, options)`` here.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unic.data.folders import IMG_EXTENSIONS, scan_image_folder
from unic.data.registry import DatasetSpec, get_dataset

logger = logging.getLogger(__name__)

SPLITS = ("trainval", "test")
COG_LEVELS_FILE = "cog_levels_mapping_file.pkl"
COG_SPLIT_FILE = "cog_concepts_split_file.pkl"

Sample = tuple[str, list[int], int]


class DatasetError(ValueError):
    """The files on disk do not match the layout a reader expects."""


@dataclass
class TransferSplit:
    """One split: ``(path, [label], domain 0)`` samples and the class names, ``classes[label]``."""

    samples: list[Sample]
    classes: list[str]
    scanned: bool = False  # found by listing folders (every file exists), not read from a split file

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self) -> np.ndarray:
        return np.array([labels[0] for _, labels, _ in self.samples], dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _spec(name: str) -> DatasetSpec:
    """The registry entry of transfer data set ``name`` (a ValueError naming the closest one otherwise)."""
    return get_dataset(name, kinds=("transfer",), what="transfer data set")


def _layout(name: str) -> str:
    return _spec(name).layout


def _expect(name: str, data_dir: str, path: str, what: str) -> str:
    """``path`` if it exists, else a FileNotFoundError naming the missing file and the expected layout."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: {what} not found: {path} (data.root={data_dir}; expected {_layout(name)})")
    return path


def _find_root(data_dir: str, marker: str, subdirs: Sequence[str] = ()) -> str:
    """The first of ``data_dir`` and ``data_dir/<subdir>`` (torchvision's folder names) that holds ``marker``."""
    for candidate in [data_dir, *(os.path.join(data_dir, sub) for sub in subdirs)]:
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    return data_dir


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _loadmat(path: str) -> dict:
    from scipy.io import loadmat

    return loadmat(path, squeeze_me=True)


def _make(samples: list[tuple[str, int]], classes: Sequence[str], scanned: bool = False) -> TransferSplit:
    return TransferSplit([(path, [int(label)], 0) for path, label in samples], list(classes), scanned)


def _subfolders(path: str) -> list[str]:
    """The sorted names of the folders in ``path`` (class folders)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _class_folders(name: str, data_dir: str, folder: str) -> list[str]:
    return _subfolders(_expect(name, data_dir, os.path.join(data_dir, folder), f"split folder '{folder}'"))


def _folder_split(name: str, data_dir: str, folders: Sequence[str], classes: Sequence[str]) -> TransferSplit:
    """ImageFolder-layout sub-folders concatenated, labelled by position in ``classes`` (the trainval classes)."""
    index = {cls: i for i, cls in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for folder in folders:
        root = _expect(name, data_dir, os.path.join(data_dir, folder), f"split folder '{folder}'")
        folder_samples, folder_classes = scan_image_folder(root)
        unknown = sorted(set(folder_classes) - set(index))
        if unknown:
            raise DatasetError(
                f"{name}: class-count mismatch: {root} has {len(unknown)} class folder(s) absent from the trainval "
                f"split ({len(classes)} classes), e.g. {unknown[:5]}"
            )
        samples += [(path, index[folder_classes[labels[0]]]) for path, labels, _ in folder_samples]
    return _make(samples, classes, scanned=True)


# --------------------------------------------------------------------------------------------------------------
# Readers: (name, data_dir, split, options) -> TransferSplit
# --------------------------------------------------------------------------------------------------------------


def read_imagefolder(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    has = {sub: os.path.isdir(os.path.join(data_dir, sub)) for sub in ("trainval", "train", "val", "test")}
    if has["trainval"]:
        trainval = ["trainval"]
    else:
        trainval = ["train", "val"] if has["val"] and has["test"] else ["train"]
    classes = _class_folders(name, data_dir, trainval[0])
    if split == "trainval":
        return _folder_split(name, data_dir, trainval, classes)
    if not (has["test"] or has["val"]):
        raise FileNotFoundError(
            f"{name}: no test split: neither {data_dir}/test nor {data_dir}/val exists (expected {_layout(name)})"
        )
    return _folder_split(name, data_dir, ["test" if has["test"] else "val"], classes)


def read_in1k(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    classes = _class_folders(name, data_dir, "train")
    return _folder_split(name, data_dir, ["train" if split == "trainval" else "val"], classes)


def read_aircraft(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = os.path.join(_find_root(data_dir, "data/variants.txt", ["fgvc-aircraft-2013b"]), "data")
    classes = _read_lines(_expect(name, data_dir, os.path.join(root, "variants.txt"), "class list"))
    index = {cls: i for i, cls in enumerate(classes)}
    split_file = _expect(name, data_dir, os.path.join(root, f"images_variant_{split}.txt"), f"{split} split file")
    samples = []
    for line in _read_lines(split_file):
        image_id, variant = line.split(" ", 1)  # variant names contain spaces ("Cessna 172")
        if variant not in index:
            raise DatasetError(f"{name}: {split_file}: variant '{variant}' is not in variants.txt")
        samples.append((os.path.join(root, "images", f"{image_id}.jpg"), index[variant]))
    return _make(samples, classes)


def read_cars196(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    if os.path.isfile(os.path.join(data_dir, "cars_annos.mat")):  # original release: one file, a 'test' flag
        mat = _loadmat(os.path.join(data_dir, "cars_annos.mat"))
        annotations = np.atleast_1d(mat["annotations"])
        want_test = split == "test"
        samples = [
            (os.path.join(data_dir, str(ann["relative_im_path"])), int(ann["class"]) - 1)
            for ann in annotations
            if bool(int(ann["test"])) == want_test
        ]
        return _make(samples, [str(c) for c in np.atleast_1d(mat["class_names"])])
    root = _find_root(data_dir, "devkit/cars_meta.mat", ["stanford_cars"])
    classes = np.atleast_1d(_loadmat(_expect(name, data_dir, os.path.join(root, "devkit", "cars_meta.mat"),
                                             "cars_annos.mat (or devkit/cars_meta.mat)"))["class_names"])
    if split == "trainval":
        annos, images = os.path.join(root, "devkit", "cars_train_annos.mat"), os.path.join(root, "cars_train")
    else:
        annos, images = os.path.join(root, "cars_test_annos_withlabels.mat"), os.path.join(root, "cars_test")
    annotations = np.atleast_1d(_loadmat(_expect(name, data_dir, annos, f"{split} annotations"))["annotations"])
    samples = [(os.path.join(images, str(ann["fname"])), int(ann["class"]) - 1) for ann in annotations]
    return _make(samples, [str(c) for c in classes])


def read_dtd(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = _find_root(data_dir, "labels", ["dtd", os.path.join("dtd", "dtd")])
    images = _expect(name, data_dir, os.path.join(root, "images"), "image folder")
    classes = _subfolders(images)
    index = {cls: i for i, cls in enumerate(classes)}
    split_no = int(opts.get("split_no", 1))
    samples = []
    for part in ("train", "val") if split == "trainval" else ("test",):
        split_file = os.path.join(root, "labels", f"{part}{split_no}.txt")
        _expect(name, data_dir, split_file, f"{part} split file")
        for line in _read_lines(split_file):
            if line.split("/")[0] not in index:
                raise DatasetError(f"{name}: {split_file}: class '{line.split('/')[0]}' has no folder in {images}")
            samples.append((os.path.join(images, line), index[line.split("/")[0]]))
    return _make(samples, classes)


def read_eurosat(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = data_dir
    for sub in ("2750", os.path.join("eurosat", "2750")):
        if os.path.isdir(os.path.join(data_dir, sub)):
            root = os.path.join(data_dir, sub)
    classes = _subfolders(root)
    if not classes:
        raise FileNotFoundError(f"{name}: no class folder in {root} (expected {_layout(name)})")
    # No official split: t-ReX (after Feng et al. 2022) draws 810 test images per class (the registry's
    # test_per_class; 30 % for smaller classes) with a fixed seed, the rest (540 val + train) is trainval.
    test_per_class = _spec(name).defaults["test_per_class"]
    rng = np.random.RandomState(int(opts.get("split_seed", 0)))
    samples = []
    for label, cls in enumerate(classes):  # sorted, so the draws happen in a fixed order
        files = sorted(f for f in os.listdir(os.path.join(root, cls)) if f.lower().endswith(IMG_EXTENSIONS))
        order = rng.permutation(len(files))
        num_test = min(test_per_class, int(round(0.3 * len(files))))
        chosen = order[:num_test] if split == "test" else order[num_test:]
        samples += [(os.path.join(root, cls, files[i]), label) for i in sorted(chosen)]
    return _make(samples, classes)


def read_flowers(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = _find_root(data_dir, "setid.mat", ["flowers-102"])
    labels = np.atleast_1d(_loadmat(_expect(name, data_dir, os.path.join(root, "imagelabels.mat"), "labels"))["labels"])
    split_ids = _loadmat(_expect(name, data_dir, os.path.join(root, "setid.mat"), "split file"))
    keys = ("trnid", "valid") if split == "trainval" else ("tstid",)
    ids = np.concatenate([np.atleast_1d(split_ids[key]) for key in keys])
    classes = [f"{i:03d}" for i in range(1, int(labels.max()) + 1)]  # the release has class ids, no names
    samples = [(os.path.join(root, "jpg", f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1) for i in ids]
    return _make(samples, classes)


def read_pets(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = _find_root(data_dir, "annotations", ["oxford-iiit-pet"])
    _expect(name, data_dir, os.path.join(root, "annotations", f"{split}.txt"), f"{split} split file")
    samples, names = [], {}
    for part in SPLITS:  # breed names from both files, so the two splits share one class list
        path = os.path.join(root, "annotations", f"{part}.txt")
        if not os.path.isfile(path):
            continue
        for line in _read_lines(path):
            image, class_id = line.split()[:2]
            label = int(class_id) - 1
            names.setdefault(label, image.rsplit("_", 1)[0])  # "Abyssinian_100" -> "Abyssinian"
            if part == split:
                samples.append((os.path.join(root, "images", f"{image}.jpg"), label))
    classes = [names.get(i, str(i + 1)) for i in range(max(names) + 1)] if names else []
    return _make(samples, classes)


def read_food101(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    root = _find_root(data_dir, "meta", ["food-101"])
    images = _expect(name, data_dir, os.path.join(root, "images"), "image folder")
    classes_file = os.path.join(root, "meta", "classes.txt")
    if os.path.isfile(classes_file):
        classes = _read_lines(classes_file)
    else:
        classes = _subfolders(images)
    index = {cls: i for i, cls in enumerate(classes)}
    part = "train" if split == "trainval" else "test"
    split_file = _expect(name, data_dir, os.path.join(root, "meta", f"{part}.txt"), f"{part} split file")
    samples = []
    for line in _read_lines(split_file):
        cls = line.split("/")[0]
        if cls not in index:
            raise DatasetError(f"{name}: {split_file}: class '{cls}' is not in the class list")
        samples.append((os.path.join(images, f"{line}.jpg"), index[cls]))
    return _make(samples, classes)


def read_sun397(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    split_no = int(opts.get("split_no", 1))
    part = f"{'Training' if split == 'trainval' else 'Testing'}_{split_no:02d}.txt"
    lists = _find_root(data_dir, part, ["Partitions", "SUN397"])
    class_file = os.path.join(_find_root(data_dir, "ClassName.txt", ["Partitions", "SUN397"]), "ClassName.txt")
    classes = sorted(line.strip("/") for line in _read_lines(_expect(name, data_dir, class_file, "ClassName.txt")))
    index = {cls: i for i, cls in enumerate(classes)}
    images = os.path.join(data_dir, "SUN397") if os.path.isdir(os.path.join(data_dir, "SUN397")) else data_dir
    samples = []
    for line in _read_lines(_expect(name, data_dir, os.path.join(lists, part), f"{split} split file")):
        rel = line.strip("/")
        cls = rel.rsplit("/", 1)[0]
        if cls not in index:
            raise DatasetError(f"{name}: {part}: class '{cls}' is not in ClassName.txt")
        samples.append((os.path.join(images, rel), index[cls]))
    return _make(samples, classes)


def read_inat(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    year = name[len("inat"):]
    ann_file = os.path.join(data_dir, f"{'train' if split == 'trainval' else 'val'}{year}.json")
    _expect(name, data_dir, ann_file, f"{split} annotation file")
    with open(ann_file) as f:
        content = json.load(f)
    categories = sorted(content["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    label_of = {ann["image_id"]: index[ann["category_id"]] for ann in content["annotations"]}
    missing = [img["id"] for img in content["images"] if img["id"] not in label_of]
    if missing:
        raise DatasetError(f"{name}: {ann_file}: {len(missing)} image(s) without annotation, e.g. id {missing[0]}")
    samples = [(os.path.join(data_dir, img["file_name"]), label_of[img["id"]]) for img in content["images"]]
    return _make(samples, [str(c.get("name", c["id"])) for c in categories])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads the ImageNet-CoG pickles (lists, dicts and numpy string arrays) and refuses any other class, so a
    tampered file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")
        return super().find_class(module, name)


def _load_cog_pickle(path: str):
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise DatasetError(f"{path} is not an ImageNet-CoG file: {err}") from None


def read_cog(name: str, data_dir: str, split: str, opts: dict) -> TransferSplit:
    level = int(name[-1])
    levels_file = opts.get("cog_levels_mapping_file") or os.path.join(data_dir, COG_LEVELS_FILE)
    split_file = opts.get("cog_concepts_split_file") or os.path.join(data_dir, COG_SPLIT_FILE)
    levels = _load_cog_pickle(_expect(name, data_dir, levels_file, "CoG levels mapping file"))
    if len(levels) < level:
        raise DatasetError(f"{name}: {levels_file} holds {len(levels)} levels, expected 5")
    concepts = sorted(str(c) for c in levels[level - 1])
    images_per_concept = _load_cog_pickle(_expect(name, data_dir, split_file, "CoG concepts split file"))
    part = "train" if split == "trainval" else "test"
    samples = []
    for label, concept in enumerate(concepts):
        if concept not in images_per_concept:
            raise DatasetError(f"{name}: concept {concept} of level {level} is missing from {split_file}")
        for rel in sorted(str(p) for p in images_per_concept[concept][part]):
            samples.append((os.path.join(data_dir, rel.lstrip("/\\")), label))
    return _make(samples, concepts)


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _check_files(name: str, split: TransferSplit, split_name: str, strict: bool) -> TransferSplit:
    """Listed files that do not exist: an error when strict, else dropped with a warning. (Splits scanned from
    the folders on disk need no check.)"""
    if split.scanned:
        return split
    missing = [path for path, _, _ in split.samples if not os.path.isfile(path)]
    if not missing:
        return split
    message = f"{name} {split_name}: {len(missing)} of {len(split.samples)} listed image(s) missing, e.g. {missing[0]}"
    if strict:
        raise DatasetError(f"{message} (expected {_layout(name)}; data.allow_partial=true drops them)")
    logger.warning("%s: dropping them", message)
    missing_set = set(missing)
    return TransferSplit([s for s in split.samples if s[0] not in missing_set], split.classes)


def _check_counts(name: str, splits: dict[str, TransferSplit], strict: bool) -> None:
    counts = _spec(name).defaults.get("counts")  # (classes, trainval, test) of the official release
    if counts is None:
        return
    num_classes, *num_samples = counts
    problems = []
    if splits["trainval"].num_classes != num_classes:
        problems.append(f"{splits['trainval'].num_classes} classes instead of {num_classes}")
    for split_name, expected in zip(SPLITS, num_samples):
        if split_name in splits and len(splits[split_name].samples) != expected:
            problems.append(f"{len(splits[split_name].samples)} {split_name} images instead of {expected}")
    if not problems:
        return
    message = f"{name}: found {', '.join(problems)} of the official release"
    if strict:
        raise DatasetError(f"{message} (expected {_layout(name)}; data.allow_partial=true evaluates it anyway)")
    logger.warning(message)


def _read(name: str, data_dir: str, split: str, options: dict) -> TransferSplit:
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}', expected one of {SPLITS}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{name}: data.root {data_dir} is not a folder (expected {spec.layout})")
    result = spec.reader()(name, data_dir, split, options)
    labels = result.labels()
    if len(labels) and (labels.min() < 0 or labels.max() >= result.num_classes):
        raise DatasetError(f"{name} {split}: labels outside [0, {result.num_classes}) (class-count mismatch)")
    return result


def _check_nonempty(name: str, data_dir: str, split: str, result: TransferSplit) -> TransferSplit:
    if not result.samples:
        raise DatasetError(f"{name}: the {split} split of {data_dir} is empty (expected {_layout(name)})")
    return result


def load_split(name: str, data_dir: str, split: str, strict: bool = True, **options) -> TransferSplit:
    """One split (``trainval`` or ``test``) of data set ``name`` under ``data_dir``.

    ``options``: ``split_no`` (DTD / SUN397 partition, default 1), ``split_seed`` (EuroSAT split, default 0),
    ``cog_levels_mapping_file`` / ``cog_concepts_split_file`` (default: inside ``data_dir``).
    """
    result = _check_files(name, _read(name, data_dir, split, options), split, strict)
    return _check_nonempty(name, data_dir, split, result)


def load_splits(name: str, data_dir: str, strict: bool = True, **options) -> dict[str, TransferSplit]:
    """Both splits, checked against each other (same class list, every test class present in trainval) and,
    when ``strict``, against the official counts. Both split files are read before any image is looked for,
    so a missing split is reported as such."""
    raw = {split: _read(name, data_dir, split, options) for split in SPLITS}
    splits = {
        split: _check_nonempty(name, data_dir, split, _check_files(name, result, split, strict))
        for split, result in raw.items()
    }
    trainval, test = splits["trainval"], splits["test"]
    if trainval.classes != test.classes:
        raise DatasetError(
            f"{name}: class-count mismatch: trainval has {trainval.num_classes} classes, test {test.num_classes}"
        )
    absent = sorted(set(test.labels().tolist()) - set(trainval.labels().tolist()))
    if absent:
        names = [test.classes[i] for i in absent[:5]]
        raise DatasetError(f"{name}: {len(absent)} test class(es) have no trainval image, e.g. {names}")
    _check_counts(name, splits, strict)
    return splits
