"""Partial FC against the replicated margin head: per-rank memory and step throughput.

    python scripts/bench_partial_fc.py [--classes 100000 1000000] [--dim 512] [--batch 256] [--world-size 8]
                                       [--rate 0.1] [--head arcface] [--steps 3] [--device auto] [--output F]

One rank of a ``--world-size`` job is simulated by its class shard (rank 0, the largest): the step is this
rank's work (forward, backward and AdamW on the global batch against its sampled classes), without the
collectives. The full head is the replicated head of plain data parallelism on the same global batch
(skipped above ``--max-full-classes``). Memory: centres, their gradient and AdamW state per rank (exact bytes), the (G, N)
logits of one step (G = global batch, N = expected sampled classes of the shard) and, on CUDA, the measured
peak. Also prints the per-rank memory table for 316k and 2M classes (512-d, fp32 centres, gradient and AdamW) on 1/8/64 ranks.
Writes everything to ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from unic.distributed import resolve_device  # noqa: E402
from unic.io import write_json  # noqa: E402
from unic.models.heads import build_margin_head  # noqa: E402
from unic.models.partial_fc import PartialFC, memory_bytes  # noqa: E402

TABLE_CLASSES, TABLE_RANKS, TABLE_DIM = (316_000, 2_000_000), (1, 8, 64), 512
GB = 2**30


def _timed_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step after ``warmup`` untimed steps."""
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def bench_one(kind: str, classes: int, args, device: torch.device) -> dict:
    """Memory and step time of ``kind`` ("partial_fc" or "full") at ``classes`` classes."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "partial_fc":
        module = PartialFC(args.head, args.dim, classes, args.rate, seed=0, shard=(0, args.world_size)).to(device)
        memory = memory_bytes(classes, args.dim, args.world_size, module.k, args.batch, args.rate)
    else:
        module = build_margin_head(args.head, args.dim, classes).to(device)
        memory = memory_bytes(classes, args.dim, 1, module.k, args.batch, 1.0)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    embeddings = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    generator = torch.Generator(device="cpu").manual_seed(1)
    labels = torch.randint(0, classes, (args.batch,), generator=generator).to(device)

    def step(i: int) -> None:
        if kind == "partial_fc":
            loss = module(embeddings, labels, step=i)["loss"]
        else:
            loss = F.cross_entropy(module(embeddings, labels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = _timed_steps(step, args.steps, args.warmup, device)
    result = {
        "kind": kind, "classes": classes, "ranks": args.world_size if kind == "partial_fc" else 1,
        "step_s": seconds, "images_per_s": args.batch / seconds,
        "centres_gb": memory["centres"] / GB, "adamw_gb": memory["optimizer"] / GB,
        "centres_grad_adamw_gb": memory["total"] / GB, "logits_gb": memory["logits"] / GB,
    }
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
    return result


def memory_table(batch: int, rate: float) -> list[dict]:
    """Per-rank GB of 512-d fp32 centres, gradient and AdamW (and one step's logits) for the README."""
    rows = []
    for classes in TABLE_CLASSES:
        for ranks in TABLE_RANKS:
            memory = memory_bytes(classes, TABLE_DIM, ranks, 1, batch, rate)
            rows.append({"classes": classes, "ranks": ranks, "centres_grad_adamw_gb": memory["total"] / GB,
                         "logits_gb": memory["logits"] / GB})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="global batch (rows every rank sees)")
    parser.add_argument("--world-size", type=int, default=8, help="ranks simulated by the shard size")
    parser.add_argument("--rate", type=float, default=0.1, help="Partial FC sample rate")
    parser.add_argument("--head", default="arcface")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-full-classes", type=int, default=2_000_000,
                        help="skip the replicated head above this many classes (its memory)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--output", default="bench_partial_fc.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}), {torch.get_num_threads()} threads; head {args.head}, dim {args.dim}, "
          f"global batch {args.batch}, Partial FC rate {args.rate} on {args.world_size} simulated ranks")
    results = []
    for classes in args.classes:
        kinds = ["partial_fc"] + (["full"] if classes <= args.max_full_classes else [])
        for kind in kinds:
            r = bench_one(kind, classes, args, device)
            results.append(r)
            peak = f", peak {r['peak_gb']:.2f} GB" if "peak_gb" in r else ""
            print(f"{kind:>10} C={classes:>9,} ranks={r['ranks']:>3}: {r['step_s'] * 1e3:8.1f} ms/step "
                  f"({r['images_per_s']:8.0f} img/s) | per rank: centres+grad+AdamW {r['centres_grad_adamw_gb']:.3f} GB, "
                  f"logits {r['logits_gb']:.3f} GB{peak}")
    table = memory_table(args.batch, args.rate)
    print(f"\nper-rank memory, {TABLE_DIM}-d fp32 centres + gradient + AdamW (logits: global batch {args.batch}, rate {args.rate})")
    print("| classes | ranks | centres + gradient + AdamW (GB) | logits (GB) |")
    print("|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['classes']:,} | {row['ranks']} | {row['centres_grad_adamw_gb']:.3f} | {row['logits_gb']:.4f} |")
    write_json(args.output, {"device": str(device), "device_name": name, "args": vars(args), "results": results,
                             "memory_table": table})
    print(f"wrote {args.output}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
