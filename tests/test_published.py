"""Published checkpoints (unic.models.published): files written in the official layouts with random weights,
converted, and compared with the official models' forward passes.

The references are the official code where it is installed (DINOv2's ViT, which UNIC's student is) and, where
it is not on PyPI (UNIC's ladder, mmseg's BNHead, Unicom's ViT), re-implementations written here from the
structure of the official code (naver/unic modeling/unic.py, DINOv2's BNHead, deepglint/unicom
vision_transformer.py).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unic.io import CheckpointFormatError, load_checkpoint
from unic.models.export import STUDENT_FORMAT, backbone_from_checkpoint, load_student
from unic.models.ladder import Ladder
from unic.models.published import (
    UNIC_STD_EPS,
    UNICOM_MODELS,
    convert_mmseg_head,
    convert_published,
    export_published,
    is_mmseg_bn_head,
    is_official_unic,
    load_unicom,
    open_checkpoint,
    read_published_file,
)
from unic.models.student import student_taps

dinov2_vit = pytest.importorskip("dinov2.models.vision_transformer")
from dinov2.layers import MemEffAttention, NestedTensorBlock  # noqa: E402

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 128, 3, 2  # head width 64, as every DINOv2 size
TEACHERS = {"dino_vitbase_16": 48, "metaclip_vithuge_14": 40}  # official names (sorted), tiny widths


def _jitter(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (LayerNorm affines and biases included), so no key can be silently ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return module.eval()


def official_encoder(seed: int = 0) -> nn.Module:
    """UNIC's student: DINOv2's DinoVisionTransformer as its get_model builds it (MemEffAttention blocks, one
    block chunk), tiny."""
    torch.manual_seed(seed)
    model = dinov2_vit.DinoVisionTransformer(
        img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), block_chunks=1,
    )
    return _jitter(model, seed)


# ---------------------------------------------------------------------- UNIC's ladder, after modeling/unic.py
class OfficialAdaptMLP(nn.Module):
    """AdaptMLP: [LayerNorm] -> Linear -> [LayerNorm] -> GELU -> Linear, times scale (a parameter if 0.0)."""

    def __init__(self, dim: int, hidden: int, out: int, prenorm: bool = False, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1)) if scale == 0.0 else scale
        layers = ([nn.LayerNorm(dim)] if prenorm else []) + [nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.scale * self.layers(x)


class OfficialLP(nn.Module):
    """LP: per teacher (sorted) and token type, a ModuleList over all blocks with None where unused."""

    def __init__(self, dim: int, head_dims: dict, depth: int, which_blocks=None, hidden=96, last_hidden=160,
                 **mlp_kwargs):
        super().__init__()
        self.which_blocks = list(range(depth)) if which_blocks is None else which_blocks

        def make(out_dim):
            return nn.ModuleList([
                OfficialAdaptMLP(dim, last_hidden if b == depth - 1 else hidden, out_dim, **mlp_kwargs)
                if b in self.which_blocks else None for b in range(depth)
            ])

        self.heads = nn.ModuleDict({name: nn.ModuleDict({"cls": make(head_dims[name]), "patch": make(head_dims[name])})
                                    for name in sorted(head_dims)})

    def forward(self, x_cls, x_patch):
        out = {}
        for name, heads in self.heads.items():
            xc = sum(heads["cls"][b](x_cls[b + 1]) for b in self.which_blocks)
            xp = sum(heads["patch"][b](x_patch[b + 1]) for b in self.which_blocks)
            out[name] = {"cls": xc, "patch": xp}
        return out


def official_unic_forward(encoder: nn.Module, lp: OfficialLP, images):
    """UNIC.forward: tokens before and after every block of the (single) chunk, fed to the LP."""
    x = encoder.prepare_tokens_with_masks(images)
    x = x[0] if isinstance(x, tuple) else x  # UNIC's copy also returns the register count
    cls, patch = [x[:, 0]], [x[:, 1:]]
    for block in encoder.blocks[0]:
        x = block(x)
        cls.append(x[:, 0])
        patch.append(x[:, 1:])
    return lp(cls, patch)


def teacher_stats(seed: int = 1) -> OrderedDict:
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((name, {
        "cls": {"mean": torch.randn(1, dim, generator=gen), "std": torch.rand(1, dim, generator=gen) + 0.5},
        "patch": {"mean": torch.randn(1, 1, dim, generator=gen), "std": torch.rand(1, 1, dim, generator=gen) + 0.5},
    }) for name, dim in TEACHERS.items())


def write_official_unic(path, encoder, lp=None, with_args=True, stats=True) -> None:
    """main_unic.py's save_dict: the DDP state dict, teacher_ft_stats, epoch and the argparse args (with the
    numpy schedules it adds), pickled by torch.save as UNIC does."""
    model = {f"module.encoder.{k}": v for k, v in encoder.state_dict().items()}
    if lp is not None:
        model.update({f"module.lp.{k}": v for k, v in lp.state_dict().items()})
    ckpt = {"model": model, "epoch": 400}
    if stats:
        ckpt["teacher_ft_stats"] = teacher_stats()
    if with_args:
        ckpt["args"] = argparse.Namespace(
            arch="vit_base", patch_size=PATCH, drop_path_rate=0.1, lp_args="{'std': 0.02}", image_size=IMG,
            teachers=sorted(TEACHERS), lr_schedule=np.linspace(0.0, 1e-3, 50), tnorm_ema_schedule=np.ones(50),
            seed=np.int64(22), use_fp16=True,
        )
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


# ------------------------------------------------------------------------------------------------ UNIC student
def test_unic_encoder_matches_dinov2(tmp_path, images):
    encoder = official_encoder()
    path = tmp_path / "unic.pth"
    write_official_unic(path, encoder)
    with pytest.raises(CheckpointFormatError):  # the official file pickles an argparse.Namespace and numpy
        load_checkpoint(str(path))
    ckpt = read_published_file(str(path))
    assert is_official_unic(ckpt) and not is_official_unic({"format": STUDENT_FORMAT, "state_dict": {}})

    converted = open_checkpoint(str(path))
    assert converted["format"] == STUDENT_FORMAT and converted["img_size"] == IMG
    assert converted["arch"] == "vit_base_patch16_224"
    assert converted["model_kwargs"] == {"patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}
    assert converted["origin"]["epoch"] == 400 and converted["origin"]["args"]["seed"] == 22
    assert "lr_schedule" not in converted["origin"]["args"]  # arrays are not plain settings
    assert "adaptors" not in converted and "no ladder" in converted["origin"]["adaptors"]

    model = backbone_from_checkpoint(converted)
    with torch.no_grad():
        ref = encoder.forward_features(images)
        tokens = model.forward_features(images)
    torch.testing.assert_close(tokens[:, 0], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], ref["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)
    # at other sizes (ADE20K's 512 px windows) the position embedding is resampled with UNIC's DINOv2 rule
    # (0.1 offset, no antialiasing): timm's own rule would differ by about 5 % of the tokens' scale
    assert converted["pos_embed_rule"] == "dinov2"
    for hw in ((2 * IMG, 2 * IMG), (IMG + 3 * PATCH, 2 * IMG)):
        x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            ref_hw, ours_hw = encoder.forward_features(x), model.forward_features(x)
        torch.testing.assert_close(ours_hw[:, 0], ref_hw["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_hw[:, 1:], ref_hw["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)

    # student.pretrained=unic.pth initialises a training run's student from the released file itself
    from unic.config import load_config
    from unic.train.build import build_backbone

    cfg = load_config(None, ["student.arch=vit_base_patch16_224", f"student.img_size={IMG}", "student.drop_path=0",
                             f"student.kwargs={{patch_size: {PATCH}, embed_dim: {DIM}, depth: {DEPTH}, num_heads: {HEADS}}}",
                             f"student.pretrained={path}", "data.root=/nonexistent"])
    with torch.no_grad():
        torch.testing.assert_close(build_backbone(cfg).eval().forward_features(images), tokens)

    # written as a unic-student file, the package's existing readers take it as any export
    export_published(str(path), str(tmp_path / "student.pth"))
    again = load_student(str(tmp_path / "student.pth"))
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(images), tokens)


def test_unic_args_json_and_bare_state_dict(tmp_path, images):
    """A file without args (a bare model state dict) takes the arch from the published <name>_args.json."""
    encoder = official_encoder(seed=3)
    path = tmp_path / "unic_l.pth"
    torch.save({f"encoder.{k}": v for k, v in encoder.state_dict().items()}, path)
    (tmp_path / "unic_l_args.json").write_text(json.dumps({"arch": "vit_base", "patch_size": PATCH}))
    ckpt = read_published_file(str(path))
    converted = convert_published(ckpt, str(path))
    assert converted["origin"]["args"]["arch"] == "vit_base"
    assert convert_published({"format": STUDENT_FORMAT}, "x.pth") is None
    with torch.no_grad():
        tokens = backbone_from_checkpoint(converted).forward_features(images)
        torch.testing.assert_close(tokens[:, 0], encoder.forward_features(images)["x_norm_clstoken"], atol=1e-5,
                                   rtol=1e-5)


def test_published_loader_refuses_code(tmp_path):
    """Only plain data beyond tensors: a pickled callable is still refused."""
    torch.save({"model": {}, "hook": print}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointFormatError):
        read_published_file(str(tmp_path / "evil.pth"))


# ------------------------------------------------------------------------------------------------ UNIC ladder
@pytest.mark.parametrize("which_blocks, scale", [(None, 1.0), ([0, DEPTH - 1], 0.0)])
def test_unic_ladder_matches_official(tmp_path, images, which_blocks, scale):
    encoder = official_encoder()
    torch.manual_seed(7)
    lp = _jitter(OfficialLP(DIM, TEACHERS, DEPTH, which_blocks, scale=scale), 7)
    if scale == 0.0:  # a learned scale, folded into the second Linear by the converter
        for heads in lp.heads.values():
            for mlp in [*heads["cls"], *heads["patch"]]:
                if mlp is not None:
                    mlp.scale.data.fill_(1.7)
    path = tmp_path / "unic.pth"
    write_official_unic(path, encoder, lp)
    converted = open_checkpoint(str(path))
    adaptors = converted["adaptors"]
    names = {"dino_vitbase_16": "dino_vitb16", "metaclip_vithuge_14": "metaclip_vith14"}
    assert adaptors["teachers"] == {names[n]: {"dim": d} for n, d in TEACHERS.items()}
    assert adaptors["blocks"] == (which_blocks or list(range(DEPTH))) and adaptors["num_blocks"] == DEPTH
    assert adaptors["last_tap"] == "raw" and adaptors["eps"] == UNIC_STD_EPS
    assert (adaptors["hidden_dim"], adaptors["last_hidden_dim"]) == (96, 160)
    stats = teacher_stats()
    for official, ours in names.items():
        torch.testing.assert_close(adaptors["stats"][ours]["patch_std"], stats[official]["patch"]["std"].reshape(-1))
        torch.testing.assert_close(adaptors["stats"][ours]["cls_mean"], stats[official]["cls"]["mean"].reshape(-1))

    ladder = Ladder(DIM, adaptors["num_blocks"], {n: t["dim"] for n, t in adaptors["teachers"].items()},
                    adaptors["blocks"], adaptors["hidden_dim"], adaptors["last_hidden_dim"])
    ladder.load_state_dict(adaptors["ladder"], strict=True)
    backbone = backbone_from_checkpoint(converted)
    with torch.no_grad():
        ref = official_unic_forward(encoder, lp, images)
        taps, _ = student_taps(backbone, images, adaptors["last_tap"])
        preds = ladder(taps)
    for official, ours in names.items():
        for ttype in ("cls", "patch"):
            torch.testing.assert_close(preds[ours][ttype], ref[official][ttype], atol=2e-5, rtol=1e-5)


def test_unic_adaptor_gives_teacher_space_tokens(tmp_path, images):
    """Exported, the official file's adaptor to a teacher is the official ladder output de-standardised with the
    file's statistics as UNIC standardises: x = (t - mean) / (std + eps)."""
    import unic.models.adaptor as adaptor_module
    encoder = official_encoder()
    lp = _jitter(OfficialLP(DIM, TEACHERS, DEPTH), 7)
    write_official_unic(tmp_path / "unic.pth", encoder, lp)
    export_published(str(tmp_path / "unic.pth"), str(tmp_path / "student.pth"))
    adaptor = adaptor_module.load_adaptor(str(tmp_path / "student.pth"), "metaclip_vith14")
    stats = teacher_stats()["metaclip_vithuge_14"]
    with torch.no_grad():
        out = adaptor(images)
        ref = official_unic_forward(encoder, lp, images)["metaclip_vithuge_14"]
    for ttype in ("cls", "patch"):
        expected = ref[ttype] * (stats[ttype]["std"] + UNIC_STD_EPS) + stats[ttype]["mean"]
        torch.testing.assert_close(out[ttype], expected.reshape(out[ttype].shape), atol=5e-5, rtol=1e-5)
    # the released file itself, unconverted, is read by every loader of the package
    import unic
    from unic.eval.encoders import load_encoder

    raw = str(tmp_path / "unic.pth")
    with torch.no_grad():
        torch.testing.assert_close(unic.load_student(raw, adaptor="metaclip_vith14")(images)["cls"], out["cls"])
        torch.testing.assert_close(load_encoder(raw, "adaptor:metaclip_vith14")(images), out["cls"])
        cls = load_encoder(raw, "auto")(images)
    torch.testing.assert_close(cls, encoder.forward_features(images)["x_norm_clstoken"], atol=1e-5, rtol=1e-5)


