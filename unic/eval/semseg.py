"""Plain-PyTorch parts of the ADE20K linear probe (DINOv2 linear protocol, no mmcv/mmseg).

What mmseg provides for that protocol, rewritten with numpy/PIL/torch and matching its semantics:

- :class:`ADE20KDataset`: ``root/images/{split}/*.jpg`` + ``root/annotations/{split}/*.png``, with
  ``reduce_zero_label`` (0 -> 255 ignore, others minus 1: 150 classes 0..149);
- :class:`SegTrainTransform` / :class:`SegEvalTransform`: the ADE20K pipelines of DINOv2's linear configs
  (mmseg Resize to ``img_scale=(99999999, 512)`` with ratio range, RandomCrop with ``cat_max_ratio``,
  RandomFlip, PhotoMetricDistortion, Normalize, Pad);
- :class:`LinearSegHead`: BatchNorm + 1x1 conv (mmseg ``BNHead`` as used by DINOv2's linear configs);
- :func:`poly_lr`: mmseg's poly schedule with linear warm-up;
- :func:`slide_inference`: mmseg's sliding-window inference;
- :class:`ConfusionMatrix`: mIoU / aAcc / mAcc as mmseg's ``eval_metrics``, reducible across ranks;
- :class:`FrozenPatchBackbone`, :func:`segment`, :func:`train_linear_head`, :func:`evaluate_segmentation`: the
  frozen encoder as a patch-feature extractor, the training loop and the distributed evaluation, and
  :func:`save_visualization` for image / ground truth / prediction PNGs;
- :class:`AugmentationSampler`: each training item's augmentation drawn from a generator seeded with
  (seed, epoch, index), so the trained head does not depend on the number of loader workers.

The dataset facts (150 classes, ignore label 255, the layout, the splits) are those of the ``ade20k`` entry of
:mod:`unic.data.registry`. :mod:`unic.eval.semseg_run` assembles these parts into a run, and
``eval_dense/eval_semseg.py`` is the command line around it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unic import distributed
from unic.config import IMAGENET_MEAN, IMAGENET_STD
from unic.data.registry import get_dataset

logger = logging.getLogger(__name__)

ADE20K = get_dataset("ade20k")
NUM_CLASSES = ADE20K.defaults["num_classes"]
IGNORE_INDEX = ADE20K.defaults["ignore_index"]
# mmseg's ImageNet normalisation (unic.config's, one definition), in 0..255 pixel units.
IMAGENET_MEAN_255 = tuple(255.0 * m for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(255.0 * s for s in IMAGENET_STD)
# img_scale of DINOv2's ADE20K linear configs (mmseg's stock ADE20K config has (2048, 512)): the short side is
# rescaled to 512 (x the training ratio) whatever the aspect ratio.
DINOV2_ADE20K_SCALE = (99_999_999, 512)

SegTransform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K label shift (mmseg ``LoadAnnotations(reduce_zero_label=True)``): 0 -> 255, k -> k - 1."""
    label = label.astype(np.uint8, copy=True)
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


