"""End-to-end training runs: the demo entry point, exact resume after a kill, 2-process DDP = 1 process."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from tests.conftest import REPO, final_weights, run_entry, tiny_overrides

import unic
from unic.io import load_checkpoint


def _metrics(out_dir, split="train"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_demo_entry_point_end_to_end(tmp_path, demo_root):
    out = tmp_path / "run"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "img/s" in result.stdout and "ETA" in result.stdout
    assert "validation at step" in result.stdout and str(out / "checkpoint.pth") in result.stdout
    for name in ("checkpoint.pth", "student.pth", "config.yaml", "metrics.jsonl", "log.txt"):
        assert (out / name).is_file(), name
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    train = _metrics(out)
    assert train and {"loss", "lr", "wd", "grad_norm", "images_per_s", "data_time_s", "memory_gb"} <= set(train[-1])
    assert any(k.startswith("kept/") for k in train[-1]) and any(k.endswith("/patch") for k in train[-1])
    val = _metrics(out, "val")
    assert val and 0.0 <= val[-1]["knn20_top1"] <= 1.0 and val[-1]["loss"] > 0
    assert val[0]["step"] == 0 and val[-1]["step"] == train[-1]["step"]  # the untrained model is scored too
    # the distillation loss falls (the total also holds the UDON term of whichever domain each step drew)
    assert train[-1]["loss/distill"] < train[0]["loss/distill"]

    # the checkpoint loads weights-only and the student comes back from both files
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["format"] == "unic-train" and ckpt["step"] == len(train) * 2 or ckpt["step"] > 0
    x = torch.randn(2, 3, 32, 32)
    a = unic.load_student(str(out / "checkpoint.pth"))
    b = unic.load_student(str(out / "student.pth"))
    assert not a.training
    torch.testing.assert_close(a.forward_features(x), b.forward_features(x))
    # the exported student loads into plain timm
    plain = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, pretrained_cfg_overlay=dict(file=str(out / "student.pth")),
    ).eval()
    torch.testing.assert_close(plain.forward_features(x), b.forward_features(x))


def test_resume_after_kill_is_exact(tmp_path, demo_root):
    # UNIC + UDON with a stateful margin head and dynamic domain sampling updated every 4 steps: model,
    # optimizer, standardisation, head buffers, sampler and per-domain streams must all come back exactly
    straight = tmp_path / "straight"
    overrides = {"train.validate": False, "loss.drop_prob": 0.5, "student.drop_path": 0.1,
                 "heads.name": "curricularface", "udon.update_every": 4}
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(straight), **overrides)])
    assert result.returncode == 0, result.stderr[-3000:]
    total = load_checkpoint(str(straight / "checkpoint.pth"))["step"]

    killed = tmp_path / "killed"
    args = tiny_overrides(demo_root, str(killed), **overrides, **{"train.save_every": 2, "train.keep_checkpoints": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main_unic.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def reached_half():
        steps = [int(p[-12:-4]) for p in glob.glob(str(killed / "checkpoint_step*.pth"))]
        return steps and max(steps) >= total // 2

    deadline = time.time() + 240
    while not reached_half() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_checkpoint(str(killed / "checkpoint.pth"))["step"]
    assert step_at_kill < total, "the run finished before it could be killed"

    result = run_entry(["main_unic.py", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoint.pth'} at step {step_at_kill}" in result.stdout
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and any(k.endswith("classifiers.shapes.t") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # periodic checkpoints are pruned to keep_checkpoints
    assert len(glob.glob(str(killed / "checkpoint_step*.pth"))) == 2


def test_two_process_ddp_matches_one_process(tmp_path, demo_root):
    # UNIC distillation (with dropping) + UDON heads on the same batches. UDON's relational term is defined
    # over the pairs of the *local* batch (SPEC 6), so it alone depends on the process count: switched off here.
    # AdamW turns summation-order noise in near-zero gradients into update differences of order lr, so the
    # weights are compared after 6 steps at a small lr (the per-step losses are compared at any lr).
    common = {"train.validate": True, "loss.drop_prob": 0.5, "train.log_every": 1, "train.max_steps": 6,
              "udon.relational_weight": 0.0, "optim.lr": 5e-5, "udon.head_lr": 5e-5}
    one = tmp_path / "one"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(one), **common, **{"data.batch_size_per_gpu": 16})])
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(two), **common, **{"data.batch_size_per_gpu": 8})],
                       nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 6
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=1e-6)
        for key in r1:
            if key.startswith("kept/"):
                assert r2[key] == pytest.approx(r1[key], abs=1e-6)
    w1, w2 = final_weights(one), final_weights(two)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-5)


def test_checkpoint_resumes_on_another_number_of_processes(tmp_path, demo_root):
    """Elastic resume: 3 steps on 1 process, continued on 2 torchrun processes at the same global batch. With
    neither stochastic depth nor UDON's local relational term nothing depends on the process count, so the
    continued steps' losses are those of an uninterrupted 1-process run (dynamic domain sampling updated every
    2 steps: its window of losses crosses the resume). A different global batch is still refused, in one line."""
    common = {"data.global_batch": 16, "train.validate": False, "train.log_every": 1, "udon.update_every": 2,
              "udon.relational_weight": 0.0, "optim.lr": 5e-5, "udon.head_lr": 5e-5}
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(straight), **common, **{"train.max_steps": 6})])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(elastic), **common, **{"train.max_steps": 3})])
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(elastic), **common, **{"train.max_steps": 6})],
                       nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resumed from {elastic / 'checkpoint.pth'} at step 3" in result.stdout
    assert "resuming on 2 processes a checkpoint written by 1" in result.stdout + result.stderr
    m1, m2 = _metrics(straight), _metrics(elastic)
    assert [r["step"] for r in m2] == [1, 2, 3, 4, 5, 6]
    for r1, r2 in zip(m1[3:], m2[3:]):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4, abs=1e-6)
        assert r2["loss/udon"] == pytest.approx(r1["loss/udon"], rel=1e-4, abs=1e-6)
    assert load_checkpoint(str(elastic / "checkpoint.pth"))["world_size"] == 2

    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(elastic), **{**common, "data.global_batch": 8})])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "global batch: checkpoint 16, now 8" in errors[0]


def test_exit_under_torchrun_keeps_code_output_and_logs(tmp_path):
    """Entry points under torchrun leave through os._exit (gloo threads can abort a finalising interpreter):
    the exit code, buffered stdout and logging handlers must survive it."""
    log = tmp_path / "run.log"
    code = ("import logging, sys\n"
            "from unic import distributed\n"
            f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
            "logging.getLogger('x').info('logged line')\n"
            "print('printed line'); sys.stderr.write('stderr line')\n"
            "distributed.exit_process(3)\n"
            "print('never')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "RANK": "0", "WORLD_SIZE": "1"})
    assert result.returncode == 3
    assert result.stdout == "printed line\n" and result.stderr == "stderr line"
    assert "logged line" in log.read_text()


def test_student_normalisation_reaches_transforms_checkpoints_and_encoders(tmp_path, demo_root):
    """student.mean/std (e.g. CLIP's for a CLIP-initialised student) is what the training and evaluation
    transforms apply and what every saved file hands back to load_encoder and unic.load_student."""
    from teachers.registry import CLIP_MEAN, CLIP_STD
    from torchvision.transforms import Normalize
    from unic.config import load_config
    from unic.eval.encoders import load_encoder
    from unic.train.build import build_datasets

    clip = {"student.mean": list(CLIP_MEAN), "student.std": list(CLIP_STD)}
    cfg = load_config(None, tiny_overrides(demo_root, str(tmp_path / "cfg"), **{k: str(v) for k, v in clip.items()}))
    for dataset in build_datasets(cfg, udon=True):
        norm = [t for t in dataset.transform.transforms if isinstance(t, Normalize)]
        assert len(norm) == 1 and tuple(norm[0].mean) == CLIP_MEAN and tuple(norm[0].std) == CLIP_STD

    out = tmp_path / "run"
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **{"train.max_steps": 2, **clip})])
    assert result.returncode == 0, result.stderr[-3000:]
    for name, embedding in (("checkpoint.pth", "backbone"), ("checkpoint.pth", "universal"),
                            ("student.pth", "auto"), ("universal.pth", "auto")):
        enc = load_encoder(str(out / name), embedding)
        assert enc.mean == CLIP_MEAN and enc.std == CLIP_STD, (name, embedding)
    model = unic.load_student(str(out / "student.pth"))
    assert model.pretrained_cfg["mean"] == CLIP_MEAN and model.pretrained_cfg["input_size"] == (3, 32, 32)
    # files without the field (written before it existed) were trained with ImageNet's normalisation
    state = load_checkpoint(str(out / "student.pth"))
    del state["mean"], state["std"]
    torch.save(state, tmp_path / "old.pth")
    assert load_encoder(str(tmp_path / "old.pth")).mean == (0.485, 0.456, 0.406)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile (inductor) on CPU needs a C++ compiler")
def test_compiled_student_trains_like_the_eager_one(tmp_path, demo_root):
    """train.compile=true (inductor on CPU): same per-step losses as eager, same checkpoint keys and files.
    With a compiler that does not work (CXX names no program) the run falls back to eager and says so."""
    common = {"train.max_steps": 4, "train.log_every": 1, "train.validate": False}
    runs, logs = {}, {}
    for mode, env in (("false", None), ("true", None), ("broken", {"CXX": "/nonexistent/c++"})):
        out = tmp_path / f"compile_{mode}"
        flag = "false" if mode == "false" else "true"
        result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **common, **{"train.compile": flag})],
                           timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[mode], logs[mode] = out, result.stdout + result.stderr
    assert "every compiled part of the model runs compiled" in logs["true"]
    assert "torch.compile could not compile the trained model" in logs["broken"] and "eagerly" in logs["broken"]
    assert "torch.compile could not compile" not in logs["true"]
    eager, compiled = _metrics(runs["false"]), _metrics(runs["true"])
    assert len(eager) == len(compiled) == 4
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert [m["loss"] for m in _metrics(runs["broken"])] == pytest.approx([m["loss"] for m in eager], rel=1e-6)
    w_eager, w_compiled = final_weights(runs["false"]), final_weights(runs["true"])
    assert w_eager.keys() == w_compiled.keys()
    a, b = unic.load_student(str(runs["true"] / "student.pth")), unic.load_student(str(runs["false"] / "student.pth"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.forward_features(x), b.forward_features(x), rtol=1e-2, atol=1e-3)


def test_unic_recipe_switches_under_two_process_ddp(tmp_path, demo_root):
    """UNIC's raw last tap (final norm untrained and outside DDP's reducer), per-parameter clipping and a fixed
    global batch, as the UNIC presets set them, train under torchrun; the run logs and writes its plan."""
    out = tmp_path / "raw"
    extra = {"ladder.last_tap": "raw", "udon.enabled": "false", "data.global_batch": 16, "optim.clip_grad": 0.05,
             "optim.clip_mode": "per_param", "train.max_steps": 3, "train.validate": "false"}
    result = run_entry(["main_unic.py", *tiny_overrides(demo_root, str(out), **extra)], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "plan: batch    global 16 = 2 x 8 per GPU" in result.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["schedule"]["batch_per_gpu"] == 8 and plan["ladder"]["last_tap"] == "raw"
    model = load_checkpoint(str(out / "checkpoint.pth"))["model"]
    assert torch.equal(model["backbone.norm.weight"], torch.ones(32))  # never trained: identity affine
    assert torch.equal(model["backbone.norm.bias"], torch.zeros(32))
    assert not torch.equal(model["backbone.blocks.1.mlp.fc2.bias"], torch.zeros(32))  # the rest trained


def test_per_parameter_clipping_is_uniCs_rule():
    from unic.train.optim import clip_gradients

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p, scale in zip(params, (0.01, 1.0, 10.0)):
        p.grad = torch.randn_like(p) * scale
    expected, norms = [], []
    for p in params:  # UNIC's utils.clip_gradients, per parameter
        norm = p.grad.norm(2)
        norms.append(norm)
        coef = 0.5 / (norm + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    total = clip_gradients(params, 0.5, "per_param")
    torch.testing.assert_close(total, torch.stack(norms).norm())
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert params[0].grad.norm() < 0.5 and params[2].grad.norm() == pytest.approx(0.5, rel=1e-5)
    # global: one norm for all
    for p in params:
        p.grad = torch.ones_like(p)
    clip_gradients(params, 1.0, "global")
    assert torch.stack([p.grad.norm() for p in params]).norm() == pytest.approx(1.0, rel=1e-5)
