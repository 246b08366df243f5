"""Configuration schema, loading and validation.

Merge order (as dinov2's ``get_cfg_from_args``): schema defaults <- ``--config file.yaml`` <- ``key=value``
dotlist. A dict- or list-valued setting given by a file or an override *replaces* the value below it, never
merges into it (``student.kwargs: {}`` means timm's own architecture); a dotted override into a dict
(``teachers.weights.dino_vitb16=/w.pth``) sets that one entry. The schema defaults are a small model on the generated demo data with the SPEC's values for the
method (ladder widths, loss weights, UDON terms); presets in ``unic/configs/`` hold only what differs, and
``demo.yaml`` (:data:`DEMO_CONFIG`, what ``python main_unic.py`` runs with no argument) sizes and schedules
the demo to learn in minutes on a CPU. Unknown keys and bad types fail before any work with
a message naming the key (and the closest valid key).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from collections.abc import Collection, Sequence
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


# the student's default input normalisation, defined here (no torchvision import) and used by unic.data.transforms
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


class ConfigError(ValueError):
    """A user error in the configuration: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------------------------------
# groups shared by every entry point (same names, same checks)


@dataclass(kw_only=True)
class RunConfig:
    """Where results go and what runs them (every entry point)."""

    output_dir: Optional[str] = None  # results folder (None: derived from the model and data)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # autocast dtype: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32


@dataclass(kw_only=True)
class ModelConfig:
    """The encoder an evaluation reads (unic.eval.encoders.load_encoder)."""

    # UNIC checkpoint.pth / student.pth / universal.pth / unifex.pth, a published UNIC file (unic.pth),
    # timm:<model>[.<tag>], open_clip:<model>:<tag> or unicom:<name> (Unicom's released ViTs)
    source: Optional[str] = None
    weights: Optional[str] = None  # local weights file of a timm:/open_clip: model (else the hub)
    # auto (universal when the file has one, else backbone), backbone (cls), universal, oracle (each
    # domain's own teacher head), domain:<name> or adaptor:<teacher> (the student's adaptor to that teacher)
    embedding: str = "auto"


@dataclass(kw_only=True)
class LoaderConfig:
    """The data an entry point reads and how it is loaded (every entry point's ``data`` group)."""

    dataset: str = ""  # a name of the dataset registry (unic.data.registry)
    root: Optional[str] = None  # the dataset's folder
    batch_size_per_gpu: int = 128  # images per process and step
    num_workers: int = 8  # data-loading workers per process (at most the CPUs of each local process)


# ------------------------------------------------------------------------------------------------------------
# training (main_unic.py)


@dataclass(kw_only=True)
class StudentConfig:
    arch: str = "vit_tiny_patch16_224"  # any timm VisionTransformer name
    kwargs: dict[str, Any] = field(
        default_factory=lambda: {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}
    )  # extra timm constructor arguments (custom widths/depths); stored in checkpoints
    img_size: int = 64
    drop_path: float = 0.1
    pretrained: Optional[str] = None  # checkpoint to initialise the student from (timm or UNIC file)
    # input normalisation of the student (ImageNet's; a CLIP-initialised student wants CLIP's): used by the
    # training and evaluation transforms, stored in every checkpoint and export, read back by load_encoder
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass(kw_only=True)
class LadderConfig:
    blocks: Optional[list[int]] = None  # block indices that feed the ladder; None = all blocks
    # the last block's tap: "raw" block output, the final norm never trained (UNIC's code; evaluation features
    # are then a LayerNorm with its initial identity affine) or "normed" (the final-normed tokens)
    last_tap: str = "normed"
    hidden_dim: int = 768  # hidden width of every projector but the last block's (UNIC)
    last_hidden_dim: int = 3072  # hidden width of the last block's projector (UNIC)


