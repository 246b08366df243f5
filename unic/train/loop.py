"""The distillation trainer: setup -> build -> train (step, log, checkpoint) -> close.

The run's parts come from the builders of :mod:`unic.train.build`, validation from
:class:`unic.train.validate.Validator`, the file formats from :mod:`unic.models.export`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import signal
import time

import torch
from omegaconf import DictConfig

from unic import distributed
from unic.cli import write_resolved_config
from unic.config import (ConfigError, derived_schedule, objectives, resolve_batch, resume_mismatches, to_plain,
                         unifex_enabled)
from unic.io import CheckpointFormatError, CheckpointWriteError, load_checkpoint, save_checkpoint, write_json
from unic.models.export import FORMAT_VERSION, TRAIN_FORMAT, student_export, universal_export
from unic.models.partial_fc import full_state, load_full_state, optimizer_state_dict, sharded_parameters
from unic.train import checkpoint as ckpt_lib
from unic.train import provenance, report
from unic.train.build import (build_batches, build_datasets, build_model, build_optimizer, build_schedules,
                              build_device_augment, build_task, check_teacher_weights, eager_parts,
                              unsharded_model, wrap_model)
from unic.train.logger import MetricsWriter, setup_logging
from unic.train.optim import apply_schedules, clip_gradients, optimizer_step, poison_gradients
from unic.train.health import SkippedSteps
from unic.train.plan import skipped_features
from unic.train.validate import Validator

logger = logging.getLogger(__name__)

UNIFEX_HEAD = "unifex.head."  # the UniFEx margin head's prefix in a training checkpoint's model state


# what the stop flag of the step's all-reduce carries: the signal that asked the run to stop
STOP_SIGNALS = {1: signal.SIGTERM, 2: signal.SIGINT}
STOP_CODES = {sig: code for code, sig in STOP_SIGNALS.items()}


class Preempted(Exception):
    """SIGTERM (preemption, exit 143) or SIGINT (Ctrl-C, exit 130) received: every rank saved a checkpoint at
    the same step and the run stops."""

    def __init__(self, signum: int, step: int, path: str):
        self.exit_code = 128 + signum
        if signum == signal.SIGINT:
            text = f"stopped by Ctrl-C at step {step}; checkpoint saved to {path} (run the same command to resume)"
        else:
            text = f"stopped by SIGTERM at step {step}; checkpoint saved to {path}"
        super().__init__(text)


class FinishedRun(Exception):
    """The output folder holds a run that already reached its last step: nothing to train (exit 0)."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is left in place."""


class CollectiveTimeoutError(RuntimeError):
    """A collective timed out: a rank stalled or died."""


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text


def clip_sharded_gradients(params: list[torch.Tensor], max_norm: float, mode: str = "global",
                           sharded: list[torch.Tensor] | None = None) -> torch.Tensor:
    """:func:`unic.train.optim.clip_gradients` where some parameters are FSDP's DTensor shards: their norms
    are those of the full tensors (torch's DTensor reductions), combined with the other parameters' (the
    replicated heads) into the same total on every rank; ``global`` scales all gradients by one coefficient
    (``clip_grads_with_norm_``), ``per_param`` each parameter by its own full norm, as UNIC."""
    from torch.distributed.tensor import DTensor

    shards = [p for p in params if isinstance(p, DTensor)]
    plain = [p for p in params if not isinstance(p, DTensor)]
    if mode not in ("global", "per_param"):
        raise ValueError(f"clip mode must be 'global' or 'per_param', got {mode!r}")
    device = (shards or plain)[0].grad.device if shards or plain else torch.device("cpu")
    if mode == "global":  # one reduction over every shard (clip_grad_norm_'s), then the rest's norm
        norms = [torch.nn.utils.get_total_norm([p.grad for p in shards]).full_tensor()] if shards else []
        rest = clip_gradients(plain, 0.0, mode, sharded).to(device) if plain else torch.zeros((), device=device)
        total = torch.linalg.vector_norm(torch.stack([*norms, rest]))
        if max_norm > 0:
            for group in (shards, plain):
                if group:
                    torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total
    # per_param: each shard's full norm (one small reduction per parameter)
    norms = [n.full_tensor() for n in torch._foreach_norm([p.grad for p in shards])] if shards else []
    rest = clip_gradients(plain, max_norm, mode, sharded).to(device) if plain else torch.zeros((), device=device)
    if max_norm > 0:
        for p, norm in zip(shards, norms):
            p.grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
    return torch.linalg.vector_norm(torch.stack([*norms, rest]))


