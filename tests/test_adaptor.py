"""Adaptors (SPEC section 11): the ladder and teacher statistics saved in every UNIC file format, loaded back as
teacher-space cls and patch tokens, checked against a by-hand forward of the original modules."""

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import randomise_adaptors, run_entry, tiny_overrides

import unic
from unic.eval.encoders import load_encoder
from unic.io import load_checkpoint, save_checkpoint
from unic.models.adaptor import Adaptor, adaptor_names
from unic.models.export import backbone_from_checkpoint, student_export, universal_export
from unic.models.ladder import Ladder
from unic.models.student import build_student, student_taps
from unic.models.teacher import teacher_key
from unic.train.standardize import TeacherStandardizer

ARCH = "vit_tiny_patch16_224"
KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "reg_tokens": 1}
# a teacher name with the dot and colon the module and buffer keys cannot hold
TEACHERS = {"toy_a": 24, "timm:vit_small_patch16_224.augreg_in21k": 40}


def _cfg():
    return OmegaConf.create({
        "student": {"arch": ARCH, "kwargs": KWARGS, "img_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]},
        "ladder": {"blocks": [0, -1], "last_tap": "raw", "hidden_dim": 16, "last_hidden_dim": 48},
        "teachers": {"names": list(TEACHERS)},
    })


@pytest.fixture(scope="module")
def parts():
    """A tiny student, its ladder (blocks 0 and 2 of 3, raw last tap) and a standardizer with random statistics,
    every weight random (biases too: the projectors start with zero ones)."""
    torch.manual_seed(0)
    cfg = _cfg()
    backbone = build_student(ARCH, 32, 0.0, dict(KWARGS)).eval()
    dims = {teacher_key(n): d for n, d in TEACHERS.items()}
    ladder = Ladder(32, 3, dims, [0, -1], 16, 48)
    standardizer = TeacherStandardizer(dims)
    randomise_adaptors(ladder, standardizer)
    return cfg, backbone, ladder, standardizer


def _by_hand(backbone, ladder, standardizer, name, images, last_tap):
    """Teacher-space tokens from the original modules: blocks run one by one, the taps skip the register token."""
    key = teacher_key(name)
    with torch.no_grad():
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
        taps = []
        for block in backbone.blocks:
            x = block(x)
            taps.append((x[:, 0], x[:, backbone.num_prefix_tokens:]))
        if last_tap == "normed":
            y = backbone.norm(x)
            taps[-1] = (y[:, 0], y[:, backbone.num_prefix_tokens:])
        out = {}
        for ttype, index in (("cls", 0), ("patch", 1)):
            projs = ladder.projectors[key][ttype]
            pred = sum(proj(taps[b][index]) for proj, b in zip(projs, ladder.blocks))
            mean, std = standardizer.running(key, ttype)
            out[ttype] = pred * (std + standardizer.eps) + mean
    return out


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory):
    cfg, backbone, ladder, standardizer = parts
    folder = tmp_path_factory.mktemp("adaptor")
    paths = {kind: str(folder / f"{kind}.pth") for kind in ("student", "universal", "old")}
    save_checkpoint(student_export(backbone, cfg, ladder, standardizer), paths["student"])
    heads = {"cars": nn.Linear(32, 8), "food": nn.Linear(32, 8)}
    save_checkpoint(universal_export(backbone, cfg, nn.Linear(32, 16), heads, list(heads), ladder, standardizer),
                    paths["universal"])
    save_checkpoint(student_export(backbone, cfg), paths["old"])  # no ladder: what files before adaptors hold
    return paths


