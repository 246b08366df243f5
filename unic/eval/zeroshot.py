"""Zero-shot classification through a student's adaptor to a CLIP teacher (SPEC section 11).

``run`` is what ``main_zeroshot.py`` does with its validated :class:`ZeroShotConfig`:

- the text side is the teacher's own: open_clip builds the teacher's full CLIP model (the registry's
  ``TeacherSpec.open_clip`` (architecture, pretrained tag), or ``open_clip:<model>[:<tag>]``) from its weights
  file or hub tag; each class embedding is the normalised mean over the prompt templates of the normalised
  text embeddings (:func:`class_embeddings`, classes sharded over the ranks);
- the student's image embedding is ``normalize(f_cls @ proj)``: ``f_cls`` the adaptor's cls prediction in the
  teacher's space (de-standardised ``ln_post`` output, :mod:`unic.models.adaptor`), ``proj`` the CLIP visual
  projection of the same weights; images preprocessed as the student's evaluation (its size, mean and std);
- the teacher itself (``encode_image`` with its own open_clip preprocessing) is scored beside it, so an
  adaptor that reproduced the teacher exactly would score the same;
- images (class folders under ``<root>/<split>``) are encoded sharded over the ranks
  (:func:`unic.eval.features.extract_features`), and rank 0 scores top-1/top-5 by cosine and writes
  ``results.json``, ``results.md``, ``predictions.npz`` and the resolved ``config.yaml``.

Class names: ``imagenet`` (open_clip's ``IMAGENET_CLASSNAMES`` keyed by the ImageNet-1k wnids in sorted
order, and by the class indices ``0``..``999`` of ImageNetV2's folders), or a file mapping folder names to
names: JSON ``{"<folder>": "<name>"}``, or text lines ``<folder><TAB><name>`` (``<folder> <name>`` without a
tab, as ImageNet's ``LOC_synset_mapping.txt``). Templates: ``openai`` (open_clip's 80
``OPENAI_IMAGENET_TEMPLATES``), ``simple`` (its 7 ``SIMPLE_IMAGENET_TEMPLATES``) or a file, one template per
line with ``{c}`` where the class name goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from unic import distributed
from unic.cli import write_resolved_config
from unic.config import ConfigError, LoaderConfig, ModelConfig, RunConfig, check_choices, check_range
from unic.data.folders import ImageListDataset, scan_image_folder
from unic.eval.encoders import OpenClipImage
from unic.eval.features import extract_features
from unic.io import atomic_write, write_json, write_text, safe_filename

if TYPE_CHECKING:
    from teachers.registry import TeacherSpec

logger = logging.getLogger(__name__)

TOP_KS = (1, 5)
TEMPLATE_SETS = ("openai", "simple")  # open_clip's OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
BUILTIN_CLASSNAMES = ("imagenet",)
CLIP_TEACHERS_HINT = "clip_vitb16, clip_vitl14, metaclip_vith14 or open_clip:<model>[:<tag>]"
SCORE_CHUNK = 4096  # images per logits matrix


# ------------------------------------------------------------------------------------------------------------
# class names and prompt templates


def load_templates(spec: str) -> list[str]:
    """Prompt templates with ``{c}`` where the class name goes: ``openai`` (80), ``simple`` (7) or a file."""
    if spec in TEMPLATE_SETS:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        # open_clip's templates are f-string lambdas: called on "{c}" they give the template text
        return [t("{c}") for t in (OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)]
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ConfigError(f"zeroshot.templates: {spec!r} is neither {' nor '.join(TEMPLATE_SETS)} nor a file")
    with open(path, encoding="utf-8") as f:
        templates = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    without = [t for t in templates if "{c}" not in t]
    if without:
        raise ConfigError(f"zeroshot.templates: {path}: every template needs {{c}} where the class name goes, "
                          f"not {without[0]!r}")
    if not templates:
        raise ConfigError(f"zeroshot.templates: {path} holds no template (one per line, with {{c}})")
    return templates


def fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname)


def imagenet_classnames() -> dict[str, str]:
    """ImageNet-1k: open_clip's class names by wnid (sorted-wnid order, timm's list) and by index ("0".."999")."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise RuntimeError(f"{len(wnids)} ImageNet wnids for {len(IMAGENET_CLASSNAMES)} class names")
    names = dict(zip(wnids, IMAGENET_CLASSNAMES))
    names.update({str(i): name for i, name in enumerate(IMAGENET_CLASSNAMES)})
    return names


