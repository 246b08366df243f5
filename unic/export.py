"""Deployable exports: TorchScript and ONNX models that take raw images and return L2-normalised descriptors.

    python -m unic.export model.source=run/universal.pth model.embedding=universal export.input_size=[480,640]
    python -m unic.export model.source=run/student.pth model.embedding=adaptor:dinov2_vitb14 export.formats=[onnx]
    unic-export model.source=timm:vit_base_patch16_224.dino model.weights=dino.pth export.input_dtype=float

The exported model takes a batch of images of one fixed size, ``(B, 3, H, W)`` uint8 in 0..255 (or float in
0..1 with ``export.input_dtype=float``), applies inside it the resize, centre crop and normalisation of the
model's evaluation transform, then the encoder (:func:`unic.eval.encoders.load_encoder`), then L2-normalises:
``(B, D)`` float32 descriptors of the chosen embedding. Any batch size works.

``export.preprocess`` picks the evaluation transform it reproduces (:mod:`unic.data.transforms`):
- ``center_crop`` (``eval_transform``: short side to img_size / crop_ratio, PIL bicubic, centre crop): PIL's
  8-bit resampling as tensor ops, two separable passes (width, then height) of antialiased bicubic
  interpolation (PIL's kernel, a = -0.5), each clamped to 0..255 and rounded as PIL stores it. PIL computes
  in fixed point, so a pixel may differ by one grey level (measured on noise images: fewer than 1 in 1000
  pixels when shrinking, about 1 in 100 when enlarging); the card reports what that does to the descriptors;
- ``uned`` (``uned_eval_transform``, UDON's UnED evaluation: short side to img_size, bilinear without
  antialiasing, centre crop): the same tensor operations, exact up to float rounding;
- ``auto``: ``uned`` for the UDON embeddings (universal, domain:<name>), ``center_crop`` otherwise.
Float inputs go through the same arithmetic (scaled by 255), so they match the transform of the 8-bit image.

Writes to ``run.output_dir`` (default ``<source folder>/deploy/<source name>-<embedding>``, or
``output/deploy/<model name>-<embedding>`` for a named model): ``encoder.torchscript.pt``, ``encoder.onnx``
(``encoder.onnx.data`` beside it for models over 2 GB), ``card.json`` and ``card.md`` (source, embedding, dim,
input size and dtype, mean/std, preprocessing, parity, export times) and the resolved ``config.yaml``.
Before anything is moved into place, each written file is loaded back (``torch.jit.load``; an onnxruntime
session) and run on ``export.check_images`` random images against ``load_encoder`` with the evaluation
transform itself (PIL, torchvision); a difference above ``export.tolerance`` fails the export.
Everything runs in float32 on the CPU. ONNX needs ``pip install 'unic[export]'`` (onnx, onnxscript,
onnxruntime).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from unic.config import ConfigError, ModelConfig, RunConfig, check_choices, check_range
from unic.io import safe_filename

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
INPUT_DTYPES = ("uint8", "float")
PREPROCESS = ("auto", "center_crop", "uned")
FILES = {"torchscript": "encoder.torchscript.pt", "onnx": "encoder.onnx"}
CARD_FORMAT = "unic-deploy"
MIN_OPSET = 18  # ONNX Resize's antialias attribute (the bicubic PIL resize) arrived in opset 18
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, with room for the graph itself
_EMBEDDING = re.compile(r"auto|backbone|universal|(adaptor|domain):.+")

EXAMPLE = ("python -m unic.export model.source=output/demo/universal.pth model.embedding=universal "
           "export.input_size=[480,640]")


class ExportError(Exception):
    """A problem with the inputs (source file, embedding, missing packages) or a failed parity check: one line."""


# ------------------------------------------------------------------------------------------------------------
# configuration (unic.cli.parse)


@dataclasses.dataclass(kw_only=True)
class ExportModelConfig(ModelConfig):
    """The encoder to export (unic.eval.encoders.load_encoder)."""

    source: Optional[str] = None  # UNIC .pth file, timm:<model>[.<tag>] or open_clip:<model>:<tag> (required)
    # auto (universal when the file has one, else backbone), backbone, universal, adaptor:<teacher>, domain:<name>
    embedding: str = "auto"


@dataclasses.dataclass(kw_only=True)
class ExportOptions:
    """What is written and what the deployed model takes."""

    formats: list[str] = dataclasses.field(default_factory=lambda: list(FORMATS))  # torchscript, onnx
    # [H, W] (or [S] for a square) of the images the exported model takes; null: the size the resize leaves as
    # is (img_size / crop_ratio for center_crop, img_size for uned), so it only crops and normalises
    input_size: Optional[list[int]] = None
    input_dtype: str = "uint8"  # uint8 (0..255) | float (0..1)
    preprocess: str = "auto"  # auto | center_crop (eval_transform, PIL bicubic) | uned (UDON's bilinear)
    crop_ratio: float = 0.875  # center_crop: the short side is resized to img_size / crop_ratio
    dim: Optional[int] = None  # the descriptor dim the export must have (null: no check)
    opset: int = 18  # ONNX opset (>= 18)
    check_images: int = 4  # random images of the parity check
    tolerance: float = 1e-4  # largest allowed |export - load_encoder| over the descriptors' entries


@dataclasses.dataclass(kw_only=True)
class ExportConfig:
    """The schema of ``python -m unic.export`` (``unic.cli.parse``)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ExportModelConfig = dataclasses.field(default_factory=ExportModelConfig)
    export: ExportOptions = dataclasses.field(default_factory=ExportOptions)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        check_choices(cfg, {"export.input_dtype": INPUT_DTYPES, "export.preprocess": PREPROCESS})
        check_range(cfg, positive=["export.crop_ratio", "export.dim", "export.check_images", "export.tolerance"],
                    unit=["export.crop_ratio"])
        if not cfg.model.source:
            raise ConfigError("model.source is required: a UNIC .pth file, timm:<model> or open_clip:<model>:<tag>")
        if not _EMBEDDING.fullmatch(cfg.model.embedding):
            raise ConfigError(f"invalid value for 'model.embedding': {cfg.model.embedding!r}; choose one of auto, "
                              "backbone, universal, adaptor:<teacher>, domain:<name> (oracle is one model per domain)")
        formats = list(cfg.export.formats)
        unknown = [f for f in formats if f not in FORMATS]
        if not formats or unknown:
            raise ConfigError(f"invalid value for 'export.formats': {formats}; choose from {', '.join(FORMATS)}")
        size = cfg.export.input_size
        if size is not None and (len(size) not in (1, 2) or min(size) < 1):
            raise ConfigError(f"invalid value for 'export.input_size': expected [H, W] or [S] of positive "
                              f"integers, got {list(size)}")
        if cfg.export.opset < MIN_OPSET:
            raise ConfigError(f"invalid value for 'export.opset': must be >= {MIN_OPSET} (antialiased Resize), "
                              f"got {cfg.export.opset}")
        if cfg.run.device not in ("auto", "cpu") or cfg.run.precision not in ("auto", "fp32"):
            raise ConfigError("exports are traced and checked in float32 on the CPU: leave run.device and "
                              "run.precision unset (auto)")


