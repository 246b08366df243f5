"""UNIC distillation loss with vectorised teacher dropping (SPEC section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unic import distributed

Features = dict[str, dict[str, torch.Tensor]]


def token_loss(pred: torch.Tensor, target: torch.Tensor, lam_cos: float, lam_sl1: float) -> torch.Tensor:
    """l(a, b) = lam_cos * (1 - cos(a, b)) + lam_sl1 * mean_d SmoothL1_beta=1(a_d - b_d), over the last dim."""
    pred = pred.float()
    cos = F.cosine_similarity(pred, target, dim=-1)
    sl1 = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(-1)
    return lam_cos * (1.0 - cos) + lam_sl1 * sl1


def per_image_losses(
    student_out: Features, teacher_out: Features, lam_cos: float = 0.5, lam_sl1: float = 0.5
) -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher names (sorted), L (T, B) with L_t,i = (l(cls) + mean_n l(patch_n)) / 2, and the parts."""
    names = sorted(teacher_out)
    missing = set(names) ^ set(student_out)
    if missing:
        raise KeyError(f"student and teacher outputs name different teachers: {sorted(missing)}")
    rows, parts = [], {}
    for name in names:
        cls_B = token_loss(student_out[name]["cls"], teacher_out[name]["cls"], lam_cos, lam_sl1)
        patch_B = token_loss(student_out[name]["patch"], teacher_out[name]["patch"], lam_cos, lam_sl1).mean(-1)
        parts[f"{name}/cls"], parts[f"{name}/patch"] = cls_B, patch_B
        rows.append(0.5 * (cls_B + patch_B))
    return names, torch.stack(rows), parts


def teacher_coefficients(
    losses_TB: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """a_t,i in {0, 1}: the hardest teacher of each image is kept, every other one dropped with prob p.

    Draws are made for the *global* batch (the same seeded generator on every rank) and each rank takes its
    own slice, so the coefficients of an image do not depend on how many processes share the batch.
    """
    T, B = losses_TB.shape
    keep_TB = torch.zeros_like(losses_TB, dtype=torch.bool)
    hardest_B = losses_TB.detach().argmax(dim=0)  # ties: first (lowest sorted name) index
    keep_TB[hardest_B, torch.arange(B, device=losses_TB.device)] = True
    if drop_prob <= 0.0:
        return torch.ones_like(losses_TB)
    if drop_prob < 1.0:
        world, rank = distributed.get_world_size(), distributed.get_rank()
        uniform = torch.rand((T, B * world), generator=generator, device=losses_TB.device)
        keep_TB |= uniform[:, rank * B:(rank + 1) * B] >= drop_prob
    return keep_TB.to(losses_TB.dtype)


def distillation_loss(
    student_out: Features,
    teacher_out: Features,
    lam_cos: float = 0.5,
    lam_sl1: float = 0.5,
    drop_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = sum_{t,i} a_t,i L_t,i / sum_{t,i} a_t,i``; returns (loss, kept fraction per teacher).

    ``student_out`` / ``teacher_out`` map teacher name -> {"cls": (B, D_t), "patch": (B, N, D_t)}.
    Under DDP the normaliser is the global sum of coefficients and the local loss is scaled by the world
    size, so DDP's gradient averaging yields exactly the gradient of the global-batch loss.
    """
    loss, kept, _ = distillation_loss_parts(student_out, teacher_out, lam_cos, lam_sl1, drop_prob, generator)
    return loss, kept


def distillation_loss_parts(
    student_out: Features,
    teacher_out: Features,
    lam_cos: float = 0.5,
    lam_sl1: float = 0.5,
    drop_prob: float = 0.5,
    generator: torch.Generator | None = None,
    across_ranks: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """As :func:`distillation_loss`, plus detached per-teacher mean cls/patch losses for logging.

    ``across_ranks=False`` normalises by the local sum (no collective), for evaluation loops whose ranks
    see different numbers of batches.
    """
    names, losses_TB, parts = per_image_losses(student_out, teacher_out, lam_cos, lam_sl1)
    coef_TB = teacher_coefficients(losses_TB, drop_prob, generator)
    world = distributed.get_world_size() if across_ranks else 1
    norm = coef_TB.sum().detach().clone()
    if across_ranks:
        distributed.all_reduce_sum(norm)
    loss = (coef_TB * losses_TB).sum() / norm * world
    kept = {name: coef_TB[t].mean() for t, name in enumerate(names)}
    logs = {key: value.detach().mean() for key, value in parts.items()}
    return loss, kept, logs
