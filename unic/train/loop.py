"""The distillation trainer: setup -> build -> train (log, validate, checkpoint) -> close."""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unic import distributed
from unic.config import (ConfigError, derived_schedule, final_norm_frozen, objectives, resolve_batch,
                         resume_mismatches, save_config, to_plain)
from unic.data.demo import ensure_demo_data
from unic.data.folders import ImageListDataset, image_folder_dataset
from unic.config import head_options
from unic.data.sampling import DomainSampler, GlobalBatchSampler
from unic.data.transforms import eval_transform, udon_train_transform, uned_eval_transform, unic_train_transform
from unic.data.uned import uned_dataset
from unic.eval.features import extract_features
from unic.eval.metrics import universal_recall
from unic.models.ladder import Ladder, UnicModel
from unic.models.student import backbone_embedding, backbone_state_dict, build_student
from unic.models.teacher import teacher_key
from unic.models.teacher import FrozenTeacher
from unic.io import CheckpointWriteError, load_checkpoint
from unic.train import checkpoint as ckpt_lib
from unic.train import faults
from unic.train.logger import MetricsWriter, setup_logging
from unic.models.universal import DomainHeads
from unic.train.batches import DomainBatches, EpochBatches
from unic.train.optim import apply_schedules, clip_gradients, cosine_schedule, param_groups
from unic.train.standardize import TeacherStandardizer
from unic.train.task import UnicTask

logger = logging.getLogger(__name__)

AUTOCAST = distributed.AUTOCAST_DTYPES


class Preempted(Exception):
    """SIGTERM received: every rank saved a checkpoint at the same step and the run stops (exit 143)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left in place."""


class CollectiveTimeoutError(RuntimeError):
    """A collective timed out: a rank stalled or died."""


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_datasets(cfg: DictConfig, udon: bool) -> tuple[ImageListDataset, ImageListDataset | None, ImageListDataset | None]:
    """Train set, val set and kNN bank (eval transforms) for the configured data.

    Generic distillation uses the UNIC augmentations, UDON its own crops; UnED-layout data is evaluated with
    the UnED resize (short side, centre crop), ImageNet with the 0.875 centre crop.
    """
    data, size = cfg.data, cfg.student.img_size
    norm = {"mean": tuple(cfg.student.mean), "std": tuple(cfg.student.std)}
    train_tf = udon_train_transform(size, **norm) if udon else unic_train_transform(size, **norm)
    # ImageNet: the 0.875 centre crop; UnED-layout data: UDON's short-side resize and centre crop
    if data.dataset == "imagenet":
        val_tf = eval_transform(size, crop_ratio=0.875, **norm)
    else:
        val_tf = uned_eval_transform(size, **norm)
    root = os.path.expanduser(data.root)
    if data.dataset == "demo":
        if distributed.is_main_process():
            ensure_demo_data(root)
        distributed.barrier()
        root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ConfigError(f"data.root not found: {root}")
    if data.dataset == "imagenet":
        train = image_folder_dataset(os.path.join(root, data.train_split), train_tf)
        val_dir = os.path.join(root, data.val_split)
        val = image_folder_dataset(val_dir, val_tf) if os.path.isdir(val_dir) else None
    else:  # demo and uned share the UnED layout
        train = uned_dataset(root, data.train_split, data.domains or None, train_tf)
        try:
            val = uned_dataset(root, data.val_split, train.domain_names, val_tf)
        except FileNotFoundError:
            val = None
    bank = None
    if val is not None:
        stride = max(1, round(1 / data.knn_train_fraction))
        bank = ImageListDataset(train.samples[::stride], val_tf, train.domain_names)
    return train, val, bank


def build_teachers(cfg: DictConfig, weights: str | None = None) -> nn.ModuleDict:
    """The frozen teachers by module key, in sorted name order; ``weights`` ("random") overrides every source."""
    # module keys cannot hold dots (timm:<model>.<tag>); weights may be given under either spelling
    return nn.ModuleDict({
        teacher_key(name): FrozenTeacher(
            name, weights or cfg.teachers.weights.get(name, cfg.teachers.weights.get(teacher_key(name))),
            cfg.teachers.weights_dir)
        for name in sorted(cfg.teachers.names)
    })


