"""UniFEx (Florek et al., GCPR 2024): a frozen pretrained backbone, a small neck and one margin head.

The model: a timm (``timm:<model>[.<tag>]``) or open_clip (``open_clip:<arch>[:<tag>]``) image model, frozen
(optionally its last N blocks trained, with layer-wise lr decay), whose pooled feature (B, F) goes through a
neck to the descriptor (B, 64): ``proj`` (Dropout + Linear, UniFEx's ``proj_layer``) or ``pool`` (adaptive
average pooling of the feature vector, UniFEx's ``pooling``). During training one margin head over the merged
label space of every domain (:class:`MergedLabels`) turns the descriptor into logits for cross-entropy.

The export (``unifex.pth``, format ``unic-unifex``) holds what an evaluation needs to rebuild the descriptor:
the backbone's name, constructor arguments and weights, the neck, ``img_size``, ``mean`` and ``std``.
:func:`load_unifex` reads it (or a training checkpoint of a UniFEx run) back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


logger = logging.getLogger(__name__)

UNIFEX_FORMAT = "unic-unifex"
UNIFEX_VERSION = 1
SOURCES = ("timm", "open_clip")
NECKS = ("proj", "pool")
# open_clip VisionTransformer parameters, grouped as timm's group_matcher groups a timm ViT
_OPEN_CLIP_VIT_MATCHER = {"stem": r"^class_embedding|^positional_embedding|^conv1|^ln_pre",
                          "blocks": r"^transformer\.resblocks\.(\d+)"}


# ------------------------------------------------------------------------------------------------ names
def parse_backbone_name(name: str) -> tuple[str, str, str | None]:
    """``timm:<model>[.<tag>]`` -> ("timm", "<model>[.<tag>]", None); ``open_clip:<arch>[:<tag>]`` ->
    ("open_clip", arch, tag or None). A ValueError for anything else."""
    source, sep, rest = name.partition(":")
    if not sep or source not in SOURCES or not rest:
        raise ValueError(f"a backbone is timm:<model>[.<tag>] or open_clip:<arch>[:<tag>], got {name!r}")
    if source == "timm":
        return source, rest, None
    arch, _, tag = rest.partition(":")
    return source, arch, tag or None


def check_backbone_name(name: str) -> None:
    """A ValueError naming the closest known model when timm / open_clip has no such model or tag."""
    import difflib

    source, model, tag = parse_backbone_name(name)
    if source == "timm":
        import timm

        if not timm.is_model(model):
            close = difflib.get_close_matches(model.split(".")[0], timm.list_models(), n=1)
            raise ValueError(f"timm has no model {model!r}" + (f"; did you mean '{close[0]}'?" if close else ""))
        return
    import open_clip

    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=1)
        raise ValueError(f"open_clip has no model {model!r}" + (f"; did you mean '{close[0]}'?" if close else ""))
    if tag is not None and tag not in open_clip.list_pretrained_tags_by_model(model):
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model} "
                         f"(known: {', '.join(open_clip.list_pretrained_tags_by_model(model))})")


def backbone_input(name: str, kwargs: dict | None = None) -> tuple[int, tuple, tuple]:
    """(native resolution, mean, std) of a named backbone, read from its pretrained config (nothing built)."""
    from unic.config import IMAGENET_MEAN, IMAGENET_STD

    source, model, tag = parse_backbone_name(name)
    if source == "timm":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
        size = (kwargs or {}).get("img_size") or (cfg.input_size[-1] if cfg is not None else 224)
        size = size[-1] if isinstance(size, (tuple, list)) else size
        mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
        std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
        return int(size), mean, std
    import open_clip

    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    size = size[-1] if isinstance(size, (tuple, list)) else size
    pretrained = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    mean = tuple(pretrained.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pretrained.get("std") or open_clip.OPENAI_DATASET_STD)
    return int(size), mean, std


# ------------------------------------------------------------------------------------------------ backbone
def _default_device() -> torch.device:
    """The device new tensors go to (``meta`` inside ``with torch.device("meta")``)."""
    return torch.empty(0).device


def _prefixed(matcher: dict, prefix: str) -> dict:
    """A timm group matcher whose regexes match under ``prefix`` (e.g. open_clip's ``trunk.``)."""
    def wrap(pattern: str) -> str:
        alternatives = [p.lstrip("^") for p in pattern.split("|")]
        return "^" + re.escape(prefix) + "(?:" + "|".join(alternatives) + ")"

    out = {}
    for group, spec in matcher.items():
        if isinstance(spec, (list, tuple)):
            out[group] = [(wrap(p), suffix) for p, suffix in spec]
        else:
            out[group] = wrap(spec) if spec is not None else None
    return out


class PretrainedBackbone(nn.Module):
    """A pretrained image model as a feature extractor: images (B, 3, H, W) -> pooled feature (B, F).

    timm models give ``forward_head(forward_features(x), pre_logits=True)`` (the cls token or attention /
    average pooling of a ViT, global pooling of a CNN); open_clip visual towers give their pooled ``ln_post``
    output (``proj_layer=False``, UniFEx's default: the projection is dropped) or the projected image
    embedding (``proj_layer=True``). ``weights``: a local file (timm state dict or open_clip checkpoint), None
    for the hub (timm's pretrained weights, open_clip's ``<tag>``) or ``"random"`` (tests, plans).

    Everything starts frozen; :meth:`freeze` trains the last N blocks (timm's ``group_matcher`` layers;
    what follows the blocks, final norm and pooling head, trains with them). Frozen sub-modules stay in eval
    mode whatever ``train()`` says, so their buffers (BatchNorm statistics) never change.
    """

    def __init__(self, name: str, weights: str | None = None, kwargs: dict | None = None,
                 proj_layer: bool = False, img_size: int | None = None):
        super().__init__()
        self.name, self.kwargs, self.proj_layer = name, dict(kwargs or {}), proj_layer
        self.source, model_name, tag = parse_backbone_name(name)
        if weights not in (None, "random"):
            import os

            weights = os.path.expanduser(weights)
        if self.source == "timm":
            self.model = _build_timm(model_name, weights, self.kwargs)
            if img_size is not None and hasattr(self.model, "set_input_size") \
                    and getattr(self.model, "patch_embed", None) is not None:
                # a ViT at another resolution: timm resamples the trained position embedding
                self.model.set_input_size(img_size=(img_size, img_size))
        else:
            if self.kwargs:
                raise ValueError("backbone kwargs apply to timm models only")
            self.model = _build_open_clip(model_name, tag, weights, img_size, proj_layer)
        native, mean, std = backbone_input(name, self.kwargs)
        self.img_size = int(img_size or native)
        self.mean, self.std = mean, std  # the backbone's own input normalisation
        self.feature_dim = self._infer_dim()
        self.unfrozen_blocks = 0
        self.freeze(0)

    def _infer_dim(self) -> int:
        """The width of the pooled feature, from the model's attributes (no forward pass)."""
        m = self.model
        if self.source == "timm":
            return int(getattr(m, "head_hidden_size", None) or m.num_features)
        if getattr(m, "proj", None) is not None and self.proj_layer:
            return int(m.output_dim)
        if hasattr(m, "transformer"):
            return int(m.transformer.width)
        return int(getattr(m, "num_features", None) or m.output_dim)

    # ---------------------------------------------------------------- forward
    def _features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.source == "timm" and hasattr(self.model, "forward_head"):
            feat = self.model.forward_head(self.model.forward_features(images_BCHW), pre_logits=True)
        else:
            feat = self.model(images_BCHW)
        if feat.dim() == 4:  # a CNN trunk without pooling (open_clip's timm trunks): global average
            feat = feat.mean(dim=(2, 3))
        return feat

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.unfrozen_blocks > 0):
            return self._features(images_BCHW)

    # ---------------------------------------------------------------- layers and freezing
    def group_matcher(self) -> dict | None:
        """timm's group matcher of the model (stem, blocks; the rest is the head), or our open_clip one."""
        m = self.model
        if self.source == "timm":
            return m.group_matcher(coarse=False) if hasattr(m, "group_matcher") else None
        if hasattr(m, "transformer"):
            return _OPEN_CLIP_VIT_MATCHER
        if hasattr(m, "trunk") and hasattr(m.trunk, "group_matcher"):
            matcher = m.group_matcher() if hasattr(m, "group_matcher") else None
            return matcher or _prefixed(m.trunk.group_matcher(coarse=False), "trunk.")
        return None

    def layer_ids(self) -> tuple[dict[str, int], list[int]]:
        """(parameter name -> layer id as timm's layer-wise lr decay numbers them, the ids of the blocks)."""
        from timm.models import group_parameters

        matcher = self.group_matcher()
        names = [n for n, _ in self.model.named_parameters()]
        if matcher is None:  # no grouping known: one block of everything
            return {n: 0 for n in names}, [0]
        layer = group_parameters(self.model, matcher, reverse=True)
        blocks_spec = matcher.get("blocks") if isinstance(matcher, dict) else None
        if blocks_spec is None:
            block_ids = sorted(set(layer.values()) - {0})
        else:
            specs = blocks_spec if isinstance(blocks_spec, (list, tuple)) else [(blocks_spec, None)]
            patterns = [re.compile(p) for p, suffix in specs if suffix is None]  # (99999,): joins a block
            block_ids = sorted({layer[n] for n in names if any(p.match(n) for p in patterns)})
        return layer, block_ids or [max(layer.values())]

    @property
    def num_blocks(self) -> int:
        return len(self.layer_ids()[1])

    def freeze(self, unfreeze_last_blocks: int = 0) -> None:
        """Freeze everything but the last ``unfreeze_last_blocks`` blocks and what follows them."""
        layer, block_ids = self.layer_ids()
        if not 0 <= unfreeze_last_blocks <= len(block_ids):
            raise ValueError(f"unifex.unfreeze_last_blocks={unfreeze_last_blocks}: {self.name} has "
                             f"{len(block_ids)} blocks")
        first = block_ids[-unfreeze_last_blocks] if unfreeze_last_blocks else None
        for name, param in self.model.named_parameters():
            param.requires_grad_(first is not None and layer[name] >= first)
        self.unfrozen_blocks = unfreeze_last_blocks
        # a module trains iff a parameter below it does; parameterless ones (dropout, drop path) follow the
        # nearest ancestor that has parameters
        trains: dict[str, bool] = {}
        self._frozen_modules: list[nn.Module] = []
        for name, module in self.model.named_modules():
            params = list(module.parameters())
            flag = any(p.requires_grad for p in params) if params else trains.get(name.rpartition(".")[0], False)
            trains[name] = flag
            if not flag:
                self._frozen_modules.append(module)
        self.train(self.training)

    def train(self, mode: bool = True) -> PretrainedBackbone:
        super().train(mode)
        for module in getattr(self, "_frozen_modules", []):
            module.train(False)
        return self

    def lr_scales(self, layer_decay: float) -> dict[str, float]:
        """Per trainable parameter, ``layer_decay ** (last layer - its layer)`` (timm's
        ``param_groups_layer_decay``: the last layer trains at the full backbone lr)."""
        layer, _ = self.layer_ids()
        top = max(layer.values())
        return {n: layer_decay ** (top - layer[n]) for n, p in self.model.named_parameters() if p.requires_grad}


