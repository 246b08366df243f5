"""The seed systems' published checkpoints, read into the package's own formats.

- UNIC (naver/unic: ``unic.pth``, ``unic_l.pth`` and their ``*_args.json``): the file ``main_unic.py`` saves,
  ``{"model": DDP state dict ("module.encoder.*" DINOv2 ViT, "module.lp.*" ladder), "teacher_ft_stats",
  "args" (an argparse.Namespace), "epoch", ...}``. :func:`convert_unic` turns it into a ``unic-student`` export
  (:mod:`unic.models.export`): the encoder as a timm ``VisionTransformer`` state dict, and the ladder with the
  teacher statistics as ``"adaptors"`` where our :class:`unic.models.ladder.Ladder` expresses it exactly.
  :func:`open_checkpoint` is the reader's entry: any UNIC file of ours unchanged, an official one converted.
- UNIC's ADE20K linear heads (``unic_head_ade20k.pth``, ``unic_l_head_ade20k.pth``: mmseg checkpoints of DINOv2's
  ``BNHead``): :func:`convert_mmseg_head` gives our ``unic-semseg-linear-head`` file content.
- Unicom (deepglint/unicom ``unicom.load`` names): :func:`load_unicom` builds :class:`UnicomViT`, a timm ViT with
  Unicom's architecture and its flatten -> Linear/BN -> Linear/BN embedding head, from a local file or the
  official release URL.

UDON (nikosips/UDON) has published no universal model: see :data:`UDON_STATUS`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unic.io import CheckpointFormatError, load_checkpoint, load_weights_file

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ reading files
# What UNIC's training script pickles besides tensors: ``args`` is an argparse.Namespace holding plain values and
# the numpy learning-rate / EMA schedules. These rebuild plain data only, so a weights-only load may allow them.
_NUMPY_GLOBALS = ("_reconstruct", "scalar")


def _plain_globals() -> list:
    import numpy as np

    allowed: list = [argparse.Namespace, np.ndarray, np.dtype]
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for name in _NUMPY_GLOBALS:
        func = getattr(multiarray, name)
        # files written under numpy 1.x name the numpy.core module, numpy 2.x numpy._core
        allowed += [(func, f"numpy.core.multiarray.{name}"), (func, f"numpy._core.multiarray.{name}")]
    for code in "?bBhHiIlLqQefdgFDGUS":
        dtype_cls = type(np.dtype(code))
        allowed.append((dtype_cls, f"numpy.dtypes.{dtype_cls.__name__}"))
    return allowed


def _global_name(entry) -> str:
    return entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"


def read_published_file(path: str) -> Any:
    """A torch file loaded weights-only, also accepting what official releases pickle besides tensors
    (``argparse.Namespace``, numpy arrays and scalars: plain data, no code). Anything else is refused."""
    try:
        return load_weights_file(path)
    except CheckpointFormatError as err:
        refused = err
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip archive: the original error says what is wrong
        raise refused from None
    allowed = _plain_globals()
    extra = names - {_global_name(entry) for entry in allowed}
    if not names or extra:
        raise refused
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def plain_args(args: Any) -> dict:
    """The JSON-able settings of an argparse.Namespace or dict (numpy scalars as numbers, arrays dropped)."""
    import numpy as np

    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    out = {}
    for key, value in items.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (tuple, list)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            value = list(value)
        if value is None or isinstance(value, (str, int, float, bool, list)):
            out[key] = value
    return out


def find_args_json(path: str) -> str | None:
    """The ``<name>_args.json`` UNIC publishes next to ``<name>.pth`` (``unic.pth`` -> ``unic_args.json``)."""
    candidate = f"{os.path.splitext(path)[0]}_args.json"
    return candidate if os.path.isfile(candidate) else None


# ------------------------------------------------------------------------------------------------ UNIC
# UNIC's teacher names (its teachers/config.py) -> this package's registry names (teachers/registry.py)
UNIC_TEACHERS = {
    "dino_vitbase_16": "dino_vitb16",
    "deit3_vitbase_16": "deit3_vitb16",
    "ibot_vitbase_16": "ibot_vitb16",
    "dbotft_vitbase_16": "dbotft_vitb16",
    "metaclip_vithuge_14": "metaclip_vith14",
    "dino2_vitgiant_14": "dinov2_vitg14",
}
# UNIC's utils.standard_normalize: (x - mean_ema) / (std_ema + eps)
UNIC_STD_EPS = 1e-6
# the DINOv2 ViTs UNIC builds (its dinov2/models/vision_transformer.py): width, depth, heads
DINOV2_ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12),
                "vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24)}
# timm architectures by width, with their depth and heads (patch 16; other patch sizes go in model_kwargs)
_TIMM_VITS = {192: ("vit_tiny_patch16_224", 12, 3), 384: ("vit_small_patch16_224", 12, 6),
              768: ("vit_base_patch16_224", 12, 12), 1024: ("vit_large_patch16_224", 24, 16)}
_CHUNKED_BLOCK = re.compile(r"blocks\.\d+\.(\d+)\.(.+)")  # DINOv2 BlockChunk: blocks.<chunk>.<block>.<param>
_LP_KEY = re.compile(r"heads\.([^.]+)\.(cls|patch)\.(\d+)\.(.+)")


def _strip_module(state: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _model_state(ckpt: dict) -> dict:
    return _strip_module(ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt)


def is_official_unic(ckpt: Any) -> bool:
    """Whether ``ckpt`` is a checkpoint of naver/unic's ``main_unic.py`` (or its bare model state dict)."""
    if not isinstance(ckpt, dict) or "format" in ckpt:
        return False
    state = _model_state(ckpt)
    return "encoder.cls_token" in state and "encoder.pos_embed" in state and \
        any(k.startswith("encoder.blocks.") for k in state)


