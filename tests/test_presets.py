"""Every preset builds the paper's model, batch and schedule (meta device: nothing is allocated), and the
preflight plan reports it; the configuration semantics that guarantee it (dict/list values replace)."""

import json
import os

import pytest
import torch

from main_unic import main as train_main
from unic.config import ConfigError, load_config, resolve_batch
from unic.models.student import build_student
from unic.train.plan import build_plan, format_plan

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "unic", "configs")


def preset(name: str, *overrides: str):
    return load_config(os.path.join(CONFIGS, name), ["data.root=/nonexistent", *overrides])


PAPER_PRESETS = ("unic_vitb16_in1k.yaml", "unic_l_vitl14.yaml", "udon_uned_vitb16.yaml",
                 "unifex_m4d35k_siglip_so400m.yaml", "unifex_m4d35k_clip_vitb16.yaml")
# M4D-35k (UniFEx's README): 34.8k classes, 328.4k images; the plan counts the merged head when told the classes
M4D35K = {"num_train_images": 328_400, "num_classes": 34_800}


@pytest.fixture(scope="module")
def plans():
    """The plan of each paper preset on 4 processes (UNIC's, UDON's and UniFEx's GPU counts divide the global
    batch)."""
    return {name: build_plan(preset(name), world_size=4, **(M4D35K if name.startswith("unifex") else {}))
            for name in PAPER_PRESETS}


def test_every_packaged_preset_is_tested_for_its_model():
    from unic.config import packaged_presets

    assert sorted(packaged_presets()) == sorted(["demo", *(name[:-len(".yaml")] for name in PAPER_PRESETS)])


def test_unic_vitb16_preset_builds_the_paper_model(plans):
    plan = plans["unic_vitb16_in1k.yaml"]
    s = plan["student"]
    assert (s["width"], s["depth"], s["heads"], s["patch"], s["img_size"]) == (768, 12, 12, 16, 224)
    assert round(s["params"] / 1e6, 1) == 85.8 and not s["layerscale"] and s["registers"] == 0
    assert s["trainable_params"] == s["params"] - 2 * 768  # raw last tap: the final norm is not trained
    lad = plan["ladder"]
    assert lad["projectors"] == 4 * 2 * 12 and round(lad["params"] / 1e6, 1) == 141.7
    assert lad["params"] == 141_723_648 and lad["last_tap"] == "raw" and lad["blocks"] == list(range(12))
    assert set(plan["teachers"]) == {"dino_vitb16", "deit3_vitb16", "ibot_vitb16", "dbotft_vitb16"}
    for t in plan["teachers"].values():
        assert (t["dim"], t["patch"], t["resolution"]) == (768, 16, 224) and t["weights"] == "file"
    assert plan["teachers"]["ibot_vitb16"]["url"].rstrip("/").endswith("vitb_16_rand_mask/checkpoint_teacher.pth")
    sch = plan["schedule"]
    assert (sch["global_batch"], sch["batch_per_gpu"]) == (512, 128)
    assert sch["lr"] == pytest.approx(6e-4) and sch["clip_mode"] == "per_param" and sch["clip_grad"] == 0
    # ImageNet-1k's 1,281,167 images when the root is not there to count
    assert (sch["steps_per_epoch"], sch["total_steps"], sch["warmup_steps"]) == (2502, 500_400, 25_020)
    assert sch["precision"] == "bf16"
    # golden FLOPs per image: ViT-B/16 forward 35.1 GFLOP, x3 with backward; 4 teachers forward
    flops = plan["flops_per_image"]
    assert round(flops["student_fwd_bwd"] / 1e9, 1) == 105.1
    assert round(flops["ladder_fwd_bwd"] / 1e9, 1) == 83.7
    assert all(round(flops[f"teacher/{t}"] / 1e9, 1) == 35.1 for t in plan["teachers"])
    assert round(flops["total"] / 1e9, 1) == 329.3
    mem = plan["memory_per_gpu"]
    assert mem["weights_grads_adamw_gb"] == pytest.approx((s["trainable_params"] + lad["params"]) * 16 / 2**30)
    assert 10 < mem["total_gb"] < 80  # fits an 80 GB GPU at 128 per GPU


