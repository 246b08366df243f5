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
    """Writes scalars to TensorBoard and ``metrics.jsonl`` on rank 0; a no-op elsewhere.

    ``purge_from``: the first step this launch will write (a resumed run's checkpoint step + 1, 0 for a run
    that starts over). Everything an earlier launch logged from there on (the steps between its last
    checkpoint and its interruption, which this launch trains again) is dropped from both, so no step
    appears twice. Without the ``tensorboard`` package only ``metrics.jsonl`` is written (``tensorboard``
    is then False).
    """

    def __init__(self, output_dir: str, enabled: bool | None = None, purge_from: int | None = None):
        self.enabled = distributed.is_main_process() if enabled is None else enabled
        self.tb = None
        self.jsonl = None
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tensorboard = tensorboard_available()
        if self.enabled:
            if purge_from is not None:
                purge_jsonl(self.path, purge_from)
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=purge_from)
            self.jsonl = open(self.path, "a")

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            if self.tb is not None:
                self.tb.close()
            self.jsonl.close()
            self.enabled = False


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write (it needs the ``tensorboard`` package)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def purge_jsonl(path: str, purge_from: int) -> int:
    """Keep only the records of ``path`` with step < ``purge_from`` (atomic rewrite); returns how many went."""
    from unic.io import write_text

    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1  # a line cut short by a kill
                continue
            if step < purge_from:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        write_text(path, "".join(kept))
    return dropped
