"""The dataset registry: one entry per dataset name, read by training, retrieval, transfer and segmentation.

An entry (:class:`DatasetSpec`) says what the root folder holds (``layout``, shown in every layout error and
in ``--help``), which on-disk family reads it (``kind``), its splits, and its default evaluation protocol
(``protocol`` and ``defaults``: retrieval metrics and crop, the kNN splits, the transfer classifier, the
segmentation classes, the official counts). The builder of a kind is one function with one signature:

- ``uned`` (``root/info_files/<domain>/<split>.json`` + ``root/images``), ``folder`` and ``imagenet``:
  ``unic.eval.retrieval.image_sets(spec, root, split, transform, task, domains, pairs, name)`` for
  evaluation; training (``trainable`` entries) reads ``uned``, ``imagenet`` and ``csv`` through
  ``unic.train.build.build_datasets``;
- ``csv`` (``root/<split>.csv``, UniFEx's image lists): ``unic.data.csv_list.csv_dataset(root, split,
  domains, transform)``, training only;
- ``transfer``: ``reader(name, root, split, options) -> unic.data.transfer.TransferSplit``, the entry's
  ``builder`` (``"module:function"``, imported when used);
- ``ade20k``: ``unic.eval.semseg.ADE20KDataset(root, split, transform)``.

Adding a benchmark is one entry here (plus a test), or :func:`register` from a script; ``get_dataset``
answers an unknown name with the closest known one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

KINDS = ("uned", "folder", "imagenet", "csv", "wds", "transfer", "ade20k")
PROTOCOLS = ("retrieval", "knn", "transfer", "segmentation")

_UNED_LAYOUT = "root/info_files/<domain>/<split>.json and the images they list under root/images"
_COG_FILES = "cog_levels_mapping_file.pkl and cog_concepts_split_file.pkl"
_WDS_LAYOUT = ("root/index.json and the webdataset tar shards it lists (<key>.jpg|png|..., <key>.cls, <key>.json), "
               "written by scripts/write_shards.py from a uned, imagenet or csv split; validation and the kNN bank "
               "read the source folder the index names, when it is there")
_CSV_LAYOUT = ("root/<split>.csv with a header img_path,label[,domain] (UniFEx's m4d-35k_train.csv), the image "
               "paths relative to root")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # the on-disk family that reads it (KINDS)
    protocol: str  # the default evaluation protocol (PROTOCOLS)
    layout: str  # what the root folder holds
    splits: tuple[str, ...]  # the splits the protocol reads
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # protocol settings
    builder: str | None = None  # "module:function" of a transfer reader
    trainable: bool = False  # main_unic.py can train on it (data.dataset)
    generated: bool = False  # the data is generated on first use (the demo)

    def reader(self) -> Callable:
        """The entry's builder function (imported now)."""
        if self.builder is None:
            raise ValueError(f"dataset {self.name!r} has no reader of its own (kind {self.kind})")
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


def _transfer(name: str, layout: str, reader: str, counts: tuple[int, int, int] | None, **defaults) -> DatasetSpec:
    """A t-ReX transfer entry: trainval/test splits, logistic regression, the official (classes, trainval,
    test) counts that a strict read asserts."""
    return DatasetSpec(
        name, "transfer", "transfer", layout, ("trainval", "test"),
        {"clf_type": "logreg_sklearn", "counts": counts, **defaults}, f"unic.data.transfer:{reader}",
    )