# ------------------------------------------------------------------------------------------------------------
# preprocessing as tensor operations


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The fixed geometry of one export: input (H, W) -> resize (H', W') -> crop at (top, left) of img_size."""

    mode: str  # center_crop | uned
    input_hw: tuple[int, int]
    resize_hw: tuple[int, int]
    crop_top: int
    crop_left: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_dtype: str
    crop_ratio: float

    def describe(self) -> dict:
        what = ("PIL bicubic (antialiased, two 8-bit passes) as in unic.data.transforms.eval_transform"
                if self.mode == "center_crop" else
                "bilinear without antialiasing as in unic.data.transforms.uned_eval_transform (UDON)")
        return {"mode": self.mode, "resize": list(self.resize_hw), "resized": self.resize_hw != self.input_hw,
                "crop": {"top": self.crop_top, "left": self.crop_left, "size": self.img_size},
                "crop_ratio": self.crop_ratio if self.mode == "center_crop" else 1.0, "interpolation": what}


def plan_preprocessing(mode: str, input_hw: tuple[int, int], img_size: int, crop_ratio: float, mean, std,
                       input_dtype: str) -> Preprocessing:
    """The resize and crop the evaluation transform applies to an image of ``input_hw``, computed as it does:
    torchvision's ``Resize(int)`` + ``CenterCrop`` sizes (``center_crop``) or ``ResizeShortSideCentreCrop``'s
    (``uned``)."""
    h, w = input_hw
    if mode == "center_crop":
        short_target = round(img_size / crop_ratio)
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = short_target, int(short_target * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = int(round((new_h - img_size) / 2.0)), int(round((new_w - img_size) / 2.0))
    elif mode == "uned":
        if h <= w:
            new_h, new_w = img_size, int(w / h * img_size)
        else:
            new_h, new_w = int(h / w * img_size), img_size
        top, left = (new_h - img_size) // 2, (new_w - img_size) // 2
    else:
        raise ValueError(f"unknown preprocessing {mode!r}")
    if min(new_h, new_w) < img_size:
        raise ExportError(f"input {h}x{w} resizes to {new_h}x{new_w}, smaller than the {img_size}-px crop")
    return Preprocessing(mode, (h, w), (new_h, new_w), top, left, img_size, tuple(map(float, mean)),
                         tuple(map(float, std)), input_dtype, float(crop_ratio))


class Preprocess(nn.Module):
    """images (B, 3, H, W) uint8 0..255 or float 0..1 at the fixed input size -> normalised (B, 3, S, S)."""

    def __init__(self, plan: Preprocessing):
        super().__init__()
        self.plan = plan
        self.register_buffer("mean", torch.tensor(plan.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(plan.std).view(1, 3, 1, 1))

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        x = images_BCHW.float()
        if plan.mode == "center_crop":  # PIL resamples 8-bit images: work in 0..255
            if plan.input_dtype == "float":
                x = x * 255.0
            x = self._pil_bicubic(x) / 255.0
        else:  # ToTensor, then the float bilinear resize (TensorFlow's, UDON)
            if plan.input_dtype == "uint8":
                x = x / 255.0
            if plan.resize_hw != plan.input_hw:
                x = F.interpolate(x, size=plan.resize_hw, mode="bilinear", align_corners=False, antialias=False)
        size = plan.img_size
        x = x[:, :, plan.crop_top:plan.crop_top + size, plan.crop_left:plan.crop_left + size]
        return (x - self.mean) / self.std

    def _pil_bicubic(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """PIL's ``Image.resize(BICUBIC)`` of an 8-bit image: horizontal pass, then vertical, each stored as
        8 bits (clamped, rounded half up) before the next."""
        (h, w), (new_h, new_w) = self.plan.input_hw, self.plan.resize_hw
        if new_w != w:
            x_BCHW = F.interpolate(x_BCHW, size=(h, new_w), mode="bicubic", align_corners=False, antialias=True)
            x_BCHW = torch.floor(x_BCHW.clamp(0.0, 255.0) + 0.5)
        if new_h != h:
            x_BCHW = F.interpolate(x_BCHW, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            x_BCHW = torch.floor(x_BCHW.clamp(0.0, 255.0) + 0.5)
        return x_BCHW


class DeployedEncoder(nn.Module):
    """images (B, 3, H, W) at the export's fixed size -> L2-normalised float32 descriptors (B, D)."""

    def __init__(self, encoder: nn.Module, plan: Preprocessing):
        super().__init__()
        self.preprocess, self.encoder = Preprocess(plan), encoder
        self.eval().requires_grad_(False)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(self.preprocess(images_BCHW)).float(), dim=-1)


