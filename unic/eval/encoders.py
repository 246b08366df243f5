"""Image encoders for every evaluation: UNIC checkpoints and timm / open_clip baselines behind one interface.

``load_encoder(source, embedding)`` accepts
- a UNIC training checkpoint (``checkpoint.pth``), an exported student (``student.pth``) or an exported
  universal model (``universal.pth``); ``embedding`` picks the descriptor: ``backbone`` (final-normed cls),
  ``universal`` (UDON universal projection), ``domain:<name>`` (that domain's teacher head, the oracle row
  UDON reports), ``adaptor:<teacher>`` (the student's adaptor to that teacher, :mod:`unic.models.adaptor`: its
  teacher-space cls is the descriptor and its patch tokens the dense features) or ``auto`` (universal when the
  file has one, else backbone);
- ``timm:<model>[.<tag>]`` (hub weights, or ``weights=<file>``), ``open_clip:<model>:<tag>`` (image
  embedding of the CLIP model) and ``unicom:<name>`` (Unicom's released ViTs), so baselines run through the
  same code.

Published UNIC checkpoints (``unic.pth``, ``unic_l.pth``) are read like our own files
(:func:`unic.models.published.open_checkpoint` converts them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unic.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class Encoder(nn.Module):
    """images (B, 3, H, W), normalised with ``mean``/``std`` -> descriptors (B, D) (not L2-normalised)."""

    def __init__(self, backbone: nn.Module, kind: str, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 head: nn.Module | None = None, name: str = "", adaptor: nn.Module | None = None):
        super().__init__()
        # adaptor (an unic.models.adaptor.Adaptor on ``backbone``): descriptor and patch tokens in its teacher's space
        self.backbone, self.head, self.kind, self.adaptor = backbone, head, kind, adaptor
        self.img_size, self.mean, self.std, self.name = img_size, tuple(mean), tuple(std), name
        self.eval().requires_grad_(False)

    @property
    def is_vit(self) -> bool:
        return hasattr(self.backbone, "forward_intermediates")

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            return self.backbone(images_BCHW)
        if self.adaptor is not None:
            return self.adaptor(images_BCHW)["cls"]
        return self._descriptor(self.backbone.forward_features(images_BCHW))

    def _descriptor(self, tokens_BLD: torch.Tensor) -> torch.Tensor:
        cls_BD = self.backbone.forward_head(tokens_BLD, pre_logits=True)
        if self.head is None:
            return cls_BD
        # UDON: heads act on the L2-normalised backbone feature and their outputs are L2-normalised
        return F.normalize(self.head(F.normalize(cls_BD.float(), dim=-1)), dim=-1)

    def descriptor_and_patches(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what ``forward`` returns (B, D'), final-normed patch tokens of the last block (B, N, D)) from one
        pass through the backbone."""
        if not self.is_vit:
            raise ValueError(f"{self.name} has no timm patch tokens")
        if self.adaptor is not None:
            out = self.adaptor(images_BCHW)
            return out["cls"], out["patch"]
        if not hasattr(self.backbone, "num_prefix_tokens"):  # timm CNNs: a feature map, two passes
            patches_BDhw = self.patch_features(images_BCHW, 1)
            return self(images_BCHW), patches_BDhw.flatten(2).transpose(1, 2)
        tokens_BLD = self.backbone.forward_features(images_BCHW)
        return self._descriptor(tokens_BLD), tokens_BLD[:, self.backbone.num_prefix_tokens:]

    def patch_features(self, images_BCHW: torch.Tensor, num_last_blocks: int = 1) -> torch.Tensor:
        """Final-normed patch tokens of the last ``num_last_blocks`` blocks as one (B, n*D, h, w) map (an
        adaptor's: its teacher-space patch tokens, one block)."""
        if not self.is_vit:
            raise ValueError(f"{self.name} has no patch tokens (dense evaluation needs a ViT backbone)")
        if self.adaptor is not None:
            if num_last_blocks != 1:
                raise ValueError(f"{self.name}: an adaptor predicts one set of teacher patch tokens, "
                                 f"num_last_blocks must be 1 (got {num_last_blocks})")
            patch_BND = self.adaptor(images_BCHW)["patch"]
            h, w = (size // self.patch_size for size in images_BCHW.shape[-2:])
            return patch_BND.transpose(1, 2).reshape(patch_BND.shape[0], patch_BND.shape[2], h, w)
        maps = self.backbone.forward_intermediates(
            images_BCHW, indices=num_last_blocks, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return torch.cat(maps, dim=1)

    def allow_any_input_size(self) -> None:
        """Let a timm ViT built for one resolution accept any input size (positional embeddings resampled on
        the fly, as ``dynamic_img_size=True`` does): timm baselines are usually built for 224 px."""
        backbone = self.backbone
        if not hasattr(backbone, "dynamic_img_size") or backbone.dynamic_img_size:
            return
        from timm.layers import Format

        backbone.dynamic_img_size = True
        patch_embed = backbone.patch_embed
        patch_embed.strict_img_size = False
        patch_embed.flatten = False
        patch_embed.output_fmt = Format.NHWC

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_embed.patch_size[0]

    @property
    def embed_dim(self) -> int:
        return self.adaptor.embed_dim if self.adaptor is not None else self.backbone.embed_dim


def load_domain_encoders(path: str, domains: Sequence[str], device: str | torch.device = "cpu") -> dict[str, Encoder]:
    """Each domain's own teacher head on one shared backbone (the specialist "oracle" row UDON reports)."""
    from unic.models.export import load_unic_file

    backbone, _, heads = load_unic_file(path)
    missing = [domain for domain in domains if domain not in heads]
    if missing:
        raise ValueError(f"{path} has no teacher head for {missing} (has: {sorted(heads)})")
    backbone = backbone.to(device)
    return {
        domain: Encoder(backbone, f"domain:{domain}", backbone.unic_img_size, backbone.pretrained_cfg["mean"],
                        backbone.pretrained_cfg["std"], head=heads[domain].to(device), name=f"{path}:domain:{domain}")
        for domain in domains
    }


def _from_unic_file(path: str, embedding: str) -> Encoder:
    """The descriptor ``embedding`` of a UNIC file (the file formats: :mod:`unic.models.export`; UniFEx's:
    :mod:`unic.models.unifex`), read once."""
    from unic.models.export import backbone_from_checkpoint, udon_heads
    from unic.models.published import open_checkpoint
    from unic.models.unifex import is_unifex, load_unifex

    ckpt = open_checkpoint(path)
    if is_unifex(ckpt):  # UniFEx: the descriptor is the neck's output (or the frozen backbone's feature)
        model, img_size, mean, std = load_unifex(ckpt, embedding)
        return Encoder(model, model.descriptor, img_size, mean, std, name=f"{path}:{model.descriptor}")
    if embedding.startswith("adaptor:"):
        return _from_adaptor(ckpt, path, embedding)
    backbone, (universal, heads) = backbone_from_checkpoint(ckpt, path), udon_heads(ckpt)
    if embedding == "auto":
        embedding = "universal" if universal is not None else "backbone"
    head = None
    if embedding == "universal":
        if universal is None:
            raise ValueError(f"{path} has no universal embedding (train with UDON heads, or use embedding=backbone)")
        head = universal
    elif embedding.startswith("domain:"):
        domain = embedding[len("domain:"):]
        if domain not in heads:
            raise ValueError(f"{path} has no teacher head for domain '{domain}' (has: {sorted(heads)})")
        head = heads[domain]
    elif embedding != "backbone":
        raise ValueError(f"unknown embedding '{embedding}': auto, backbone, universal, domain:<name> or "
                         "adaptor:<teacher>")
    return Encoder(backbone, embedding, backbone.unic_img_size, backbone.pretrained_cfg["mean"],
                   backbone.pretrained_cfg["std"], head=head, name=f"{path}:{embedding}")


def _from_adaptor(ckpt: dict, path: str, embedding: str) -> Encoder:
    """The student's adaptor to one teacher (``adaptor:<teacher>``) of a loaded UNIC file."""
    from unic.models.adaptor import adaptor_from_checkpoint

    adaptor = adaptor_from_checkpoint(ckpt, embedding[len("adaptor:"):], path)
    return Encoder(adaptor.backbone, embedding, adaptor.img_size, adaptor.mean, adaptor.std, name=f"{path}:{embedding}",
                   adaptor=adaptor)


def _from_timm(name: str, weights: str | None) -> Encoder:
    import timm

    model_name = name[len("timm:"):]
    kwargs = {"num_classes": 0}
    if weights:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)
    else:
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    cfg = model.pretrained_cfg
    return Encoder(model, "backbone", int(cfg["input_size"][-1]), cfg.get("mean", IMAGENET_MEAN),
                   cfg.get("std", IMAGENET_STD), name=name)


class OpenClipImage(nn.Module):
    """images -> a CLIP model's own image embedding (``encode_image``, not normalised)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


def _from_open_clip(name: str, weights: str | None) -> Encoder:
    import open_clip

    parts = name.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"expected open_clip:<model>[:<tag>], got {name}")
    pretrained = weights or (parts[2] if len(parts) == 3 else None)
    model = open_clip.create_model(parts[1], pretrained=pretrained)
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    from teachers.registry import CLIP_MEAN, CLIP_STD

    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    return Encoder(OpenClipImage(model), "open_clip", size, mean, std, name=name)


def _from_unicom(name: str, weights: str | None) -> Encoder:
    """Unicom's released ViTs (``unicom:ViT-B/16``; :func:`unic.models.published.load_unicom`)."""
    from unic.models.published import load_unicom

    model, size, mean, std = load_unicom(name[len("unicom:"):], weights)
    return Encoder(model, "backbone", size, mean, std, name=name)


NAMED_SOURCES = {"timm:": _from_timm, "open_clip:": _from_open_clip, "unicom:": _from_unicom}


def is_named_model(source: str) -> bool:
    """A ``timm:`` / ``open_clip:`` / ``unicom:`` model name, not a file."""
    return source.startswith(tuple(NAMED_SOURCES))


def load_encoder(source: str, embedding: str = "auto", weights: str | None = None, device="cpu") -> Encoder:
    """An eval-mode :class:`Encoder` for a UNIC file (ours, or a published UNIC checkpoint), ``timm:<model>``,
    ``open_clip:<model>:<tag>`` or ``unicom:<name>`` (Unicom's released ViTs).

    A named model that cannot be built or downloaded (unknown name, offline hub) is a
    :class:`unic.config.ConfigError` naming ``model.weights`` for a local file."""
    if is_named_model(source):
        build = next(b for prefix, b in NAMED_SOURCES.items() if source.startswith(prefix))
        try:
            encoder = build(source, weights)
        except (RuntimeError, OSError, ValueError) as err:  # unknown model names, hub downloads when offline
            from unic.config import ConfigError

            hint = " (offline? give a local weights file with model.weights=<file>)" if not weights else ""
            raise ConfigError(f"cannot load {source}: {str(err).splitlines()[0]}{hint}") from None
    else:
        encoder = _from_unic_file(source, embedding)
    return encoder.to(device).eval()
