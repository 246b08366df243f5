"""Teacher registry, official-layout checkpoint converters and weight errors (SPEC section 3)."""

import dataclasses
import os

import pytest
import timm
import torch

from teachers import TEACHERS, CheckpointFormatError, TeacherSpec, TeacherWeightsError, build_teacher_model, get_spec

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _tiny_spec(name: str, arch: str, resolution: int = 32, **kwargs) -> TeacherSpec:
    spec = TEACHERS[name]
    return dataclasses.replace(spec, arch=arch, resolution=resolution,
                               model_kwargs={**spec.model_kwargs, **TINY, "img_size": resolution, **kwargs})


def _reference(arch: str, resolution: int = 32, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=resolution, **TINY, **kwargs).eval()
    with torch.no_grad():  # make every parameter non-trivial so a missed key would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _check_same_tokens(teacher, reference, resolution=32):
    x = torch.randn(2, 3, resolution, resolution)
    cls, patch = teacher(x)
    with torch.no_grad():
        tokens = reference.forward_features(x)
        ref_cls = reference.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(cls, ref_cls)
    torch.testing.assert_close(patch, tokens[:, reference.num_prefix_tokens:])


def test_dino_raw_state_dict(tmp_path):
    ref = _reference("vit_small_patch16_224", patch_size=8)
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    teacher, _ = build_teacher_model(_tiny_spec("dino_vitb16", "vit_small_patch16_224", patch_size=8), str(path), "")
    _check_same_tokens(teacher, ref)


@pytest.mark.parametrize("prefix", ["backbone.", "module.backbone."])
def test_ibot_state_dict_with_prefixes_and_head(tmp_path, prefix):
    ref = _reference("vit_base_patch16_224", patch_size=8)
    state = {prefix + k: v for k, v in ref.state_dict().items()}
    state[prefix + "masked_embed"] = torch.zeros(32)
    state[prefix.replace("backbone.", "head.") + "last_layer.weight"] = torch.randn(10, 32)
    path = tmp_path / "ibot.pth"
    torch.save({"state_dict": state, "epoch": 100}, path)
    teacher, _ = build_teacher_model(_tiny_spec("ibot_vitb16", "vit_base_patch16_224", patch_size=8), str(path), "")
    _check_same_tokens(teacher, ref)


def test_deit3_model_key_with_gamma_layerscale(tmp_path):
    ref = _reference("deit3_small_patch16_224", patch_size=8)
    state = {}
    for k, v in ref.state_dict().items():
        state[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    assert any("gamma_1" in k for k in state)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 32), torch.zeros(1000)
    path = tmp_path / "deit3.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 799}, path)
    teacher, _ = build_teacher_model(_tiny_spec("deit3_vitb16", "deit3_small_patch16_224", patch_size=8), str(path), "")
    _check_same_tokens(teacher, ref)


def test_dbot_ft_model_key_with_fc_norm(tmp_path):
    ref = _reference("vit_base_patch16_224", patch_size=8, global_pool="avg")
    state = dict(ref.state_dict())
    assert "fc_norm.weight" in state and "norm.weight" not in state
    state["head.weight"], state["head.bias"] = torch.randn(1000, 32), torch.zeros(1000)
    path = tmp_path / "dbot.pth"
    torch.save({"model": state}, path)
    teacher, _ = build_teacher_model(_tiny_spec("dbotft_vitb16", "vit_base_patch16_224", patch_size=8), str(path), "")
    _check_same_tokens(teacher, ref)
    # dBOT-ft's "cls" is fc_norm of the mean patch token
    x = torch.randn(1, 3, 32, 32)
    cls, patch = teacher(x)
    torch.testing.assert_close(cls, ref.fc_norm(patch.mean(1)))


@pytest.mark.parametrize("reg", [False, True])
def test_dinov2_hub_file(tmp_path, reg):
    arch = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    ref = _reference(arch, resolution=28)
    state = dict(ref.state_dict())
    if reg:  # official layout: registers apart, pos_embed has a cls slot that timm folds into cls_token
        state["register_tokens"] = state.pop("reg_token")
        cls_pos = torch.randn(1, 1, 32)
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    name = "dinov2_vits14_reg" if reg else "dinov2_vits14"
    teacher, _ = build_teacher_model(_tiny_spec(name, arch, resolution=28), str(path), "")
    _check_same_tokens(teacher, ref, resolution=28)


