"""Every registry teacher reproduces its own reference forward at the resolution the registry runs it at.

Small random models are saved in each family's official key layout, loaded through the registry's converter
and compared with the reference implementation holding the same weights (SPEC section 3):

- DINOv2: the official ``dinov2`` package from PyPI (its release predates registers, so the register variants
  add them on top of its modules as the upstream code does), models built at the hub's 518 px (37x37
  position embedding) and run at 224, where the position embedding must be resampled with DINOv2's rule;
- CLIP family (timm CLIP ViTs from open_clip state dicts) and generic ``open_clip:`` teachers: open_clip;
- DINO, DeiT-III, iBOT, dBOT-ft (official code not on PyPI): timm, which their official layouts convert to.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from teachers import TEACHERS, build_teacher_model, get_spec

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
X_SEED = 1


def _perturb(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Make every parameter non-trivial (zero biases, unit norms, 1e-5 LayerScale) so a missed key shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _tiny_spec(name: str, **kwargs):
    spec = TEACHERS[name]
    return dataclasses.replace(spec, model_kwargs={**spec.model_kwargs, **TINY, **kwargs})


def _images(resolution: int) -> torch.Tensor:
    return torch.randn(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(X_SEED))


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Equal up to float32 reordering (fused vs. explicit attention): 1e-5 of the reference's scale."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------- DINOv2 --

def _dinov2_official(swiglu: bool, registers: int):
    """A tiny official DINOv2 ViT/14 at the hub's 518 px (hub kwargs: init_values=1.0, block_chunks=0)."""
    vits = pytest.importorskip(
        "dinov2.models.vision_transformer",
        reason="the official DINOv2 code is not installed: pip install --no-deps dinov2==0.0.1.dev2",
    )
    kwargs = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0, **TINY)
    if swiglu:  # dinov2_vitg14: vit_giant2 with ffn_layer="swiglufused"
        kwargs["ffn_layer"] = "swiglufused"

    class UpstreamRegisters(vits.DinoVisionTransformer):
        """The register variant of facebookresearch/dinov2 (hub ``dinov2_vit*14_reg``: num_register_tokens=4,
        interpolate_antialias=True, interpolate_offset=0.0) on the PyPI release's modules: registers go after
        cls, without position embedding; offset 0 resamples bicubic to the new grid *size*, antialiased."""

        def __init__(self, num_register_tokens: int, **kw):
            super().__init__(**kw)
            self.num_register_tokens = num_register_tokens
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, self.embed_dim))

        def interpolate_pos_encoding(self, x, w, h):
            npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
            if npatch == n and w == h:
                return self.pos_embed
            pos, side, dim = self.pos_embed.float(), int(math.sqrt(n)), x.shape[-1]
            grid = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                                 antialias=True, size=(w // self.patch_size, h // self.patch_size))
            grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
            return torch.cat((pos[:, :1], grid), dim=1).to(x.dtype)

        def prepare_tokens_with_masks(self, x, masks=None):
            x = super().prepare_tokens_with_masks(x, masks)
            return torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)

        def forward_features(self, x, masks=None):
            x = self.prepare_tokens_with_masks(x, masks)
            for blk in self.blocks:
                x = blk(x)
            x_norm = self.norm(x)
            return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1 + self.num_register_tokens:]}

    torch.manual_seed(0)
    model = UpstreamRegisters(registers, **kwargs) if registers else vits.DinoVisionTransformer(**kwargs)
    _perturb(model)
    assert model.pos_embed.shape[1] == 1 + 37 * 37
    return model


def _dinov2_case(name: str):
    registers = 4 if name.endswith("_reg") else 0
    swiglu = name.startswith("dinov2_vitg14")
    ref = _dinov2_official(swiglu, registers)
    kwargs = {}
    if swiglu:  # timm's packed SwiGLU: hidden = embed_dim * mlp_ratio = out_features of the official w12
        kwargs["mlp_ratio"] = ref.blocks[0].mlp.w12.out_features / TINY["embed_dim"]
    return ref, _tiny_spec(name, **kwargs)


def _dinov2_reference(ref, x):
    with torch.no_grad():
        out = ref.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


DINOV2 = sorted(n for n in TEACHERS if n.startswith("dinov2_"))