def test_unic_ladder_with_layernorm_is_not_converted(tmp_path):
    """prenorm puts a LayerNorm in each projector: the backbone converts, the adaptors are left out (said why)."""
    encoder = official_encoder()
    lp = OfficialLP(DIM, TEACHERS, DEPTH, prenorm=True)
    write_official_unic(tmp_path / "unic.pth", encoder, lp)
    converted = open_checkpoint(str(tmp_path / "unic.pth"))
    assert "adaptors" not in converted and "LayerNorm" in converted["origin"]["adaptors"]
    write_official_unic(tmp_path / "nostats.pth", encoder, OfficialLP(DIM, TEACHERS, DEPTH), stats=False)
    converted = open_checkpoint(str(tmp_path / "nostats.pth"))
    assert "adaptors" not in converted and "statistics" in converted["origin"]["adaptors"]


# ------------------------------------------------------------------------------------------------ ADE20K head
def test_unic_semseg_head(tmp_path, images):
    """UNIC's released head (an mmcv checkpoint of DINOv2's BNHead) re-scores through our head, on the converted
    student, as DINOv2's mmseg pipeline computes it (last block's final-normed patch map -> BN -> 1x1 conv ->
    bilinear upsampling)."""
    from unic.eval.encoders import load_encoder
    from unic.eval.semseg import FrozenPatchBackbone, LinearSegHead, segment
    from unic.eval.semseg_run import load_head

    num_classes = 7
    gen = torch.Generator().manual_seed(11)
    official = OrderedDict([
        ("decode_head.conv_seg.weight", 0.1 * torch.randn(num_classes, DIM, 1, 1, generator=gen)),
        ("decode_head.conv_seg.bias", torch.randn(num_classes, generator=gen)),
        ("decode_head.bn.weight", 1 + 0.1 * torch.randn(DIM, generator=gen)),
        ("decode_head.bn.bias", 0.1 * torch.randn(DIM, generator=gen)),
        ("decode_head.bn.running_mean", torch.randn(DIM, generator=gen)),
        ("decode_head.bn.running_var", torch.rand(DIM, generator=gen) + 0.5),
        ("decode_head.bn.num_batches_tracked", torch.tensor(80000)),
    ])
    head_path = tmp_path / "unic_head_ade20k.pth"
    torch.save({"meta": {"iter": 80000, "mmcv_version": "1.7.2", "CLASSES": tuple(f"c{i}" for i in range(num_classes)),
                         "PALETTE": [[i, i, i] for i in range(num_classes)], "config": "model = dict(...)"},
                "state_dict": official, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}},
               head_path)
    assert is_mmseg_bn_head(torch.load(head_path, weights_only=True))
    assert convert_mmseg_head(torch.load(head_path, weights_only=True))["num_last_blocks"] == 1

    encoder_official = official_encoder()
    write_official_unic(tmp_path / "unic.pth", encoder_official)
    export_published(str(tmp_path / "unic.pth"), str(tmp_path / "student.pth"))
    backbone = FrozenPatchBackbone(load_encoder(str(tmp_path / "student.pth"), "backbone"), 1)
    head = LinearSegHead(backbone.out_dim, num_classes)
    iteration, record = load_head(str(head_path), head, backbone)
    assert iteration == 80000 and record is None
    head.eval()
    with torch.no_grad():
        ours = segment(backbone, head, images)
        (feats,) = encoder_official.get_intermediate_layers(images, n=[DEPTH - 1], reshape=True, norm=True)
        bn = F.batch_norm(feats, official["decode_head.bn.running_mean"], official["decode_head.bn.running_var"],
                          official["decode_head.bn.weight"], official["decode_head.bn.bias"], False, 0.0, 1e-5)
        logits = F.conv2d(bn, official["decode_head.conv_seg.weight"], official["decode_head.conv_seg.bias"])
        ref = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ Unicom
