"""The trainer's builders (dinov2 / torchtitan style): small functions from the config to the run's parts.

:class:`unic.train.loop.Trainer` calls them in this order (the order fixes which random draws initialise
which weights): :func:`build_datasets`, :func:`build_model` (teachers, backbone, ladder, UDON heads and their
label tables; or, for the UniFEx recipe, the pretrained backbone, neck and merged margin head),
:func:`build_batches`, :func:`build_schedules`, :func:`build_optimizer`, :func:`build_task`.
The preflight plan (:mod:`unic.train.plan`) builds its models with the same :func:`build_teachers`,
:func:`build_backbone`, :func:`build_ladder` and :func:`build_unifex` on the meta device.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from unic import distributed
from unic.config import ConfigError, derived_schedule, final_norm_frozen, head_options, objectives, unifex_enabled
from unic.data.folders import ImageListDataset
from unic.models.ladder import Ladder, UnicModel
from unic.models.universal import DomainHeads
from unic.train.standardize import TeacherStandardizer

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ data
# the data.root the presets ship with: a placeholder the user replaces
PLACEHOLDER_ROOT = "/path/to/"
DATASET_TITLES = {"imagenet": "ImageNet", "uned": "UnED", "demo": "demo", "csv": "CSV image-list",
                  "wds": "webdataset shard (index.json)"}


def check_data_root(cfg: DictConfig, root: str) -> None:
    """A clear error for a ``data.root`` that is not a folder (the presets' placeholder named as such)."""
    if os.path.isdir(root):
        return
    if str(cfg.data.root).startswith(PLACEHOLDER_ROOT):
        title = DATASET_TITLES.get(cfg.data.dataset, cfg.data.dataset)
        raise ConfigError(f"set data.root=<your {title} folder> (the preset's data.root "
                          f"{cfg.data.root} is a placeholder)")
    raise ConfigError(f"data.root not found: {root}")


def input_spec(cfg: DictConfig) -> tuple[int, tuple, tuple]:
    """(resolution, mean, std) the model reads: the student's, or the UniFEx backbone's (its own unless
    ``unifex.img_size`` / ``mean`` / ``std`` say otherwise)."""
    if not unifex_enabled(cfg):
        return cfg.student.img_size, tuple(cfg.student.mean), tuple(cfg.student.std)
    from unic.models.unifex import backbone_input

    size, mean, std = backbone_input(cfg.unifex.backbone, dict(cfg.unifex.kwargs))
    u = cfg.unifex
    return (u.img_size or size, tuple(u.mean) if u.mean is not None else mean,
            tuple(u.std) if u.std is not None else std)


def build_datasets(cfg: DictConfig, udon: bool, skipped: list[dict] | None = None
                   ) -> tuple[ImageListDataset, ImageListDataset | None, ImageListDataset | None]:
    """Train set, val set and kNN bank (eval transforms) of the registry entry ``data.dataset``.

    Generic distillation uses the UNIC augmentations, UDON its own crops, the UniFEx recipe
    ``unifex.transform``; UnED-layout data (kind ``uned``) is evaluated with the UnED resize (short side,
    centre crop), ImageNet (kind ``imagenet``) and CSV lists (kind ``csv``) with the entry's centre crop.
    Without a val split there is no val set nor kNN bank; with ``train.validate`` on, ``skipped`` (when
    given) receives ``{"feature", "reason"}`` saying so.
    """
    from unic.data.csv_list import csv_dataset, unifex_train_transform
    from unic.data.demo import ensure_demo_data
    from unic.data.folders import image_folder_dataset
    from unic.data.registry import dataset_names, get_dataset
    from unic.data.transforms import eval_transform, udon_train_transform, uned_eval_transform, unic_train_transform
    from unic.data.uned import uned_dataset

    data = cfg.data
    try:
        spec = get_dataset(data.dataset, what="data.dataset")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not spec.trainable or spec.kind not in ("uned", "imagenet", "csv", "wds"):
        raise ConfigError(f"data.dataset={spec.name} cannot be trained on (trainable: "
                          f"{', '.join(dataset_names(trainable=True))})")
    size, mean, std = input_spec(cfg)
    norm = {"mean": mean, "std": std}
    if unifex_enabled(cfg):
        train_tf = unifex_train_transform(cfg.unifex.transform, size, **norm)
    else:
        train_tf = udon_train_transform(size, **norm) if udon else unic_train_transform(size, **norm)
    if spec.kind in ("imagenet", "csv"):
        val_tf = eval_transform(size, crop_ratio=spec.defaults["crop_ratio"], **norm)
    else:
        val_tf = uned_eval_transform(size, **norm)
    if not data.root:
        check_data_root(cfg, "")
    root = os.path.expanduser(data.root)
    if spec.generated:
        if distributed.is_main_process():
            ensure_demo_data(root)
        distributed.barrier()
        root = os.path.abspath(root)
    check_data_root(cfg, root)
    missing = None  # why there is no val split
    if spec.kind == "wds":
        from unic.data.shards import ShardFormatError, open_shards, source_dataset

        try:
            train = open_shards(root, data.domains or None, train_tf)
        except (FileNotFoundError, ShardFormatError, ValueError) as err:
            raise ConfigError(f"data.root={data.root}: {err}") from None
        if train.layout in ("imagenet", "csv"):  # evaluated as the layout the shards were written from
            val_tf = eval_transform(size, crop_ratio=get_dataset(train.layout).defaults["crop_ratio"], **norm)
        else:
            val_tf = uned_eval_transform(size, **norm)
        try:
            val = source_dataset(train, data.val_split, val_tf)
        except FileNotFoundError as err:
            val, missing = None, f"no val split: {err}"
    elif spec.kind == "imagenet":
        train = image_folder_dataset(os.path.join(root, data.train_split), train_tf)
        val_dir = os.path.join(root, data.val_split)
        val = image_folder_dataset(val_dir, val_tf) if os.path.isdir(val_dir) else None
        missing = None if val is not None else f"no val split: {val_dir} not found (data.val_split={data.val_split})"
    elif spec.kind == "csv":
        train = csv_dataset(root, data.train_split, data.domains or None, train_tf)
        try:
            val = csv_dataset(root, data.val_split, train.domain_names, val_tf)
        except FileNotFoundError as err:
            val, missing = None, f"no val split: {err}"
    else:
        train = uned_dataset(root, data.train_split, data.domains or None, train_tf)
        try:
            val = uned_dataset(root, data.val_split, train.domain_names, val_tf)
        except FileNotFoundError as err:
            val, missing = None, f"no val split: {err}"
    if data.decode == "gpu":
        if udon or unifex_enabled(cfg) or spec.kind == "wds":
            raise ConfigError("data.decode=gpu decodes for the UNIC distillation augmentations on folder, csv and "
                              "uned data; UDON's and UniFEx's crops and data.dataset=wds decode on the CPU "
                              "(data.decode=cpu)")
        from unic.data.gpu_decode import DrawUnicParams, read_encoded

        train.reader, train.transform = read_encoded, DrawUnicParams()  # GpuUnicAugment finishes on the device
    if missing and cfg.train.validate and skipped is not None:
        scores = "kNN top-1" + (", universal R@1" if udon else "")
        skipped.append({"feature": f"validation (loss, {scores}) and its kNN bank", "reason": missing})
    bank = None
    if val is not None:
        stride = max(1, round(1 / data.knn_train_fraction))
        # shards: the bank reads the source folder of the shards (a ShardSet's samples are not files)
        source = source_dataset(train, None, val_tf) if spec.kind == "wds" else train
        bank = ImageListDataset(source.samples[::stride], val_tf, train.domain_names)
    return train, val, bank


# ------------------------------------------------------------------------------------------------ model
def teacher_weights(cfg: DictConfig) -> dict[str, str | None]:
    """Each teacher's ``teachers.weights`` entry (None: the registry's default), by teacher name."""
    from unic.models.teacher import teacher_key

    # module keys cannot hold dots (timm:<model>.<tag>); weights may be given under either spelling
    return {name: cfg.teachers.weights.get(name, cfg.teachers.weights.get(teacher_key(name)))
            for name in sorted(cfg.teachers.names)}


def check_teacher_weights(cfg: DictConfig) -> None:
    """Every teacher's weight source found before any model is built; one
    :class:`teachers.build.TeacherWeightsError` lists all that are missing."""
    from teachers.build import check_weights

    if objectives(cfg)[0]:
        sources = teacher_weights(cfg)
        check_weights(list(sources), sources, cfg.teachers.weights_dir)
    weights = cfg.unifex.weights if unifex_enabled(cfg) else None
    if weights not in (None, "random") and not os.path.isfile(os.path.expanduser(weights)):
        raise ConfigError(f"unifex.weights not found: {weights} (a local {cfg.unifex.backbone} weights file; "
                          "leave it unset for the hub)")


def build_teachers(cfg: DictConfig, weights: str | None = None) -> nn.ModuleDict:
    """The frozen teachers by module key, in sorted name order; ``weights`` ("random") overrides every source."""
    from unic.models.teacher import FrozenTeacher, teacher_key

    return nn.ModuleDict({
        teacher_key(name): FrozenTeacher(name, weights or source, cfg.teachers.weights_dir)
        for name, source in teacher_weights(cfg).items()
    })


def build_backbone(cfg: DictConfig, load_pretrained: bool = True) -> nn.Module:
    """The student backbone (``student.pretrained`` loaded), its final norm frozen when nothing trains it."""
    from unic.models.student import build_student

    backbone = build_student(cfg.student.arch, cfg.student.img_size, cfg.student.drop_path, dict(cfg.student.kwargs))
    if load_pretrained and cfg.student.pretrained:
        from teachers.convert import load_into
        from unic.models.export import backbone_state_dict
        from unic.models.published import open_checkpoint

        state = open_checkpoint(cfg.student.pretrained)  # ours, a timm file, or a published UNIC checkpoint
        load_into(backbone, backbone_state_dict(state), "timm", cfg.student.pretrained)
    if OmegaConf.select(cfg, "train.activation_checkpointing", default=False):
        # timm's forward_intermediates (the ladder's taps) and forward_features honour it: each block runs
        # under torch.utils.checkpoint (non-reentrant, RNG state preserved: stochastic depth recomputes alike)
        backbone.set_grad_checkpointing(True)
    if final_norm_frozen(cfg):
        # UNIC: the ladder reads the raw last block, so the final norm takes no part in training and keeps
        # its initial (identity, or pretrained) affine; DDP needs it out of the trainable set
        backbone.norm.requires_grad_(False)
    return backbone


def build_ladder(cfg: DictConfig, backbone: nn.Module, teacher_dims: dict[str, int]) -> Ladder:
    blocks = list(cfg.ladder.blocks) if cfg.ladder.blocks is not None else None
    try:
        return Ladder(backbone.embed_dim, len(backbone.blocks), teacher_dims, blocks, cfg.ladder.hidden_dim,
                      cfg.ladder.last_hidden_dim)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def domain_classes(dataset: ImageListDataset) -> list[list[int]]:
    """Per domain, the sorted class ids of its train split (first label of each image)."""
    classes: list[set] = [set() for _ in dataset.domain_names]
    for _, labels, domain in dataset.samples:
        classes[domain].add(int(labels[0]))
    return [sorted(c) for c in classes]


def label_tables(classes: list[list[int]]) -> list[torch.Tensor]:
    """Per domain, raw class id -> classifier row (-1: not a train class)."""
    tables = []
    for cls in classes:
        table = torch.full((max(cls) + 1,), -1, dtype=torch.long)
        table[torch.tensor(cls)] = torch.arange(len(cls))
        tables.append(table)
    return tables


def build_domain_heads(cfg: DictConfig, embed_dim: int, train_set: ImageListDataset,
                       classes: list[list[int]]) -> DomainHeads:
    """UDON's per-domain teacher heads and margin classifiers, sized by the train split's classes
    (``classes``: :func:`domain_classes` of ``train_set``)."""
    domains = list(train_set.domain_names)
    counts = {d: [0] * len(classes[i]) for i, d in enumerate(domains)}
    position = [{c: j for j, c in enumerate(cls)} for cls in classes]
    for _, labels, d in train_set.samples:
        counts[domains[d]][position[d][int(labels[0])]] += 1
    try:
        return DomainHeads(embed_dim, {d: len(c) for d, c in zip(domains, classes)}, cfg.udon.teacher_dim,
                           cfg.udon.universal_dim, cfg.heads.name, head_options(cfg), counts,
                           partial_fc=cfg.heads.partial_fc, seed=cfg.run.seed)
    except ValueError as err:  # e.g. AdaCos needs >= 3 classes per domain
        raise ConfigError(f"heads.name={cfg.heads.name}: {err}") from None


@dataclass
class ModelParts:
    """What :func:`build_model` assembles: the trainable ``model`` (the only part DDP wraps) and the rest."""

    model: nn.Module  # UnicModel: backbone, ladder (UNIC), universal projection (UDON); or UnifexModel
    teachers: nn.ModuleDict | None  # frozen, outside DDP
    standardizer: TeacherStandardizer | None  # running teacher statistics (UNIC)
    domain_heads: DomainHeads | None  # per-domain heads, gradients averaged by hand (UDON)
    label_maps: list[torch.Tensor] | None  # per domain, raw class id -> classifier row (UDON)
    unifex_head: nn.Module | None = None  # UniFEx: the margin head over the merged labels, outside DDP
    merged_labels: object | None = None  # UniFEx: unic.models.unifex.MergedLabels, (domain, label) -> row
    compiled: bool = False  # torch.compile applied (train.compile); what it could not compile runs eagerly:
    eager_fallbacks: list[str] = field(default_factory=list)  # the parts the start-up probe left eager

    @property
    def patch_size(self) -> int:
        return self.model.backbone.patch_embed.patch_size[0]


def build_unifex(cfg: DictConfig, load_weights: bool = True):
    """The UniFEx backbone (weights loaded, frozen but for ``unifex.unfreeze_last_blocks``) and neck."""
    from unic.models.unifex import build_unifex_model

    u = cfg.unifex
    _, mean, std = input_spec(cfg)
    try:
        return build_unifex_model(u.backbone, u.weights if load_weights else "random", dict(u.kwargs), u.proj_layer,
                                  u.img_size, u.neck, u.embed_dim, u.dropout, u.unfreeze_last_blocks, mean, std)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_unifex_parts(cfg: DictConfig, train_set: ImageListDataset, device: torch.device) -> ModelParts:
    """UniFEx: backbone + neck (DDP-wrapped) and one margin head over the merged label space of the train
    split's domains (outside DDP: replicated with its gradients averaged by hand, or Partial FC with its
    centres sharded, ``heads.partial_fc``), initialised in that order."""
    from unic.models.unifex import MergedLabels, build_unifex_head

    model = build_unifex(cfg).to(device)
    merged = MergedLabels(domain_classes(train_set))
    try:
        head = build_unifex_head(cfg.heads.name, cfg.unifex.embed_dim, merged.num_classes, head_options(cfg),
                                 merged.class_counts(train_set.samples), cfg.heads.partial_fc, cfg.run.seed)
    except ValueError as err:
        raise ConfigError(f"heads.name={cfg.heads.name}: {err}") from None
    return ModelParts(model, None, None, None, None, unifex_head=head.to(device), merged_labels=merged.to(device))


def build_model(cfg: DictConfig, train_set: ImageListDataset, device: torch.device) -> ModelParts:
    """Teachers, student backbone, ladder and UDON heads on ``device``, initialised in that order (the UniFEx
    recipe: :func:`build_unifex_parts`)."""
    if unifex_enabled(cfg):
        parts = build_unifex_parts(cfg, train_set, device)
        if compile_active(cfg, device):
            parts.compiled, parts.eager_fallbacks = True, compile_with_fallback(cfg, parts.model, None, device)
        return parts
    distill, udon = objectives(cfg)
    teachers = build_teachers(cfg) if distill else None  # to the device once every input is validated
    backbone = build_backbone(cfg)
    ladder = build_ladder(cfg, backbone, {n: t.embed_dim for n, t in teachers.items()}) if distill else None
    universal, domain_heads, label_maps = None, None, None
    if udon:
        universal = nn.Linear(backbone.embed_dim, cfg.udon.universal_dim)
        classes = domain_classes(train_set)
        domain_heads = build_domain_heads(cfg, backbone.embed_dim, train_set, classes).to(device)
        label_maps = [table.to(device) for table in label_tables(classes)]
    standardizer = None
    if distill:
        # frozen teachers in bf16 when the run computes in bf16: the matmuls autocast would run anyway, from
        # weights that are not re-cast every step (autocast caches no cast of a weight without gradient)
        teachers.to(device)
        if distributed.resolve_precision(cfg.run.precision, device) == "bf16":
            for teacher in teachers.values():
                teacher.tokens.to(torch.bfloat16)  # the network; its input statistics stay float32
        standardizer = TeacherStandardizer({n: t.embed_dim for n, t in teachers.items()}).to(device)
    model = UnicModel(backbone, ladder, universal, cfg.ladder.last_tap).to(device)
    compiled = compile_active(cfg, device)
    fallbacks = compile_with_fallback(cfg, model, teachers, device) if compiled else []
    return ModelParts(model, teachers, standardizer, domain_heads, label_maps, compiled=compiled,
                      eager_fallbacks=fallbacks)


def compile_enabled(cfg: DictConfig, device: torch.device) -> bool:
    """``train.compile``, its default (null) resolved: on CUDA with ddp (FSDP's hooks are not traced)."""
    if cfg.train.compile is None:
        return device.type == "cuda" and cfg.train.parallelism == "ddp"
    return bool(cfg.train.compile)


def compile_unavailable(cfg: DictConfig, device: torch.device) -> str | None:
    """Why ``train.compile`` cannot take effect here (None: it can, or it is off): inductor on CPU
    compiles C++ and needs a compiler."""
    import shutil

    if compile_enabled(cfg, device) and device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on CPU needs a C++ compiler (g++ or c++), none is on PATH"
    return None


def compile_active(cfg: DictConfig, device: torch.device) -> bool:
    """Whether this run compiles: ``train.compile`` on (:func:`compile_enabled`) and able to take effect."""
    return compile_enabled(cfg, device) and compile_unavailable(cfg, device) is None


def compile_with_fallback(cfg: DictConfig, model: nn.Module, teachers: nn.ModuleDict | None,
                          device: torch.device) -> list[str]:
    """``torch.compile`` the trained model (``__call__`` in place: state dict keys unchanged) and each teacher's
    network, and run each once on zeros of a training batch's shape (forward and backward for the trained
    model, whose backward graph is compiled at its first backward), so that a compilation that fails here
    leaves that part eager, with a warning, instead of failing the first step. The probe leaves weights,
    buffers, gradients and the random streams as they were; the real step then finds the compiled code.
    A frame that fails to compile later falls back too (torch's ``suppress_errors``, with torch's warning;
    :func:`eager_parts`). Returns the parts left eager."""
    from torch import _dynamo

    from unic.config import resolve_batch

    _dynamo.config.suppress_errors = True  # a missing Triton or compiler costs speed, never the run

    _, per_gpu = resolve_batch(cfg, distributed.get_world_size())
    dtype = distributed.autocast_dtype(cfg.run.precision, device)
    size = input_spec(cfg)[0]
    eager = []
    model.compile()
    failed = _probe(model, lambda: model(torch.zeros(per_gpu, 3, size, size, device=device)), dtype, backward=True)
    if failed:
        eager.append("the trained model")
        logger.warning("torch.compile could not compile the trained model (%s): it runs eagerly", failed)
    for name, teacher in (teachers or {}).items():
        res = teacher.spec.resolution
        teacher.tokens.compile()
        failed = _probe(teacher.tokens, lambda t=teacher: t.tokens(torch.zeros(per_gpu, 3, res, res, device=device,
                                                                                dtype=t.dtype)), dtype)
        if failed:
            eager.append(f"teacher {name}")
            logger.warning("torch.compile could not compile teacher %s (%s): it runs eagerly", name, failed)
    if distributed.get_world_size() > 1:
        # the probe compiled outside DDP; compiled inside it (the first step), the graph is split at DDP's
        # buckets, so gradients are all-reduced while backward runs (recompiling mostly hits inductor's cache)
        _dynamo.reset()
    return eager


def _probe(module: nn.Module, run, dtype: torch.dtype | None, backward: bool = False) -> str | None:
    """Run the compiled ``module`` once (``run()``; under autocast ``dtype``); None when it worked, else why,
    with ``module`` made eager again. State is restored: buffers (norm statistics), gradients, RNG."""
    buffers = [(b, b.clone()) for b in module.buffers()]
    device = next(module.parameters()).device
    devices = [device] if device.type == "cuda" else []
    error = None
    with torch.random.fork_rng(devices=devices):
        try:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if backward:
                    out = run()
                else:
                    with torch.inference_mode():
                        out = run()
            if backward:
                loss = _float_sum(out)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
        except Exception as err:  # noqa: BLE001 - any compiler failure (Triton, C++, dynamo) means eager
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}"
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, value in buffers:
            buffer.copy_(value)
    if error is not None:
        module._compiled_call_impl = None  # nn.Module.compile's compiled __call__: back to the eager one
    return error