def _build_timm(model_name: str, weights: str | None, kwargs: dict) -> nn.Module:
    import timm

    base = {"num_classes": 0, **kwargs}
    if weights == "random":
        return timm.create_model(model_name, pretrained=False, **base)
    if weights:  # a local file: timm's loader (weights-only) with the model's own checkpoint filter
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **base)
    try:
        return timm.create_model(model_name, pretrained=True, **base)
    except Exception as err:  # noqa: BLE001 - hub errors come in every type (offline, missing weights)
        from unic.config import ConfigError

        raise ConfigError(f"cannot fetch timm weights for {model_name} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}); offline, give a local file with unifex.weights=<file>"
                          ) from None


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _build_open_clip(arch: str, tag: str | None, weights: str | None, img_size: int | None,
                     proj_layer: bool) -> nn.Module:
    import open_clip

    if weights is None and tag is None:
        from unic.config import ConfigError

        raise ConfigError(f"open_clip:{arch} names no pretrained tag: use open_clip:{arch}:<tag> or unifex.weights=<file>")
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
    hub = weights is None
    quiet = _DropMessage("No pretrained weights loaded")  # open_clip's warning; a file is loaded below
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(arch, pretrained=tag if hub else None, device=_default_device(),
                                       force_quick_gelu=quick_gelu, force_image_size=img_size)
    except RuntimeError as err:
        from unic.config import ConfigError

        raise ConfigError(f"cannot build open_clip {arch}:{tag}: {str(err).splitlines()[0][:200]}; offline, give "
                          "a local file with unifex.weights=<file>") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    visual = model.visual
    if weights and weights != "random":
        from teachers.build import load_open_clip_visual

        load_open_clip_visual(model, weights, arch)
    if not proj_layer:
        if hasattr(visual, "transformer"):
            visual.proj = None  # the pooled ln_post output (UniFEx's with_proj_layer=False)
        elif hasattr(visual, "trunk"):
            visual = visual.trunk  # a timm trunk (ConvNeXt CLIP): its pooled features
    return visual


