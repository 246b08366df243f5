"""The one command-line style (unic.cli) and the config behaviour every entry point shares."""

import os

import pytest
import yaml

from unic.cli import build_parser, describe, parse, write_resolved_config
from unic.config import DEMO_CONFIG, ConfigError, UnicConfig, closest_key, load_config, resolve_config_file, resume_mismatches, to_plain


def test_help_lists_every_key_with_the_default_configs_value_and_its_comment():
    text = build_parser(UnicConfig, "Train.", "python main_unic.py optim.lr=1e-3", DEMO_CONFIG).format_help()
    assert "configuration keys (values of demo.yaml)" in text
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if " = " in line}
    assert "student.img_size = 32" in lines["student.img_size"]  # the demo's value, not the schema's 64
    assert "# hidden width of the last block's projector" in lines["ladder.last_hidden_dim"]
    assert "# the global batch; when set" in lines["data.global_batch"]  # a comment on the line above
    assert {"run.output_dir", "run.seed", "run.device", "run.precision"} <= set(lines)
    assert text.rstrip().endswith("python main_unic.py optim.lr=1e-3")
    schema_values = {line.split("=")[0].strip(): line for line in describe(UnicConfig) if " = " in line}
    assert "student.img_size = 64" in schema_values["student.img_size"]


def test_parse_reads_packaged_presets_by_name_and_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    cfg, args = parse(["--config", "unic_vitb16_in1k", "data.root=/x", "optim.lr=1e-4"], UnicConfig, "", "")
    assert cfg.student.arch == "vit_base_patch16_224" and cfg.optim.lr == 1e-4 and args.config == "unic_vitb16_in1k"
    assert resolve_config_file("udon_uned_vitb16.yaml").endswith(os.path.join("unic", "configs", "udon_uned_vitb16.yaml"))
    with pytest.raises(ConfigError, match=r"config file not found: nope \(packaged presets: demo, "):
        parse(["--config", "nope"], UnicConfig, "", "")
    cfg, args = parse(["optim.lr=1e-4", "--plan"], UnicConfig, "", "", DEMO_CONFIG,
                      flags=lambda p: p.add_argument("--plan", action="store_true"))
    assert args.plan and cfg.optim.lr == 1e-4 and cfg.student.img_size == 32


@pytest.mark.parametrize("typo, hint", [("lr=1e-3", "optim.lr"), ("train.seed=1", "run.seed"),
                                        ("optim.lrr=1", "optim.lr"), ("train.output_dir=o", "run.output_dir"),
                                        ("warmup_epoch=1", "optim.warmup_epochs")])
def test_unknown_keys_get_the_closest_key_including_leaf_names(typo, hint):
    with pytest.raises(ConfigError, match=f"did you mean '{hint}'"):
        load_config(DEMO_CONFIG, [typo])
    assert closest_key("zzzz", ["optim.lr", "run.seed"]) is None


def test_resolved_config_is_written_and_reads_back(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["optim.lr=3e-4"])
    path = write_resolved_config(cfg, str(tmp_path / "out"))
    assert load_config(path).optim.lr == 3e-4
    assert yaml.safe_load(open(path))["run"]["output_dir"] == "output/demo"
    assert not [f for f in os.listdir(tmp_path / "out") if f != "config.yaml"]  # no temporary file left


def test_a_checkpoint_from_before_the_run_group_resumes():
    """Configs saved with train.seed / train.output_dir (before the run group) are read as run.*."""
    cfg = load_config(DEMO_CONFIG, [])
    old = to_plain(cfg)
    old["train"].update({key: old["run"].pop(key) for key in ("seed", "output_dir", "device", "precision")})
    del old["run"]
    assert resume_mismatches(old, cfg) == []
    old["train"]["seed"] = 5
    assert resume_mismatches(old, cfg) == ["run.seed: checkpoint 5, now 0"]


def test_old_style_flags_get_the_key_that_replaced_them():
    from unic.eval.retrieval import RetrievalConfig

    for argv, key in ((["--checkpoint", "x.pth"], "model.source"), (["--visualize", "4"], "retrieval.visualize"),
                      (["--output_dir=o"], "run.output_dir"), (["--data", "uned"], "data.dataset")):
        with pytest.raises(ConfigError, match=rf"^unknown flag {argv[0]}: settings are given as key=value; "
                                              rf"did you mean {key}=<value>\?"):
            parse(argv, RetrievalConfig, "", "")
    with pytest.raises(ConfigError, match=r"^unknown flag --zzz: settings are given as key=value \(see --help\)$"):
        parse(["--zzz"], UnicConfig, "", "")