def _float_sum(value) -> torch.Tensor | float:
    """The sum of every floating tensor in ``value`` (nested lists, tuples, dicts), as float32."""
    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else 0.0
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum((_float_sum(v) for v in value), 0.0)
    return 0.0


def eager_parts(parts: ModelParts) -> list[str]:
    """What of a compiled model runs eagerly: the parts the start-up probe left eager, and the frames torch
    could not convert since (counted in this process)."""
    from torch._dynamo.utils import counters

    failed = int(counters["frames"]["total"] - counters["frames"]["ok"])
    return parts.eager_fallbacks + ([f"{failed} more frame(s)"] if failed else [])


def wrap_ddp(model: nn.Module, device: torch.device, static_graph: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel on more than one process (only the trainable modules). The
    gradients are views of DDP's buckets (no second copy of them); ``static_graph``: the same parameters take
    part in every step, which lets DDP skip its per-step search for unused ones."""
    if distributed.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, static_graph=static_graph)


def fsdp_units(model: UnicModel) -> list[nn.Module]:
    """The modules ``train.parallelism=fsdp`` shards as units, innermost first: each student block, the
    backbone (patch embedding, tokens, final norm), the ladder, the universal projection; the root follows."""
    units = list(model.backbone.blocks) + [model.backbone]
    return units + [m for m in (model.ladder, model.udon.universal) if m is not None]


def wrap_fsdp(model: UnicModel, device: torch.device, precision: str) -> nn.Module:
    """``model`` sharded in place with FSDP2 (``fully_shard``) over every process: weights, gradients and the
    optimizer state built on them become DTensor shards, all-gathered per unit for its forward and backward
    and reduce-scattered (averaged, as DDP) after it. ``precision`` bf16 gathers the weights in bf16 and
    reduces the gradients in fp32 (``MixedPrecisionPolicy``); fp32 keeps everything in fp32. The backbone's
    ``forward_intermediates`` / ``forward_features`` (the ladder's taps, the kNN features) are registered as
    forward methods so that calling them directly gathers the backbone's own weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (distributed.get_world_size(),))
    low = distributed.AUTOCAST_DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low is not None \
        else MixedPrecisionPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    for method in ("forward_intermediates", "forward_features"):
        register_fsdp_forward_method(model.backbone, method)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def wrap_model(cfg: DictConfig, model: nn.Module, device: torch.device, precision: str) -> nn.Module:
    """The trainable model as ``train.parallelism`` distributes it over more than one process: DDP, or FSDP2
    (sharded in place; the module itself is returned). One process: the model as it is."""
    if distributed.get_world_size() > 1 and cfg.train.parallelism == "fsdp":
        return wrap_fsdp(model, device, precision)
    # every step runs the same graph (teacher dropping weighs losses, it removes no projector); the
    # compiled model's DDP graph splitting is left to its defaults
    return wrap_ddp(model, device, static_graph=not compile_active(cfg, device))


def unsharded_model(cfg: DictConfig, parts: ModelParts, state: dict, device: torch.device) -> UnicModel:
    """A plain (unsharded) UnicModel of ``parts.model``'s architecture holding ``state`` (its full state dict,
    :func:`unic.train.checkpoint.full_model_state`), in eval mode: what the exports and the validation of an
    FSDP run read (built on the meta device, then given the state's tensors)."""
    with torch.device("meta"):
        backbone = build_backbone(cfg, load_pretrained=False)
        teachers = parts.teachers
        ladder = build_ladder(cfg, backbone, {n: t.embed_dim for n, t in teachers.items()}) \
            if parts.model.ladder is not None else None
        universal = nn.Linear(backbone.embed_dim, cfg.udon.universal_dim) \
            if parts.model.udon.universal is not None else None
        model = UnicModel(backbone, ladder, universal, cfg.ladder.last_tap)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"unsharded model: no value for {left[:3]}")
    return model.eval()


# ------------------------------------------------------------------------------------------------ data order
def build_batches(cfg: DictConfig, train_set: ImageListDataset, global_batch: int, device: torch.device):
    """The batch source: epochs of global batches, or (UDON) one domain per step with its domain sampler."""
    from unic.data.sampling import DomainSampler, GlobalBatchSampler
    from unic.train.batches import DomainBatches, EpochBatches

    rank, world = distributed.get_rank(), distributed.get_world_size()
    pin = device.type == "cuda"
    if len(train_set) < global_batch:
        raise ConfigError(f"the training set has {len(train_set)} images, fewer than one global batch "
                          f"({global_batch})")
    from unic.data.shards import ShardSet, shard_batches

    shards = isinstance(train_set, ShardSet)
    if not objectives(cfg)[1]:
        if shards:
            return shard_batches(train_set, global_batch, rank, world, cfg.run.seed, cfg.data.num_workers, pin,
                                 cfg.data.worker_timeout_s, cfg.data.shuffle_buffer)
        sampler = GlobalBatchSampler(len(train_set), global_batch, rank, world, cfg.run.seed)
        return EpochBatches(train_set, sampler, cfg.data.num_workers, pin, cfg.data.worker_timeout_s)
    sizes = [sum(1 for _, _, dom in train_set.samples if dom == d) for d in range(len(train_set.domain_names))]
    for name, size in zip(train_set.domain_names, sizes):
        if size < global_batch:
            raise ConfigError(f"domain '{name}' has {size} training images, fewer than one global batch "
                              f"({global_batch}); lower data.global_batch / data.batch_size_per_gpu "
                              "or drop the domain")
    domain_sampler = DomainSampler(sizes, cfg.udon.sampling, cfg.udon.update_every, cfg.run.seed, device,
                                   cfg.udon.window_reset_every)
    if shards:
        return shard_batches(train_set, global_batch, rank, world, cfg.run.seed, cfg.data.num_workers, pin,
                             cfg.data.worker_timeout_s, cfg.data.shuffle_buffer, domain_sampler)
    return DomainBatches(train_set, global_batch, rank, world, cfg.run.seed, domain_sampler, cfg.data.num_workers,
                         pin, cfg.data.worker_timeout_s)


# ------------------------------------------------------------------------------------------------ optimisation
@dataclass
class Schedules:
    """The per-iteration values derived once at setup (dinov2: precomputed arrays indexed by the step)."""

    total_steps: int  # epochs x steps per epoch: the length of every schedule
    max_steps: int  # where this run stops (train.max_steps)
    freeze_steps: int  # steps with the backbone frozen (UDON)
    peak_lr: float  # the distillation lr after warm-up (scaled with the global batch)
    lr: dict[str, np.ndarray]  # per parameter-group tag: backbone, unic
    weight_decay: np.ndarray

    def values(self, cfg: DictConfig, step: int) -> dict[str, tuple[float, float]]:
        """(lr, weight decay) per group tag at ``step``, for :func:`unic.train.optim.apply_schedules`."""
        wd = float(self.weight_decay[step])
        return {"backbone": (float(self.lr["backbone"][step]), wd), "unic": (float(self.lr["unic"][step]), wd),
                "udon": (cfg.udon.head_lr, cfg.udon.head_weight_decay), "unifex": (float(self.lr["unic"][step]), wd)}


def build_schedules(cfg: DictConfig, global_batch: int, steps_per_epoch: int) -> Schedules:
    from unic.train.optim import cosine_schedule

    derived = derived_schedule(cfg, global_batch, steps_per_epoch)
    total, warmup = derived["total_steps"], derived["warmup_steps"]
    return Schedules(
        total, derived["run_steps"], derived["freeze_steps"], derived["lr"],
        {"backbone": cosine_schedule(derived["backbone_lr"], derived["backbone_min_lr"], total, warmup),
         "unic": cosine_schedule(derived["lr"], cfg.optim.min_lr, total, warmup)},
        cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
    )


def build_optimizer(cfg: DictConfig, parts: ModelParts, schedules: Schedules) -> torch.optim.Optimizer:
    """AdamW (or Adam, ``optim.optimizer``; fused kernels per ``optim.fused``) over the trainable parameters,
    one tagged pair of groups (decay / no decay) per schedule; UniFEx's trained backbone layers in groups of
    their layer-decay lr scale; Partial FC's sharded class centres in groups of their own (``sharded``:
    per-rank state, checkpointed apart)."""
    from unic.models.partial_fc import sharded_parameters
    from unic.train.optim import fused_available, layer_decay_groups, param_groups, separate_sharded

    model = parts.model
    device = next(model.parameters()).device
    fused = cfg.optim.fused if cfg.optim.fused is not None else fused_available(device)
    if fused and not fused_available(device):
        raise ConfigError(f"optim.fused=true: this torch has no fused Adam(W) kernels for {device.type}; set "
                          "optim.fused=null (or false)")
    optimizer = functools.partial(torch.optim.Adam if cfg.optim.optimizer == "adam" else torch.optim.AdamW,
                                  fused=fused)
    sharded = [p for m in (parts.domain_heads, parts.unifex_head) if m is not None for p in sharded_parameters(m)]
    if parts.unifex_head is not None:
        wd = cfg.optim.weight_decay
        groups = layer_decay_groups(model.backbone, wd, "backbone", cfg.unifex.layer_decay)
        groups += param_groups(model.neck, wd, "unifex") + param_groups(parts.unifex_head, wd, "unifex")
        return optimizer(separate_sharded(groups, sharded), lr=schedules.peak_lr, betas=tuple(cfg.optim.betas))
    groups = param_groups(model.backbone, cfg.optim.weight_decay, "backbone")
    if model.ladder is not None:
        groups += param_groups(model.ladder, cfg.optim.weight_decay, "unic")
    if parts.domain_heads is not None:
        groups += param_groups(model.udon, cfg.udon.head_weight_decay, "udon")
        groups += param_groups(parts.domain_heads, cfg.udon.head_weight_decay, "udon")
    return optimizer(separate_sharded(groups, sharded), lr=schedules.peak_lr, betas=tuple(cfg.optim.betas))


def build_device_augment(cfg: DictConfig):
    """``data.decode=gpu``: what turns a batch's encoded images into the model's input on the device
    (:class:`unic.data.gpu_decode.GpuUnicAugment`); None when the workers decode."""
    if cfg.data.decode != "gpu":
        return None
    from unic.data.gpu_decode import GpuUnicAugment

    size, mean, std = input_spec(cfg)
    return GpuUnicAugment(size, mean, std)


def build_task(cfg: DictConfig, parts: ModelParts, trained: nn.Module, total_steps: int, device: torch.device):
    """The method's math (:class:`unic.train.task.UnicTask`) over the (DDP-wrapped) ``trained`` model, with
    its own teacher-dropping generator, the same on every rank."""
    from unic.train.task import UnicTask, UnifexTask

    generator = torch.Generator(device=device).manual_seed(cfg.run.seed + 1)
    if parts.unifex_head is not None:
        return UnifexTask(trained, parts.unifex_head, generator)
    return UnicTask(
        trained, total_steps, parts.teachers, parts.standardizer, parts.domain_heads, parts.patch_size,
        torch.tensor(list(cfg.student.mean), device=device), torch.tensor(list(cfg.student.std), device=device),
        cfg.loss.w_distill, cfg.loss.w_udon, cfg.loss.lam_cos, cfg.loss.lam_sl1, cfg.loss.drop_prob,
        cfg.loss.std_momentum_start, cfg.loss.std_momentum_end, cfg.udon.temperature,
        cfg.udon.relational_weight, generator,
    )
