"""The UNIC file formats in one place: what a run writes and how every reader gets the student back.

Three formats, all weights-only torch files (dicts of tensors and plain data, loaded through
:func:`unic.io.load_checkpoint`):

- ``unic-train`` (``checkpoint.pth``, written by :mod:`unic.train.loop`): the trainable state under
  ``model`` (``backbone.*``, ``ladder.*``, ``udon.*``), optimizer and RNG states, and the resolved ``config``;
- ``unic-student`` (``student.pth``): the backbone's timm state dict under ``state_dict`` (what timm's file
  loader reads) with ``arch``, ``model_kwargs``, ``img_size``, ``mean`` and ``std``;
- ``unic-universal`` (``universal.pth``, UDON runs): a student file plus the ``universal`` projection and the
  per-domain ``teacher_heads`` (``{weight, bias}`` each) and the ``domains``.
"""

from __future__ import annotations

from torch import nn

from unic.models.student import build_student

TRAIN_FORMAT, STUDENT_FORMAT, UNIVERSAL_FORMAT = "unic-train", "unic-student", "unic-universal"
FORMAT_VERSION = 1
FORMATS = (TRAIN_FORMAT, STUDENT_FORMAT, UNIVERSAL_FORMAT)
_HEADS = "udon.teacher_heads."  # the domain heads' prefix in a training checkpoint's model state


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ writers
def student_export(backbone: nn.Module, cfg) -> dict:
    """``student.pth``: a timm state dict under ``state_dict`` (what timm's file loader reads) + meta."""
    return {
        "format": STUDENT_FORMAT,
        "version": FORMAT_VERSION,
        "state_dict": _cpu_state(backbone),
        "arch": cfg.student.arch,
        "model_kwargs": dict(cfg.student.kwargs),
        "img_size": cfg.student.img_size,
        "mean": list(cfg.student.mean),
        "std": list(cfg.student.std),
    }


def universal_export(backbone: nn.Module, cfg, universal: nn.Module, teacher_heads: dict[str, nn.Module],
                     domains: list[str]) -> dict:
    """``universal.pth``: the student file plus the universal projection and each domain's teacher head."""
    return {
        **student_export(backbone, cfg),
        "format": UNIVERSAL_FORMAT,
        "universal": _cpu_state(universal),
        "teacher_heads": {d: _cpu_state(h) for d, h in teacher_heads.items()},
        "domains": list(domains),
    }


# ------------------------------------------------------------------------------------------------ readers
def backbone_state_dict(ckpt: dict) -> dict:
    """The backbone's timm state dict in a training checkpoint, an exported file, or a plain timm file."""
    if ckpt.get("format") == TRAIN_FORMAT:
        return {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if ckpt.get("format") in (STUDENT_FORMAT, UNIVERSAL_FORMAT):
        return ckpt["state_dict"]
    return ckpt


def backbone_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """The student backbone stored in a loaded UNIC file (training checkpoint, student or universal export)."""
    fmt = ckpt.get("format")
    if fmt == TRAIN_FORMAT:
        meta = ckpt["config"]["student"]
        arch, kwargs = meta["arch"], meta["kwargs"]
    elif fmt in (STUDENT_FORMAT, UNIVERSAL_FORMAT):
        meta = ckpt
        arch, kwargs = ckpt["arch"], ckpt["model_kwargs"]
    else:
        raise ValueError(
            f"{source} is not a UNIC checkpoint (format {fmt!r}, expected {', '.join(FORMATS[:-1])} or "
            f"{FORMATS[-1]}); plain timm files load with timm.create_model(arch, pretrained_cfg_overlay=dict(file=path))"
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


def _linear(state: dict) -> nn.Linear:
    layer = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    layer.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    return layer.eval()


def udon_heads(ckpt: dict) -> tuple[nn.Linear | None, dict[str, nn.Linear]]:
    """(universal projection or None, {domain: teacher head}) of a training or universal file (a student
    file has neither)."""
    if ckpt.get("format") == UNIVERSAL_FORMAT:
        universal = ckpt.get("universal")
        heads = dict(ckpt.get("teacher_heads", {}))
    else:
        model = ckpt.get("model", {})
        universal = None
        if "udon.universal.weight" in model:
            universal = {"weight": model["udon.universal.weight"], "bias": model["udon.universal.bias"]}
        heads: dict[str, dict] = {}
        for key, value in model.items():
            if key.startswith(_HEADS):
                domain, param = key[len(_HEADS):].rsplit(".", 1)
                heads.setdefault(domain, {})[param] = value
    return (_linear(universal) if universal is not None else None), {d: _linear(h) for d, h in heads.items()}


def load_unic_file(path: str) -> tuple[nn.Module, nn.Linear | None, dict[str, nn.Linear]]:
    """(backbone, universal projection or None, {domain: teacher head}) of a UNIC file, loaded weights-only."""
    from unic.io import load_checkpoint

    ckpt = load_checkpoint(path)
    return (backbone_from_checkpoint(ckpt, path), *udon_heads(ckpt))


def load_student(path: str, device: str = "cpu") -> nn.Module:
    """Rebuild the student backbone from a training checkpoint or an exported ``student.pth``."""
    from unic.io import load_checkpoint

    return backbone_from_checkpoint(load_checkpoint(path), path).to(device)
