"""ADE20K linear-probe parts: dataset (its facts from the registry), paired transforms, head, poly schedule,
sliding window, mIoU. The run and its command line are tested in test_eval_semseg.py."""

from __future__ import annotations

import colorsys
import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from unic.data.registry import get_dataset
from unic.eval.semseg import (
    IGNORE_INDEX,
    IMAGENET_MEAN_255,
    NUM_CLASSES,
    IMAGENET_STD_255,
    ADE20KDataset,
    AugmentationSampler,
    ConfusionMatrix,
    LinearSegHead,
    PhotoMetricDistortion,
    SegEvalTransform,
    SegTrainTransform,
    _slide_windows,
    hsv_to_rgb,
    item_seed,
    poly_lr,
    reduce_zero_label,
    resize_concat,
    rgb_to_hsv,
    slide_inference,
)

# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


def write_ade20k(root, split: str, num_images: int = 3, size_hw: tuple[int, int] = (20, 30), seed: int = 0) -> list:
    """Write random JPG images and PNG label maps (values 0..150) in the ADEChallengeData2016 layout."""
    rng = np.random.RandomState(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(num_images):
        image = rng.randint(0, 256, size=(*size_hw, 3), dtype=np.uint8)
        label = rng.randint(0, 151, size=size_hw).astype(np.uint8)
        label[0, 0], label[0, 1], label[0, 2] = 0, 1, 150
        Image.fromarray(image).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
        Image.fromarray(label).save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
        labels.append(label)
    return labels


def test_reduce_zero_label_mapping():
    label = np.array([[0, 1, 2], [150, 255, 37]], dtype=np.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 36]]


def test_ade20k_dataset_reads_layout_and_reduces_labels(tmp_path):
    raw_labels = write_ade20k(tmp_path, "validation", num_images=3)
    dataset = ADE20KDataset(tmp_path, split="validation")
    assert len(dataset) == 3
    image, label = dataset[1]
    assert image.mode == "RGB" and image.size == (30, 20)
    assert label.dtype == np.uint8 and label.shape == (20, 30)
    expected = raw_labels[1].astype(np.int64) - 1
    expected[raw_labels[1] == 0] = 255
    assert np.array_equal(label, expected)
    assert label[0, :3].tolist() == [255, 0, 149]
    assert label[label != 255].max() <= 149

    raw = ADE20KDataset(tmp_path, split="validation", reduce_zero_label=False)
    assert np.array_equal(raw[1][1], raw_labels[1])

    with_transform = ADE20KDataset(tmp_path, split="validation", transform=SegEvalTransform(base_scale=(64, 16)))
    image_t, label_t = with_transform[0]
    assert image_t.shape == (3, 16, 24) and image_t.dtype == torch.float32
    assert label_t.shape == (20, 30) and label_t.dtype == torch.int64


def test_ade20k_facts_are_the_registry_entry():
    spec = get_dataset("ade20k")
    assert (NUM_CLASSES, IGNORE_INDEX) == (spec.defaults["num_classes"], spec.defaults["ignore_index"]) == (150, 255)
    assert spec.splits == ("training", "validation") and spec.defaults["reduce_zero_label"]


