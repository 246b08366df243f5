"""JPEG decoding and the UNIC training augmentations on the training device (``data.decode=gpu``).

On a GPU node PIL decoding and augmentation on the CPU cores cannot keep up with the student; here the work is
split in two:

* in the DataLoader workers, inside the dataset's seeded RNG context, :func:`read_encoded` reads the file and
  checks its header, and :class:`DrawUnicParams` draws every random augmentation parameter. The result, a
  :class:`DeviceSample`, is small: the JPEG bytes (or, for anything that is not a plain JPEG, the pixels decoded
  on the CPU) and the parameters as plain numbers;
* on the device, :class:`GpuUnicAugment` decodes the batch's JPEGs in one ``torchvision.io.decode_jpeg`` call
  (nvjpeg on CUDA) and applies the augmentations to the whole batch.

What matches the CPU path (:func:`unic.data.transforms.unic_train_transform` on :func:`unic.data.folders.load_image`)
exactly: the random parameters. They are drawn with the same torch calls in the same order (torchvision's own
``get_params`` for the crop, the colour jitter and the blur sigma), so for a key ``(index, seed)`` the crop box,
flip, jitter order and factors, grayscale, blur sigma and solarisation are the CPU path's, and the global RNG
ends in the same state. Which images are unreadable, how they are replaced (next readable sample of the same
domain, by the dataset) and reported, and how non-JPEG files are decoded (:func:`unic.data.folders.to_rgb`) are
the CPU path's as well. CPU ``decode_jpeg`` (libjpeg-turbo) gives PIL's pixels bit for bit.

What matches in distribution only: the pixels. nvjpeg's IDCT and chroma upsampling may differ from
libjpeg-turbo's by a few levels; torch's antialiased bicubic resize is close to PIL's, not equal; the ops work in
float [0, 1] where PIL rounds to 8 bits after each one (its brightness/contrast/saturation blends truncate, which
makes the CPU path ~0.5/255 darker per op; its contrast mean is rounded; its hue shift works in 8-bit HSV);
solarisation inverts values >= 128/255. Measured on natural-looking JPEGs, mean |difference| per image in
normalised units: 0.005 for crop+flip (+ blur), 0.03 with the colour jitter (half of it PIL's truncation), and
batch channel means ~0.02 apart (tests/test_gpu_decode.py). An image that neither the device nor PIL decodes
from its bytes (rare: the worker already rejected truncated and malformed files) is replaced by the next decoded
image of the same batch, which keeps the failed sample's label and domain, and reported.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from unic.config import IMAGENET_MEAN, IMAGENET_STD
from unic.data.folders import BadImageError, to_rgb

logger = logging.getLogger(__name__)

JPEG_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into the pixels PIL's convert("RGB") gives
JPEG_EOI = b"\xff\xd9"
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's convert("L") (ITU-R 601-2), used by its contrast and saturation
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(128) on 8-bit images
BLUR_KERNEL = 9
JITTER_OPS = 4  # brightness, contrast, saturation, hue: ColorJitter's op ids


# ------------------------------------------------------------------------------------------------ worker side
@dataclass
class EncodedImage:
    """What :func:`read_encoded` hands to the transform: JPEG bytes ``(N,)`` or RGB pixels ``(3, H, W)``, uint8."""

    path: str
    data: torch.Tensor
    height: int
    width: int

    @property
    def is_jpeg(self) -> bool:
        return self.data.dim() == 1


def read_encoded(path: str) -> EncodedImage:
    """Read a file for decoding on the device: a complete baseline/progressive JPEG in RGB or L stays encoded;
    anything else (PNG, CMYK, 16-bit, transparency, a JPEG with data after or missing its end marker, ...) is
    decoded here with :func:`unic.data.folders.load_image`'s rules. Unreadable files raise BadImageError.

    Only the header is parsed for JPEGs (``Image.open`` without ``load``), which still applies PIL's
    decompression-bomb limit. A JPEG must end with its EOI marker: truncated files then fail here, as they do
    in ``load_image``, instead of depending on how the device decoder treats a missing tail.
    """
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of blocking the worker; fstat on
        # the opened file leaves no window for swapping the path between the check and the read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError("not a regular file")
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in JPEG_MODES and data.endswith(JPEG_EOI):
                width, height = img.size
                return EncodedImage(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width)
            img.load()
            pixels_CHW = TF.pil_to_tensor(to_rgb(img)).contiguous()
    except Exception as err:  # noqa: BLE001 - hostile files raise anything from OSError to SyntaxError
        raise BadImageError(f"{path}: {type(err).__name__}: {err}") from None
    return EncodedImage(path, pixels_CHW, pixels_CHW.shape[1], pixels_CHW.shape[2])


@dataclass
class UnicAugmentParams:
    """One image's draws. ``crop`` is (top, left, height, width) in source pixels; ``jitter_order`` lists
    ColorJitter's op ids (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order they apply and
    ``jitter_factors`` the factors by op id, both None when the jitter is not applied; ``blur_sigma`` is None
    when the blur is not applied."""

    crop: tuple[int, int, int, int]
    flip: bool
    jitter_order: tuple[int, ...] | None
    jitter_factors: tuple[float, float, float, float] | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


@dataclass
class DeviceSample:
    """A worker's output for one image: what to decode and how to augment it."""

    image: EncodedImage
    params: UnicAugmentParams

    def pin_memory(self) -> DeviceSample:
        """Called by DataLoader(pin_memory=True), so that the copy to the device can be asynchronous."""
        return DeviceSample(replace(self.image, data=self.image.data.pin_memory()), self.params)