class ADE20KDataset(torch.utils.data.Dataset):
    """ADE20K (ADEChallengeData2016 layout) returning ``transform(image, label)``.

    Without a transform an item is ``(PIL RGB image, uint8 label array)``; labels are already reduced
    (ignore = 255) when ``reduce_zero_label`` is true. ``dataset[(draw, index)]`` (what
    :class:`AugmentationSampler` yields) transforms item ``index`` with a ``torch.Generator`` seeded with ``draw``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "training",
        transform: SegTransform | None = None,
        reduce_zero_label: bool = ADE20K.defaults["reduce_zero_label"],
    ) -> None:
        if split not in ADE20K.splits:
            raise ValueError(f"split must be one of {', '.join(map(repr, ADE20K.splits))}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        image_dir = self.root / "images" / split
        label_dir = self.root / "annotations" / split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"ADE20K folder {folder} not found: expected {ADE20K.layout} (root={self.root})"
                )
        self.image_paths = sorted(image_dir.glob("*.jpg"))
        if not self.image_paths:
            raise FileNotFoundError(f"no .jpg images in {image_dir}")
        self.label_paths = [label_dir / f"{path.stem}.png" for path in self.image_paths]
        missing = [str(path) for path in self.label_paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) in {image_dir} have no annotation, e.g. {missing[0]}"
            )

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_label(self, index: int) -> np.ndarray:
        with Image.open(self.label_paths[index]) as label_img:
            label = np.array(label_img, dtype=np.uint8)
        if label.ndim != 2:
            raise ValueError(f"{self.label_paths[index]}: expected a single-channel label map, got {label.shape}")
        return reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, key: int | tuple[int, int]):
        draw, index = key if isinstance(key, tuple) else (None, key)
        with Image.open(self.image_paths[index]) as img:
            image = img.convert("RGB")
        label = self.load_label(index)
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(
                f"{self.image_paths[index]}: image size {image.size} differs from its label {label.shape[::-1]}"
            )
        if self.transform is None:
            return image, label
        if draw is None:
            return self.transform(image, label)
        return self.transform(image, label, generator=torch.Generator().manual_seed(draw))


# --------------------------------------------------------------------------------------------------------------
# Transforms (paired image + label). Images are float (3, H, W) tensors in 0..255 until normalisation.
# --------------------------------------------------------------------------------------------------------------


def _to_tensors(image: Image.Image | np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    image_np = np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if image_np.ndim != 3 or image_np.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image_np.shape}")
    image_3HW = torch.from_numpy(image_np).permute(2, 0, 1).float()
    label_HW = torch.from_numpy(np.array(label, dtype=np.int64))
    if tuple(label_HW.shape) != tuple(image_np.shape[:2]):
        raise ValueError(f"label shape {tuple(label_HW.shape)} differs from image shape {image_np.shape[:2]}")
    return image_3HW, label_HW


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale`` size: largest factor with long edge <= max(scale) and short edge <= min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_image(image_3HW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize without antialiasing (as cv2.INTER_LINEAR), rounded back to uint8 values."""
    if tuple(image_3HW.shape[-2:]) == tuple(size):
        return image_3HW
    out = F.interpolate(image_3HW[None], size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def resize_label(label_HW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize (torch's ``nearest`` picks floor(dst * scale), as cv2.INTER_NEAREST)."""
    if tuple(label_HW.shape) == tuple(size):
        return label_HW
    return F.interpolate(label_HW[None, None].float(), size=size, mode="nearest")[0, 0].long()


def normalize_image(
    image_3HW: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN_255,
    std: Sequence[float] = IMAGENET_STD_255,
) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=image_3HW.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image_3HW.dtype).view(3, 1, 1)
    return (image_3HW - mean_t) / std_t


def rgb_to_hsv(rgb_3HW: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV with hue in [0, 1) (a full turn), saturation and value in [0, 1]."""
    r, g, b = rgb_3HW.unbind(0)
    maxc, _ = rgb_3HW.max(dim=0)
    minc, _ = rgb_3HW.min(dim=0)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe_delta = delta.clamp_min(1e-12)
    hue = torch.where(
        maxc == r,
        ((g - b) / safe_delta) % 6.0,
        torch.where(maxc == g, (b - r) / safe_delta + 2.0, (r - g) / safe_delta + 4.0),
    )
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue)) % 1.0
    return torch.stack([hue, sat, maxc])


def hsv_to_rgb(hsv_3HW: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv` (closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6)."""
    hue, sat, val = hsv_3HW.unbind(0)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=hsv_3HW.dtype, device=hsv_3HW.device).view(3, 1, 1)
    k = (offsets + hue[None] * 6.0) % 6.0
    return val[None] - (val * sat)[None] * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion``: each of brightness, contrast, saturation and hue with probability 1/2,
    contrast either first or last.

    Works on float images in 0..255 and clips/truncates after each step as mmseg's uint8 ``convert`` does; the
    HSV round trip is in float (OpenCV's is in uint8), so values differ from mmseg by at most rounding.
    ``hue_delta`` is in OpenCV units (180 per turn). Draws come from ``generator`` (torch's global RNG when None).
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    @staticmethod
    def _coin(generator: torch.Generator | None) -> bool:
        return bool(torch.randint(2, (), generator=generator).item())

    @staticmethod
    def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    @staticmethod
    def _convert(image: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
        return (image * alpha + beta).clamp_(0, 255).floor_()

    def __call__(self, image_3HW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        coin, gen = self._coin, generator
        if coin(gen):
            delta = self.brightness_delta
            image_3HW = self._convert(image_3HW, beta=self._uniform(-delta, delta, gen))
        contrast_first = coin(gen)
        if contrast_first and coin(gen):
            image_3HW = self._convert(image_3HW, alpha=self._uniform(*self.contrast_range, gen))
        if coin(gen):
            hsv = rgb_to_hsv(image_3HW / 255.0)
            hsv[1] = (hsv[1] * self._uniform(*self.saturation_range, gen)).clamp_(0, 1)
            image_3HW = (hsv_to_rgb(hsv) * 255.0).round_().clamp_(0, 255)
        if coin(gen):
            hsv = rgb_to_hsv(image_3HW / 255.0)
            # numpy.randint: high excluded
            shift = int(torch.randint(-self.hue_delta, self.hue_delta, (), generator=gen).item())
            hsv[0] = (hsv[0] + shift / 180.0) % 1.0
            image_3HW = (hsv_to_rgb(hsv) * 255.0).round_().clamp_(0, 255)
        if not contrast_first and coin(gen):
            image_3HW = self._convert(image_3HW, alpha=self._uniform(*self.contrast_range, gen))
        return image_3HW


class SegTrainTransform:
    """mmseg's ADE20K training pipeline (as in DINOv2's linear configs) on a (PIL image, uint8 label) pair.

    Resize(img_scale=base_scale, ratio_range, keep_ratio=True) -> RandomCrop(crop_size, cat_max_ratio) ->
    RandomFlip(flip_prob) -> PhotoMetricDistortion -> Normalize -> Pad(crop_size, 0 for the image, 255 for the
    label). Returns a float (3, crop_h, crop_w) image and an int64 (crop_h, crop_w) label. Every draw comes from
    the call's ``generator`` (torch's global RNG when None): training seeds one per item from (seed, epoch,
    index) (:class:`AugmentationSampler`), so an item's augmentation does not depend on the loader's workers.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        base_scale: tuple[int, int] = DINOV2_ADE20K_SCALE,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255,
        ignore_index: int = IGNORE_INDEX,
        max_crop_tries: int = 10,
    ) -> None:
        self.crop_size = _pair(crop_size)
        self.base_scale = (int(base_scale[0]), int(base_scale[1]))
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric else None
        self.mean, self.std = mean, std
        self.ignore_index = ignore_index
        self.max_crop_tries = max_crop_tries

    def _random_scale(self, generator: torch.Generator | None) -> tuple[int, int]:
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        return int(self.base_scale[0] * ratio), int(self.base_scale[1] * ratio)

    def _random_crop_box(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        margin_h = max(height - self.crop_size[0], 0)
        margin_w = max(width - self.crop_size[1], 0)
        top = int(torch.randint(margin_h + 1, (), generator=generator).item())
        left = int(torch.randint(margin_w + 1, (), generator=generator).item())
        return top, min(top + self.crop_size[0], height), left, min(left + self.crop_size[1], width)

    def _crop_box(self, label_HW: torch.Tensor, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """mmseg RandomCrop: redraw (up to ``max_crop_tries`` times) while one class covers
        >= ``cat_max_ratio`` of the crop's non-ignored pixels; the last draw is kept."""
        height, width = label_HW.shape
        box = self._random_crop_box(height, width, generator)
        if self.cat_max_ratio >= 1.0:
            return box
        for _ in range(self.max_crop_tries):
            top, bottom, left, right = box
            crop = label_HW[top:bottom, left:right]
            counts = torch.bincount(crop[crop != self.ignore_index].reshape(-1))
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
            box = self._random_crop_box(height, width, generator)
        return box

    def __call__(self, image: Image.Image | np.ndarray, label: np.ndarray,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        image_3HW, label_HW = _to_tensors(image, label)
        size = rescale_size(*label_HW.shape, self._random_scale(generator))
        image_3HW, label_HW = resize_image(image_3HW, size), resize_label(label_HW, size)

        top, bottom, left, right = self._crop_box(label_HW, generator)
        image_3HW, label_HW = image_3HW[:, top:bottom, left:right], label_HW[top:bottom, left:right]

        if torch.rand((), generator=generator).item() < self.flip_prob:
            image_3HW, label_HW = image_3HW.flip(-1), label_HW.flip(-1)
        if self.photometric is not None:
            image_3HW = self.photometric(image_3HW, generator)
        image_3HW = normalize_image(image_3HW, self.mean, self.std)

        pad_h = self.crop_size[0] - image_3HW.shape[1]
        pad_w = self.crop_size[1] - image_3HW.shape[2]
        if pad_h > 0 or pad_w > 0:  # pad bottom/right, as mmseg's Pad(size=crop_size)
            image_3HW = F.pad(image_3HW, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
            label_HW = F.pad(label_HW, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=self.ignore_index)
        return image_3HW.contiguous(), label_HW.contiguous()


class SegEvalTransform:
    """mmseg's ADE20K test pipeline: Resize(img_scale=base_scale, keep_ratio=True) (short side 512 with
    DINOv2's scale) and Normalize. The label stays at its original size; upsample logits to it before scoring."""

    def __init__(
        self,
        base_scale: tuple[int, int] = DINOV2_ADE20K_SCALE,
        mean: Sequence[float] = IMAGENET_MEAN_255,
        std: Sequence[float] = IMAGENET_STD_255,
    ) -> None:
        self.base_scale = (int(base_scale[0]), int(base_scale[1]))
        self.mean, self.std = mean, std

    def __call__(self, image: Image.Image | np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image_3HW, label_HW = _to_tensors(image, label)
        image_3HW = resize_image(image_3HW, rescale_size(*label_HW.shape, self.base_scale))
        return normalize_image(image_3HW, self.mean, self.std).contiguous(), label_HW


# --------------------------------------------------------------------------------------------------------------
# Head, schedule, inference
# --------------------------------------------------------------------------------------------------------------


def resize_concat(feature_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmseg ``input_transform='resize_concat'``: resize every (B, C_i, h_i, w_i) map to the first one's size
    (bilinear) and concatenate along channels (for the 'last 4 blocks' variant)."""
    size = feature_maps[0].shape[-2:]
    resized = [
        fm if fm.shape[-2:] == size else F.interpolate(fm, size=size, mode="bilinear", align_corners=False)
        for fm in feature_maps
    ]
    return torch.cat(resized, dim=1)


class LinearSegHead(nn.Module):
    """BatchNorm2d + 1x1 conv on a (B, C, h, w) patch-feature map (mmseg ``BNHead`` of DINOv2's linear
    protocol).

    DINOv2's linear configs use ``dropout_ratio=0``, hence the default; ``dropout`` > 0 adds mmseg's Dropout2d
    before the conv. Under DDP convert the BN with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (DINOv2 uses
    SyncBN).
    """

    def __init__(self, in_dim: int, num_classes: int = NUM_CLASSES, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(in_dim)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)  # mmseg's conv_seg init
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats_BChw: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits (B, num_classes, *out_size), bilinearly upsampled (align_corners=False) when given."""
        logits = self.conv(self.dropout(self.bn(feats_BChw)))
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits


def poly_lr(
    step: int,
    total: int,
    base_lr: float,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    min_lr: float = 0.0,
) -> float:
    """mmseg/mmcv ``PolyLrUpdaterHook`` with linear warm-up, for iteration ``step`` (0-based) of ``total``.

    ``lr = (base_lr - min_lr) * (1 - step / total) ** power + min_lr``; during the first ``warmup_iters`` steps it
    is multiplied by ``1 - (1 - step / warmup_iters) * (1 - warmup_ratio)``, rising from ``warmup_ratio``.
    """
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    progress = min(max(step, 0), total)
    lr = (base_lr - min_lr) * (1.0 - progress / total) ** power + min_lr
    if warmup_iters > 0 and step < warmup_iters:
        k = (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
        lr = lr * (1.0 - k)
    return lr


def _slide_windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmseg window starts/ends along one axis: a grid of ``stride``, last window clamped to the image end; a
    dimension smaller than ``crop`` gets a single window covering it."""
    num_grids = max(size - crop + stride - 1, 0) // stride + 1
    windows = []
    for idx in range(num_grids):
        end = min(idx * stride + crop, size)
        windows.append((max(end - crop, 0), end))
    return windows


@torch.no_grad()
def slide_inference(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    windows_per_batch: int = 1,
) -> torch.Tensor:
    """mmseg sliding-window inference: logits (B, num_classes, H, W) for an image batch (B, 3, H, W).

    ``predict_fn`` maps a (b, 3, h, w) crop batch to (b, num_classes, h, w) logits (the head upsamples to its
    input size). Windows lie on a ``stride`` grid clamped to the image; where the image is smaller than the crop
    the window shrinks to the image (so the backbone must accept that size, e.g. by padding to its patch size).
    Overlapping logits are averaged with a count map. All windows share one size, so ``windows_per_batch``
    windows go through ``predict_fn`` together.
    """
    crop_h, crop_w = _pair(crop)
    stride_h, stride_w = _pair(stride)
    if stride_h <= 0 or stride_w <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    batch_size, _, height, width = image.shape
    boxes = [
        (top, bottom, left, right)
        for top, bottom in _slide_windows(height, crop_h, stride_h)
        for left, right in _slide_windows(width, crop_w, stride_w)
    ]
    logits_sum = None
    count_HW = image.new_zeros((height, width))
    for first in range(0, len(boxes), max(windows_per_batch, 1)):
        chunk = boxes[first : first + max(windows_per_batch, 1)]
        crops = torch.cat([image[:, :, t:b, l:r] for t, b, l, r in chunk], dim=0)
        crop_logits = predict_fn(crops)
        if crop_logits.shape[1] != num_classes or crop_logits.shape[-2:] != crops.shape[-2:]:
            raise ValueError(
                f"predict_fn returned {tuple(crop_logits.shape)} for crops {tuple(crops.shape)}; expected "
                f"(b, {num_classes}, h, w) at the crop size"
            )
        if logits_sum is None:
            logits_sum = crop_logits.new_zeros((batch_size, num_classes, height, width))
        for i, (t, b, l, r) in enumerate(chunk):
            logits_sum[:, :, t:b, l:r] += crop_logits[i * batch_size : (i + 1) * batch_size]
            count_HW[t:b, l:r] += 1
    return logits_sum / count_HW.to(logits_sum.dtype)


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


class ConfusionMatrix:
    """Pixel confusion matrix (rows = ground truth, columns = prediction) accumulated on device.

    ``compute`` follows mmseg's ``eval_metrics``: per-class IoU = TP / (GT + pred - TP), NaN for a class absent
    from both ground truth and predictions; per-class accuracy = TP / GT, NaN for a class absent from the
    ground truth; mIoU and mAcc are NaN-means, aAcc = sum TP / sum GT. Pixels labelled ``ignore_index`` are
    skipped whatever their prediction.
    """

    def __init__(
        self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` class indices (or (B, C, H, W) logits) and ``target`` labels of the same shape."""
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred = pred.to(self.matrix.device).reshape(-1).long()
        target = target.to(self.matrix.device).reshape(-1).long()
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        num = self.num_classes
        # bincount synchronises with the device anyway, so this check is free.
        if ((pred < 0) | (pred >= num) | (target < 0) | (target >= num)).any():
            raise ValueError(
                f"labels or predictions outside [0, {num}) (other than ignore_index={self.ignore_index})"
            )
        self.matrix += torch.bincount(target * num + pred, minlength=num * num).view(num, num)

    def reset(self) -> None:
        self.matrix.zero_()

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrices of all ranks in place (no-op without a process group)."""
        distributed.all_reduce_sum(self.matrix)
        return self

    def compute(self) -> dict[str, float | list[float]]:
        """mIoU, aAcc, mAcc (fractions) and the per-class ``IoU`` and ``Acc`` lists (NaN where undefined)."""
        matrix = self.matrix.double().cpu()
        intersect = matrix.diag()
        area_label = matrix.sum(dim=1)
        area_pred = matrix.sum(dim=0)
        union = area_label + area_pred - intersect
        nan = torch.full_like(intersect, math.nan)
        iou = torch.where(union > 0, intersect / union.clamp_min(1), nan)
        acc = torch.where(area_label > 0, intersect / area_label.clamp_min(1), nan)
        total = area_label.sum()
        return {
            "mIoU": _nanmean(iou),
            "aAcc": (intersect.sum() / total).item() if total > 0 else math.nan,
            "mAcc": _nanmean(acc),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return finite.mean().item() if finite.numel() else math.nan


# --------------------------------------------------------------------------------------------------------------
# Frozen backbone, loss, training loop, evaluation, visualisation
# --------------------------------------------------------------------------------------------------------------

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


def center_pad(images_BCHW: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pad height and width to multiples of ``multiple``, centred (DINOv2's ``CenterPadding``).

    Returns the padded batch and the (top, bottom, left, right) padding, to crop outputs back with
    :func:`uncenter_pad`."""
    height, width = images_BCHW.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    pads = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    if pad_h == 0 and pad_w == 0:
        return images_BCHW, pads
    top, bottom, left, right = pads
    return F.pad(images_BCHW, (left, right, top, bottom)), pads


def uncenter_pad(maps_BCHW: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = pads
    height, width = maps_BCHW.shape[-2:]
    return maps_BCHW[..., top : height - bottom, left : width - right]


class FrozenPatchBackbone(nn.Module):
    """A frozen encoder as a dense feature extractor: images -> (B, n*D, h, w) float32 patch features.

    The encoder stays in eval mode whatever ``train()`` is called with (no dropout, no stochastic depth), its
    parameters never require gradients, and it runs under ``torch.no_grad`` (autocast optional), so it takes
    no part in the optimizer or in DDP. Inputs are centre-padded to a multiple of the patch size.
    """

    def __init__(self, encoder: nn.Module, num_last_blocks: int = 1, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if not getattr(encoder, "is_vit", False):
            raise ValueError(f"{getattr(encoder, 'name', encoder)} has no patch tokens: the linear probe needs a ViT")
        depth = len(getattr(encoder.backbone, "blocks", ()))
        if not 1 <= num_last_blocks <= depth:
            raise ValueError(f"num_last_blocks={num_last_blocks}, but the backbone has {depth} blocks")
        encoder.allow_any_input_size()
        self.encoder = encoder.eval().requires_grad_(False)
        self.num_last_blocks = num_last_blocks
        self.autocast_dtype = autocast_dtype
        self.patch_size = encoder.patch_size
        self.out_dim = num_last_blocks * encoder.embed_dim

    def train(self, mode: bool = True) -> "FrozenPatchBackbone":
        super().train(mode)
        self.encoder.eval()  # frozen: BN/dropout/drop-path stay in inference behaviour
        return self

    @torch.no_grad()
    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        device_type = images_BCHW.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            feats = self.encoder.patch_features(images_BCHW, self.num_last_blocks)
        return feats.float()


def segment(backbone: FrozenPatchBackbone, head: nn.Module, images_BCHW: torch.Tensor) -> torch.Tensor:
    """Logits (B, num_classes, H, W) at the input resolution: pad to the patch grid, frozen features, head,
    bilinear upsampling to the padded size, crop the padding away."""
    padded, pads = center_pad(images_BCHW, backbone.patch_size)
    logits = head(backbone(padded), out_size=tuple(padded.shape[-2:]))
    return uncenter_pad(logits, pads)


def segmentation_loss(
    logits_BCHW: torch.Tensor, labels_BHW: torch.Tensor, ignore_index: int = IGNORE_INDEX, avg_non_ignore: bool = False
) -> torch.Tensor:
    """Pixel cross-entropy. mmseg 0.x (DINOv2's linear protocol) averages over *all* pixels, ignored ones
    contributing 0 (``avg_non_ignore=False``); ``avg_non_ignore=True`` averages over labelled pixels only."""
    loss = F.cross_entropy(logits_BCHW.float(), labels_BHW, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return loss.sum() / (labels_BHW != ignore_index).sum().clamp_min(1)
    return loss.mean()


class _LabelMax(torch.utils.data.Dataset):
    def __init__(self, dataset: ADE20KDataset, ignore_index: int):
        self.dataset, self.ignore_index = dataset, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        label = self.dataset.load_label(index)
        valid = label[label != self.ignore_index]
        return int(valid.max()) if valid.size else -1


def max_label(dataset: ADE20KDataset, num_workers: int = 0, ignore_index: int = IGNORE_INDEX,
              device: torch.device | str = "cpu") -> int:
    """Largest non-ignored label of a split (-1 if none), read from every annotation, sharded over ranks."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from unic.data.sampling import ShardSampler

    sampler = ShardSampler(len(dataset), distributed.get_rank(), distributed.get_world_size())
    loader = DataLoader(_LabelMax(dataset, ignore_index), batch_size=64, sampler=sampler, num_workers=num_workers)
    largest = -1
    for batch in tqdm(loader, desc=f"check {dataset.split} labels", leave=False, dynamic_ncols=True,
                      disable=not distributed.is_main_process()):
        largest = max(largest, int(batch.max()))
    result = torch.tensor([largest], device=device)
    if distributed.is_enabled():
        torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    return int(result.item())


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of item ``index`` in pass ``epoch`` of a run seeded with ``seed`` (64 bits)."""
    entropy = [seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, index]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class AugmentationSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` yielding ``(draw, index)`` pairs, ``draw = item_seed(seed, epoch, index)``.

    The dataset transforms each item with a generator seeded with its draw, so an item's augmentation is a
    function of (seed, epoch, index) alone: the same for any number of loader workers, and, since the ranks'
    shards of one step together are the same items whatever the number of processes, the same global batch
    of augmented crops at every step for any number of processes at one global batch.
    """

    def __iter__(self):
        return ((item_seed(self.seed, self.epoch, index), index) for index in super().__iter__())


def infinite_batches(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
):
    """Endless (images, labels) batches of this rank: a fresh seeded shuffle per pass, sharded over ranks,
    incomplete batches dropped. ``dataset`` is indexed with :class:`AugmentationSampler`'s (draw, index)
    pairs, so the batches do not depend on ``num_workers``."""
    from torch.utils.data import DataLoader

    rank, world = distributed.get_rank(), distributed.get_world_size()
    if len(dataset) // world < batch_size:
        raise ValueError(
            f"{len(dataset)} training images over {world} process(es) do not fill one batch of {batch_size} per process"
        )
    sampler = AugmentationSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
    )
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_linear_head(
    backbone: FrozenPatchBackbone,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    num_iters: int,
    base_lr: float,
    device: torch.device,
    warmup_iters: int = 1500,
    start_iter: int = 0,
    stop_iter: int | None = None,
    log_every: int = 50,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Iterations ``start_iter .. stop_iter - 1`` (default: to ``num_iters``) of the linear probe: poly lr
    over ``num_iters`` with linear warm-up, pixel cross-entropy (mmseg averaging), the optimizer holding the head
    only. ``on_log(iteration, metrics)`` is called every ``log_every`` iterations and at ``stop_iter`` with the
    mean loss since the previous call (the only host-device synchronisations). Returns the last metrics."""
    from tqdm import tqdm

    stop_iter = num_iters if stop_iter is None else stop_iter
    backbone.eval()
    head.train()
    loss_sum = torch.zeros((), device=device)
    num_losses, last = 0, {}
    window_start = time.perf_counter()
    progress = tqdm(range(start_iter, stop_iter), desc="train linear head", dynamic_ncols=True, leave=False,
                    initial=start_iter, total=num_iters, disable=not distributed.is_main_process())
    for iteration in progress:
        lr = poly_lr(iteration, num_iters, base_lr, warmup_iters=warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss = segmentation_loss(segment(backbone, head, images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        num_losses += 1
        if (iteration + 1) % log_every == 0 or iteration + 1 == stop_iter:
            mean_loss = distributed.all_reduce_mean(loss_sum / num_losses).item()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the loss is {mean_loss} at iteration {iteration + 1}")
            seconds = time.perf_counter() - window_start
            last = {"loss": mean_loss, "lr": lr, "iters_per_s": num_losses / max(seconds, 1e-9)}
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if on_log is not None:
                on_log(iteration + 1, last)
            loss_sum.zero_()
            num_losses, window_start = 0, time.perf_counter()
    return last


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics). Without SyncBN (CPU/gloo), DDP only
    broadcasts buffers at the start of each forward, so after the last step every rank holds its own update;
    evaluation and the saved head must use one set."""
    if distributed.is_enabled():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=src)


@torch.no_grad()
def evaluate_segmentation(
    backbone: FrozenPatchBackbone,
    head: nn.Module,
    dataset: ADE20KDataset,
    device: torch.device,
    num_classes: int = NUM_CLASSES,
    crop: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    windows_per_batch: int = 4,
    num_workers: int = 0,
) -> ConfusionMatrix:
    """Sliding-window inference on every image of ``dataset`` (whose transform is a :class:`SegEvalTransform`),
    logits upsampled (bilinear) to the annotation size; the confusion matrix is accumulated on ``device`` over
    this rank's shard and all-reduced, so every rank returns the full-split matrix."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from unic.data.sampling import ShardSampler

    was_training = head.training
    head.eval()
    broadcast_buffers(head)  # every rank scores its shard with the same head
    sampler = ShardSampler(len(dataset), distributed.get_rank(), distributed.get_world_size())
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    confusion = ConfusionMatrix(num_classes, device=device)
    for image, label in tqdm(loader, desc=f"evaluate {dataset.split}", dynamic_ncols=True, leave=False,
                             disable=not distributed.is_main_process()):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        logits = slide_inference(lambda crops: segment(backbone, head, crops), image, num_classes, crop=crop,
                                 stride=stride, windows_per_batch=windows_per_batch)
        if logits.shape[-2:] != label.shape[-2:]:
            logits = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
        confusion.update(logits.argmax(dim=1), label)
    head.train(was_training)
    return confusion.all_reduce()


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed random colour per class (uint8, (num_classes + 1, 3)); the last row (black) is for ignored pixels."""
    colors = np.random.RandomState(seed).randint(40, 256, size=(num_classes, 3)).astype(np.uint8)
    return np.concatenate([colors, np.zeros((1, 3), dtype=np.uint8)])


def colorize(label_HW: np.ndarray, colors: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; ignored (or out-of-range) pixels are black."""
    label = np.asarray(label_HW, dtype=np.int64)
    index = np.where((label == ignore_index) | (label < 0) | (label >= len(colors) - 1), len(colors) - 1, label)
    return colors[index]


def save_visualization(
    path: str | Path, image: Image.Image, label_HW: np.ndarray, pred_HW: np.ndarray, colors: np.ndarray
) -> None:
    """One PNG: image | ground truth | prediction, side by side at the annotation's resolution."""
    image_np = np.asarray(image.convert("RGB"), dtype=np.uint8)
    panels = [image_np, colorize(label_HW, colors), colorize(pred_HW, colors)]
    gap = np.full((image_np.shape[0], 4, 3), 255, dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)).save(path)
