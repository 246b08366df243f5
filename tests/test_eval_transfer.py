"""Transfer evaluation end to end: t-ReX layouts, feature extraction (1 and 2 processes), classifier CLI.

The classifier itself (separable / random labels / sklearn vs torch / stratified split) is tested in
test_transfer_clf.py; here the command lines (``key=value`` over unic.eval.transfer_config's schemas), the
files they write and the data-set readers of unic.data.transfer (one registry entry each).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import yaml

from eval_transfer import main_clf, main_ft_extract, print_results
from tests.conftest import run_entry
from unic.config import load_config
from unic.data.registry import dataset_names, get_dataset
from unic.data.transfer import DatasetError, load_split, load_splits
from unic.data.transforms import eval_transform
from unic.eval.encoders import load_encoder
from unic.eval.transfer import token_encoder
from unic.eval.transfer_config import ClfConfig, ExtractConfig

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
CLASS_COLORS = [(220, 40, 40), (40, 200, 60), (50, 50, 220)]


def write_tiny_student(path, depth: int = 2, seed: int = 0) -> str:
    """An exported UNIC student (the ``student.pth`` format) of a tiny random ViT: 32 px, patch 8, dim 32."""
    from unic.models.student import build_student

    torch.manual_seed(seed)
    kwargs = {**TINY_VIT, "depth": depth}
    model = build_student("vit_small_patch16_224", 32, 0.0, kwargs)
    torch.save({"format": "unic-student", "version": 1, "state_dict": model.state_dict(),
                "arch": "vit_small_patch16_224", "model_kwargs": kwargs, "img_size": 32}, path)
    return str(path)


def write_image(path, color=(128, 128, 128), size=(36, 40), seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    pixels = np.clip(np.array(color)[None, None] + rng.randint(-40, 41, (*size, 3)), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_image_folder(root, splits: dict[str, int], classes=("red", "green", "blue")) -> None:
    """root/<split>/<class>/<i>.png, one colour per class, ``splits[split]`` images per class."""
    for split, per_class in splits.items():
        for label, name in enumerate(classes):
            for i in range(per_class):
                seed = 100 * label + i + (50 if split == "test" else 0)
                write_image(root / split / name / f"{i}.png", CLASS_COLORS[label % 3], seed=seed)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> str:
    return write_tiny_student(tmp_path_factory.mktemp("model") / "student.pth")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_image_folder(root, {"train": 10, "test": 5})
    return root


# --------------------------------------------------------------------------------------------------------------
# Extraction and classifier command lines
# --------------------------------------------------------------------------------------------------------------


def test_extract_then_classify_end_to_end(student, folder, tmp_path, capsys):
    features_dir = tmp_path / "features"
    argv = [f"model.source={student}", "data.dataset=imagefolder", f"data.root={folder}",
            f"run.output_dir={features_dir}", "data.num_workers=0", "data.batch_size_per_gpu=8"]
    assert main_ft_extract.main(argv) == 0

    trainval = torch.load(features_dir / "features_trainval.pth", weights_only=True)
    test = torch.load(features_dir / "features_test.pth", weights_only=True)
    assert set(trainval) == {"X", "Y"} and set(test) == {"X", "Y"}
    assert trainval["X"].shape == (30, 32) and trainval["X"].dtype == torch.float32
    assert test["X"].shape == (15, 32) and test["Y"].dtype == torch.int64
    assert trainval["Y"].tolist() == [0] * 10 + [1] * 10 + [2] * 10  # dataset order, classes sorted by name
    assert test["Y"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    info = json.loads((features_dir / "extract_info.json").read_text())
    assert info["classes"] == ["blue", "green", "red"] and info["token_type"] == "cls"
    assert info["crop_ratio"] == 1.0 and info["image_size"] == 32 and info["precision"] == "fp32"
    assert info["splits"]["test"] == {"num_images": 15, "dim": 32, "skipped_images": 0,
                                      "seconds": info["splits"]["test"]["seconds"]}
    # the resolved config, with the values found at run time, is written next to the features
    written = yaml.safe_load((features_dir / "extract_config.yaml").read_text())
    assert written["run"]["output_dir"] == str(features_dir) and written["data"]["img_size"] == 32
    assert written["run"]["precision"] == "fp32" and written["data"]["batch_size_per_gpu"] == 8

    # The stored row is the encoder's descriptor of the t-ReX centre crop of that image.
    encoder = load_encoder(student, "backbone")
    first = sorted((folder / "test" / "blue").iterdir())[0]
    image = eval_transform(32, 1.0, encoder.mean, encoder.std)(Image.open(first).convert("RGB"))
    with torch.no_grad():
        assert torch.allclose(encoder(image[None])[0], test["X"][0], atol=1e-5)

    clf_argv = [f"clf.features_dir={features_dir}", "clf.n_trials=3"]
    assert main_clf.main(clf_argv) == 0
    results = json.loads((features_dir / "results.json").read_text())
    assert {"top1", "mean_per_class_acc", "best_params", "clf_type", "features_norm"} <= set(results)
    assert results["clf_type"] == "logreg_sklearn" and results["features_norm"] == "none"
    assert set(results["best_params"]) == {"C"}
    assert results["dataset"] == "imagefolder" and results["num_train"] == 30 and results["num_test"] == 15
    assert results["top1"] >= 0.9  # colours separate the classes even for a random ViT
    assert 0.0 <= results["mean_per_class_acc"] <= 1.0
    assert results["seed"] == 22 and results["n_trials"] == 3 and len(results["trials"]) == 3
    assert results["holdout_rule"] == "t-ReX" and results["num_holdout"] == 6  # int(0.2 * 10) per class
    assert results["sklearn_backend"].startswith(("sklearn", "daal4py"))

    # Same seed, same numbers; the torch classifier writes where it is told.
    assert main_clf.main(clf_argv) == 0
    again = json.loads((features_dir / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in results.items() if k != "seconds"}
    assert yaml.safe_load((features_dir / "clf_config.yaml").read_text())["run"]["output_dir"] == str(features_dir)
    torch_dir = tmp_path / "torch"
    assert main_clf.main(clf_argv + ["clf.clf_type=logreg_torch", "clf.torch_epochs=10",
                                     f"run.output_dir={torch_dir}"]) == 0
    torch_out = torch_dir / "results.json"
    torch_results = json.loads(torch_out.read_text())
    assert torch_results["features_norm"] == "l2" and set(torch_results["best_params"]) == {"lr", "wd"}
    assert yaml.safe_load((torch_dir / "clf_config.yaml").read_text())["clf"]["clf_type"] == "logreg_torch"

    assert print_results.main([str(features_dir), str(torch_out)]) == 0
    table = capsys.readouterr().out
    assert "| imagefolder | logreg_sklearn | none |" in table and "**mean (2)**" in table


def test_command_line_defaults_are_unics():
    """naver/unic eval_transfer/main_clf.py and main_ft_extract.py defaults (the classifier's own are tested in
    test_transfer_clf.py)."""
    cfg = load_config(None, ["clf.features_dir=F"], ClfConfig)
    clf = cfg.clf
    assert (cfg.run.seed, clf.n_trials, clf.holdout_fraction, clf.holdout_fixed_fraction) == (22, None, 0.2, False)
    assert (clf.sklearn_max_iter, clf.torch_epochs, clf.torch_batch_size) == (2000, 100, 1024)
    assert clf.clf_type == "logreg_sklearn" and clf.features_norm is None  # none / l2 by classifier
    assert cfg.run.output_dir is None and cfg.run.device == "auto"  # results next to the features
    ext = load_config(None, ["model.source=p", "data.dataset=imagefolder", "data.root=D"], ExtractConfig)
    assert (ext.run.precision, ext.features.token_type, ext.data.batch_size_per_gpu, ext.data.crop_ratio) == \
        ("fp32", "cls", 128, 1.0)
    assert (ext.model.embedding, ext.data.img_size, ext.data.split_no, ext.data.allow_partial) == \
        ("backbone", None, 1, False)


@pytest.mark.parametrize("entry, keys", [
    (main_ft_extract, ["model.source = null", "data.root = null", "run.precision = fp32", "features.token_type = cls"]),
    (main_clf, ["clf.features_dir = null", "clf.clf_type = logreg_sklearn", "run.seed = 22", "run.output_dir = null"]),
])
def test_help_lists_keys_and_an_example(entry, keys, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"    {key}" in text for key in keys)
    assert f"eval_transfer/{entry.__name__.rsplit('.', 1)[-1]}.py " in text.split("example:")[1]
    if entry is main_ft_extract:  # every transfer data set's layout, from the registry
        assert get_dataset("pets").layout in text and "cog_l1..l5" in text


@pytest.mark.parametrize("token_type, dim_factor", [("cls", 1), ("patch", 1), ("both", 2)])
def test_token_types(student, token_type, dim_factor):
    encoder = load_encoder(student, "backbone")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = token_encoder(encoder, token_type)(images)
        cls = encoder(images)
        patch_mean = encoder.patch_features(images, 1).mean(dim=(2, 3))
        # The final-normed patch tokens, straight from the ViT: the mean covers the 4 x 4 grid, not the cls token.
        tokens = encoder.backbone.forward_features(images)
    assert features.shape == (3, 32 * dim_factor)
    assert torch.allclose(patch_mean, tokens[:, 1:].mean(dim=1), atol=1e-5)
    expected = {"cls": cls, "patch": patch_mean, "both": torch.cat([cls, patch_mean], dim=1)}[token_type]
    assert torch.allclose(features, expected, atol=1e-6)
    with pytest.raises(ValueError, match="token_type"):
        token_encoder(encoder, "register")
    # one pass through the backbone per batch, whatever the token type
    calls = []
    hook = encoder.backbone.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        token_encoder(encoder, token_type)(images)
    hook.remove()
    assert len(calls) == 1


def test_distributed_extraction_matches_single_process(student, folder, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    common = [f"model.source={student}", "data.dataset=imagefolder", f"data.root={folder}", "data.num_workers=0",
              "data.batch_size_per_gpu=4", "features.token_type=both"]
    assert main_ft_extract.main(common + [f"run.output_dir={single}"]) == 0
    result = run_entry(["eval_transfer/main_ft_extract.py", *common, f"run.output_dir={double}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("trainval", "test"):
        a = torch.load(single / f"features_{split}.pth", weights_only=True)
        b = torch.load(double / f"features_{split}.pth", weights_only=True)
        assert a["X"].shape[1] == 64  # cls + patch mean
        assert torch.equal(a["Y"], b["Y"])
        assert torch.allclose(a["X"], b["X"], atol=1e-5)
    assert json.loads((double / "extract_info.json").read_text())["world_size"] == 2


def test_unreadable_images_are_skipped_and_counted(student, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, {"train": 3, "test": 2})
    (data / "train" / "green" / "1.png").write_bytes(b"not an image")
    out = tmp_path / "features"
    argv = [f"model.source={student}", "data.dataset=imagefolder", f"data.root={data}", f"run.output_dir={out}",
            "data.num_workers=0"]
    assert main_ft_extract.main(argv) == 0
    trainval = torch.load(out / "features_trainval.pth", weights_only=True)
    assert trainval["Y"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # the broken row is dropped, not duplicated
    info = json.loads((out / "extract_info.json").read_text())["splits"]["trainval"]
    assert info["skipped_images"] == 1 and info["num_images"] == 8


def test_user_errors_exit_2_before_writing(student, folder, tmp_path, capsys):
    out = tmp_path / "never"
    base = [f"model.source={student}", f"run.output_dir={out}", "data.num_workers=0"]

    empty = tmp_path / "only_train"
    write_image_folder(empty, {"train": 2})
    assert main_ft_extract.main(base + ["data.dataset=imagefolder", f"data.root={empty}"]) == 2
    assert "no test split" in capsys.readouterr().err

    pets = tmp_path / "pets"
    (pets / "annotations").mkdir(parents=True)
    (pets / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\n")
    assert main_ft_extract.main(base + ["data.dataset=pets", f"data.root={pets}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pets: test split file not found") and "annotations/test.txt" in err

    mismatch = tmp_path / "mismatch"
    write_image_folder(mismatch, {"train": 2}, classes=("a", "b"))
    write_image_folder(mismatch, {"test": 2}, classes=("a", "c"))
    assert main_ft_extract.main(base + ["data.dataset=imagefolder", f"data.root={mismatch}"]) == 2
    assert "class-count mismatch" in capsys.readouterr().err

    good = ["data.dataset=imagefolder", f"data.root={folder}"]
    assert main_ft_extract.main(base + good + [f"model.source={tmp_path / 'missing.pth'}"]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err

    # Bad settings, named by their key (the closest data set or key suggested).
    for override, message in (("data.dataset=airkraft", "did you mean 'aircraft'"),
                              ("data.crop_ratio=1.5", "'data.crop_ratio'"), ("data.split_no=11", "'data.split_no'"),
                              ("features.token_type=register", "'features.token_type'"),
                              ("data.image_size=64", "did you mean 'data.img_size'"),
                              ("model.source=null", "model.source is required")):
        assert main_ft_extract.main(base + good + [override]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        assert main_ft_extract.main(base + good + ["run.device=cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()

    # Classifier: missing features, and a test class that trainval lacks.
    assert main_clf.main([f"clf.features_dir={tmp_path / 'nothing'}"]) == 2
    assert "features_trainval.pth" in capsys.readouterr().err
    assert main_clf.main([]) == 2
    assert "clf.features_dir is required" in capsys.readouterr().err
    for override, message in (("clf.holdout_fraction=1.0", "'clf.holdout_fraction'"),
                              ("clf.clf_type=svm", "'clf.clf_type'"), ("clf.features_norm=l1", "'clf.features_norm'"),
                              ("clf.torch_epochs=0", "'clf.torch_epochs'"), ("run.precision=bf16", "'run.precision'"),
                              ("features_dir=F", "did you mean 'clf.features_dir'")):
        assert main_clf.main([f"clf.features_dir={tmp_path}", override]) == 2
        assert message in capsys.readouterr().err
    feats = tmp_path / "feats"
    feats.mkdir()
    torch.save({"X": torch.randn(6, 4), "Y": torch.tensor([0, 0, 0, 1, 1, 1])}, feats / "features_trainval.pth")
    torch.save({"X": torch.randn(3, 4), "Y": torch.tensor([0, 1, 2])}, feats / "features_test.pth")
    assert main_clf.main([f"clf.features_dir={feats}", "clf.n_trials=1"]) == 2
    assert "class-count mismatch" in capsys.readouterr().err
    assert not (feats / "results.json").exists()


# --------------------------------------------------------------------------------------------------------------
# t-ReX layouts: each reader on a tiny copy of its official layout
# --------------------------------------------------------------------------------------------------------------


def _touch(root, *relpaths) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # the readers only list files; extraction would decode them


def _lines(path, *lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _savemat(path, **arrays) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, arrays)


def _struct(rows: list[dict]) -> np.ndarray:
    """A MATLAB struct array (1, N) as scipy writes and reads it."""
    names = list(rows[0])
    array = np.zeros((1, len(rows)), dtype=[(n, "O") for n in names])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row[n] for n in names)
    return array


def _cells(values) -> np.ndarray:
    cells = np.empty((1, len(values)), dtype=object)
    cells[0, :] = values
    return cells


def layout_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"  # torchvision's folder name is found too
    _lines(data / "variants.txt", "707-320", "Cessna 172", "F/A-18")
    _lines(data / "images_variant_trainval.txt", "0000001 707-320", "0000002 Cessna 172", "0000003 F/A-18",
           "0000004 Cessna 172")
    _lines(data / "images_variant_test.txt", "0000005 F/A-18", "0000006 707-320")
    _touch(data / "images", *(f"000000{i}.jpg" for i in range(1, 7)))
    return ["707-320", "Cessna 172", "F/A-18"], [0, 1, 2, 1], [2, 0], "data/images/0000006.jpg"


def layout_cars196(root):
    rows = [("car_ims/000001.jpg", 2, 0), ("car_ims/000002.jpg", 1, 1), ("car_ims/000003.jpg", 1, 0),
            ("car_ims/000004.jpg", 2, 1)]
    _savemat(root / "cars_annos.mat", class_names=_cells(["AM General Hummer", "Acura RL"]), annotations=_struct(
        [{"relative_im_path": p, "bbox_x1": 1, "class": np.array([[c]], np.uint8), "test": np.array([[t]], np.uint8)}
         for p, c, t in rows]))
    _touch(root, *(p for p, _, _ in rows))
    return ["AM General Hummer", "Acura RL"], [1, 0], [0, 1], "car_ims/000004.jpg"


def layout_cars196_torchvision(root):
    base = root / "stanford_cars"
    _savemat(base / "devkit" / "cars_meta.mat", class_names=_cells(["A", "B"]))
    _savemat(base / "devkit" / "cars_train_annos.mat", annotations=_struct(
        [{"fname": "00001.jpg", "class": 1}, {"fname": "00002.jpg", "class": 2}]))
    _savemat(base / "cars_test_annos_withlabels.mat", annotations=_struct([{"fname": "00001.jpg", "class": 2}]))
    _touch(base, "cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg")
    return ["A", "B"], [0, 1], [1], "cars_test/00001.jpg"


def layout_dtd(root):
    base = root / "dtd"
    _touch(base / "images", "banded/b1.jpg", "banded/b2.jpg", "dotted/d1.jpg", "dotted/d2.jpg", "dotted/d3.jpg")
    _lines(base / "labels" / "train1.txt", "banded/b1.jpg", "dotted/d1.jpg")
    _lines(base / "labels" / "val1.txt", "dotted/d2.jpg")
    _lines(base / "labels" / "test1.txt", "banded/b2.jpg", "dotted/d3.jpg")
    return ["banded", "dotted"], [0, 1, 1], [0, 1], "images/dotted/d3.jpg"


def layout_eurosat(root):
    _touch(root / "2750", *(f"{cls}/{cls}_{i}.jpg" for cls in ("Forest", "River") for i in range(10)))
    return ["Forest", "River"], [0] * 7 + [1] * 7, [0] * 3 + [1] * 3, None


def layout_flowers(root):
    _savemat(root / "imagelabels.mat", labels=np.array([[1, 2, 1, 2, 3, 3]]))
    _savemat(root / "setid.mat", trnid=np.array([[1, 2]]), valid=np.array([[5]]), tstid=np.array([[3, 4, 6]]))
    _touch(root / "jpg", *(f"image_{i:05d}.jpg" for i in range(1, 7)))
    return ["001", "002", "003"], [0, 1, 2], [0, 1, 2], "jpg/image_00006.jpg"


def layout_pets(root):
    _lines(root / "annotations" / "trainval.txt", "#Image CLASS-ID SPECIES BREED ID", "Abyssinian_1 1 1 1",
           "american_bulldog_2 2 2 1", "Abyssinian_5 1 1 1")
    _lines(root / "annotations" / "test.txt", "american_bulldog_3 2 2 1", "Abyssinian_4 1 1 1")
    _touch(root / "images", *(f"{n}.jpg" for n in ("Abyssinian_1", "american_bulldog_2", "Abyssinian_5",
                                                   "american_bulldog_3", "Abyssinian_4")))
    return ["Abyssinian", "american_bulldog"], [0, 1, 0], [1, 0], "images/Abyssinian_4.jpg"


def layout_food101(root):
    base = root / "food-101"
    _lines(base / "meta" / "classes.txt", "apple_pie", "waffles")
    _lines(base / "meta" / "train.txt", "waffles/11", "apple_pie/12")
    _lines(base / "meta" / "test.txt", "apple_pie/13")
    _touch(base / "images", "waffles/11.jpg", "apple_pie/12.jpg", "apple_pie/13.jpg")
    return ["apple_pie", "waffles"], [1, 0], [0], "images/apple_pie/13.jpg"


def layout_sun397(root):
    _lines(root / "ClassName.txt", "/b/bakery/shop", "/a/abbey")  # nested class names, listed unsorted
    _lines(root / "Training_01.txt", "/a/abbey/sun_a.jpg", "/b/bakery/shop/sun_b.jpg")
    _lines(root / "Testing_01.txt", "/b/bakery/shop/sun_c.jpg")
    _touch(root / "SUN397", "a/abbey/sun_a.jpg", "b/bakery/shop/sun_b.jpg", "b/bakery/shop/sun_c.jpg")
    return ["a/abbey", "b/bakery/shop"], [0, 1], [1], "SUN397/b/bakery/shop/sun_c.jpg"


def layout_inat2018(root):
    categories = [{"id": 7, "name": "Rosa"}, {"id": 3, "name": "Quercus"}]
    train = {"images": [{"id": 10, "file_name": "train_val2018/Plantae/7/a.jpg"},
                        {"id": 11, "file_name": "train_val2018/Plantae/3/b.jpg"}],
             "annotations": [{"image_id": 11, "category_id": 3}, {"image_id": 10, "category_id": 7}],
             "categories": categories}
    val = {"images": [{"id": 20, "file_name": "train_val2018/Plantae/3/c.jpg"}],
           "annotations": [{"image_id": 20, "category_id": 3}], "categories": categories}
    (root / "train2018.json").write_text(json.dumps(train))
    (root / "val2018.json").write_text(json.dumps(val))
    _touch(root, "train_val2018/Plantae/7/a.jpg", "train_val2018/Plantae/3/b.jpg", "train_val2018/Plantae/3/c.jpg")
    return ["Quercus", "Rosa"], [1, 0], [0], "train_val2018/Plantae/3/c.jpg"


def layout_cog_l2(root):
    levels = [["n00000001"], ["n00000003", "n00000002"], [], [], []]
    split = {wnid: {"train": np.array([f"/{wnid}/{wnid}_1.JPEG", f"/{wnid}/{wnid}_0.JPEG"]),
                    "test": np.array([f"{wnid}/{wnid}_9.JPEG"])} for wnid in ("n00000001", "n00000002", "n00000003")}
    with open(root / "cog_levels_mapping_file.pkl", "wb") as f:
        pickle.dump(levels, f)
    with open(root / "cog_concepts_split_file.pkl", "wb") as f:
        pickle.dump(split, f)
    _touch(root, *(f"{w}/{w}_{i}.JPEG" for w in split for i in (0, 1, 9)))
    return ["n00000002", "n00000003"], [0, 0, 1, 1], [0, 1], "n00000003/n00000003_9.JPEG"


def layout_in1k(root):
    _touch(root, "train/n01/a.JPEG", "train/n01/b.JPEG", "train/n02/c.JPEG", "val/n02/d.JPEG", "val/n01/e.JPEG")
    return ["n01", "n02"], [0, 0, 1], [0, 1], "val/n02/d.JPEG"


def layout_imagefolder(root):  # train + val form trainval when a test split exists
    _touch(root, "train/cat/1.png", "train/dog/2.png", "val/dog/3.png", "test/dog/4.png")
    return ["cat", "dog"], [0, 1, 1], [1], "test/dog/4.png"


LAYOUT_BUILDERS = {
    "aircraft": layout_aircraft, "cars196": layout_cars196, "cars196_torchvision": layout_cars196_torchvision,
    "dtd": layout_dtd, "eurosat": layout_eurosat, "flowers": layout_flowers, "pets": layout_pets,
    "food101": layout_food101, "sun397": layout_sun397, "inat2018": layout_inat2018, "cog_l2": layout_cog_l2,
    "in1k": layout_in1k, "imagefolder": layout_imagefolder,
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_BUILDERS))
def test_trex_layouts(layout, tmp_path):
    classes, trainval_labels, test_labels, test_path = LAYOUT_BUILDERS[layout](tmp_path)
    name = layout.split("_torchvision")[0]
    splits = load_splits(name, str(tmp_path), strict=False)
    for split, expected in (("trainval", trainval_labels), ("test", test_labels)):
        assert splits[split].classes == classes
        if name == "eurosat":  # a seeded draw: check the per-class counts
            assert sorted(splits[split].labels().tolist()) == expected
        else:
            assert splits[split].labels().tolist() == expected
        assert all(domain == 0 and len(labels) == 1 for _, labels, domain in splits[split].samples)
    if test_path is not None:
        assert splits["test"].samples[-1][0].replace(os.sep, "/").endswith(test_path)
    # The official counts are enforced by default.
    if name not in ("imagefolder",):
        with pytest.raises(DatasetError, match="official release"):
            load_splits(name, str(tmp_path))


def test_eurosat_split_is_fixed_and_disjoint(tmp_path):
    layout_eurosat(tmp_path)
    first = load_splits("eurosat", str(tmp_path), strict=False)
    again = load_splits("eurosat", str(tmp_path), strict=False)
    paths = {split: [p for p, _, _ in first[split].samples] for split in first}
    assert paths["test"] == [p for p, _, _ in again["test"].samples]
    assert not set(paths["test"]) & set(paths["trainval"])
    assert len(paths["test"]) + len(paths["trainval"]) == 20


def test_missing_listed_images_are_errors_unless_partial(tmp_path):
    layout_dtd(tmp_path)
    os.remove(tmp_path / "dtd" / "images" / "dotted" / "d3.jpg")
    with pytest.raises(DatasetError, match="1 of 2 listed image"):
        load_split("dtd", str(tmp_path), "test")
    partial = load_split("dtd", str(tmp_path), "test", strict=False)
    assert partial.labels().tolist() == [0]


def test_unknown_data_set_names_the_closest(tmp_path):
    with pytest.raises(ValueError, match="unknown transfer data set 'airkraft'; did you mean 'aircraft'"):
        load_splits("airkraft", str(tmp_path))
    with pytest.raises(ValueError, match="did you mean 'sun397'"):
        load_split("sun379", str(tmp_path), "test")


def test_every_registry_reader_is_public_and_has_a_layout_test():
    """Each transfer entry's builder resolves to a public read_* function of unic.data.transfer, and every
    such reader is exercised by a layout above (a new reader without its test fails here)."""
    readers = {name: get_dataset(name).reader() for name in dataset_names(kind="transfer")}
    assert all(f.__module__ == "unic.data.transfer" and f.__name__.startswith("read_") for f in readers.values())
    tested = {readers[layout.split("_torchvision")[0]] for layout in LAYOUT_BUILDERS}
    assert tested == set(readers.values())


def read_toy(name: str, data_dir: str, split: str, options: dict):
    """A reader written outside unic.data.transfer: trainval = D/a, test = D/b (one class)."""
    from unic.data.transfer import TransferSplit

    folder = os.path.join(data_dir, "a" if split == "trainval" else "b")
    return TransferSplit([(os.path.join(folder, f), [0], 0) for f in sorted(os.listdir(folder))], ["only"])


def test_a_new_data_set_is_one_registry_entry(tmp_path):
    from unic.data import registry

    spec = dataclasses.replace(get_dataset("pets"), name="toy", layout="D/a/*.jpg and D/b/*.jpg",
                               defaults={"clf_type": "logreg_sklearn", "counts": (1, 2, 1)},
                               builder="tests.test_eval_transfer:read_toy")
    with registry.registered(spec):
        _touch(tmp_path, "a/1.jpg", "a/2.jpg", "b/3.jpg")
        splits = load_splits("toy", str(tmp_path))  # the official counts (1 class, 2 + 1 images) hold
        assert [len(splits[s].samples) for s in ("trainval", "test")] == [2, 1] and splits["test"].classes == ["only"]
        os.remove(tmp_path / "b" / "3.jpg")
        _touch(tmp_path, "b/4.jpg", "b/5.jpg")
        with pytest.raises(DatasetError, match=r"2 test images instead of 1 .*expected D/a/\*.jpg and D/b"):
            load_splits("toy", str(tmp_path))
        assert load_config(None, ["model.source=p", "data.dataset=toy", "data.root=D"], ExtractConfig).data.dataset == "toy"


def test_cog_files_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    layout_cog_l2(tmp_path)
    with open(tmp_path / "cog_levels_mapping_file.pkl", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(DatasetError, match="refusing"):
        load_split("cog_l1", str(tmp_path), "test", strict=False)


def test_token_types_on_a_timm_cnn_baseline():
    """timm CNNs have feature maps, not tokens: cls/patch/both still work (the map's mean as patch feature)."""
    import timm

    from unic.eval.encoders import Encoder

    encoder = Encoder(timm.create_model("resnet18", pretrained=False, num_classes=0), "backbone", 32, name="resnet18")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls, both = token_encoder(encoder, "cls")(images), token_encoder(encoder, "both")(images)
        patch = encoder.patch_features(images, 1).mean(dim=(2, 3))
    assert both.shape == (2, 1024)
    torch.testing.assert_close(both, torch.cat([cls, patch], dim=1))
