"""Build a frozen teacher backbone from a registry spec and a weights source (file, hub or random)."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from teachers.convert import CheckpointFormatError, load_into, load_weights_file
from teachers.pos_embed import resample_pos_embed
from teachers.registry import TeacherSpec

logger = logging.getLogger(__name__)


class TeacherWeightsError(FileNotFoundError):
    """The weights a teacher needs are not available; the message says what to download and where."""


class TimmTokens(nn.Module):
    """A timm ViT returning its final-normed pooled token and patch tokens (register tokens skipped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim = model.embed_dim
        self.patch_size = model.patch_embed.patch_size[0]

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_BLD = self.model.forward_features(x_BCHW)
        # token pooling gives the normed cls token; avg pooling (dBOT-ft) gives fc_norm(mean of patches)
        cls_BD = self.model.forward_head(tokens_BLD, pre_logits=True)
        return cls_BD, tokens_BLD[:, self.model.num_prefix_tokens:]


class OpenClipTokens(nn.Module):
    """An open_clip ViT visual tower returning ``ln_post`` of the cls and patch tokens (before ``proj``)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"open_clip teachers must have a ViT visual tower, got {type(visual).__name__}")
        self.visual = visual
        self.embed_dim = visual.conv1.out_channels
        self.patch_size = visual.conv1.kernel_size[0]

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.conv1(x_BCHW).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = v.ln_post(x)
        return x[:, 0], x[:, 1:]


def resolve_weights(spec: TeacherSpec, weights: str | None, weights_dir: str) -> tuple[str, str | None]:
    """Decide where a teacher's weights come from: ("file", path), ("hub", name) or ("random", None)."""
    weights = weights or spec.default_weights
    if weights == "random":
        return "random", None
    if weights == "hub":
        if not spec.hub:
            raise TeacherWeightsError(
                f"teacher '{spec.name}' has no hub weights; download {spec.url or 'its checkpoint'} and set "
                f"teachers.weights.{spec.name}=/path/to/file"
            )
        return "hub", spec.hub
    if weights:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise TeacherWeightsError(f"teacher '{spec.name}': weights file not found: {path}")
        return "file", path
    if spec.filename:
        path = os.path.join(os.path.expanduser(weights_dir), spec.filename)
        if os.path.isfile(path):
            return "file", path
        source = f" from {spec.url}" if spec.url else ""
        online = f", or teachers.weights.{spec.name}=hub when online" if spec.hub else ""
        raise TeacherWeightsError(
            f"teacher '{spec.name}' needs weights: download {spec.filename}{source} to {path} "
            f"(or set teachers.weights.{spec.name}=/path/to/file{online})"
        )
    raise TeacherWeightsError(
        f"teacher '{spec.name}' needs weights: set teachers.weights.{spec.name}=/path/to/file"
        + (" or =hub when online" if spec.hub else "")
    )


def check_weights(names: list[str], weights: dict[str, str | None], weights_dir: str) -> None:
    """Find every teacher's weight source before any model is built; one TeacherWeightsError listing all
    that are missing (a run that lacks three files says so once, not in three retries)."""
    from teachers.registry import get_spec

    problems = []
    for name in names:
        try:
            resolve_weights(get_spec(name), weights.get(name), weights_dir)
        except TeacherWeightsError as err:
            problems.append(str(err))
    if len(problems) == 1:
        raise TeacherWeightsError(problems[0])
    if problems:
        raise TeacherWeightsError(f"{len(problems)} teachers lack weights:\n  " + "\n  ".join(problems)
                                  + "\n(smoke test without them: teachers.weights.<name>=random)")


def _default_device() -> torch.device:
    """The device new tensors go to (``meta`` inside ``with torch.device("meta")``); torch>=2.1 has no getter."""
    return torch.empty(0).device


def _set_timm_resolution(model: nn.Module, resolution: int, rule: str) -> None:
    """Move a loaded timm ViT to ``resolution``, resampling its trained position embedding with ``rule``."""
    grid = tuple(s // model.patch_embed.patch_size[0] for s in (resolution, resolution))
    if tuple(model.patch_embed.grid_size) == grid:
        return
    trained = model.pos_embed.detach().clone()
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    if hasattr(model, "set_input_size"):  # recent timm: updates the patch embed and the pretrained cfg
        model.set_input_size(img_size=(resolution, resolution))
    else:
        pe = model.patch_embed
        pe.img_size, pe.grid_size, pe.num_patches = (resolution, resolution), grid, grid[0] * grid[1]
    # whatever timm's rule made of it, the family's rule from the trained embedding replaces it
    model.pos_embed = nn.Parameter(resample_pos_embed(trained, grid, rule, num_prefix), requires_grad=False)


def _build_timm(spec: TeacherSpec, kind: str, where: str | None) -> nn.Module:
    import timm

    kwargs = {"num_classes": 0, **spec.model_kwargs, "img_size": spec.resolution}
    if kind == "hub":
        if spec.pos_embed_rule != "timm":
            # built at the weights' own resolution, then resampled with the family's rule (not timm's)
            kwargs.pop("img_size")
        try:
            model = timm.create_model(where, pretrained=True, **kwargs)
        except Exception as err:
            raise TeacherWeightsError(
                f"teacher '{spec.name}': could not fetch hub weights '{where}' ({type(err).__name__}); "
                f"offline, download them and set teachers.weights.{spec.name}=/path/to/file"
            ) from None
        if spec.pos_embed_rule != "timm":
            _set_timm_resolution(model, spec.resolution, spec.pos_embed_rule)
        return model
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if kind == "file":
        load_into(model, load_weights_file(where), spec.ckpt_format, where, spec.pos_embed_rule)
    return model


def load_open_clip_visual(model: nn.Module, path: str, arch: str) -> None:
    """Load the image tower of an open_clip ``model`` from a weights file: an open_clip/OpenAI state dict
    (``visual.*`` beside the text tower's keys, which are ignored) or the visual tower's own; a position
    embedding of another grid is resampled with open_clip's own rule."""
    state = load_weights_file(path)
    state = state.get("state_dict", state)
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if torch.is_tensor(state.get("positional_embedding")):  # another grid: open_clip's own resampling
        from open_clip.model import resize_pos_embed

        resized = {"visual.positional_embedding": state["positional_embedding"]}
        resize_pos_embed(resized, model)
        state["positional_embedding"] = resized["visual.positional_embedding"]
    missing, unexpected = model.visual.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{path} does not match open_clip '{arch}': missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _build_open_clip(spec: TeacherSpec, kind: str, where: str | None) -> tuple[nn.Module, dict]:
    import open_clip

    pretrained = where if kind == "hub" else None
    try:
        # the default device, so that ``with torch.device("meta")`` builds it without allocating memory
        model = open_clip.create_model(spec.arch, pretrained=pretrained, device=_default_device())
    except RuntimeError as err:
        raise TeacherWeightsError(f"teacher '{spec.name}': {str(err).splitlines()[0]}") from None
    visual = model.visual
    if kind == "file":
        load_open_clip_visual(model, where, spec.arch)
    size = visual.image_size
    meta = {
        "resolution": int(size[0] if isinstance(size, (tuple, list)) else size),
        "mean": tuple(getattr(visual, "image_mean", None) or spec.mean),
        "std": tuple(getattr(visual, "image_std", None) or spec.std),
    }
    return visual, meta


def build_teacher_model(spec: TeacherSpec, weights: str | None, weights_dir: str) -> tuple[nn.Module, TeacherSpec]:
    """Return (token model, spec with the resolution/mean/std actually used), frozen and in eval mode."""
    from dataclasses import replace

    kind, where = resolve_weights(spec, weights, weights_dir)
    if kind == "random":
        logger.warning("teacher '%s' is randomly initialised (teachers.weights=random): debug/demo only", spec.name)
    if spec.source == "timm":
        tokens = TimmTokens(_build_timm(spec, kind, where))
    elif spec.source == "open_clip":
        visual, meta = _build_open_clip(spec, kind, where)
        tokens = OpenClipTokens(visual)
        spec = replace(spec, **meta)
    else:
        raise ValueError(f"teacher '{spec.name}': unknown source '{spec.source}'")
    tokens.eval()
    for p in tokens.parameters():
        p.requires_grad_(False)
    logger.info("teacher %s: %s (%s), dim %d, patch %d, resolution %d", spec.name, spec.arch, kind,
                tokens.embed_dim, tokens.patch_size, spec.resolution)
    return tokens, spec
