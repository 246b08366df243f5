"""Frozen teacher glue: re-size and re-normalise the student's batch, run the teacher, resample its grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from teachers import build_teacher_model, get_spec


def teacher_key(name: str) -> str:
    """Module-dict key of a teacher name (``timm:<model>.<tag>`` holds a dot, which modules cannot)."""
    return name.replace(".", "_")


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode forever, never needs gradients and is never wrapped in DDP."""

    def __init__(self, name: str, weights: str | None, weights_dir: str, resolution: int | None = None):
        super().__init__()
        self.name = name
        self.tokens, self.spec = build_teacher_model(get_spec(name, resolution), weights, weights_dir)
        self.embed_dim = self.tokens.embed_dim
        self.register_buffer("mean", torch.tensor(self.spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tokens.parameters()).dtype

    def train(self, mode: bool = True) -> "FrozenTeacher":  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    @torch.inference_mode()
    def forward(
        self, images_BCHW: torch.Tensor, input_mean: torch.Tensor, input_std: torch.Tensor,
        student_grid: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """``images`` are normalised with ``input_mean/std`` (the student's); returns cls (B, D_t) and
        patch tokens (B, N_student, D_t) on the student's patch grid, in float32. A teacher cast to bf16
        (``.to(torch.bfloat16)``, as the trainer does for bf16 runs) gets its input in bf16."""
        x = images_BCHW.float() * input_std + input_mean  # resized and renormalised in float32
        res = self.spec.resolution
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, size=(res, res), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        x = ((x - self.mean) / self.std).to(self.dtype)  # bf16 networks get bf16 input
        cls_BD, patch_BND = self.tokens(x)
        cls_BD, patch_BND = cls_BD.float(), patch_BND.float()
        side = res // self.tokens.patch_size
        if (side, side) != tuple(student_grid):
            B, N, D = patch_BND.shape
            grid = patch_BND.transpose(1, 2).reshape(B, D, side, side)
            grid = F.interpolate(grid, size=tuple(student_grid), mode="bilinear", align_corners=False)
            patch_BND = grid.flatten(2).transpose(1, 2)
        return {"cls": cls_BD, "patch": patch_BND}
