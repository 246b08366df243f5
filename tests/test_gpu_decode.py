"""Decoding on the device (unic.data.gpu_decode) against the PIL path, on device=cpu (and cuda when present)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from unic.data.folders import BadImageError, ImageListDataset, load_image
from unic.data.gpu_decode import DeviceSample, DrawUnicParams, EncodedImage, GpuUnicAugment, read_encoded
from unic.data.transforms import unic_train_transform

IMG_SIZE = 48
SIZES = [(97, 131), (300, 200), (131, 97), (200, 300)]  # (height, width)


def natural_image(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour gradients, a few filled shapes and sensor-like noise: JPEG-friendly, every colour op bites."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(3 * xx + seed) * 0.5 + 0.5, yy, xx * yy], -1) * 200 + 20
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(5, width // 2)), y0 + int(rng.integers(5, height // 2))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("jpegs")
    paths = []
    for k, (height, width) in enumerate(SIZES):
        paths.append(str(root / f"{k}.jpg"))
        natural_image(height, width, k).save(paths[-1], quality=90, progressive=k == 1)
    paths.append(str(root / "grey.jpg"))
    natural_image(120, 90, 7).convert("L").save(paths[-1], quality=90)
    return paths


def seeded(fn, seed: int, *args):
    """fn(*args) under torch.manual_seed(seed), as ImageListDataset runs its transform; also the RNG state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = fn(*args)
        return out, torch.get_rng_state()


def cpu_and_device(paths: list[str], keys: list[tuple[int, int]], img_size: int = IMG_SIZE):
    """The PIL path's images and the device path's (on cpu) for the same (index, seed) keys."""
    cpu_tf, draw = unic_train_transform(img_size), DrawUnicParams()
    ref_BCHW = torch.stack([seeded(cpu_tf, seed, load_image(paths[i]))[0] for i, seed in keys])
    samples = [seeded(draw, seed, read_encoded(paths[i]))[0] for i, seed in keys]
    x_BCHW, bad = GpuUnicAugment(img_size)(samples, "cpu")
    assert bad == []
    return ref_BCHW, x_BCHW, samples


def test_draws_are_torchvision_draws_in_the_cpu_order(jpegs):
    """Replay the CPU transform's calls with torchvision's get_params and the members' own settings."""
    crop, flip, jitter, grey, blur, solarize = (t for t in unic_train_transform(IMG_SIZE).transforms[:6])
    draw = DrawUnicParams()
    seen = {"jitter": set(), "blur": set(), "flip": set(), "grey": set(), "solarize": set()}
    for seed in range(120):
        path = jpegs[seed % len(jpegs)]
        img = load_image(path)
        torch.manual_seed(seed)
        box = crop.get_params(img, crop.scale, crop.ratio)
        flipped = bool(torch.rand(1) < flip.p)
        order = factors = None
        if not jitter.p < torch.rand(1):
            cj = jitter.transforms[0]
            order, *factors = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
        greyed = bool(torch.rand(1) < grey.p)
        sigma = None
        if not blur.p < torch.rand(1):
            sigma = blur.transforms[0].get_params(*blur.transforms[0].sigma)
        solarized = torch.rand(1).item() < solarize.p

        params = seeded(draw, seed, read_encoded(path))[0].params
        assert params.crop == tuple(box) and params.flip == flipped
        assert params.grayscale == greyed and params.solarize == solarized
        if order is None:
            assert params.jitter_order is None and params.jitter_factors is None
        else:
            assert params.jitter_order == tuple(order.tolist()) and params.jitter_factors == tuple(factors)
        assert params.blur_sigma == sigma
        for name, value in [("jitter", order is None), ("blur", sigma is None), ("flip", flipped),
                            ("grey", greyed), ("solarize", solarized)]:
            seen[name].add(value)
    assert all(values == {True, False} for values in seen.values()), seen  # every branch was exercised
    assert (tuple(blur.transforms[0].kernel_size), solarize.threshold) == ((9, 9), 128)  # what the device side assumes


