"""Checkpoint format converters: official release key layouts -> timm VisionTransformer state dicts.

Each format says where the backbone sits in the file and which prefixes/keys belong to something else
(projection heads, mask tokens); timm's own ``checkpoint_filter_fn`` then handles what it knows (OpenAI
and open_clip CLIP layouts, DINOv2 SwiGLU/mask token, DeiT-III ``gamma_*`` LayerScale, position-embedding
resampling to the model's grid with timm's rule). A teacher whose family resamples differently (DINOv2) has
its position embedding resampled with its own rule first (``teachers.pos_embed``), so timm has nothing to do.
"""

from __future__ import annotations


import torch
from torch import nn

from teachers.pos_embed import resample_pos_embed
from unic.io import CheckpointFormatError, load_weights_file  # noqa: F401 - re-exported by teachers

# where the backbone state dict sits, prefixes to strip, key prefixes to drop
FORMATS: dict[str, dict] = {
    "timm": {"keys": ("state_dict", "model"), "strip": ("module.",), "drop": ("head.",)},
    "dino": {"keys": ("teacher",), "strip": ("module.", "backbone."), "drop": ("head.",)},
    "ibot": {"keys": ("state_dict", "teacher"), "strip": ("module.", "backbone."), "drop": ("head.", "masked_embed")},
    "deit3": {"keys": ("model",), "strip": ("module.",), "drop": ("head.",)},
    "dbot": {"keys": ("model",), "strip": ("module.",), "drop": ("head.",)},
    "dinov2": {"keys": ("teacher", "model"), "strip": ("module.", "backbone."), "drop": ("head.", "dino_head.", "ibot_head.")},
    "clip": {"keys": ("state_dict",), "strip": ("module.",), "drop": ()},
}


def _unwrap(state: dict, keys: tuple[str, ...]) -> dict:
    for key in keys:
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def convert_state_dict(state: dict, ckpt_format: str, model: nn.Module, pos_embed_rule: str = "timm") -> dict:
    """Map an official-layout state dict onto ``model`` (a timm VisionTransformer).

    A position embedding on another grid than the model's is resampled with ``pos_embed_rule``
    (``teachers.pos_embed.POS_EMBED_RULES``); "timm" leaves it to timm's ``checkpoint_filter_fn``.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if ckpt_format not in FORMATS:
        raise ValueError(f"unknown checkpoint format '{ckpt_format}'; known: {', '.join(FORMATS)}")
    fmt = FORMATS[ckpt_format]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"expected a state dict, got {type(state).__name__}")
    state = _unwrap(state, fmt["keys"])
    out = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        for prefix in fmt["strip"]:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if any(key.startswith(p) for p in fmt["drop"]):
            continue
        out[key] = value
    if pos_embed_rule != "timm" and "pos_embed" in out and getattr(model, "pos_embed", None) is not None:
        # the file keeps its cls slot (DINOv2 layout) or not (timm layout of register models): cls stays as is
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], model.patch_embed.grid_size, pos_embed_rule)
    out = checkpoint_filter_fn(out, model, adapt_layer_scale=True)
    if getattr(model, "num_classes", 0) == 0:
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    return out


def load_into(model: nn.Module, state: dict, ckpt_format: str, source: str, pos_embed_rule: str = "timm") -> None:
    """Convert and strictly load ``state`` into ``model``; a mismatch names the offending keys."""
    converted = convert_state_dict(state, ckpt_format, model, pos_embed_rule)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(converted) if tuple(expected[k].shape) != tuple(converted[k].shape)
    )
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            k = mismatched[0]
            details.append(f"shape mismatch for {k}: file {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointFormatError(
            f"{source} does not match the architecture (format '{ckpt_format}'): {'; '.join(details)}"
        )
    model.load_state_dict(converted, strict=True)
