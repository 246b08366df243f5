"""Training throughput benchmark: warm-up steps, then timed steps of the real trainer on any config.

    python scripts/bench_train.py [--config F] [--warmup 5] [--steps 20] [--peak_tflops T] [--baseline] [key=value ...]
    unic-bench-train ...   (the same, installed as a console script)

Prints one JSON object: images/s, step time, peak memory and, on CUDA, achieved TFLOP/s, MFU and GPU
utilisation, beside the preflight plan's FLOPs and memory estimate for the same configuration. FLOPs are
counted by ``torch.utils.flop_counter`` over one full training step: student forward+backward, ladder, and
every teacher forward.

``--baseline`` measures, in the same process and on the same batches, the same step with every fast-path
feature off (:data:`BASELINE`: eager, one MLP per projector, the ladder and the teachers in float32, AdamW
without the foreach/fused kernels and so the skip flag read every step) after the configured one, and prints
both figures and their ratio: the honest A/B on any machine. ``--data-only`` times the data loader alone
(decoding, augmentation, collation and the copy to the device, with the configured workers): the input
pipeline's ceiling in images/s, to compare with the step's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time

import torch

from teachers import TeacherWeightsError
from unic import distributed
from unic.cli import parse
from unic.config import DEMO_CONFIG, ConfigError, UnicConfig, unifex_enabled
from unic.data.uned import DataFormatError
from unic.io import CheckpointFormatError
from unic.train.build import eager_parts, input_spec
from unic.train.optim import is_fused
from unic.train.syncs import count_syncs

# dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; override with --peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


EXAMPLE = "python scripts/bench_train.py --config unic_vitb16_in1k --steps 10 --baseline data.global_batch=64"
# what --baseline turns off, as the plain path of the same code
BASELINE = ("eager (train.compile=false)", "one MLP per projector (Ladder.batched=False)",
            "the ladder in float32 (outside autocast)", "teachers in float32 (autocast casts their weights each step)",
            "AdamW without foreach/fused kernels, so a step's skip flag is read on the host (one sync per step)")


def peak_tflops(override: float | None, device: torch.device) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="per-device peak for MFU (default: the table's figure for the GPU)")
    parser.add_argument("--baseline", action="store_true",
                        help="also measure the plain path (every fast-path feature off) and print the ratio")
    parser.add_argument("--data-only", dest="data_only", action="store_true",
                        help="time the data loader alone (its images/s ceiling), no training step")


def measure_data(trainer, args) -> dict:
    """images/s of the training batches alone (data workers, decoding, augmentation, copy to the device;
    with ``data.decode=gpu`` the decoding and augmentation on the device)."""
    batches = trainer.batches
    batches.start(0)
    try:
        for _ in range(args.warmup):  # the workers' start-up is not the steady state
            batches.next()
        start, images = time.perf_counter(), 0
        for _ in range(args.steps):
            _, batch = batches.next()
            images += trainer.batch_images(batch).shape[0]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        elapsed = time.perf_counter() - start
    finally:
        batches.close()
    images_per_s = images * trainer.world / elapsed  # every rank loads its share at the same rate
    return {"device": str(trainer.device), "world_size": trainer.world, "data": trainer.cfg.data.dataset,
            "img_size": input_spec(trainer.cfg)[0], "batch_per_device": trainer.batch_per_gpu,
            "num_workers": trainer.cfg.data.num_workers, "decode": trainer.cfg.data.decode, "steps_timed": args.steps,
            "loader_images_per_s": images_per_s, "loader_images_per_s_per_device": images_per_s / trainer.world}


def make_baseline(trainer) -> None:
    """Turn the built trainer's fast-path features off (:data:`BASELINE`); the weights stay as they are."""
    ladder = getattr(trainer.model, "ladder", None)  # UniFEx's model has none
    if ladder is not None:
        ladder.batched = False
        plain_forward = ladder.forward

        def fp32_forward(taps):
            with torch.autocast(device_type=trainer.device.type, enabled=False):
                return plain_forward([(c.float(), p.float()) for c, p in taps])

        ladder.forward = fp32_forward
    for teacher in (trainer.parts.teachers or {}).values():
        teacher.tokens.float()
    optimizer = trainer.optimizer
    groups = [{k: v for k, v in g.items() if k not in ("foreach", "fused")} for g in optimizer.param_groups]
    trainer.optimizer = type(optimizer)(groups, foreach=False, fused=False)