def test_ade20k_dataset_errors(tmp_path):
    write_ade20k(tmp_path, "training", num_images=2)
    with pytest.raises(FileNotFoundError, match="validation") as missing:
        ADE20KDataset(tmp_path, split="validation")
    assert get_dataset("ade20k").layout in str(missing.value)  # the layout error shows the registry's text
    with pytest.raises(ValueError, match="split must be one of 'training', 'validation'"):
        ADE20KDataset(tmp_path, split="test")
    (tmp_path / "annotations" / "training" / "ADE_training_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="no annotation"):
        ADE20KDataset(tmp_path, split="training")


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------


def _unnormalize(image_3HW: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(3, 1, 1)
    return image_3HW * std + mean


def test_imagenet_normalisation_is_mmseg_s_in_pixel_units():
    assert IMAGENET_MEAN_255 == pytest.approx((123.675, 116.28, 103.53), abs=1e-9)
    assert IMAGENET_STD_255 == pytest.approx((58.395, 57.12, 57.375), abs=1e-9)


def test_train_transform_draws_only_from_its_generator(tmp_path):
    """An item's augmentation is a function of its generator's seed: not of torch's global RNG, which it leaves
    alone; ``dataset[(draw, index)]`` is item ``index`` transformed with a generator seeded with ``draw``."""
    write_ade20k(tmp_path, "training", num_images=2, size_hw=(30, 50))
    transform = SegTrainTransform(crop_size=16, base_scale=(64, 24))
    dataset = ADE20KDataset(tmp_path, "training", transform)
    raw = ADE20KDataset(tmp_path, "training")[1]
    torch.manual_seed(0)
    first = transform(*raw, generator=torch.Generator().manual_seed(7))
    state = torch.get_rng_state()
    torch.manual_seed(1)
    for again in (transform(*raw, generator=torch.Generator().manual_seed(7)), dataset[(7, 1)]):
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    torch.manual_seed(0)
    transform(*raw, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not drawn from
    others = [dataset[(draw, 1)][0] for draw in range(8, 12)]
    assert sum(not torch.equal(image, first[0]) for image in others) >= 3


def test_augmentation_sampler_gives_each_step_the_same_items_for_any_process_count():
    """Global batch 4 on 1 process and on 2 (2 each): every step holds the same (draw, index) pairs, the draw
    being item_seed(seed, epoch, index): a fresh one each pass."""
    items, seed = list(range(10)), 5
    for epoch in (0, 1):
        samplers = {world: [AugmentationSampler(items, num_replicas=world, rank=rank, seed=seed, drop_last=True)
                            for rank in range(world)] for world in (1, 2)}
        for sampler in (*samplers[1], *samplers[2]):
            sampler.set_epoch(epoch)
        single = list(samplers[1][0])
        shards = [list(sampler) for sampler in samplers[2]]
        for step in range(2):  # 10 // 4
            together = {pair for shard in shards for pair in shard[2 * step: 2 * step + 2]}
            assert together == set(single[4 * step: 4 * step + 4])
        assert all(draw == item_seed(seed, epoch, index) for draw, index in single)
        assert sorted(index for _, index in single) == items
    assert item_seed(seed, 0, 3) != item_seed(seed, 1, 3) != item_seed(seed + 1, 1, 3)


def test_train_transform_shapes_and_ignore_pixels_stay_255():
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, size=(30, 50, 3), dtype=np.uint8)
    label = rng.randint(0, 150, size=(30, 50)).astype(np.uint8)
    label[:, :10] = 255
    transform = SegTrainTransform(crop_size=16, base_scale=(64, 24))
    torch.manual_seed(0)
    for _ in range(20):
        image_t, label_t = transform(Image.fromarray(image), label)
        assert image_t.shape == (3, 16, 16) and image_t.dtype == torch.float32
        assert label_t.shape == (16, 16) and label_t.dtype == torch.int64
        assert set(label_t.unique().tolist()) <= set(np.unique(label).tolist())


def test_train_transform_keeps_image_and_label_aligned():
    """No rescale (ratio 1, base scale = image size): the red channel marks ignore pixels, so after crop and flip
    red == 255 exactly where label == 255 inside the image, and the padding is 0 (normalised) / 255."""
    height, width = 12, 40
    label = np.tile((np.arange(width) % 7).astype(np.uint8), (height, 1))
    label[:, 5:9] = 255
    label[3:6, 20:33] = 255
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.where(label == 255, 255, 0)
    image[..., 1] = np.arange(width, dtype=np.uint8)[None, :] * 3  # position code, to detect flips
    transform = SegTrainTransform(
        crop_size=16, base_scale=(width, height), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=False
    )
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        image_t, label_t = transform(image, label)
        assert image_t.shape == (3, 16, 16) and label_t.shape == (16, 16)
        assert torch.all(label_t[height:] == 255) and torch.all(image_t[:, height:] == 0)  # bottom padding
        pixels = _unnormalize(image_t[:, :height]).round()
        assert torch.equal(pixels[0] == 255, label_t[:height] == 255)
        columns = (pixels[1, 0] / 3).long()  # original column of every output column
        # Every output column shows one original column: labels must match it where not ignored.
        original = torch.from_numpy(label.astype(np.int64))[:, columns]
        assert torch.equal(label_t[:height], original)
        flips += int(columns[0] > columns[-1])
    assert 0 < flips < 20  # flip p=0.5 happened sometimes


def test_train_transform_rescale_range_and_cat_max_ratio():
    label = np.ones((40, 40), dtype=np.uint8)
    label[:20, :20] = 2
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    fixed = dict(base_scale=(40, 40), ratio_range=(1.0, 1.0), photometric=False, flip_prob=0.0, crop_size=20)

    def dominant_ratio(label_t: torch.Tensor) -> float:
        counts = torch.bincount(label_t.reshape(-1))
        return counts.max().item() / counts.sum().item()

    torch.manual_seed(0)
    with_limit = [dominant_ratio(SegTrainTransform(cat_max_ratio=0.75, **fixed)(image, label)[1]) for _ in range(30)]
    torch.manual_seed(0)
    without = [dominant_ratio(SegTrainTransform(cat_max_ratio=1.0, **fixed)(image, label)[1]) for _ in range(30)]
    assert sum(r >= 0.75 for r in with_limit) <= 2  # 10 retries almost always find a mixed crop
    assert sum(r >= 0.75 for r in without) >= 15

    # mmseg Resize(ratio_range=(0.5, 2.0), keep_ratio): the rescaled short side stays within [0.5, 2] * 16.
    transform = SegTrainTransform(crop_size=64, base_scale=(64, 16), photometric=False, cat_max_ratio=1.0)
    big = np.zeros((30, 60, 3), dtype=np.uint8)
    sides = []
    for _ in range(30):
        _, label_t = transform(big, np.zeros((30, 60), dtype=np.uint8))
        valid = label_t != 255
        sides.append((int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())))
    assert all(8 <= h <= 32 and w == round(h * 2) for h, w in sides)
    assert len(set(sides)) > 5


def test_eval_transform_keeps_label_size():
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    label = np.zeros((30, 40), dtype=np.uint8)
    image_t, label_t = SegEvalTransform(base_scale=(64, 16))(image, label)
    # factor = min(64 / 40, 16 / 30): short side 30 -> 16, long side 40 -> 21.
    assert image_t.shape == (3, 16, 21)
    assert label_t.shape == (30, 40)
    expected = (0.0 - torch.tensor(IMAGENET_MEAN_255)) / torch.tensor(IMAGENET_STD_255)
    assert torch.allclose(image_t[:, 0, 0], expected)


def test_dinov2_scale_rescales_the_short_side_whatever_the_aspect_ratio():
    """DINOv2's linear configs use img_scale=(99999999, 512): a panorama is not capped by a long edge (mmseg's stock
    (2048, 512) would give it a short side below 512)."""
    image = np.zeros((100, 500, 3), dtype=np.uint8)
    label = np.zeros((100, 500), dtype=np.uint8)
    assert SegEvalTransform()(image, label)[0].shape == (3, 512, 2560)
    assert SegEvalTransform(base_scale=(2048, 512))(image, label)[0].shape == (3, 410, 2048)
    assert SegEvalTransform()(image[:, :120], label[:, :120])[0].shape == (3, 512, 614)  # usual shapes: the same


def test_hsv_round_trip_matches_colorsys():
    rgb = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    rgb[:, 0, 0] = 0.5  # grey: hue undefined, saturation 0
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (1, 2), (4, 6), (3, 3)]:
        expected = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
        assert torch.allclose(hsv[:, y, x], torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(hsv_to_rgb(hsv), rgb, atol=1e-5)


def test_photometric_distortion_stays_in_range_and_is_seeded():
    image = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 8, 8))).float()
    distort = PhotoMetricDistortion()
    outputs = []
    for seed in range(8):
        torch.manual_seed(seed)
        out = distort(image.clone())
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
        assert torch.equal(out, out.round())  # uint8-valued, as mmseg's uint8 pipeline
        torch.manual_seed(seed)
        assert torch.equal(distort(image.clone()), out)
        outputs.append(out)
    assert sum(not torch.equal(out, image) for out in outputs) >= 4


