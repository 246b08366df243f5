"""Position-embedding resampling rules, one per teacher family (SPEC section 3).

A teacher run at a resolution other than the one its weights were trained at must resample its position
embedding exactly as its own reference implementation does, or its tokens drift from the reference's:

- ``timm`` (timm teachers, and the OpenAI/open_clip CLIP files loaded onto timm CLIP ViTs): timm's
  ``resample_abs_pos_embed``: bicubic to the new grid size, ``antialias=True``, ``align_corners=False``, in
  float32. open_clip's ``resize_pos_embed`` does the same computation, so the CLIP family matches open_clip too.
- ``dinov2`` (DINOv2 hub models without registers, ``interpolate_offset=0.1, interpolate_antialias=False``):
  ``interpolate_pos_encoding`` calls bicubic with ``scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)`` (M: the
  trained grid side, h0/w0: the new one) and no antialiasing. The scale factor, not the output size, sets the
  sampling positions, so this is not the same as resizing to (h0, w0).
- ``dinov2_reg`` (DINOv2 hub models with registers, ``interpolate_offset=0.0, interpolate_antialias=True``):
  bicubic to ``size=(h0, w0)`` with antialiasing, i.e. the same computation as timm's rule.

DINOv2 resamples at every forward from the float32 trained embedding; resampling once at load from the same
float32 values gives the same tensor, which is what :func:`resample_pos_embed` is used for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# rule -> (interpolate_offset, interpolate_antialias), in DINOv2's terms; offset 0 means "resize to the size"
POS_EMBED_RULES: dict[str, tuple[float, bool]] = {
    "timm": (0.0, True),
    "dinov2": (0.1, False),
    "dinov2_reg": (0.0, True),
}


def num_pos_prefix_tokens(num_tokens: int) -> int:
    """Prefix (cls) slots of a position embedding over a square grid: 0 or 1 (``1 + M*M`` tokens)."""
    side = math.isqrt(num_tokens)
    return num_tokens - side * side


def resample_pos_embed(
    pos_embed_1ND: torch.Tensor, grid_hw: tuple[int, int], rule: str, num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """Resample a (1, prefix + M*M, D) position embedding to ``grid_hw`` with a family's ``rule``.

    The prefix (cls) slots are kept as they are; the result has the input's dtype.
    """
    if rule not in POS_EMBED_RULES:
        raise ValueError(f"unknown position-embedding rule '{rule}'; known: {', '.join(POS_EMBED_RULES)}")
    offset, antialias = POS_EMBED_RULES[rule]
    if num_prefix_tokens is None:
        num_prefix_tokens = num_pos_prefix_tokens(pos_embed_1ND.shape[1])
    prefix, patch = pos_embed_1ND[:, :num_prefix_tokens], pos_embed_1ND[:, num_prefix_tokens:]
    side = math.isqrt(patch.shape[1])
    if side * side != patch.shape[1]:
        raise ValueError(f"position embedding of {patch.shape[1]} patch tokens is not a square grid")
    h0, w0 = int(grid_hw[0]), int(grid_hw[1])
    if (side, side) == (h0, w0):
        return pos_embed_1ND
    dim = patch.shape[-1]
    grid = patch.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": (float(h0 + offset) / side, float(w0 + offset) / side)}
    else:
        kwargs = {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, align_corners=False, **kwargs)
    if tuple(grid.shape[-2:]) != (h0, w0):
        raise ValueError(f"rule '{rule}' resampled a {side}x{side} grid to {tuple(grid.shape[-2:])}, not {(h0, w0)}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim).to(pos_embed_1ND.dtype)
    return torch.cat([prefix, patch], dim=1)