class DrawUnicParams:
    """Transform for :class:`unic.data.folders.ImageListDataset`: draws the augmentation parameters of
    :func:`unic.data.transforms.unic_train_transform` with the same global-RNG calls in the same order.

    RandomApply draws its coin before deciding and ColorJitter draws all four factors (they are all enabled),
    so the draws depend only on the source size and the seed; the defaults are the UNIC recipe's.
    """

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 5.0),
                 blur_p: float = 0.2, solarize_p: float = 0.2):
        self.scale, self.ratio, self.flip_p = list(scale), list(ratio), flip_p
        # the ranges ColorJitter derives from its arguments, so that get_params gets what the CPU path gives it
        ranges = T.ColorJitter(*jitter)
        self.jitter_ranges = (ranges.brightness, ranges.contrast, ranges.saturation, ranges.hue)
        if any(r is None for r in self.jitter_ranges):
            raise ValueError("every jitter strength must be > 0 (a disabled op draws nothing on the CPU path)")
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_sigma, self.blur_p, self.solarize_p = blur_sigma, blur_p, solarize_p

    def draw(self, height: int, width: int) -> UnicAugmentParams:
        """The draws for a source image of this size, in the CPU transform's order."""
        size_only_CHW = torch.empty(()).expand(3, height, width)  # get_params reads only the size
        crop = tuple(int(v) for v in T.RandomResizedCrop.get_params(size_only_CHW, self.scale, self.ratio))
        flip = bool(torch.rand(1) < self.flip_p)
        jitter_order = jitter_factors = None
        if not self.jitter_p < torch.rand(1):  # RandomApply: skip when p < coin
            order, *factors = T.ColorJitter.get_params(*self.jitter_ranges)
            jitter_order, jitter_factors = tuple(int(i) for i in order), tuple(float(f) for f in factors)
        grayscale = bool(torch.rand(1) < self.grayscale_p)
        blur_sigma = None
        if not self.blur_p < torch.rand(1):
            blur_sigma = float(T.GaussianBlur.get_params(*self.blur_sigma))
        solarize = torch.rand(1).item() < self.solarize_p
        return UnicAugmentParams(crop, flip, jitter_order, jitter_factors, grayscale, blur_sigma, solarize)

    def __call__(self, image: EncodedImage) -> DeviceSample:
        return DeviceSample(image, self.draw(image.height, image.width))


