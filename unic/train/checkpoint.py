"""Training-checkpoint helpers: file names, periodic copies, leftovers of killed writes, RNG states.

The files are written by :func:`unic.io.save_checkpoint` (atomic, durable) and read by
:func:`unic.io.load_checkpoint` (weights-only); their formats are :mod:`unic.models.export`'s.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import re

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"


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


def seed_everything(seed: int) -> None:
    """Seed every RNG the training step touches (Python, NumPy, torch)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng_state(states: list[dict], rank: int, world: int, seed: int, step: int) -> bool:
    """Give this rank the RNG state it saved (True), or, resumed on another number of processes, a fresh
    stream of its own derived from (``seed``, ``rank``, ``step``) (False). Only stochastic depth draws from
    these streams: data order, augmentations and teacher dropping have seeded generators of their own, so a
    run resumed elastically continues as it would have, up to stochastic depth (``student.drop_path`` > 0)
    and UDON's relational term, whose pairs are those of each process's local batch."""
    if len(states) == world:
        set_rng_state(states[rank])
        return True
    stream = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0])
    seed_everything(stream)
    return False


def periodic_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint_step{step:08d}.pth")


def prune_periodic(output_dir: str, keep: int) -> None:
    """Remove all but the newest ``keep`` periodic checkpoints (called only after a save completed)."""
    files = sorted(glob.glob(os.path.join(output_dir, "checkpoint_step*.pth")),
                   key=lambda p: int(re.findall(r"step(\d+)", p)[-1]))
    for old in files[: max(len(files) - keep, 0)]:
        os.remove(old)
