"""Image transforms: UNIC distillation augmentations, UDON train crops and evaluation resizing.

UDON (and its UnED benchmark) preprocess with TensorFlow: ``tf.image.resize(method=BILINEAR)`` on the decoded
uint8 image, whose default ``antialias=False`` is a plain half-pixel bilinear interpolation to float values
(no area filtering when shrinking, no rounding back to 8 bits). PIL's bilinear filter widens its support
when shrinking (antialiasing), so the UDON/UnED transforms here convert to a float tensor first and resize it
with ``antialias=False``: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` is the
same half-pixel interpolation as TensorFlow's.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from unic.config import IMAGENET_MEAN, IMAGENET_STD

BICUBIC = T.InterpolationMode.BICUBIC
BILINEAR = T.InterpolationMode.BILINEAR


def _to_tensor(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> list:
    return [T.ToTensor(), T.Normalize(mean, std)]


def unic_train_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """RandomResizedCrop (bicubic), flip, colour jitter, grayscale, blur, solarise (UNIC recipe)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 5.0))], p=0.2),
        T.RandomSolarize(threshold=128, p=0.2),  # 0.5 of the intensity range, applied on 8-bit images
        *_to_tensor(mean, std),
    ])


def udon_train_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """UDON's train crops (``datasets.py``, ``_process_train_split``): resize to 256x256 (scaled with img_size)
    bilinearly without antialiasing, random crop img_size, horizontal flip."""
    resize = round(img_size * 256 / 224)
    return T.Compose([
        T.ToTensor(),  # float in [0, 1]: TF resizes to float as well, and scaling by 1/255 commutes with it
        T.Resize((resize, resize), interpolation=BILINEAR, antialias=False),
        T.RandomCrop(img_size),
        T.RandomHorizontalFlip(),
        T.Normalize(mean, std),
    ])


class ResizeShortSideCentreCrop:
    """UDON's evaluation crop (``datasets.py``, ``_process_test_split``) on a float (C, H, W) tensor.

    The short side becomes ``size`` and the long side ``int(long / short * size)`` (truncated), bilinear
    without antialiasing; then the central ``size`` x ``size`` square, offset ``(long - size) // 2``.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img_CHW: torch.Tensor) -> torch.Tensor:
        h, w = img_CHW.shape[-2:]
        if h <= w:
            new_h, new_w = self.size, int(w / h * self.size)
        else:
            new_h, new_w = int(h / w * self.size), self.size
        img_CHW = TF.resize(img_CHW, [new_h, new_w], interpolation=BILINEAR, antialias=False)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return img_CHW[..., top:top + self.size, left:left + self.size]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation=bilinear, antialias=False)"


def uned_eval_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """UnED evaluation as in UDON: short side to img_size (bilinear, no antialiasing), centre crop img_size."""
    return T.Compose([T.ToTensor(), ResizeShortSideCentreCrop(img_size), T.Normalize(mean, std)])


def eval_transform(img_size: int, crop_ratio: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Resize the short side to img_size / crop_ratio (bicubic), centre crop img_size.

    UnED evaluation as UDON does it (crop ratio 1, bilinear without antialiasing) is :func:`uned_eval_transform`.
    """
    return T.Compose([
        T.Resize(round(img_size / crop_ratio), interpolation=BICUBIC),
        T.CenterCrop(img_size),
        *_to_tensor(mean, std),
    ])
