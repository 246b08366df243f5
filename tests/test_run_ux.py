"""What a user meets on the way through a training run (issue 15): provenance across resumes, Ctrl-C, features
that turn themselves off, the teacher preflight, placeholder data roots, the launch script's paths, honest
start-up lines, logs without repeated steps after a resume, and the end-of-run summary and files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, run_entry, tiny_overrides
from unic.io import load_checkpoint

FAST = {"train.validate": "false", "train.log_every": 1}


def _train_steps(out_dir, split="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if r["split"] == split]


def _run(demo_root, out, nproc=1, env=None, **extra):
    return run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **extra)], nproc=nproc, env=env)


def test_resume_keeps_the_config_history_and_a_finished_run_says_so(tmp_path, demo_root):
    out = tmp_path / "run"
    result = _run(demo_root, out, **{"train.max_steps": 4, "train.validate_first": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    original = (out / "config.yaml").read_text()

    # a resume with changed settings: config.yaml stays, config.resume-1.yaml holds the new ones, the log the diff
    result = _run(demo_root, out, **{"train.max_steps": 8, "train.validate_first": "true", "optim.lr": "1e-3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming with changed settings" in result.stdout
    assert "optim.lr 0.002 -> 0.001; train.max_steps 4 -> 8" in result.stdout
    assert (out / "config.yaml").read_text() == original
    resumed = yaml.safe_load((out / "config.resume-1.yaml").read_text())
    assert resumed["optim"]["lr"] == 1e-3 and resumed["train"]["max_steps"] == 8
    # the checkpoint: the first segment's config and the history of the later ones
    state = load_checkpoint(str(out / "checkpoint.pth"))
    assert state["step"] == 8 and state["config"]["optim"]["lr"] == 2e-3
    assert [(h["step"], h["changes"]) for h in state["config_history"]] == [
        (4, {"optim.lr": [2e-3, 1e-3], "train.max_steps": [4, 8]})]

    # the end of the run: summary lines, results.json over both segments, the curves
    assert "finished    8 steps" in result.stdout and "(4 trained now" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8 and results["trained_steps"] == 4 and results["images_per_s"] > 0
    assert results["final_train"]["step"] == 8 and results["best_val"]["knn20_top1"]["step"] == 0
    assert results["files"]["config"] == [str(out / "config.yaml"), str(out / "config.resume-1.yaml")]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _train_steps(out) == [2, 4, 6, 8]  # logged every 2 steps, each once

    # a finished run re-launched with other settings: one line, nothing trained or rewritten
    mtime = os.path.getmtime(out / "checkpoint.pth")
    result = _run(demo_root, out, **{"train.max_steps": 8, "train.validate_first": "true", "optim.lr": "1e-4"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == (
        f"{out} holds a finished run (step 8 of 8); nothing to train. Settings differ from it: optim.lr 0.001 -> "
        "0.0001. Use another run.output_dir or train.resume=false")
    assert os.path.getmtime(out / "checkpoint.pth") == mtime and not (out / "config.resume-2.yaml").exists()

    # stopped between its last step and its exports (results.json and the exports missing): the same command
    # finishes them instead of calling the run finished
    for name in ("results.json", "student.pth", "universal.pth", "curves.png"):
        os.remove(out / name)
    result = _run(demo_root, out, **{"train.max_steps": 8, "train.validate_first": "true", "optim.lr": "1e-3"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished    8 steps" in result.stdout and "(0 trained now" in result.stdout
    assert all((out / name).is_file() for name in ("results.json", "student.pth", "universal.pth", "curves.png"))
    assert json.loads((out / "results.json").read_text())["steps"] == 8


def _wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if _train_steps(out) and _train_steps(out)[-1] >= step:
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def _start(demo_root, out, nproc=1, **extra):
    args = tiny_overrides(demo_root, str(out), **{**FAST, "optim.epochs": 40, **extra})
    cmd = [sys.executable, "main_unic.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path, demo_root):
    out = tmp_path / "run"
    proc = _start(demo_root, out)
    _wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped by Ctrl-C at step "), stderr
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert f"checkpoint saved to {out / 'checkpoint.pth'}" in lines[0]
    assert load_checkpoint(str(out / "checkpoint.pth"))["step"] == step >= 3
    assert f"Ctrl-C: saving a checkpoint at step {step} on every rank" in stdout



def test_second_ctrl_c_quits_at_once_and_ctrl_c_before_training_just_quits(tmp_path, demo_root, monkeypatch, capfd):
    from tests.test_chaos import _tiny_trainer

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    trainer = _tiny_trainer(tmp_path, demo_root)
    try:
        with pytest.raises(KeyboardInterrupt):  # before the step loop: nothing to finish or save
            os.kill(os.getpid(), signal.SIGINT)
        trainer._training = True  # inside the step loop
        monkeypatch.setattr(os, "_exit", fake_exit)
        os.kill(os.getpid(), signal.SIGINT)
        # pending until the next step's all-reduce shares it: a rank never stops on its own signal alone
        assert trainer.stop_code == 2 and not trainer.stop_agreed and trainer._sigint_seen
        with pytest.raises(Exited, match="130"):
            os.kill(os.getpid(), signal.SIGINT)
        assert "second Ctrl-C: stopping now, without saving" in capfd.readouterr().err
    finally:
        trainer._training = False
        trainer.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_ctrl_c_under_torchrun_saves_every_rank_at_one_step(tmp_path, demo_root):
    """Each of the 2 ranks gets SIGINT (as torchrun forwards it); both stop after the same step and save once."""
    from tests.conftest import free_port

    out = tmp_path / "run"
    args = tiny_overrides(demo_root, str(out), **{**FAST, "optim.epochs": 40, "data.batch_size_per_gpu": 8})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "main_unic.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    try:
        _wait_for_step(out, 3, proc)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGINT)  # one rank: the stop reaches the other through the step's all-reduce
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hang: leave no process behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "stopped by Ctrl-C at step" in lines[0], stderr[-3000:]
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert load_checkpoint(str(out / "checkpoint.pth"))["step"] == step
    assert "(exitcode: 130)" in stderr  # each rank left with Ctrl-C's code (torchrun then reports a failure)


def test_logs_hold_each_step_once_after_a_resume(tmp_path, demo_root):
    """Killed at step 7 with its last checkpoint at step 4: the resumed run trains 5-7 again, and TensorBoard
    and metrics.jsonl end with each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = {**FAST, "train.max_steps": 10, "train.save_every": 4}
    killed = _run(demo_root, out, env={"UNIC_FAULTS": "kill:step=7"}, **extra)
    assert killed.returncode == -signal.SIGKILL and _train_steps(out) == list(range(1, 8))
    result = _run(demo_root, out, **extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 4" in result.stdout
    assert _train_steps(out) == list(range(1, 11))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))