# --------------------------------------------------------------------------------------------------------------
# Head and schedule
# --------------------------------------------------------------------------------------------------------------


def test_linear_seg_head_shapes_and_upsampling():
    torch.manual_seed(0)
    head = LinearSegHead(in_dim=8, num_classes=5)
    feats = torch.randn(2, 8, 4, 6)
    logits = head(feats, out_size=(16, 24))
    assert logits.shape == (2, 5, 16, 24)
    low = head(feats)
    assert low.shape == (2, 5, 4, 6)
    expected = torch.nn.functional.interpolate(low, size=(16, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected)
    assert sum(p.numel() for p in head.parameters()) == 8 * 2 + 8 * 5 + 5  # BN affine + 1x1 conv

    maps = [torch.randn(2, 3, 4, 6), torch.randn(2, 5, 2, 3)]
    assert resize_concat(maps).shape == (2, 8, 4, 6)


def test_poly_lr_values():
    base, total = 1e-3, 40000
    assert poly_lr(0, total, base) == pytest.approx(base * 1e-6)
    assert poly_lr(750, total, base) == pytest.approx(base * (1 - 750 / total) * (0.5 + 0.5 * 1e-6))
    assert poly_lr(1500, total, base) == pytest.approx(base * (1 - 1500 / total))
    assert poly_lr(20000, total, base) == pytest.approx(base * 0.5)
    assert poly_lr(total, total, base) == 0.0
    assert poly_lr(20000, total, base, warmup_iters=0, power=0.9, min_lr=1e-4) == pytest.approx(
        (base - 1e-4) * 0.5**0.9 + 1e-4
    )
    lrs = [poly_lr(s, total, base) for s in range(0, total, 500)]
    peak = int(np.argmax(lrs))
    assert peak == 3 and all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))


