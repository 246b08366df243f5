"""Rank-0 logging: console/file log lines, TensorBoard scalars and a JSONL metrics file."""

from __future__ import annotations

import json
import logging
import math
import os
import sys

from unic import distributed


def setup_logging(output_dir: str | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs INFO to stdout (and ``output_dir/log.txt``); other ranks only warnings."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    rank = distributed.get_rank()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    root.setLevel(level if rank == 0 else logging.WARNING)
    # faiss reports at INFO each CPU-specific build it could not import ("Could not load library with AVX512
    # support ... ModuleNotFoundError"), which reads like an error; its warnings still come through
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if output_dir and rank == 0:
        file_handler = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)


class MetricsWriter:
    """Writes scalars to TensorBoard and ``metrics.jsonl`` on rank 0; a no-op elsewhere."""

    def __init__(self, output_dir: str, enabled: bool | None = None):
        self.enabled = distributed.is_main_process() if enabled is None else enabled
        self.tb = None
        self.jsonl = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
