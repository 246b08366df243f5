"""The distillation trainer: setup -> build -> train (log, validate, checkpoint) -> close."""

from __future__ import annotations

import logging
import math
import os
import random
import resource
import time

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from unic import distributed
from unic.config import ConfigError, save_config, to_plain
from unic.data.demo import ensure_demo_data
from unic.data.folders import ImageListDataset, image_folder_dataset
from unic.data.sampling import GlobalBatchSampler
from unic.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, unic_train_transform
from unic.data.uned import uned_dataset
from unic.eval.features import extract_features
from unic.models.ladder import Ladder, StudentWithLadder
from unic.models.student import backbone_embedding, build_student
from unic.models.teacher import FrozenTeacher
from unic.train import checkpoint as ckpt_lib
from unic.train.logger import MetricsWriter, setup_logging
from unic.train.optim import apply_schedules, cosine_schedule, param_groups
from unic.train.standardize import TeacherStandardizer
from unic.train.task import DistillationTask

logger = logging.getLogger(__name__)

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_datasets(cfg: DictConfig) -> tuple[ImageListDataset, ImageListDataset | None, ImageListDataset | None]:
    """Train set (UNIC augmentations), val set and kNN bank (eval transforms) for the configured data."""
    data, size = cfg.data, cfg.student.img_size
    train_tf, val_tf = unic_train_transform(size), eval_transform(size)
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
        bank_samples = train.samples
    else:  # demo and uned share the UnED layout
        train = uned_dataset(root, data.train_split, data.domains or None, train_tf)
        try:
            val = uned_dataset(root, data.val_split, train.domain_names, val_tf)
        except FileNotFoundError:
            val = None
        bank_samples = train.samples
    bank = None
    if val is not None:
        stride = max(1, round(1 / data.knn_train_fraction))
        bank = ImageListDataset(bank_samples[::stride], val_tf, train.domain_names)
    return train, val, bank