# ------------------------------------------------------------------------------------------------ device side
def _grey(x_BCHW: torch.Tensor) -> torch.Tensor:
    r, g, b = x_BCHW.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x_BCHW: torch.Tensor, other: torch.Tensor, factor_B111: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: interpolate (factor < 1) or extrapolate (> 1) away from ``other``, clipped to [0, 1]."""
    return (other + factor_B111 * (x_BCHW - other)).clamp_(0, 1)


def _rgb_to_hsv(x_BCHW: torch.Tensor) -> torch.Tensor:
    r, g, b = x_BCHW.unbind(1)
    value, _ = x_BCHW.max(1)
    chroma = value - x_BCHW.min(1).values
    saturation = chroma / torch.where(value > 0, value, 1)
    safe_chroma = torch.where(chroma > 0, chroma, 1)
    # sector of the colour hexagon, by which channel is the largest (red wins ties, then green)
    hue6 = torch.where(value == r, ((g - b) / safe_chroma) % 6,
                       torch.where(value == g, (b - r) / safe_chroma + 2, (r - g) / safe_chroma + 4))
    hue = torch.where(chroma > 0, hue6 / 6, 0)
    return torch.stack([hue, saturation, value], 1)


def _hsv_to_rgb(hsv_BCHW: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = (t.unsqueeze(1) for t in hsv_BCHW.unbind(1))
    # channel n of (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1
    # (made on the device: torch.tensor(list, device=...) would wait for the device to copy it)
    offsets = (5 - 2 * torch.arange(3, device=hsv_BCHW.device, dtype=hsv_BCHW.dtype)).view(1, 3, 1, 1)
    k = (offsets + 6 * hue) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def _brightness(x_BCHW: torch.Tensor, factor_B111: torch.Tensor) -> torch.Tensor:
    return _blend(x_BCHW, torch.zeros_like(x_BCHW[:, :1]), factor_B111)


def _contrast(x_BCHW: torch.Tensor, factor_B111: torch.Tensor) -> torch.Tensor:
    return _blend(x_BCHW, _grey(x_BCHW).mean((1, 2, 3), keepdim=True), factor_B111)


def _saturation(x_BCHW: torch.Tensor, factor_B111: torch.Tensor) -> torch.Tensor:
    return _blend(x_BCHW, _grey(x_BCHW), factor_B111)


def _hue(x_BCHW: torch.Tensor, shift_B111: torch.Tensor) -> torch.Tensor:
    hsv_BCHW = _rgb_to_hsv(x_BCHW)
    hsv_BCHW[:, :1] = (hsv_BCHW[:, :1] + shift_B111) % 1
    return _hsv_to_rgb(hsv_BCHW).clamp_(0, 1)


_JITTER_FNS = (_brightness, _contrast, _saturation, _hue)  # by ColorJitter op id


def _gaussian_blur(x_BCHW: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """Separable 9-tap Gaussian with one sigma per image and reflect padding, as GaussianBlur(9)."""
    num_images, channels, height, width = x_BCHW.shape
    taps = torch.arange(BLUR_KERNEL, device=x_BCHW.device, dtype=x_BCHW.dtype) - BLUR_KERNEL // 2
    kernel_BK = torch.exp(-0.5 * (taps / sigma_B[:, None]) ** 2)
    kernel_BK = kernel_BK / kernel_BK.sum(1, keepdim=True)
    kernel_GK = kernel_BK.repeat_interleave(channels, 0)  # one group per (image, channel)
    pad = BLUR_KERNEL // 2
    x_1GHW = F.pad(x_BCHW.reshape(1, num_images * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x_1GHW = F.conv2d(x_1GHW, kernel_GK[:, None, :, None], groups=num_images * channels)
    x_1GHW = F.conv2d(x_1GHW, kernel_GK[:, None, None, :], groups=num_images * channels)
    return x_1GHW.view(num_images, channels, height, width)


class GpuUnicAugment:
    """Decode a batch of :class:`DeviceSample` on ``device`` and apply their UNIC augmentations.

    Returns the normalised float32 images ``(B, 3, img_size, img_size)`` and the failures, one
    ``"<path>: <reason>"`` each. All parameters are host numbers sent in one copy; the device work has no host
    synchronisation (no ``.item()``, no shapes that depend on device values). The crop-and-resize runs per image
    (sizes differ); the colour ops run on the batch, each on the images that apply it at that position of their
    jitter order (index lists known on the host), so every image pays only for its own ops.
    """

    def __init__(self, img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.img_size, self.mean, self.std = img_size, tuple(mean), tuple(std)
        self._stream: torch.cuda.Stream | None = None  # the CUDA decoder's own stream, made on first use
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # by device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(img_size={self.img_size}, mean={self.mean}, std={self.std})"

    def _decode_jpeg(self, data: torch.Tensor | list[torch.Tensor], device: torch.device
                     ) -> torch.Tensor | list[torch.Tensor]:
        """``decode_jpeg`` to RGB; on CUDA inside a stream of its own.

        torchvision's CUDA decoder allocates its outputs on the current stream but lets nvJPEG's hardware engine
        write them without waiting for the work queued there (pytorch/vision#9606, unfixed in torchvision;
        TorchCodec added the wait), so a block the caching allocator recycles could be overwritten while queued
        kernels still read it. On a stream that runs nothing else, recycled blocks are idle: the outputs are
        marked as used by the caller's stream, so they return to the pool only once its kernels are done.
        """
        if device.type != "cuda":
            return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        caller = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._stream):
            decoded = decode_jpeg(data, device=device, mode=ImageReadMode.RGB)
        caller.wait_stream(self._stream)
        for image_CHW in decoded if isinstance(decoded, list) else [decoded]:
            image_CHW.record_stream(caller)
        return decoded

    def decode(self, samples: Sequence[DeviceSample], device: torch.device | str
               ) -> tuple[list[torch.Tensor | None], list[str]]:
        """uint8 ``(3, H, W)`` images on ``device`` (None where nothing decodes) and the failures.

        The JPEGs go in one batched call; if it raises, one by one; an image that still fails is decoded by PIL
        from its bytes (load_image's rules) on the CPU.
        """
        device = torch.device(device)
        images: list[torch.Tensor | None] = [None] * len(samples)
        jpegs = [i for i, s in enumerate(samples) if s.image.is_jpeg]
        for i, s in enumerate(samples):
            if not s.image.is_jpeg:
                images[i] = s.image.data.to(device, non_blocking=True)
        if jpegs:
            try:
                decoded = self._decode_jpeg([samples[i].image.data for i in jpegs], device)
            except Exception:  # noqa: BLE001 - one bad stream fails the batched call; retried one by one
                decoded = [None] * len(jpegs)
            for i, img in zip(jpegs, decoded):
                images[i] = img
        bad = []
        for i in jpegs:
            image = samples[i].image
            if images[i] is not None and tuple(images[i].shape) == (3, image.height, image.width):
                continue
            try:
                images[i] = self._decode_jpeg(image.data, device)
                if tuple(images[i].shape) != (3, image.height, image.width):
                    raise RuntimeError(f"decoded {tuple(images[i].shape)}, header says {image.height}x{image.width}")
            except Exception as err:  # noqa: BLE001 - the decoder's errors are RuntimeErrors, hostile bytes anything
                logger.debug("decode_jpeg failed on %s (%s); decoding with PIL", image.path, err)
                try:
                    with Image.open(io.BytesIO(image.data.numpy().tobytes())) as img:
                        img.load()
                        pixels_CHW = TF.pil_to_tensor(to_rgb(img))
                    if tuple(pixels_CHW.shape) != (3, image.height, image.width):
                        raise OSError(f"decoded {tuple(pixels_CHW.shape)}, header says {image.height}x{image.width}")
                    images[i] = pixels_CHW.to(device, non_blocking=True)
                except Exception as pil_err:  # noqa: BLE001 - hostile bytes raise anything
                    images[i] = None
                    bad.append(f"{image.path}: {type(pil_err).__name__}: {pil_err}")
        return images, bad

    def crop_resize(self, image_CHW: torch.Tensor, params: UnicAugmentParams) -> torch.Tensor:
        """RandomResizedCrop (bicubic with antialiasing, like PIL's reducing filter) and flip, float [0, 1]."""
        top, left, height, width = params.crop
        crop_1CHW = image_CHW[None, :, top:top + height, left:left + width].float().div_(255)
        x_1CHW = F.interpolate(crop_1CHW, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                               antialias=True)
        if params.flip:
            x_1CHW = x_1CHW.flip(-1)
        return x_1CHW.clamp_(0, 1)  # PIL clips the bicubic overshoot to 8 bits

    def augment(self, x_BCHW: torch.Tensor, params: Sequence[UnicAugmentParams]) -> torch.Tensor:
        """Colour jitter, grayscale, blur, solarise and normalise cropped images in [0, 1]."""
        device = x_BCHW.device
        # per image: the 4 jitter factors by op id (identity when not jittered), then grayscale, sigma, solarise
        values = [[*(p.jitter_factors or (1.0, 1.0, 1.0, 0.0)), float(p.grayscale), p.blur_sigma or 1.0,
                   float(p.solarize)] for p in params]
        # index lists: for each position in the jitter order and each op, the images applying that op there;
        # then the blurred images
        groups = [[i for i, p in enumerate(params) if p.jitter_order is not None and p.jitter_order[step] == op]
                  for step in range(JITTER_OPS) for op in range(JITTER_OPS)]
        groups.append([i for i, p in enumerate(params) if p.blur_sigma is not None])
        # one host-to-device copy each (non_blocking: no wait for the device, pageable memory is staged at once)
        values_BV = torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
        index = torch.tensor([i for g in groups for i in g], dtype=torch.long).to(device, non_blocking=True)
        *jitter_index, blur_index = index.split([len(g) for g in groups])
        for step_op, (group, idx) in enumerate(zip(groups[:-1], jitter_index)):
            if group:
                op = step_op % JITTER_OPS
                x_BCHW[idx] = _JITTER_FNS[op](x_BCHW[idx], values_BV[idx, op].view(-1, 1, 1, 1))
        grey_B111 = values_BV[:, JITTER_OPS].view(-1, 1, 1, 1) > 0
        x_BCHW = torch.where(grey_B111, _grey(x_BCHW).expand_as(x_BCHW), x_BCHW)
        if groups[-1]:
            x_BCHW[blur_index] = _gaussian_blur(x_BCHW[blur_index], values_BV[blur_index, JITTER_OPS + 1])
        solarize_B111 = values_BV[:, JITTER_OPS + 2].view(-1, 1, 1, 1) > 0
        x_BCHW = torch.where(solarize_B111 & (x_BCHW >= SOLARIZE_THRESHOLD), 1 - x_BCHW, x_BCHW)
        mean_11C11, std_11C11 = self._normalisation(device)
        return (x_BCHW - mean_11C11) / std_11C11

    def _normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as (1, 3, 1, 1) tensors on ``device``, copied there once."""
        if device not in self._norm:
            mean_std = torch.tensor([self.mean, self.std], dtype=torch.float32).to(device, non_blocking=True)
            self._norm[device] = (mean_std[0].view(1, 3, 1, 1), mean_std[1].view(1, 3, 1, 1))
        return self._norm[device]

    def __call__(self, samples: Sequence[DeviceSample], device: torch.device | str
                 ) -> tuple[torch.Tensor, list[str]]:
        if not samples:
            raise ValueError("empty batch")
        images, bad = self.decode(samples, device)
        decoded = [i for i, img in enumerate(images) if img is not None]
        if not decoded:
            raise BadImageError(f"no image of the batch decodes: {'; '.join(bad)}")
        x_BCHW = torch.cat([self.crop_resize(images[i], samples[i].params) for i in decoded])
        x_BCHW = self.augment(x_BCHW, [samples[i].params for i in decoded])
        if len(decoded) < len(samples):
            # a failed image takes the next decoded one of the batch (in batch order, wrapping around)
            position, num_samples = {i: k for k, i in enumerate(decoded)}, len(samples)
            source = [next(position[j % num_samples] for j in range(i, i + num_samples) if j % num_samples in position)
                      for i in range(num_samples)]
            for message in bad:
                logger.warning("replacing an image the device cannot decode: %s", message)
            x_BCHW = x_BCHW[torch.tensor(source).to(device, non_blocking=True)]
        return x_BCHW, bad
