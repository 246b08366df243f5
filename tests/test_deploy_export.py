"""python -m unic.export: TorchScript and ONNX exports that take raw images, checked in a fresh process against
load_encoder + the evaluation transform (PIL / torchvision) on image files, and the errors a user can make."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from tests.conftest import randomise_adaptors
from unic.data.folders import load_image
from unic.data.transforms import eval_transform, uned_eval_transform
from unic.eval.encoders import load_encoder
from unic.export import Preprocess, main, plan_preprocessing
from unic.io import save_checkpoint
from unic.models.export import student_export, universal_export
from unic.models.ladder import Ladder
from unic.models.student import build_student
from unic.train.standardize import TeacherStandardizer

ARCH, KWARGS = "vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's: the export must carry the file's own
UNIVERSAL_DIM, TEACHER, TEACHER_DIM = 24, "toy_a", 40
INPUT_HW = (40, 52)  # the deployed input: resized (short side 37 or 32) and centre-cropped to the model's 32 px
TOLERANCE = 1e-4  # max |export - reference| over L2-normalised descriptor entries (what unic.export enforces)
CASES = {  # name: (embedding, input dtype, preprocessing, formats)
    "backbone-uint8": ("backbone", "uint8", "center_crop", ["torchscript", "onnx"]),
    "universal-float": ("universal", "float", "uned", ["torchscript", "onnx"]),
    "backbone-float": ("backbone", "float", "center_crop", ["torchscript"]),
    "universal-uint8": ("universal", "uint8", "uned", ["torchscript"]),
    "adaptor-uint8": (f"adaptor:{TEACHER}", "uint8", "center_crop", ["torchscript", "onnx"]),
}
# loads each export with nothing but torch / onnxruntime (no unic) and writes its descriptors of the image files
FRESH_PROCESS = r"""
import json, sys
import numpy as np, torch
from PIL import Image
jobs, out = json.loads(sys.argv[1]), {}
for job in jobs:
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in job["images"]])).permute(0, 3, 1, 2)
    x = x.contiguous() if job["dtype"] == "uint8" else x.float() / 255.0
    if job["format"] == "torchscript":
        model = torch.jit.load(job["file"])
        with torch.no_grad():
            run = lambda t: model(t).numpy()
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(job["file"], providers=["CPUExecutionProvider"])
        run = lambda t: session.run(["descriptors"], {"images": t.numpy()})[0]
    out[job["key"]] = run(x)
    out[job["key"] + ":single"] = run(x[:1])