def load_classnames(spec: str) -> dict[str, str]:
    """``{folder name: class name}``: built in (``imagenet``) or read from a JSON or text file."""
    if spec == "imagenet":
        return imagenet_classnames()
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ConfigError(f"zeroshot.classnames: {spec!r} is neither {' nor '.join(BUILTIN_CLASSNAMES)} nor a file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            mapping = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"zeroshot.classnames: {path} is not valid JSON: {err}") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ConfigError(f"zeroshot.classnames: {path} must hold one object {{\"<folder>\": \"<name>\"}}")
        return {str(k): v.strip() for k, v in mapping.items()}
    mapping = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split("\t", 1) if "\t" in line else line.strip().split(None, 1)
        if len(parts) != 2 or not parts[1].strip():
            raise ConfigError(f"zeroshot.classnames: {path}:{number}: expected '<folder><TAB><name>', got {line!r}")
        mapping[parts[0].strip()] = parts[1].strip()
    return mapping


def classnames_for(folders: Sequence[str], mapping: Mapping[str, str], source: str) -> list[str]:
    """The class name of each folder; a folder the mapping lacks is a ConfigError naming it."""
    missing = [folder for folder in folders if folder not in mapping]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(f"zeroshot.classnames={source} has no class name for {len(missing)} of the "
                          f"{len(folders)} class folders ({shown}); give a file mapping every folder to its name "
                          "(JSON {\"<folder>\": \"<name>\"} or lines <folder><TAB><name>)")
    return [mapping[folder] for folder in folders]


# ------------------------------------------------------------------------------------------------------------
# the CLIP teacher: spec, weights, open_clip model


def clip_teacher_spec(name: str) -> TeacherSpec:
    """The registry spec of a CLIP-family teacher (one with an open_clip model); a ConfigError otherwise."""
    from teachers.registry import get_spec

    try:
        spec = get_spec(name)
    except ValueError as err:
        raise ConfigError(f"zeroshot.teacher: {err}") from None
    if spec.open_clip is None:
        raise ConfigError(f"zeroshot.teacher={name} is not a CLIP-family teacher (zero-shot needs its text tower): "
                          f"use {CLIP_TEACHERS_HINT}")
    return spec


def is_clip_teacher(name: str) -> bool:
    try:
        clip_teacher_spec(name)
    except ConfigError:
        return False
    return True


def resolve_clip_weights(spec: TeacherSpec, weights: str | None, weights_dir: str) -> tuple[str, str]:
    """("file", path) or ("hub", open_clip tag) of a CLIP teacher's full weights (visual and text towers):
    ``weights`` = a file or ``hub``; unset, the registry's file name in ``weights_dir``."""
    arch, tag = spec.open_clip
    if weights == "hub":
        if not tag:
            raise ConfigError(f"zeroshot.teacher_weights=hub: {spec.name} names no open_clip pretrained tag "
                              f"(use open_clip:{arch}:<tag>, or give the weights file)")
        return "hub", tag
    if weights == "random":
        raise ConfigError("zeroshot.teacher_weights=random: zero-shot needs the teacher's trained text tower")
    if weights:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise ConfigError(f"zeroshot.teacher_weights: file not found: {path}")
        return "file", path
    if spec.filename:
        path = os.path.join(os.path.expanduser(weights_dir), spec.filename)
        if os.path.isfile(path):
            return "file", path
        source = f" (from {spec.url})" if spec.url else ""
        raise ConfigError(f"{spec.name} needs its CLIP weights: put {spec.filename}{source} in {weights_dir}, "
                          f"or set zeroshot.teacher_weights=/path/to/file (or =hub when online)")
    online = " (or =hub when online)" if tag else ""
    raise ConfigError(f"{spec.name} needs its CLIP weights: set zeroshot.teacher_weights=/path/to/file{online}")


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip reports each step of building a model with ``logging.info`` on the root logger; those lines
    stay out of the run's log (its warnings still come through)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def build_clip(spec: TeacherSpec, kind: str, where: str, device: torch.device | str = "cpu") -> nn.Module:
    """The teacher's full open_clip CLIP model (eval mode, frozen) from a weights file or a hub tag.

    A file is loaded weights-only by open_clip (``state_dict`` / ``module.`` unwrapped, position embeddings
    resampled); with a known tag its preprocessing (mean, std, resize) is the tag's."""
    import open_clip

    arch, tag = spec.open_clip
    if arch not in open_clip.list_models():
        raise ConfigError(f"zeroshot.teacher={spec.name}: open_clip has no model '{arch}'")
    kwargs = {}
    if kind == "file" and tag:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                          if k in tag_cfg}
    try:
        with quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=where, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline hub, pickled or TorchScript file, mismatched keys
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if kind == "hub":
            raise ConfigError(f"cannot fetch open_clip {arch} '{where}' ({first}); offline, download the weights "
                              "and set zeroshot.teacher_weights=/path/to/file") from None
        raise ConfigError(f"cannot load {where} into open_clip {arch}: {first} (zero-shot needs the full CLIP state "
                          "dict, visual.* and the text tower, as a weights-only torch or safetensors file)") from None
    visual = model.visual
    if not torch.is_tensor(getattr(visual, "proj", None)) or not hasattr(model, "encode_text"):
        raise ConfigError(f"open_clip {arch} has no visual projection and text tower to classify with")
    model.eval().requires_grad_(False)
    return model.to(device)


def clip_transform(model: nn.Module):
    """The CLIP model's own evaluation preprocessing (open_clip's)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)


def _shard(count: int, rank: int, world: int) -> range:
    per_rank = -(-count // world)
    return range(min(rank * per_rank, count), min((rank + 1) * per_rank, count))


@torch.no_grad()
def class_embeddings(
    model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
    device: torch.device, text_batch_size: int = 1024, autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(C, E) float32 unit rows: per class the normalised mean over ``templates`` of the normalised text
    embeddings. The classes are split over the ranks in contiguous blocks and gathered in order."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = list(_shard(len(classnames), rank, world))
    per_batch = max(1, text_batch_size // len(templates))
    dim = int(model.visual.proj.shape[1])
    chunks = [torch.zeros((0, dim), device=device)]
    starts = range(0, len(mine), per_batch)
    for start in tqdm(starts, desc="class embeddings", disable=not distributed.is_main_process(), leave=False,
                      dynamic_ncols=True):
        names = [classnames[i] for i in mine[start:start + per_batch]]
        tokens = tokenizer([fill_template(t, name) for name in names for t in templates]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            text_TE = model.encode_text(tokens)
        text_TE = F.normalize(text_TE.float(), dim=-1)
        chunks.append(F.normalize(text_TE.reshape(len(names), len(templates), -1).mean(dim=1), dim=-1))
    return distributed.all_gather_cat(torch.cat(chunks)).float()


# ------------------------------------------------------------------------------------------------------------
# image embeddings and scores


class AdaptorImageEmbedding(nn.Module):
    """images -> ``f_cls @ proj`` (B, E): a CLIP image embedding (not normalised) from an adaptor's
    teacher-space cls (``ln_post`` output of the CLIP ViT it stands for) and that CLIP's visual projection."""

    def __init__(self, adaptor: nn.Module, proj_DE: torch.Tensor):
        super().__init__()
        if int(adaptor.embed_dim) != proj_DE.shape[0]:
            raise ConfigError(f"the adaptor to {getattr(adaptor, 'teacher', '?')} predicts {adaptor.embed_dim}-d "
                              f"tokens but the CLIP projection expects {proj_DE.shape[0]}-d ones (other weights?)")
        self.adaptor = adaptor
        self.register_buffer("proj_DE", proj_DE.detach().float().clone())

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        cls_BD = self.adaptor(images_BCHW)["cls"]
        with torch.autocast(images_BCHW.device.type, enabled=False):  # the projection in float32
            return cls_BD.float() @ self.proj_DE


@torch.no_grad()
def topk_predictions(embeddings_NE: torch.Tensor, classes_CE: torch.Tensor, k: int = max(TOP_KS),
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, min(k, C)) class ids by decreasing cosine between the image and class embeddings."""
    k = min(k, classes_CE.shape[0])
    classes_CE = F.normalize(classes_CE.float().to(device), dim=-1)
    out = []
    for start in range(0, embeddings_NE.shape[0], SCORE_CHUNK):
        chunk_BE = F.normalize(embeddings_NE[start:start + SCORE_CHUNK].float().to(device), dim=-1)
        out.append((chunk_BE @ classes_CE.T).topk(k, dim=1).indices.cpu())
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.long)


def topk_accuracy(predictions_NK: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int] = TOP_KS) -> dict:
    """``{"top1": ..., "top5": ...}`` fractions: the label among the first k predictions (k capped at C)."""
    hits_NK = predictions_NK == labels_N[:, None]
    return {f"top{k}": float(hits_NK[:, :k].any(dim=1).float().mean()) if len(labels_N) else 0.0 for k in ks}


def score_model(encode: nn.Module, dataset: ImageListDataset, classes_CE: torch.Tensor, device: torch.device,
                batch_size: int, num_workers: int, autocast_dtype: torch.dtype | None, desc: str) -> dict:
    """Encode ``dataset`` (sharded over ranks) and score it on rank 0: ``{top1, top5, predictions, labels,
    kept}`` (``kept``: rows of readable images, the others were replaced by the loader); ``{}`` elsewhere."""
    out = extract_features(encode, dataset, device, batch_size, num_workers, autocast_dtype, desc=desc)
    if not distributed.is_main_process():
        return {}
    kept_N = out["item_skipped"] == 0
    labels_N = torch.tensor([labels[0] for labels in dataset.labels()])
    if not torch.equal(out["labels"][kept_N], labels_N[kept_N]):
        raise RuntimeError(f"{desc}: extracted rows are not in the data set's order")
    predictions_NK = topk_predictions(out["features"][kept_N], classes_CE, device=device)
    return {**topk_accuracy(predictions_NK, labels_N[kept_N]), "predictions": predictions_NK,
            "labels": labels_N[kept_N], "kept": kept_N}


# ------------------------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass(kw_only=True)
class ZeroShotModelConfig(ModelConfig):
    """The student to evaluate (its adaptor to the CLIP teacher); null: the teacher alone."""

    # UNIC checkpoint.pth / student.pth / universal.pth holding the adaptor, or a published UNIC file (unic_l.pth)
    source: Optional[str] = None
    weights: Optional[str] = None  # unused here: the teacher's CLIP weights are zeroshot.teacher_weights
    embedding: str = "auto"  # auto only: the student is read through its adaptor to zeroshot.teacher


@dataclasses.dataclass(kw_only=True)
class ZeroShotDataConfig(LoaderConfig):
    """The images: class folders under <root>/<split> (ImageNet layout)."""

    dataset: str = "imagenet"  # a registry entry of the ImageNet layout (unic.data.registry)
    split: Optional[str] = "val"  # sub-folder holding the class folders (null: root itself)
    img_size: Optional[int] = None  # the student's input size (null: the one it was trained at)
    crop_ratio: Optional[float] = None  # student: resize short side to img_size/ratio, centre crop (null: dataset's)


@dataclasses.dataclass(kw_only=True)
class ZeroShotProtocolConfig:
    """The CLIP teacher whose text tower classifies, and the prompts (SPEC section 11)."""

    # clip_vitb16 | clip_vitl14 | metaclip_vith14 | open_clip:<model>[:<tag>], as in the student's teachers.names
    # (null: the student's only CLIP-family adaptor)
    teacher: Optional[str] = None
    # the teacher's full CLIP weights (visual.* and the text tower, OpenAI/open_clip state dict) or hub (its
    # open_clip tag); null: <weights_dir>/<registry file name>
    teacher_weights: Optional[str] = None
    weights_dir: str = "~/.cache/unic/teachers"  # where registry teacher files are looked up (as in training)
    classnames: str = "imagenet"  # imagenet (built in) or a file: JSON {folder: name} or lines folder<TAB>name
    templates: str = "openai"  # openai (80 prompts) | simple (7) | a file, one template per line with {c}
    evaluate_teacher: bool = True  # also score the teacher's own image tower, side by side
    text_batch_size: int = 1024  # prompts per text-tower batch


@dataclasses.dataclass(kw_only=True)
class ZeroShotConfig:
    """The schema of ``main_zeroshot.py`` (``unic.cli.parse``)."""

    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    model: ZeroShotModelConfig = dataclasses.field(default_factory=ZeroShotModelConfig)
    data: ZeroShotDataConfig = dataclasses.field(default_factory=ZeroShotDataConfig)
    zeroshot: ZeroShotProtocolConfig = dataclasses.field(default_factory=ZeroShotProtocolConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        from unic.data.registry import dataset_names

        check_choices(cfg, {"data.dataset": dataset_names(kind="imagenet")})
        check_range(cfg, positive=["data.img_size", "data.crop_ratio", "zeroshot.text_batch_size"],
                    unit=["data.crop_ratio"])
        if cfg.model.weights is not None:
            raise ConfigError("model.weights does not apply to zero-shot: the teacher's CLIP weights are "
                              "zeroshot.teacher_weights")
        if cfg.model.embedding != "auto":
            raise ConfigError("model.embedding does not apply to zero-shot: the student is read through its adaptor "
                              "to zeroshot.teacher")
        if cfg.model.source is None and not cfg.zeroshot.evaluate_teacher:
            raise ConfigError("nothing to evaluate: give model.source (a UNIC student) or zeroshot.evaluate_teacher=true")
        if cfg.model.source is None and not cfg.zeroshot.teacher:
            raise ConfigError("zeroshot.teacher is needed without model.source (the teacher to evaluate)")
        if cfg.zeroshot.teacher:
            clip_teacher_spec(cfg.zeroshot.teacher)
        if not cfg.data.root:
            raise ConfigError(f"data.root is needed: a folder holding <split>/<class>/<image> "
                              f"(data.split={cfg.data.split})")


# ------------------------------------------------------------------------------------------------------------
# the evaluation run


@dataclasses.dataclass(kw_only=True)
class Plan:
    """A validated zero-shot evaluation: the teacher, the student's adaptor, the classes, where to write."""

    spec: TeacherSpec
    weights: tuple[str, str]  # ("file", path) or ("hub", tag)
    source: str | None  # the student file
    adaptor: nn.Module | None
    image_dir: str
    samples: list
    folders: list[str]
    classnames: list[str]
    templates: list[str]
    output_dir: str
    name: str  # the data set as the report names it ("imagenet val")
    step: int = 0



def _load_student(source: str, teacher: str | None) -> tuple[nn.Module, str, int]:
    """(adaptor, teacher name as the file spells it, training step) of a UNIC file of ours or a published UNIC
    checkpoint (converted on reading, :func:`unic.models.published.open_checkpoint`); ``teacher`` None: the
    file's only CLIP-family adaptor."""
    from unic.models.adaptor import adaptor_from_checkpoint, adaptor_names, why_no_adaptors
    from unic.models.published import open_checkpoint

    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise ConfigError(f"model.source: checkpoint file not found: {source}")
    try:
        ckpt = open_checkpoint(path)
    except ValueError as err:
        raise ConfigError(f"model.source: {err}") from None
    names = adaptor_names(ckpt)
    if not names:
        raise ConfigError(f"{source} has no adaptors ({why_no_adaptors(ckpt)})")
    if teacher is None:
        clip = [name for name in names if is_clip_teacher(name)]
        if len(clip) != 1:
            raise ConfigError(f"set zeroshot.teacher: {source} has {len(clip) or 'no'} CLIP-family adaptors "
                              f"({', '.join(names)})")
        teacher = clip[0]
    try:
        adaptor = adaptor_from_checkpoint(ckpt, teacher, path)
    except ValueError as err:
        if teacher not in names:
            raise ConfigError(f"{source} has no adaptor to zeroshot.teacher={teacher} (its adaptors: "
                              f"{', '.join(names)})") from None
        raise ConfigError(f"zeroshot.teacher={teacher}: {err}") from None
    step = ckpt.get("step", 0)
    return adaptor, adaptor.teacher, int(step) if isinstance(step, int) else 0


def prepare(cfg: DictConfig, device: torch.device) -> Plan:
    """Decide the whole evaluation of a validated :class:`ZeroShotConfig`, checking every input before any
    model is built or file written; user errors are :class:`ConfigError`."""
    zs, data = cfg.zeroshot, cfg.data
    adaptor, teacher, step = None, zs.teacher, 0
    if cfg.model.source:
        adaptor, teacher, step = _load_student(cfg.model.source, zs.teacher)
    spec = clip_teacher_spec(teacher)
    weights = resolve_clip_weights(spec, zs.teacher_weights, zs.weights_dir)
    root = os.path.abspath(os.path.expanduser(data.root))
    image_dir = os.path.join(root, data.split) if data.split else root
    try:
        samples, folders = scan_image_folder(image_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"data.root/data.split: {err}") from None
    classnames = classnames_for(folders, load_classnames(zs.classnames), zs.classnames)
    templates = load_templates(zs.templates)
    if cfg.run.output_dir:
        output_dir = cfg.run.output_dir
    else:
        tag = safe_filename("-".join(["zeroshot", os.path.basename(root), data.split or "", teacher]))
        base = (os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(cfg.model.source))), "eval")
                if cfg.model.source else os.path.join("output", "eval"))
        output_dir = os.path.join(base, tag)
    if adaptor is not None:
        adaptor = adaptor.to(device)
    return Plan(spec=spec, weights=weights, source=cfg.model.source, adaptor=adaptor, image_dir=image_dir,
                samples=samples, folders=folders, classnames=classnames, templates=templates,
                output_dir=output_dir, name=" ".join(filter(None, [os.path.basename(root), data.split])),
                step=step)


