"""Configuration loading and the clear errors users get for bad input."""

import os

import pytest

from tests.conftest import run_entry, tiny_overrides
from main_unic import parse_args
from unic.config import DEMO_CONFIG, ConfigError, load_config


def test_schema_defaults_demo_preset_and_overrides_merge(tmp_path):
    cfg = load_config()
    assert (cfg.ladder.hidden_dim, cfg.ladder.last_hidden_dim) == (768, 3072)  # SPEC section 2
    demo = load_config(DEMO_CONFIG)
    assert demo.data.dataset == "demo" and len(demo.teachers.names) == 2 and demo.ladder.hidden_dim == 128
    cfg, args = parse_args([])  # python main_unic.py runs the demo
    assert args.config == DEMO_CONFIG and cfg == demo and not args.plan
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.5\nstudent:\n  arch: vit_small_patch16_224\n")
    cfg = load_config(str(preset), ["optim.lr=0.25", "teachers.weights.toy_vit_p16_d96=/w.pth"])
    assert cfg.optim.lr == 0.25 and cfg.student.arch == "vit_small_patch16_224"
    assert cfg.teachers.weights.toy_vit_p16_d96 == "/w.pth"


def test_presets_load():
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "unic", "configs")
    presets = [f for f in os.listdir(folder) if f.endswith(".yaml")]
    assert presets
    for name in presets:
        load_config(os.path.join(folder, name))


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
    (["optim.lr=fast"], "invalid value for 'optim.lr'"),
    (["data.batch_size_per_gpu=-2"], "must be > 0"),
    (["data.dataset=coco"], "choose one of"),
    (["loss.drop_prob=1.5"], "must be in \\[0, 1\\]"),
    (["teachers.names=[]"], "at least one teacher"),
    (["teachers.names=[a,a]"], "twice"),
    (["teachers.weights.other=x"], "not in 'teachers.names'"),
    (["optim.betas=[0.9]"], "two numbers"),
    (["student.std=[0.5,0,0.5]"], "invalid value for 'student.std'.*three numbers > 0"),
    (["student.mean=[0.5,0.5]"], "invalid value for 'student.mean'.*three numbers"),
    (["novalue"], "key=value"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*did you mean 'train'"):
        load_config(str(unknown))


@pytest.mark.parametrize("extra, message", [
    (["optim.lrr=1"], "unknown config key"),
    (["data.root=/does/not/exist", "data.dataset=imagenet", "udon.enabled=false"], "data.root not found"),
    (["teachers.names=[dino_vitb16]", "teachers.weights_dir=/nowhere"], "dino_vitbase16_pretrain.pth"),
])
def test_entry_point_fails_cleanly_before_creating_output(tmp_path, demo_root, extra, message):
    out = tmp_path / "run"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out)), *extra], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message.split(".*")[0] in error_lines[0]
    assert not out.exists()


def test_checkpoints_from_before_later_settings_still_resume():
    """A checkpoint's config lacks every setting added after it was written; each was added with a default
    that keeps the old behaviour, so it resumes, and a real change is still refused."""
    from unic.config import resume_mismatches, to_plain

    cfg = load_config(DEMO_CONFIG)
    saved = to_plain(cfg)
    # as written before student.mean/std, ladder.last_tap, data.global_batch, optim.clip_mode, heads.init and
    # udon.window_reset_every existed
    del saved["student"]["mean"], saved["student"]["std"], saved["ladder"]["last_tap"], saved["data"]["global_batch"]
    del saved["optim"]["clip_mode"], saved["heads"]["init"], saved["udon"]["window_reset_every"]
    saved["data"]["batch_size_per_gpu"] = 32  # the demo's batch then, on 1 process: its global batch now
    assert resume_mismatches(saved, cfg) == []
    clip = load_config(DEMO_CONFIG, ["student.mean=[0.48,0.46,0.41]"])
    assert resume_mismatches(saved, clip) and "student" in resume_mismatches(saved, clip)[0]
    raw = load_config(DEMO_CONFIG, ["ladder.last_tap=raw"])
    assert any(d.startswith("ladder") for d in resume_mismatches(saved, raw))
    # the free-form student.kwargs is compared as saved, not filled from the schema's default
    saved["student"]["kwargs"] = {}
    assert any(d.startswith("student") for d in resume_mismatches(saved, cfg))


def test_resume_compares_the_effective_global_batch():
    from unic.config import resume_mismatches, to_plain

    old = load_config(DEMO_CONFIG, ["data.global_batch=null", "data.batch_size_per_gpu=8"])  # 8 per GPU on 4: 32
    new = load_config(DEMO_CONFIG, ["data.global_batch=32", "data.batch_size_per_gpu=100"])  # the latter ignored
    assert resume_mismatches(to_plain(old), new, saved_world=4, world=4) == []
    diffs = resume_mismatches(to_plain(old), new, saved_world=2, world=4)
    assert diffs == ["global batch: checkpoint 16, now 32"]


def test_resume_of_checkpoints_from_before_udon_and_without_a_config():
    from unic.config import resume_mismatches, to_plain

    off = load_config(DEMO_CONFIG, ["udon.enabled=false"])
    saved = to_plain(off)
    del saved["udon"], saved["heads"], saved["loss"]["w_udon"]  # a distillation-only run from before UDON
    assert resume_mismatches(saved, off) == []
    assert any(d.startswith("udon") for d in resume_mismatches(saved, load_config(DEMO_CONFIG)))
    assert resume_mismatches({}, off) == ["the checkpoint holds no config"]
    # settings that play no part in the run are not compared; the heads' initial weights are the checkpoint's
    assert resume_mismatches(to_plain(off), load_config(DEMO_CONFIG, ["udon.enabled=false", "udon.head_lr=1"])) == []
    on = load_config(DEMO_CONFIG)
    assert resume_mismatches(to_plain(on), load_config(DEMO_CONFIG, ["heads.init=normal"])) == []
    assert resume_mismatches(to_plain(on), load_config(DEMO_CONFIG, ["udon.head_lr=1"]))


def test_resume_compares_the_unifex_recipe_and_its_head():
    """A UniFEx run's backbone, neck and margin head shape its model: a change is refused on resume (the heads
    count although UDON is off); configs from before the recipe existed resume as runs without it."""
    from unic.config import resume_mismatches, to_plain

    recipe = ["unifex.enabled=true", "unifex.backbone=timm:vit_tiny_patch16_224", "loss.w_distill=0",
              "udon.enabled=false"]
    cfg = load_config(DEMO_CONFIG, recipe)
    assert resume_mismatches(to_plain(cfg), cfg) == []
    for change, key in ((["unifex.embed_dim=32"], "unifex"), (["heads.name=arcface"], "heads"),
                        (["optim.optimizer=adam"], "optim.optimizer")):
        diffs = resume_mismatches(to_plain(cfg), load_config(DEMO_CONFIG, recipe + change))
        assert diffs and diffs[0].startswith(key), diffs
    off = load_config(DEMO_CONFIG)
    saved = to_plain(off)
    del saved["unifex"], saved["optim"]["optimizer"]  # written before the recipe existed
    assert resume_mismatches(saved, off) == []
    assert any(d.startswith("unifex") for d in resume_mismatches(saved, cfg))
