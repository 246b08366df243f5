"""webdataset shards: the writer, plain webdataset reading them, exact once-per-epoch coverage over ranks and
workers, augmentations bit-identical to the folder loader, exact resume, broken images, UDON domain streams."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from unic.data.folders import BadImageError, image_folder_dataset, load_image
from unic.data.sampling import DomainSampler
from unic.data.shards import (
    ShardBatches, ShardFormatError, buffer_order, decode_image, open_shards, plan_shards, source_dataset, write_shards,
)
from unic.data.transforms import udon_train_transform, unic_train_transform
from unic.data.uned import uned_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("write_shards", os.path.join(REPO, "scripts", "write_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def size_of(img: Image.Image) -> torch.Tensor:
    """A transform that keeps what identifies the decoded image cheaply (size and a pixel checksum)."""
    array = np.asarray(img, dtype=np.int64)
    return torch.tensor([*img.size, int(array.sum())])


def random_crop_sum(img: Image.Image) -> torch.Tensor:
    """A cheap random transform: a random crop's pixel sum (tests that the per-position seed is used)."""
    array = np.asarray(img, dtype=np.int64)
    y, x = torch.randint(0, array.shape[0] - 8, (2,)).tolist()
    return torch.tensor([array[y:y + 8, x:x + 8].sum(), y, x])


@pytest.fixture(scope="module")
def demo_shards(demo_root, tmp_path_factory) -> str:
    ds = uned_dataset(demo_root, "train")
    out = str(tmp_path_factory.mktemp("demo_wds"))
    write_shards(ds.samples, ds.domain_names, out, source={"layout": "uned", "root": demo_root, "split": "train"},
                 max_count=100, progress=False)
    return out


def _tiny_imagenet(root: str, per_class: int = 10) -> str:
    """root/{train,val}/<class>/: 3 classes of small JPEGs, one RGBA PNG per class (30 train images)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(("ant", "bee", "cat")):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
                if i == 0:
                    alpha = rng.integers(0, 256, (20, 24, 1), dtype=np.uint8)
                    Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA").save(
                        os.path.join(root, split, name, f"{i:03d}.png"))
                else:
                    Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:03d}.jpg"), quality=90)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[str, str]:
    """(ImageNet-layout root, its shards written by the script, 7 samples per shard)."""
    root = _tiny_imagenet(str(tmp_path_factory.mktemp("tiny_in")))
    out = str(tmp_path_factory.mktemp("tiny_wds"))
    _script().main(["--layout", "imagenet", "--root", root, "--out", out, "--max_count", "7", "--quiet"])
    return root, out


def _epoch(shard_set, global_batch: int, world: int, workers: int, epoch: int = 0, **kw) -> list[list[dict]]:
    """Every rank's batches of one epoch (ranks simulated by rank/world), as lists of per-sample dicts."""
    out = []
    for rank in range(world):
        batches = ShardBatches(shard_set, global_batch, rank, world, 0, workers, **kw)
        batches.start(epoch * batches.steps_per_epoch)
        rank_batches = []
        for _ in range(batches.steps_per_epoch):
            _, batch = batches.next()
            rank_batches.append(batch)
        batches.close()
        out.append(rank_batches)
    return out


def _indices(epoch_batches) -> list[int]:
    return [i for rank in epoch_batches for batch in rank for i in batch["index"].tolist()]


# ------------------------------------------------------------------------------------------------ writer
def test_writer_index_limits_and_reproducibility(demo_root, demo_shards, tmp_path):
    ds = uned_dataset(demo_root, "train")
    index = json.load(open(os.path.join(demo_shards, "index.json")))
    assert index["num_samples"] == len(ds) == sum(s["count"] for s in index["shards"])
    assert all(s["count"] <= 100 for s in index["shards"]) and index["domains"] == ds.domain_names
    counts = [{} for _ in ds.domain_names]
    for _, labels, d in ds.samples:
        counts[d][labels[0]] = counts[d].get(labels[0], 0) + 1
    assert [dict((c, n) for c, n in pairs) for pairs in index["class_counts"]] == counts
    for s in index["shards"]:
        assert os.path.getsize(os.path.join(demo_shards, s["url"])) == s["bytes"]
    assert not [f for f in os.listdir(demo_shards) if f.startswith(".")]  # no temporary file left
    # max_size caps the tar size; the same seed writes the same bytes, another seed another order
    sub = ds.samples[:120]
    a = write_shards(sub, ds.domain_names, str(tmp_path / "a"), max_size=60_000, progress=False)
    b = write_shards(sub, ds.domain_names, str(tmp_path / "b"), max_size=60_000, num_workers=2, progress=False)
    c = write_shards(sub, ds.domain_names, str(tmp_path / "c"), max_size=60_000, seed=1, progress=False)
    assert len(a["shards"]) > 2 and all(s["bytes"] <= 60_000 for s in a["shards"])
    assert [s["url"] for s in a["shards"]] == [s["url"] for s in b["shards"]]
    for s in a["shards"]:
        assert open(tmp_path / "a" / s["url"], "rb").read() == open(tmp_path / "b" / s["url"], "rb").read()
    assert open(tmp_path / "a" / a["shards"][0]["url"], "rb").read() != \
        open(tmp_path / "c" / c["shards"][0]["url"], "rb").read()
    with pytest.raises(FileExistsError):
        write_shards(sub, ds.domain_names, str(tmp_path / "a"), progress=False)
    grouped = write_shards(sub, ds.domain_names, str(tmp_path / "g"), max_count=30, group_by_domain=True,
                           progress=False)
    assert all(sum(1 for n in s["domain_counts"] if n) == 1 for s in grouped["shards"])
    assert plan_shards([10] * 7, 3, None) == [range(0, 3), range(3, 6), range(6, 7)]


