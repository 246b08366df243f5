"""The preflight plan: what a configuration will build and run, computed without data, weights or a GPU.

``python main_unic.py --config F [key=value ...] --plan`` prints it and writes ``plan.json``; every training run
logs the same plan at start-up and writes it next to its config. The models are built on the meta device
(no memory is allocated, so a ViT-g teacher costs nothing), which also gives the FLOPs per image
(``torch.utils.flop_counter``) and the activations saved for backward that the GPU memory estimate uses.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from unic.config import derived_schedule, objectives, resolve_batch, unifex_enabled
from unic.distributed import AUTOCAST_DTYPES, resolve_precision

logger = logging.getLogger(__name__)

# images in the train split of data sets whose root may not be on the planning machine
KNOWN_TRAIN_SIZES = {"imagenet": 1_281_167}
ADAMW_BYTES_PER_PARAM = 16  # fp32 weight, gradient and the two AdamW moments


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _quiet(name: str):
    """Silence a logger (the random-teacher warning of meta builds) for the duration."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def weights_status(name: str, cfg: DictConfig) -> dict:
    """Where a teacher's weights come from and whether that file exists (never raises)."""
    from teachers.build import TeacherWeightsError, resolve_weights
    from teachers.registry import get_spec
    from unic.train.build import teacher_weights

    spec = get_spec(name)
    given = teacher_weights(cfg)[name]
    try:
        kind, where = resolve_weights(spec, given, cfg.teachers.weights_dir)
        return {"weights": kind, "file": where if kind == "file" else None,
                "exists": kind != "file" or os.path.isfile(where), "hub": where if kind == "hub" else None, "url": spec.url}
    except TeacherWeightsError:
        explicit = given not in (None, "hub", "random")
        path = os.path.expanduser(given) if explicit else (
            os.path.join(os.path.expanduser(cfg.teachers.weights_dir), spec.filename) if spec.filename else None)
        return {"weights": "file", "file": path, "exists": False, "hub": None, "url": spec.url}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _saved_bytes(fn, exclude: list[torch.Tensor], checkpointed: list[nn.Module] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (parameters excluded). The inputs of
    the ``checkpointed`` modules (run under torch.utils.checkpoint, which keeps them for the recomputation
    instead of saving what the module computes) are counted as saved."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    def keep_input(module, args) -> None:  # noqa: ARG001
        pack(args[0])

    handles = [m.register_forward_pre_hook(keep_input) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values())


def _memory_gb(trainable: int, frozen: int, units: list[int], teachers: int, act: int, recompute: int,
               per_gpu: int, world_size: int, precision: str, parallelism: str) -> dict:
    """The GPU memory estimate of one process (GB) under ``parallelism`` (ddp | fsdp): ``trainable`` /
    ``frozen`` parameters of the trained model, ``units`` the parameters of each FSDP unit, ``teachers`` the
    frozen teachers' parameters, ``act`` the bytes saved for backward per image and ``recompute`` those of
    one checkpointed block recomputed in backward (0 without activation checkpointing)."""
    low_precision = precision in ("bf16", "fp16")
    fsdp = parallelism == "fsdp" and world_size > 1  # one process trains the plain model (as ddp)
    shards = world_size if fsdp else 1
    memory = {
        "trainable_params": trainable,
        # fp32 weights, gradients and AdamW moments; fsdp: each process holds 1 / world size of them
        "weights_grads_adamw_gb": trainable * ADAMW_BYTES_PER_PARAM / shards / 2**30,
        # autocast's low-precision copies of the trained weights, cached for the forward and backward (the
        # teachers run in inference mode: their casts are not cached); fsdp gathers them in bf16 instead
        "autocast_weight_copies_gb": trainable * 2 / 2**30 if low_precision and not fsdp else 0.0,
        "teachers_gb": teachers * (2 if precision == "bf16" else 4) / 2**30,  # bf16 runs keep bf16 teachers
        "activations_per_image_mb": act / 2**20,
        "activations_gb": (act * per_gpu + recompute * per_gpu) / 2**30,
    }
    if fsdp:
        # the frozen weights' shards, and the two largest units gathered at once (one computing, the next
        # prefetched), each with its weights in the gathered dtype and its unsharded fp32 gradients
        gathered = sum(sorted(units)[-2:]) * ((2 if low_precision else 4) + 4)
        memory["frozen_shards_gb"] = frozen * 4 / shards / 2**30
        memory["fsdp_gathered_gb"] = gathered / 2**30
    else:
        memory["frozen_gb"] = frozen * 4 / 2**30
    memory["total_gb"] = sum(v for k, v in memory.items() if k.endswith("_gb"))
    return memory


def skipped_features(cfg: DictConfig, data_skips: list[dict] | None = None, device: torch.device | None = None) -> list[dict]:
    """What the run will not do although asked, and why: ``data_skips`` (validation without a val split, from
    :func:`unic.train.build.build_datasets`) and what the machine lacks (TensorBoard, matplotlib, a C++
    compiler for ``train.compile`` on CPU). Each is ``{"feature", "reason"}``, warned once at start-up."""
    from unic.train.build import compile_unavailable
    from unic.train.logger import tensorboard_available

    skipped = list(data_skips or [])
    if not tensorboard_available():
        skipped.append({"feature": "TensorBoard", "reason": "the tensorboard package is not installed "
                        "(pip install tensorboard); metrics.jsonl is written all the same"})
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        skipped.append({"feature": "curves.png", "reason": "matplotlib is not installed"})
    reason = compile_unavailable(cfg, device or torch.device("cpu" if cfg.run.device == "cpu" else "cuda"))
    if reason:
        skipped.append({"feature": "train.compile", "reason": f"{reason}; the student runs eagerly"})
    return skipped


def _schedule(cfg: DictConfig, global_batch: int, per_gpu: int, num_train_images: int | None,
              precision: str) -> dict:
    """The batch, lrs and step counts (those that need the train split's size are None without it)."""
    known = num_train_images is not None
    if not known:
        num_train_images = KNOWN_TRAIN_SIZES.get(cfg.data.dataset)
    steps_per_epoch = num_train_images // global_batch if num_train_images else None
    derived = derived_schedule(cfg, global_batch, steps_per_epoch or 0)
    schedule = {
        "global_batch": global_batch, "batch_per_gpu": per_gpu, "lr": derived["lr"], "lr_base": cfg.optim.lr,
        "lr_scaled_with_batch": bool(cfg.optim.scale_lr), "min_lr": cfg.optim.min_lr,
        "backbone_lr": derived["backbone_lr"], "head_lr": derived["head_lr"], "optimizer": cfg.optim.optimizer,
        "weight_decay": [cfg.optim.weight_decay, cfg.optim.weight_decay_end], "epochs": cfg.optim.epochs,
        "train_images": num_train_images,
        "train_images_source": "data" if known else ("assumed: data.root not read" if num_train_images else "unknown"),
        "steps_per_epoch": steps_per_epoch, "total_steps": None, "run_steps": None, "warmup_steps": None,
        "backbone_frozen_steps": None,
        "clip_grad": cfg.optim.clip_grad, "clip_mode": cfg.optim.clip_mode, "precision": precision,
    }
    if steps_per_epoch:
        schedule.update(total_steps=derived["total_steps"], run_steps=derived["run_steps"],
                        warmup_steps=derived["warmup_steps"], backbone_frozen_steps=derived["freeze_steps"])
    return schedule


def _unifex_plan(cfg: DictConfig, plan: dict, per_gpu: int, precision: str, num_classes: int | None) -> dict:
    """The UniFEx recipe's model (backbone, neck, head over ``num_classes`` merged classes when known), FLOPs
    and memory, built on the meta device."""
    from unic.config import head_options
    from unic.models.unifex import build_unifex_head, parse_backbone_name
    from unic.train.build import build_unifex, input_spec

    u = cfg.unifex
    with torch.device("meta"):
        model = build_unifex(cfg, load_weights=False)
        head = None
        if num_classes:
            counts = [1] * num_classes  # DynM-ArcFace margins need counts; the sizes do not depend on them
            head = build_unifex_head(cfg.heads.name, u.embed_dim, num_classes, head_options(cfg), counts)
    backbone = model.backbone
    size, mean, std = input_spec(cfg)
    weights = u.weights
    head_params = _count(head) if head is not None else None
    rate = cfg.heads.partial_fc
    per_rank = head_params
    if head_params is not None and rate is not None:  # Partial FC: each rank holds a shard of the centres
        from unic.models.partial_fc import shard_range

        start, stop = shard_range(num_classes, 0, plan["world_size"])
        per_rank = head_params * (stop - start) // num_classes
    trainable = _count(model, trainable_only=True) + (head_params or 0)
    trainable_per_rank = _count(model, trainable_only=True) + (per_rank or 0)
    plan["unifex"] = {
        "backbone": u.backbone, "source": parse_backbone_name(u.backbone)[0], "kwargs": dict(u.kwargs),
        "weights": weights or "hub", "weights_exists": weights in (None, "random") or os.path.isfile(os.path.expanduser(weights)),
        "img_size": size, "mean": list(mean), "std": list(std), "feature_dim": backbone.feature_dim,
        "params": _count(backbone), "trainable_params": _count(backbone, trainable_only=True),
        "blocks": backbone.num_blocks, "unfrozen_blocks": u.unfreeze_last_blocks, "layer_decay": u.layer_decay,
        "neck": u.neck, "embed_dim": u.embed_dim, "neck_params": _count(model.neck), "dropout": u.dropout,
        "head": cfg.heads.name, "num_classes": num_classes, "head_params": head_params,
        "partial_fc": rate, "head_params_per_rank": per_rank,
        "total_params": _count(model) + (head_params or 0), "total_trainable_params": trainable,
        "transform": u.transform,
    }
    batch = 2
    images = torch.empty(batch, 3, size, size, device="meta")
    model.train()

    def step() -> None:
        out = model(images)["embedding"].float().sum()
        out.backward()

    flops = {"backbone_neck_fwd_bwd": _flops(step) // batch}
    if head is not None:  # the cosine to every class centre, forward and backward
        flops["head_fwd_bwd"] = 3 * 2 * head.weight.shape[0] * u.embed_dim
    flops["total"] = sum(flops.values())
    plan["flops_per_image"] = flops
    plan["tflops_per_step_per_gpu"] = flops["total"] * per_gpu / 1e12
    dtype = AUTOCAST_DTYPES[precision] or torch.float32
    model.to(dtype)
    act = _saved_bytes(lambda: model(images.to(dtype)), list(model.parameters())) // batch
    frozen = plan["unifex"]["params"] - plan["unifex"]["trainable_params"]
    low_precision = precision in ("bf16", "fp16")
    memory = {
        "trainable_params": trainable_per_rank,
        "weights_grads_adamw_gb": trainable_per_rank * ADAMW_BYTES_PER_PARAM / 2**30,
        "autocast_weight_copies_gb": _count(model, trainable_only=True) * 2 / 2**30 if low_precision else 0.0,
        "frozen_backbone_gb": frozen * 4 / 2**30,
        "activations_per_image_mb": act / 2**20,
        "activations_gb": act * per_gpu / 2**30,
    }
    memory["total_gb"] = sum(memory[k] for k in ("weights_grads_adamw_gb", "autocast_weight_copies_gb",
                                                 "frozen_backbone_gb", "activations_gb"))
    memory["note"] = ("estimate: fp32 trainable state (neck, head, trained blocks) with Adam(W) (DDP's buckets hold "
                      "the gradients themselves), autocast weight copies, the fp32 frozen backbone and the tensors "
                      "saved for backward (frozen layers save none); excludes the frozen layers' transient activations, "
                      "the CUDA context and allocator slack")
    plan["memory_per_gpu"] = memory
    return plan


def build_plan(cfg: DictConfig, world_size: int = 1, num_train_images: int | None = None,
               device: torch.device | None = None, skipped: list[dict] | None = None,
               num_classes: int | None = None) -> dict:
    """The plan of ``cfg`` on ``world_size`` processes; ``num_train_images`` when the train split is known,
    ``device`` the one the run uses (default: CUDA unless ``run.device=cpu``, the target of a real run),
    ``skipped`` the features the run turns off (:func:`skipped_features`), ``num_classes`` the size of the
    UniFEx recipe's merged label space when the train split is known (its head is then counted too)."""
    from unic.models.ladder import UnicModel
    from unic.train.build import build_backbone, build_ladder, build_teachers

    distill, udon = objectives(cfg)
    device = device or torch.device("cpu" if cfg.run.device == "cpu" else "cuda")
    precision = resolve_precision(cfg.run.precision, device)
    global_batch, per_gpu = resolve_batch(cfg, world_size)
    plan: dict = {"world_size": world_size, "device": device.type, "skipped": list(skipped or [])}
    if unifex_enabled(cfg):
        plan["teachers"] = {}
        plan["schedule"] = _schedule(cfg, global_batch, per_gpu, num_train_images, precision)
        return _unifex_plan(cfg, plan, per_gpu, precision, num_classes)

    with torch.device("meta"):  # the trainer's builders, without weights
        backbone = build_backbone(cfg, load_pretrained=False)
        teachers, ladder = {}, None
        if distill:
            with _quiet("teachers.build"):
                teachers = {t.name: t for t in build_teachers(cfg, weights="random").values()}
            ladder = build_ladder(cfg, backbone, {n: t.embed_dim for n, t in teachers.items()})

    patch = backbone.patch_embed.patch_size[0]
    plan["student"] = {
        "arch": cfg.student.arch, "kwargs": OmegaConf.to_container(cfg.student.kwargs, resolve=True),
        "img_size": cfg.student.img_size,
        "width": backbone.embed_dim, "depth": len(backbone.blocks), "heads": backbone.blocks[0].attn.num_heads,
        "patch": patch, "tokens": backbone.patch_embed.num_patches + backbone.num_prefix_tokens,
        "registers": backbone.num_reg_tokens, "layerscale": not isinstance(backbone.blocks[0].ls1, nn.Identity),
        "params": _count(backbone), "trainable_params": _count(backbone, trainable_only=True),
        "drop_path": cfg.student.drop_path, "pretrained": cfg.student.pretrained,
    }
    if ladder is not None:
        plan["ladder"] = {
            "projectors": sum(len(m) for per_type in ladder.projectors.values() for m in per_type.values()),
            "params": _count(ladder), "blocks": ladder.blocks, "last_tap": cfg.ladder.last_tap,
            "hidden_dim": cfg.ladder.hidden_dim, "last_hidden_dim": cfg.ladder.last_hidden_dim,
        }
    plan["teachers"] = {
        name: {"arch": t.spec.arch, "source": t.spec.source, "resolution": t.spec.resolution,
               "patch": t.tokens.patch_size, "dim": t.embed_dim, "params": _count(t), **weights_status(name, cfg)}
        for name, t in teachers.items()
    }
    if udon:
        plan["udon"] = {"head": cfg.heads.name, "teacher_dim": cfg.udon.teacher_dim,
                        "universal_dim": cfg.udon.universal_dim, "sampling": cfg.udon.sampling}

    plan["schedule"] = _schedule(cfg, global_batch, per_gpu, num_train_images, precision)

    # FLOPs per image (batch of 2 on the meta device, halved)
    batch = 2
    model = UnicModel(backbone, ladder, None, cfg.ladder.last_tap).train()
    images = torch.empty(batch, 3, cfg.student.img_size, cfg.student.img_size, device="meta")

    def student_step() -> None:
        backbone(images).float().sum().backward()

    def student_ladder_step() -> None:
        out = model(images)
        loss = out["cls"].float().sum()
        for per_type in out.get("preds", {}).values():
            loss = loss + sum(v.float().sum() for v in per_type.values())
        loss.backward()

    flops = {"student_fwd_bwd": _flops(student_step) // batch}
    if ladder is not None:
        flops["ladder_fwd_bwd"] = _flops(student_ladder_step) // batch - flops["student_fwd_bwd"]
    for name, t in teachers.items():
        x = torch.empty(batch, 3, t.spec.resolution, t.spec.resolution, device="meta")
        with torch.inference_mode():
            flops[f"teacher/{name}"] = _flops(lambda: t.tokens(x)) // batch
    flops["total"] = sum(flops.values())
    plan["flops_per_image"] = flops
    plan["tflops_per_step_per_gpu"] = flops["total"] * per_gpu / 1e12

    # GPU memory per process: trainable state, frozen teachers, activations saved for backward, for the run's
    # settings and for each way of scaling out (ddp / fsdp, with and without activation checkpointing)
    from unic.train.build import fsdp_units

    dtype = AUTOCAST_DTYPES[precision] or torch.float32
    model.to(dtype)  # meta tensors: nothing is allocated or converted
    act_images = images.to(dtype)
    params = list(model.parameters())
    saved = {}
    for checkpointing in (False, True):
        backbone.set_grad_checkpointing(checkpointing)
        blocks = list(backbone.blocks) if checkpointing else []
        saved[checkpointing] = _saved_bytes(lambda: model(act_images), params, blocks) // batch
    backbone.set_grad_checkpointing(bool(cfg.train.activation_checkpointing))
    block = backbone.blocks[0]
    tokens = torch.empty(batch, plan["student"]["tokens"], backbone.embed_dim, device="meta", dtype=dtype)
    recompute = _saved_bytes(lambda: block(tokens), params) // batch  # one block's, while it is recomputed
    trainable, frozen = _count(model, trainable_only=True), _count(model) - _count(model, trainable_only=True)
    units, assigned = [], set()
    for unit in fsdp_units(model):  # innermost first: each unit's own parameters, without its inner units'
        own = [p for p in unit.parameters() if id(p) not in assigned]
        assigned.update(id(p) for p in own)
        units.append(sum(p.numel() for p in own))
    teacher_params = sum(_count(t) for t in teachers.values())
    options = {}
    for parallelism in ("ddp", "fsdp"):
        for checkpointing in (False, True):
            name = parallelism + ("+ac" if checkpointing else "")
            options[name] = _memory_gb(trainable, frozen, units, teacher_params, saved[checkpointing],
                                       recompute if checkpointing else 0, per_gpu, world_size, precision,
                                       parallelism)["total_gb"]
    checkpointing = bool(cfg.train.activation_checkpointing)
    memory = _memory_gb(trainable, frozen, units, teacher_params, saved[checkpointing],
                        recompute if checkpointing else 0, per_gpu, world_size, precision, cfg.train.parallelism)
    memory["parallelism"] = cfg.train.parallelism
    memory["activation_checkpointing"] = checkpointing
    memory["total_gb_by_setup"] = options  # ddp, ddp+ac, fsdp, fsdp+ac on this world size
    memory["note"] = ("estimate: fp32 trainable state with AdamW (sharded over the processes with fsdp; DDP's buckets "
                      "hold the gradients themselves), autocast weight copies (fsdp: the two largest units gathered in "
                      "the compute dtype with their fp32 gradients), teacher weights "
                      f"({'bf16' if precision == 'bf16' else 'fp32'}), and the tensors saved for backward by the "
                      f"model cast to {precision} with attention unfused (activation checkpointing: the blocks' inputs and one block "
                      "recomputed); autocast keeps some of them (norm and softmax inputs) in fp32, flash attention "
                      "saves less. Excludes the CUDA context, teacher activations (transient, inference mode) "
                      "and allocator slack")
    plan["memory_per_gpu"] = memory
    return plan


def count_text(n: float) -> str:
    """A parameter count a reader takes in at once: 86.6M, 21.3k, 340."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def flops_text(n: float) -> str:
    """FLOPs with the unit that keeps them readable: 17.6 GFLOP, 3.1 MFLOP."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def gb_text(gb: float) -> str:
    return f"{gb:.1f} GB" if gb >= 0.1 else f"{gb * 1024:.1f} MB"


def student_text(s: dict) -> str:
    """The student's real architecture, e.g. ``ViT width 32, depth 2, heads 2, patch 8, 32 px``."""
    return (f"ViT width {s['width']}, depth {s['depth']}, heads {s['heads']}, patch {s['patch']}, "
            f"{s['img_size']} px")


def unifex_text(u: dict) -> list[str]:
    """The UniFEx model's lines: backbone (what trains), neck, head."""
    state = "" if u["weights"] in ("hub", "random") else (" (found)" if u["weights_exists"] else " (MISSING)")
    trained = (f"last {u['unfrozen_blocks']} of {u['blocks']} blocks trained ({count_text(u['trainable_params'])}), "
               f"layer decay {u['layer_decay']}" if u["unfrozen_blocks"] else f"frozen ({u['blocks']} blocks)")
    head = (f"{u['num_classes']} merged classes, {count_text(u['head_params'])} params" if u["num_classes"]
            else "classes unknown (train split not read)")
    if u.get("partial_fc") is not None:
        head += (f", Partial FC at rate {u['partial_fc']}"
                 + (f" ({count_text(u['head_params_per_rank'])} per rank)" if u["head_params_per_rank"] else ""))
    return [
        f"backbone {u['backbone']}, {u['img_size']} px, feature {u['feature_dim']}, {count_text(u['params'])} params, "
        f"{trained}; weights {u['weights']}{state}",
        f"neck     {u['neck']} -> {u['embed_dim']}-d descriptor, {count_text(u['neck_params'])} params"
        + (f", dropout {u['dropout']}" if u["neck"] == "proj" else "") + f"; transform {u['transform']}",
        f"head     {u['head']} over {head}; trained in all {count_text(u['total_trainable_params'])} of "
        f"{count_text(u['total_params'])} params",
    ]


def format_plan(plan: dict) -> str:
    """The plan as the lines a researcher reads before a long run."""
    sch, mem, fl = plan["schedule"], plan["memory_per_gpu"], plan["flops_per_image"]
    if "unifex" in plan:
        lines = unifex_text(plan["unifex"])
    else:
        s = plan["student"]
        kwargs = ", ".join(f"{k}={v}" for k, v in s["kwargs"].items())
        lines = [
            f"student  {student_text(s)} ({s['tokens']} tokens), {count_text(s['params'])} params "
            f"({count_text(s['trainable_params'])} trained); timm {s['arch']}" + (f" with {kwargs}" if kwargs else "")
            + f"; LayerScale {'yes' if s['layerscale'] else 'no'}, registers {s['registers']}, drop path {s['drop_path']}",
        ]
    if "ladder" in plan:
        lad = plan["ladder"]
        lines.append(f"ladder   {lad['projectors']} projectors, {count_text(lad['params'])} params, blocks {lad['blocks']}, "
                     f"hidden {lad['hidden_dim']} / {lad['last_hidden_dim']} (last), last tap {lad['last_tap']}")
    for name, t in plan["teachers"].items():
        where = t["file"] or t["hub"] or t["weights"]
        state = "" if t["weights"] != "file" else (" (found)" if t["exists"] else " (MISSING)")
        lines.append(f"teacher  {name}: {t['arch']} ({t['source']}), {t['resolution']} px, patch {t['patch']}, "
                     f"dim {t['dim']}, {count_text(t['params'])} params, weights {where}{state}")
    if "udon" in plan:
        u = plan["udon"]
        lines.append(f"udon     {u['head']} heads, teacher dim {u['teacher_dim']}, universal dim {u['universal_dim']}, "
                     f"sampling {u['sampling']}")
    steps = (f"{sch['steps_per_epoch']} steps/epoch x {sch['epochs']} epochs = {sch['total_steps']} steps, "
             f"{sch['warmup_steps']} warm-up" if sch["steps_per_epoch"] else "steps unknown (train split not read)")
    if sch["run_steps"] is not None and sch["run_steps"] != sch["total_steps"]:
        steps += f", stopping after {sch['run_steps']} (train.max_steps)"
    if sch["backbone_frozen_steps"]:
        steps += f", backbone frozen for {sch['backbone_frozen_steps']}"
    images = f"{sch['train_images']} train images ({sch['train_images_source']})" if sch["train_images"] else ""
    lines += [
        f"batch    global {sch['global_batch']} = {plan['world_size']} x {sch['batch_per_gpu']} per GPU; "
        f"lr {sch['lr']:.3g}" + (f" (= {sch['lr_base']:.3g} x {sch['global_batch']} / 256)" if sch["lr_scaled_with_batch"] else "")
        + f", min {sch['min_lr']:.3g}"
        + (f"; backbone lr {sch['backbone_lr']:.3g}" if sch["backbone_lr"] != sch["lr"] else "")
        + (f"; head lr {sch['head_lr']:.3g}" if sch["head_lr"] is not None else "")
        + f"; {sch['optimizer']}; {sch['precision']} on {plan['device']}; clip {sch['clip_grad']} ({sch['clip_mode']})",
        f"schedule {steps}" + (f"; {images}" if images else ""),
        "flops    per image: " + ", ".join(f"{k} {flops_text(v)}" for k, v in fl.items())
        + f"; {flops_text(plan['tflops_per_step_per_gpu'] * 1e12)} per step per GPU",
        f"memory   ~{gb_text(mem['total_gb'])} per GPU"
        + (f" ({mem['parallelism']}{', activation checkpointing' if mem['activation_checkpointing'] else ''})"
           if "parallelism" in mem else "")
        + f": trainable state {gb_text(mem['weights_grads_adamw_gb'])}, "
        + (f"FSDP gathered units {gb_text(mem['fsdp_gathered_gb'])}, " if "fsdp_gathered_gb" in mem else "")
        + f"autocast copies {gb_text(mem['autocast_weight_copies_gb'])}, "
        + (f"frozen backbone {gb_text(mem['frozen_backbone_gb'])}, " if "frozen_backbone_gb" in mem
           else f"teachers {gb_text(mem['teachers_gb'])}, ")
        + f"activations {gb_text(mem['activations_gb'])} ({mem['activations_per_image_mb']:.1f} MB per image)",
    ]
    if "total_gb_by_setup" in mem:
        lines.append(f"scaling  per GPU on {plan['world_size']}: " + ", ".join(
            f"{name} {gb_text(gb)}" for name, gb in mem["total_gb_by_setup"].items())
            + " (train.parallelism, train.activation_checkpointing)")
    lines += [f"skipped  {item['feature']}: {item['reason']}" for item in plan.get("skipped", [])]
    return "\n".join(lines)


def write_plan(plan: dict, path: str) -> None:
    """``plan.json``, written atomically."""
    from unic.io import write_json

    write_json(path, plan)