class OfficialUnicom(nn.Module):
    """deepglint/unicom's VisionTransformer: conv patches + position embedding (no class token), pre-norm blocks
    (bias-free qkv, ReLU6 MLP), final LayerNorm, all tokens flattened into Linear/BN/Linear/BN."""

    def __init__(self, input_size, patch_size, dim, embedding_size, depth, num_heads):
        super().__init__()
        num_patches = (input_size // patch_size) ** 2
        self.num_heads, self.num_patches, self.dim = num_heads, num_patches, dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(dim * num_patches, dim, False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, embedding_size, False), nn.BatchNorm1d(embedding_size, eps=2e-5))

    def attention(self, attn, x):
        B, L, D = x.shape
        q, k, v = attn.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(D // self.num_heads)).softmax(-1)
        return attn.proj((weights @ v).permute(0, 2, 1, 3).reshape(B, L, D))

    def forward(self, images):
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = x + self.attention(block.attn, block.norm1(x))
            x = x + block.mlp.fc2(F.relu6(block.mlp.fc1(block.norm2(x))))
        x = self.norm(x).reshape(images.shape[0], self.num_patches * self.dim)
        return self.feature(x)


def test_unicom_matches_official(tmp_path, monkeypatch):
    from unic.eval.encoders import Encoder

    spec = dict(img_size=32, patch_size=8, embed_dim=64, embedding_dim=24, depth=2, num_heads=2, url="", sha256="")
    monkeypatch.setitem(UNICOM_MODELS, "ViT-T/8", spec)
    torch.manual_seed(0)
    official = _jitter(OfficialUnicom(32, 8, 64, 24, 2, 2), 2)
    gen = torch.Generator().manual_seed(3)
    for bn in (official.feature[1], official.feature[3]):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    # the released files are FP16 state dicts; unicom.load copies them into its fp32 model
    torch.save({k: v.half() for k, v in official.state_dict().items()}, tmp_path / "FP16-ViT-T-8.pt")
    official.load_state_dict({k: v.half().float() for k, v in official.state_dict().items()})

    model, size, mean, std = load_unicom("ViT-T/8", str(tmp_path / "FP16-ViT-T-8.pt"))
    assert size == 32 and mean == (0.48145466, 0.4578275, 0.40821073)
    encoder = Encoder(model, "backbone", size, mean, std, name="unicom:ViT-T/8")
    images = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = official(images)
        torch.testing.assert_close(encoder(images), ref, atol=1e-4, rtol=1e-4)
        _, patches = encoder.descriptor_and_patches(images)
    assert patches.shape == (3, 16, 64)

    # as every evaluation reads it: model.source=unicom:<name> model.weights=<file>
    from unic.config import ConfigError
    from unic.eval.encoders import load_encoder

    with torch.no_grad():
        torch.testing.assert_close(load_encoder("unicom:ViT-T/8", weights=str(tmp_path / "FP16-ViT-T-8.pt"))(images),
                                   ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="cannot load unicom:ViT-X/1"):
        load_encoder("unicom:ViT-X/1", weights=str(tmp_path / "FP16-ViT-T-8.pt"))

    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointFormatError, match="does not match Unicom"):
        load_unicom("ViT-T/8", str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="available"):
        load_unicom("ViT-X/1", str(tmp_path / "other.pt"))