@pytest.mark.parametrize("name", DINOV2)
def test_dinov2_matches_official_forward_at_registry_resolution(tmp_path, name):
    ref, spec = _dinov2_case(name)
    assert spec.resolution == 224
    path = tmp_path / TEACHERS[name].filename
    torch.save(ref.state_dict(), path)  # the hub file: the backbone's raw state dict, mask_token included
    teacher, _ = build_teacher_model(spec, str(path), "")
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    ref_cls, ref_patch = _dinov2_reference(ref, x)
    assert patch.shape[1] == (224 // 14) ** 2
    _assert_same(cls, ref_cls, f"{name} cls")
    _assert_same(patch, ref_patch, f"{name} patch")


def test_dinov2_timm_rule_would_differ(tmp_path):
    """The check above is sensitive: timm's resampling rule misses DINOv2's forward by far more than 1e-5."""
    ref, spec = _dinov2_case("dinov2_vits14")
    path = tmp_path / "dinov2.pth"
    torch.save(ref.state_dict(), path)
    x = _images(spec.resolution)
    ref_cls, ref_patch = _dinov2_reference(ref, x)
    timm_rule, _ = build_teacher_model(dataclasses.replace(spec, pos_embed_rule="timm"), str(path), "")
    assert _relative(timm_rule(x)[1], ref_patch) > 1e-3


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14_reg"])
def test_dinov2_hub_weights_use_dinov2_rule(monkeypatch, name):
    """weights=hub: timm loads the 518-px weights at their own resolution, then DINOv2's rule moves them to 224."""
    ref, spec = _dinov2_case(name)
    create_model = timm.create_model

    def fake_hub(model_name, pretrained=False, **kwargs):  # what timm's pretrained loading does, offline
        if not pretrained:
            return create_model(model_name, **kwargs)
        from timm.models.vision_transformer import checkpoint_filter_fn

        model = create_model(model_name.split(".")[0], **kwargs)
        model.load_state_dict(checkpoint_filter_fn(dict(ref.state_dict()), model))
        assert model.patch_embed.grid_size == (37, 37)  # built at the weights' resolution
        return model

    monkeypatch.setattr(timm, "create_model", fake_hub)
    teacher, _ = build_teacher_model(spec, "hub", "")
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    ref_cls, ref_patch = _dinov2_reference(ref, x)
    _assert_same(cls, ref_cls, f"{name} cls")
    _assert_same(patch, ref_patch, f"{name} patch")


# ------------------------------------------------------------------------------------------ CLIP family --

def _open_clip_model(patch_size: int, quick_gelu: bool, image_size: int = 224):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=TINY["depth"], width=TINY["embed_dim"], head_width=TINY["embed_dim"] // TINY["num_heads"],
                           mlp_ratio=4.0, patch_size=patch_size, image_size=image_size)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return _perturb(CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu))


def _open_clip_reference(visual, x):
    """open_clip's visual tower: ln_post of the cls token (captured before ``proj``) and the patch tokens."""
    captured = {}
    handle = visual.ln_post.register_forward_hook(lambda mod, inp, out: captured.setdefault("ln_post", out))
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = visual(x)
    finally:
        visual.output_tokens = False
        handle.remove()
    cls = captured["ln_post"][:, 0]
    torch.testing.assert_close(cls @ visual.proj, pooled)  # the captured cls is what open_clip pools
    return cls, tokens


# registry name -> (patch size, quick_gelu) of the open_clip model it reads
# every registry CLIP is QuickGELU (OpenAI and MetaCLIP trained with it; open_clip's "openai" models build it)
CLIP_FAMILY = {"clip_vitb16": (16, True), "clip_vitl14": (14, True), "metaclip_vith14": (14, True)}


@pytest.mark.parametrize("name", sorted(CLIP_FAMILY))
def test_clip_family_matches_open_clip(tmp_path, name):
    patch_size, quick_gelu = CLIP_FAMILY[name]
    model = _open_clip_model(patch_size, quick_gelu)
    path = tmp_path / TEACHERS[name].filename
    torch.save(model.state_dict(), path)  # open_clip layout: visual.* with the text tower's keys beside it
    spec = _tiny_spec(name)
    assert spec.resolution == 224
    teacher, _ = build_teacher_model(spec, str(path), "")
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    ref_cls, ref_patch = _open_clip_reference(model.visual, x)
    _assert_same(cls, ref_cls, f"{name} cls")
    _assert_same(patch, ref_patch, f"{name} patch")