@dataclass(kw_only=True)
class TeachersConfig:
    names: list[str] = field(default_factory=lambda: ["toy_vit_p16_d96", "toy_vit_p14_d48"])
    weights_dir: str = "~/.cache/unic/teachers"  # registry default file names are looked up here
    # per-teacher source: a file path, "hub" (download by the registry's hub name) or "random" (debug only);
    # unlisted teachers use <weights_dir>/<registry file name> (the toy demo teachers are random)
    weights: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class HeadsConfig:
    """Margin head of the UDON domain classifiers (SPEC section 5); unset values take the head's default."""

    name: str = "normface"
    s: Optional[float] = None
    m: Optional[float] = None
    k: Optional[int] = None  # sub-centres per class
    easy_margin: Optional[bool] = None
    m_min: Optional[float] = None  # dynm_arcface
    m_max: Optional[float] = None
    h: Optional[float] = None  # adaface
    alpha: Optional[float] = None  # adaface
    init: Optional[str] = None  # class weights: lecun_uniform (UDON's, the default) | normal (N(0, 0.01), insightface)
    # Partial FC (unic.models.partial_fc): the sample rate in (0, 1] of classifiers whose class centres are
    # sharded over ranks (each step: the global batch's classes plus random others); None: replicated heads
    partial_fc: Optional[float] = None


@dataclass(kw_only=True)
class UdonConfig:
    """Universal embedding with per-domain teacher heads distilled online (UDON, SPEC section 6)."""

    enabled: bool = True
    teacher_dim: int = 256
    universal_dim: int = 64
    temperature: float = 0.1  # tau of the KL term
    relational_weight: float = 32.0  # c of the relational term
    head_lr: float = 1e-3  # constant lr of heads, projections and classifiers
    head_weight_decay: float = 1e-6
    backbone_lr_scale: Optional[float] = None  # backbone lr = head_lr * scale (UDON: 0.01); None: optim.lr
    freeze_backbone_epochs: float = 0.0  # backbone not updated for this many epochs (UDON: 2)
    sampling: str = "dynamic"  # dynamic | round_robin | size | uniform
    update_every: int = 20  # steps between dynamic probability updates (UDON: 1000)
    # 0: the window of a dynamic update is the steps since the last one; L > 0: UDON's own bookkeeping, the
    # window emptied every L steps (UDON: steps per epoch // 10), independently of the updates
    window_reset_every: int = 0


@dataclass(kw_only=True)
class UnifexConfig:
    """UniFEx (GCPR 2024): a frozen pretrained backbone, a neck to a small descriptor and ONE margin head
    (``heads.*``) over the merged label space of every domain, trained alone (no teachers, no UDON)."""

    enabled: bool = False
    backbone: str = ""  # timm:<model>[.<tag>] or open_clip:<arch>[:<tag>]
    # local weights file (timm state dict, open_clip checkpoint); None: the hub (timm's pretrained weights,
    # open_clip's <tag>); "random": random weights (debug only)
    weights: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm constructor arguments (custom sizes)
    proj_layer: bool = False  # keep the backbone's own projection (open_clip visual.proj; UniFEx: False)
    img_size: Optional[int] = None  # None: the backbone's native resolution
    mean: Optional[list[float]] = None  # input normalisation; None: the backbone's own
    std: Optional[list[float]] = None
    unfreeze_last_blocks: int = 0  # train the last N blocks and what follows them (0: frozen, UniFEx)
    layer_decay: float = 1.0  # lr of a trained backbone layer = backbone lr * decay^(layers above it)
    backbone_lr_scale: float = 1.0  # backbone lr = optim.lr (scaled) * this
    neck: str = "proj"  # proj: Dropout + Linear (UniFEx's proj_layer) | pool: adaptive average pooling
    embed_dim: int = 64  # the descriptor's width
    dropout: float = 0.2  # the proj neck's dropout (UniFEx's NECK.dropout)
    transform: str = "openai-clip"  # UniFEx's train transform: openai-clip | openclip | siglip | custom


@dataclass(kw_only=True)
class DataConfig(LoaderConfig):
    dataset: str = "demo"  # a trainable entry of the dataset registry: demo | uned | csv | imagenet
    root: str = "~/.cache/unic/demo"  # demo: generated here on first use
    domains: list[str] = field(default_factory=list)  # uned/demo: domains to use (empty = all)
    train_split: str = "train"
    val_split: str = "val"
    batch_size_per_gpu: int = 64
    num_workers: int = 2
    # the global batch; when set, the per-GPU batch is global_batch / world size (which must divide it) and
    # batch_size_per_gpu is ignored, so a recipe does not depend on the number of GPUs
    global_batch: Optional[int] = None
    knn_train_fraction: float = 1.0  # fraction of the train split used as the kNN bank at validation
    worker_timeout_s: float = 600.0  # a data worker silent for this long is an error, not a hang
    # wds: samples each data stream holds to shuffle a shard as it reads it sequentially (0: the tar's order)
    shuffle_buffer: int = 1000
    # cpu: the data workers decode (PIL) and augment; gpu: they send JPEG bytes and the augmentations drawn,
    # decoded in one batch on the training device (torchvision's decode_jpeg, nvjpeg on CUDA) and augmented
    # there (unic.data.gpu_decode: same parameters as the CPU path, pixels in float); UNIC distillation on
    # folder, csv and uned data
    decode: str = "cpu"


