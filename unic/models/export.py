"""The UNIC file formats in one place: what a run writes and how every reader gets the student back.

Three formats, all weights-only torch files (dicts of tensors and plain data, loaded through
:func:`unic.io.load_checkpoint`):

- ``unic-train`` (``checkpoint.pth``, written by :mod:`unic.train.loop`): the trainable state under
  ``model`` (``backbone.*``, ``ladder.*``, ``udon.*``), optimizer and RNG states, and the resolved ``config``;
- ``unic-student`` (``student.pth``): the backbone's timm state dict under ``state_dict`` (what timm's file
  loader reads) with ``arch``, ``model_kwargs``, ``img_size``, ``mean`` and ``std``;
- ``unic-universal`` (``universal.pth``, UDON runs): a student file plus the ``universal`` projection and the
  per-domain ``teacher_heads`` (``{weight, bias}`` each) and the ``domains``.

Student and universal files of a distilling run also hold the student's **adaptors**, its ladder of
projectors with the teacher statistics it was trained against (SPEC section 11), under ``adaptors``::

    "adaptors": {
        "version": 1,
        "teachers": {<name as in teachers.names>: {"dim": D_t}, ...},   # the ladder's order
        "blocks": [int, ...],          # student blocks feeding the ladder (sorted, non-negative)
        "num_blocks": int,             # student depth
        "last_tap": "raw" | "normed",  # what the ladder reads from the last block (student_taps)
        "hidden_dim": int, "last_hidden_dim": int,
        "ladder": {...},               # the Ladder's state dict (keys: projectors.<teacher_key(name)>.*), on CPU
        "stats": {<name>: {"cls_mean", "cls_std", "patch_mean", "patch_std": (D_t,)}},
        "eps": float,                  # teacher space: f = pred * (std + eps) + mean
    }

The key is optional: files written before it existed, and runs without distillation, have none and load as
before. A training checkpoint holds the same information (``model["ladder.*"]``, ``standardizer``, the
``ladder`` and ``teachers`` sections of its config); :func:`read_adaptors` gives the layout above from either.
:mod:`unic.models.adaptor` turns it into a module per teacher.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from unic.models.student import build_student

TRAIN_FORMAT, STUDENT_FORMAT, UNIVERSAL_FORMAT = "unic-train", "unic-student", "unic-universal"
FORMAT_VERSION = 1
ADAPTORS_VERSION = 1
FORMATS = (TRAIN_FORMAT, STUDENT_FORMAT, UNIVERSAL_FORMAT)
_HEADS = "udon.teacher_heads."  # the domain heads' prefix in a training checkpoint's model state


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ writers
def adaptors_state(ladder: nn.Module, standardizer: nn.Module, num_blocks: int, last_tap: str,
                   names: list[str] | None = None, hidden_dim: int | None = None) -> dict:
    """The ``adaptors`` entry of an export (layout: module docstring) from a trained
    :class:`~unic.models.ladder.Ladder` and its :class:`~unic.train.standardize.TeacherStandardizer`.

    ``names`` (``teachers.names``) gives each ladder key its teacher's name (``teacher_key`` turned the dot of
    ``timm:<model>.<tag>`` into ``_``); keys without a name there keep the key."""
    from unic.models.teacher import teacher_key

    if standardizer is None:
        raise ValueError("exporting a ladder needs its TeacherStandardizer: the predictions are in the "
                         "teachers' standardised space")
    by_key = {teacher_key(n): n for n in (names or [])}
    teachers, stats = {}, {}
    for key, per_type in ladder.projectors.items():
        name = by_key.get(key, key)
        teachers[name] = {"dim": int(per_type["cls"][0][2].out_features)}
        stats[name] = {}
        for ttype in ("cls", "patch"):
            mean, std = standardizer.running(key, ttype)
            stats[name][f"{ttype}_mean"] = mean.detach().float().cpu().clone()
            stats[name][f"{ttype}_std"] = std.detach().float().cpu().clone()
    widths = [int(p[0].out_features) for p in next(iter(ladder.projectors.values()))["cls"]]
    return adaptors_layout(teachers, stats, list(ladder.blocks), num_blocks, last_tap, widths, hidden_dim,
                   _cpu_state(ladder), standardizer.eps)


def adaptors_layout(teachers: dict, stats: dict, blocks: list[int], num_blocks: int, last_tap: str,
                    widths: list[int], hidden_dim: int | None, ladder_state: dict, eps: float) -> dict:
    """The ``adaptors`` entry; ``widths``: each selected block's projector width."""
    earlier = [w for b, w in zip(blocks, widths) if b != num_blocks - 1]
    return {
        "version": ADAPTORS_VERSION,
        "teachers": teachers,
        "blocks": [int(b) for b in blocks],
        "num_blocks": int(num_blocks),
        "last_tap": str(last_tap),
        # a ladder fed by the last block alone has no other width in its weights: the configured one
        "hidden_dim": int(earlier[0] if earlier else hidden_dim if hidden_dim is not None else widths[-1]),
        "last_hidden_dim": int(widths[-1]),
        "ladder": ladder_state,
        "stats": stats,
        "eps": float(eps),
    }


