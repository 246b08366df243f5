"""The training benchmark (unic.train.bench / scripts/bench_train.py) on the tiny config."""

import glob
import json
import os
import tempfile

from tests.conftest import tiny_overrides
from unic.train.bench import main


def test_bench_prints_figures_and_leaves_no_folder(demo_root, tmp_path, capsys):
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "unic-bench-*")))
    overrides = [o for o in tiny_overrides(demo_root, str(tmp_path / "ignored")) if not o.startswith("run.output_dir")]
    assert main(["--warmup", "1", "--steps", "2", *overrides]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.rindex("\n{\n") + 1:])  # the JSON object after the log lines
    assert result["steps_timed"] == 2 and result["images_per_s"] > 0 and result["device"].startswith("cpu")
    assert result["flops_per_step_per_device"] > 0 and result["plan_flops_per_step_per_device"] > 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "unic-bench-*"))) == before  # its folder is gone
    assert main(["--steps", "0", *overrides]) == 2
    assert "--steps >= 1" in capsys.readouterr().err


def test_bench_baseline_measures_the_plain_path_beside_the_fast_one(demo_root, tmp_path, capsys):
    overrides = [o for o in tiny_overrides(demo_root, str(tmp_path / "ignored")) if not o.startswith("run.output_dir")]
    assert main(["--warmup", "0", "--steps", "1", "--baseline", *overrides]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.rindex("\n{\n") + 1:])
    fast, plain = result["fast"], result["baseline"]
    assert fast["images_per_s"] > 0 and plain["images_per_s"] > 0
    assert result["speedup"] == fast["images_per_s"] / plain["images_per_s"]
    assert fast["flops_per_step_per_device"] == plain["flops_per_step_per_device"]  # the same math
    assert any("Ladder.batched" in item for item in result["baseline_off"])


def test_bench_data_only_times_the_loader(demo_root, tmp_path, capsys):
    overrides = [o for o in tiny_overrides(demo_root, str(tmp_path / "ignored")) if not o.startswith("run.output_dir")]
    assert main(["--warmup", "1", "--steps", "3", "--data-only", *overrides]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.rindex("\n{\n") + 1:])
    assert result["steps_timed"] == 3 and result["loader_images_per_s"] > 0 and result["batch_per_device"] == 16
    assert "step_time_s" not in result  # no training step was run
    assert main(["--data-only", "--baseline", *overrides]) == 2