@dataclass(kw_only=True)
class OptimConfig:
    epochs: int = 4
    warmup_epochs: float = 1.0
    lr: float = 1e-3  # for a global batch of 256, scaled linearly with the global batch
    min_lr: float = 1e-6
    weight_decay: float = 0.03
    weight_decay_end: float = 0.03
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    clip_grad: float = 0.0  # gradient clipping threshold; 0 disables it
    # global: one norm over all gradients (torch's clip_grad_norm_); per_param: each parameter's gradient
    # clipped to that norm on its own (UNIC's utils.clip_gradients)
    clip_mode: str = "global"
    scale_lr: bool = True  # lr given for a global batch of 256 and scaled linearly
    optimizer: str = "adamw"  # adamw (decoupled weight decay) | adam (L2 weight decay, UniFEx's Adam)
    # fused Adam(W) kernels: one launch updates every parameter, and a non-finite step is skipped inside the
    # kernel (no host synchronisation); null: wherever torch has them for the device (CUDA, CPU)
    fused: Optional[bool] = None


@dataclass(kw_only=True)
class LossConfig:
    w_distill: float = 1.0  # weight of the UNIC distillation loss (0: no generic teachers)
    w_udon: float = 1.0  # weight of the UDON loss (used when udon.enabled)
    lam_cos: float = 0.5
    lam_sl1: float = 0.5
    drop_prob: float = 0.5  # teacher dropping probability p
    std_momentum_start: float = 1.0  # teacher standardisation EMA momentum, cosine start -> end
    std_momentum_end: float = 0.001


@dataclass(kw_only=True)
class TrainRunConfig(RunConfig):
    output_dir: str = "output/demo"  # checkpoints, exports, logs and the resolved config


@dataclass(kw_only=True)
class TrainConfig:
    log_every: int = 10  # steps between console/TensorBoard lines
    save_every: int = 0  # steps between periodic checkpoints (0: epoch ends only)
    keep_checkpoints: int = 1  # periodic checkpoint_stepN.pth files kept besides checkpoint.pth
    resume: bool = True  # continue from output_dir/checkpoint.pth when it exists
    validate: bool = True  # distillation loss + kNN top-1 (+ universal R@1) on the val split each epoch
    validate_first: bool = False  # also validate the untrained model before the first step
    max_steps: int = 0  # stop after this many steps in total (0: run all epochs)
    # torch.compile the student with its ladder, and each teacher (null: on CUDA with ddp); a part that fails
    # to compile runs eagerly, with a warning after the first step
    compile: Optional[bool] = None
    # ddp: every process holds the whole trainable model (DistributedDataParallel); fsdp: its weights, gradients
    # and AdamW state are sharded over the processes (torch's FSDP2 fully_shard: each student block, the rest of
    # the backbone, the ladder, the universal projection, then the root), for students that do not fit
    parallelism: str = "ddp"
    # recompute each student block in backward instead of keeping its activations (timm's grad checkpointing,
    # torch.utils.checkpoint): less memory for about a third more student compute
    activation_checkpointing: bool = False
    # consecutive non-finite (skipped) steps before the run stops (counted on the device, acted on at the next
    # logging or checkpoint step)
    max_bad_steps: int = 5
    collective_timeout_s: float = 1800.0  # a stalled rank ends the job with an error after this long