def _adaptors_entry(backbone: nn.Module, cfg, ladder: nn.Module | None, standardizer: nn.Module | None) -> dict:
    if ladder is None:
        return {}
    return {"adaptors": adaptors_state(ladder, standardizer, len(backbone.blocks), cfg.ladder.last_tap,
                                       list(cfg.teachers.names), cfg.ladder.hidden_dim)}


def student_export(backbone: nn.Module, cfg, ladder: nn.Module | None = None,
                   standardizer: nn.Module | None = None) -> dict:
    """``student.pth``: a timm state dict under ``state_dict`` (what timm's file loader reads) + meta, and
    with a ``ladder`` (and its ``standardizer``) the ``adaptors``."""
    return {
        "format": STUDENT_FORMAT,
        "version": FORMAT_VERSION,
        "state_dict": _cpu_state(backbone),
        "arch": cfg.student.arch,
        "model_kwargs": dict(cfg.student.kwargs),
        "img_size": cfg.student.img_size,
        "mean": list(cfg.student.mean),
        "std": list(cfg.student.std),
        **_adaptors_entry(backbone, cfg, ladder, standardizer),
    }


def universal_export(backbone: nn.Module, cfg, universal: nn.Module, teacher_heads: dict[str, nn.Module],
                     domains: list[str], ladder: nn.Module | None = None,
                     standardizer: nn.Module | None = None) -> dict:
    """``universal.pth``: the student file plus the universal projection and each domain's teacher head."""
    return {
        **student_export(backbone, cfg, ladder, standardizer),
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
    set_pos_embed_rule(model, meta.get("pos_embed_rule", "timm"))
    return model.eval()


def set_pos_embed_rule(model: nn.Module, rule: str) -> None:
    """Make a ``dynamic_img_size`` timm ViT resample its position embedding at other input sizes with
    ``rule`` (:mod:`teachers.pos_embed`) instead of timm's: a published UNIC student (DINOv2's code, 0.1
    offset, no antialiasing: ``"dinov2"``) then gives its own code's tokens at ADE20K's 512 px too. ``"timm"``
    leaves the model as it is."""
    if rule == "timm":
        return
    import types

    from teachers.pos_embed import resample_pos_embed

    if not getattr(model, "dynamic_img_size", False) or model.reg_token is not None or model.no_embed_class:
        raise ValueError(f"position-embedding rule {rule!r} needs a dynamic-size ViT with a cls token only")
    resample_pos_embed(model.pos_embed, model.patch_embed.grid_size, rule, model.num_prefix_tokens)  # checks rule

    def _pos_embed(self, x_BHWC: torch.Tensor) -> torch.Tensor:  # timm's, with the rule's resampling
        B, H, W, C = x_BHWC.shape
        pos_embed = resample_pos_embed(self.pos_embed, (H, W), rule, self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x_BHWC.reshape(B, -1, C)], dim=1)
        return self.pos_drop(x + pos_embed)

    model._pos_embed = types.MethodType(_pos_embed, model)
    model.unic_pos_embed_rule = rule


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


def _latest_config(ckpt: dict) -> dict:
    history = ckpt.get("config_history") or []
    return history[-1]["config"] if history else (ckpt.get("config") or {})