def unique_labels(labels: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Class ids made distinct across domains (UnED domains all count classes from 0)."""
    key = domains.long() * (int(labels.max().item()) + 1) + labels.long()
    return key


class Trainer:
    """Owns the run's state; ``train()`` runs it to the end (or ``train.max_steps``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = distributed.init_distributed(cfg.train.device)
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        setup_logging(None)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        if self.precision != "fp32" and self.device.type == "cpu" and cfg.train.precision != "auto":
            logger.warning("%s autocast on CPU is slow; fp32 is the CPU default", self.precision)
        seed_everything(cfg.train.seed)

        # everything that can fail on user input is built before the output folder exists
        self.train_set, self.val_set, self.knn_bank = build_datasets(cfg)
        self.teachers = nn.ModuleDict({
            name: FrozenTeacher(name, cfg.teachers.weights.get(name), cfg.teachers.weights_dir)
            for name in sorted(cfg.teachers.names)
        }).to(self.device)
        backbone = build_student(cfg.student.arch, cfg.student.img_size, cfg.student.drop_path, dict(cfg.student.kwargs))
        if cfg.student.pretrained:
            from teachers.convert import load_into

            state = ckpt_lib.load_checkpoint(cfg.student.pretrained)
            load_into(backbone, student_state_dict(state), "timm", cfg.student.pretrained)
        self.patch_size = backbone.patch_embed.patch_size[0]
        if cfg.student.img_size % self.patch_size:
            raise ConfigError(f"student.img_size {cfg.student.img_size} is not a multiple of the patch size {self.patch_size}")
        teacher_dims = {name: t.embed_dim for name, t in self.teachers.items()}
        ladder = Ladder(backbone.embed_dim, len(backbone.blocks), teacher_dims, cfg.ladder.blocks,
                        cfg.ladder.hidden_dim, cfg.ladder.last_hidden_dim)
        self.model = StudentWithLadder(backbone, ladder).to(self.device)
        # a different RNG stream per rank from here on (stochastic depth), identical weights above
        torch.manual_seed(cfg.train.seed + 1000 * self.rank)
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world > 1 else self.model
        )
        self.standardizer = TeacherStandardizer(teacher_dims).to(self.device)

        self.global_batch = cfg.data.batch_size_per_gpu * self.world
        self.sampler = GlobalBatchSampler(len(self.train_set), self.global_batch, self.rank, self.world, cfg.train.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.max_steps = min(cfg.train.max_steps or self.total_steps, self.total_steps)

        lr = cfg.optim.lr * self.global_batch / 256
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=lr,
                                           betas=tuple(cfg.optim.betas))
        self.lr_schedule = cosine_schedule(lr, cfg.optim.min_lr, self.total_steps,
                                           round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)
        std = torch.tensor(IMAGENET_STD, device=self.device)
        self.task = DistillationTask(
            self.ddp_model, self.teachers, self.standardizer, self.patch_size, mean, std, self.total_steps,
            cfg.loss.lam_cos, cfg.loss.lam_sl1, cfg.loss.drop_prob, cfg.loss.std_momentum_start,
            cfg.loss.std_momentum_end, self.generator,
        )
        if cfg.train.compile:
            self.model.backbone.compile()
        self.step = 0
        self.skipped_images = 0

        self.output_dir = os.path.abspath(os.path.expanduser(cfg.train.output_dir))
        if self.rank == 0:
            os.makedirs(self.output_dir, exist_ok=True)
            save_config(cfg, os.path.join(self.output_dir, "config.yaml"))
        distributed.barrier()
        setup_logging(self.output_dir)
        self.checkpoint_path = os.path.join(self.output_dir, ckpt_lib.CHECKPOINT_NAME)
        if cfg.train.resume and os.path.isfile(self.checkpoint_path):
            self.load(self.checkpoint_path)
        self.metrics = MetricsWriter(self.output_dir)
        n_student = sum(p.numel() for p in self.model.backbone.parameters())
        n_ladder = sum(p.numel() for p in self.model.ladder.parameters())
        logger.info(
            "student %s (%.2fM params) + ladder (%.2fM), teachers %s, %d images, global batch %d, %d steps "
            "(%d per epoch), %s on %s x%d", cfg.student.arch, n_student / 1e6, n_ladder / 1e6,
            ", ".join(self.teachers), len(self.train_set), self.global_batch, self.total_steps,
            self.steps_per_epoch, self.precision, self.device.type, self.world,
        )

    # ------------------------------------------------------------------ state
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
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "standardizer": self.standardizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rngs,
            "world_size": self.world,
            "skipped_images": self.skipped_images,
            "config": to_plain(self.cfg),
        }

    def save(self, periodic: bool = False) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if self.rank == 0:
            ckpt_lib.atomic_save(state, self.checkpoint_path)
            if periodic and self.cfg.train.keep_checkpoints > 0:
                ckpt_lib.atomic_save(state, ckpt_lib.periodic_path(self.output_dir, self.step))
                ckpt_lib.prune_periodic(self.output_dir, self.cfg.train.keep_checkpoints)
            logger.info("saved checkpoint at step %d to %s", self.step, self.checkpoint_path)
        distributed.barrier()

    def load(self, path: str) -> None:
        state = ckpt_lib.load_checkpoint(path)
        if state.get("format") != "unic-train":
            raise ValueError(f"{path} is not a UNIC training checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.standardizer.load_state_dict(state["standardizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        if state["world_size"] == self.world:
            ckpt_lib.set_rng_state(state["rng"][self.rank])
        else:
            logger.warning("checkpoint from %d processes resumed on %d: RNG streams re-seeded",
                           state["world_size"], self.world)
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    def export_student(self) -> str:
        path = os.path.join(self.output_dir, "student.pth")
        if self.rank == 0:
            ckpt_lib.atomic_save(export_dict(self.model.backbone, self.cfg), path)
        return path

    # ------------------------------------------------------------------ loop
    def autocast(self):
        dtype = AUTOCAST[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self, images: torch.Tensor, measure: bool) -> dict[str, torch.Tensor]:
        apply_schedules(self.optimizer, float(self.lr_schedule[self.step]), float(self.wd_schedule[self.step]))
        self.ddp_model.train()
        self.standardizer.train()
        with self.autocast():
            out = self.task(images, self.step)
        self.scaler.scale(out["loss"]).backward()
        clip = self.cfg.optim.clip_grad
        if clip > 0 or measure:
            self.scaler.unscale_(self.optimizer)
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in out.items()}

    def train(self) -> None:
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        window_steps, window_start, data_time = 0, time.perf_counter(), 0.0
        run_start, start_step = time.perf_counter(), self.step
        while self.step < self.max_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_position(epoch, in_epoch)
            loader = DataLoader(
                self.train_set, batch_sampler=self.sampler, num_workers=cfg.data.num_workers,
                pin_memory=self.device.type == "cuda", generator=torch.Generator(),
            )
            fetch_start = time.perf_counter()
            for batch in loader:
                data_time += time.perf_counter() - fetch_start
                images = batch["image"].to(self.device, non_blocking=True)
                measure = (self.step + 1) % cfg.train.log_every == 0
                out = self.train_step(images, measure)
                self.skipped_images += int(batch["skipped"].sum())
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value
                window_steps += 1
                self.step += 1
                if measure:
                    self.log_window(sums, window_steps, time.perf_counter() - window_start, data_time,
                                    run_start, start_step)
                    sums, window_steps, data_time, window_start = {}, 0, 0.0, time.perf_counter()
                if cfg.train.save_every and self.step % cfg.train.save_every == 0:
                    self.save(periodic=True)
                fetch_start = time.perf_counter()
                if self.step >= self.max_steps:
                    break
            if self.step % self.steps_per_epoch == 0:
                if cfg.train.validate and self.val_set is not None:
                    self.validate()
                self.save()
                self.export_student()
        if self.step % self.steps_per_epoch:  # stopped mid-epoch by train.max_steps
            self.save()
        path = self.export_student()
        if self.rank == 0:
            logger.info("done: %d steps; checkpoint %s, student %s, config %s, TensorBoard %s",
                        self.step, self.checkpoint_path, path, os.path.join(self.output_dir, "config.yaml"),
                        os.path.join(self.output_dir, "tensorboard"))

    def log_window(self, sums, steps, elapsed, data_time, run_start, start_step) -> None:
        keys = sorted(k for k in sums if k != "grad_norm")
        packed = torch.stack([sums[k].float() / steps for k in keys])
        distributed.all_reduce_mean(packed)
        metrics = dict(zip(keys, packed.tolist()))
        metrics["grad_norm"] = float(sums["grad_norm"])
        metrics["lr"] = float(self.lr_schedule[self.step - 1])
        metrics["wd"] = float(self.wd_schedule[self.step - 1])
        metrics["images_per_s"] = steps * self.global_batch / elapsed
        metrics["data_time_s"] = data_time / steps
        metrics["step_time_s"] = elapsed / steps
        metrics["skipped_images"] = self.skipped_images
        if self.device.type == "cuda":
            metrics["memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {self.step}")
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
        """Distillation loss without dropping on the val split, and weighted kNN top-1 of the student."""
        from unic.eval.knn import weighted_knn

        self.ddp_model.eval()
        self.standardizer.eval()
        backbone = self.model.backbone
        dtype = AUTOCAST[self.precision]
        bs, workers = self.cfg.data.batch_size_per_gpu, self.cfg.data.num_workers

        loss_sum = torch.zeros(2, device=self.device)

        def encode(images: torch.Tensor) -> torch.Tensor:
            out = self.task(images, None, drop=False, model=self.model)
            loss_sum[0] += out["loss"].float() * images.shape[0]
            loss_sum[1] += images.shape[0]
            return torch.nn.functional.normalize(backbone_embedding(backbone, images).float(), dim=-1)

        val = extract_features(encode, self.val_set, self.device, bs, workers, dtype, desc="val")
        bank = extract_features(lambda x: torch.nn.functional.normalize(backbone_embedding(backbone, x).float(), dim=-1),
                                self.knn_bank, self.device, bs, workers, dtype, desc="knn bank")
        distributed.all_reduce_sum(loss_sum)
        labels = torch.cat([unique_labels(bank["labels"], bank["domains"]), unique_labels(val["labels"], val["domains"])])
        _, labels = torch.unique(labels, return_inverse=True)
        k = min(20, len(bank["labels"]))
        knn = weighted_knn(bank["features"], labels[: len(bank["labels"])], val["features"],
                           labels[len(bank["labels"]):], ks=(k,))
        metrics = {"loss": float(loss_sum[0] / loss_sum[1]), f"knn{k}_top1": float(knn[k]["top1"]),
                   "skipped_images": int(val["skipped"] + bank["skipped"])}
        self.metrics.write(self.step, metrics, prefix="val")
        logger.info("validation at step %d: loss %.4f, kNN(k=%d) top-1 %.4f", self.step, metrics["loss"], k,
                    metrics[f"knn{k}_top1"])
        return metrics

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()


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
    }


def student_state_dict(ckpt: dict) -> dict:
    """The backbone's timm state dict inside a training checkpoint, an exported student or a timm file."""
    if ckpt.get("format") == "unic-train":
        return {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    if ckpt.get("format") == "unic-student":
        return ckpt["state_dict"]
    return ckpt
