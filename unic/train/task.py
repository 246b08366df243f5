"""The UNIC method in one place: teachers -> standardised targets, student -> ladder predictions, loss."""

from __future__ import annotations

import torch
from torch import nn

from unic.losses.distill import distillation_loss_parts
from unic.train.standardize import TeacherStandardizer, std_momentum


class DistillationTask:
    """``task(images, step) -> {"loss", "loss/<teacher>/<cls|patch>", "kept/<teacher>"}``.

    ``model`` is the trainable student+ladder (possibly DDP-wrapped); teachers stay outside DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        teachers: nn.ModuleDict,
        standardizer: TeacherStandardizer,
        patch_size: int,
        input_mean: torch.Tensor,
        input_std: torch.Tensor,
        total_steps: int,
        lam_cos: float = 0.5,
        lam_sl1: float = 0.5,
        drop_prob: float = 0.5,
        momentum_start: float = 1.0,
        momentum_end: float = 0.001,
        generator: torch.Generator | None = None,
    ):
        self.model, self.teachers, self.standardizer = model, teachers, standardizer
        self.patch_size = patch_size
        self.input_mean, self.input_std = input_mean.view(1, 3, 1, 1), input_std.view(1, 3, 1, 1)
        self.total_steps = total_steps
        self.lam_cos, self.lam_sl1, self.drop_prob = lam_cos, lam_sl1, drop_prob
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.generator = generator

    def teacher_targets(self, images_BCHW: torch.Tensor, step: int | None) -> dict[str, dict[str, torch.Tensor]]:
        """Standardised teacher features; ``step=None`` (evaluation) uses the running statistics only."""
        grid = (images_BCHW.shape[-2] // self.patch_size, images_BCHW.shape[-1] // self.patch_size)
        raw = {}
        for name, teacher in self.teachers.items():
            out = teacher(images_BCHW, self.input_mean, self.input_std, grid)
            raw[name] = {k: v.clone() for k, v in out.items()}  # inference tensors -> normal tensors
        momentum = 0.0 if step is None else std_momentum(step, self.total_steps, self.momentum_start, self.momentum_end)
        return self.standardizer(raw, momentum)

    def __call__(self, images_BCHW: torch.Tensor, step: int | None = None, drop: bool = True,
                 model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Training: ``step`` set, DDP model. Evaluation: ``step=None``, ``drop=False`` and the unwrapped
        ``model``, so that no collective runs per batch (ranks may see different numbers of batches)."""
        targets = self.teacher_targets(images_BCHW, step)
        preds = (model or self.model)(images_BCHW)
        loss, kept, parts = distillation_loss_parts(
            preds, targets, self.lam_cos, self.lam_sl1, self.drop_prob if drop else 0.0, self.generator,
            across_ranks=step is not None,
        )
        out = {"loss": loss}
        out.update({f"loss/{k}": v for k, v in parts.items()})
        out.update({f"kept/{k}": v for k, v in kept.items()})
        return out