def unic_encoder_to_timm(encoder_state: dict, args: dict | None = None) -> tuple[dict, dict]:
    """(timm VisionTransformer state dict, {arch, model_kwargs, img_size, depth, embed_dim}) of UNIC's DINOv2
    encoder (keys without the ``encoder.`` prefix). The keys are DINOv2's, which timm's ViT shares, less the
    block chunking and the mask token. Width, depth, patch and grid come from the weights; the heads from
    ``args["arch"]`` when it names a DINOv2 size of that width, else width / 64 (every DINOv2 size)."""
    args = args or {}
    unsupported = [k for k in encoder_state if k == "register_tokens" or ".mlp.w12." in k or ".q_norm." in k]
    if unsupported:
        raise CheckpointFormatError(f"UNIC encoder with {unsupported[0]!r} (registers, SwiGLU or qk-norm) has no "
                                    "timm equivalent here; UNIC's released students have none")
    out = {}
    for key, value in encoder_state.items():
        if key == "mask_token":  # masked-image modelling only; unused at inference
            continue
        match = _CHUNKED_BLOCK.fullmatch(key)
        out[f"blocks.{match.group(1)}.{match.group(2)}" if match else key] = value
    embed_dim = out["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    patch = out["patch_embed.proj.weight"].shape[-1]
    num_patches = out["pos_embed"].shape[1] - 1
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"UNIC encoder position embedding of {num_patches} patches is not a square grid")
    mlp_ratio = out["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    named = DINOV2_ARCHS.get(args.get("arch", ""))
    num_heads = named[2] if named and named[0] == embed_dim else embed_dim // 64

    arch, std_depth, std_heads = _TIMM_VITS.get(embed_dim, ("vit_base_patch16_224", 12, 12))
    kwargs: dict = {}
    if patch != 16:
        kwargs["patch_size"] = patch
    if embed_dim not in _TIMM_VITS:
        kwargs["embed_dim"] = embed_dim
    if depth != std_depth:
        kwargs["depth"] = depth
    if num_heads != std_heads:
        kwargs["num_heads"] = num_heads
    if mlp_ratio != 4.0:
        kwargs["mlp_ratio"] = mlp_ratio
    if "blocks.0.ls1.gamma" in out:  # LayerScale (not in UNIC's students): timm creates it when init_values is set
        kwargs["init_values"] = 1.0
    meta = {"arch": arch, "model_kwargs": kwargs, "img_size": grid * patch, "depth": depth, "embed_dim": embed_dim}
    return out, meta


def _lp_kwargs(args: dict) -> dict:
    """UNIC's ``--lp_args`` (a Python dict literal) read without evaluating code."""
    try:
        value = ast.literal_eval(args.get("lp_args") or "{}")
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def unic_ladder(lp_state: dict, num_blocks: int, args: dict | None = None,
                rename: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """Our Ladder's settings and state dict for UNIC's ``lp.*`` (keys without ``lp.``), or (None, why not).

    UNIC's projector for teacher t, token type and block b is ``lp.heads.<t>.<type>.<b>.layers`` =
    Linear -> GELU -> Linear (hidden 768, 3072 for the last block by default), times a constant ``scale`` 1.0
    (a learned ``scale`` parameter, UNIC's ``scale=0.0`` option, is folded into the second Linear). With
    ``prenorm`` / ``midnorm`` a LayerNorm sits inside it, which our Projector has no place for."""
    rename = rename or {}
    layers: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}
    for key, value in lp_state.items():
        match = _LP_KEY.fullmatch(key)
        if match is None:
            return None, f"unexpected ladder key lp.{key}"
        name, ttype, block, param = match.groups()
        layers.setdefault((name, ttype, int(block)), {})[param] = value
    if not layers:
        return None, "the file holds no ladder (lp.*)"
    teachers = sorted({name for name, _, _ in layers})
    blocks = sorted({block for _, _, block in layers})
    for name in teachers:
        for ttype in ("cls", "patch"):
            if sorted(b for n, t, b in layers if (n, t) == (name, ttype)) != blocks:
                return None, f"teacher {name} {ttype}: its projectors sit on other blocks than {blocks}"
    if blocks[-1] != num_blocks - 1:
        return None, f"ladder blocks {blocks} do not include the last block ({num_blocks - 1}), which ours requires"
    expected = {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}
    for (name, ttype, block), params in layers.items():
        if set(params) - {"scale"} != expected or params["layers.0.weight"].ndim != 2:
            return None, ("UNIC ladder with LayerNorms inside its projectors (lp_args prenorm/midnorm) is not "
                          "expressible by unic.models.ladder.Projector (Linear -> GELU -> Linear)")
    hidden = {params["layers.0.weight"].shape[0] for (_, _, b), params in layers.items() if b != num_blocks - 1}
    if len(hidden) > 1:
        return None, f"ladder hidden widths {sorted(hidden)} differ between blocks"
    hidden_dim = hidden.pop() if hidden else int(_lp_kwargs(args or {}).get("hidden_dim", 768))
    last_hidden_dim = layers[(teachers[0], "cls", num_blocks - 1)]["layers.0.weight"].shape[0]

    state, dims = {}, {}
    for (name, ttype, block), params in sorted(layers.items()):
        ours = rename.get(name, name)
        index = blocks.index(block)
        weight2, bias2 = params["layers.2.weight"], params["layers.2.bias"]
        if "scale" in params:
            weight2, bias2 = weight2 * params["scale"], bias2 * params["scale"]
        prefix = f"projectors.{ours}.{ttype}.{index}"
        state.update({f"{prefix}.0.weight": params["layers.0.weight"], f"{prefix}.0.bias": params["layers.0.bias"],
                      f"{prefix}.2.weight": weight2, f"{prefix}.2.bias": bias2})
        dims[ours] = int(weight2.shape[0])
    return {"teachers": dims, "blocks": blocks, "hidden_dim": int(hidden_dim),
            "last_hidden_dim": int(last_hidden_dim), "ladder": state}, ""


def unic_statistics(teacher_ft_stats: dict, rename: dict[str, str] | None = None) -> dict:
    """UNIC's EMA teacher statistics ``{t: {cls|patch: {mean, std}}}`` as the adaptor layout's flat vectors."""
    rename = rename or {}
    out = {}
    for name, per_type in teacher_ft_stats.items():
        out[rename.get(name, name)] = {
            f"{ttype}_{stat}": per_type[ttype][stat].detach().float().cpu().reshape(-1).clone()
            for ttype in ("cls", "patch") for stat in ("mean", "std")
        }
    return out


def convert_unic(ckpt: dict, args: dict | None = None, source: str = "", rename_teachers: bool = True) -> dict:
    """A ``unic-student`` export of an official UNIC checkpoint (with ``"adaptors"`` when the ladder and the
    teacher statistics are there and exact in our layout; otherwise ``origin["adaptors"]`` says why not)."""
    from unic.config import IMAGENET_MEAN, IMAGENET_STD
    from unic.models.export import FORMAT_VERSION, STUDENT_FORMAT, adaptors_layout

    args = {**plain_args(ckpt.get("args") if "model" in ckpt else None), **(args or {})}
    state = _model_state(ckpt)
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    timm_state, meta = unic_encoder_to_timm(encoder, args)
    rename = UNIC_TEACHERS if rename_teachers else {}
    origin = {"source": "naver/unic", "file": os.path.basename(source) if source else None,
              "epoch": ckpt.get("epoch"), "args": args, "teacher_names": {}}
    out = {
        "format": STUDENT_FORMAT, "version": FORMAT_VERSION, "state_dict": timm_state,
        "arch": meta["arch"], "model_kwargs": meta["model_kwargs"], "img_size": meta["img_size"],
        # UNIC's main_unic.py normalises with ImageNet's statistics
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "origin": origin,
        # its DINOv2 code resamples the position embedding with a 0.1 offset and no antialiasing
        "pos_embed_rule": "dinov2",
    }
    ladder, why = unic_ladder({k[len("lp."):]: v for k, v in state.items() if k.startswith("lp.")},
                              meta["depth"], args, rename)
    stats = ckpt.get("teacher_ft_stats") if "model" in ckpt else None
    if ladder is not None and not stats:
        ladder, why = None, "the file holds no teacher statistics (teacher_ft_stats)"
    if ladder is not None:
        stats = unic_statistics(stats, rename)
        missing = [name for name in ladder["teachers"] if name not in stats]
        wrong = [name for name, dim in ladder["teachers"].items()
                 if name in stats and stats[name]["cls_mean"].numel() != dim]
        if missing or wrong:
            ladder, why = None, f"teacher statistics missing for {missing} or of the wrong width for {wrong}"
    if ladder is None:
        logger.warning("%s: student backbone only, no adaptors: %s", source or "UNIC checkpoint", why)
        origin["adaptors"] = f"omitted: {why}"
        return out
    origin["teacher_names"] = {ours: official for official, ours in rename.items() if ours in ladder["teachers"]}
    last = meta["depth"] - 1
    out["adaptors"] = adaptors_layout(
        {name: {"dim": dim} for name, dim in ladder["teachers"].items()},
        {name: stats[name] for name in ladder["teachers"]}, ladder["blocks"], meta["depth"],
        "raw",  # UNIC's projectors read the raw output of every block, the last one too
        [ladder["last_hidden_dim"] if b == last else ladder["hidden_dim"] for b in ladder["blocks"]],
        ladder["hidden_dim"], ladder["ladder"], UNIC_STD_EPS)
    return out


def convert_published(ckpt: dict, path: str = "", args: dict | None = None) -> dict | None:
    """The package-format dict of a published checkpoint, or None when ``ckpt`` is none we know (a UNIC file of
    ours, a plain timm state dict). UNIC: ``args`` (else the file's own ``args``, else ``<name>_args.json``
    next to ``path``) gives the architecture name; the weights give the rest."""
    if not is_official_unic(ckpt):
        return None
    merged: dict = {}
    json_path = find_args_json(path) if path else None
    if json_path:
        with open(json_path) as f:
            merged.update(plain_args(json.load(f)))
    if "model" in ckpt:  # the file's own args come before the published copy
        merged.update(plain_args(ckpt.get("args")))
    merged.update(args or {})
    return convert_unic(ckpt, merged, source=path)


def open_checkpoint(path: str) -> dict:
    """Any checkpoint the package reads: a UNIC file of ours (weights-only, as :func:`unic.io.load_checkpoint`),
    or a published one converted to our format (:func:`convert_published`)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointFormatError:
        ckpt = read_published_file(path)
        if not isinstance(ckpt, dict):
            raise CheckpointFormatError(f"{path} is not a checkpoint (top level is {type(ckpt).__name__})") from None
    converted = convert_published(ckpt, path)
    return ckpt if converted is None else converted


def export_published(path: str, out_path: str) -> dict:
    """Convert a published checkpoint file and write it as a ``unic-student`` file (every reader takes it)."""
    from unic.io import save_checkpoint

    ckpt = read_published_file(path)
    converted = convert_published(ckpt, path) if isinstance(ckpt, dict) else None
    if converted is None:
        raise CheckpointFormatError(f"{path} is no published checkpoint this package converts")
    save_checkpoint(converted, out_path)
    return converted


# ------------------------------------------------------------------------------------------------ UNIC ADE20K heads
_MMSEG_PREFIX = "decode_head."


def _mmseg_state(ckpt: dict) -> dict:
    state = _strip_module(ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt)
    return {k[len(_MMSEG_PREFIX):] if k.startswith(_MMSEG_PREFIX) else k: v for k, v in state.items()}


def is_mmseg_bn_head(ckpt: Any) -> bool:
    """Whether ``ckpt`` is an mmseg checkpoint (or state dict) of DINOv2's ``BNHead``: BN + 1x1 ``conv_seg``."""
    if not isinstance(ckpt, dict) or "format" in ckpt:
        return False
    state = _mmseg_state(ckpt)
    return "conv_seg.weight" in state and "bn.running_mean" in state


def convert_mmseg_head(ckpt: dict, source: str = "") -> dict:
    """Our ``unic-semseg-linear-head`` file content (:func:`unic.eval.semseg_run.load_head`) of UNIC's released
    ADE20K linear head: mmseg ``decode_head.bn.*`` -> ``bn.*``, ``decode_head.conv_seg.*`` -> ``conv.*``.

    DINOv2's linear configs, which UNIC's eval_dense/eval_semseg.py uses, feed the head the final-normed patch
    tokens of the last block only (``in_index=[3]`` of out_indices = last 4, ``in_channels=[D]``)."""
    from unic.eval.semseg_run import HEAD_FORMAT

    state = _mmseg_state(ckpt)
    conv_weight = state["conv_seg.weight"]
    if conv_weight.ndim != 4 or tuple(conv_weight.shape[-2:]) != (1, 1):
        raise CheckpointFormatError(f"{source}: conv_seg is not a 1x1 convolution ({tuple(conv_weight.shape)})")
    num_classes, in_dim = int(conv_weight.shape[0]), int(conv_weight.shape[1])
    if state["bn.running_mean"].numel() != in_dim:
        raise CheckpointFormatError(f"{source}: BN over {state['bn.running_mean'].numel()} channels, conv over {in_dim}")
    head = {f"bn.{p}": state[f"bn.{p}"] for p in ("weight", "bias", "running_mean", "running_var")}
    head["bn.num_batches_tracked"] = state.get("bn.num_batches_tracked", torch.tensor(0))
    head.update({"conv.weight": conv_weight, "conv.bias": state["conv_seg.bias"]})
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    return {
        "format": HEAD_FORMAT,
        "state_dict": {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in head.items()},
        "in_dim": in_dim, "num_classes": num_classes, "num_last_blocks": 1,
        "iteration": int(meta.get("iter", 0) or 0),
        "pretrained": source, "training": None,  # trained by UNIC's mmseg script, settings not in our record
        "origin": {"source": "naver/unic (mmseg BNHead)", "file": os.path.basename(source) if source else None},
    }


# ------------------------------------------------------------------------------------------------ Unicom
UNICOM_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as unicom's transform
UNICOM_STD = (0.26862954, 0.26130258, 0.27577711)
# unicom.load names: input size, patch, width, embedding size, depth, heads, release URL, file SHA-256
UNICOM_MODELS = {
    "ViT-B/32": dict(img_size=224, patch_size=32, embed_dim=768, embedding_dim=512, depth=12, num_heads=12,
                     url="https://github.com/deepglint/unicom/releases/download/b32/FP16-ViT-B-32.pt",
                     sha256="f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a"),
    "ViT-B/16": dict(img_size=224, patch_size=16, embed_dim=768, embedding_dim=768, depth=12, num_heads=12,
                     url="https://github.com/deepglint/unicom/releases/download/b16/FP16-ViT-B-16.pt",
                     sha256="c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef"),
    "ViT-L/14": dict(img_size=224, patch_size=14, embed_dim=1024, embedding_dim=768, depth=24, num_heads=16,
                     url="https://github.com/deepglint/unicom/releases/download/l14/FP16-ViT-L-14.pt",
                     sha256="ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd"),
    "ViT-L/14@336px": dict(img_size=336, patch_size=14, embed_dim=1024, embedding_dim=768, depth=24, num_heads=16,
                           url="https://github.com/deepglint/unicom/releases/download/l14_336px/FP16-ViT-L-14-336px.pt",
                           sha256="3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea"),
}


class UnicomViT(VisionTransformer):
    """Unicom's ViT as a timm VisionTransformer: no class token, position embedding on the patches only,
    bias-free qkv, ReLU6 MLP, LayerNorms with torch's eps 1e-5; its descriptor (``forward_head``) is Unicom's
    ``feature`` head on all final-normed patch tokens flattened: Linear(N*D, D) -> BN -> Linear(D, E) -> BN
    (no biases, BN eps 2e-5). The parameter names are Unicom's, so its files load as they are. The descriptor
    needs the native input size (the flatten fixes N); the patch tokens work at any size."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, embedding_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0):
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, class_token=False,
                         global_pool="", num_classes=0, norm_layer=nn.LayerNorm, act_layer=nn.ReLU6)
        num_patches = self.patch_embed.num_patches
        self.embedding_dim = embedding_dim
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * num_patches, embed_dim, bias=False), nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim, eps=2e-5),
        )

    def forward_head(self, x_BND: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Unicom's embedding (B, E) of the final-normed tokens (B, N, D)."""
        return self.feature(x_BND.flatten(1))


def build_unicom(name: str) -> UnicomViT:
    if name not in UNICOM_MODELS:
        raise ValueError(f"unknown Unicom model {name!r}; available: {', '.join(UNICOM_MODELS)}")
    spec = {k: v for k, v in UNICOM_MODELS[name].items() if k not in ("url", "sha256")}
    return UnicomViT(**spec)


def download_unicom(name: str, root: str | None = None) -> str:
    """The release file of ``name`` in ``root`` (default ``<torch hub dir>/unicom``), downloaded and
    SHA-256-checked when absent."""
    spec = UNICOM_MODELS[name]
    root = root or os.path.join(torch.hub.get_dir(), "unicom")
    target = os.path.join(root, os.path.basename(spec["url"]))
    if not os.path.isfile(target):
        os.makedirs(root, exist_ok=True)
        logger.info("downloading %s to %s", spec["url"], target)
        torch.hub.download_url_to_file(spec["url"], target, hash_prefix=spec["sha256"])
    return target


def load_unicom(name: str, weights_file: str | None = None) -> tuple[UnicomViT, int, tuple, tuple]:
    """(eval-mode :class:`UnicomViT` with the released weights, input size, mean, std) of a ``unicom.load``
    name (``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14``, ``ViT-L/14@336px``); ``weights_file`` is the local release
    file (``FP16-ViT-B-16.pt``, ...), else it is downloaded from the official release."""
    model = build_unicom(name)
    path = weights_file or download_unicom(name)
    state = load_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path} is not a Unicom state dict (top level is {type(state).__name__})")
    state = {k.split("module.")[-1]: v.float() for k, v in state.items() if torch.is_tensor(v)}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointFormatError(f"{path} does not match Unicom {name}: missing {missing[:3]}, unexpected "
                                    f"{unexpected[:3]}, shape mismatch {sorted(mismatched)[:3]}")
    model.load_state_dict(state, strict=True)
    size = UNICOM_MODELS[name]["img_size"]
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": (3, size, size),
                            "mean": UNICOM_MEAN, "std": UNICOM_STD}
    model.default_cfg = model.pretrained_cfg
    return model.eval(), size, UNICOM_MEAN, UNICOM_STD


# ------------------------------------------------------------------------------------------------ UDON
UDON_STATUS = (
    "UDON (nikosips/UDON, NeurIPS 2024) has released no UDON universal model: its README says 'Soon, UDON "
    "checkpoints will be released' (TODO list, last commit 2024-11-18). The one trained checkpoint it links, "
    "'clip_uscrr_iccv_jax_checkpoint' (cmp.felk.cvut.cz/univ_emb/finetuned_checkpoints/), is by its name the "
    "UnED ICCV 2023 CLIP ViT-B/16 USCRR baseline, not a UDON model, stored as a Scenic/Flax training state "
    "(flax.training.checkpoints, legacy msgpack since the code sets flax_use_orbax_checkpointing=False) with "
    "JAX parameter trees (conv1 HWIO kernel, per-head q/k/v DenseGeneral kernels, a 64-d 'projection' Dense). "
    "Its layout cannot be inspected offline, so no converter is provided; UDON is reproduced by training "
    "(main_unic.py with the udon_uned_vitb16 preset)."
)
