"""main_retrieval.py: pairs, descriptor files, UnED / folder / kNN runs end to end, 2 processes = 1, errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from main_retrieval import main
from tests.conftest import run_entry, tiny_overrides
from tests.oracles import search_torch
from tests.test_retrieval_metrics import brute_uned, label_set, random_labels
from unic.data import registry
from unic.data.folders import load_image
from unic.data.transforms import eval_transform, uned_eval_transform
from unic.data.uned import read_info_file
from unic.eval.encoders import load_encoder
from unic.eval.knn import weighted_knn
from unic.eval.metrics import ALL_METRICS, UNED_TEST_PAIRS, UNED_VAL_PAIRS, EmbeddingSet
from unic.eval.retrieval import (
    RECALL_METRICS,
    default_pairs,
    load_descriptors,
    parse_metrics,
    parse_pairs,
    save_descriptors,
    save_neighbor_figure,
    top_neighbors,
)
from unic.io import load_checkpoint

DEMO_DOMAINS = ("digits", "shapes", "gratings", "blobs")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_root) -> dict[str, str]:
    """A tiny trained checkpoint, plus a universal.pth with random UDON heads on its backbone."""
    out = tmp_path_factory.mktemp("retrieval_run")
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **{"train.validate": False})])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    student = ckpt["config"]["student"]
    dim = student["kwargs"]["embed_dim"]
    generator = torch.Generator().manual_seed(0)

    def linear(out_dim):
        return {"weight": torch.randn(out_dim, dim, generator=generator) / dim**0.5,
                "bias": 0.1 * torch.randn(out_dim, generator=generator)}

    universal = {
        "format": "unic-universal",
        "state_dict": {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")},
        "arch": student["arch"], "model_kwargs": dict(student["kwargs"]), "img_size": student["img_size"],
        "universal": linear(64), "teacher_heads": {domain: linear(256) for domain in DEMO_DOMAINS},
    }
    torch.save(universal, out / "universal_random_heads.pth")
    return {"checkpoint": str(out / "checkpoint.pth"), "universal": str(out / "universal_random_heads.pth")}


def read_results(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


# ----------------------------------------------------------------------------------------------------------
# pairs and flags


def test_default_pairs_follow_the_uned_tables_and_split_files():
    available = {"cars": {"test"}, "met": {"test", "index", "val", "small_index"}, "mine": {"test", "index", "val"},
                 "other": {"test", "val", "small_index"}}
    for domain, pair in UNED_TEST_PAIRS.items():
        assert default_pairs([domain], "test", {})[domain] == pair
    for domain, pair in UNED_VAL_PAIRS.items():
        assert default_pairs([domain], "val", {})[domain] == pair
    pairs = default_pairs(["met", "mine", "other"], "test", available)
    assert pairs == {"met": ("test", "index"), "mine": ("test", "index"), "other": ("test", "test")}
    pairs = default_pairs(["met", "mine", "other"], "val", available)
    assert pairs == {"met": ("val", "small_index"), "mine": ("val", "val"), "other": ("val", "small_index")}
    assert default_pairs(["cars", "mine"], "val", available, task="knn") == {"cars": ("val", "train"),
                                                                           "mine": ("val", "train")}
    assert parse_pairs(["met=test:index", "a:b=val:val"]) == {"met": ("test", "index"), "a:b": ("val", "val")}
    with pytest.raises(ValueError, match="DOMAIN=QUERY_SPLIT:INDEX_SPLIT"):
        parse_pairs(["met:test"])
    assert parse_metrics("uned") == ("R@1", "mMP@5", "mAP@5")
    assert parse_metrics("recall") == ("R@1", "R@2", "R@4", "R@8", "R@10", "R@100", "mAP@100")
    assert parse_metrics("R@3, mAP@7") == ("R@3", "mAP@7")
    with pytest.raises(ValueError, match="metric"):
        parse_metrics("P@5")


def test_help_lists_the_keys_and_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for line in ("model.source = output/demo/checkpoint.pth", "data.dataset = demo", "data.batch_size_per_gpu = 128",
                 "retrieval.chunk_size = 8192", "retrieval.knn_k = [10, 20, 100, 200]", "run.output_dir = null"):
        assert line in out, line
    assert "example:\n  python main_retrieval.py model.source=" in out


@pytest.mark.parametrize("args, message", [
    (["data.dataset=foldr"], "'data.dataset': 'foldr'; choose one of demo, uned, folder, imagenet"),
    (["data.dataset=folder", "retrieval.task=knn"], "data.dataset=folder (folder layout) is for retrieval.task=ret"),
    (["data.dataset=imagenet", "retrieval.task=retrieval"], "is for retrieval.task=knn, not retrieval"),
    (["data.dataset=imagenet", "data.domains=[cars]"], "apply to UnED-layout data, not data.dataset=imagenet"),
    (["model.descriptors=d.npz", "data.root=/data"], "drop model.source, data.dataset and data.root"),
    (["retrieval.modes=[both]"], "'retrieval.modes': unknown ['both']"),
    (["retrieval.knn_k=[5,0]"], "'retrieval.knn_k': must be positive integers"),
    (["retrieval.temperature=inf"], "'retrieval.temperature': must be finite"),
    (["retrieval.chunk_size=0"], "'retrieval.chunk_size': must be > 0"),
    (["data.crop_ratio=1.5"], "'data.crop_ratio': must be in [0, 1]"),
    (["data.batch_size_per_gpu=0"], "'data.batch_size_per_gpu': must be > 0"),
    (["run.precision=fp8"], "'run.precision'"),
    (["chunk_size=3"], "did you mean 'retrieval.chunk_size'?"),
    (["model.source=timm:test_vit", "data.dataset=folder"], "data.dataset=folder needs data.root, a folder holding"),
])
def test_config_errors_are_one_line_and_create_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*args, f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# descriptor files


def exact_features(rng) -> dict[str, dict[str, EmbeddingSet]]:
    """Scaled one-hot descriptors: L2 normalisation is exact and every score is -1, 0 or 1 (many exact ties)."""

    def item_set(num_items, num_classes, multi=False):
        axes = rng.integers(0, 4, num_items)
        x = np.zeros((num_items, 4), dtype=np.float32)
        x[np.arange(num_items), axes] = rng.choice([-3.0, -1.0, 0.5, 2.0], num_items)
        return EmbeddingSet(x, random_labels(rng, num_items, num_classes, multi))

    features = {
        "cars": {"test": item_set(30, 4, multi=True)},  # leave-one-out, multi-label and unlabelled rows
        "met": {"test": item_set(12, 5), "index": item_set(25, 5, multi=True)},  # query -> index
        "rp2k": {"test": item_set(10, 3)},
    }
    features["rp2k"]["test"].labels[:, 0] = 100 + np.arange(10)  # no query has any relevant item
    return features


def normalized(features):
    return {d: {s: EmbeddingSet(v.embeddings / np.linalg.norm(v.embeddings, axis=1, keepdims=True), v.labels)
                for s, v in splits.items()} for d, splits in features.items()}


def test_descriptor_round_trip_and_metrics_against_brute_force(tmp_path, capsys):
    features = exact_features(np.random.default_rng(0))
    path = tmp_path / "desc.npz"
    save_descriptors(str(path), features, {"note": "kept"})
    loaded, meta = load_descriptors(str(path))
    assert meta == {"note": "kept"}
    assert set(load_npz(path)) == {"__meta__"} | {f"{d}:{s}:{k}" for d in features for s in features[d] for k in "xy"}
    for domain, splits in features.items():
        for split, (x, y) in splits.items():
            assert loaded[domain][split].embeddings.dtype == np.float32
            assert loaded[domain][split].labels.dtype == np.int64
            np.testing.assert_array_equal(loaded[domain][split].embeddings, x)
            np.testing.assert_array_equal(loaded[domain][split].labels, y)

    pairs = ["cars=test:test", "met=test:index", "rp2k=test:test"]
    assert main([f"model.descriptors={path}", f"data.pairs=[{','.join(pairs)}]", "retrieval.metrics=all",
                 f"run.output_dir={tmp_path / 'out'}"]) == 0
    assert "merged index" in capsys.readouterr().out
    results = read_results(tmp_path / "out")
    assert list(results) == ["separate", "merged"]
    for mode in ("separate", "merged"):
        expected = brute_uned(normalized(features), parse_pairs(pairs), mode)
        assert list(results[mode]) == ["cars", "met", "rp2k", "average"]
        for domain, scores in expected.items():
            assert list(results[mode][domain]) == list(ALL_METRICS)
            for name, value in scores.items():
                assert results[mode][domain][name] == pytest.approx(value, abs=1e-12), (mode, domain, name)
    assert results["merged"]["rp2k"]["mAP@5"] == 0.0 and results["separate"]["cars"]["R@1"] > 0


def test_top_neighbors_merged_index_against_dense_ranking():
    features = normalized(exact_features(np.random.default_rng(1)))
    pairs = {"cars": ("test", "test"), "met": ("test", "index"), "rp2k": ("test", "test")}
    rows = np.array([0, 3, 7, 29])
    nn = top_neighbors(features, pairs, "cars", rows, k=6, merged=True)
    # reference: dense stable ranking over the union (cars test, met index, rp2k test), the query itself dropped
    index_x = np.concatenate([features[d][pairs[d][1]].embeddings for d in pairs])
    owners = [(i, r) for i, d in enumerate(pairs) for r in range(len(features[d][pairs[d][1]].embeddings))]
    ids = np.arange(len(index_x))
    scores, neighbors = search_torch(features["cars"]["test"].embeddings[rows], index_x, 6, (rows, ids))
    np.testing.assert_array_equal(nn["scores"], scores)
    for q, row in enumerate(rows):
        query_labels = label_set(features["cars"]["test"].labels[row])
        for j, n in enumerate(neighbors[q]):
            domain, index_row = owners[n]
            assert (nn["domain"][q, j], nn["row"][q, j]) == (domain, index_row)
            relevant = domain == 0 and bool(query_labels & label_set(features["cars"]["test"].labels[index_row]))
            assert nn["relevant"][q, j] == relevant
            assert not (domain == 0 and index_row == row)  # never the query itself


def test_neighbor_figure_frames(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("RGB", (40, 30), (128, 128, 128)).save(gray)

    def colours(relevant):
        path = tmp_path / f"fig{int(relevant.sum())}.png"
        save_neighbor_figure(str(path), "t", [str(gray)], ["q"], [[str(gray)] * 2], [["a", "b"]], relevant)
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
        green = ((pixels[:, 1] > 140) & (pixels[:, 0] < 80) & (pixels[:, 2] < 110)).sum()
        red = ((pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)).sum()
        return green, red

    green, red = colours(np.array([[True, False]]))
    assert green > 100 and red > 100
    green, red = colours(np.array([[False, False]]))
    assert green == 0 and red > 100


@pytest.mark.parametrize("case", ["rows", "missing_y", "key", "x_3d", "float_labels", "empty", "split", "merged_dims"])
def test_descriptor_file_errors(tmp_path, capsys, case):
    x, y = np.zeros((4, 3), dtype=np.float32), np.zeros(4, dtype=np.int64)
    arrays = {"a:test:x": x, "a:test:y": y, "b:test:x": x, "b:test:y": y}
    expected = {
        "rows": ("a:test:y", "'a:test:x' has 4 rows but 'a:test:y' has 3"),
        "missing_y": ("a:test:y", "'a:test:x' has no matching 'a:test:y'"),
        "key": ("a:test:z", "unexpected array 'a:test:z'"),
        "x_3d": ("a:test:x", "'a:test:x' must be a numeric (N, D) array"),
        "float_labels": ("a:test:y", "'a:test:y' must be an integer (N,) or (N, L) array"),
        "empty": ("a:test:x", "domain 'a' is empty"),
        "split": ("b:test:x", "missing split 'test' of domain 'b'"),
        "merged_dims": ("b:test:x", "merged index needs one descriptor dim"),
    }[case]
    key, message = expected
    if case == "rows":
        arrays[key] = y[:3]
    elif case in ("missing_y", "split"):
        del arrays[key]
        if case == "split":
            del arrays["b:test:y"]
            arrays["b:val:x"], arrays["b:val:y"] = x, y
    elif case == "key":
        arrays[key] = y
    elif case == "x_3d":
        arrays[key] = x[:, :, None]
    elif case == "float_labels":
        arrays[key] = y.astype(np.float32)
    elif case == "empty":
        arrays["a:test:x"], arrays["a:test:y"] = x[:0], y[:0]
    elif case == "merged_dims":
        arrays[key] = np.zeros((4, 5), dtype=np.float32)
    path = tmp_path / "desc.npz"
    np.savez(path, **arrays)
    out = tmp_path / "out"
    assert main([f"model.descriptors={path}", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# end to end on the demo data


def encode_images(encoder, paths, crop_ratio=None):
    """The encoder on ``paths`` with UnED's evaluation crop, or the folder benchmarks' at ``crop_ratio``."""
    transform = (uned_eval_transform(encoder.img_size, encoder.mean, encoder.std) if crop_ratio is None
                 else eval_transform(encoder.img_size, crop_ratio, encoder.mean, encoder.std))
    with torch.no_grad():
        return encoder(torch.stack([transform(load_image(p)) for p in paths])).numpy()


def test_uned_demo_end_to_end_universal_and_oracle(tmp_path, demo_root, demo_run, capsys):
    universal = demo_run["universal"]
    out = tmp_path / "universal"
    common = ["data.dataset=uned", f"data.root={demo_root}", "data.domains=[shapes,gratings]", "data.num_workers=0",
              "data.batch_size_per_gpu=16"]
    assert main([f"model.source={universal}", *common, "retrieval.visualize=3", f"run.output_dir={out}"]) == 0
    stdout = capsys.readouterr().out
    assert "separate index (%)" in stdout and "merged index (%)" in stdout and "average" in stdout
    results = read_results(out)
    assert list(results) == ["separate", "merged"]
    for mode in results:
        assert list(results[mode]) == ["shapes", "gratings", "average"]
        for domain, scores in results[mode].items():
            assert list(scores) == ["R@1", "mMP@5", "mAP@5"]
            assert all(0.0 <= value <= 1.0 for value in scores.values())
        assert results[mode]["average"]["R@1"] == pytest.approx(
            (results[mode]["shapes"]["R@1"] + results[mode]["gratings"]["R@1"]) / 2)

    # descriptors: the universal embedding (64-d) of every test image in info-file order, with its labels
    arrays = load_npz(out / "descriptors.npz")
    encoder = load_encoder(universal, "universal")
    for domain in ("shapes", "gratings"):
        entries = read_info_file(demo_root, domain, "test")
        assert arrays[f"{domain}:test:x"].shape == (len(entries), 64)
        np.testing.assert_array_equal(arrays[f"{domain}:test:y"], [labels[0] for _, labels in entries])
        np.testing.assert_allclose(arrays[f"{domain}:test:x"][:5], encode_images(encoder, [p for p, _ in entries[:5]]),
                                   rtol=1e-4, atol=1e-5)
    # reports: figures, TensorBoard, metrics.jsonl
    for domain in ("shapes", "gratings"):
        figure = Image.open(out / f"neighbors_{domain}.png")
        assert figure.size[0] > figure.size[1] > 200  # 3 rows of 9 thumbnails
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    with open(out / "metrics.jsonl") as f:
        logged = {row["split"]: row for row in map(json.loads, f)}
    assert logged["retrieval_merged"]["shapes/R@1"] == results["merged"]["shapes"]["R@1"]

    # evaluation only, from the saved descriptors: the same numbers
    again = tmp_path / "again"
    assert main([f"model.descriptors={out / 'descriptors.npz'}", f"run.output_dir={again}"]) == 0
    assert read_results(again) == results

    # oracle: each domain through its own teacher head (256-d), separate index only
    oracle = tmp_path / "oracle"
    assert main([f"model.source={universal}", *common, "model.embedding=oracle", f"run.output_dir={oracle}"]) == 0
    assert list(read_results(oracle)) == ["separate"]
    arrays = load_npz(oracle / "descriptors.npz")
    for domain in ("shapes", "gratings"):
        paths = [p for p, _ in read_info_file(demo_root, domain, "test")[:4]]
        expected = encode_images(load_encoder(universal, f"domain:{domain}"), paths)
        np.testing.assert_allclose(arrays[f"{domain}:test:x"][:4], expected, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main([f"model.source={universal}", *common, "model.embedding=oracle", "retrieval.modes=[merged]",
                 f"run.output_dir={tmp_path / 'no'}"]) == 2
    assert "merged index is undefined" in capsys.readouterr().err


def test_two_processes_extract_what_one_process_does(tmp_path, demo_root, demo_run):
    args = [f"model.source={demo_run['checkpoint']}", "model.embedding=backbone", "data.dataset=uned",
            f"data.root={demo_root}", "data.domains=[shapes,digits]", "data.num_workers=0", "data.batch_size_per_gpu=7"]
    assert main([*args, f"run.output_dir={tmp_path / 'one'}"]) == 0
    result = run_entry(["main_retrieval.py", *args, f"run.output_dir={tmp_path / 'two'}"], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("merged index (%)") == 1  # rank 0 alone reports
    one, two = load_npz(tmp_path / "one" / "descriptors.npz"), load_npz(tmp_path / "two" / "descriptors.npz")
    assert one.keys() == two.keys()
    assert one["digits:test:x"].shape == (len(read_info_file(demo_root, "digits", "test")), 32)
    for key in one:
        if key.endswith(":x"):
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6)
        elif key.endswith(":y"):
            np.testing.assert_array_equal(two[key], one[key])
    assert list(read_results(tmp_path / "two")) == ["separate", "merged"]


def test_unreadable_images_are_left_out_and_multi_labels_kept(tmp_path, demo_root, demo_run):
    root = tmp_path / "uned"
    (root / "images" / "toy").mkdir(parents=True)
    (root / "info_files" / "toy").mkdir(parents=True)
    entries = []
    for i, (path, _) in enumerate(read_info_file(demo_root, "shapes", "test")[:8]):
        shutil.copy(path, root / "images" / "toy" / f"{i}.jpg")
        entries.append({"path": f"toy/{i}.jpg", "class_id": [i, 20 + i % 2] if i % 3 == 0 else i % 4})
    (root / "images" / "toy" / "bad.jpg").write_bytes(b"not an image")
    entries.insert(3, {"path": "toy/bad.jpg", "class_id": 99})
    (root / "info_files" / "toy" / "test.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    assert main([f"model.source={demo_run['checkpoint']}", "model.embedding=backbone", "data.dataset=uned",
                 f"data.root={root}", "data.num_workers=0", f"run.output_dir={out}"]) == 0
    features, meta = load_descriptors(str(out / "descriptors.npz"))
    kept = [e for e in entries if e["path"] != "toy/bad.jpg"]
    assert [os.path.relpath(p, root / "images") for p in meta["paths"]["toy:test"]] == [e["path"] for e in kept]
    assert features["toy"]["test"].labels.tolist() == [
        e["class_id"] if isinstance(e["class_id"], list) else [e["class_id"], -1] for e in kept
    ]
    encoder = load_encoder(demo_run["checkpoint"], "backbone")
    np.testing.assert_allclose(features["toy"]["test"].embeddings[3:5],
                               encode_images(encoder, meta["paths"]["toy:test"][3:5]), rtol=1e-4, atol=1e-5)
    assert set(read_results(out)["merged"]) == {"toy", "average"}


def copy_images(entries, folder_of, root):
    """Copy (path, labels) entries into ``root/<folder_of(labels)>/``; returns {copied path: folder}."""
    copied = {}
    for path, labels in entries:
        folder = root / folder_of(labels)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / os.path.basename(path)
        shutil.copy(path, target)
        copied[str(target)] = folder.name
    return copied


def test_folder_benchmarks_with_a_timm_baseline(tmp_path, demo_root, capsys):
    weights = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit", pretrained=False).state_dict(), weights)
    model = ["model.source=timm:test_vit", f"model.weights={weights}", "data.num_workers=0",
             "data.batch_size_per_gpu=32"]

    # leave-one-out set: root/<class>/*
    loo = tmp_path / "sop"
    copy_images(read_info_file(demo_root, "shapes", "test"), lambda labels: f"class{labels[0]}", loo)
    assert main([*model, "data.dataset=folder", f"data.root={loo}", f"run.output_dir={tmp_path / 'loo'}"]) == 0
    results = read_results(tmp_path / "loo")
    assert list(results) == ["separate"] and list(results["separate"]) == ["sop", "average"]
    scores = results["separate"]["sop"]
    assert list(scores) == list(RECALL_METRICS)
    recalls = [scores[f"R@{k}"] for k in (1, 2, 4, 8, 10, 100)]
    assert recalls == sorted(recalls) and recalls[-1] == 1.0  # 47 other images, 6 per class: all found by 100
    assert scores["R@1"] < 1.0  # the query itself is excluded (it would always be its own first neighbour)
    assert "R@100" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / "loo" / "config.yaml").data.dataset == "folder"  # the resolved config

    # a new benchmark of a known layout is one registry entry, whose defaults apply (here UnED metrics, both modes)
    spec = registry.DatasetSpec("toy_sop", "folder", "retrieval", "root/<class>/<image>", ("test",),
                                {"metrics": "uned", "crop_ratio": 0.875})
    with registry.registered(spec):
        assert main([*model, "data.dataset=toy_sop", f"data.root={loo}", f"run.output_dir={tmp_path / 'entry'}"]) == 0
    assert "toy_sop" not in registry.DATASETS
    entry = read_results(tmp_path / "entry")
    assert list(entry) == ["separate", "merged"] and list(entry["separate"]["sop"]) == ["R@1", "mMP@5", "mAP@5"]
    assert entry["separate"]["sop"]["R@1"] == scores["R@1"] and entry["merged"] == entry["separate"]
    assert load_descriptors(str(tmp_path / "entry" / "descriptors.npz"))[1]["data"] == "toy_sop"

    # query/gallery pair: root/query/<class>/*, root/gallery/<class>/*, classes matched by name
    pair = tmp_path / "inshop_like"
    query = copy_images([e for e in read_info_file(demo_root, "gratings", "test") if e[1][0] != 0],
                        lambda labels: f"item{labels[0]}", pair / "query")
    query.update(copy_images(read_info_file(demo_root, "blobs", "test")[:2], lambda labels: "only_in_query",
                             pair / "query"))
    gallery = copy_images(read_info_file(demo_root, "gratings", "val"), lambda labels: f"item{labels[0]}",
                          pair / "gallery")
    out = tmp_path / "pair"
    assert main([*model, "data.dataset=folder", f"data.root={pair}", "data.name=inshop_like",
                 f"run.output_dir={out}"]) == 0
    arrays = load_npz(out / "descriptors.npz")
    _, meta = load_descriptors(str(out / "descriptors.npz"))
    assert meta["pairs"] == {"inshop_like": ["test", "index"]}
    names = {}
    for split, copied in (("test", query), ("index", gallery)):
        paths = meta["paths"][f"inshop_like:{split}"]
        assert sorted(paths) == sorted(copied) and arrays[f"inshop_like:{split}:x"].shape == (len(paths), 64)
        for path, label in zip(paths, arrays[f"inshop_like:{split}:y"]):
            assert names.setdefault(copied[path], int(label)) == int(label)  # one id per class name
    assert len(set(names.values())) == len(names) == 9
    results = read_results(out)["separate"]["inshop_like"]
    assert 0.0 < results["R@1"] <= results["R@100"] < 1.0  # the 2 queries without a gallery class never hit
    assert results["R@100"] == pytest.approx(1 - 2 / len(query))
    # evaluation only: the run's pairs and metrics come back from the file
    assert main([f"model.descriptors={out / 'descriptors.npz'}", f"run.output_dir={tmp_path / 'pair2'}"]) == 0
    assert read_results(tmp_path / "pair2") == read_results(out)


def test_weighted_knn_on_imagenet_layout(tmp_path, demo_root, demo_run):
    root = tmp_path / "imagenet"
    train = copy_images(read_info_file(demo_root, "blobs", "train"), lambda labels: f"hue{labels[0]}", root / "train")
    copy_images([e for e in read_info_file(demo_root, "blobs", "val") if e[1][0] != 0],
                lambda labels: f"hue{labels[0]}", root / "val")  # hue0 absent: val ids must follow train's
    out = tmp_path / "knn"
    assert main([f"model.source={demo_run['checkpoint']}", "data.dataset=imagenet", f"data.root={root}",
                 "retrieval.knn_k=[5,20]", "data.num_workers=0", f"run.output_dir={out}"]) == 0
    results = read_results(out)
    assert list(results) == ["knn"] and list(results["knn"]) == ["imagenet", "average"]
    assert list(results["knn"]["imagenet"]) == ["top1@5", "top5@5", "top1@20", "top5@20"]
    features, meta = load_descriptors(str(out / "descriptors.npz"))
    assert meta["task"] == "knn" and meta["pairs"] == {"imagenet": ["val", "train"]}
    for path, label in zip(meta["paths"]["imagenet:val"], features["imagenet"]["val"].labels):
        assert label == int(os.path.basename(os.path.dirname(path))[3:])
    assert len(train) == len(features["imagenet"]["train"].labels)
    bank, queries = features["imagenet"]["train"], features["imagenet"]["val"]
    expected = weighted_knn(torch.from_numpy(bank.embeddings), torch.from_numpy(bank.labels),
                            torch.from_numpy(queries.embeddings), torch.from_numpy(queries.labels), ks=(5, 20))
    for k in (5, 20):
        assert results["knn"]["imagenet"][f"top1@{k}"] == expected[k]["top1"]
        assert results["knn"]["imagenet"][f"top5@{k}"] == expected[k]["top5"]
    assert main([f"model.descriptors={out / 'descriptors.npz'}", "retrieval.knn_k=[5,20]",
                 f"run.output_dir={tmp_path / 'again'}"]) == 0
    assert read_results(tmp_path / "again") == results
    extraction_config = (out / "config.yaml").read_text()
    assert main([f"model.descriptors={out / 'descriptors.npz'}", "retrieval.knn_k=[5,20]"]) == 0  # in its folder
    assert (out / "config.yaml").read_text() == extraction_config  # provenance kept
    assert OmegaConf.load(out / "eval_config.yaml").model.descriptors == str(out / "descriptors.npz")


@pytest.mark.parametrize("case", ["missing_split", "empty_domain", "empty_split", "unknown_domain",
                                  "missing_checkpoint", "no_head", "timm_universal"])
def test_input_errors_create_nothing(tmp_path, demo_root, demo_run, capsys, case):
    root = tmp_path / "uned"
    (root / "info_files" / "cars").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "info_files" / "cars" / "test.json").write_text(json.dumps([{"path": "a.jpg", "class_id": 0}]))
    checkpoint = demo_run["checkpoint"]
    extra = ["data.domains=[cars]"]
    expected = {
        "missing_split": "missing split 'val' of domain 'cars'",
        "empty_domain": "domain 'cars' is empty",
        "empty_split": "split 'test' of domain 'cars' is empty",
        "unknown_domain": "domain 'sop' not found",
        "missing_checkpoint": "checkpoint file not found",
        "no_head": "has no teacher head for ['cars']",
        "timm_universal": "has only its image embedding",
    }[case]
    if case == "missing_split":
        extra += ["data.split=val"]
    elif case == "empty_domain":
        (root / "info_files" / "cars" / "test.json").unlink()
    elif case == "empty_split":
        (root / "info_files" / "cars" / "test.json").write_text("[]")
    elif case == "unknown_domain":
        extra = ["data.domains=[cars,sop]"]
    elif case == "missing_checkpoint":
        checkpoint = str(tmp_path / "nope.pth")
    elif case == "no_head":
        extra += ["model.embedding=oracle"]
    elif case == "timm_universal":
        checkpoint = "timm:test_vit"
        extra += ["model.embedding=universal"]
    out = tmp_path / "out"
    code = main([f"model.source={checkpoint}", "data.dataset=uned", f"data.root={root}", *extra,
                 f"run.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_extraction_matches_cpu(tmp_path, demo_root, demo_run):
    args = [f"model.source={demo_run['universal']}", "data.dataset=uned", f"data.root={demo_root}",
            "data.domains=[shapes]", "data.num_workers=0", "run.precision=fp32"]
    assert main([*args, "run.device=cpu", f"run.output_dir={tmp_path / 'cpu'}"]) == 0
    assert main([*args, "run.device=cuda", f"run.output_dir={tmp_path / 'cuda'}"]) == 0
    cpu, cuda = load_npz(tmp_path / "cpu" / "descriptors.npz"), load_npz(tmp_path / "cuda" / "descriptors.npz")
    np.testing.assert_allclose(cuda["shapes:test:x"], cpu["shapes:test:x"], rtol=1e-3, atol=1e-4)