# ------------------------------------------------------------------------------------------------ neck, model
class PoolNeck(nn.Module):
    """UniFEx's ``pooling`` neck: adaptive average pooling of the feature vector (B, F) to (B, out_dim)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(x_BF[:, None], self.out_dim)[:, 0]

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}"


def build_neck(kind: str, in_dim: int, out_dim: int, dropout: float = 0.0) -> nn.Module:
    """``proj``: Dropout + Linear(F, out_dim) (UniFEx's ``proj_layer``, torch's default init); ``pool``."""
    if kind == "proj":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    if kind == "pool":
        return PoolNeck(out_dim)
    raise ValueError(f"unknown neck {kind!r}; choose one of {', '.join(NECKS)}")


class UnifexModel(nn.Module):
    """Backbone + neck: the part of a UniFEx run DDP wraps (the margin head stays outside).

    ``forward(images)`` gives ``feature`` (the backbone's pooled feature) and ``embedding`` (the neck's
    descriptor). ``forward_features`` / ``forward_head(pre_logits=True)`` split the same computation as a
    timm model does, so :class:`unic.eval.encoders.Encoder` evaluates it like any timm backbone; with
    ``descriptor = "backbone"`` the head step returns the raw feature (the frozen backbone alone).
    """

    def __init__(self, backbone: PretrainedBackbone, neck: nn.Module, neck_kind: str, dropout: float = 0.0,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.neck_kind, self.dropout = neck_kind, dropout
        # the input normalisation the model is trained and evaluated with (default: the backbone's own)
        self.mean = tuple(mean) if mean is not None else tuple(backbone.mean)
        self.std = tuple(std) if std is not None else tuple(backbone.std)
        self.embed_dim_out = neck.out_dim if isinstance(neck, PoolNeck) else neck[1].out_features
        self.descriptor = "universal"

    def forward(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_BF = self.backbone(images_BCHW)
        return {"feature": feature_BF, "embedding": self.neck(feature_BF)}

    def forward_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.backbone(images_BCHW)

    def forward_head(self, feature_BF: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:  # noqa: ARG002
        return feature_BF if self.descriptor == "backbone" else self.neck(feature_BF)

    @property
    def embed_dim(self) -> int:
        """The descriptor's width."""
        return self.backbone.feature_dim if self.descriptor == "backbone" else self.embed_dim_out