def test_plain_webdataset_reads_the_shards(demo_root, demo_shards):
    import webdataset as wds

    ds = uned_dataset(demo_root, "train")
    index = json.load(open(os.path.join(demo_shards, "index.json")))
    urls = [os.path.join(demo_shards, s["url"]) for s in index["shards"]]
    seen = set()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        path, labels, domain = ds.samples[meta["index"]]
        image = sample.get("jpg", sample.get("png"))
        assert image == open(path, "rb").read()  # the original bytes, not re-encoded
        assert int(sample["cls"]) == labels[0] and meta["domain"] == ds.domain_names[domain]
        assert os.path.join(demo_root, meta["path"]) == path
        seen.add(meta["index"])
    assert seen == set(range(len(ds)))
    decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False).decode("pil")))
    ext = "jpg" if "jpg" in decoded else "png"
    assert decoded[ext].size == load_image(ds.samples[json.loads(json.dumps(decoded["json"]))["index"]][0]).size


# ------------------------------------------------------------------------------------------------ data order
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_every_sample_once_per_epoch(tiny, world, workers):
    root, shards = tiny
    folder = image_folder_dataset(os.path.join(root, "train"), size_of)
    shard_set = open_shards(shards, transform=size_of)
    assert len(shard_set) == len(folder) == 30
    epochs = [_epoch(shard_set, 6, world, workers, epoch=e) for e in (0, 1)]
    for batches in epochs:
        assert sorted(_indices(batches)) == list(range(30))  # 30 = 5 steps x 6: each exactly once
        for rank in batches:
            assert len(rank) == 5 and all(len(b["index"]) == 6 // world for b in rank)
            for batch in rank:
                for i, label, domain, image in zip(batch["index"].tolist(), batch["label"].tolist(),
                                                   batch["domain"].tolist(), batch["image"]):
                    item = folder[i]
                    assert (label, domain) == (item["label"], item["domain"])
                    assert torch.equal(image, item["image"])  # the same decoded pixels
    assert _indices(epochs[0]) != _indices(epochs[1])  # a new order every epoch


def test_demo_epoch_uses_distinct_samples_and_folder_labels(demo_root, demo_shards):
    folder = uned_dataset(demo_root, "train")
    shard_set = open_shards(demo_shards, transform=size_of)
    batches = _epoch(shard_set, 64, 2, 2)
    indices = _indices(batches)
    steps = len(folder) // 64
    assert len(indices) == len(set(indices)) == steps * 64  # the remainder is dropped, nothing repeats
    for rank in batches:
        for batch in rank:
            for i, label, domain in zip(batch["index"].tolist(), batch["label"].tolist(), batch["domain"].tolist()):
                _, labels, d = folder.samples[i]
                assert (label, domain) == (labels[0], d)


def test_order_does_not_depend_on_worker_processes(tiny):
    _, shards = tiny
    shard_set = open_shards(shards, transform=random_crop_sum)
    runs = [_epoch(shard_set, 6, 2, 2, processes=p) for p in (0, 1, 2)]
    for run in runs[1:]:
        for rank_a, rank_b in zip(runs[0], run):
            for a, b in zip(rank_a, rank_b):
                assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_buffer_order_is_a_permutation_within_reach():
    gen = torch.Generator().manual_seed(0)
    order = buffer_order(50, 8, gen)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert all(item <= k + 8 for k, item in enumerate(order))  # emitted by the time item k + 8 is read
    assert buffer_order(5, 0, gen) == list(range(5))


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("make_transform", [unic_train_transform, udon_train_transform])
def test_augmentations_bit_identical_to_folder_loader(demo_root, demo_shards, make_transform):
    transform = make_transform(32)
    folder = uned_dataset(demo_root, "train", transform=transform)
    batches = ShardBatches(open_shards(demo_shards, transform=transform), 32, 1, 2, 0, 0)
    batches.start(batches.steps_per_epoch + 3)  # epoch 1, mid-epoch
    _, batch = batches.next()
    for image, index, seed in zip(batch["image"], batch["index"].tolist(), batch["seed"].tolist()):
        assert torch.equal(image, folder[(index, seed)]["image"])  # same file, same seed: same pixels


def test_decode_image_matches_load_image(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    images = {
        "rgb.jpg": Image.fromarray(rgb), "rgba.png": Image.fromarray(rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)),
        "gray.png": Image.fromarray(rgb[..., 0]), "p.png": Image.fromarray(rgb).convert("P"),
        "i16.png": Image.fromarray(rng.integers(0, 65535, (9, 11), dtype=np.uint16)),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
    }
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    images["p_transparent.png"] = palette
    for name, img in images.items():
        path = str(tmp_path / name)
        img.save(path)
        data = open(path, "rb").read()
        assert np.array_equal(np.asarray(decode_image(data, name)), np.asarray(load_image(path))), name
    (tmp_path / "broken.jpg").write_bytes(open(tmp_path / "rgb.jpg", "rb").read()[:40])
    with pytest.raises(BadImageError):
        load_image(str(tmp_path / "broken.jpg"))
    with pytest.raises(BadImageError, match="broken"):
        decode_image(open(tmp_path / "broken.jpg", "rb").read(), "broken.jpg")


# ------------------------------------------------------------------------------------------------ resume
def test_resume_yields_the_uninterrupted_batches(demo_shards):
    shard_set = open_shards(demo_shards, transform=random_crop_sum)
    reference = ShardBatches(shard_set, 96, 1, 2, 5, 2)
    steps = reference.steps_per_epoch  # 15
    run = [reference.next()[1] for _ in range(steps + 4)]
    reference.close()
    for k in (3, steps - 1, steps, steps + 2):
        resumed = ShardBatches(shard_set, 96, 1, 2, 5, 2)
        resumed.load_state_dict(reference.state_dict())
        resumed.start(k)
        for expected in run[k:k + 2]:
            _, batch = resumed.next()
            for key in ("index", "image", "label", "domain", "seed"):
                assert torch.equal(batch[key], expected[key]), (k, key)
        resumed.close()


# ------------------------------------------------------------------------------------------------ broken images
def test_broken_images_are_skipped_like_the_folder_path(tmp_path):
    root = _tiny_imagenet(str(tmp_path / "in"))
    bad = os.path.join(root, "train", "bee", "003.jpg")
    open(bad, "wb").write(b"not a jpeg")
    missing = os.path.join(root, "train", "cat", "005.jpg")
    folder = image_folder_dataset(os.path.join(root, "train"), size_of)
    bad_index = next(i for i, (p, _, _) in enumerate(folder.samples) if p == bad)
    missing_index = next(i for i, (p, _, _) in enumerate(folder.samples) if p == missing)
    out = str(tmp_path / "wds")
    write_shards(folder.samples[:missing_index] + [(str(tmp_path / "gone.jpg"), [2], 0)]
                 + folder.samples[missing_index + 1:], folder.domain_names, out, max_count=7,
                 source={"layout": "imagenet", "root": root, "split": "train"}, progress=False)
    index = json.load(open(os.path.join(out, "index.json")))
    assert len(index["unreadable"]) == 1 and "gone.jpg" in index["unreadable"][0]
    item = folder[bad_index]  # the folder path: replaced by the next readable image, counted, reported
    assert item["skipped"] == 1 and "003.jpg" in item["bad"]
    shard_set = open_shards(out, transform=size_of)
    batches = _epoch(shard_set, 6, 2, 2)
    items = [(i, s, b, img) for rank in batches for batch in rank for i, s, b, img in
             zip(batch["index"].tolist(), batch["skipped"].tolist(), batch["bad"], batch["image"])]
    broken = {i: (s, b) for i, s, b, _ in items if s}
    assert set(broken) == {bad_index, missing_index}  # each broken sample once, replaced, counted
    assert "bee/003.jpg" in broken[bad_index][1] and "gone.jpg" in broken[missing_index][1]
    good_images = {tuple(img.tolist()) for i, s, _, img in items if not s}
    assert all(tuple(img.tolist()) in good_images or s == 0 for _, s, _, img in items)  # replacements are real
    again = _epoch(shard_set, 6, 2, 2)  # deterministic: the same replacements
    assert all(torch.equal(a["image"], b["image"]) for ra, rb in zip(batches, again) for a, b in zip(ra, rb))


def test_all_broken_raises_and_bad_shard_is_named(tmp_path):
    root = str(tmp_path / "src")
    os.makedirs(os.path.join(root, "x"))
    for i in range(4):
        open(os.path.join(root, "x", f"{i}.jpg"), "wb").write(b"junk")
    folder = image_folder_dataset(root)
    write_shards(folder.samples, folder.domain_names, str(tmp_path / "wds"), progress=False)
    batches = ShardBatches(open_shards(str(tmp_path / "wds"), transform=size_of), 2, 0, 1, 0, 0)
    with pytest.raises(BadImageError):
        batches.next()
    shard = os.path.join(tmp_path / "wds", "shard-000000.tar")
    open(shard, "r+b").truncate(700)
    batches = ShardBatches(open_shards(str(tmp_path / "wds"), transform=size_of), 2, 0, 1, 0, 0)
    with pytest.raises(ShardFormatError, match="shard-000000"):
        batches.next()


# ------------------------------------------------------------------------------------------------ domains, UDON
def test_domain_selection_and_source(demo_root, demo_shards):
    domains = ["shapes", "gratings"]
    folder = uned_dataset(demo_root, "train", domains, size_of)
    shard_set = open_shards(demo_shards, domains, transform=size_of)
    assert len(shard_set) == len(folder) and shard_set.domain_names == domains
    assert sorted((labels[0], d) for _, labels, d in shard_set.samples) == \
        sorted((labels[0], d) for _, labels, d in folder.samples)
    full = uned_dataset(demo_root, "train")
    position = {path: i for i, (path, _, _) in enumerate(folder.samples)}
    batches = _epoch(shard_set, 32, 1, 0)
    for batch in batches[0]:
        for i, label, domain in zip(batch["index"].tolist(), batch["label"].tolist(), batch["domain"].tolist()):
            _, labels, d = folder.samples[position[full.samples[i][0]]]
            assert (label, domain) == (labels[0], d)
    val = source_dataset(shard_set, "val")
    assert val.domain_names == domains and len(val) == len(uned_dataset(demo_root, "val", domains))


def test_domain_shard_batches_resume(demo_shards, tmp_path):
    from unic.data.shards import DomainShardBatches

    shard_set = open_shards(demo_shards, ["shapes", "gratings"], transform=random_crop_sum)

    def make():
        sampler = DomainSampler(shard_set.domain_sizes, "uniform", seed=3)
        return DomainShardBatches(shard_set, 16, 0, 2, 3, sampler, 2)

    reference = make()
    run, state = [], None
    for step in range(14):
        if step == 9:
            state = reference.state_dict()
        run.append(reference.next())
    reference.close()
    per_domain = {}
    for domain, batch in run:
        assert set(batch["domain"].tolist()) == {domain}
        per_domain.setdefault(domain, []).extend(batch["index"].tolist())
    for indices in per_domain.values():  # < one pass per domain: no sample twice
        assert len(indices) == len(set(indices))
    resumed = make()
    resumed.load_state_dict(state)
    resumed.start(9)
    for domain, expected in run[9:]:
        got_domain, batch = resumed.next()
        assert got_domain == domain and torch.equal(batch["image"], expected["image"])
    resumed.close()


def test_script_refuses_existing_output_and_bad_index(tiny, tmp_path):
    root, shards = tiny
    with pytest.raises(FileExistsError):
        _script().main(["--layout", "imagenet", "--root", root, "--out", shards, "--quiet"])
    index = json.load(open(os.path.join(shards, "index.json")))
    assert index["classes"] == ["ant", "bee", "cat"] and len(index["shards"]) == 5  # 30 samples, 7 per shard
    assert len(source_dataset(open_shards(shards), "val")) == 6
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardFormatError):
        open_shards(str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    os.remove(copy / index["shards"][1]["url"])
    with pytest.raises(FileNotFoundError, match="1 shard"):
        open_shards(str(copy))


# ------------------------------------------------------------------------------------------------ the trainer
def test_training_on_shards_resumes_exactly(demo_shards, tmp_path):
    """main_unic.py on the demo shards (UNIC + UDON: one domain stream of shards per domain, 2 workers):
    3 steps, then resumed to 6, ends with the weights of 6 steps in one go."""
    from tests.conftest import run_entry, tiny_overrides
    from unic.io import load_checkpoint

    extra = {"data.dataset": "wds", "data.num_workers": 2, "train.validate": False, "train.log_every": 1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 6), (resumed, 3), (resumed, 6)):
        result = run_entry(["main_unic.py", *tiny_overrides(demo_shards, str(out), **extra,
                                                            **{"train.max_steps": steps})])
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoint.pth'} at step 3" in result.stdout
    a, b = (load_checkpoint(str(out / "checkpoint.pth")) for out in (straight, resumed))
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