def build_backbone(cfg: DictConfig, load_pretrained: bool = True) -> nn.Module:
    """The student backbone (``student.pretrained`` loaded), its final norm frozen when nothing trains it."""
    backbone = build_student(cfg.student.arch, cfg.student.img_size, cfg.student.drop_path, dict(cfg.student.kwargs))
    if load_pretrained and cfg.student.pretrained:
        from teachers.convert import load_into

        state = load_checkpoint(cfg.student.pretrained)
        load_into(backbone, backbone_state_dict(state), "timm", cfg.student.pretrained)
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


def unique_labels(labels: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Class ids made distinct across domains (UnED domains all count classes from 0)."""
    return domains.long() * (int(labels.max().item()) + 1) + labels.long()


def domain_classes(dataset: ImageListDataset) -> list[list[int]]:
    """Per domain, the sorted class ids of its train split (first label of each image)."""
    classes: list[set] = [set() for _ in dataset.domain_names]
    for _, labels, domain in dataset.samples:
        classes[domain].add(int(labels[0]))
    return [sorted(c) for c in classes]


class Trainer:
    """Owns the run's state; ``train()`` runs it to the end (or ``train.max_steps``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = distributed.init_distributed(cfg.run.device, cfg.train.collective_timeout_s)
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.global_batch, self.batch_per_gpu = resolve_batch(cfg, self.world)
        setup_logging(None)
        self.precision = distributed.resolve_precision(cfg.run.precision, self.device)
        if self.precision != "fp32" and self.device.type == "cpu" and cfg.run.precision != "auto":
            logger.warning("%s autocast on CPU is slow; fp32 is the CPU default", self.precision)
        seed_everything(cfg.run.seed)
        self.distill, self.udon = objectives(cfg)

        # everything that can fail on user input is built before the output folder exists
        self.train_set, self.val_set, self.knn_bank = build_datasets(cfg, self.udon)
        self.teachers = build_teachers(cfg) if self.distill else None  # to the device once inputs are validated
        backbone = build_backbone(cfg)
        self.patch_size = backbone.patch_embed.patch_size[0]
        ladder = build_ladder(cfg, backbone, {n: t.embed_dim for n, t in self.teachers.items()}) if self.distill else None
        self.domain_heads, universal = None, None
        self.domains = list(self.train_set.domain_names)
        if self.udon:
            universal = nn.Linear(backbone.embed_dim, cfg.udon.universal_dim)
            classes = domain_classes(self.train_set)
            counts = {d: [0] * len(classes[i]) for i, d in enumerate(self.domains)}
            position = [{c: j for j, c in enumerate(cls)} for cls in classes]
            for _, labels, d in self.train_set.samples:
                counts[self.domains[d]][position[d][int(labels[0])]] += 1
            try:
                self.domain_heads = DomainHeads(
                    backbone.embed_dim, {d: len(c) for d, c in zip(self.domains, classes)}, cfg.udon.teacher_dim,
                    cfg.udon.universal_dim, cfg.heads.name, head_options(cfg), counts,
                ).to(self.device)
            except ValueError as err:  # e.g. AdaCos needs >= 3 classes per domain
                raise ConfigError(f"heads.name={cfg.heads.name}: {err}") from None
            # raw class id -> classifier row, per domain (-1: not a train class)
            self.label_maps = []
            for cls in classes:
                table = torch.full((max(cls) + 1,), -1, dtype=torch.long)
                table[torch.tensor(cls)] = torch.arange(len(cls))
                self.label_maps.append(table.to(self.device))
        if self.teachers is not None:
            self.teachers.to(self.device)
        self.model = UnicModel(backbone, ladder, universal, cfg.ladder.last_tap).to(self.device)
        if cfg.train.compile:
            self.model.compile()  # compiles UnicModel.__call__ in place: state dict keys unchanged
        # a different RNG stream per rank from here on (stochastic depth), identical weights above
        torch.manual_seed(cfg.run.seed + 1000 * self.rank)
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world > 1 else self.model
        )
        self.standardizer = None
        if self.distill:
            self.standardizer = TeacherStandardizer({n: t.embed_dim for n, t in self.teachers.items()}).to(self.device)

        pin = self.device.type == "cuda"
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the training set has {len(self.train_set)} images, fewer than one global batch "
                              f"({self.global_batch})")
        if self.udon:
            for d, name in enumerate(self.domains):
                size = sum(1 for _, _, dom in self.train_set.samples if dom == d)
                if size < self.global_batch:
                    raise ConfigError(f"domain '{name}' has {size} training images, fewer than one global batch "
                                      f"({self.global_batch}); lower data.global_batch / data.batch_size_per_gpu "
                                      "or drop the domain")
            self.domain_sampler = DomainSampler(
                [sum(1 for _, _, d in self.train_set.samples if d == i) for i in range(len(self.domains))],
                cfg.udon.sampling, cfg.udon.update_every, cfg.run.seed, self.device, cfg.udon.window_reset_every,
            )
            self.batches = DomainBatches(self.train_set, self.global_batch, self.rank, self.world, cfg.run.seed,
                                         self.domain_sampler, cfg.data.num_workers, pin, cfg.data.worker_timeout_s)
        else:
            sampler = GlobalBatchSampler(len(self.train_set), self.global_batch, self.rank, self.world, cfg.run.seed)
            self.batches = EpochBatches(self.train_set, sampler, cfg.data.num_workers, pin, cfg.data.worker_timeout_s)
        derived = derived_schedule(cfg, self.global_batch, self.steps_per_epoch)
        self.total_steps, self.max_steps = derived["total_steps"], derived["run_steps"]
        self.freeze_steps = derived["freeze_steps"]
        lr, backbone_lr, warmup = derived["lr"], derived["backbone_lr"], derived["warmup_steps"]
        groups = param_groups(self.model.backbone, cfg.optim.weight_decay, "backbone")
        if ladder is not None:
            groups += param_groups(ladder, cfg.optim.weight_decay, "unic")
        if self.udon:
            groups += param_groups(self.model.udon, cfg.udon.head_weight_decay, "udon")
            groups += param_groups(self.domain_heads, cfg.udon.head_weight_decay, "udon")
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))
        self.lr_schedules = {
            "backbone": cosine_schedule(backbone_lr, cfg.optim.min_lr, self.total_steps, warmup),
            "unic": cosine_schedule(lr, cfg.optim.min_lr, self.total_steps, warmup),
        }
        self.wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed + 1)
        self.task = UnicTask(
            self.ddp_model, self.total_steps, self.teachers, self.standardizer, self.domain_heads, self.patch_size,
            torch.tensor(list(cfg.student.mean), device=self.device), torch.tensor(list(cfg.student.std), device=self.device),
            cfg.loss.w_distill, cfg.loss.w_udon, cfg.loss.lam_cos, cfg.loss.lam_sl1, cfg.loss.drop_prob,
            cfg.loss.std_momentum_start, cfg.loss.std_momentum_end, cfg.udon.temperature,
            cfg.udon.relational_weight, self.generator,
        )
        self.step = 0
        self.skipped_images = 0
        self.bad_files: dict[str, str] = {}  # unreadable image -> reason, written to bad_images.json
        self.bad_steps, self.consecutive_bad_steps = 0, 0
        self.stop_requested = False
        self._saved_step = -1
        signal.signal(signal.SIGTERM, self._on_sigterm)

        self.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
        self.checkpoint_path = os.path.join(self.output_dir, ckpt_lib.CHECKPOINT_NAME)
        resume_state = None
        if cfg.train.resume and os.path.isfile(self.checkpoint_path):
            resume_state = self.read_checkpoint(self.checkpoint_path)  # validated before anything is written
        if self.rank == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.output_dir, "config.yaml"))
            for tmp in ckpt_lib.remove_partial_files(self.output_dir):
                logger.warning("removed %s, left by an interrupted checkpoint write", tmp)
        distributed.barrier()
        setup_logging(self.output_dir)
        if resume_state is not None:
            self.load(resume_state, self.checkpoint_path)
        self.metrics = MetricsWriter(self.output_dir)
        self._log_setup()

    def _log_setup(self) -> None:
        """The preflight plan (what ``main_unic.py --plan`` prints), logged and written as ``plan.json``, and
        what the plan cannot know before the data is read: the UDON heads' sizes."""
        from unic.train.plan import build_plan, format_plan, write_plan

        self.plan = build_plan(self.cfg, self.world, len(self.train_set), self.device)
        if self.rank == 0:
            for line in format_plan(self.plan).splitlines():
                logger.info("plan: %s", line)
            write_plan(self.plan, os.path.join(self.output_dir, "plan.json"))
        if self.udon:
            memory = self.domain_heads.memory_report()
            logger.info("UDON heads (%s), MB per domain with AdamW state: %s; sampling %s", self.cfg.heads.name,
                        ", ".join(f"{d} {mb:.1f}" for d, mb in memory.items()), self.cfg.udon.sampling)

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        logger.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
        self.stop_requested = True

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict:
        """Trainable state under one key space: backbone.*, ladder.*, udon.* (universal and domain heads)."""
        state = dict(self.model.state_dict())
        if self.domain_heads is not None:
            state.update({f"udon.{k}": v for k, v in self.domain_heads.state_dict().items()})
        return state

    def state_dict(self) -> dict:
        rng = ckpt_lib.rng_state()
        rngs = [None] * self.world
        if distributed.is_enabled():
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        return {
            "format": "unic-train",
            "version": 1,
            "step": self.step,
            "model": self.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "standardizer": self.standardizer.state_dict() if self.standardizer is not None else {},
            "generator": self.generator.get_state(),
            "data": self.batches.state_dict(),
            "domains": self.domains,
            "rng": rngs,
            "world_size": self.world,
            "skipped_images": self.skipped_images,
            "bad_steps": self.bad_steps,
            "config": to_plain(self.cfg),
        }

    def save(self, periodic: bool = False) -> None:
        """Write ``checkpoint.pth`` (and a periodic copy); collective. A failed write on rank 0 raises
        :class:`CheckpointWriteError` on every rank instead of leaving the others waiting."""
        if self._saved_step == self.step and not periodic:
            return
        state = self.state_dict()  # collective: every rank takes part
        self.write_bad_file_report()
        error = None
        if self.rank == 0:
            try:
                ckpt_lib.atomic_save(state, self.checkpoint_path, self.step)
                if periodic and self.cfg.train.keep_checkpoints > 0:
                    ckpt_lib.atomic_save(state, ckpt_lib.periodic_path(self.output_dir, self.step), self.step)
                    ckpt_lib.prune_periodic(self.output_dir, self.cfg.train.keep_checkpoints)
                logger.info("saved checkpoint at step %d to %s", self.step, self.checkpoint_path)
            except CheckpointWriteError as err:
                error = err
        failed = distributed.all_reduce_max(torch.tensor([float(error is not None)], device=self.device))
        if error is not None:
            raise error
        if failed.item() > 0:
            raise CheckpointWriteError(f"rank 0 could not write {self.checkpoint_path}")
        self._saved_step = self.step

    def write_bad_file_report(self) -> None:
        """``bad_images.json``: every unreadable image any rank passed over, with the reason (collective)."""
        reports = [self.bad_files]
        if distributed.is_enabled():
            reports = [None] * self.world
            torch.distributed.all_gather_object(reports, self.bad_files)
        merged = {path: reason for report in reports for path, reason in report.items()}
        if self.rank == 0 and merged:
            path = os.path.join(self.output_dir, "bad_images.json")
            with open(path + ".tmp", "w") as f:
                json.dump({"count": len(merged), "files": [{"path": p, "reason": r} for p, r in sorted(merged.items())]},
                          f, indent=1)
            os.replace(path + ".tmp", path)

    def read_checkpoint(self, path: str) -> dict:
        """Load a training checkpoint and check it belongs to this configuration (else a clear error)."""
        from teachers.convert import CheckpointFormatError

        state = load_checkpoint(path)
        if state.get("format") != "unic-train":
            raise CheckpointFormatError(f"{path} is not a UNIC training checkpoint (format {state.get('format')!r})")
        diffs = resume_mismatches(state.get("config") or {}, self.cfg, state.get("world_size"), self.world)
        if state.get("world_size") not in (None, self.world):
            diffs.append(f"processes: checkpoint {state['world_size']}, now {self.world}")
        if diffs:
            raise ConfigError(
                f"cannot resume from {path}, written with other settings ({'; '.join(diffs)}); use another "
                "run.output_dir, or train.resume=false to start over there"
            )
        return state

    def load(self, state: dict, path: str) -> None:
        from teachers.convert import CheckpointFormatError

        model = state["model"]
        heads_prefix = ("udon.teacher_heads.", "udon.teacher_classifiers.", "udon.universal_classifiers.")
        try:
            self.model.load_state_dict({k: v for k, v in model.items() if not k.startswith(heads_prefix)})
            if self.domain_heads is not None:
                self.domain_heads.load_state_dict(
                    {k[len("udon."):]: v for k, v in model.items() if k.startswith(heads_prefix)})
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointFormatError(
                f"cannot resume from {path}: it was written by a different model or configuration "
                f"({str(err).splitlines()[0][:300]}); use another run.output_dir or train.resume=false"
            ) from None
        self.scaler.load_state_dict(state["scaler"])
        if self.standardizer is not None:
            self.standardizer.load_state_dict(state["standardizer"])
        self.generator.set_state(state["generator"])
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        ckpt_lib.set_rng_state(state["rng"][self.rank])
        logger.info("resumed from %s at step %d", path, self.step)

    def export(self) -> list[str]:
        """``student.pth`` (plain timm backbone) and, with UDON, ``universal.pth`` (backbone + heads)."""
        paths = [os.path.join(self.output_dir, "student.pth")]
        if self.rank == 0:
            ckpt_lib.atomic_save(export_dict(self.model.backbone, self.cfg), paths[0])
        if self.udon:
            paths.append(os.path.join(self.output_dir, "universal.pth"))
            if self.rank == 0:
                universal = export_dict(self.model.backbone, self.cfg)
                linear = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
                universal.update({
                    "format": "unic-universal",
                    "universal": linear(self.model.udon.universal),
                    "teacher_heads": {d: linear(h) for d, h in self.domain_heads.teacher_heads.items()},
                    "domains": self.domains,
                })
                ckpt_lib.atomic_save(universal, paths[1])
        return paths

    # ------------------------------------------------------------------ loop
    def autocast(self):
        dtype = AUTOCAST[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _stateful_buffers(self, domain_name: str | None) -> list[torch.Tensor]:
        """Buffers a forward pass updates (teacher statistics, stateful margin heads)."""
        modules = [self.standardizer]
        if domain_name is not None:
            modules += [self.domain_heads.teacher_classifiers[domain_name],
                        self.domain_heads.universal_classifiers[domain_name]]
        return [b for m in modules if m is not None for b in m.buffers()]

    def train_step(self, images: torch.Tensor, domain: int | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step. A non-finite loss or gradient on any rank skips the step on every rank
        (weights, optimizer and buffers untouched); every rank also learns whether any received SIGTERM.
        Both come from one 2-value all-reduce, the step's only host synchronisation."""
        cfg, step = self.cfg, self.step
        wd = float(self.wd_schedule[step])
        apply_schedules(self.optimizer, {
            "backbone": (float(self.lr_schedules["backbone"][step]), wd),
            "unic": (float(self.lr_schedules["unic"][step]), wd),
            "udon": (cfg.udon.head_lr, cfg.udon.head_weight_decay),
        })
        self.ddp_model.train()
        for module in (self.standardizer, self.domain_heads):
            if module is not None:
                module.train()
        name = None
        if domain is not None:
            name = self.domains[domain]
            labels = self.label_maps[domain][labels]
        buffers = self._stateful_buffers(name)
        saved = [b.clone() for b in buffers]
        with self.autocast():
            out = self.task(images, step, domain=name, labels_B=labels)
        if faults.poison_loss(step):
            out["loss"] = out["loss"] * float("nan")
        self.scaler.scale(out["loss"]).backward()
        if name is not None:
            self.domain_heads.sync_gradients(name)
        if step < self.freeze_steps:  # frozen backbone: no update and no optimizer state
            for p in self.model.backbone.parameters():
                p.grad = None
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        out["grad_norm"] = clip_gradients(params, cfg.optim.clip_grad, cfg.optim.clip_mode)
        bad = ~torch.isfinite(out["loss"].detach())
        if not self.scaler.is_enabled():  # with fp16 the scaler itself skips steps with inf gradients
            bad |= ~torch.isfinite(out["grad_norm"])
        flags = torch.stack([bad.float(), torch.tensor(float(self.stop_requested), device=bad.device)])
        bad_any, stop_any = distributed.all_reduce_max(flags).tolist()
        self.stop_requested = stop_any > 0
        if bad_any > 0:
            self.optimizer.zero_grad(set_to_none=True)
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.bad_steps += 1
            self.consecutive_bad_steps += 1
            logger.warning("non-finite loss or gradient at step %d: step skipped on every rank (%d in a row, %d in all)",
                           step, self.consecutive_bad_steps, self.bad_steps)
            if self.consecutive_bad_steps >= cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.consecutive_bad_steps} consecutive non-finite steps (up to step {step}); stopping. "
                    f"The last good checkpoint is {self.checkpoint_path}"
                    + ("" if os.path.isfile(self.checkpoint_path) else " (none was saved yet)")
                    + "; lower optim.lr, enable optim.clip_grad or check the data and teacher weights"
                )
        else:
            self.consecutive_bad_steps = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if name is not None:
                self.domain_sampler.record(domain, out[f"udon/{name}/ce_teacher"])
        out["skipped_step"] = torch.tensor(float(bad_any > 0))
        return {k: v.detach() for k, v in out.items()}

    def train(self) -> None:
        """Run to ``max_steps``; a collective that times out is reported with each rank's progress."""
        try:
            self._train()
        except RuntimeError as err:
            if distributed.is_enabled() and _is_timeout(err) and not isinstance(err, NonFiniteLossError):
                raise CollectiveTimeoutError(
                    f"a collective timed out after {self.cfg.train.collective_timeout_s:.0f} s on rank {self.rank} "
                    f"at step {self.step}: {distributed.describe_progress()}"
                ) from None
            raise

    def _train(self) -> None:
        cfg = self.cfg
        if cfg.train.validate and cfg.train.validate_first and self.step == 0 and self.val_set is not None:
            self.validate()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        window_steps, window_start, data_time = 0, time.perf_counter(), 0.0
        run_start, start_step = time.perf_counter(), self.step
        self.batches.start(self.step)
        try:
            while self.step < self.max_steps:
                faults.at_step(self.step)
                distributed.heartbeat(self.step)
                fetch_start = time.perf_counter()
                domain, batch = self.batches.next()
                data_time += time.perf_counter() - fetch_start
                images = batch["image"].to(self.device, non_blocking=True)
                labels = batch["label"].to(self.device, non_blocking=True) if domain is not None else None
                measure = (self.step + 1) % cfg.train.log_every == 0
                out = self.train_step(images, domain, labels)
                self.skipped_images += int(batch["skipped"].sum())
                for lines in batch["bad"]:
                    for line in filter(None, lines.split("\n")):
                        path, _, reason = line.partition(": ")
                        self.bad_files[path] = reason
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                window_steps += 1
                self.step += 1
                if self.udon and self.domain_sampler.maybe_update():
                    self.metrics.write(self.step, {f"p/{d}": float(p) for d, p in zip(self.domains, self.domain_sampler.probs)},
                                       prefix="sampling")
                if measure:
                    self.log_window(sums, counts, window_steps, time.perf_counter() - window_start, data_time,
                                    run_start, start_step)
                    sums, counts, window_steps, data_time, window_start = {}, {}, 0, 0.0, time.perf_counter()
                if self.stop_requested:
                    self.save()
                    raise Preempted(f"stopped by SIGTERM at step {self.step}; checkpoint saved to {self.checkpoint_path}")
                # no checkpoint during a run of skipped (non-finite) steps: the last good one stays the newest
                healthy = self.consecutive_bad_steps == 0
                if cfg.train.save_every and self.step % cfg.train.save_every == 0 and healthy:
                    self.save(periodic=True)
                if self.step % self.steps_per_epoch == 0:
                    if cfg.train.validate and self.val_set is not None:
                        self.validate()
                    if healthy:
                        self.save()
                        if self.step < self.max_steps:  # the last export follows the loop
                            self.export()
        finally:
            self.batches.close()
        self.save()  # no-op when this step was just saved (epoch end)
        paths = self.export()
        if self.rank == 0:
            logger.info("done: %d steps; checkpoint %s, exported %s, config %s, TensorBoard %s",
                        self.step, self.checkpoint_path, ", ".join(paths), os.path.join(self.output_dir, "config.yaml"),
                        os.path.join(self.output_dir, "tensorboard"))

    def log_window(self, sums, counts, steps, elapsed, data_time, run_start, start_step) -> None:
        keys = sorted(k for k in sums if k not in ("grad_norm", "skipped_step"))
        packed = torch.stack([sums[k].float() / counts[k] for k in keys])
        distributed.all_reduce_mean(packed)
        metrics = dict(zip(keys, packed.tolist()))
        metrics["grad_norm"] = float(sums["grad_norm"]) / counts["grad_norm"]
        metrics["lr"] = float(self.lr_schedules["backbone"][self.step - 1])
        metrics["wd"] = float(self.wd_schedule[self.step - 1])
        metrics["images_per_s"] = steps * self.global_batch / elapsed
        metrics["data_time_s"] = data_time / steps
        metrics["step_time_s"] = elapsed / steps
        metrics["skipped_images"] = self.skipped_images
        metrics["skipped_steps"] = self.bad_steps
        if self.udon:
            metrics.update({f"p/{d}": float(p) for d, p in zip(self.domains, self.domain_sampler.probs)})
        if self.device.type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.metrics.write(self.step, metrics)
        done = self.step - start_step
        eta = (time.perf_counter() - run_start) / max(done, 1) * (self.max_steps - self.step)
        logger.info(
            "step %d/%d (epoch %d) loss %.4f lr %.2e grad %.2f | %.1f img/s, data %.3fs/step | ETA %s",
            self.step, self.max_steps, (self.step - 1) // self.steps_per_epoch, metrics["loss"], metrics["lr"],
            metrics["grad_norm"], metrics["images_per_s"], metrics["data_time_s"], _hms(eta),
        )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Distillation loss without dropping, weighted kNN top-1 of the backbone and, with UDON, the
        universal embedding's leave-one-out R@1 per val domain. Rows that replaced unreadable images are
        left out; the metrics are computed on rank 0 and shared."""
        from unic.eval.knn import weighted_knn
        from unic.models.universal import udon_embeddings

        self.ddp_model.eval()
        for module in (self.standardizer, self.domain_heads):
            if module is not None:
                module.eval()
        dtype = AUTOCAST[self.precision]
        bs, workers = self.batch_per_gpu, self.cfg.data.num_workers
        loss_sum = torch.zeros(2, device=self.device)

        def encode(images: torch.Tensor) -> torch.Tensor:
            out = self.model(images)
            feats = [F.normalize(out["cls"].float(), dim=-1)]
            if self.distill:
                loss = self.task(images, None, drop=False, model=self.model, outputs=out)["loss"]
                loss_sum[0] += loss.float() * images.shape[0]
                loss_sum[1] += images.shape[0]
            if self.udon:
                feats.append(udon_embeddings(out["cls"], self.model.udon.universal)[1])
            return torch.cat(feats, dim=1)

        def encode_backbone(images: torch.Tensor) -> torch.Tensor:
            return F.normalize(backbone_embedding(self.model.backbone, images).float(), dim=-1)

        val = extract_features(encode, self.val_set, self.device, bs, workers, dtype, desc="val")
        bank = extract_features(encode_backbone, self.knn_bank, self.device, bs, workers, dtype, desc="knn bank")
        distributed.all_reduce_sum(loss_sum)
        metrics = None
        if self.rank == 0:
            val, bank = _readable_rows(val), _readable_rows(bank)
            dim = self.model.backbone.embed_dim
            labels = torch.cat([unique_labels(bank["labels"], bank["domains"]),
                                unique_labels(val["labels"], val["domains"])])
            _, labels = torch.unique(labels, return_inverse=True)
            k = min(20, len(bank["labels"]))
            knn = weighted_knn(bank["features"], labels[: len(bank["labels"])], val["features"][:, :dim],
                               labels[len(bank["labels"]):], ks=(k,), device=self.device)
            metrics = {f"knn{k}_top1": float(knn[k]["top1"]), "skipped_images": int(val["skipped"] + bank["skipped"])}
            if self.distill:
                metrics["loss"] = float(loss_sum[0] / loss_sum[1])
            if self.udon:
                metrics.update(universal_recall(val["features"][:, dim:], val["labels"], val["domains"], self.domains))
            self.metrics.write(self.step, metrics, prefix="val")
            logger.info("validation at step %d: %s", self.step,
                        ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "skipped_images"))
        return distributed.broadcast_object(metrics)

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()


def _readable_rows(out: dict) -> dict:
    """Drop the rows of images that were unreadable (the loader put another image there)."""
    keep = out["item_skipped"] == 0
    return {k: (v[keep] if torch.is_tensor(v) and v.dim() > 0 and len(v) == len(keep) else v) for k, v in out.items()}


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def export_dict(backbone: nn.Module, cfg: DictConfig) -> dict:
    """The exported student: a timm state dict under ``state_dict`` (what timm's file loader reads) + meta."""
    return {
        "format": "unic-student",
        "version": 1,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "arch": cfg.student.arch,
        "model_kwargs": dict(cfg.student.kwargs),
        "img_size": cfg.student.img_size,
        "mean": list(cfg.student.mean),
        "std": list(cfg.student.std),
    }