def reference_transform(plan: Preprocessing):
    """The evaluation transform itself (PIL / torchvision, :mod:`unic.data.transforms`) the export reproduces."""
    from unic.data.transforms import eval_transform, uned_eval_transform

    if plan.mode == "uned":
        return uned_eval_transform(plan.img_size, plan.mean, plan.std)
    return eval_transform(plan.img_size, plan.crop_ratio, plan.mean, plan.std)


# ------------------------------------------------------------------------------------------------------------
# writers and readers of each format


def missing_onnx_packages() -> list[str]:
    """The packages an ONNX export needs that cannot be imported."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def example_input(plan: Preprocessing, batch: int = 2) -> torch.Tensor:
    h, w = plan.input_hw
    if plan.input_dtype == "uint8":
        return torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def export_torchscript(model: DeployedEncoder, path: str) -> None:
    """A traced TorchScript module (the input size is fixed, so tracing records the whole computation; the
    batch size stays free)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings: shapes of the fixed input size become constants
        traced = torch.jit.trace(model, example_input(model.preprocess.plan), check_trace=False)
        torch.jit.save(traced, path)  # (torch 2.14 warns that TorchScript is deprecated in favour of torch.export)


def export_onnx(model: DeployedEncoder, path: str, opset: int) -> list[str]:
    """An ONNX model (torch.export + onnxscript), input ``images`` (batch dimension free), output
    ``descriptors``; the weights go to ``<path>.data`` beside it when over protobuf's 2 GB. Returns the files."""
    external = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > _EXTERNAL_DATA_BYTES
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example_input(model.preprocess.plan),), None, dynamo=True, opset_version=opset,
            input_names=["images"], output_names=["descriptors"], dynamic_shapes=({0: batch},), verbose=False,
            external_data=external,
        )
    program.save(path, external_data=external)
    return [path] + ([f"{path}.data"] if external else [])