@dataclass(kw_only=True)
class UnicConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    udon: UdonConfig = field(default_factory=UdonConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    unifex: UnifexConfig = field(default_factory=UnifexConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)

    @staticmethod
    def check(cfg: DictConfig) -> None:
        _validate(cfg)


COMMON_CHOICES = {"run.device": ("auto", "cpu", "cuda"), "run.precision": ("auto", "bf16", "fp16", "fp32")}
_CHOICES = {
    "udon.sampling": ("dynamic", "round_robin", "size", "uniform"),
    "ladder.last_tap": ("raw", "normed"),
    "optim.clip_mode": ("global", "per_param"),
    "optim.optimizer": ("adamw", "adam"),
    "train.parallelism": ("ddp", "fsdp"),
    "data.decode": ("cpu", "gpu"),
}


def head_options(cfg: DictConfig) -> dict:
    """The margin-head keyword arguments the user set (unset ones keep the head's defaults); the head's name
    and its Partial FC sample rate are not arguments of the head."""
    return {k: v for k, v in cfg.heads.items() if k not in ("name", "partial_fc") and v is not None}


def config_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of a config (groups and settings), dotted."""
    keys = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict,):
            keys.extend(config_keys(value, full + "."))
    return keys


def closest_key(key: str, keys: Sequence[str]) -> str | None:
    """The valid key a mistyped one most likely means: its leaf names a valid key's leaf (``lr`` ->
    ``optim.lr``, ``run.seed`` -> ``run.seed``), else the closest full key."""
    leaf = key.rsplit(".", 1)[-1]
    leaves: dict[str, list[str]] = {}
    for full in keys:
        leaves.setdefault(full.rsplit(".", 1)[-1], []).append(full)
    if leaf in leaves:
        return min(leaves[leaf], key=lambda full: -difflib.SequenceMatcher(None, key, full).ratio())
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if close:
        return close[0]
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]][0] if close else None


def _explain(err: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError) and key:
        close = closest_key(key, config_keys(schema))
        hint = f"; did you mean '{close}'?" if close else ""
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    where = f"'{key}'" if key else "config"
    if "is not a ListConfig" in msg:  # a scalar for a list setting (data.domains=cars,sop)
        return ConfigError(f"invalid value for {where} in {source}: it is a list, written {key}=[a,b]")
    return ConfigError(f"invalid value for {where} in {source}: {msg}")


def check_choices(cfg: DictConfig, choices: dict[str, Collection[str]]) -> None:
    """Each ``key`` of ``choices`` holds one of its values (a ConfigError naming them otherwise)."""
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"invalid value for '{key}': {value!r}; choose one of {', '.join(map(str, allowed))}")


def check_range(cfg: DictConfig, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                unit: Sequence[str] = ()) -> None:
    """Numeric settings: ``positive`` > 0, ``non_negative`` >= 0, ``unit`` in [0, 1]; None (unset) passes."""
    for keys, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                           (unit, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value is not None and not ok(value):
                raise ConfigError(f"invalid value for '{key}': must be {what}, got {value}")


def _check_common(cfg: DictConfig) -> None:
    """The checks of the shared groups, for any schema that has them."""
    check_choices(cfg, {key: values for key, values in COMMON_CHOICES.items() if OmegaConf.select(cfg, key.split(".")[0]) is not None})
    if "data" in cfg and "batch_size_per_gpu" in cfg.data:
        check_range(cfg, positive=["data.batch_size_per_gpu"], non_negative=["data.num_workers"])


def _validate(cfg: DictConfig) -> None:
    """The training schema's checks (:class:`UnicConfig`)."""
    from unic.data.registry import dataset_names

    check_choices(cfg, {"data.dataset": dataset_names(trainable=True), **_CHOICES})
    check_range(cfg, positive=[
        "student.img_size", "optim.epochs", "ladder.hidden_dim",
        "ladder.last_hidden_dim", "train.log_every", "train.max_bad_steps", "train.collective_timeout_s",
    ], non_negative=[
        "optim.warmup_epochs", "optim.lr", "optim.min_lr", "optim.weight_decay",
        "optim.clip_grad", "udon.window_reset_every", "train.save_every", "train.max_steps", "train.keep_checkpoints",
        "data.worker_timeout_s", "data.shuffle_buffer", "student.drop_path",
    ], unit=["loss.drop_prob", "data.knn_train_fraction", "student.drop_path"])
    if not 0.0 < cfg.data.knn_train_fraction:
        raise ConfigError("invalid value for 'data.knn_train_fraction': must be > 0")
    for key in ("student.mean", "student.std"):
        value = list(OmegaConf.select(cfg, key))
        if len(value) != 3 or (key == "student.std" and min(value) <= 0):
            what = "three numbers > 0" if key == "student.std" else "three numbers"
            raise ConfigError(f"invalid value for '{key}': expected {what}, got {value}")
    check_range(cfg, positive=["data.global_batch"])
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"invalid value for 'optim.betas': expected two numbers, got {list(cfg.optim.betas)}")
    check_range(cfg, positive=["udon.teacher_dim", "udon.universal_dim", "udon.temperature", "udon.update_every"],
                non_negative=["loss.w_distill", "loss.w_udon", "udon.head_lr", "udon.relational_weight",
                              "udon.freeze_backbone_epochs", "udon.head_weight_decay"])
    distill, udon = objectives(cfg)
    unifex = unifex_enabled(cfg)
    if cfg.train.parallelism == "fsdp":
        _check_fsdp(cfg, unifex, udon)
    if unifex:
        _check_unifex(cfg, distill, udon)
    elif not distill and not udon:
        raise ConfigError("nothing to train: loss.w_distill is 0 and UDON is off (udon.enabled / loss.w_udon)")
    if udon or unifex:
        from unic.models.heads import MARGIN_HEADS, WEIGHT_INITS, head_kwargs

        inits = (*WEIGHT_INITS, "xavier_uniform") if unifex else WEIGHT_INITS  # UniFEx's own head init
        if cfg.heads.init is not None and cfg.heads.init not in inits:
            raise ConfigError(f"invalid value for 'heads.init': {cfg.heads.init!r}; choose one of {', '.join(inits)}")

        if cfg.heads.name not in MARGIN_HEADS:
            raise ConfigError(f"invalid value for 'heads.name': {cfg.heads.name!r}; choose one of {', '.join(MARGIN_HEADS)}")
        if cfg.heads.k is not None and cfg.heads.k < 1:
            raise ConfigError(f"invalid value for 'heads.k': must be >= 1, got {cfg.heads.k}")
        rate = cfg.heads.partial_fc
        if rate is not None and not 0.0 < rate <= 1.0:
            raise ConfigError(f"invalid value for 'heads.partial_fc': a sample rate in (0, 1], got {rate}")
        accepted = set(head_kwargs(cfg.heads.name)) - {"class_counts"}
        for key in head_options(cfg):
            if key not in accepted:
                raise ConfigError(f"'heads.{key}' does not apply to heads.name={cfg.heads.name} "
                                  f"(it takes: {', '.join(sorted(accepted)) or 'no option'})")
        if cfg.data.dataset == "imagenet":
            raise ConfigError("UDON needs labelled domains in the UnED layout (data.dataset=uned or demo); "
                              "set udon.enabled=false for ImageNet distillation")
    import timm

    if not timm.is_model(cfg.student.arch):
        close = difflib.get_close_matches(cfg.student.arch, timm.list_models("vit*"), n=1)
        raise ConfigError(f"invalid value for 'student.arch': timm has no model {cfg.student.arch!r}"
                          + (f"; did you mean '{close[0]}'?" if close else ""))
    if not distill:
        return
    if not cfg.teachers.names:
        raise ConfigError("'teachers.names' is empty: distillation needs at least one teacher (or loss.w_distill=0)")
    if len(set(cfg.teachers.names)) != len(cfg.teachers.names):
        raise ConfigError(f"'teachers.names' lists a teacher twice: {list(cfg.teachers.names)}")
    from teachers.registry import get_spec

    for name in cfg.teachers.names:
        try:
            get_spec(name)
        except ValueError as err:
            raise ConfigError(f"invalid value in 'teachers.names': {err}") from None
    unknown = set(cfg.teachers.weights) - set(cfg.teachers.names)
    if unknown:
        raise ConfigError(
            f"'teachers.weights' names teachers that are not in 'teachers.names': {sorted(unknown)}"
        )