@pytest.mark.parametrize("kind", ["student", "universal"])
@pytest.mark.parametrize("name", list(TEACHERS))
def test_exported_adaptor_matches_the_by_hand_forward(parts, files, kind, name):
    cfg, backbone, ladder, standardizer = parts
    assert adaptor_names(load_checkpoint(files[kind])) == list(TEACHERS)
    adaptor = unic.load_student(files[kind], adaptor=name)
    assert isinstance(adaptor, Adaptor) and not adaptor.training
    assert (adaptor.teacher, adaptor.embed_dim, adaptor.img_size, adaptor.patch_size) == (name, TEACHERS[name], 32, 8)
    assert adaptor.mean == (0.5, 0.4, 0.3) and adaptor.std == (0.2, 0.25, 0.3)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = adaptor(images)
    expected = _by_hand(backbone, ladder, standardizer, name, images, "raw")
    assert out["cls"].shape == (3, TEACHERS[name]) and out["patch"].shape == (3, 16, TEACHERS[name])
    torch.testing.assert_close(out["cls"], expected["cls"])
    torch.testing.assert_close(out["patch"], expected["patch"])
    # the training path: Ladder(student_taps(...)), de-standardised; the statistics matter
    key = teacher_key(name)
    with torch.no_grad():
        pred = ladder(student_taps(backbone, images, "raw")[0])[key]
    for ttype in ("cls", "patch"):
        mean, std = standardizer.running(key, ttype)
        torch.testing.assert_close(out[ttype], pred[ttype] * (std + 1e-6) + mean)
        assert (out[ttype] - pred[ttype]).abs().mean() > 0.5


def test_files_keep_loading_as_before(parts, files):
    """adaptor=None is the backbone as before; plain timm reads the state dict; old files still load."""
    cfg, backbone, _, _ = parts
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = backbone.forward_features(images)
        for kind in ("student", "universal", "old"):
            for model in (unic.load_student(files[kind]), unic.load_student(files[kind], None, "cpu"),
                          unic.load_student(files[kind], "cpu")):  # the pre-adaptor (path, device) call
                assert not isinstance(model, Adaptor) and not model.training
                torch.testing.assert_close(model.forward_features(images), reference)
        plain = timm.create_model(ARCH, pretrained=True, num_classes=0, img_size=32, **KWARGS,
                                  pretrained_cfg_overlay=dict(file=files["student"])).eval()
        torch.testing.assert_close(plain.forward_features(images), reference)
    assert adaptor_names(load_checkpoint(files["old"])) == []
    assert load_encoder(files["universal"]).kind == "universal"


def test_teacher_names_resolve_and_errors_name_the_alternatives(files):
    mangled = "timm:vit_small_patch16_224_augreg_in21k"  # teacher_key's spelling
    assert unic.load_student(files["student"], adaptor=mangled).teacher == "timm:vit_small_patch16_224.augreg_in21k"
    with pytest.raises(ValueError, match=r"no adaptor for teacher 'dinov2_vitb14' \(has: toy_a, timm:vit_small"):
        unic.load_student(files["student"], adaptor="dinov2_vitb14")
    with pytest.raises(ValueError, match="has no adaptors .*without distillation.*without adaptor="):
        unic.load_student(files["old"], adaptor="toy_a")
    with pytest.raises(ValueError, match="has no adaptors"):
        load_encoder(files["old"], "adaptor:toy_a")
    with pytest.raises(ValueError, match="adaptor:<teacher>"):
        load_encoder(files["student"], "bogus")


def test_encoder_of_an_adaptor(parts, files):
    cfg, backbone, ladder, standardizer = parts
    name = "timm:vit_small_patch16_224.augreg_in21k"
    encoder = load_encoder(files["universal"], f"adaptor:{name}")
    assert encoder.embed_dim == 40 and encoder.patch_size == 8 and encoder.img_size == 32
    assert encoder.mean == (0.5, 0.4, 0.3) and encoder.kind == f"adaptor:{name}"
    images = torch.randn(2, 3, 32, 32)
    expected = _by_hand(backbone, ladder, standardizer, name, images, "raw")
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), expected["cls"])
        cls_BD, patch_BND = encoder.descriptor_and_patches(images)
        torch.testing.assert_close(cls_BD, expected["cls"])
        torch.testing.assert_close(patch_BND, expected["patch"])
        patch_BDhw = encoder.patch_features(images, 1)
        assert patch_BDhw.shape == (2, 40, 4, 4)
        # row-major patch grid: token i is the map's (i // w, i % w)
        torch.testing.assert_close(patch_BDhw[:, :, 1, 3], expected["patch"][:, 1 * 4 + 3])
        # other resolutions: the student is built with dynamic_img_size
        wide = torch.randn(1, 3, 32, 48)
        assert encoder.patch_features(wide).shape == (1, 40, 4, 6)
    with pytest.raises(ValueError, match="num_last_blocks must be 1"):
        encoder.patch_features(images, 2)


