"""Teacher registry: names -> architecture, checkpoint format, patch size, resolution, mean/std, weights.

Every registry teacher is built on a timm architecture (CLIP/MetaCLIP included: timm's CLIP ViTs read the
OpenAI/open_clip layouts); generic teachers are named ``timm:<model>`` or ``open_clip:<model>:<tag>``.
Feature dims are read off the built model, so an entry never disagrees with its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from unic.config import IMAGENET_MEAN, IMAGENET_STD  # one definition of ImageNet's statistics

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    source: str  # "timm" or "open_clip"
    arch: str  # timm model name, or open_clip model name
    resolution: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ckpt_format: str = "timm"  # key layout of the official release file, see teachers.convert.FORMATS
    filename: str | None = None  # default file name looked up in teachers.weights_dir
    url: str | None = None  # where the official file comes from (for the missing-file error)
    hub: str | None = None  # timm hub name (model.tag) or open_clip pretrained tag, used with weights=hub
    model_kwargs: dict = field(default_factory=dict)
    default_weights: str | None = None  # used when the config names no source ("random" for the toy teachers)
    # how the position embedding is resampled from the weights' grid to ``resolution``: the family's own rule
    # (teachers.pos_embed.POS_EMBED_RULES: "timm", "dinov2" for DINOv2 without registers, "dinov2_reg")
    pos_embed_rule: str = "timm"
    # CLIP family: the full open_clip model (architecture, pretrained tag) these weights belong to, whose text
    # tower and visual projection zero-shot classification uses (unic.eval.zeroshot); None: not a CLIP model
    open_clip: tuple[str, str | None] | None = None


_DINO = "https://dl.fbaipublicfiles.com/dino"
_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"

TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in [
        # DINO (raw state dict of the backbone)
        TeacherSpec(name="dino_vits16", source="timm", arch="vit_small_patch16_224", resolution=224,
                    ckpt_format="dino", filename="dino_deitsmall16_pretrain.pth",
                    url=f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
                    hub="vit_small_patch16_224.dino"),
        TeacherSpec(name="dino_vitb16", source="timm", arch="vit_base_patch16_224", resolution=224,
                    ckpt_format="dino", filename="dino_vitbase16_pretrain.pth",
                    url=f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                    hub="vit_base_patch16_224.dino"),
        # DeiT-III ("model" key, LayerScale as gamma_1/gamma_2)
        TeacherSpec(name="deit3_vitb16", source="timm", arch="deit3_base_patch16_224", resolution=224,
                    ckpt_format="deit3", filename="deit_3_base_224_1k.pth",
                    url="https://dl.fbaipublicfiles.com/deit/deit_3_base_224_1k.pth",
                    hub="deit3_base_patch16_224.fb_in1k"),
        # iBOT ("state_dict" key, module./backbone. prefixes, projection head dropped); UNIC distils the
        # random-mask ViT-B/16 (vitb_16_rand_mask), not the block-mask one (vitb_16)
        TeacherSpec(name="ibot_vitb16", source="timm", arch="vit_base_patch16_224", resolution=224,
                    ckpt_format="ibot", filename="ibot_vitb16_rand_mask_checkpoint_teacher.pth",
                    url="https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/"
                        "vitb_16_rand_mask/checkpoint_teacher.pth"),
        # dBOT fine-tuned on IN-1k ("model" key; global average pooling + fc_norm, no final norm)
        TeacherSpec(name="dbotft_vitb16", source="timm", arch="vit_base_patch16_224", resolution=224,
                    ckpt_format="dbot", filename="dbot_ft_vitb16_in1k.pth",
                    url="https://github.com/liuxingbin/dbot (ViT-B/16 fine-tuned checkpoint)",
                    model_kwargs={"global_pool": "avg"}),
        # DINOv2 (hub files: raw state dict with mask_token, 37x37 position embedding for 518 px; ViT-g uses
        # SwiGLU), run at 224 with the position embedding resampled by DINOv2's own rule (offset 0.1 and no
        # antialiasing without registers, antialiasing and no offset with registers)
        *[
            TeacherSpec(name=f"dinov2_vit{size}14", source="timm", arch=f"vit_{full}_patch14_dinov2",
                        resolution=224, ckpt_format="dinov2", filename=f"dinov2_vit{size}14_pretrain.pth",
                        url=f"{_DINOV2}/dinov2_vit{size}14/dinov2_vit{size}14_pretrain.pth",
                        hub=f"vit_{full}_patch14_dinov2.lvd142m", pos_embed_rule="dinov2")
            for size, full in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        ],
        *[
            TeacherSpec(name=f"dinov2_vit{size}14_reg", source="timm", arch=f"vit_{full}_patch14_reg4_dinov2",
                        resolution=224, ckpt_format="dinov2", filename=f"dinov2_vit{size}14_reg4_pretrain.pth",
                        url=f"{_DINOV2}/dinov2_vit{size}14/dinov2_vit{size}14_reg4_pretrain.pth",
                        hub=f"vit_{full}_patch14_reg4_dinov2.lvd142m", pos_embed_rule="dinov2_reg")
            for size, full in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        ],
        # CLIP family (OpenAI / open_clip state dicts with visual.* keys, or timm files)
        # OpenAI's CLIPs were trained with QuickGELU: timm's *_clip_quickgelu_* architectures (the plain
        # *_clip_224 ones run GELU, which OpenAI's weights were not trained with)
        TeacherSpec(name="clip_vitb16", source="timm", arch="vit_base_patch16_clip_quickgelu_224", resolution=224,
                    mean=CLIP_MEAN, std=CLIP_STD, ckpt_format="clip", filename="clip_vitb16_openai.bin",
                    url="hf-hub:timm/vit_base_patch16_clip_224.openai (open_clip_pytorch_model.bin)",
                    hub="vit_base_patch16_clip_quickgelu_224.openai", open_clip=("ViT-B-16-quickgelu", "openai")),
        TeacherSpec(name="clip_vitl14", source="timm", arch="vit_large_patch14_clip_quickgelu_224", resolution=224,
                    mean=CLIP_MEAN, std=CLIP_STD, ckpt_format="clip", filename="clip_vitl14_openai.bin",
                    url="hf-hub:timm/vit_large_patch14_clip_224.openai (open_clip_pytorch_model.bin)",
                    hub="vit_large_patch14_clip_quickgelu_224.openai", open_clip=("ViT-L-14-quickgelu", "openai")),
        TeacherSpec(name="metaclip_vith14", source="timm", arch="vit_huge_patch14_clip_quickgelu_224",
                    resolution=224, mean=CLIP_MEAN, std=CLIP_STD, ckpt_format="clip",
                    filename="metaclip_h14_fullcc2.5b.bin",
                    url="https://dl.fbaipublicfiles.com/MMPT/metaclip/h14_fullcc2.5b.pt (open_clip state dict)",
                    hub="vit_huge_patch14_clip_quickgelu_224.metaclip_2pt5b",
                    open_clip=("ViT-H-14-quickgelu", "metaclip_fullcc")),
        # Tiny random teachers for the demo and tests: different widths, patch sizes and resolutions.
        TeacherSpec(name="toy_vit_p16_d96", source="timm", arch="vit_tiny_patch16_224", resolution=96,
                    model_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 3, "img_size": 96},
                    default_weights="random"),
        TeacherSpec(name="toy_vit_p14_d48", source="timm", arch="vit_tiny_patch16_224", resolution=70,
                    model_kwargs={"patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 2, "img_size": 70},
                    default_weights="random"),
    ]
}


def get_spec(name: str, resolution: int | None = None) -> TeacherSpec:
    """Look a teacher up by registry name or generic ``timm:<model>`` / ``open_clip:<model>[:<tag>]``."""
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:"):]
        base = arch.split(".")[0]
        if not timm.is_model(base):
            raise ValueError(f"teacher '{name}': timm has no model '{base}'")
        cfg = timm.models.get_pretrained_cfg(arch) if "." in arch else None
        cfg = cfg.to_dict() if cfg is not None else {}
        spec = TeacherSpec(
            name=name, source="timm", arch=base, resolution=int(cfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
            ckpt_format="timm", hub=arch if "." in arch else None,
        )
    elif name.startswith("open_clip:"):
        parts = name.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"teacher '{name}': expected open_clip:<model>[:<pretrained tag>]")
        spec = TeacherSpec(
            name=name, source="open_clip", arch=parts[1], resolution=224, mean=CLIP_MEAN, std=CLIP_STD,
            ckpt_format="open_clip", hub=parts[2] if len(parts) == 3 else None,
            open_clip=(parts[1], parts[2] if len(parts) == 3 else None),
        )
    elif name in TEACHERS:
        spec = TEACHERS[name]
    else:
        import difflib

        close = difflib.get_close_matches(name, list(TEACHERS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown teacher '{name}'{hint}; registry names: {', '.join(sorted(TEACHERS))}; "
            "or use timm:<model> / open_clip:<model>:<tag>"
        )
    return replace(spec, resolution=resolution) if resolution else spec
