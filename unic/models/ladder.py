"""Ladder of projectors (UNIC): one MLP per teacher, token type and selected student block; summed."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
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

    #: ``True`` runs the grouped kernels (:meth:`_grouped`), ``False`` one small MLP per projector (the plain
    #: path the training benchmark's ``--baseline`` measures), ``None`` (default) the grouped ones on CUDA only:
    #: they save kernel launches (96 projectors -> 24 matmuls for the UNIC recipe) but copy the weights and the
    #: hidden activations once more, which on this 2-core CPU made the ladder about 10 % slower (ViT-S/16, two
    #: teachers, 16 images: 2.40 s vs 2.18 s forward+backward). Both give the same values to float tolerance.
    batched: bool | None = None

    def forward(self, taps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """``taps[b] = (cls (B, D), patch (B, N, D))`` of every student block -> ``{teacher: {"cls": (B, D_t),
        "patch": (B, N, D_t)}}``, the sum over the selected blocks of each projector's output."""
        grouped = self.batched if self.batched is not None else taps[0][1].is_cuda
        return self._grouped(taps) if grouped else self._per_projector(taps)

    def _per_projector(self, taps):
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

    def _grouped(self, taps):
        """The same sums in 2 x (blocks + teachers) matmuls instead of 2 x 2 x blocks x teachers.

        Per token type: for each block, one matmul applies every teacher's first layer (their weights stacked
        along the output: the hidden widths concatenated); then for each teacher, one matmul applies all its
        second layers at once to its hidden activations of every block laid side by side (weights concatenated
        along the input), so the sum over blocks comes out of that matmul's reduction, and the biases add up
        once. The parameters stay those of the per-projector modules (same state dict, same init)."""
        names = list(self.projectors)
        out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
        for t_index, ttype in enumerate(TOKEN_TYPES):
            hidden: dict[str, list[torch.Tensor]] = {name: [] for name in names}
            for j, block in enumerate(self.blocks):
                firsts = [self.projectors[name][ttype][j][0] for name in names]
                h = F.gelu(F.linear(taps[block][t_index], torch.cat([layer.weight for layer in firsts]),
                                    torch.cat([layer.bias for layer in firsts])))
                for name, part in zip(names, h.split([layer.out_features for layer in firsts], dim=-1)):
                    hidden[name].append(part)
            for name in names:
                seconds = [proj[2] for proj in self.projectors[name][ttype]]
                weight = torch.cat([layer.weight for layer in seconds], dim=1)  # (D_t, sum of hidden widths)
                # added one by one: a stacked sum would hand every bias a view of one gradient tensor, which
                # in-place clipping (or unscaling) would then scale once per bias
                bias = functools.reduce(torch.add, [layer.bias for layer in seconds])
                out[name][ttype] = F.linear(torch.cat(hidden[name], dim=-1), weight, bias)
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