def test_unic_l_preset_builds_uniCs_vitl14_without_layerscale(plans):
    plan = plans["unic_l_vitl14.yaml"]
    s = plan["student"]
    assert (s["width"], s["depth"], s["heads"], s["patch"]) == (1024, 24, 16, 14)
    assert round(s["params"] / 1e6, 1) == 303.2 and not s["layerscale"]
    t = plan["teachers"]
    assert (t["dinov2_vitg14"]["dim"], t["dinov2_vitg14"]["patch"]) == (1536, 14)
    assert (t["metaclip_vith14"]["dim"], t["metaclip_vith14"]["patch"]) == (1280, 14)
    assert round(t["dinov2_vitg14"]["params"] / 1e6) == 1135
    assert plan["ladder"]["last_tap"] == "raw" and plan["schedule"]["clip_mode"] == "per_param"
    assert plan["schedule"]["global_batch"] == 512
    flops = plan["flops_per_image"]  # golden figures: ViT-L/14 at 224 (257 tokens), ViT-g/14 and ViT-H/14 forward
    assert round(flops["student_fwd_bwd"] / 1e9, 1) == 485.8
    assert round(flops["teacher/dinov2_vitg14"] / 1e9, 1) == 598.8
    assert round(flops["teacher/metaclip_vith14"] / 1e9, 1) == 334.6
    assert round(flops["total"] / 1e9, 1) == 1574.7
    assert round(plan["ladder"]["params"] / 1e6, 1) == 201.9


def test_udon_preset_builds_a_clip_vitb16_at_global_batch_128(plans):
    plan = plans["udon_uned_vitb16.yaml"]
    s = plan["student"]
    assert (s["width"], s["depth"], s["patch"]) == (768, 12, 16) and round(s["params"] / 1e6, 1) == 85.8
    assert "ladder" not in plan and plan["teachers"] == {} and plan["udon"]["head"] == "normface"
    assert (plan["schedule"]["global_batch"], plan["schedule"]["batch_per_gpu"]) == (128, 32)
    cfg = preset("udon_uned_vitb16.yaml")
    with torch.device("meta"):
        model = build_student(cfg.student.arch, 224, 0.0, dict(cfg.student.kwargs))
    assert model.norm_pre.__class__.__name__ == "LayerNorm"  # CLIP's ln_pre: the CLIP architecture
    # OpenAI's CLIP weights were trained with QuickGELU (UDON's CLIP ViT too): GELU would change every block
    assert model.blocks[0].mlp.act.__class__.__name__ == "QuickGELU"


def test_unifex_presets_build_a_frozen_backbone_a_64d_neck_and_one_merged_head(plans):
    """UniFEx's paper model (SigLIP So400m/14 at 384, 428.2M frozen) and its CLIP ViT-B/16 variant (85.8M):
    a Linear F -> 64 neck and a k = 3 sub-centre ArcFace over M4D-35k's 34.8k merged classes, trained alone."""
    for name, (dim, size, params) in {"unifex_m4d35k_siglip_so400m.yaml": (1152, 384, 428_225_600),
                                      "unifex_m4d35k_clip_vitb16.yaml": (768, 224, 85_799_424)}.items():
        plan = plans[name]
        u = plan["unifex"]
        assert (u["feature_dim"], u["img_size"], u["params"], u["trainable_params"]) == (dim, size, params, 0)
        assert (u["neck"], u["embed_dim"], u["neck_params"]) == ("proj", 64, dim * 64 + 64)
        assert (u["head"], u["head_params"]) == ("subcenter_arcface", 34_800 * 3 * 64)
        assert "student" not in plan and "ladder" not in plan and plan["teachers"] == {} and "udon" not in plan
        sch = plan["schedule"]
        assert (sch["global_batch"], sch["batch_per_gpu"], sch["lr"], sch["optimizer"]) == (128, 32, 0.02, "adam")
        assert (sch["steps_per_epoch"], sch["total_steps"]) == (2565, 25_650)