_ENTRIES: list[DatasetSpec] = [
    # --- UnED layout: training (UDON / UNIC) and universal retrieval
    DatasetSpec("demo", "uned", "retrieval", f"generated on first use: {_UNED_LAYOUT}", ("train", "val", "test"),
                {"metrics": "uned", "crop_ratio": 1.0, "root": "~/.cache/unic/demo"}, trainable=True, generated=True),
    DatasetSpec("uned", "uned", "retrieval", _UNED_LAYOUT, ("train", "val", "test"),
                {"metrics": "uned", "crop_ratio": 1.0}, trainable=True),
    # --- folder retrieval benchmarks (SOP, CUB, Cars: leave-one-out; In-Shop: query/gallery)
    DatasetSpec("folder", "folder", "retrieval",
                "root/<class>/<image> (leave-one-out), or root/query/<class>/ + root/gallery/<class>/",
                ("test", "index"), {"metrics": "recall", "crop_ratio": 0.875, "modes": ("separate",)}),
    # --- ImageNet layout: distillation and weighted kNN (val queries, train bank)
    DatasetSpec("imagenet", "imagenet", "knn", "root/train/<class>/<image> and root/val/<class>/<image>",
                ("val", "train"), {"crop_ratio": 0.875, "bank_split": "train", "name": "imagenet"}, trainable=True),
    # --- image lists in CSV files: training (UniFEx's M4D-35k: data.train_split=m4d-35k_train)
    DatasetSpec("csv", "csv", "retrieval", _CSV_LAYOUT, ("train", "val"), {"crop_ratio": 1.0}, trainable=True),
    # --- webdataset tar shards of any of the above (training at cluster scale: unic.data.shards)
    DatasetSpec("wds", "wds", "retrieval", _WDS_LAYOUT, ("train",), trainable=True),
    # --- the t-ReX transfer suite (unic.data.transfer reads each official layout)
    _transfer("imagefolder", "D/train/<class>/<image> and D/test/<class>/<image>: trainval = D/trainval, or "
              "D/train (+ D/val when D/test exists); test = D/test, or D/val", "read_imagefolder", None),
    _transfer("in1k", "D/train/<wnid>/*.JPEG and D/val/<wnid>/*.JPEG (validation images sorted into class "
              "folders)", "read_in1k", (1000, 1_281_167, 50_000), clf_type="logreg_torch"),
    _transfer("aircraft", "FGVC-Aircraft 2013b: D/data/images/<id>.jpg, D/data/variants.txt and "
              "D/data/images_variant_{trainval,test}.txt", "read_aircraft", (100, 6667, 3333)),
    _transfer("cars196", "D/cars_annos.mat and D/car_ims/*.jpg (original release), or torchvision's layout "
              "D/devkit/{cars_meta,cars_train_annos}.mat, D/cars_test_annos_withlabels.mat, D/cars_train/, "
              "D/cars_test/", "read_cars196", (196, 8144, 8041)),
    _transfer("dtd", "D/images/<class>/*.jpg and D/labels/{train,val,test}<N>.txt (N = split_no, default 1)",
              "read_dtd", (47, 3760, 1880)),
    _transfer("eurosat", "EuroSAT RGB: D/<class>/*.jpg (10 classes, 27,000 images; D/2750/ is accepted too)",
              "read_eurosat", (10, 18_900, 8100), test_per_class=810),
    _transfer("flowers", "Oxford Flowers-102: D/jpg/image_<NNNNN>.jpg, D/imagelabels.mat and D/setid.mat",
              "read_flowers", (102, 2040, 6149)),
    _transfer("pets", "Oxford-IIIT Pets: D/images/*.jpg and D/annotations/{trainval,test}.txt", "read_pets",
              (37, 3680, 3669)),
    _transfer("food101", "D/images/<class>/*.jpg and D/meta/{train,test}.txt", "read_food101",
              (101, 75_750, 25_250)),
    _transfer("sun397", "D/SUN397/<letter>/<class>/*.jpg (SUN397.tar.gz) with ClassName.txt, Training_<NN>.txt "
              "and Testing_<NN>.txt (Partitions.zip) in D or D/Partitions (NN = split_no, default 01)",
              "read_sun397", (397, 19_850, 19_850)),
    _transfer("inat2018", "D/train2018.json and D/val2018.json with the image folders they reference, relative "
              "to D", "read_inat", (8142, 437_513, 24_426), clf_type="logreg_torch"),
    _transfer("inat2019", "D/train2019.json and D/val2019.json with the image folders they reference, relative "
              "to D", "read_inat", (1010, 265_213, 3030), clf_type="logreg_torch"),
    *(_transfer(f"cog_l{level}", f"D = the full ImageNet (IN-21K) root with D/<wnid>/*.JPEG, and the ImageNet-CoG "
                f"files {_COG_FILES} (github.com/naver/cog) in D or given explicitly", "read_cog", counts,
                clf_type="logreg_torch")
      for level, counts in zip(range(1, 6), [(1000, 1_118_804, 50_000), (1000, 1_115_788, 50_000),
                                             (1000, 1_095_203, 50_000), (1000, 1_107_128, 50_000),
                                             (1000, 1_091_654, 50_000)])),
    # --- dense: ADE20K linear segmentation (DINOv2 / UNIC protocol)
    DatasetSpec("ade20k", "ade20k", "segmentation",
                "ADEChallengeData2016: root/images/{training,validation}/*.jpg and "
                "root/annotations/{training,validation}/*.png", ("training", "validation"),
                {"num_classes": 150, "ignore_index": 255, "reduce_zero_label": True}),
]
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _ENTRIES}
assert len(DATASETS) == len(_ENTRIES), "a dataset name is registered twice"
assert all(spec.kind in KINDS and spec.protocol in PROTOCOLS for spec in _ENTRIES)


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add an entry (a benchmark of one's own, from a script or a notebook); a taken name is an error."""
    if spec.kind not in KINDS or spec.protocol not in PROTOCOLS:
        raise ValueError(f"dataset {spec.name!r}: kind must be one of {KINDS} and protocol one of {PROTOCOLS}")
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered already")
    _ENTRIES.append(spec)
    DATASETS[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(*specs: DatasetSpec) -> Iterator[None]:
    """Entries that exist only inside the ``with`` block (tests)."""
    for spec in specs:
        register(spec)
    try:
        yield
    finally:
        for spec in specs:
            _ENTRIES.remove(spec)
            del DATASETS[spec.name]


def dataset_names(protocol: str | None = None, kind: str | None = None, trainable: bool | None = None) -> list[str]:
    """The registered names, optionally only those of one default protocol, kind or trainability."""
    return [spec.name for spec in _ENTRIES if (protocol is None or spec.protocol == protocol)
            and (kind is None or spec.kind == kind) and (trainable is None or spec.trainable == trainable)]


def get_dataset(name: str, kinds: tuple[str, ...] | None = None, what: str = "dataset") -> DatasetSpec:
    """The entry of ``name``; a ValueError with the closest known name (among ``kinds`` when given)."""
    allowed = [spec.name for spec in _ENTRIES if kinds is None or spec.kind in kinds]
    if name not in allowed:
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint} (known: {', '.join(allowed)})")
    return DATASETS[name]