assert not any(name == "unic" or name.startswith("unic.") for name in sys.modules), "the export imported unic"
np.savez(sys.argv[2], **out)
"""


def _cfg():
    return OmegaConf.create({
        "student": {"arch": ARCH, "kwargs": KWARGS, "img_size": 32, "mean": MEAN, "std": STD},
        "ladder": {"blocks": None, "last_tap": "normed", "hidden_dim": 16, "last_hidden_dim": 48},
        "teachers": {"names": [TEACHER]},
    })


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """universal.pth of a tiny random student: backbone, universal projection, two domain heads, and (once
    exports carry them, unic.models.export) the adaptor to one teacher; every weight random, biases too."""
    torch.manual_seed(0)
    cfg = _cfg()
    backbone = build_student(ARCH, 32, 0.0, dict(KWARGS)).eval()
    heads = {"cars": nn.Linear(32, 16), "food": nn.Linear(32, 16)}
    ladder = Ladder(32, 2, {TEACHER: TEACHER_DIM}, None, 16, 48)
    standardizer = TeacherStandardizer({TEACHER: TEACHER_DIM})
    randomise_adaptors(ladder, standardizer)
    path = str(tmp_path_factory.mktemp("model") / "universal.pth")
    save_checkpoint(universal_export(backbone, cfg, nn.Linear(32, UNIVERSAL_DIM), heads, list(heads), ladder,
                                     standardizer), path)
    return path


def write_images(folder, hw=INPUT_HW, count: int = 3, seed: int = 0) -> list[str]:
    """PNG files of the deployed input size: noise, a smooth colour field with noise, a flat colour with noise."""
    rng = np.random.RandomState(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = np.stack([255 * yy, 255 * xx, 128 + 100 * np.sin(6 * xx * yy)], -1)
    pixels = [rng.randint(0, 256, (h, w, 3)), smooth + rng.normal(0, 10, (h, w, 3)),
              np.full((h, w, 3), (200, 60, 30)) + rng.normal(0, 25, (h, w, 3))][:count]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(os.path.join(folder, f"{i}.png"))
        Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def reference(source: str, embedding: str, preprocess: str, paths: list[str]) -> np.ndarray:
    """What an evaluation computes for these files: load_encoder, the evaluation transform on the decoded
    image, L2 normalisation (independent of unic.export)."""
    encoder = load_encoder(source, embedding)
    if preprocess == "uned":
        transform = uned_eval_transform(32, encoder.mean, encoder.std)
    else:
        transform = eval_transform(32, 0.875, encoder.mean, encoder.std)
    with torch.no_grad():
        return F.normalize(encoder(torch.stack([transform(load_image(p)) for p in paths])), dim=-1).numpy()


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory) -> dict:
    """Every case exported through main(), then loaded and run in one fresh process on the image files."""
    root = tmp_path_factory.mktemp("exports")
    images = write_images(str(root / "images"))
    done, jobs = {}, []
    for name, (embedding, dtype, preprocess, formats) in CASES.items():
        out = str(root / name)
        code = main([f"model.source={source}", f"model.embedding={embedding}", f"export.input_dtype={dtype}",
                     f"export.preprocess={preprocess}", f"export.input_size=[{INPUT_HW[0]},{INPUT_HW[1]}]",
                     f"export.formats=[{','.join(formats)}]", f"run.output_dir={out}"])
        assert code == 0, name
        with open(os.path.join(out, "card.json")) as f:
            done[name] = {"dir": out, "card": json.load(f), "formats": formats}
        jobs += [{"key": f"{name}:{fmt}", "format": fmt, "dtype": dtype, "images": images,
                  "file": os.path.join(out, done[name]["card"]["files"][fmt][0])} for fmt in formats]
    result_file = str(root / "fresh.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs), result_file], cwd=str(root),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(result_file) as archive:
        fresh = {key: archive[key] for key in archive.files}
    return {"cases": done, "fresh": fresh, "images": images}


def _check_case(exports, source, name) -> None:
    embedding, dtype, preprocess, _ = CASES[name]
    case = exports["cases"][name]
    expected = reference(source, embedding, preprocess, exports["images"])
    dim = {"backbone": 32, "universal": UNIVERSAL_DIM}.get(embedding, TEACHER_DIM)
    assert expected.shape == (3, dim)
    for fmt in case["formats"]:
        got = exports["fresh"][f"{name}:{fmt}"]
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert np.abs(got - expected).max() < TOLERANCE, (name, fmt, np.abs(got - expected).max())
        assert np.abs(exports["fresh"][f"{name}:{fmt}:single"] - expected[:1]).max() < TOLERANCE  # any batch size
    card = case["card"]
    assert (card["embedding"], card["dim"], card["input"]["dtype"]) == (embedding, dim, dtype)
    assert card["input"]["shape"] == ["batch", 3, *INPUT_HW] and card["output"]["shape"] == ["batch", dim]
    assert card["mean"] == pytest.approx(MEAN) and card["std"] == pytest.approx(STD)
    assert card["preprocess"]["mode"] == preprocess and card["preprocess"]["resized"]
    for fmt in case["formats"]:
        assert card["parity"][fmt]["max_abs_diff"] < TOLERANCE and card["export_seconds"][fmt] > 0
        assert all(os.path.isfile(os.path.join(case["dir"], f)) for f in card["files"][fmt])
    assert {"card.md", "config.yaml"} <= set(os.listdir(case["dir"]))
    assert not [f for f in os.listdir(case["dir"]) if f.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("adaptor")])
def test_exports_match_load_encoder_in_a_fresh_process(exports, source, name):
    # onnx, onnxscript and onnxruntime come with the dev extras: a missing one is an error here, not a skip
    _check_case(exports, source, name)


def test_adaptor_export_matches_load_encoder(exports, source):
    _check_case(exports, source, "adaptor-uint8")
    adaptor = load_encoder(source, f"adaptor:{TEACHER}").adaptor  # the descriptor is the adaptor's teacher-space cls
    x = torch.stack([eval_transform(32, 0.875, MEAN, STD)(load_image(p)) for p in exports["images"]])
    with torch.no_grad():
        expected = F.normalize(adaptor(x)["cls"], dim=-1).numpy()
    assert np.abs(exports["fresh"]["adaptor-uint8:torchscript"] - expected).max() < TOLERANCE


@pytest.mark.parametrize("mode", ["center_crop", "uned"])
@pytest.mark.parametrize("hw", [(40, 52), (53, 41), (20, 30), (37, 37), (32, 33)])
def test_preprocessing_reproduces_the_evaluation_transform(tmp_path, mode, hw):
    """Pixel by pixel against the transform on decoded files: shrinking, enlarging, no-op, odd crop offsets.
    PIL resamples in fixed point, so a centre-crop pixel may be off by one grey level (in normalised units
    1 / 255 / std), in few pixels; UDON's float bilinear resize is the same arithmetic."""
    paths = write_images(str(tmp_path), hw)
    plan = plan_preprocessing(mode, hw, 32, 0.875, MEAN, STD, "uint8")
    ours = Preprocess(plan)(torch.from_numpy(np.stack([np.asarray(load_image(p)) for p in paths])).permute(0, 3, 1, 2))
    transform = uned_eval_transform(32, MEAN, STD) if mode == "uned" else eval_transform(32, 0.875, MEAN, STD)
    theirs = torch.stack([transform(load_image(p)) for p in paths])
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    levels_diff = ((ours - theirs) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()
    if mode == "uned":
        assert levels_diff.max() < 1e-3
    else:
        assert levels_diff.max() < 1 + 1e-3 and (levels_diff > 0.5).float().mean() < 0.02


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_user_errors_are_one_line(capsys, source, tmp_path):
    student = str(tmp_path / "student.pth")
    save_checkpoint(student_export(build_student(ARCH, 32, 0.0, dict(KWARGS)), _cfg()), student)
    out = f"run.output_dir={tmp_path / 'out'}"
    assert "did you mean model.source=" in _error(capsys, ["--checkpoint", source, "--embedding", "universal"])
    assert "did you mean model.embedding=" in _error(capsys, [f"model.source={source}", "--embedding", "universal"])
    assert "no such file" in _error(capsys, [f"model.source={tmp_path / 'missing.pth'}", out])
    assert "model.source is required" in _error(capsys, [out])
    err = _error(capsys, [f"model.source={source}", "model.embedding=bogus", out])
    assert "model.embedding" in err and "adaptor:<teacher>" in err
    assert "oracle" in _error(capsys, [f"model.source={source}", "model.embedding=oracle", out])
    assert "no universal embedding" in _error(capsys, [f"model.source={student}", "model.embedding=universal", out])
    assert "no teacher head for domain 'zzz'" in _error(capsys, [f"model.source={source}", "model.embedding=domain:zzz", out])
    assert "export.formats" in _error(capsys, [f"model.source={source}", "export.formats=[tflite]", out])
    assert "export.opset" in _error(capsys, [f"model.source={source}", "export.opset=13", out])
    err = _error(capsys, [f"model.source={source}", "model.embedding=universal", "export.dim=64", out])
    assert f"dim {UNIVERSAL_DIM}" in err and "export.dim=64" in err
    assert not os.path.exists(tmp_path / "out" / "encoder.torchscript.pt")


def test_missing_onnx_packages_name_the_extra(capsys, source, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it gives: ImportError
    err = _error(capsys, [f"model.source={source}", f"run.output_dir={tmp_path}"])
    assert "onnxruntime" in err and "unic[export]" in err and "export.formats=[torchscript]" in err


def test_parity_failure_writes_nothing(capsys, source, tmp_path):
    """A resize that PIL does in fixed point gives a small, nonzero difference: above a tolerance set below it,
    the export fails and leaves no model file."""
    err = _error(capsys, [f"model.source={source}", "model.embedding=backbone", "export.formats=[torchscript]",
                          f"export.input_size=[{INPUT_HW[0]},{INPUT_HW[1]}]", "export.tolerance=1e-12",
                          f"run.output_dir={tmp_path}"])
    assert "parity check failed" in err and "torchscript" in err
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("encoder", "."))]