class Trainer:
    """Owns the run's state; ``train()`` runs it to the end (or ``train.max_steps``)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.started = time.perf_counter()
        self.device = distributed.init_distributed(cfg.run.device, cfg.train.collective_timeout_s)
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.global_batch, self.batch_per_gpu = resolve_batch(cfg, self.world)
        setup_logging(None)
        self.precision = distributed.resolve_precision(cfg.run.precision, self.device)
        if self.precision != "fp32" and self.device.type == "cpu" and cfg.run.precision != "auto":
            logger.warning("%s autocast on CPU is slow; fp32 is the CPU default", self.precision)
        ckpt_lib.seed_everything(cfg.run.seed)
        self.distill, self.udon = objectives(cfg)
        self.unifex = unifex_enabled(cfg)

        # everything that can fail on user input is checked before the output folder exists
        data_skips: list[dict] = []
        self.train_set, val_set, knn_bank = build_datasets(cfg, self.udon, data_skips)
        self.skipped = skipped_features(cfg, data_skips, self.device)  # warned once, listed in the plan
        self.output_dir = os.path.abspath(os.path.expanduser(cfg.run.output_dir))
        self.checkpoint_path = os.path.join(self.output_dir, ckpt_lib.CHECKPOINT_NAME)
        resume_state = None
        if cfg.train.resume and os.path.isfile(self.checkpoint_path):
            resume_state = self.read_checkpoint(self.checkpoint_path)  # validated before anything is written
            self._check_unfinished(resume_state)
        check_teacher_weights(cfg)  # every missing teacher file in one error, before any model is built
        self.parts = build_model(cfg, self.train_set, self.device)
        self.model, self.domain_heads = self.parts.model, self.parts.domain_heads
        self.unifex_head = self.parts.unifex_head  # UniFEx: outside DDP, gradients averaged by hand
        # the heads that may hold Partial FC classifiers (heads.partial_fc), under the names their sharded
        # centres are checkpointed by (full_state / load_full_state, collective)
        self.heads = torch.nn.ModuleDict({name: m for name, m in (("udon", self.domain_heads),
                                                                  ("unifex", self.unifex_head)) if m is not None})
        self.sharded = sharded_parameters(self.heads)  # per-rank shards: never all-reduced
        self.domains = list(self.train_set.domain_names)
        # a different RNG stream per rank from here on (stochastic depth), identical weights above
        torch.manual_seed(cfg.run.seed + 1000 * self.rank)
        # fsdp: the model's weights become shards in place (self.ddp_model is self.model); one process: plain
        self.fsdp = cfg.train.parallelism == "fsdp" and self.world > 1
        self.ddp_model = wrap_model(cfg, self.model, self.device, self.precision)
        if cfg.train.parallelism == "fsdp" and not self.fsdp:
            logger.info("train.parallelism=fsdp on one process: nothing to shard, the model trains as it is")
        # every optimizer parameter under one name space (the gathered optimizer state of an FSDP run)
        self.trained_modules = torch.nn.ModuleDict({"model": self.model, **self.heads})
        self.batches = build_batches(cfg, self.train_set, self.global_batch, self.device)
        self.steps_per_epoch = len(self.train_set) // self.global_batch
        self.schedules = build_schedules(cfg, self.global_batch, self.steps_per_epoch)
        self.total_steps, self.max_steps = self.schedules.total_steps, self.schedules.max_steps
        self.optimizer = build_optimizer(cfg, self.parts, self.schedules)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.task = build_task(cfg, self.parts, self.ddp_model, self.total_steps, self.device)
        self.device_augment = build_device_augment(cfg)  # data.decode=gpu: decoding and augmenting here
        self.write_checkpoint = save_checkpoint  # (state, path); the chaos suite's faults wrap it
        self.step = 0
        self.skipped_images = 0
        self.bad_files: dict[str, str] = {}  # unreadable image -> reason, written to bad_images.json
        self.bad_steps, self.consecutive_bad_steps = 0, 0
        self.stop_code = 0  # STOP_SIGNALS' key of a signal received here (0: none), shared by the next all-reduce
        self.stop_agreed = 0  # the largest stop code over all ranks at the last step: every rank acts on this one
        # from the first validation to the last export: Ctrl-C is shared by the next all-reduce (the step
        # finishes, every rank saves) or, once the steps are done, lets the run finish; before, it quits
        self._training = False
        self._sigint_seen = False
        self._saved_step = -1
        self._handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        self._record_config(resume_state)
        self._prepare_output_dir(resume_state)
        if resume_state is not None:
            self.load(resume_state, self.checkpoint_path)
        self.skipped_steps = SkippedSteps(self.device, self.step)
        # the steps an interrupted launch logged after its last checkpoint are trained again: purged
        self.metrics = MetricsWriter(self.output_dir, purge_from=self.step + 1 if resume_state is not None else 0)
        self.validator = Validator(
            cfg, self.parts, self.task, val_set, knn_bank, self.steps_per_epoch, self.batch_per_gpu, self.device,
            distributed.AUTOCAST_DTYPES[self.precision], self.metrics,
            [self.ddp_model, self.parts.standardizer, self.domain_heads, self.unifex_head])
        self._log_setup()

    @property
    def domain_sampler(self):
        return self.batches.domain_sampler

    def _check_unfinished(self, state: dict) -> None:
        """Raise :class:`FinishedRun` when the checkpoint already reached this run's last step and the run
        wrote its results (a run stopped between its last step and its exports resumes to finish them)."""
        steps_per_epoch = len(self.train_set) // self.global_batch
        if not steps_per_epoch:
            return  # fewer images than a batch: build_batches says so
        schedule = derived_schedule(self.cfg, self.global_batch, steps_per_epoch)
        step, last = int(state["step"]), schedule["run_steps"]
        finished = os.path.isfile(os.path.join(self.output_dir, report.RESULTS_NAME))
        if step < last or not distributed.broadcast_object(finished):  # rank 0's view, the same on every rank
            return
        changes = provenance.config_changes(provenance.latest_config(state), to_plain(self.cfg))
        text = f"{self.cfg.run.output_dir} holds a finished run (step {step} of {last}); nothing to train."
        if changes:
            text += (f" Settings differ from it: {provenance.format_changes(changes)}. Use another run.output_dir "
                     "or train.resume=false")
        elif last < schedule["total_steps"]:
            text += f" Raise train.max_steps (up to {schedule['total_steps']}) to continue it"
        else:
            text += f" Its results: {os.path.join(self.output_dir, report.RESULTS_NAME)}"
        raise FinishedRun(text)

    def _record_config(self, state: dict | None) -> None:
        """The config history the checkpoint carries: the first segment's config and each later one that
        changed a setting (``self.config_changes``: this segment's changes, empty on a fresh start)."""
        current = to_plain(self.cfg)
        self.config_changes: dict[str, list] = {}
        if state is None:
            self.config_original, self.config_history = current, []
            return
        self.config_original = state.get("config") or current
        self.config_history = list(state.get("config_history") or [])
        self.config_changes = provenance.config_changes(provenance.latest_config(state), current)
        if self.config_changes:
            self.config_history.append({"step": int(state["step"]), "config": current, "changes": self.config_changes})

    def _prepare_output_dir(self, state: dict | None) -> None:
        """The output folder with the config history (``config.yaml`` never overwritten by a resume),
        cleared of partial writes; the log file there."""
        config_path = os.path.join(self.output_dir, "config.yaml")
        resume_config = None
        if self.rank == 0:
            if state is None:  # a new run: the configs of a run it replaces go
                for old in provenance.resume_configs(self.output_dir):
                    os.remove(old)
                write_resolved_config(self.cfg, self.output_dir)
            else:
                if not os.path.isfile(config_path):
                    provenance.write_plain_config(self.config_original, config_path)
                if self.config_changes:
                    resume_config = provenance.next_resume_config(self.output_dir)
                    provenance.write_plain_config(
                        to_plain(self.cfg), resume_config,
                        f"resumed at step {state['step']} with changed settings: "
                        f"{provenance.format_changes(self.config_changes)}")
            for tmp in ckpt_lib.remove_partial_files(self.output_dir):
                logger.warning("removed %s, left by an interrupted checkpoint write", tmp)
        distributed.barrier()
        setup_logging(self.output_dir)
        if self.config_changes and self.rank == 0:
            logger.info("resuming with changed settings (%s): %s", resume_config,
                        provenance.format_changes(self.config_changes))

    def _log_setup(self) -> None:
        """The preflight plan (what ``main_unic.py --plan`` prints), logged and written as ``plan.json``, and
        what the plan cannot know before the data is read: the UDON heads' sizes."""
        from unic.train.plan import build_plan, format_plan, write_plan

        num_classes = self.parts.merged_labels.num_classes if self.unifex else None
        self.plan = build_plan(self.cfg, self.world, len(self.train_set), self.device, self.skipped, num_classes)
        if self.rank == 0:
            for line in format_plan(self.plan).splitlines():
                logger.info("plan: %s", line)
            write_plan(self.plan, os.path.join(self.output_dir, "plan.json"))
            if self.skipped:
                logger.warning("turned off: %s", "; ".join(f"{s['feature']}: {s['reason']}" for s in self.skipped))
        if self.udon and self.rank == 0:
            memory = self.domain_heads.memory_report()
            logger.info("UDON heads: a %s classifier per domain, sampled %s; weights + AdamW state %s",
                        self.cfg.heads.name, self.cfg.udon.sampling,
                        ", ".join(f"{d} {mb:.1f} MB" for d, mb in memory.items()))

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        """SIGTERM and Ctrl-C: finish the step, save on every rank, stop. Ctrl-C before the step loop quits
        at once (nothing to save), a second Ctrl-C too (without saving). The handler only sets the flag
        (the step's all-reduce shares it; the loop says what happens): writing a log line here could
        re-enter a stream the interrupted code was writing to."""
        if signum == signal.SIGINT:
            if not self._training:
                raise KeyboardInterrupt
            if self._sigint_seen:
                os.write(2, b"second Ctrl-C: stopping now, without saving\n")
                os._exit(130)
            self._sigint_seen = True
        self.stop_code = max(self.stop_code, STOP_CODES[signum])  # pending: shared by the next step's all-reduce

    # ------------------------------------------------------------------ state
    def model_state(self) -> dict:
        """Trainable state under one key space: backbone.*, ladder.*, udon.* (universal and domain heads);
        UniFEx: backbone.model.* (frozen weights included), neck.*, unifex.head.*."""
        # fsdp: gathered in full on rank 0 (collective; {} elsewhere, where nothing is written)
        state = ckpt_lib.full_model_state(self.model) if self.fsdp else dict(self.model.state_dict())
        if self.domain_heads is not None:
            state.update({f"udon.{k}": v for k, v in self.domain_heads.state_dict().items()})
        if self.unifex_head is not None:
            state.update({f"{UNIFEX_HEAD}{k}": v for k, v in self.unifex_head.state_dict().items()})
        return state

    def state_dict(self) -> dict:
        """The run's state (collective: every rank's RNG state is gathered; the rest is replicated)."""
        rngs = distributed.all_gather_object(ckpt_lib.rng_state())
        return {
            "format": TRAIN_FORMAT,
            "version": FORMAT_VERSION,
            "step": self.step,
            "model": self.model_state(),
            # sharded centres and their optimizer state gathered in class order (loads on any world size)
            "optimizer": (ckpt_lib.full_optimizer_state(self.trained_modules, self.optimizer) if self.fsdp
                          else optimizer_state_dict(self.optimizer, self.heads)),
            "partial_fc": full_state(self.heads, self.optimizer),
            "scaler": self.scaler.state_dict(),
            "standardizer": self.parts.standardizer.state_dict() if self.parts.standardizer is not None else {},
            "generator": self.task.generator.get_state(),
            "data": self.batches.state_dict(),
            "domains": self.domains,
            "rng": rngs,
            "world_size": self.world,
            "skipped_images": self.skipped_images,
            "bad_steps": self.bad_steps,
            "config": self.config_original,  # the first segment's; the later ones that changed a setting:
            "config_history": self.config_history,
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
                self.write_checkpoint(state, self.checkpoint_path)
                if periodic and self.cfg.train.keep_checkpoints > 0:
                    self.write_checkpoint(state, ckpt_lib.periodic_path(self.output_dir, self.step))
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
        reports = distributed.all_gather_object(self.bad_files)
        merged = {path: reason for report in reports for path, reason in report.items()}
        if self.rank == 0 and merged:
            write_json(os.path.join(self.output_dir, "bad_images.json"),
                       {"count": len(merged), "files": [{"path": p, "reason": r} for p, r in sorted(merged.items())]})

    def read_checkpoint(self, path: str) -> dict:
        """Load a training checkpoint and check it belongs to this configuration (else a clear error). The
        number of processes may differ (elastic resume) as long as the global batch is the same."""
        state = load_checkpoint(path)
        if state.get("format") != TRAIN_FORMAT:
            raise CheckpointFormatError(f"{path} is not a UNIC training checkpoint (format {state.get('format')!r})")
        diffs = resume_mismatches(provenance.latest_config(state), self.cfg, state.get("world_size"), self.world)
        if diffs:
            raise ConfigError(
                f"cannot resume from {path}, written with other settings ({'; '.join(diffs)}); use another "
                "run.output_dir, or train.resume=false to start over there"
            )
        return state

    def load(self, state: dict, path: str) -> None:
        model = state["model"]
        heads_prefix = ("udon.teacher_heads.", "udon.teacher_classifiers.", "udon.universal_classifiers.",
                        UNIFEX_HEAD)
        try:
            own = {k: v for k, v in model.items() if not k.startswith(heads_prefix)}
            if self.fsdp:  # each rank keeps its shards of the full tensors (written by ddp or fsdp alike)
                ckpt_lib.load_full_model_state(self.model, own)
            else:
                self.model.load_state_dict(own)
            if self.domain_heads is not None:
                self.domain_heads.load_state_dict(
                    {k[len("udon."):]: v for k, v in model.items() if k.startswith(heads_prefix[:3])})
            if self.unifex_head is not None:
                self.unifex_head.load_state_dict(
                    {k[len(UNIFEX_HEAD):]: v for k, v in model.items() if k.startswith(UNIFEX_HEAD)})
            if self.fsdp:
                ckpt_lib.load_full_optimizer_state(self.trained_modules, self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            load_full_state(self.heads, self.optimizer, state.get("partial_fc") or {})
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointFormatError(
                f"cannot resume from {path}: it was written by a different model or configuration "
                f"({str(err).splitlines()[0][:300]}); use another run.output_dir or train.resume=false"
            ) from None
        self.scaler.load_state_dict(state["scaler"])
        if self.parts.standardizer is not None:
            self.parts.standardizer.load_state_dict(state["standardizer"])
        self.task.generator.set_state(state["generator"])
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        if not ckpt_lib.restore_rng_state(state["rng"], self.rank, self.world, self.cfg.run.seed, self.step):
            logger.warning("resuming on %d processes a checkpoint written by %d: the global batch and the data "
                           "order are unchanged; the per-process random streams (stochastic depth) start afresh and "
                           "UDON's relational term pairs the new local batches",
                           self.world, len(state["rng"]))
        logger.info("resumed from %s at step %d", path, self.step)

    def export(self) -> list[str]:
        """``student.pth`` (plain timm backbone, plus the adaptors when distilling) and, with UDON,
        ``universal.pth`` (backbone + heads, and the adaptors); UniFEx:
        ``unifex.pth`` (backbone, neck and input settings, :mod:`unic.models.unifex`)."""
        if self.unifex:
            from unic.models.unifex import unifex_export

            path = os.path.join(self.output_dir, "unifex.pth")
            if self.rank == 0:
                save_checkpoint(unifex_export(self.model, self.domains, self.parts.merged_labels.num_classes), path)
            return [path]
        paths = [os.path.join(self.output_dir, "student.pth")]
        if self.udon:
            paths.append(os.path.join(self.output_dir, "universal.pth"))
        model = self.model
        if self.fsdp:  # collective: the full weights gathered on rank 0, exported from a plain copy there
            state = ckpt_lib.full_model_state(self.model)
            if self.rank != 0:
                return paths
            model = unsharded_model(self.cfg, self.parts, state, torch.device("cpu"))
        if self.rank == 0:
            save_checkpoint(student_export(model.backbone, self.cfg, model.ladder, self.parts.standardizer), paths[0])
            if self.udon:
                save_checkpoint(universal_export(model.backbone, self.cfg, model.udon.universal,
                                                 self.domain_heads.teacher_heads, self.domains, model.ladder,
                                                 self.parts.standardizer), paths[1])
        return paths

    def validate(self, step: int) -> None:
        """The validator's metrics at ``step``. FSDP: every rank scores a plain copy of the full weights (its
        shard of the val set may hold fewer batches than another's: a sharded forward would wait for them)."""
        if not self.fsdp:
            self.validator.validate(step)
            return
        parts = self.validator.parts
        copy = unsharded_model(self.cfg, self.parts, ckpt_lib.full_model_state(self.model, everywhere=True),
                               self.device)
        self.validator.parts = dataclasses.replace(parts, model=copy)
        try:
            self.validator.validate(step)
        finally:
            self.validator.parts = parts
            del copy

    # ------------------------------------------------------------------ loop
    def autocast(self):
        dtype = distributed.AUTOCAST_DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _stateful_buffers(self, domain_name: str | None) -> list[torch.Tensor]:
        """Buffers a forward pass updates (teacher statistics, stateful margin heads)."""
        modules = [self.parts.standardizer, self.unifex_head]
        if domain_name is not None:
            modules += [self.domain_heads.teacher_classifiers[domain_name],
                        self.domain_heads.universal_classifiers[domain_name]]
        return [b for m in modules if m is not None for b in m.buffers()]

    def batch_images(self, batch: dict) -> torch.Tensor:
        """The batch's images on the device: copied there, or (``data.decode=gpu``) decoded and augmented
        there; an image that only fails to decode there is replaced by another of the batch, counted and
        reported as the workers' skipped images are."""
        if self.device_augment is None:
            return batch["image"].to(self.device, non_blocking=True)
        images, bad = self.device_augment(batch["image"], self.device)
        self.note_unreadable(len(bad), bad)
        return images

    def note_unreadable(self, count: int, reports: list[str]) -> None:
        """Count ``count`` unreadable images passed over and keep their ``"<path>: <reason>"`` reports (each
        entry may hold several, one per line) for ``bad_images.json``."""
        self.skipped_images += count
        for lines in reports if count else ():  # every entry is empty when nothing was skipped
            for line in filter(None, lines.split("\n")):
                path, _, reason = line.partition(": ")
                self.bad_files[path] = reason

    def batch_labels(self, domain: int | None, batch: dict) -> torch.Tensor | None:
        """The labels a step trains with, on the device: the drawn domain's (UDON), each image's row of the
        merged label space (UniFEx, from its (domain, label)), or None (distillation alone)."""
        if self.unifex:
            return self.parts.merged_labels(batch["domain"].to(self.device, non_blocking=True),
                                            batch["label"].to(self.device, non_blocking=True))
        return batch["label"].to(self.device, non_blocking=True) if domain is not None else None

    def train_step(self, images: torch.Tensor, domain: int | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step, without a host-device synchronisation (see :mod:`unic.train.syncs`).

        A non-finite loss on any rank, or non-finite gradients, skip the step on every rank on the device:
        the fused optimizer's kernels (or GradScaler, under fp16) leave weights and optimizer state untouched,
        the buffers the forward pass updated get their values back, and :class:`SkippedSteps` counts it (read
        by :meth:`check_skipped_steps` where the host acts: logging and checkpoint steps). Every rank also
        learns whether any received SIGTERM or Ctrl-C, through one host-side all-reduce (gloo)."""
        cfg, step = self.cfg, self.step
        apply_schedules(self.optimizer, self.schedules.values(cfg, step))
        self.ddp_model.train()
        for module in (self.parts.standardizer, self.domain_heads, self.unifex_head):
            if module is not None:
                module.train()
        name = None
        if domain is not None:
            name = self.domains[domain]
            labels = self.parts.label_maps[domain][labels]
        buffers = self._stateful_buffers(name)
        saved = [b.clone() for b in buffers]
        with self.autocast():
            out = self.task(images, step, domain=name, labels_B=labels)
        self.scaler.scale(out["loss"]).backward()
        if name is not None:
            self.domain_heads.sync_gradients(name)
        if self.unifex_head is not None:
            shards = {id(p) for p in self.sharded}
            distributed.average_gradients([p for p in self.unifex_head.parameters() if id(p) not in shards])
        if step < self.schedules.freeze_steps:  # frozen backbone: no update and no optimizer state
            for p in self.model.backbone.parameters():
                p.grad = None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        # a non-finite loss on one rank concerns all: one all-reduce on the device (no host wait)
        bad_loss = distributed.all_reduce_max((~torch.isfinite(out["loss"].detach())).float()) > 0
        if self.scaler.is_enabled():  # GradScaler judges the gradients: a bad loss makes them non-finite
            poison_gradients(params, bad_loss)
        self.scaler.unscale_(self.optimizer)
        clip = clip_sharded_gradients if self.fsdp else clip_gradients
        out["grad_norm"] = clip(params, cfg.optim.clip_grad, cfg.optim.clip_mode, self.sharded)
        # the gradient norm is the same on every rank (all-reduced gradients, the shards' norms summed)
        bad = bad_loss | ~torch.isfinite(out["grad_norm"])
        optimizer_step(self.optimizer, self.scaler, bad)
        self.optimizer.zero_grad(set_to_none=True)
        for buffer, value in zip(buffers, saved):
            buffer.copy_(torch.where(bad, value, buffer))
        if name is not None:
            self.domain_sampler.record(domain, out[f"udon/{name}/ce_teacher"], keep=~bad)
        # fp16: an overflow of the scaled gradients is the scaler's routine (it skips and lowers the scale),
        # not a non-finite step; only a non-finite loss counts
        counted = bad_loss if self.scaler.is_enabled() else bad
        self.skipped_steps.update(counted)
        # every rank stops after the same step: on the reduced code only, never on a signal that arrived on
        # this rank after the reduce (that one is shared by the next step's)
        self.stop_agreed = distributed.host_max(self.stop_code)
        out["skipped_step"] = counted.float()
        return {k: v.detach() for k, v in out.items()}

    def _report_compile(self) -> None:
        """After the first step (where torch.compile compiles what the start-up probe did not): say which parts
        run eagerly."""
        if not self.parts.compiled:
            return
        eager = eager_parts(self.parts)
        if eager:
            logger.warning("torch.compile could not compile %s (the warnings above say why): eagerly run; "
                           "train.compile=false skips compiling", ", ".join(eager))
        else:
            logger.info("torch.compile: every compiled part of the model runs compiled")

    def check_skipped_steps(self) -> None:
        """Read the skipped-step counts kept on the device (a host synchronisation: at logging and checkpoint
        steps); warn about the steps skipped since the last read; stop after ``train.max_bad_steps``
        consecutive ones (the last good checkpoint stays the newest: none is written during such a run)."""
        window = self.skipped_steps.read()
        self.consecutive_bad_steps = window.run
        if not window.skipped:
            return
        self.bad_steps += window.skipped
        where = (f"at step {window.first}" if window.skipped == 1 else
                 f"at step {window.first} and {window.skipped - 1} more up to step {window.last}")
        logger.warning("non-finite loss or gradient %s: skipped on every rank (%d in a row now, %d in all)",
                       where, window.run, self.bad_steps)
        limit = self.cfg.train.max_bad_steps
        if window.longest >= limit:
            raise NonFiniteLossError(
                f"{limit} consecutive non-finite steps (train.max_bad_steps; seen at step {self.step}, the last "
                f"skipped step {window.last}); stopping. The last good checkpoint is {self.checkpoint_path}"
                + ("" if os.path.isfile(self.checkpoint_path) else " (none was saved yet)")
                + "; lower optim.lr, enable optim.clip_grad or check the data and teacher weights"
            )

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
        self._training = True
        if self.step == 0 and self.validator.should_validate(0):
            self.validate(0)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        window_steps, window_start, data_time = 0, time.perf_counter(), 0.0
        run_start, start_step = time.perf_counter(), self.step
        self.batches.start(self.step)
        try:
            while self.step < self.max_steps:
                fetch_start = time.perf_counter()
                domain, batch = self.batches.next()
                data_time += time.perf_counter() - fetch_start
                distributed.heartbeat(self.step)  # a rank stuck before this point is named as behind
                images = self.batch_images(batch)
                labels = self.batch_labels(domain, batch)
                measure = (self.step + 1) % cfg.train.log_every == 0
                out = self.train_step(images, domain, labels)
                # the workers' count is a Python int (the loader's collate): no tensor read
                self.note_unreadable(batch["skipped_images"], batch["bad"])
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                window_steps += 1
                self.step += 1
                if self.step == start_step + 1:
                    self._report_compile()
                if self.udon and self.domain_sampler.maybe_update():
                    self.metrics.write(self.step, {f"p/{d}": float(p) for d, p in zip(self.domains, self.domain_sampler.probs)},
                                       prefix="sampling")
                save_due = bool(cfg.train.save_every) and self.step % cfg.train.save_every == 0
                validate_due = self.validator.should_validate(self.step)
                epoch_end = self.step % self.steps_per_epoch == 0
                # the host reads the skipped-step counts only where it acts on them (a synchronisation)
                if measure or save_due or validate_due or epoch_end or self.stop_agreed or self.step == self.max_steps:
                    self.check_skipped_steps()
                if measure:
                    self.log_window(sums, counts, window_steps, time.perf_counter() - window_start, data_time,
                                    run_start, start_step)
                    sums, counts, window_steps, data_time, window_start = {}, {}, 0, 0.0, time.perf_counter()
                if self.stop_agreed and self.step < self.max_steps:  # on the last step the run just finishes
                    if STOP_SIGNALS[self.stop_agreed] == signal.SIGINT:
                        logger.info("Ctrl-C: saving a checkpoint at step %d on every rank, then stopping (Ctrl-C "
                                    "again quits at once, without saving)", self.step)
                    else:
                        logger.warning("SIGTERM received: saving a checkpoint at step %d, then stopping", self.step)
                    self.save()
                    raise Preempted(STOP_SIGNALS[self.stop_agreed], self.step, self.checkpoint_path)
                # no checkpoint during a run of skipped (non-finite) steps: the last good one stays the newest
                healthy = self.consecutive_bad_steps == 0
                if save_due and healthy:
                    self.save(periodic=True)
                if validate_due:
                    self.validate(self.step)
                if epoch_end:
                    if healthy:
                        self.save()
                        if self.step < self.max_steps:  # the last export follows the loop
                            self.export()
        finally:
            self.batches.close()
        train_time = time.perf_counter() - run_start
        self.save()  # no-op when this step was just saved (epoch end)
        paths = self.export()
        if self.rank == 0:
            self.write_results(paths, self.step - start_step, train_time)
        self._training = False

    def write_results(self, exports: list[str], trained_steps: int, train_time: float) -> dict:
        """``results.json`` and ``curves.png`` from ``metrics.jsonl`` (every segment of the run), and the
        closing summary lines (rank 0)."""
        out = self.output_dir
        records = report.read_metrics(self.metrics.path)
        files = {
            "checkpoint": self.checkpoint_path, "exports": exports,
            "config": [os.path.join(out, "config.yaml")] + provenance.resume_configs(out),
            "metrics": self.metrics.path, "results": os.path.join(out, report.RESULTS_NAME),
            "log": os.path.join(out, "log.txt"),
            "tensorboard": os.path.join(out, "tensorboard") if self.metrics.tensorboard else None,
        }
        curves = os.path.join(out, report.CURVES_NAME)
        files["curves"] = curves if report.plot_curves(records, curves) else None
        results = {
            "steps": self.step, "total_steps": self.total_steps, "trained_steps": trained_steps,
            "wall_time_s": time.perf_counter() - self.started, "train_time_s": train_time,
            "images_per_s": trained_steps * self.global_batch / train_time if train_time > 0 else 0.0,
            "global_batch": self.global_batch, "world_size": self.world, "skipped_images": self.skipped_images,
            "skipped_steps": self.bad_steps, "skipped_features": self.skipped, **report.summarize(records),
            "files": files,
        }
        write_json(files["results"], results)
        for line in report.format_summary(results):
            logger.info("%s", line)
        return results

    def log_window(self, sums, counts, steps, elapsed, data_time, run_start, start_step) -> None:
        keys = sorted(k for k in sums if k not in ("grad_norm", "skipped_step"))
        packed = torch.stack([sums[k].float() / counts[k] for k in keys])
        distributed.all_reduce_mean(packed)
        metrics = dict(zip(keys, packed.tolist()))
        metrics["grad_norm"] = float(sums["grad_norm"]) / counts["grad_norm"]
        # the lr of the trained part: the backbone's (UNIC, UDON) or the neck and head's (UniFEx)
        metrics["lr"] = float(self.schedules.lr["unic" if self.unifex else "backbone"][self.step - 1])
        metrics["wd"] = float(self.schedules.weight_decay[self.step - 1])
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
        done, elapsed = self.step - start_step, time.perf_counter() - run_start
        eta = elapsed / max(done, 1) * (self.max_steps - self.step)
        logger.info(
            "step %d/%d (%d%%, epoch %d) loss %.4f lr %.2e grad %.2f | %.1f img/s, data %.3fs/step | "
            "elapsed %s, ETA %s",
            self.step, self.max_steps, 100 * self.step // self.max_steps, (self.step - 1) // self.steps_per_epoch,
            metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["images_per_s"], metrics["data_time_s"],
            report.hms(elapsed), report.hms(eta),
        )

    def close(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        for sig, handler in getattr(self, "_handlers", {}).items():
            signal.signal(sig, handler)