def _train_adaptors(ckpt: dict) -> dict | None:
    """The ``adaptors`` layout of a training checkpoint's ladder and teacher statistics (None: no ladder)."""
    from inspect import signature

    from unic.models.teacher import teacher_key
    from unic.train.standardize import TeacherStandardizer

    model = ckpt.get("model", {})
    ladder = {k[len("ladder."):]: v.detach().cpu() for k, v in model.items() if k.startswith("ladder.")}
    if not ladder:
        return None
    cfg = _latest_config(ckpt)
    by_key = {teacher_key(n): n for n in (cfg.get("teachers") or {}).get("names") or []}
    keys = list(dict.fromkeys(k.split(".")[1] for k in ladder if k.startswith("projectors.")))
    depth = (int(m.group(1)) for k in model if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    num_blocks = 1 + max(depth)
    settings = cfg.get("ladder") or {}
    chosen = settings.get("blocks")
    blocks = sorted(set(range(num_blocks) if chosen is None else (int(b) % num_blocks for b in chosen)))
    widths = [int(ladder[f"projectors.{keys[0]}.cls.{i}.0.weight"].shape[0]) for i in range(len(blocks))]
    running = ckpt.get("standardizer") or {}
    key_of = TeacherStandardizer._key
    teachers, stats = {}, {}
    for key in keys:
        name = by_key.get(key, key)
        teachers[name] = {"dim": int(ladder[f"projectors.{key}.cls.0.2.weight"].shape[0])}
        try:
            stats[name] = {f"{t}_{s}": running[key_of(key, t, s)].detach().float().cpu()
                           for t in ("cls", "patch") for s in ("mean", "std")}
        except KeyError:
            raise ValueError(f"the checkpoint has a ladder but no teacher statistics for '{name}' "
                             "(its standardizer state is missing)") from None
    eps = signature(TeacherStandardizer).parameters["eps"].default  # not in its state dict
    return adaptors_layout(teachers, stats, blocks, num_blocks, settings.get("last_tap", "normed"), widths,
                   settings.get("hidden_dim"), ladder, eps)


def read_adaptors(ckpt: dict) -> dict | None:
    """The ``adaptors`` (layout: module docstring) of a loaded training checkpoint, student or universal
    export; None when it has none (a run without distillation, or a file exported before adaptors were)."""
    fmt = ckpt.get("format")
    if fmt == TRAIN_FORMAT:
        return _train_adaptors(ckpt)
    if fmt in (STUDENT_FORMAT, UNIVERSAL_FORMAT):
        adaptors = ckpt.get("adaptors")
        if adaptors is not None and int(adaptors.get("version", 0)) > ADAPTORS_VERSION:
            raise ValueError(f"adaptors version {adaptors['version']} is newer than this package reads "
                             f"({ADAPTORS_VERSION}): update unic")
        return adaptors
    return None


def load_unic_file(path: str) -> tuple[nn.Module, nn.Linear | None, dict[str, nn.Linear]]:
    """(backbone, universal projection or None, {domain: teacher head}) of a UNIC file, loaded weights-only."""
    from unic.models.published import open_checkpoint

    ckpt = open_checkpoint(path)
    return (backbone_from_checkpoint(ckpt, path), *udon_heads(ckpt))


def _is_device(value) -> bool:
    if isinstance(value, torch.device):
        return True
    try:
        torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def load_student(path: str, adaptor: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The student of a training checkpoint or an export (``student.pth``, ``universal.pth``), in eval mode:
    the plain timm backbone, or with ``adaptor="<teacher>"`` its :class:`~unic.models.adaptor.Adaptor` to
    that teacher (teacher-space cls and patch tokens).

    ``load_student(path, "cuda")``, the signature before adaptors, still means the device."""
    from unic.models.published import open_checkpoint

    if adaptor is not None and device == "cpu" and _is_device(adaptor):
        adaptor, device = None, adaptor
    ckpt = open_checkpoint(path)
    if adaptor is None:
        return backbone_from_checkpoint(ckpt, path).to(device)
    from unic.models.adaptor import adaptor_from_checkpoint

    return adaptor_from_checkpoint(ckpt, adaptor, path).to(device).eval()