def build_unifex_model(name: str, weights: str | None = None, kwargs: dict | None = None, proj_layer: bool = False,
                       img_size: int | None = None, neck: str = "proj", embed_dim: int = 64, dropout: float = 0.0,
                       unfreeze_last_blocks: int = 0, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None) -> UnifexModel:
    """The backbone (weights loaded, frozen but for its last ``unfreeze_last_blocks`` blocks) and the neck."""
    backbone = PretrainedBackbone(name, weights, kwargs, proj_layer, img_size)
    backbone.freeze(unfreeze_last_blocks)
    return UnifexModel(backbone, build_neck(neck, backbone.feature_dim, embed_dim, dropout), neck, dropout, mean, std)


# ------------------------------------------------------------------------------------------------ labels, head
class MergedLabels:
    """One label space over several domains: (domain d, raw class id c) -> classifier row.

    Domain d's train classes (sorted raw ids) are rows ``offset_d .. offset_d + C_d - 1``, the domains in
    their dataset order, as UniFEx concatenates its data sets with a class offset each. One domain (a CSV
    without a ``domain`` column) keeps the CSV's labels, made contiguous (identity for labels 0..C-1).
    """

    def __init__(self, classes: Sequence[Sequence[int]], device: torch.device | str = "cpu"):
        self.classes = [sorted(int(c) for c in cls) for cls in classes]
        self.sizes = [len(c) for c in self.classes]
        self.offsets = [sum(self.sizes[:d]) for d in range(len(self.sizes))]
        self.num_classes = sum(self.sizes)
        self.stride = max((max(c) for c in self.classes if c), default=0) + 1
        keys = [d * self.stride + c for d, cls in enumerate(self.classes) for c in cls]
        self.keys = torch.tensor(keys, dtype=torch.long, device=device)  # sorted: (domain, class) order

    def to(self, device: torch.device | str) -> MergedLabels:
        self.keys = self.keys.to(device)
        return self

    def __call__(self, domain_B: torch.Tensor, label_B: torch.Tensor) -> torch.Tensor:
        """Classifier rows (B,) of a batch's (domain, raw label) pairs (train classes only)."""
        keys_B = domain_B.long() * self.stride + label_B.long()
        return torch.searchsorted(self.keys, keys_B).clamp_(max=len(self.keys) - 1)

    def class_counts(self, samples: Sequence[tuple]) -> list[int]:
        """Images per row of ``(path, labels, domain)`` samples (DynM-ArcFace margins)."""
        counts = [0] * self.num_classes
        position = [{c: self.offsets[d] + j for j, c in enumerate(cls)} for d, cls in enumerate(self.classes)]
        for _, labels, domain in samples:
            counts[position[domain][int(labels[0])]] += 1
        return counts