# --------------------------------------------------------------------------------------------------------------
# Sliding-window inference
# --------------------------------------------------------------------------------------------------------------


def _context_dependent_predict(num_classes: int):
    """A crop's logits depend on the whole crop (mean subtraction + zero-padded conv), like a real model."""
    conv = torch.nn.Conv2d(3, num_classes, kernel_size=3, padding=1)
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))

    def predict(crops: torch.Tensor) -> torch.Tensor:
        return conv(crops - crops.mean(dim=(2, 3), keepdim=True))

    return predict


def test_slide_windows_clamped_to_image():
    assert _slide_windows(7, 4, 2) == [(0, 4), (2, 6), (3, 7)]
    assert _slide_windows(4, 4, 2) == [(0, 4)]
    assert _slide_windows(3, 4, 2) == [(0, 3)]  # smaller than the crop: one shrunk window
    assert _slide_windows(1024, 512, 341) == [(0, 512), (341, 853), (512, 1024)]


@pytest.mark.parametrize("height, width", [(8, 8), (6, 8), (5, 3)])
def test_slide_inference_equals_whole_image_when_window_covers_it(height, width):
    predict = _context_dependent_predict(4)
    image = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    out = slide_inference(predict, image, num_classes=4, crop=8, stride=5)
    with torch.no_grad():
        assert torch.allclose(out, predict(image), atol=1e-6)