def _check_fsdp(cfg: DictConfig, unifex: bool, udon: bool) -> None:
    """The combinations ``train.parallelism=fsdp`` does not run (yet), each refused in one line."""
    if unifex:
        raise ConfigError("train.parallelism=fsdp shards the UNIC student; the UniFEx recipe (unifex.enabled) "
                          "trains a frozen backbone under train.parallelism=ddp")
    if cfg.train.compile:
        raise ConfigError("train.compile with train.parallelism=fsdp is not supported (a compiled model would trace "
                          "FSDP's hooks); set train.compile=false or train.parallelism=ddp")
    if cfg.run.precision == "fp16":
        raise ConfigError("run.precision=fp16 with train.parallelism=fsdp is not supported (its loss scaler does "
                          "not see the sharded gradients); use run.precision=bf16 or auto")
    if udon and cfg.heads.partial_fc is not None:
        raise ConfigError("heads.partial_fc with train.parallelism=fsdp is not supported yet (Partial FC's "
                          "sharded centres are checkpointed apart); use train.parallelism=ddp")


def _check_unifex(cfg: DictConfig, distill: bool, udon: bool) -> None:
    """The UniFEx recipe's settings (``unifex.enabled``)."""
    if distill or udon:
        raise ConfigError("the UniFEx recipe (unifex.enabled) trains alone: set loss.w_distill=0 and "
                          "udon.enabled=false")
    if not cfg.unifex.backbone:
        raise ConfigError("unifex.backbone is required: timm:<model>[.<tag>] or open_clip:<arch>[:<tag>]")
    from unic.data.csv_list import UNIFEX_TRANSFORMS
    from unic.models.unifex import NECKS, check_backbone_name

    try:
        check_backbone_name(cfg.unifex.backbone)
    except ValueError as err:
        raise ConfigError(f"invalid value for 'unifex.backbone': {err}") from None
    if cfg.unifex.kwargs and not cfg.unifex.backbone.startswith("timm:"):
        raise ConfigError("'unifex.kwargs' apply to timm backbones only")
    check_choices(cfg, {"unifex.neck": NECKS, "unifex.transform": UNIFEX_TRANSFORMS})
    check_range(cfg, positive=["unifex.embed_dim", "unifex.img_size"],
                non_negative=["unifex.unfreeze_last_blocks", "unifex.backbone_lr_scale"])
    if not 0.0 <= cfg.unifex.dropout < 1.0:
        raise ConfigError(f"invalid value for 'unifex.dropout': must be in [0, 1), got {cfg.unifex.dropout}")
    if not 0.0 < cfg.unifex.layer_decay <= 1.0:
        raise ConfigError(f"invalid value for 'unifex.layer_decay': must be in (0, 1], got {cfg.unifex.layer_decay}")
    for key in ("unifex.mean", "unifex.std"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (len(value) != 3 or (key == "unifex.std" and min(value) <= 0)):
            raise ConfigError(f"invalid value for '{key}': expected three numbers{' > 0' if key == 'unifex.std' else ''}"
                              f" (or null: the backbone's own), got {list(value)}")
    if cfg.unifex.neck == "pool" and cfg.unifex.unfreeze_last_blocks == 0:
        raise ConfigError("unifex.neck=pool has no parameters: with a frozen backbone nothing the descriptor uses "
                          "is trained; set unifex.unfreeze_last_blocks > 0 or unifex.neck=proj")


def _free_dicts(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Paths of the schema's free-form dict fields (``student.kwargs``, ``teachers.weights``)."""
    paths = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if OmegaConf.get_type(node) is dict:
                paths.append(f"{prefix}{key}")
            else:
                paths.extend(_free_dicts(node, f"{prefix}{key}."))
    return paths


def _merge_replacing(cfg: DictConfig, source: DictConfig, replace: list[str]) -> DictConfig:
    """``OmegaConf.merge`` (which validates keys and types), except that the free-form dicts at the paths
    ``replace`` that ``source`` gives replace those of ``cfg`` instead of merging into them (lists are
    replaced by the merge itself)."""
    merged = OmegaConf.merge(cfg, source)
    for path in replace:
        node = OmegaConf.select(source, path, default=None)
        if isinstance(node, DictConfig):
            OmegaConf.update(merged, path, node, merge=False)
    return merged


def resolve_batch(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(global batch, per-GPU batch) for ``world_size`` processes: ``data.global_batch`` when set, else
    ``data.batch_size_per_gpu`` times the world size."""
    if cfg.data.global_batch is None:
        return cfg.data.batch_size_per_gpu * world_size, cfg.data.batch_size_per_gpu
    if cfg.data.global_batch % world_size:
        raise ConfigError(f"data.global_batch={cfg.data.global_batch} is not divisible by the {world_size} "
                          "processes; change the number of processes or data.global_batch")
    return cfg.data.global_batch, cfg.data.global_batch // world_size


def objectives(cfg: DictConfig) -> tuple[bool, bool]:
    """(distil the generic teachers, train the UDON heads): which halves of the loss are on."""
    return cfg.loss.w_distill > 0, bool(cfg.udon.enabled and cfg.loss.w_udon > 0)


def unifex_enabled(cfg: DictConfig) -> bool:
    """The UniFEx recipe (frozen backbone, neck, one margin head over the merged labels) is the objective;
    configs without the group (older checkpoints) predate it."""
    return bool(OmegaConf.select(cfg, "unifex.enabled", default=False))


def final_norm_frozen(cfg: DictConfig) -> bool:
    """UNIC's raw last tap leaves the student's final norm out of training, unless the UDON heads use it."""
    distill, udon = objectives(cfg)
    return distill and cfg.ladder.last_tap == "raw" and not udon


def derived_schedule(cfg: DictConfig, global_batch: int, steps_per_epoch: int) -> dict:
    """The values the run derives from the config once, at setup: peak lrs, step counts, warm-up, freezing."""
    _, udon = objectives(cfg)
    lr = cfg.optim.lr * (global_batch / 256 if cfg.optim.scale_lr else 1.0)
    backbone_lr, backbone_min_lr = lr, cfg.optim.min_lr
    if udon and cfg.udon.backbone_lr_scale is not None:
        backbone_lr = cfg.udon.head_lr * cfg.udon.backbone_lr_scale
    if unifex_enabled(cfg):  # neck and head at lr; the trained blocks (if any) at lr * scale (* layer decay)
        backbone_lr = lr * cfg.unifex.backbone_lr_scale
        # the same cosine, scaled: a floor of optim.min_lr would lie above a small scaled peak (a rising lr)
        backbone_min_lr = cfg.optim.min_lr * cfg.unifex.backbone_lr_scale
    total = cfg.optim.epochs * steps_per_epoch
    return {
        "lr": lr, "backbone_lr": backbone_lr, "backbone_min_lr": backbone_min_lr,
        "head_lr": cfg.udon.head_lr if udon else None,
        "total_steps": total, "run_steps": min(cfg.train.max_steps or total, total),
        "warmup_steps": min(round(cfg.optim.warmup_epochs * steps_per_epoch), total),
        "freeze_steps": round(cfg.udon.freeze_backbone_epochs * steps_per_epoch) if udon else 0,
    }


def packaged_presets() -> list[str]:
    """The names of the presets shipped in ``unic/configs`` (``--config <name>`` finds them anywhere)."""
    return sorted(name[: -len(".yaml")] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))


def resolve_config_file(name: str) -> str:
    """A ``--config`` value as a file: a path as given, else the packaged preset of that name
    (``unic_vitb16_in1k`` or ``unic_vitb16_in1k.yaml``), so presets can be named outside the checkout."""
    if os.path.isfile(os.path.expanduser(name)):
        return os.path.expanduser(name)
    stem = os.path.basename(name)
    packaged = os.path.join(CONFIG_DIR, stem if stem.endswith((".yaml", ".yml")) else f"{stem}.yaml")
    if os.sep not in name.replace("unic/configs/", "") and os.path.isfile(packaged):
        return packaged
    raise ConfigError(f"config file not found: {name} (packaged presets: {', '.join(packaged_presets())})")


def load_config(config_file: str | None = None, overrides: list[str] | None = None, schema=UnicConfig) -> DictConfig:
    """Build the configuration of ``schema``: its defaults <- YAML file (a path or a packaged preset name)
    <- ``key=value`` overrides; then the shared groups' checks and the schema's own ``check(cfg)``."""
    base = OmegaConf.structured(schema)
    dict_paths = _free_dicts(base)
    cfg = base
    if config_file:
        config_file = resolve_config_file(config_file)
        try:
            file_cfg = OmegaConf.load(config_file)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {config_file}: {str(err).splitlines()[0]}") from None
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings, not a list")
        try:
            cfg = _merge_replacing(cfg, file_cfg, dict_paths)
        except OmegaConfBaseException as err:
            raise _explain(err, base, config_file) from None
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' is not of the form key=value")
        try:  # one at a time, so that `student.kwargs={}` then `student.kwargs.depth=2` reads as written
            for item in overrides:
                key = item.split("=", 1)[0].strip()
                cfg = _merge_replacing(cfg, OmegaConf.from_dotlist([item]), [key] if key in dict_paths else [])
        except OmegaConfBaseException as err:
            raise _explain(err, base, "command-line overrides") from None
    _check_common(cfg)
    if hasattr(schema, "check"):
        schema.check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python data (stored in checkpoints, no pickled objects)."""
    return OmegaConf.to_container(cfg, resolve=True)


RESUME_KEYS = ("student", "ladder", "teachers.names", "udon", "heads", "unifex", "loss.w_distill", "loss.w_udon",
               "data.dataset", "data.domains", "optim.epochs", "optim.optimizer", "run.seed")
# settings that moved: (old path, new path), applied to the configs of older checkpoints
MOVED_KEYS = tuple((f"train.{key}", f"run.{key}") for key in ("output_dir", "seed", "device", "precision"))
RESUME_IGNORED = ("heads.init",)  # inside RESUME_KEYS, but replaced by the checkpoint's state on resume


def _fill_missing(saved: dict, defaults: dict, free_dicts: set[str], prefix: str = "") -> None:
    """Give ``saved`` (a config from an older checkpoint) the schema defaults of the settings added since.

    Every setting is added with a default that keeps the behaviour from before it existed, so a checkpoint
    that lacks it was trained as that default says. Free-form dicts (``student.kwargs``) are left as saved.
    """
    for key, value in defaults.items():
        path = f"{prefix}{key}"
        if key not in saved:
            saved[key] = value
        elif isinstance(value, dict) and isinstance(saved[key], dict) and path not in free_dicts:
            _fill_missing(saved[key], value, free_dicts, path + ".")


def resume_mismatches(saved: dict, cfg: DictConfig, saved_world: int | None = None, world: int = 1) -> list[str]:
    """Settings that shape the model, data order or schedules and differ from the checkpoint's config.

    The batch is compared as the global batch each config gives on its own number of processes (so
    ``data.global_batch: 512`` on 4 GPUs resumes a run of 128 per GPU on 4)."""
    if not saved:
        return ["the checkpoint holds no config"]
    schema = OmegaConf.structured(UnicConfig)
    saved = json.loads(json.dumps(saved))  # a plain, private copy
    for old, new in MOVED_KEYS:
        (old_group, old_key), (new_group, new_key) = old.split("."), new.split(".")
        if old_key in saved.get(old_group, {}):
            saved.setdefault(new_group, {}).setdefault(new_key, saved[old_group].pop(old_key))
    # whole sections added later: the runs written before them had UDON off
    if "udon" not in saved:
        saved["udon"] = {"enabled": False}
        saved.setdefault("loss", {}).setdefault("w_udon", 0.0)
    _fill_missing(saved, OmegaConf.to_container(schema), set(_free_dicts(schema)))
    current = to_plain(cfg)
    for path in RESUME_IGNORED:
        *parents, leaf = path.split(".")
        for config in (saved, current):
            for key in parents:
                config = config.get(key) or {}
            config.pop(leaf, None)
    saved_cfg, cfg = OmegaConf.create(saved), OmegaConf.create(current)
    udon = objectives(saved_cfg)[1] or objectives(cfg)[1]
    unifex = unifex_enabled(saved_cfg) or unifex_enabled(cfg)
    # the settings of an objective off in both play no part (the margin heads serve UDON and UniFEx)
    unused = ({"udon", "loss.w_udon"} if not udon else set()) | ({"unifex"} if not unifex else set()) \
        | ({"heads"} if not (udon or unifex) else set())
    keys = [k for k in RESUME_KEYS if k not in unused]
    diffs = []
    for key in keys:
        old, new = OmegaConf.select(saved_cfg, key), OmegaConf.select(cfg, key)
        old = OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old
        new = OmegaConf.to_container(new) if isinstance(new, (DictConfig, ListConfig)) else new
        if old != new:
            diffs.append(f"{key}: checkpoint {old!r}, now {new!r}")
    try:
        old_batch = resolve_batch(saved_cfg, saved_world or world)[0]
    except ConfigError:
        old_batch = None
    new_batch = resolve_batch(cfg, world)[0]
    if old_batch != new_batch:
        diffs.append(f"global batch: checkpoint {old_batch}, now {new_batch}")
    return diffs


def save_config(cfg: DictConfig, path: str) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    from unic.io import write_text

    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
