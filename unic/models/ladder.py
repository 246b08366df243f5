"""Ladder of projectors (UNIC): one MLP per teacher, token type and selected student block; summed."""

from __future__ import annotations

import torch
from torch import nn

TOKEN_TYPES = ("cls", "patch")


class Projector(nn.Sequential):
    """Linear(D, h) -> GELU -> Linear(h, D_t), trunc-normal(0.02) weights, zero biases.

    The normal is truncated at 2 std (torch's default bounds are absolute, +-2, which would not truncate).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        for layer in (self[0], self[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(layer.bias)


class Ladder(nn.Module):
    """Predicts every teacher's cls and patch tokens as the sum of projections of the selected blocks."""

    def __init__(
        self,
        student_dim: int,
        num_blocks: int,
        teacher_dims: dict[str, int],
        blocks: list[int] | None = None,
        hidden_dim: int = 768,
        last_hidden_dim: int = 3072,
    ):
        super().__init__()
        if blocks is not None:
            out_of_range = [b for b in blocks if not -num_blocks <= b < num_blocks]
            if out_of_range:
                raise ValueError(f"ladder.blocks {out_of_range} out of range for a {num_blocks}-block student")
        blocks = sorted(set(range(num_blocks) if blocks is None else (b % num_blocks for b in blocks)))
        if num_blocks - 1 not in blocks:
            # the last block (and final norm) would get no gradient: DDP needs every parameter used
            raise ValueError(f"ladder.blocks {blocks} must include the last block ({num_blocks - 1} or -1)")
        self.blocks = blocks

        def width(b: int) -> int:
            return last_hidden_dim if b == num_blocks - 1 else hidden_dim

        self.projectors = nn.ModuleDict({
            name: nn.ModuleDict({
                ttype: nn.ModuleList([Projector(student_dim, width(b), dim) for b in blocks])
                for ttype in TOKEN_TYPES
            })
            for name, dim in teacher_dims.items()
        })

    def forward(self, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name, per_type in self.projectors.items():
            out[name] = {}
            for t_index, ttype in enumerate(TOKEN_TYPES):
                projs = per_type[ttype]
                pred = projs[0](taps[self.blocks[0]][t_index])
                for proj, b in zip(projs[1:], self.blocks[1:]):
                    pred = pred + proj(taps[b][t_index])
                out[name][ttype] = pred
        return out


class UnicModel(nn.Module):
    """The trainable part wrapped in DDP: backbone, ladder (UNIC) and universal projection (UDON).

    ``forward(images)`` returns ``cls`` (the final-normed cls token), ``preds`` (ladder predictions per
    teacher, when distilling) and ``universal_raw`` (the unnormalised universal projection, with UDON).
    ``last_tap`` says what the ladder reads from the last block (see :func:`unic.models.student.student_taps`).
    """

    def __init__(self, backbone: nn.Module, ladder: Ladder | None = None, universal: nn.Module | None = None,
                 last_tap: str = "normed"):
        super().__init__()
        self.backbone = backbone
        self.ladder = ladder
        self.udon = nn.Module()
        self.udon.universal = universal
        self.last_tap = last_tap

    def forward(self, images_BCHW: torch.Tensor) -> dict:
        from unic.models.student import student_taps
        from unic.models.universal import udon_embeddings

        taps, cls_BD = student_taps(self.backbone, images_BCHW, self.last_tap)
        out = {"cls": cls_BD}
        if self.ladder is not None:
            out["preds"] = self.ladder(taps)
        if self.udon.universal is not None:
            out["universal_raw"], _ = udon_embeddings(out["cls"], self.udon.universal)
        return out