HEAD_INITS = ("xavier_uniform",)  # class-weight inits of UniFEx's heads on top of unic.models.heads' own


def build_unifex_head(name: str, embed_dim: int, num_classes: int, options: dict,
                      class_counts: Sequence[int] | None = None, partial_fc: float | None = None,
                      seed: int = 0) -> nn.Module:
    """One margin head (SPEC 5) over the merged label space: replicated (:func:`build_margin_head`, its
    gradients averaged over ranks by the trainer) or, with ``partial_fc`` (a sample rate in (0, 1]), a
    :class:`unic.models.partial_fc.PartialFC` whose centres are sharded over ranks. ``options`` are the
    ``heads.*`` settings; ``init: xavier_uniform`` is UniFEx's ``nn.init.xavier_uniform_``.

    Both start from the same centres: Partial FC's chunked draw seeded by ``seed`` (independent of the number
    of ranks), so that a replicated run and a Partial FC run at rate 1 train the same model. Xavier's uniform
    bound sqrt(6 / (C*k + D)) is lecun_uniform's sqrt(3 / D) draw rescaled (the same distribution).
    """
    import math

    from unic.models.heads import build_margin_head
    from unic.models.partial_fc import PartialFC

    kw = dict(options)
    init = kw.pop("init", None)
    if init is not None and init not in HEAD_INITS:
        kw["init"] = init
    if name == "dynm_arcface":
        kw["class_counts"] = list(class_counts)
    if partial_fc is not None:
        head = PartialFC(name, embed_dim, num_classes, partial_fc, seed, **kw)
        centres = head.weight
    else:
        head = build_margin_head(name, embed_dim, num_classes, **kw)
        centres = head.weight
        if not centres.is_meta:  # the plan's meta build has no values to draw
            with torch.no_grad():
                centres.copy_(PartialFC(name, embed_dim, num_classes, 1.0, seed, shard=(0, 1), **kw).weight)
    if init in HEAD_INITS and not centres.is_meta:
        rows = num_classes * head.k
        with torch.no_grad():
            centres.mul_(math.sqrt(6.0 / (rows + embed_dim)) / math.sqrt(3.0 / embed_dim))
    return head


def is_sharded(head: nn.Module) -> bool:
    """A Partial FC head (its centres are per-rank shards: no gradient all-reduce)."""
    from unic.models.partial_fc import PartialFC

    return isinstance(head, PartialFC)