def test_draws_consume_the_rng_like_the_cpu_transform(jpegs):
    """Same number and kind of draws: the global RNG ends where the full PIL transform leaves it."""
    cpu_tf, draw = unic_train_transform(IMG_SIZE), DrawUnicParams()
    for seed in range(40):
        path = jpegs[seed % len(jpegs)]
        assert torch.equal(seeded(cpu_tf, seed, load_image(path))[1], seeded(draw, seed, read_encoded(path))[1])


def _category(sample: DeviceSample) -> str:
    p = sample.params
    if p.grayscale or p.solarize:
        return "grey/solarise"
    return {(False, False): "crop+flip", (True, False): "jitter", (False, True): "blur",
            (True, True): "jitter+blur"}[(p.jitter_order is not None, p.blur_sigma is not None)]


def test_pixels_close_to_the_pil_path_per_key(jpegs):
    """Mean |difference| per image in normalised units, 12 keys of each kind. Measured (48 px, these images):
    crop+flip and blur ~0.005 (max 0.006), jitter ~0.03 (max 0.06: PIL truncates each blend to 8 bits and
    shifts hue in 8-bit HSV), grayscale/solarise up to 0.07. A wrong box, flip or op order costs > 0.1."""
    draw, per_kind = DrawUnicParams(), 12
    limits = {"crop+flip": 0.012, "blur": 0.012, "jitter": 0.09, "jitter+blur": 0.09, "grey/solarise": 0.12}
    keys_by_kind: dict[str, list[tuple[int, int]]] = {}
    for seed in range(3000):  # drawing only reads the header: pick the keys, then run both paths on them
        index = seed % len(jpegs)
        kind = _category(seeded(draw, seed, read_encoded(jpegs[index]))[0])
        if len(keys_by_kind.setdefault(kind, [])) < per_kind:
            keys_by_kind[kind].append((index, seed))
    keys = [key for kind in limits for key in keys_by_kind[kind]]
    assert len(keys) == len(limits) * per_kind
    ref_BCHW, x_BCHW, samples = cpu_and_device(jpegs, keys)
    diff_B = (x_BCHW - ref_BCHW).abs().mean((1, 2, 3))
    for k, (kind, limit) in enumerate(limits.items()):
        assert {_category(s) for s in samples[k * per_kind:(k + 1) * per_kind]} == {kind}
        assert diff_B[k * per_kind:(k + 1) * per_kind].max() < limit, (kind, diff_B[k * per_kind:(k + 1) * per_kind])
    # the checks have teeth: undoing the flip of the flipped keys puts them far from the CPU path
    flipped = [i for i, s in enumerate(samples) if s.params.flip]
    assert (x_BCHW[flipped].flip(-1) - ref_BCHW[flipped]).abs().mean((1, 2, 3)).min() > 0.1


def test_batch_distribution_matches_the_pil_path(jpegs):
    """Channel means and stds over 240 keys; measured differences ~0.02 (means, the CPU path is darker by
    PIL's truncation) and < 0.01 (stds)."""
    keys = [(seed % len(jpegs), 1000 + seed) for seed in range(240)]
    ref_BCHW, x_BCHW, _ = cpu_and_device(jpegs, keys, img_size=32)
    assert torch.allclose(x_BCHW.mean((0, 2, 3)), ref_BCHW.mean((0, 2, 3)), atol=0.05)
    assert torch.allclose(x_BCHW.std((0, 2, 3)), ref_BCHW.std((0, 2, 3)), atol=0.03)
    # the spread between images (what the jitter adds) matches as well
    assert torch.allclose(x_BCHW.mean((2, 3)).std(0), ref_BCHW.mean((2, 3)).std(0), atol=0.05)


def test_output_of_a_key_does_not_depend_on_the_batch(jpegs):
    draw, augment = DrawUnicParams(), GpuUnicAugment(IMG_SIZE)
    samples = [seeded(draw, seed, read_encoded(jpegs[seed % len(jpegs)]))[0] for seed in range(12)]
    full_BCHW, _ = augment(samples, "cpu")
    order = [7, 3, 11, 0]
    part_BCHW, _ = augment([samples[i] for i in order], "cpu")
    assert torch.allclose(part_BCHW, full_BCHW[order], atol=1e-5)
    single_BCHW, _ = augment([samples[5]], "cpu")
    assert torch.allclose(single_BCHW[0], full_BCHW[5], atol=1e-5)