def _export_from_training_checkpoint(ckpt: dict) -> dict:
    """student.pth with adaptors built from a training checkpoint's own state, as the trainer's export does."""
    from unic.train.build import build_ladder

    cfg = OmegaConf.create(ckpt["config"])
    backbone = backbone_from_checkpoint(ckpt)
    model = ckpt["model"]
    dims = {teacher_key(n): model[f"ladder.projectors.{teacher_key(n)}.cls.0.2.weight"].shape[0]
            for n in sorted(cfg.teachers.names)}
    ladder = build_ladder(cfg, backbone, dims)
    ladder.load_state_dict({k[len("ladder."):]: v for k, v in model.items() if k.startswith("ladder.")})
    standardizer = TeacherStandardizer(dims)
    standardizer.load_state_dict(ckpt["standardizer"])
    return student_export(backbone, cfg, ladder, standardizer)


def test_training_checkpoint_and_its_export_give_the_same_adaptor(tmp_path, demo_root):
    out = tmp_path / "run"
    overrides = {"train.max_steps": 3, "train.validate": False, "optim.warmup_epochs": 0}
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **overrides)])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    names = list(ckpt["config"]["teachers"]["names"])
    assert sorted(adaptor_names(ckpt)) == sorted(names) and len(names) == 2
    assert ckpt["standardizer"]["initialized"]  # trained statistics, not the initial 0 / 1
    export = tmp_path / "student.pth"
    save_checkpoint(_export_from_training_checkpoint(ckpt), str(export))
    files = [str(out / "checkpoint.pth"), str(export)]
    # the trainer's own exports carry the adaptors too
    assert "adaptors" in load_checkpoint(str(out / "student.pth"))
    files += [str(out / "student.pth"), str(out / "universal.pth")]
    images = torch.randn(2, 3, 32, 32)
    for name in names:
        with torch.no_grad():
            outs = [unic.load_student(path, adaptor=name)(images) for path in files]
        for other in outs[1:]:
            torch.testing.assert_close(other["cls"], outs[0]["cls"])
            torch.testing.assert_close(other["patch"], outs[0]["patch"])
        # and against the by-hand forward of the checkpoint's modules (last_tap: the config's, "normed")
        dims = {teacher_key(n): ckpt["model"][f"ladder.projectors.{teacher_key(n)}.cls.0.2.weight"].shape[0]
                for n in names}
        ladder = Ladder(32, 2, dims, None, 32, 64)  # tiny_overrides' ladder widths, all blocks
        ladder.load_state_dict({k[len("ladder."):]: v for k, v in ckpt["model"].items() if k.startswith("ladder.")})
        standardizer = TeacherStandardizer(dims)
        standardizer.load_state_dict(ckpt["standardizer"])
        expected = _by_hand(backbone_from_checkpoint(ckpt), ladder, standardizer, name, images,
                            ckpt["config"]["ladder"]["last_tap"])
        torch.testing.assert_close(outs[0]["cls"], expected["cls"])
        torch.testing.assert_close(outs[0]["patch"], expected["patch"])
    # adaptor=None: today's backbone, from the checkpoint and the trainer's export
    with torch.no_grad():
        a = unic.load_student(files[0]).forward_features(images)
        torch.testing.assert_close(unic.load_student(str(out / "student.pth")).forward_features(images), a)
        enc = load_encoder(files[0], f"adaptor:{names[0]}")
        torch.testing.assert_close(enc(images), unic.load_student(files[0], adaptor=names[0])(images)["cls"])