# ------------------------------------------------------------------------------------------------ file format
def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def unifex_export(model: UnifexModel, domains: Sequence[str], num_classes: int) -> dict:
    """``unifex.pth``: the backbone (name, constructor arguments, weights), the neck, ``img_size``, ``mean``,
    ``std`` and the merged label space's size; weights-only loadable (plain data and tensors)."""
    backbone = model.backbone
    return {
        "format": UNIFEX_FORMAT,
        "version": UNIFEX_VERSION,
        "backbone": {"name": backbone.name, "kwargs": dict(backbone.kwargs), "proj_layer": backbone.proj_layer,
                     "feature_dim": backbone.feature_dim, "state_dict": _cpu_state(backbone.model)},
        "neck": {"kind": model.neck_kind, "embed_dim": model.embed_dim_out, "dropout": model.dropout,
                 "state_dict": _cpu_state(model.neck)},
        "img_size": backbone.img_size,
        "mean": list(model.mean),
        "std": list(model.std),
        "domains": list(domains),
        "num_classes": int(num_classes),
    }


def is_unifex(ckpt: dict) -> bool:
    """A ``unifex.pth`` export, or the training checkpoint of a UniFEx run."""
    if ckpt.get("format") == UNIFEX_FORMAT:
        return True
    from unic.train.provenance import latest_config

    config = latest_config(ckpt) if ckpt.get("format") == "unic-train" else None
    return bool(config and (config.get("unifex") or {}).get("enabled"))


def load_unifex(source: str | dict, embedding: str = "auto", device: str | torch.device = "cpu"
                ) -> tuple[UnifexModel, int, tuple, tuple]:
    """(eval-mode model images -> descriptor, img_size, mean, std) of a ``unifex.pth`` or a UniFEx training
    checkpoint. ``embedding``: ``auto`` / ``universal`` (the neck's 64-d descriptor) or ``backbone`` (the
    frozen backbone's pooled feature)."""
    from unic.io import load_checkpoint

    ckpt = load_checkpoint(source) if isinstance(source, str) else source
    where = source if isinstance(source, str) else "checkpoint"
    if not is_unifex(ckpt):
        raise ValueError(f"{where} is not a UniFEx file (format {ckpt.get('format')!r})")
    if embedding not in ("auto", "universal", "backbone"):
        raise ValueError(f"unknown embedding '{embedding}' for a UniFEx model: auto, universal or backbone")
    if ckpt["format"] == UNIFEX_FORMAT:
        b, n = ckpt["backbone"], ckpt["neck"]
        spec = dict(name=b["name"], kwargs=b["kwargs"], proj_layer=b["proj_layer"], img_size=ckpt["img_size"],
                    neck=n["kind"], embed_dim=n["embed_dim"], dropout=n["dropout"], mean=ckpt["mean"], std=ckpt["std"])
        backbone_state, neck_state = b["state_dict"], n["state_dict"]
    else:
        from unic.train.provenance import latest_config

        u = latest_config(ckpt)["unifex"]
        spec = dict(name=u["backbone"], kwargs=u["kwargs"], proj_layer=u["proj_layer"], img_size=u["img_size"],
                    neck=u["neck"], embed_dim=u["embed_dim"], dropout=u["dropout"], mean=u["mean"], std=u["std"])
        model_state = ckpt["model"]
        backbone_state = {k[len("backbone.model."):]: v for k, v in model_state.items() if k.startswith("backbone.model.")}
        neck_state = {k[len("neck."):]: v for k, v in model_state.items() if k.startswith("neck.")}
    model = build_unifex_model(spec["name"], "random", spec["kwargs"], spec["proj_layer"], spec["img_size"],
                               spec["neck"], spec["embed_dim"], spec["dropout"], mean=spec["mean"], std=spec["std"])
    model.backbone.model.load_state_dict(backbone_state, strict=True)
    model.neck.load_state_dict(neck_state, strict=True)
    model.descriptor = "backbone" if embedding == "backbone" else "universal"
    model = model.to(device).eval().requires_grad_(False)
    return model, model.backbone.img_size, model.mean, model.std
