"""Datasets, demo generation, deterministic sampling and corrupt-image handling."""

import json
import math
import os

import numpy as np

import pytest
import torch
from PIL import Image

from unic.data.demo import DEMO_DOMAINS, ensure_demo_data
from unic.data.folders import ImageListDataset, image_folder_dataset
from unic.data.sampling import GlobalBatchSampler, ShardSampler
from unic.data.transforms import eval_transform, udon_train_transform, uned_eval_transform, unic_train_transform
from unic.data.uned import read_info_file, uned_dataset


def test_demo_set_layout_and_idempotence(demo_root):
    for domain in DEMO_DOMAINS:
        for split in ("train", "val", "test"):
            entries = read_info_file(demo_root, domain, split)
            assert entries and all(os.path.isfile(p) for p, _ in entries[:5])
    before = os.path.getmtime(os.path.join(demo_root, "DEMO_COMPLETE"))
    assert ensure_demo_data(demo_root) == demo_root
    assert os.path.getmtime(os.path.join(demo_root, "DEMO_COMPLETE")) == before


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        ensure_demo_data(str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_uned_dataset_items_and_domains(demo_root):
    ds = uned_dataset(demo_root, "val", ["digits", "blobs"], eval_transform(32))
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["skipped"] == 0
    assert ds.domain_names == ["digits", "blobs"]
    assert {d for _, _, d in ds.samples} == {0, 1}


def test_uned_errors(tmp_path, demo_root):
    with pytest.raises(FileNotFoundError, match="missing split 'index'"):
        read_info_file(demo_root, "digits", "index")
    root = tmp_path / "uned"
    (root / "info_files" / "x").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "info_files" / "x" / "train.json").write_text(json.dumps([{"path": "../../etc/passwd", "class_id": 0}]))
    with pytest.raises(ValueError, match="escapes"):
        read_info_file(str(root), "x", "train")
    (root / "info_files" / "x" / "train.json").write_text(json.dumps([{"path": "a.jpg"}]))
    with pytest.raises(ValueError, match="class_id"):
        read_info_file(str(root), "x", "train")


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "train"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "cat" / "a.jpg")
    (root / "cat" / "b.jpg").write_bytes(b"this is not a jpeg")
    (root / "dog" / "c.png").write_bytes(b"")
    Image.new("RGBA", (20, 20), (0, 255, 0, 128)).save(root / "dog" / "d.png")
    Image.new("P", (20, 20)).save(root / "dog" / "e.png")
    ds = image_folder_dataset(str(root), eval_transform(16))
    assert ds.classes == ["cat", "dog"] and len(ds) == 5
    items = [ds[i] for i in range(len(ds))]
    assert [it["skipped"] for it in items] == [0, 2, 1, 0, 0]  # b.jpg and c.png are both passed over
    assert all(it["image"].shape == (3, 16, 16) for it in items)
    bad = ImageListDataset([(str(root / "cat" / "b.jpg"), [0], 0)], eval_transform(16))
    with pytest.raises(RuntimeError, match="consecutive unreadable"):
        bad[0]