def test_plan_text_names_every_figure(plans):
    text = format_plan(plans["unic_vitb16_in1k.yaml"])
    for needle in ("85.8M params", "141.7M params", "last tap raw", "global 512 = 4 x 128", "lr 0.0006",
                   "2502 steps/epoch", "25020 warm-up", "329.3 G", "MISSING"):
        assert needle in text, needle


@pytest.mark.parametrize("world, per_gpu", [(1, 512), (2, 256), (4, 128), (8, 64)])
def test_global_batch_is_independent_of_the_gpu_count(world, per_gpu):
    assert resolve_batch(preset("unic_vitb16_in1k.yaml"), world) == (512, per_gpu)


def test_global_batch_that_the_world_does_not_divide_is_a_clear_error():
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        resolve_batch(preset("unic_vitb16_in1k.yaml"), 3)
    with pytest.raises(ConfigError, match="data.global_batch"):
        load_config(None, ["data.global_batch=0"])
    cfg = load_config(None, ["data.batch_size_per_gpu=8"])
    assert resolve_batch(cfg, 3) == (24, 8)  # without global_batch: per-GPU times processes


def test_dict_settings_replace_the_default_and_dotted_keys_set_one_entry(tmp_path):
    default = load_config().student.kwargs
    assert default  # the schema's demo-sized student
    assert load_config(os.path.join(CONFIGS, "unic_vitb16_in1k.yaml")).student.kwargs == {}
    assert load_config(None, ["student.kwargs={}"]).student.kwargs == {}
    assert load_config(None, ["student.kwargs={depth: 2}"]).student.kwargs == {"depth": 2}
    assert load_config(None, ["student.kwargs.depth=2"]).student.kwargs == {**default, "depth": 2}
    assert load_config(None, ["student.kwargs={}", "student.kwargs.depth=3"]).student.kwargs == {"depth": 3}
    file = tmp_path / "p.yaml"
    file.write_text("student:\n  kwargs: {embed_dim: 48}\nteachers:\n  weights: {toy_vit_p16_d96: /a.pth}\n")
    cfg = load_config(str(file), ["teachers.weights.toy_vit_p14_d48=/b.pth"])
    assert cfg.student.kwargs == {"embed_dim": 48}
    assert cfg.teachers.weights == {"toy_vit_p16_d96": "/a.pth", "toy_vit_p14_d48": "/b.pth"}
    cfg = load_config(str(file), ["teachers.weights={toy_vit_p14_d48: /b.pth}"])
    assert cfg.teachers.weights == {"toy_vit_p14_d48": "/b.pth"}


def test_list_settings_replace_the_default():
    cfg = load_config(os.path.join(CONFIGS, "unic_vitb16_in1k.yaml"),
                      ["teachers.names=[dino_vitb16]", "ladder.blocks=[5,11]", "optim.betas=[0.8,0.9]",
                       "student.mean=[0.5,0.5,0.5]"])
    assert list(cfg.teachers.names) == ["dino_vitb16"] and list(cfg.ladder.blocks) == [5, 11]
    assert list(cfg.optim.betas) == [0.8, 0.9] and list(cfg.student.mean) == [0.5, 0.5, 0.5]
    demo = load_config(os.path.join(CONFIGS, "demo.yaml"), ["data.domains=[digits]"])
    assert list(demo.data.domains) == ["digits"]


def test_plan_entry_point_prints_and_writes_without_training(tmp_path, capsys):
    out = tmp_path / "plan_run"
    code = train_main(["--config", os.path.join(CONFIGS, "unic_vitb16_in1k.yaml"), "data.root=/nonexistent",
                       f"run.output_dir={out}", "--plan", "--world_size", "4"])
    assert code == 0
    text = capsys.readouterr().out
    assert "141.7M params" in text and "global 512 = 4 x 128" in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["ladder"]["params"] == 141_723_648 and plan["world_size"] == 4
    assert sorted(os.listdir(out)) == ["plan.json"]  # nothing trained, no checkpoint or config
    assert train_main(["--config", os.path.join(CONFIGS, "unic_vitb16_in1k.yaml"), "--plan", "--world_size", "3",
                       f"run.output_dir={tmp_path / 'x'}"]) == 2
    assert "not divisible" in capsys.readouterr().err