def load_torchscript(path: str) -> Callable[[torch.Tensor], np.ndarray]:
    """A saved TorchScript export as ``images -> descriptors`` (loaded from ``path`` with torch.jit.load)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation notice of TorchScript
        module = torch.jit.load(path, map_location="cpu")

    def apply(images_BCHW: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(images_BCHW).numpy()

    return apply


def load_onnx(path: str) -> Callable[[torch.Tensor], np.ndarray]:
    """A saved ONNX export as ``images -> descriptors`` through an onnxruntime CPU session."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images_BCHW: session.run(["descriptors"], {"images": images_BCHW.numpy()})[0]


LOADERS = {"torchscript": load_torchscript, "onnx": load_onnx}


# ------------------------------------------------------------------------------------------------------------
# the export run



def default_output_dir(source: str, embedding: str) -> str:
    from unic.eval.encoders import is_named_model

    if is_named_model(source):
        return os.path.join("output", "deploy", safe_filename(f"{source}-{embedding}"))
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(os.path.abspath(source)), "deploy", safe_filename(f"{stem}-{embedding}"))


def load(cfg: DictConfig) -> nn.Module:
    """The encoder ``model`` names, with one-line errors for a missing file or an unknown embedding."""
    from unic.eval.encoders import is_named_model, load_encoder

    source = cfg.model.source
    if not is_named_model(source) and not os.path.isfile(os.path.expanduser(source)):
        raise ExportError(f"model.source: no such file {source}")
    try:
        return load_encoder(os.path.expanduser(source) if not is_named_model(source) else source,
                            cfg.model.embedding, cfg.model.weights)
    except (ValueError, FileNotFoundError) as err:  # CheckpointFormatError is a ValueError
        raise ExportError(str(err).splitlines()[0]) from None


def _resolved_embedding(encoder, requested: str) -> str:
    kind = getattr(encoder, "kind", requested)
    return "image" if kind == "open_clip" else kind


def resolve_plan(cfg: DictConfig, encoder) -> Preprocessing:
    """The preprocessing of ``export``'s settings for ``encoder``."""
    options = cfg.export
    embedding = _resolved_embedding(encoder, cfg.model.embedding)
    mode = options.preprocess
    if mode == "auto":
        mode = "uned" if embedding == "universal" or embedding.startswith("domain:") else "center_crop"
    img_size = int(encoder.img_size)
    if options.input_size is None:
        side = round(img_size / options.crop_ratio) if mode == "center_crop" else img_size
        input_hw = (side, side)
    else:
        size = list(options.input_size)
        input_hw = (int(size[0]), int(size[-1]))
    return plan_preprocessing(mode, input_hw, img_size, options.crop_ratio, encoder.mean, encoder.std,
                              options.input_dtype)


def check_images(plan: Preprocessing, count: int, seed: int) -> np.ndarray:
    """``count`` random 8-bit RGB images (N, H, W, 3) of the input size: half noise, half smooth colour fields
    with mild noise (what photos look like to a resize)."""
    rng = np.random.RandomState(seed)
    h, w = plan.input_hw
    images = []
    for i in range(count):
        if i % 2 == 0:
            images.append(rng.randint(0, 256, (h, w, 3)))
            continue
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 4)))
        smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        images.append(smooth + rng.normal(0, 8, (h, w, 3)))
    return np.clip(np.round(np.stack(images)), 0, 255).astype(np.uint8)


def as_input(images_NHWC: np.ndarray, input_dtype: str) -> torch.Tensor:
    """8-bit (N, H, W, 3) images as the export takes them: (N, 3, H, W) uint8, or float in 0..1."""
    x = torch.from_numpy(np.ascontiguousarray(images_NHWC)).permute(0, 3, 1, 2).contiguous()
    return x if input_dtype == "uint8" else x.float() / 255.0


def reference_descriptors(encoder: nn.Module, plan: Preprocessing, images_NHWC: np.ndarray) -> np.ndarray:
    """What an evaluation computes: the evaluation transform on PIL images, the encoder, L2 normalisation."""
    from PIL import Image

    transform = reference_transform(plan)
    batch = torch.stack([transform(Image.fromarray(image)) for image in images_NHWC])
    with torch.no_grad():
        return F.normalize(encoder(batch).float(), dim=-1).numpy()


