"""ADE20K linear probe end to end: eval_dense/eval_semseg.py on a generated ADE20K-layout set (1 and 2
processes), its configuration (schedules, overrides, checks, --help), the units of its log and results, the
frozen backbone, padding, the loss and the user errors. The mmseg-equivalent parts (transforms,
poly schedule, confusion matrix, sliding windows) are tested in test_semseg_parts.py."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from eval_dense import eval_semseg
from tests.conftest import run_entry
from tests.test_eval_transfer import TINY_VIT, write_tiny_student
from unic.config import ConfigError, load_config
from unic.eval.encoders import load_encoder
from unic.eval.semseg import (
    ADE20KDataset,
    FrozenPatchBackbone,
    LinearSegHead,
    SegTrainTransform,
    center_pad,
    infinite_batches,
    segment,
    segmentation_loss,
    slide_inference,
    train_linear_head,
    uncenter_pad,
)
from unic.eval.semseg_run import SCHEDULES, SemsegConfig, default_output_dir, resolve

NUM_CLASSES = 4
QUADRANT_COLORS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])


def write_ade20k_quadrants(root, split: str, num_images: int, size_hw=(48, 64), seed: int = 0) -> None:
    """ADEChallengeData2016 layout: classes 1..4 in the four quadrants (mirrored on odd images), a vertical band
    of 0 (unlabelled) in the middle; each class has its own colour plus noise, so a linear probe can learn it."""
    rng = np.random.RandomState(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    height, width = size_hw
    for i in range(num_images):
        label = np.zeros(size_hw, dtype=np.uint8)
        label[: height // 2, : width // 2], label[: height // 2, width // 2:] = 1, 2
        label[height // 2:, : width // 2], label[height // 2:, width // 2:] = 3, 4
        if i % 2:
            label = np.ascontiguousarray(label[:, ::-1])
        label[:, width // 2 - 2: width // 2 + 2] = 0
        image = QUADRANT_COLORS[np.clip(label.astype(int) - 1, 0, 3)] + rng.randint(-30, 31, (*size_hw, 3))
        image[label == 0] = 128
        name = f"ADE_{split}_{i:08d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{name}.jpg")
        Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")


def make_ade20k(tmp_path_factory, name: str, num_train: int):
    root = tmp_path_factory.mktemp(name)
    write_ade20k_quadrants(root, "training", num_train, seed=0)
    write_ade20k_quadrants(root, "validation", 2, seed=1)
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade20k(tmp_path_factory, "ADEChallengeData2016", 4)


@pytest.fixture(scope="module")
def student4(tmp_path_factory) -> str:
    """Depth 4, so semseg.layers=last4 is possible."""
    return write_tiny_student(tmp_path_factory.mktemp("model") / "student.pth", depth=4)


def tiny_args(ade, student, output_dir, *extra) -> list[str]:
    return [f"data.root={ade}", f"model.source={student}", f"run.output_dir={output_dir}",
            f"data.num_classes={NUM_CLASSES}", "semseg.iterations=24", "data.global_batch=4", "semseg.crop_size=32",
            "semseg.stride=21", "semseg.scale=[128,32]", "semseg.warmup_iters=4", "semseg.lr=0.01",
            "data.num_workers=0", "semseg.log_every=8", *extra]


def probe_of(*overrides: str, world_size: int = 1):
    """The resolved settings of a command line (model.source and data.root need not exist for timm:)."""
    return resolve(load_config(None, ["model.source=timm:vit_tiny_patch16_224", "data.root=d", *overrides],
                               SemsegConfig), world_size)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


def test_eval_semseg_end_to_end(ade, student4, tmp_path, capsys):
    out = tmp_path / "semseg"
    assert eval_semseg.main(tiny_args(ade, student4, out, "semseg.layers=last4", "semseg.visualize=2")) == 0

    results = json.loads((out / "results.json").read_text())
    assert {"mIoU", "aAcc", "mAcc", "per_class", "iterations", "layers", "head"} <= set(results)
    assert results["iterations"] == 24 and results["layers"] == "last4" and results["num_validation_images"] == 2
    assert list(results["per_class"]) == [f"class_{i}" for i in range(NUM_CLASSES)]
    assert all(set(v) == {"IoU", "Acc"} for v in results["per_class"].values())
    ious = [v["IoU"] for v in results["per_class"].values()]
    assert results["mIoU"] == pytest.approx(np.mean(ious))
    assert results["mIoU"] > 0.5  # colours make the quadrants linearly separable: the probe really learns
    assert 0.0 <= results["aAcc"] <= 1.0

    # One unit in each place: results.json holds fractions and says so, the log prints percentages with a % sign.
    assert results["unit"] == "fraction"
    assert results["num_workers"] == 0  # the loader workers used (data.num_workers, capped by the CPU count)
    log = (out / "log.txt").read_text()
    assert f"last4: mIoU {100 * results['mIoU']:.2f} %, aAcc {100 * results['aAcc']:.2f} %, mAcc " in log
    # The resolved configuration lies next to the results and reads back as a config file.
    saved = load_config(str(out / "config.yaml"), [], SemsegConfig)
    assert saved.run.output_dir == str(out) and saved.semseg.layers == "last4" and saved.semseg.iterations == 24

    head = torch.load(out / "head.pth", weights_only=True)
    assert head["format"] == "unic-semseg-linear-head" and head["iteration"] == 24
    assert head["in_dim"] == 4 * 32 and head["num_last_blocks"] == 4 and head["num_classes"] == NUM_CLASSES
    assert head["state_dict"]["conv.weight"].shape == (NUM_CLASSES, 128, 1, 1)

    assert len(results["visualizations"]) == 2
    with Image.open(results["visualizations"][0]) as png:
        assert png.size == (3 * 64 + 2 * 4, 48)  # image | ground truth | prediction at annotation size
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "train"] == [8, 16, 24]
    assert lines[-1]["split"] == "val" and lines[-1]["mIoU"] == pytest.approx(results["mIoU"])

    # Evaluating the saved head again gives the same numbers (inference is deterministic).
    reeval = tmp_path / "reeval"
    assert eval_semseg.main(tiny_args(ade, student4, reeval, "semseg.layers=last4",
                                      f"semseg.load_head={out / 'head.pth'}")) == 0
    again = json.loads((reeval / "results_eval.json").read_text())
    assert again["mIoU"] == pytest.approx(results["mIoU"], abs=1e-12) and again["iterations"] == 24
    assert not (reeval / "results.json").exists() and (reeval / "eval_config.yaml").is_file()

    # A head of other features (last4) cannot score the last block's alone: one line, exit 2.
    mismatch = tiny_args(ade, student4, tmp_path / "mismatch", f"semseg.load_head={out / 'head.pth'}")
    assert eval_semseg.main(mismatch) == 2
    assert "maps 128 features to 4 classes" in capsys.readouterr().err


def test_eval_semseg_two_processes(ade, student4, tmp_path):
    """torchrun (gloo): DDP head, sharded evaluation, all-reduced confusion matrix. Re-scoring the head it saved
    in one process must give exactly the 2-process metrics."""
    out = tmp_path / "ddp"
    result = run_entry(["eval_dense/eval_semseg.py", *tiny_args(ade, student4, out, "semseg.eval_every=12")], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["iterations"] == 24
    val_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "val"]
    assert val_steps == [12, 24]
    assert re.search(r"iter 12: mIoU \d+\.\d\d %", (out / "log.txt").read_text())

    single = tmp_path / "single"
    assert eval_semseg.main(tiny_args(ade, student4, single, f"semseg.load_head={out / 'head.pth'}")) == 0
    rescored = json.loads((single / "results_eval.json").read_text())
    for key in ("mIoU", "aAcc", "mAcc"):
        assert rescored[key] == pytest.approx(results[key], abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Schedules (semseg.schedule=unic|dinov2) and the configuration
# --------------------------------------------------------------------------------------------------------------

# The references' values, written out here rather than read from unic.eval.semseg_run.SCHEDULES: UNIC's
# eval_dense/eval_semseg.py (samples_per_gpu=8, 10000 x 8 iterations on 1 GPU) and DINOv2's published
# dinov2_vit{b,l}14_ade20k_linear_config.py (2 per GPU x 8 GPUs, 40000 iterations), which share everything else.
SHARED = {"lr": 1e-3, "weight_decay": 1e-4, "warmup_iters": 1500, "crop_size": 512, "stride": 341,
          "scale": (99_999_999, 512), "layers": "last", "eval_every": 10_000}
REFERENCE = {"unic": {"iterations": 80_000, "batch_size": 8, **SHARED},
             "dinov2": {"iterations": 40_000, "batch_size": 16, **SHARED}}


@pytest.mark.parametrize("overrides, schedule", [([], "unic"), (["semseg.schedule=unic"], "unic"),
                                                 (["semseg.schedule=dinov2"], "dinov2")])
def test_schedules_resolve_to_the_reference_values(overrides, schedule):
    probe = probe_of(*overrides)
    assert probe.schedule == schedule  # unic is the default
    assert {key: getattr(probe, key) for key in REFERENCE[schedule]} == REFERENCE[schedule]
    assert probe.overridden == ()
    assert set(SCHEDULES) == set(REFERENCE)


def test_explicit_settings_override_the_schedule():
    probe = probe_of("semseg.schedule=dinov2", "semseg.iterations=5", "semseg.lr=0.5", "semseg.layers=last4",
                     "semseg.scale=[64,16]", "semseg.eval_every=0", "semseg.weight_decay=0")
    assert (probe.iterations, probe.lr, probe.layers, probe.scale) == (5, 0.5, "last4", (64, 16))
    assert probe.eval_every == 0 and probe.weight_decay == 0.0  # explicit zeros are overrides, not "unset"
    assert probe.overridden == ("eval_every", "iterations", "layers", "lr", "scale", "weight_decay")
    untouched = {key: getattr(probe, key) for key in ("batch_size", "warmup_iters", "crop_size", "stride")}
    assert untouched == {key: REFERENCE["dinov2"][key] for key in untouched}


def test_the_global_batch_is_a_data_setting_split_over_processes():
    assert probe_of("data.global_batch=6", world_size=2).batch_size == 6
    assert probe_of("data.global_batch=6").overridden == ("batch_size",)
    assert probe_of("data.batch_size_per_gpu=3", world_size=4).batch_size == 12  # the per-process form
    assert probe_of(world_size=8).batch_size == 8 and probe_of(world_size=8).overridden == ()
    with pytest.raises(ConfigError, match="data.global_batch=8 is not divisible by the 3 processes"):
        probe_of(world_size=3)
    with pytest.raises(ConfigError, match="not both"):
        probe_of("data.global_batch=8", "data.batch_size_per_gpu=4")


def test_dataset_facts_come_from_the_registry():
    from unic.data.registry import get_dataset

    spec = get_dataset("ade20k")
    probe = probe_of()
    assert probe.dataset == "ade20k" and probe.num_classes == spec.defaults["num_classes"] == 150
    assert probe_of("data.num_classes=7").num_classes == 7
    with pytest.raises(ConfigError, match="'data.num_classes': must be in \\[1, 255\\]"):
        probe_of("data.num_classes=256")
    with pytest.raises(ConfigError, match="data.dataset"):
        probe_of("data.dataset=dtd")  # a registry name, but not a segmentation set


@pytest.mark.parametrize("override, message", [
    ("semseg.schedule=mmseg", "'semseg.schedule': 'mmseg'; choose one of unic, dinov2"),
    ("semseg.layers=last8", "'semseg.layers': 'last8'; choose one of last, last4"),
    ("semseg.lr=0", "'semseg.lr': must be > 0"),
    ("semseg.iterations=0", "'semseg.iterations': must be > 0"),
    ("semseg.warmup_iters=-1", "'semseg.warmup_iters': must be >= 0"),
    ("semseg.scale=[64]", "'semseg.scale': expected two numbers"),
    ("data.num_workers=-1", "'data.num_workers': must be >= 0"),
    ("model.embedding=universal", "'model.embedding': 'universal'; choose one of backbone"),
    ("semseg.batch_size=4", "unknown config key 'semseg.batch_size'"),
    ("semseg.layer=last4", "did you mean 'semseg.layers'?"),
])
def test_bad_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        probe_of(override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_help_lists_every_key_with_an_example(capsys):
    with pytest.raises(SystemExit) as stop:
        eval_semseg.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for key in ("run.output_dir", "model.source", "data.root", "data.global_batch", "data.num_classes",
                "semseg.schedule = unic", "semseg.layers = null", "semseg.visualize = 0", "semseg.load_head"):
        assert key in text, key
    assert "semseg.iterations=80000 data.global_batch=8" in text  # the schedules' values
    weights = next(line for line in text.splitlines() if line.strip().startswith("model.weights"))
    assert "timm: model" in weights and "open_clip" not in weights  # open_clip models are refused here
    assert "example:\n  eval_dense/eval_semseg.py model.source=" in text


@pytest.fixture(scope="module")
def ade16(tmp_path_factory):
    """16 training images: a real batch of the dinov2 schedule (16) and two of the unic one (8)."""
    return make_ade20k(tmp_path_factory, "ADE16", 16)


@pytest.mark.parametrize("schedule", ["unic", "dinov2"])
def test_tiny_run_with_each_schedule_records_it(ade16, student4, tmp_path, schedule):
    """A real run under each schedule name: only the length and the image geometry are overridden (tiny images);
    batch, lr, wd, warm-up, layers and evaluation interval come from the preset, and results.json / head.pth
    say so."""
    out = tmp_path / schedule
    geometry = ["semseg.crop_size=32", "semseg.stride=21", "semseg.scale=[128,32]"]
    assert eval_semseg.main([f"data.root={ade16}", f"model.source={student4}", f"run.output_dir={out}",
                             f"semseg.schedule={schedule}", "semseg.iterations=2", *geometry,
                             f"data.num_classes={NUM_CLASSES}", "data.num_workers=0", "semseg.log_every=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    reference = REFERENCE[schedule]
    assert results["schedule"] == schedule and results["iterations"] == 2
    assert results["schedule_overrides"] == ["crop_size", "iterations", "scale", "stride"]
    for key in ("batch_size", "lr", "weight_decay", "warmup_iters", "layers", "eval_every"):
        assert results[key] == reference[key], key
    assert results["crop_size"] == 32 and results["scale"] == [128, 32] and results["stride"] == 21
    assert results["world_size"] == 1 and 0.0 <= results["mIoU"] <= 1.0
    head = torch.load(out / "head.pth", weights_only=True)
    assert head["training"]["schedule"] == schedule and head["training"]["batch_size"] == reference["batch_size"]

    # Re-scoring reports the schedule the head was trained with, not the (default) one of the re-scoring call.
    rescored = tmp_path / f"{schedule}_rescored"
    assert eval_semseg.main([f"data.root={ade16}", f"model.source={student4}", f"run.output_dir={rescored}",
                             *geometry, f"data.num_classes={NUM_CLASSES}", "data.num_workers=0",
                             f"semseg.load_head={out / 'head.pth'}"]) == 0
    again = json.loads((rescored / "results_eval.json").read_text())
    assert again["schedule"] == schedule and again["batch_size"] == reference["batch_size"]
    assert again["mIoU"] == pytest.approx(results["mIoU"], abs=1e-12)


def test_default_output_dir_names_the_schedule(student4):
    probe = resolve(load_config(None, ["data.root=d", f"model.source={student4}", "semseg.schedule=dinov2"],
                                SemsegConfig))
    assert default_output_dir(probe).endswith("semseg_ade20k_dinov2_last")


def test_rescoring_a_head_never_replaces_the_training_files(ade, student4, tmp_path):
    """semseg.load_head without run.output_dir writes next to the head, under its own names: the training's
    config.yaml, results.json, visualizations and metrics stay as they were."""
    out = tmp_path / "trained"
    assert eval_semseg.main(tiny_args(ade, student4, out, "semseg.iterations=8", "semseg.visualize=1")) == 0
    kept = {name: (out / name).read_bytes() for name in ("config.yaml", "results.json", "head.pth")}
    kept_png = {path.name: path.read_bytes() for path in (out / "visualizations").iterdir()}
    metrics = (out / "metrics.jsonl").read_text()

    default_dir = [arg for arg in tiny_args(ade, student4, out, "semseg.visualize=1", "semseg.stride=16")
                   if not arg.startswith("run.output_dir=")]
    assert eval_semseg.main([*default_dir, f"semseg.load_head={out / 'head.pth'}"]) == 0
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert {path.name: path.read_bytes() for path in (out / "visualizations").iterdir()} == kept_png
    rescored = json.loads((out / "results_eval.json").read_text())
    assert rescored["stride"] == 16 and rescored["iterations"] == 8 and rescored["head"] == str(out / "head.pth")
    assert len(rescored["visualizations"]) == 1 and "visualizations_eval" in rescored["visualizations"][0]
    saved = load_config(str(out / "eval_config.yaml"), [], SemsegConfig)
    assert saved.run.output_dir == str(out) and saved.semseg.load_head == str(out / "head.pth")
    appended = (out / "metrics.jsonl").read_text()
    assert appended.startswith(metrics)
    assert [json.loads(line)["split"] for line in appended[len(metrics):].splitlines()] == ["eval"]
    assert default_output_dir(probe_of(f"semseg.load_head={out / 'head.pth'}")) == str(out)


def test_a_saved_config_loads_where_its_files_do_not_exist(tmp_path, capsys):
    """The schema checks values only: a config.yaml written on another machine loads; run() reports the missing
    files before any work (one line, exit 2)."""
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  source: /elsewhere/student.pth\ndata:\n  root: /elsewhere/ADE\n"
                      "semseg:\n  load_head: /elsewhere/head.pth\n")
    cfg = load_config(str(config), [], SemsegConfig)
    assert cfg.model.source == "/elsewhere/student.pth" and cfg.semseg.load_head == "/elsewhere/head.pth"
    out = tmp_path / "never"
    assert eval_semseg.main(["--config", str(config), f"run.output_dir={out}"]) == 2
    assert capsys.readouterr().err.strip() == "error: model.source: checkpoint file not found: /elsewhere/student.pth"
    assert not out.exists()


def test_encoder_load_errors_are_one_line_exit_2(ade, tmp_path, capsys, monkeypatch):
    """load_encoder reports an unknown timm model or an offline hub download as a ConfigError: main() prints it
    on one line and exits 2."""
    import unic.eval.encoders

    def refuse(source, *args, **kwargs):
        raise ConfigError(f"model.source: unknown timm model {source[5:]!r}")

    monkeypatch.setattr(unic.eval.encoders, "load_encoder", refuse)
    assert eval_semseg.main(tiny_args(ade, "timm:vit_nope", tmp_path / "never")) == 2
    assert capsys.readouterr().err == "error: model.source: unknown timm model 'vit_nope'\n"


def test_user_errors_exit_2_before_writing(ade, student4, tmp_path, capsys):
    out = tmp_path / "never"
    assert eval_semseg.main(tiny_args(ade, student4, out, "data.num_classes=3")) == 2
    err = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]  # after the progress bars: one error line
    assert err.startswith("error: class-count mismatch") and "label 3 after reduce_zero_label" in err

    no_val = tmp_path / "no_val"
    write_ade20k_quadrants(no_val, "training", 2)
    assert eval_semseg.main(tiny_args(no_val, student4, out)) == 2
    assert "validation" in capsys.readouterr().err

    assert eval_semseg.main(tiny_args(ade, str(tmp_path / "none.pth"), out)) == 2
    assert "checkpoint file not found" in capsys.readouterr().err
    assert eval_semseg.main(tiny_args(ade, "open_clip:ViT-B-32:openai", out)) == 2
    assert "patch tokens" in capsys.readouterr().err

    assert eval_semseg.main([f"data.root={ade}"]) == 2
    assert "error: 'model.source' is required" in capsys.readouterr().err
    assert eval_semseg.main(tiny_args(ade, student4, out, f"semseg.load_head={tmp_path / 'none.pth'}")) == 2
    assert "semseg.load_head: file not found" in capsys.readouterr().err
    assert eval_semseg.main(tiny_args(ade, student4, out, "semseg.layers=last8")) == 2
    assert capsys.readouterr().err.startswith("error: invalid value for 'semseg.layers'")
    if not torch.cuda.is_available():
        assert eval_semseg.main(tiny_args(ade, student4, out, "run.device=cuda")) == 2
        assert "run.device=cuda was requested but CUDA is not available" in capsys.readouterr().err

    shallow = write_tiny_student(tmp_path / "depth2.pth", depth=2)
    assert eval_semseg.main(tiny_args(ade, shallow, out, "semseg.layers=last4")) == 2
    assert "has 2 blocks" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Library parts the command line is built from
# --------------------------------------------------------------------------------------------------------------


def _tiny_probe(student: str, num_last_blocks: int = 1):
    backbone = FrozenPatchBackbone(load_encoder(student, "backbone"), num_last_blocks)
    torch.manual_seed(0)
    return backbone, LinearSegHead(backbone.out_dim, NUM_CLASSES)


def _head_trained_with(ade, student: str, num_workers: int, seed: int = 3) -> dict:
    backbone, head = _tiny_probe(student)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    dataset = ADE20KDataset(ade, "training", SegTrainTransform(32, (128, 32)))
    batches = infinite_batches(dataset, 2, num_workers=num_workers, seed=seed)
    torch.manual_seed(100 + num_workers)  # the global RNG takes no part in the augmentations
    train_linear_head(backbone, head, optimizer, batches, num_iters=5, base_lr=1e-2, device=torch.device("cpu"),
                      warmup_iters=0, log_every=5)
    batches.close()  # stops the loader's workers
    return head.state_dict()


def test_the_head_does_not_depend_on_the_number_of_loader_workers(ade, student4):
    """5 iterations of 2 crops over 4 images (3 passes): every crop is drawn from (seed, epoch, index) only, so
    0, 1 or 2 workers (whatever the CPU count allows) train bit-identical heads; another seed does not."""
    heads = [_head_trained_with(ade, student4, num_workers) for num_workers in (0, 1, 2)]
    for other in heads[1:]:
        assert all(torch.equal(heads[0][key], value) for key, value in other.items())
    reseeded = _head_trained_with(ade, student4, 0, seed=4)
    assert not torch.equal(reseeded["conv.weight"], heads[0]["conv.weight"])


def test_backbone_stays_frozen_while_the_head_trains(ade, student4):
    from unic.eval.encoders import Encoder
    from unic.models.student import build_student

    # Stochastic depth would make two forward passes differ if the backbone ever ran in training mode.
    vit = build_student("vit_small_patch16_224", 32, drop_path=0.5, kwargs={**TINY_VIT, "depth": 4})
    backbone = FrozenPatchBackbone(Encoder(vit, "backbone", 32), num_last_blocks=4)
    head = LinearSegHead(backbone.out_dim, NUM_CLASSES)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    backbone.train()  # what a careless training loop would do
    assert not backbone.encoder.training and not any(m.training for m in backbone.encoder.modules())
    first = backbone(images)
    assert torch.equal(first, backbone(images))  # no stochastic depth
    assert not first.requires_grad and all(not p.requires_grad for p in backbone.parameters())

    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    dataset = ADE20KDataset(ade, "training", SegTrainTransform(32, (128, 32)))
    train_linear_head(backbone, head, optimizer, infinite_batches(dataset, 2), num_iters=3, base_lr=1e-2,
                      device=torch.device("cpu"), warmup_iters=0, log_every=1)
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in head.parameters()}
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert any(not torch.equal(head_before[k], v) for k, v in head.state_dict().items())
    assert len(optimizer.state) == len(list(head.parameters()))


@pytest.mark.parametrize("height, width", [(32, 32), (30, 37), (17, 9)])
def test_segment_pads_to_the_patch_grid_and_crops_back(student4, height, width):
    backbone, head = _tiny_probe(student4)
    head.eval()
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    padded, pads = center_pad(images, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert torch.equal(uncenter_pad(padded, pads), images)
    with torch.no_grad():
        logits = segment(backbone, head, images)
    assert logits.shape == (2, NUM_CLASSES, height, width)


def test_sliding_window_equals_whole_image_for_the_probe(student4):
    backbone, head = _tiny_probe(student4)
    head.eval()
    image = torch.randn(1, 3, 30, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = segment(backbone, head, image)
        covered = slide_inference(lambda crops: segment(backbone, head, crops), image, NUM_CLASSES, crop=48, stride=32)
        windows = slide_inference(lambda crops: segment(backbone, head, crops), image, NUM_CLASSES, crop=24, stride=16)
    assert torch.allclose(covered, whole, atol=1e-5)
    assert not torch.allclose(windows, whole, atol=1e-3)  # smaller windows see less context


def test_segmentation_loss_matches_mmseg_averaging():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2 classes, 1, 2 pixels)
    labels = torch.tensor([[[0, 255]]])
    ce_first = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    assert segmentation_loss(logits, labels) == pytest.approx(ce_first.item() / 2)  # ignored pixel counts as 0
    assert segmentation_loss(logits, labels, avg_non_ignore=True) == pytest.approx(ce_first.item())
