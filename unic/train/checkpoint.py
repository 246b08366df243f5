"""Atomic, weights-only checkpoints and the exported student."""

from __future__ import annotations

import glob
import logging
import os
import random
import re

import numpy as np
import torch

from unic.io import save_checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


def atomic_save(obj, path: str, step: int | None = None) -> None:
    """:func:`unic.io.save_checkpoint`; ``step`` only serves the chaos suite's fault injection."""
    from unic.train import faults

    save_checkpoint(obj, path, (lambda f: faults.wrap_checkpoint_file(f, step)) if step is not None else None)


def remove_partial_files(folder: str) -> list[str]:
    """Delete temporary files left by writes that were killed half-way (never loaded, only litter)."""
    removed = []
    for tmp in glob.glob(os.path.join(folder, ".*.tmp*")):
        os.remove(tmp)
        removed.append(tmp)
    return removed


def rng_state() -> dict:
    """Every RNG the training step touches, in weights-only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((state["python_version"], tuple(py[:-1]), None if py[-1] == -1 else py[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def periodic_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint_step{step:08d}.pth")


def prune_periodic(output_dir: str, keep: int) -> None:
    """Remove all but the newest ``keep`` periodic checkpoints (called only after a save completed)."""
    files = sorted(glob.glob(os.path.join(output_dir, "checkpoint_step*.pth")),
                   key=lambda p: int(re.findall(r"step(\d+)", p)[-1]))
    for old in files[: max(len(files) - keep, 0)]:
        os.remove(old)