def parity(fmt: str, path: str, inputs: torch.Tensor, reference: np.ndarray, eager: np.ndarray) -> dict:
    """The saved export loaded back: max |export - reference| on the batch and on its first image alone (the
    batch size is free), and max |export - eager module| (what exporting alone changes)."""
    apply = LOADERS[fmt](path)
    batch, single = apply(inputs), apply(inputs[:1])
    if batch.shape != reference.shape:
        raise ExportError(f"{os.path.basename(path)} returned descriptors of shape {tuple(batch.shape)}, "
                          f"expected {tuple(reference.shape)}")
    return {"max_abs_diff": float(np.abs(batch - reference).max()),
            "max_abs_diff_batch_of_1": float(np.abs(single - reference[:1]).max()),
            "max_abs_diff_vs_eager": float(np.abs(batch - eager).max())}


def _versions(formats) -> dict:
    versions = {"torch": torch.__version__}
    if "onnx" in formats:
        import onnx
        import onnxruntime
        import onnxscript

        versions.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)
    return versions


def run(cfg: DictConfig) -> dict:
    """Load, export each format into a temporary folder, load every file back and check it against
    load_encoder, then move the files into ``output_dir`` with the card. Returns the card."""
    from unic.cli import write_resolved_config
    from unic.io import write_json, write_text
    from unic.train.logger import setup_logging

    setup_logging()
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO lines narrate every graph pass
        logging.getLogger(name).setLevel(logging.WARNING)
    formats = list(dict.fromkeys(cfg.export.formats))
    if "onnx" in formats and missing_onnx_packages():
        raise ExportError(f"export.formats has onnx but {', '.join(missing_onnx_packages())} is not installed: "
                          "pip install 'unic[export]' (or export.formats=[torchscript])")
    encoder = load(cfg)
    embedding = _resolved_embedding(encoder, cfg.model.embedding)
    plan = resolve_plan(cfg, encoder)
    model = DeployedEncoder(encoder, plan)
    images = check_images(plan, cfg.export.check_images, cfg.run.seed)
    inputs = as_input(images, plan.input_dtype)
    with torch.no_grad():
        eager = model(inputs).numpy()
    dim = int(eager.shape[1])
    if cfg.export.dim is not None and dim != cfg.export.dim:
        raise ExportError(f"the {embedding} embedding of {cfg.model.source} has dim {dim}, not export.dim="
                          f"{cfg.export.dim}")
    reference = reference_descriptors(encoder, plan, images)
    output_dir = cfg.run.output_dir or default_output_dir(cfg.model.source, embedding)
    os.makedirs(output_dir, exist_ok=True)
    setup_logging(output_dir)
    logger.info("exporting %s (%s, dim %d) for %s %dx%d input: %s -> %s", cfg.model.source, embedding, dim,
                plan.input_dtype, *plan.input_hw, ", ".join(formats), output_dir)
    results: dict[str, dict] = {}
    staging = tempfile.mkdtemp(prefix=".export-", dir=output_dir)
    try:
        written: list[str] = []
        for fmt in formats:
            path = os.path.join(staging, FILES[fmt])
            start = time.perf_counter()
            if fmt == "torchscript":
                export_torchscript(model, path)
                files = [path]
            else:
                files = export_onnx(model, path, cfg.export.opset)
            seconds = time.perf_counter() - start
            check = parity(fmt, path, inputs, reference, eager)
            results[fmt] = {"files": [os.path.basename(f) for f in files], "export_seconds": round(seconds, 3),
                            **check}
            logger.info("%s: %.1f s, max |export - load_encoder| %.2e (batch of 1: %.2e)", fmt, seconds,
                        check["max_abs_diff"], check["max_abs_diff_batch_of_1"])
            written += files
        failed = {fmt: r for fmt, r in results.items()
                  if max(r["max_abs_diff"], r["max_abs_diff_batch_of_1"]) > cfg.export.tolerance}
        if failed:
            worst = ", ".join(f"{fmt} {max(r['max_abs_diff'], r['max_abs_diff_batch_of_1']):.2e}"
                              for fmt, r in failed.items())
            raise ExportError(f"parity check failed: max |export - load_encoder| {worst} > export.tolerance="
                              f"{cfg.export.tolerance:g} on {len(images)} images (the module before export: "
                              f"{float(np.abs(eager - reference).max()):.2e}, {plan.mode} preprocessing); "
                              "nothing written")
        for path in written:
            os.replace(path, os.path.join(output_dir, os.path.basename(path)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    card = {
        "format": CARD_FORMAT, "version": 1,
        "source": cfg.model.source, "weights": cfg.model.weights, "embedding": embedding, "dim": dim,
        "input": {"name": "images", "shape": ["batch", 3, *plan.input_hw], "dtype": plan.input_dtype,
                  "range": "0..255" if plan.input_dtype == "uint8" else "0..1", "channels": "RGB"},
        "output": {"name": "descriptors", "shape": ["batch", dim], "dtype": "float32", "l2_normalized": True},
        "img_size": plan.img_size, "mean": list(plan.mean), "std": list(plan.std),
        "preprocess": plan.describe(),
        "files": {fmt: results[fmt]["files"] for fmt in formats},
        "opset": cfg.export.opset if "onnx" in formats else None,
        "parity": {
            "reference": "unic.eval.encoders.load_encoder + the evaluation transform (PIL/torchvision) + L2 norm",
            "images": len(images), "tolerance": cfg.export.tolerance,
            "eager_max_abs_diff": float(np.abs(eager - reference).max()),
            **{fmt: {k: v for k, v in r.items() if k not in ("files", "export_seconds")}
               for fmt, r in results.items()},
        },
        "export_seconds": {fmt: results[fmt]["export_seconds"] for fmt in formats},
        "versions": _versions(formats),
    }
    write_json(os.path.join(output_dir, "card.json"), card)
    write_text(os.path.join(output_dir, "card.md"), card_markdown(card))
    write_resolved_config(cfg, output_dir)
    logger.info("wrote %s", ", ".join(f for fmt in formats for f in card["files"][fmt]))
    return card


def card_markdown(card: dict) -> str:
    """The card as a page a person reads next to the files."""
    shape = "x".join(str(s) for s in card["input"]["shape"][1:])
    pre = card["preprocess"]
    rows = [
        f"# {card['embedding']} descriptors of {os.path.basename(card['source'])}",
        "",
        "| | |", "|---|---|",
        f"| source | `{card['source']}` |",
        f"| embedding | {card['embedding']} (dim {card['dim']}, L2-normalised float32) |",
        f"| input | `images`: (batch, {shape.replace('x', ', ')}) {card['input']['dtype']} "
        f"{card['input']['range']}, RGB |",
        f"| preprocessing | resize to {pre['resize'][0]}x{pre['resize'][1]} ({pre['interpolation']}), "
        f"crop {pre['crop']['size']} at ({pre['crop']['top']}, {pre['crop']['left']}) |",
        f"| mean / std | {card['mean']} / {card['std']} |",
        *(f"| {fmt} | {', '.join(f'`{f}`' for f in files)} ({card['export_seconds'][fmt]:.1f} s to export) |"
          for fmt, files in card["files"].items()),
        "",
        f"Parity on {card['parity']['images']} random images against {card['parity']['reference']} "
        f"(tolerance {card['parity']['tolerance']:g}):",
        "",
        "| model | max abs diff | batch of 1 |", "|---|---|---|",
        f"| eager (this module, before export) | {card['parity']['eager_max_abs_diff']:.2e} | |",
        *(f"| {fmt} | {card['parity'][fmt]['max_abs_diff']:.2e} | {card['parity'][fmt]['max_abs_diff_batch_of_1']:.2e} |"
          for fmt in card["files"]),
        "",
        "```python",
        "import torch  # TorchScript",
        f"model = torch.jit.load(\"{FILES['torchscript']}\")",
        "descriptors = model(images)  # (batch, dim)",
        "import onnxruntime  # ONNX",
        f"session = onnxruntime.InferenceSession(\"{FILES['onnx']}\")",
        "descriptors = session.run([\"descriptors\"], {\"images\": images.numpy()})[0]",
        "```",
        "",
    ]
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------
# entry point


def main(argv: list[str] | None = None) -> int:
    from unic import cli as config_cli

    try:
        cfg, _ = config_cli.parse(argv, ExportConfig, __doc__, EXAMPLE,
                                  renamed={"checkpoint": "model.source", "embedding": "model.embedding",
                                           "format": "export.formats", "formats": "export.formats",
                                           "opset": "export.opset", "input_size": "export.input_size"})
        run(cfg)
    except (ConfigError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """Console-script and ``python -m unic.export`` entry."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