def test_seeded_augmentation_depends_only_on_the_key(demo_root):
    ds = uned_dataset(demo_root, "train", ["shapes"], unic_train_transform(32))
    torch.manual_seed(1)
    a = ds[(3, 12345)]["image"]
    torch.manual_seed(2)
    b = ds[(3, 12345)]["image"]
    c = ds[(3, 54321)]["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    ds[(4, 1)]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left untouched


def test_global_batch_sampler_is_world_size_independent():
    single = list(GlobalBatchSampler(50, 8, 0, 1, seed=3))
    ranks = [list(GlobalBatchSampler(50, 8, r, 2, seed=3)) for r in range(2)]
    assert len(single) == 6
    for step in range(6):
        assert single[step] == ranks[0][step] + ranks[1][step]
    resumed = GlobalBatchSampler(50, 8, 0, 1, seed=3)
    resumed.set_position(0, 4)
    assert list(resumed) == single[4:]
    other_epoch = GlobalBatchSampler(50, 8, 0, 1, seed=3)
    other_epoch.set_position(1)
    assert list(other_epoch) != single


def test_shard_sampler_concatenates_to_dataset_order():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sum(shards, []) == list(range(11))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than this machine's 2 cores
def test_domain_streams_get_workers_by_sampling_probability_and_keep_their_batches(demo_root):
    """UDON's per-domain streams share the data workers in proportion to the sampling probabilities and are
    re-balanced after a dynamic update; which images each step gets never depends on the workers."""
    from unic.data.sampling import DomainSampler
    from unic.train.batches import DomainBatches

    ds = uned_dataset(demo_root, "val", ["digits", "shapes", "blobs"], eval_transform(16))
    sizes = [sum(1 for *_, d in ds.samples if d == i) for i in range(3)]

    def run(num_workers: int, steps: int = 6):
        sampler = DomainSampler(sizes, "dynamic", update_every=3, seed=0)
        batches = DomainBatches(ds, 8, 0, 1, 0, sampler, num_workers, pin=False)
        allocations, drawn = [list(batches.workers)], []
        for step in range(steps):
            domain, batch = batches.next()
            drawn.append((domain, batch["index"].tolist(), batch["image"].sum().item()))
            sampler.record(domain, torch.tensor(float(domain == 2) * 5.0 + 0.1))  # blobs looks hardest
            sampler.maybe_update()
        batches.close()
        return allocations + [batches.workers], drawn

    (before, after), with_workers = run(num_workers=6)
    assert before == [2, 2, 2]  # uniform until the first update
    assert after[2] > after[0] and after[2] > after[1] and after[0] >= 1  # blobs now drawn most
    _, without_workers = run(num_workers=0)
    assert with_workers == without_workers


def tf_bilinear_resize(image_HWC: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow's ``tf.image.resize(method=BILINEAR)`` (antialias=False: resize_bilinear with half-pixel
    centres), written out: source coordinate (i + 0.5) * in / out - 0.5, neighbours floor / ceil clamped to
    the image, weight = coordinate - floor(coordinate). Float output, no rounding."""
    def taps(out_size, in_size):
        rows = []
        for i in range(out_size):
            x = (i + 0.5) * in_size / out_size - 0.5
            lo = math.floor(x)
            rows.append((max(lo, 0), min(math.ceil(x), in_size - 1), x - lo))
        return rows

    img = image_HWC.astype(np.float64)
    tmp = np.stack([img[lo] * (1 - t) + img[hi] * t for lo, hi, t in taps(out_h, img.shape[0])])
    return np.stack([tmp[:, lo] * (1 - t) + tmp[:, hi] * t for lo, hi, t in taps(out_w, img.shape[1])], axis=1)


def _normalised(x_HWC: np.ndarray, mean, std) -> np.ndarray:
    return ((x_HWC / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def test_udon_train_transform_is_udon_bilinear_resize_crop_flip():
    from torchvision.transforms import InterpolationMode, RandomCrop, RandomHorizontalFlip, Resize

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tf = udon_train_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    resize = next(t for t in tf.transforms if isinstance(t, Resize))
    assert resize.interpolation == InterpolationMode.BILINEAR and resize.antialias is False
    assert resize.size == (37, 37)  # 256 / 224 * 32, both sides (aspect ratio not kept)
    assert [type(t) for t in tf.transforms[2:4]] == [RandomCrop, RandomHorizontalFlip]
    expected = _normalised(tf_bilinear_resize(array, 37, 37), (0.5,) * 3, (0.5,) * 3)
    out = tf(Image.fromarray(array)).double().numpy()
    assert out.shape == (3, 32, 32)
    windows = [expected[:, i:i + 32, j:j + 32] for i in range(6) for j in range(6)]
    windows += [w[:, :, ::-1] for w in windows]
    # some crop (maybe flipped) of TF's resize; float32 source coordinates in torch leave ~1e-4 differences
    distances = sorted(np.abs(out - w).max() for w in windows)
    assert distances[0] < 5e-4 and distances[1] > 0.1
    # PIL's bilinear filter antialiases when shrinking 8x: clearly a different image
    pil = np.asarray(Image.fromarray(array).resize((37, 37), Image.BILINEAR), dtype=np.float64)
    assert np.abs(pil - tf_bilinear_resize(array, 37, 37)).mean() > 10


def test_uned_eval_transform_is_udon_test_crop():
    rng = np.random.default_rng(1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for h, w in ((50, 74), (74, 50), (40, 40), (20, 27)):
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        short, long = min(h, w), max(h, w)
        new_long = int(long / short * 32)  # tf.cast truncates
        new_h, new_w = (32, new_long) if h <= w else (new_long, 32)
        resized = tf_bilinear_resize(array, new_h, new_w)
        top, left = (new_h - 32) // 2, (new_w - 32) // 2  # 50x74: long side 47, offset 7 (torchvision: 8)
        expected = _normalised(resized[top:top + 32, left:left + 32], mean, std)
        out = uned_eval_transform(32, mean, std)(Image.fromarray(array)).double().numpy()
        np.testing.assert_allclose(out, expected, atol=5e-4)