def prefetch(trainer, count: int) -> list:
    """``count`` batches on the device, fetched up front: the benchmark times the step, not the data."""
    batches = []
    trainer.batches.start(0)
    for _ in range(min(count, trainer.steps_per_epoch)):
        domain, batch = trainer.batches.next()
        batches.append((trainer.batch_images(batch), domain, trainer.batch_labels(domain, batch)))
    trainer.batches.close()
    return batches


def measure(trainer, args) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup``; count one step's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = prefetch(trainer, args.warmup + args.steps + 1)

    def step(i: int) -> None:
        trainer.step = i % trainer.total_steps
        images, domain, labels = batches[i % len(batches)]
        trainer.train_step(images, domain, labels)

    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    sync()
    elapsed = time.perf_counter() - start
    utilisation = None
    if device.type == "cuda":
        try:
            utilisation = torch.cuda.utilization(device)
        except Exception:  # noqa: BLE001 - needs pynvml / NVML
            utilisation = None
    with FlopCounterMode(display=False) as counter:
        step(0)
    syncs, sites = count_syncs(lambda: step(1), device)  # one more step's host-device synchronisations
    return {"elapsed": elapsed, "flops": counter.get_total_flops(), "utilisation": utilisation,
            "syncs": syncs, "sync_sites": sites}


def report(trainer, args, timing: dict) -> dict:
    cfg, device = trainer.cfg, trainer.device
    step_time = timing["elapsed"] / args.steps
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "world_size": trainer.world,
        "student": cfg.unifex.backbone if unifex_enabled(cfg) else cfg.student.arch,
        "teachers": [] if unifex_enabled(cfg) else list(cfg.teachers.names),
        "img_size": input_spec(cfg)[0],
        "batch_per_device": trainer.batch_per_gpu,
        "precision": trainer.precision,
        "steps_timed": args.steps,
        "step_time_s": step_time,
        "images_per_s": trainer.global_batch / step_time,
        "flops_per_step_per_device": timing["flops"],
        "achieved_tflops_per_device": timing["flops"] / step_time / 1e12,
        # the preflight plan's figures (unic.train.plan, what `main_unic.py --plan` prints) beside the measured ones
        "plan_flops_per_step_per_device": trainer.plan["tflops_per_step_per_gpu"] * 1e12,
        "plan_memory_estimate_gb": trainer.plan["memory_per_gpu"]["total_gb"],
        "host_syncs_per_step": timing["syncs"],  # unic.train.syncs.count_syncs over one step
        "host_sync_sites": timing["sync_sites"],
        "compiled": trainer.parts.compiled and not eager_parts(trainer.parts),
        "fused_optimizer": is_fused(trainer.optimizer),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(args.peak_tflops, device)
        result["mfu"] = result["achieved_tflops_per_device"] / peak if peak else None
        result["gpu_utilisation_pct"] = timing["utilisation"]
    else:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    from unic.train.loop import Trainer

    out_dir = tempfile.mkdtemp(prefix="unic-bench-")
    trainer = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        cfg, args = parse([*argv, f"run.output_dir={out_dir}", "train.resume=false"], UnicConfig, __doc__, EXAMPLE,
                          default_config=DEMO_CONFIG, flags=_flags)
        if args.warmup < 0 or args.steps < 1:
            raise ConfigError(f"--warmup must be >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
        if args.data_only and args.baseline:
            raise ConfigError("--data-only times the loader alone; it does not combine with --baseline")
        trainer = Trainer(cfg)
        result = measure_data(trainer, args) if args.data_only else report(trainer, args, measure(trainer, args))
        if args.baseline:
            trainer.close()
            trainer = None
            plain_cfg = parse([*argv, f"run.output_dir={out_dir}", "train.resume=false", "train.compile=false"],
                              UnicConfig, __doc__, EXAMPLE, default_config=DEMO_CONFIG, flags=_flags)[0]
            trainer = Trainer(plain_cfg)
            make_baseline(trainer)
            baseline = report(trainer, args, measure(trainer, args))
            result = {"device": result["device"], "fast": result, "baseline": baseline, "baseline_off": list(BASELINE),
                      "speedup": result["images_per_s"] / baseline["images_per_s"]}
        if trainer.rank == 0:
            print(json.dumps(result, indent=2))
    except (ConfigError, TeacherWeightsError, CheckpointFormatError, DataFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        distributed.destroy_distributed()
        shutil.rmtree(out_dir, ignore_errors=True)  # each process's own folder
    return 0


def cli() -> None:
    """Console-script and ``scripts/bench_train.py`` entry: exits with main()'s code."""
    distributed.exit_process(main())


if __name__ == "__main__":
    cli()
