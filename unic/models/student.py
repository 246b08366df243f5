"""The student: a plain timm VisionTransformer built by name, with per-block token taps."""

from __future__ import annotations

import logging

import timm
import torch
from torch import nn

from unic.config import ConfigError

logger = logging.getLogger(__name__)


def build_student(arch: str, img_size: int, drop_path: float = 0.0, kwargs: dict | None = None) -> nn.Module:
    """A timm ViT without classifier, ``dynamic_img_size`` so other resolutions work at evaluation."""
    if not timm.is_model(arch):
        raise ValueError(f"student.arch: timm has no model '{arch}'")
    model = timm.create_model(
        arch, pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path,
        dynamic_img_size=True, **(kwargs or {}),
    )
    if not hasattr(model, "forward_intermediates") or getattr(model, "cls_token", None) is None \
            or getattr(model, "global_pool", "token") != "token":
        raise ConfigError(f"student.arch '{arch}' is not a ViT with a cls token and token pooling "
                          "(the ladder and the evaluations read the cls token)")
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ConfigError(f"student.img_size {img_size} is not a multiple of the patch size {patch}")
    return model


def student_taps(
    model: nn.Module, images_BCHW: torch.Tensor, last_tap: str = "normed",
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The ladder's inputs, (cls (B, D), patch (B, N, D)) after every block, and the final-normed cls (B, D).

    Intermediate taps are the raw block outputs (the ladder learns its own scaling); register tokens are
    skipped. The last tap is the raw output of the last block with ``last_tap="raw"`` (UNIC's code: the final
    norm then takes no part in distillation) or the final-normed tokens with ``"normed"``, which are exactly
    the backbone output used at evaluation.
    """
    final_BLD, intermediates = model.forward_intermediates(
        images_BCHW, indices=None, norm=False, output_fmt="NLC", return_prefix_tokens=True
    )
    taps = [(prefix[:, 0], spatial) for spatial, prefix in intermediates]
    if last_tap == "normed":
        taps[-1] = (final_BLD[:, 0], final_BLD[:, model.num_prefix_tokens:])
    elif last_tap != "raw":
        raise ValueError(f"last_tap must be 'raw' or 'normed', got {last_tap!r}")
    return taps, final_BLD[:, 0]


def backbone_embedding(model: nn.Module, images_BCHW: torch.Tensor) -> torch.Tensor:
    """The final-normed cls token (B, D): the student's image descriptor."""
    return model.forward_features(images_BCHW)[:, 0]


def backbone_state_dict(ckpt: dict) -> dict:
    """The backbone's timm state dict in a training checkpoint, an exported file, or a plain timm file."""
    if ckpt.get("format") == "unic-train":
        return {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if ckpt.get("format") in ("unic-student", "unic-universal"):
        return ckpt["state_dict"]
    return ckpt


def backbone_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """The student backbone stored in a loaded UNIC file (training checkpoint, student or universal export)."""
    fmt = ckpt.get("format")
    if fmt == "unic-train":
        meta = ckpt["config"]["student"]
        arch, kwargs = meta["arch"], meta["kwargs"]
    elif fmt in ("unic-student", "unic-universal"):
        meta = ckpt
        arch, kwargs = ckpt["arch"], ckpt["model_kwargs"]
    else:
        raise ValueError(
            f"{source} is not a UNIC checkpoint (format {fmt!r}, expected unic-train, unic-student or "
            "unic-universal); plain timm files load with timm.create_model(arch, pretrained_cfg_overlay=dict(file=path))"
        )
    img_size = meta["img_size"]
    model = build_student(arch, img_size, 0.0, dict(kwargs))
    model.load_state_dict(backbone_state_dict(ckpt), strict=True)
    model.unic_img_size = img_size
    # the input normalisation it was trained with, where timm's data config helpers look for it
    # (files written before student.mean/std existed were trained with ImageNet's)
    from unic.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    model.pretrained_cfg = {**(model.pretrained_cfg or {}), "input_size": (3, img_size, img_size),
                            "mean": tuple(meta.get("mean", IMAGENET_MEAN)), "std": tuple(meta.get("std", IMAGENET_STD))}
    model.default_cfg = model.pretrained_cfg  # timm's older alias
    return model.eval()


def load_student(path: str, device: str = "cpu") -> nn.Module:
    """Rebuild the student backbone from a training checkpoint or an exported ``student.pth``."""
    from unic.io import load_checkpoint

    return backbone_from_checkpoint(load_checkpoint(path), path).to(device)
