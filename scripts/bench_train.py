"""Training throughput benchmark: warm-up steps, then timed steps of the real trainer on any config.

    python scripts/bench_train.py [--config F] [--warmup 5] [--steps 20] [key=value ...]

Prints one JSON object: images/s, step time, peak memory and, on CUDA, achieved TFLOP/s, MFU and GPU
utilisation, beside the preflight plan's FLOPs and memory estimate for the same configuration. FLOPs are counted by ``torch.utils.flop_counter`` over one full training step: student
forward+backward, ladder, and every teacher forward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unic import distributed  # noqa: E402
from unic.config import DEMO_CONFIG, load_config  # noqa: E402

# dense bf16/fp16 tensor-core peaks (TFLOP/s) used for MFU; override with --peak_tflops
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEMO_CONFIG, help="YAML preset (default: the demo)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from unic.train.loop import Trainer

    out_dir = tempfile.mkdtemp(prefix="unic-bench-")
    cfg = load_config(args.config, [*args.overrides, f"run.output_dir={out_dir}", "train.resume=false"])
    trainer = Trainer(cfg)
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # batches are fetched up front: the benchmark times the training step, not the data pipeline
    batches = []
    trainer.batches.start(0)
    for _ in range(min(args.warmup + args.steps + 1, trainer.steps_per_epoch)):
        domain, batch = trainer.batches.next()
        labels = batch["label"].to(device) if domain is not None else None
        batches.append((batch["image"].to(device), domain, labels))
    trainer.batches.close()

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

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops_per_step = counter.get_total_flops()

    step_time = elapsed / args.steps
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "world_size": trainer.world,
        "student": cfg.student.arch,
        "teachers": list(cfg.teachers.names),
        "img_size": cfg.student.img_size,
        "batch_per_device": trainer.batch_per_gpu,
        "precision": trainer.precision,
        "steps_timed": args.steps,
        "step_time_s": step_time,
        "images_per_s": trainer.global_batch / step_time,
        "flops_per_step_per_device": flops_per_step,
        "achieved_tflops_per_device": flops_per_step / step_time / 1e12,
        # the preflight plan's figures (unic.train.plan, what `main_unic.py --plan` prints) beside the measured ones
        "plan_flops_per_step_per_device": trainer.plan["tflops_per_step_per_gpu"] * 1e12,
        "plan_memory_estimate_gb": trainer.plan["memory_per_gpu"]["total_gb"],
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = peak_tflops(args.peak_tflops)
        result["mfu"] = result["achieved_tflops_per_device"] / peak if peak else None
        result["gpu_utilisation_pct"] = utilisation
    else:
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rank = distributed.get_rank()
    trainer.close()
    distributed.destroy_distributed()
    if rank == 0:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
    distributed.exit_process(0)
