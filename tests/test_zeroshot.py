"""Zero-shot classification (SPEC section 11): a tiny open_clip CLIP written to disk in open_clip's layout, a
student distilled from it, and main_zeroshot.py scored against open_clip's own zero-shot code."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tests.conftest import REPO, run_entry, tiny_overrides

TINY = "unic-zs-tiny-vit"  # a tiny ViT CLIP registered with open_clip under a name of its own
TEACHER = f"open_clip:{TINY}"
TINY_CFG = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # the real BPE tokenizer (ids up to 49407) with a short context
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# ImageNet's first seven: an odd count, so 2 ranks split the class embeddings unevenly
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    """The tiny CLIP registered with open_clip, its random weights saved as a full open_clip state dict."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    (root / "configs").mkdir()
    (root / "configs" / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(str(root / "configs"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY)
    with torch.no_grad():  # perturbed, so that the random towers tell images (and classes) apart
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(0.5 * p.std() * torch.randn_like(p))
    path = root / "tiny_clip.bin"
    torch.save(model.state_dict(), path)  # visual.* beside the text tower's keys, as open_clip files are
    return {"weights": str(path), "configs": str(root / "configs")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """An ImageNet-layout split: six wnid class folders of real PNG and JPEG files (a colour per class)."""
    root = tmp_path_factory.mktemp("zs_data")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(WNIDS):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        for i in range(3):
            pixels = np.clip(colour + rng.normal(0, 40, (36 + 4 * i, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


def _samples(root: str):
    from unic.data.folders import scan_image_folder

    return scan_image_folder(os.path.join(root, "val"))


def _open_clip_classifier(model, names):
    """open_clip's own zero-shot classifier (E, C) with its 80 OpenAI templates (callables)."""
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(TINY), names,
                                                OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=4)


def _reference_top5(embed, transform, samples, classifier_EC) -> torch.Tensor:
    """Top-5 class ids of every image, computed here image by image (PIL decode, transform, embed)."""
    with torch.no_grad():
        x = torch.stack([transform(Image.open(path).convert("RGB")) for path, _, _ in samples])
        return (F.normalize(embed(x), dim=-1) @ classifier_EC).topk(5, dim=1).indices


class TeacherAsAdaptor(nn.Module):
    """An adaptor that is exactly the teacher: its own ln_post tokens (teachers.build.OpenClipTokens)."""

    def __init__(self, tokens: nn.Module, name: str):
        super().__init__()
        self.tokens, self.teacher, self.embed_dim = tokens, name, tokens.embed_dim

    def forward(self, images_BCHW):
        cls_BD, patch_BND = self.tokens(images_BCHW)
        return {"cls": cls_BD, "patch": patch_BND}


def test_adaptor_identical_to_the_teacher_scores_as_the_teacher(clip, images):
    import open_clip

    from teachers.build import build_teacher_model
    from teachers.registry import get_spec
    from unic.data.folders import ImageListDataset
    from unic.eval.encoders import OpenClipImage
    from unic.eval.zeroshot import (AdaptorImageEmbedding, build_clip, class_embeddings,
                                    clip_transform, load_templates, score_model)

    spec = get_spec(TEACHER)
    model = build_clip(spec, "file", clip["weights"])
    classes_CE = class_embeddings(model, open_clip.get_tokenizer(TINY), NAMES, load_templates("openai"),
                                  torch.device("cpu"), text_batch_size=200)
    reference_EC = _open_clip_classifier(model, NAMES)
    torch.testing.assert_close(classes_CE, reference_EC.T, rtol=1e-5, atol=1e-6)

    samples, folders = _samples(images)
    assert folders == WNIDS
    tokens, _ = build_teacher_model(spec, clip["weights"], "")  # the teacher as training runs it
    dataset = ImageListDataset(samples, clip_transform(model))
    kwargs = dict(device=torch.device("cpu"), batch_size=4, num_workers=0, autocast_dtype=None)
    adaptor = score_model(AdaptorImageEmbedding(TeacherAsAdaptor(tokens, TEACHER), model.visual.proj), dataset,
                          classes_CE, desc="adaptor", **kwargs)
    teacher = score_model(OpenClipImage(model), dataset, classes_CE, desc="teacher", **kwargs)
    assert torch.equal(adaptor["predictions"], teacher["predictions"])
    assert (adaptor["top1"], adaptor["top5"]) == (teacher["top1"], teacher["top5"])

    # both equal open_clip's zero-shot, computed image by image with its own preprocessing
    _, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=clip["weights"])
    expected = _reference_top5(model.encode_image, preprocess, samples, reference_EC)
    assert torch.equal(teacher["predictions"], expected)
    labels = torch.tensor([y[0] for _, y, _ in samples])
    assert teacher["top1"] == pytest.approx(float((expected[:, 0] == labels).float().mean()))
    assert teacher["top5"] == pytest.approx(float((expected == labels[:, None]).any(1).float().mean()))
    assert len(set(expected[:, 0].tolist())) > 1  # the tiny CLIP tells images apart (the check can fail)


@pytest.fixture(scope="module")
def student(tmp_path_factory, clip, demo_root) -> str:
    """A student distilled from the tiny CLIP for a few steps; its training checkpoint (ladder + statistics)."""
    import main_unic

    out = tmp_path_factory.mktemp("student")
    overrides = {"teachers.names": f"[{TEACHER}]", "teachers.weights": f'{{"{TEACHER}": {clip["weights"]}}}',
                 "train.max_steps": 3, "train.validate": False, "udon.enabled": False}
    assert main_unic.main(tiny_overrides(demo_root, str(out), **overrides)) == 0
    return str(out / "checkpoint.pth")


def _zeroshot_args(student: str, clip: dict, images: str, out, **extra) -> list[str]:
    values = {"model.source": student, "zeroshot.teacher_weights": clip["weights"], "data.root": images,
              "data.batch_size_per_gpu": 4, "data.num_workers": 0, "run.device": "cpu", "run.output_dir": str(out)}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, student, clip, images) -> str:
    import main_zeroshot

    out = tmp_path_factory.mktemp("zeroshot_one")
    # zeroshot.teacher unset: the student's only CLIP-family adaptor
    assert main_zeroshot.main(_zeroshot_args(student, clip, images, out)) == 0
    return str(out)


def test_student_and_teacher_end_to_end(one_process, student, clip, images):
    import open_clip

    import unic
    from unic.data.transforms import eval_transform

    with open(os.path.join(one_process, "results.json")) as f:
        results = json.load(f)
    assert results["teacher"] == TEACHER and results["num_templates"] == 80
    assert results["data"]["num_classes"] == 7 and results["data"]["num_images"] == 21
    assert set(results["models"]) == {"student", "teacher"}
    table = open(os.path.join(one_process, "results.md")).read()
    assert "| student " in table and f"| teacher {TEACHER} " in table and "top-1" in table
    assert os.path.isfile(os.path.join(one_process, "config.yaml"))

    # the same numbers computed here from the official pieces: open_clip's classifier and preprocessing, the
    # adaptor loaded with unic.load_student, the projection read from the CLIP model
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=clip["weights"])
    model.eval()
    classifier_EC = _open_clip_classifier(model, NAMES)
    samples, _ = _samples(images)
    labels = torch.tensor([y[0] for _, y, _ in samples])
    adaptor = unic.load_student(student, adaptor=TEACHER)
    assert adaptor.teacher == TEACHER and adaptor.embed_dim == TINY_CFG["vision_cfg"]["width"]
    transform = eval_transform(adaptor.img_size, 0.875, adaptor.mean, adaptor.std)
    rows = {"student": _reference_top5(lambda x: adaptor(x)["cls"] @ model.visual.proj, transform, samples,
                                       classifier_EC),
            "teacher": _reference_top5(model.encode_image, preprocess, samples, classifier_EC)}
    predictions = np.load(os.path.join(one_process, "predictions.npz"))
    for name, top5 in rows.items():
        assert np.array_equal(predictions[f"{name}:top5"], top5.numpy()), name
        row = results["models"][name]
        assert row["top1"] == pytest.approx(float((top5[:, 0] == labels).float().mean())), name
        assert row["top5"] == pytest.approx(float((top5 == labels[:, None]).any(1).float().mean())), name


def test_two_processes_match_one(tmp_path, one_process, student, clip, images):
    # torchrun's workers register the tiny open_clip config before running the entry point
    launcher = tmp_path / "launch_zeroshot.py"
    launcher.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\nimport open_clip\n"
                        f"open_clip.add_model_config({clip['configs']!r})\nimport main_zeroshot\nmain_zeroshot.cli()\n")
    out = tmp_path / "two"
    result = run_entry([str(launcher), *_zeroshot_args(student, clip, images, out, **{"zeroshot.teacher": TEACHER})],
                       nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one = json.load(open(os.path.join(one_process, "results.json")))["models"]
    two = json.load(open(out / "results.json"))["models"]
    for name in ("student", "teacher"):
        assert (two[name]["top1"], two[name]["top5"]) == (one[name]["top1"], one[name]["top5"]), name
    a, b = np.load(os.path.join(one_process, "predictions.npz")), np.load(out / "predictions.npz")
    for key in ("student:top5", "teacher:top5", "student:labels"):
        assert np.array_equal(a[key], b[key]), key


def test_teacher_alone(tmp_path, clip, images, one_process):
    import main_zeroshot

    args = _zeroshot_args("null", clip, images, tmp_path, **{"zeroshot.teacher": TEACHER,
                                                             "zeroshot.templates": "simple"})
    assert main_zeroshot.main(args) == 0
    results = json.load(open(tmp_path / "results.json"))
    assert list(results["models"]) == ["teacher"] and results["num_templates"] == 7


def test_clear_errors(tmp_path, capsys, student, clip, images):
    import main_zeroshot
    from unic.io import load_checkpoint

    def error(**extra) -> str:
        assert main_zeroshot.main(_zeroshot_args(student, clip, images, tmp_path / "err", **extra)) == 2
        return capsys.readouterr().err

    assert "dino_vitb16 is not a CLIP-family teacher" in error(**{"zeroshot.teacher": "dino_vitb16"})
    message = error(**{"zeroshot.teacher": "clip_vitb16"})
    assert "has no adaptor to zeroshot.teacher=clip_vitb16" in message and TEACHER in message
    plain = load_checkpoint(student)
    plain["model"] = {k: v for k, v in plain["model"].items() if not k.startswith("ladder.")}
    torch.save(plain, tmp_path / "no_ladder.pth")  # a student trained without distillation
    assert "has no adaptors" in error(**{"model.source": str(tmp_path / "no_ladder.pth")})
    names = tmp_path / "names.tsv"
    names.write_text("".join(f"{w}\t{n}\n" for w, n in zip(WNIDS[:-1], NAMES)))
    message = error(**{"zeroshot.classnames": str(names)})
    assert "no class name for 1 of the 7 class folders (n01498041)" in message
    assert "not found" in error(**{"zeroshot.teacher_weights": str(tmp_path / "missing.bin")})
    assert "image folder not found" in error(**{"data.split": "test"})
    assert not (tmp_path / "err").exists()  # nothing is written before the inputs are checked


def test_classname_and_template_files(tmp_path):
    from unic.config import ConfigError
    from unic.eval.zeroshot import classnames_for, imagenet_classnames, load_classnames, load_templates

    builtin = imagenet_classnames()
    assert classnames_for(WNIDS, builtin, "imagenet") == NAMES  # open_clip's names in sorted-wnid order
    assert builtin["999"] == builtin["n15075141"] == "toilet paper"  # ImageNetV2's index folders
    (tmp_path / "n.json").write_text(json.dumps({"a": "red car", "b": "blue boat"}))
    (tmp_path / "n.txt").write_text("# folder<TAB>name\na\tred car\nn01440764 tench, Tinca tinca\n\n")
    assert load_classnames(str(tmp_path / "n.json")) == {"a": "red car", "b": "blue boat"}
    assert load_classnames(str(tmp_path / "n.txt")) == {"a": "red car", "n01440764": "tench, Tinca tinca"}
    assert len(load_templates("openai")) == 80 and load_templates("simple")[0] == "itap of a {c}."
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nart of the {c}\n")
    assert load_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}.", "art of the {c}"]
    (tmp_path / "bad.txt").write_text("a photo of a {}.\n")
    with pytest.raises(ConfigError, match=r"\{c\}"):
        load_templates(str(tmp_path / "bad.txt"))