def test_openai_clip_layout_matches_open_clip_tower(tmp_path):
    from open_clip.transformer import VisionTransformer

    from teachers.build import OpenClipTokens

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=16).eval()
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    state["token_embedding.weight"] = torch.randn(100, 16)  # text tower keys are ignored
    state["logit_scale"] = torch.tensor(4.6)
    path = tmp_path / "clip.bin"
    torch.save(state, path)
    spec = _tiny_spec("clip_vitb16", "vit_base_patch16_clip_224", patch_size=8)
    teacher, _ = build_teacher_model(spec, str(path), "")
    x = torch.randn(2, 3, 32, 32)
    cls, patch = teacher(x)
    with torch.no_grad():
        ref_cls, ref_patch = OpenClipTokens(visual)(x)
    torch.testing.assert_close(cls, ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(patch, ref_patch, rtol=1e-4, atol=1e-4)


def test_timm_generic_teacher_from_file(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    spec = get_spec("timm:vit_tiny_patch16_224")
    assert spec.resolution == 224 and spec.source == "timm"
    teacher, _ = build_teacher_model(spec, str(path), "")
    assert teacher.embed_dim == 192 and teacher.patch_size == 16


def test_missing_file_error_names_what_to_download(tmp_path):
    with pytest.raises(TeacherWeightsError) as err:
        build_teacher_model(get_spec("dino_vitb16"), None, str(tmp_path))
    msg = str(err.value)
    assert "dino_vitbase16_pretrain.pth" in msg and str(tmp_path) in msg and "dl.fbaipublicfiles.com" in msg
    with pytest.raises(TeacherWeightsError, match="no hub weights"):
        build_teacher_model(get_spec("ibot_vitb16"), "hub", "")
    with pytest.raises(TeacherWeightsError, match="not found"):
        build_teacher_model(get_spec("dino_vitb16"), str(tmp_path / "nope.pth"), "")


def test_default_file_is_found_in_weights_dir(tmp_path):
    ref = _reference("vit_small_patch16_224", patch_size=8)
    torch.save(ref.state_dict(), tmp_path / TEACHERS["dino_vits16"].filename)
    spec = _tiny_spec("dino_vits16", "vit_small_patch16_224", patch_size=8)
    teacher, _ = build_teacher_model(spec, None, str(tmp_path))
    _check_same_tokens(teacher, ref)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, path)
    spec = _tiny_spec("dino_vitb16", "vit_small_patch16_224", patch_size=8)
    with pytest.raises(CheckpointFormatError, match="weights-only"):
        build_teacher_model(spec, str(path), "")


def test_wrong_architecture_and_garbage_files(tmp_path):
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            embed_dim=64, depth=2, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save(ref.state_dict(), path)
    spec = _tiny_spec("dino_vitb16", "vit_small_patch16_224", patch_size=8)
    with pytest.raises(CheckpointFormatError, match="does not match"):
        build_teacher_model(spec, str(path), "")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFormatError):
        build_teacher_model(spec, str(garbage), "")


def test_unknown_teacher_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean dino_vitb16"):
        get_spec("dino_vitb61")
    with pytest.raises(ValueError, match="timm has no model"):
        get_spec("timm:not_a_model")


@pytest.mark.parametrize("name, dim, patch, params_m", [
    ("dinov2_vitg14", 1536, 14, 1134), ("dinov2_vitg14_reg", 1536, 14, 1134), ("metaclip_vith14", 1280, 14, 630),
    ("dino_vitb16", 768, 16, 85), ("open_clip:ViT-B-16", 768, 16, 86),
])
def test_full_size_teacher_builds_on_meta_device(name, dim, patch, params_m):
    """Preflight plans build full-size teacher architectures on the meta device to count parameters/FLOPs."""
    with torch.device("meta"):
        teacher, spec = build_teacher_model(get_spec(name), "random", "")
    tensors = list(teacher.parameters()) + list(teacher.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert (teacher.embed_dim, teacher.patch_size, spec.resolution) == (dim, patch, 224)
    assert int(sum(p.numel() for p in teacher.parameters()) / 1e6) == params_m


def test_every_missing_teacher_file_is_reported_at_once(tmp_path):
    """The preflight check names all missing files in one error, before any model is built."""
    from teachers.build import check_weights

    present = tmp_path / "dino_vitbase16_pretrain.pth"
    present.write_bytes(b"")
    with pytest.raises(TeacherWeightsError) as err:
        check_weights(["dino_vitb16", "deit3_vitb16", "dinov2_vitb14", "toy_vit_p16_d96"], {}, str(tmp_path))
    message = str(err.value)
    assert message.startswith("2 teachers lack weights")
    assert "deit_3_base_224_1k.pth" in message and "dinov2_vitb14_pretrain.pth" in message
    assert "dino_vitbase16" not in message and "toy_vit" not in message  # found / random: fine
    assert "teachers.weights.<name>=random" in message
    check_weights(["dino_vitb16", "toy_vit_p16_d96"], {}, str(tmp_path))  # nothing missing: no error
    with pytest.raises(TeacherWeightsError, match="weights file not found"):  # one problem: its own message
        check_weights(["dino_vitb16"], {"dino_vitb16": str(tmp_path / "nope.pth")}, str(tmp_path))


def test_registry_listing(tmp_path, capsys):
    """``python -m teachers``: every registry teacher with its real dim and patch (meta builds) and its file."""
    import json

    from teachers.__main__ import main

    (tmp_path / "deit_3_base_224_1k.pth").write_bytes(b"")
    assert main(["--weights_dir", str(tmp_path), "--json"]) == 0
    table = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(table) == set(TEACHERS)
    assert (table["dinov2_vitg14"]["dim"], table["dinov2_vitg14"]["patch"]) == (1536, 14)
    assert (table["metaclip_vith14"]["dim"], table["toy_vit_p14_d48"]["patch"]) == (1280, 14)
    assert table["deit3_vitb16"]["present"] and not table["dino_vitb16"]["present"]
    assert table["ibot_vitb16"]["url"].endswith("vitb_16_rand_mask/checkpoint_teacher.pth")
    assert main(["--weights_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:4] == ["name", "arch", "dim", "patch"] and "dinov2_vitl14_reg" in text