def format_results(results: dict) -> str:
    """The markdown report (``results.md``): one row per model, accuracies in percent."""
    data = results["data"]
    arch, tag = results["open_clip"]
    lines = [
        f"# Zero-shot classification: {data['name']} ({data['num_classes']} classes, {data['num_images']} images)",
        "",
        f"Text tower of {results['teacher']} (open_clip {arch}{'/' + tag if tag else ''}), "
        f"{results['num_templates']} prompt templates ({results['templates']}), class names: {results['classnames']}.",
        "",
        "| model | image embedding | input | top-1 | top-5 |",
        "|---|---|---|---:|---:|",
    ]
    for row in results["models"].values():
        lines.append(f"| {row['model']} | {row['embedding']} | {row['input']} | {100 * row['top1']:.2f} | "
                     f"{100 * row['top5']:.2f} |")
    return "\n".join(lines) + "\n"


def _write_predictions(path: str, rows: dict[str, dict], folders: list[str]) -> None:
    arrays = {"classes": np.array(folders)}
    for name, row in rows.items():
        arrays[f"{name}:top5"] = row["predictions"].numpy()
        arrays[f"{name}:labels"] = row["labels"].numpy()
        arrays[f"{name}:rows"] = torch.nonzero(row["kept"]).flatten().numpy()
    atomic_write(path, lambda f: np.savez(f, **arrays))


