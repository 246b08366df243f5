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