@pytest.mark.parametrize("windows_per_batch", [1, 2, 4])
def test_slide_inference_overlap_against_manual(windows_per_batch):
    predict = _context_dependent_predict(3)
    image = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    out = slide_inference(predict, image, num_classes=3, crop=4, stride=2, windows_per_batch=windows_per_batch)
    with torch.no_grad():
        left, right = predict(image[..., 0:4]), predict(image[..., 2:6])
    expected = torch.cat([left[..., :2], (left[..., 2:] + right[..., :2]) / 2, right[..., 2:]], dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, predict(image).detach(), atol=1e-3)  # windows really differ from whole image


# --------------------------------------------------------------------------------------------------------------
# Confusion matrix / mIoU
# --------------------------------------------------------------------------------------------------------------


def test_confusion_matrix_hand_computed():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 3, 4]])  # class 4 only predicted on an ignored pixel
    cm = ConfusionMatrix(num_classes=5)
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    metrics = cm.compute()
    # TP = [1, 2, 0, 0, 0], GT = [2, 2, 1, 0, 0], pred = [1, 3, 0, 1, 0], union = [2, 3, 1, 1, 0].
    iou = metrics["IoU"]
    assert iou[:4] == pytest.approx([0.5, 2 / 3, 0.0, 0.0]) and math.isnan(iou[4])
    assert metrics["mIoU"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert metrics["aAcc"] == pytest.approx(3 / 5)
    assert metrics["mAcc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)

    # Logits are accepted too, and batches accumulate.
    logits = torch.nn.functional.one_hot(pred.clamp(max=4), 5).permute(2, 0, 1)[None].float()
    cm.update(logits, target[None])
    assert cm.matrix.sum().item() == 10
    cm.reset()
    assert cm.matrix.sum().item() == 0
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([7]), torch.tensor([0]))


def test_confusion_matrix_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    num_classes = 6
    target = torch.randint(0, num_classes, (3, 10, 12), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    target[target == 5] = 255  # class 5 never in GT
    pred = torch.randint(0, num_classes - 1, (3, 10, 12), generator=gen)  # ... nor predicted: NaN
    cm = ConfusionMatrix(num_classes=num_classes)
    for i in range(3):
        cm.update(pred[i], target[i])
    metrics = cm.compute()
    valid = target != 255
    ious = []
    for c in range(num_classes):
        inter = ((pred == c) & (target == c) & valid).sum().item()
        union = (((pred == c) | (target == c)) & valid).sum().item()
        ious.append(inter / union if union else float("nan"))
    assert math.isnan(metrics["IoU"][5])
    assert metrics["IoU"][:5] == pytest.approx(ious[:5])
    assert metrics["mIoU"] == pytest.approx(float(np.nanmean(ious)))
    assert metrics["aAcc"] == pytest.approx(((pred == target) & valid).sum().item() / valid.sum().item())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _all_reduce_worker(rank: int, world_size: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        gen = torch.Generator().manual_seed(0)
        target = torch.randint(0, 4, (2, 6, 6), generator=gen)
        pred = torch.randint(0, 4, (2, 6, 6), generator=gen)
        cm = ConfusionMatrix(num_classes=4)
        cm.update(pred[rank], target[rank])  # each rank sees one image
        cm.all_reduce()
        if rank == 0:
            queue.put(cm.matrix.tolist())
    finally:
        dist.destroy_process_group()


def test_confusion_matrix_all_reduce_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_all_reduce_worker, args=(2, _free_port(), queue), nprocs=2, start_method="spawn")
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 6, 6), generator=gen)
    pred = torch.randint(0, 4, (2, 6, 6), generator=gen)
    single = ConfusionMatrix(num_classes=4)
    single.update(pred, target)
    assert queue.get() == single.matrix.tolist()