def run(cfg: DictConfig, device: torch.device) -> dict:
    """Validate, build the class embeddings and encode the images (all ranks), score and report (rank 0):
    ``results.json``, ``results.md``, ``predictions.npz`` and ``config.yaml`` in the output folder. Returns the
    results on rank 0 and ``{}`` on the other ranks."""
    from unic.data.transforms import eval_transform
    from unic.data.registry import get_dataset
    from unic.train.logger import setup_logging

    setup_logging()
    plan = prepare(cfg, device)
    main_process = distributed.is_main_process()
    if main_process:
        write_resolved_config(cfg, plan.output_dir)
    setup_logging(plan.output_dir)
    spec, (kind, where) = plan.spec, plan.weights
    logger.info("zero-shot on %s: %d classes, %d images, teacher %s (open_clip %s, %s %s), %d process(es) -> %s",
                plan.image_dir, len(plan.folders), len(plan.samples), spec.name, "/".join(filter(None, spec.open_clip)),
                kind, where, distributed.get_world_size(), plan.output_dir)
    autocast = distributed.autocast_dtype(cfg.run.precision, device)
    model = build_clip(spec, kind, where, device)
    import open_clip

    with quiet_open_clip():
        tokenizer = open_clip.get_tokenizer(spec.open_clip[0])
    classes_CE = class_embeddings(model, tokenizer, plan.classnames, plan.templates, device,
                                  cfg.zeroshot.text_batch_size, autocast)
    logger.info("class embeddings: %d classes x %d templates", len(plan.classnames), len(plan.templates))

    loader = dict(device=device, batch_size=cfg.data.batch_size_per_gpu, num_workers=cfg.data.num_workers,
                  autocast_dtype=autocast)
    rows: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    if plan.adaptor is not None:
        adaptor = plan.adaptor
        img_size = cfg.data.img_size or adaptor.img_size
        crop_ratio = cfg.data.crop_ratio or get_dataset(cfg.data.dataset).defaults.get("crop_ratio", 0.875)
        dataset = ImageListDataset(plan.samples, eval_transform(img_size, crop_ratio, adaptor.mean, adaptor.std))
        encode = AdaptorImageEmbedding(adaptor, model.visual.proj).to(device)
        rows["student"] = score_model(encode, dataset, classes_CE, desc="student", **loader)
        meta["student"] = {"model": f"student {plan.source}", "source": plan.source, "step": plan.step,
                           "embedding": f"adaptor to {adaptor.teacher}", "img_size": img_size,
                           "crop_ratio": crop_ratio, "input": f"{img_size} px, crop {crop_ratio:g}"}
        plan.adaptor = encode = adaptor = None  # the student leaves the device before the teacher is scored
    if cfg.zeroshot.evaluate_teacher:
        dataset = ImageListDataset(plan.samples, clip_transform(model))
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        rows["teacher"] = score_model(OpenClipImage(model), dataset, classes_CE, desc="teacher", **loader)
        meta["teacher"] = {"model": f"teacher {spec.name}", "source": where, "embedding": "open_clip encode_image",
                           "img_size": size, "input": f"{size} px (open_clip preprocessing)"}
    if not main_process:
        return {}
    unreadable = max(int((~row["kept"]).sum()) for row in rows.values())
    results = {
        "teacher": spec.name,
        "open_clip": list(spec.open_clip),
        "teacher_weights": where,
        "data": {"name": plan.name, "root": plan.image_dir, "num_classes": len(plan.folders), "num_images": len(plan.samples),
                 "unreadable": unreadable},
        "classnames": cfg.zeroshot.classnames,
        "templates": cfg.zeroshot.templates,
        "num_templates": len(plan.templates),
        "models": {name: {**meta[name], "top1": row["top1"], "top5": row["top5"],
                          "num_images": int(row["kept"].sum())} for name, row in rows.items()},
    }
    if unreadable:
        logger.warning("%d unreadable images left out of the scores", unreadable)
    table = format_results(results)
    print(table, flush=True)
    write_json(os.path.join(plan.output_dir, "results.json"), results)
    write_text(os.path.join(plan.output_dir, "results.md"), table)
    _write_predictions(os.path.join(plan.output_dir, "predictions.npz"), rows, plan.folders)
    logger.info("results written to %s", os.path.join(plan.output_dir, "results.json"))
    return results