def _write_bad_files(root) -> tuple[str, str]:
    truncated, not_image = str(root / "truncated.jpg"), str(root / "notes.jpg")
    natural_image(97, 131, 3).save(truncated, quality=90)
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with open(not_image, "w") as f:
        f.write("not an image\n")
    return truncated, not_image


def test_reader_routes_and_rejects(tmp_path, jpegs, monkeypatch):
    """Plain JPEGs stay encoded; PNG with alpha, CMYK and JPEGs with a tail go the load_image route; bad files
    (truncated, not an image, FIFO, folder, bomb) raise BadImageError without blocking."""
    for path in jpegs:
        image = read_encoded(path)
        assert image.is_jpeg and (image.height, image.width) == load_image(path).size[::-1]
    rgba = natural_image(60, 80, 1).convert("RGBA")
    alpha = Image.linear_gradient("L").resize((80, 60))
    alpha.paste(0, (0, 0, 10, 10))  # fully transparent corner
    rgba.putalpha(alpha)
    cmyk = natural_image(60, 80, 2).convert("CMYK")
    tail = str(tmp_path / "tail.jpg")
    natural_image(60, 80, 3).save(tail)
    with open(tail, "ab") as f:
        f.write(b"camera maker notes")
    rgba.save(tmp_path / "alpha.png")
    cmyk.save(tmp_path / "cmyk.jpg")
    for path in [str(tmp_path / "alpha.png"), str(tmp_path / "cmyk.jpg"), tail]:
        image = read_encoded(path)
        assert not image.is_jpeg and image.data.dtype == torch.uint8
        assert torch.equal(image.data, TF.pil_to_tensor(load_image(path)))  # composited on white, like load_image
    # white where fully transparent
    assert read_encoded(str(tmp_path / "alpha.png")).data[:, 0, 0].tolist() == [255, 255, 255]

    os.mkfifo(tmp_path / "fifo.jpg")
    truncated, not_image = _write_bad_files(tmp_path)
    for path in [truncated, not_image, str(tmp_path / "fifo.jpg"), str(tmp_path), str(tmp_path / "missing.jpg")]:
        with pytest.raises(BadImageError, match=os.path.basename(path)):
            read_encoded(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 97 x 131 is over twice the limit: a bomb
    with pytest.raises(BadImageError, match="DecompressionBomb"):
        read_encoded(jpegs[0])


def test_images_the_device_cannot_decode_are_replaced_and_reported(tmp_path, jpegs):
    """A truncated stream fails the batched decode_jpeg, then alone, then PIL: replaced, reported, and the
    rest of the batch is what it would be without it. The alpha PNG composites as load_image does."""
    truncated, _ = _write_bad_files(tmp_path)
    rgba = natural_image(70, 90, 4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "alpha.png")
    draw, augment = DrawUnicParams(), GpuUnicAugment(IMG_SIZE)
    with open(truncated, "rb") as f:
        data = f.read()
    broken = EncodedImage(truncated, torch.frombuffer(bytearray(data), dtype=torch.uint8), 97, 131)
    good = [seeded(draw, seed, read_encoded(path))[0] for seed, path in enumerate(jpegs[:3])]
    png = seeded(draw, 3, read_encoded(str(tmp_path / "alpha.png")))[0]
    batch = [good[0], draw(broken), good[1], png, good[2]]
    x_BCHW, bad = augment(batch, "cpu")
    assert x_BCHW.shape == (5, 3, IMG_SIZE, IMG_SIZE) and torch.isfinite(x_BCHW).all()
    assert len(bad) == 1 and bad[0].startswith(f"{truncated}: ")
    clean_BCHW, _ = augment([good[0], good[1], png, good[2]], "cpu")
    assert torch.allclose(x_BCHW[[0, 2, 3, 4]], clean_BCHW, atol=1e-5)
    assert torch.equal(x_BCHW[1], x_BCHW[2])  # the next decoded image of the batch takes its place
    ref = seeded(unic_train_transform(IMG_SIZE), 3, load_image(str(tmp_path / "alpha.png")))[0]
    assert (x_BCHW[3] - ref).abs().mean() < 0.15
    with pytest.raises(BadImageError, match="no image of the batch"):
        augment([draw(broken)], "cpu")


def _collate(items: list[dict]) -> dict:
    """As the training batches do: tensors for numbers, a list for the device samples."""
    return {key: [item[key] for item in items] if key in ("image", "bad") else
            torch.tensor([item[key] for item in items]) for key in items[0]}


def test_dataset_through_a_dataloader_with_two_workers(tmp_path, jpegs):
    truncated, not_image = _write_bad_files(tmp_path)
    paths = [jpegs[0], truncated, jpegs[1], not_image, jpegs[2], jpegs[3], jpegs[4]]
    dataset = ImageListDataset([(p, [k], 0) for k, p in enumerate(paths)], transform=DrawUnicParams(),
                               reader=read_encoded)
    batches = [[(i, 100 + i) for i in range(4)], [(i, 200 + i) for i in range(3, 7)]]
    augment = GpuUnicAugment(IMG_SIZE)

    def run(num_workers: int):
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate)
        out = []
        for batch in loader:
            images_BCHW, bad = augment(batch["image"], "cpu")
            assert bad == []
            out.append((batch, images_BCHW))
        return out

    with_workers, in_process = run(2), run(0)
    for (batch, images_BCHW), (ref_batch, ref_BCHW) in zip(with_workers, in_process):
        assert all(isinstance(s, DeviceSample) for s in batch["image"])
        assert [s.params for s in batch["image"]] == [s.params for s in ref_batch["image"]]
        assert torch.equal(images_BCHW, ref_BCHW)
        assert torch.equal(batch["skipped"], ref_batch["skipped"])
    first, second = with_workers[0][0], with_workers[1][0]
    # index 1 (truncated) is replaced by index 2, index 3 (not an image) by index 4; both reported
    assert first["skipped"].tolist() == [0, 1, 0, 1] and second["skipped"].tolist() == [1, 0, 0, 0]
    assert first["bad"][1].startswith(truncated) and first["bad"][3].startswith(not_image)
    assert first["image"][1].image.path == jpegs[1] and first["label"].tolist() == [0, 2, 2, 4]
    # the augmentation of a key is the one the seed draws for the image actually used
    assert first["image"][1].params == seeded(DrawUnicParams(), 101, read_encoded(jpegs[1]))[0].params


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_cuda_decode_matches_cpu(jpegs, tmp_path):
    truncated, _ = _write_bad_files(tmp_path)
    draw, augment = DrawUnicParams(), GpuUnicAugment(IMG_SIZE)
    samples = [seeded(draw, seed, read_encoded(jpegs[seed % len(jpegs)]))[0].pin_memory() for seed in range(16)]
    assert all(s.image.data.is_pinned() for s in samples)
    cpu_BCHW, _ = augment(samples, "cpu")
    cuda_BCHW, bad = augment(samples, "cuda")
    assert cuda_BCHW.device.type == "cuda" and bad == []
    images, _ = augment.decode(samples, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the augmentation must not wait for the device
    try:
        crops_BCHW = torch.cat([augment.crop_resize(image, s.params) for image, s in zip(images, samples)])
        again_BCHW = augment.augment(crops_BCHW, [s.params for s in samples])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(again_BCHW, cuda_BCHW, atol=1e-5)
    assert (cuda_BCHW.cpu() - cpu_BCHW).abs().mean() < 0.03  # nvjpeg's IDCT/upsampling differ by a few levels
    with open(truncated, "rb") as f:
        broken = EncodedImage(truncated, torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), 97, 131)
    x_BCHW, bad = augment(samples[:3] + [draw(broken)], "cuda")
    assert x_BCHW.shape[0] == 4 and len(bad) == 1