def test_metrics_writer_purges_what_a_resume_trains_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from unic.train.logger import MetricsWriter

    first = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 7):
        first.write(step, {"loss": float(step)})
    first.close()
    second = MetricsWriter(str(tmp_path), enabled=True, purge_from=5)
    for step in range(5, 9):
        second.write(step, {"loss": 10.0 + step})
    second.close()
    assert _train_steps(tmp_path) == list(range(1, 9))
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(s, float(s)) for s in range(1, 5)] + [(s, 10.0 + s) for s in range(5, 9)]


def test_features_that_turn_off_are_announced_and_planned(tmp_path, demo_root, capsys):
    from main_unic import main

    out = tmp_path / "run"
    result = _run(demo_root, out, **{"train.max_steps": 2, "data.val_split": "nosuch"})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if "WARNING" in line and "turned off:" in line]
    assert len(warnings) == 1 and "validation (loss, kNN top-1, universal R@1) and its kNN bank" in warnings[0]
    assert "missing split 'nosuch'" in warnings[0]
    assert "plan: skipped  validation" in result.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert [s["feature"] for s in plan["skipped"]] == ["validation (loss, kNN top-1, universal R@1) and its kNN bank"]
    assert "validation at step" not in result.stdout

    # --plan says the same before any run
    code = main(["--plan", *tiny_overrides(demo_root, str(tmp_path / "plan"), **{"data.val_split": "nosuch"})])
    assert code == 0
    assert "skipped  validation (loss, kNN top-1, universal R@1) and its kNN bank" in capsys.readouterr().out


def test_teacher_preflight_reports_every_missing_file_at_once(tmp_path, demo_root, capsys):
    from main_unic import main

    out = tmp_path / "run"
    missing = {"teachers.weights.toy_vit_p16_d96": "/nowhere/a.pth", "teachers.weights.toy_vit_p14_d48": "/nowhere/b.pth"}
    assert main(tiny_overrides(demo_root, str(out), **missing)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 teachers lack weights") and "/nowhere/a.pth" in err and "/nowhere/b.pth" in err
    assert not out.exists()  # found before any model or file was made
    # the plan still works: it reports the files as missing
    assert main(["--plan", *tiny_overrides(demo_root, str(out), **missing)]) == 0
    text = capsys.readouterr().out
    assert text.count("(MISSING)") == 2 and "before training: 2 teachers lack weights" in text


def test_a_preset_without_data_root_asks_for_it(tmp_path, capsys):
    from main_unic import main

    assert main(["--config", "unic_vitb16_in1k", f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: set data.root=<your ImageNet folder> (the preset's data.root /path/to/imagenet is a "
                   "placeholder)")
    # the plan works without the data: it assumes ImageNet's image count
    assert main(["--config", "unic_vitb16_in1k", "--plan", f"run.output_dir={tmp_path / 'plan'}"]) == 0
    assert "1281167 train images (assumed" in capsys.readouterr().out


def test_start_up_lines_name_the_real_model(tmp_path, demo_root):
    result = _run(demo_root, tmp_path / "run", **{"train.max_steps": 2, **FAST})
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("plan: student  ViT width 32, depth 2, heads 2, patch 8, 32 px (17 tokens), 32.2k params (32.2k trained); "
            "timm vit_tiny_patch16_224 with patch_size=8, embed_dim=32, depth=2, num_heads=2") in result.stdout
    assert "UDON heads: a normface classifier per domain, sampled dynamic; weights + AdamW state shapes" in result.stdout
    progress = [line for line in result.stdout.splitlines() if " step 2/2 " in line]
    assert progress and "(100%, epoch 0)" in progress[0] and "img/s" in progress[0] and "ETA 0:00:00" in progress[0]


def test_launch_script_resolves_paths_against_the_callers_folder(tmp_path, demo_root):
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    env = {**os.environ, "N_GPUS": "1", "CONFIG": "demo", "OUTPUT_DIR": "out", "OMP_NUM_THREADS": "1"}
    root = os.path.relpath(demo_root, caller)
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "train_unic.sh"), "--plan", f"data.root={root}"],
                            cwd=caller, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    plan = json.loads((caller / "out" / "plan.json").read_text())
    assert plan["schedule"]["train_images_source"] == "data"
