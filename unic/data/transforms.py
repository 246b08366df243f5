"""Image transforms: UNIC distillation augmentations, UDON train crops and evaluation resizing."""

from __future__ import annotations

from torchvision import transforms as T

from unic.config import IMAGENET_MEAN, IMAGENET_STD
BICUBIC = T.InterpolationMode.BICUBIC


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
    """Resize to 256x256 (scaled with img_size), random crop img_size, flip (UDON recipe)."""
    resize = round(img_size * 256 / 224)
    return T.Compose([
        T.Resize((resize, resize), interpolation=BICUBIC),
        T.RandomCrop(img_size),
        T.RandomHorizontalFlip(),
        *_to_tensor(mean, std),
    ])


def eval_transform(img_size: int, crop_ratio: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Resize the short side to img_size / crop_ratio, centre crop img_size (crop_ratio=1: UnED eval)."""
    return T.Compose([
        T.Resize(round(img_size / crop_ratio), interpolation=BICUBIC),
        T.CenterCrop(img_size),
        *_to_tensor(mean, std),
    ])