@pytest.fixture
def tiny_open_clip_config(tmp_path):
    """A tiny ViT config registered with open_clip (quick_gelu, as MetaCLIP), under a name of its own."""
    import open_clip

    name = "unic-test-tiny-vit-p14"
    cfg = {
        "embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "configs"))
    return name


def test_generic_open_clip_teacher_matches_open_clip(tmp_path, tiny_open_clip_config):
    import open_clip

    torch.manual_seed(0)
    model = _perturb(open_clip.create_model(tiny_open_clip_config))
    path = tmp_path / "open_clip.bin"
    torch.save(model.state_dict(), path)
    teacher, spec = build_teacher_model(get_spec(f"open_clip:{tiny_open_clip_config}"), str(path), "")
    assert spec.resolution == 224 and teacher.patch_size == 14
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    ref_cls, ref_patch = _open_clip_reference(model.visual, x)
    _assert_same(cls, ref_cls, "open_clip cls")
    _assert_same(patch, ref_patch, "open_clip patch")


def test_open_clip_file_on_another_grid_uses_open_clip_resampling(tmp_path, tiny_open_clip_config):
    """A file trained at another resolution is resampled as open_clip's own ``load_checkpoint`` does."""
    import open_clip

    small = _open_clip_model(14, True, image_size=112)  # 8x8 position grid
    path = tmp_path / "open_clip_112.bin"
    torch.save(small.state_dict(), path)
    reference = open_clip.create_model(tiny_open_clip_config)
    open_clip.load_checkpoint(reference, str(path))
    reference.eval()
    teacher, spec = build_teacher_model(get_spec(f"open_clip:{tiny_open_clip_config}"), str(path), "")
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    ref_cls, ref_patch = _open_clip_reference(reference.visual, x)
    _assert_same(cls, ref_cls, "open_clip cls")
    _assert_same(patch, ref_patch, "open_clip patch")


# ------------------------------------------------------------------------- DINO, DeiT-III, iBOT, dBOT-ft --

def _timm_reference(arch: str, **kwargs):
    torch.manual_seed(0)
    return _perturb(timm.create_model(arch, pretrained=False, num_classes=0, img_size=224, **TINY, **kwargs))


def _dino_file(state):  # dino_vit*16_pretrain.pth: the backbone's raw state dict
    return dict(state)


def _deit3_file(state):  # deit_3_*.pth: {"model": ...}, LayerScale as gamma_1/gamma_2, classifier head
    model = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in state.items()}
    assert any("gamma_1" in k for k in model)
    model["head.weight"], model["head.bias"] = torch.randn(1000, TINY["embed_dim"]), torch.zeros(1000)
    return {"model": model, "epoch": 799}


def _ibot_file(state):  # checkpoint_teacher.pth: {"state_dict": module.backbone.* / module.head.*}
    sd = {"module.backbone." + k: v for k, v in state.items()}
    sd["module.backbone.masked_embed"] = torch.zeros(TINY["embed_dim"])
    sd["module.head.last_layer.weight_g"] = torch.ones(8192, 1)
    sd["module.head.mlp.0.weight"] = torch.randn(16, TINY["embed_dim"])
    return {"state_dict": sd, "epoch": 400}


def _dbot_file(state):  # dBOT fine-tuned: {"model": ...} with fc_norm (global average pool), no final norm
    model = dict(state)
    assert "fc_norm.weight" in model and "norm.weight" not in model
    model["head.weight"], model["head.bias"] = torch.randn(1000, TINY["embed_dim"]), torch.zeros(1000)
    return {"model": model}


# registry name -> (timm reference arch, its extra kwargs, official file layout)
TIMM_FAMILY = {
    "dino_vits16": ("vit_small_patch16_224", {}, _dino_file),
    "dino_vitb16": ("vit_base_patch16_224", {}, _dino_file),
    "deit3_vitb16": ("deit3_base_patch16_224", {}, _deit3_file),
    "ibot_vitb16": ("vit_base_patch16_224", {}, _ibot_file),
    "dbotft_vitb16": ("vit_base_patch16_224", {"global_pool": "avg"}, _dbot_file),
}


@pytest.mark.parametrize("name", sorted(TIMM_FAMILY))
def test_timm_family_matches_timm(tmp_path, name):
    arch, kwargs, layout = TIMM_FAMILY[name]
    ref = _timm_reference(arch, **kwargs)
    path = tmp_path / TEACHERS[name].filename
    torch.save(layout(ref.state_dict()), path)
    spec = _tiny_spec(name)
    assert spec.resolution == 224 and spec.arch == arch
    teacher, _ = build_teacher_model(spec, str(path), "")
    x = _images(spec.resolution)
    cls, patch = teacher(x)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        ref_cls = ref.forward_head(tokens, pre_logits=True)
    _assert_same(cls, ref_cls, f"{name} cls")
    _assert_same(patch, tokens[:, ref.num_prefix_tokens:], f"{name} patch")


def test_every_registry_teacher_has_a_reference_test():
    covered = set(DINOV2) | set(CLIP_FAMILY) | set(TIMM_FAMILY)
    weighted = {n for n, s in TEACHERS.items() if s.default_weights != "random"}
    assert weighted == covered, f"teachers without a reference test: {sorted(weighted - covered)}"
