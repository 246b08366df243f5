"""The student's adaptor to a teacher (SPEC section 11): backbone + that teacher's ladder + its statistics.

The ladder predicts each teacher's tokens in the teacher's standardised space; de-standardised with the
running statistics of training, ``f = pred * (std + eps) + mean`` stands in for the teacher's own
final-normed cls and patch tokens (for a CLIP teacher: ``ln_post``'s output, before the projection)::

    adaptor = unic.load_student("student.pth", adaptor="metaclip_vith14")
    out = adaptor(images_BCHW)          # normalised with adaptor.mean / adaptor.std at adaptor.img_size
    out["cls"], out["patch"]            # (B, D_t), (B, N, D_t) on the student's patch grid

Every UNIC file format holds the adaptors (layout: :mod:`unic.models.export`); :func:`adaptor_from_checkpoint`
builds one from any of them.
"""

from __future__ import annotations

import torch
from torch import nn

from unic.models.ladder import TOKEN_TYPES, Ladder
from unic.models.student import student_taps
from unic.models.teacher import teacher_key


class Adaptor(nn.Module):
    """images (B, 3, H, W) -> ``{"cls": (B, D_t), "patch": (B, N, D_t)}`` in teacher ``teacher``'s space."""

    def __init__(self, backbone: nn.Module, teacher: str, ladder: Ladder, stats: dict[str, torch.Tensor],
                 last_tap: str, eps: float):
        super().__init__()
        self.backbone, self.ladder, self.teacher = backbone, ladder, teacher
        self.key = next(iter(ladder.projectors))  # the ladder holds this teacher's projectors only
        self.last_tap, self.eps = last_tap, float(eps)
        for ttype in TOKEN_TYPES:
            for stat in ("mean", "std"):
                self.register_buffer(f"{ttype}_{stat}", stats[f"{ttype}_{stat}"].float().clone())
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        self.img_size = int(getattr(backbone, "unic_img_size", cfg.get("input_size", (3, 224, 224))[-1]))
        self.mean, self.std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
        self.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.cls_mean.shape[0])

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_embed.patch_size[0]

    def forward(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        taps, _ = student_taps(self.backbone, images_BCHW, self.last_tap)
        pred = self.ladder(taps)[self.key]
        return {
            "cls": pred["cls"] * (self.cls_std + self.eps) + self.cls_mean,
            "patch": pred["patch"] * (self.patch_std + self.eps) + self.patch_mean,
        }


def adaptor_names(ckpt: dict) -> list[str]:
    """The teachers a loaded UNIC file (training checkpoint, student or universal export) has an adaptor for,
    in the ladder's order ([] for none)."""
    from unic.models.export import read_adaptors

    adaptors = read_adaptors(ckpt)
    return list(adaptors["teachers"]) if adaptors else []


def _resolve(name: str, teachers: list[str]) -> str | None:
    """The stored teacher ``name`` refers to: as written in ``teachers.names``, or in a mangled spelling
    (``teacher_key``'s ``.`` -> ``_``, the standardizer's ``:`` -> ``_``)."""
    if name in teachers:
        return name

    def mangle(n: str) -> str:
        return teacher_key(n).replace(":", "_")

    matches = [t for t in teachers if mangle(t) == mangle(name)]
    return matches[0] if len(matches) == 1 else None


def why_no_adaptors(ckpt: dict) -> str:
    """Why a loaded file has no adaptors, for the error message."""
    if "format" not in ckpt:
        return "it is not a UNIC file"
    if (ckpt.get("origin") or {}).get("adaptors"):  # a published checkpoint whose ladder was not converted
        return f"its ladder was {ckpt['origin']['adaptors']}"
    return "trained without distillation, or exported before exports kept the ladder"


def adaptor_from_checkpoint(ckpt: dict, teacher: str, source: str = "checkpoint") -> Adaptor:
    """The eval-mode :class:`Adaptor` to ``teacher`` of a loaded UNIC file (any format); a clear error when the
    file has no adaptors or none for that teacher (naming those it has)."""
    from unic.models.export import backbone_from_checkpoint, read_adaptors

    adaptors = read_adaptors(ckpt)
    if not adaptors:
        raise ValueError(f"{source} has no adaptors ({why_no_adaptors(ckpt)}); load it without adaptor= for the "
                         "backbone")
    names = list(adaptors["teachers"])
    name = _resolve(teacher, names)
    if name is None:
        raise ValueError(f"{source} has no adaptor for teacher '{teacher}' (has: {', '.join(names)})")
    key = teacher_key(name)
    prefix = f"projectors.{key}."
    state = {k: v for k, v in adaptors["ladder"].items() if k.startswith(prefix)}
    backbone = backbone_from_checkpoint(ckpt, source)
    if len(backbone.blocks) != int(adaptors["num_blocks"]):
        raise ValueError(f"{source}: adaptors for a {adaptors['num_blocks']}-block student, the backbone has "
                         f"{len(backbone.blocks)}")
    with torch.device("meta"):  # the weights come from the file: skip the initialisation
        ladder = Ladder(backbone.embed_dim, int(adaptors["num_blocks"]), {key: int(adaptors["teachers"][name]["dim"])},
                        list(adaptors["blocks"]), int(adaptors["hidden_dim"]), int(adaptors["last_hidden_dim"]))
    try:
        ladder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: the adaptor for '{name}' does not match its layout "
                         f"({str(err).splitlines()[0][:300]})") from None
    return Adaptor(backbone, name, ladder, adaptors["stats"][name], adaptors["last_tap"], adaptors["eps"]).eval()


def load_adaptor(path: str, teacher: str, device: str | torch.device = "cpu") -> Adaptor:
    """The :class:`Adaptor` to ``teacher`` of a UNIC file on disk (loaded weights-only)."""
    from unic.models.published import open_checkpoint

    return adaptor_from_checkpoint(open_checkpoint(path), teacher, path).to(device).eval()
