"""Atomic, weights-only checkpoints and the exported student."""

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, ...); the previous one is intact."""


def atomic_save(obj, path: str, step: int | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half.

    A failed write (full disk, killed process) leaves the previous file untouched; the temporary file is
    removed when the process survives, and is never picked up by a loader when it does not (its name is
    not ``path``). ``step`` only serves the chaos suite's fault injection.
    """
    from unic.train import faults

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, faults.wrap_checkpoint_file(f, step) if step is not None else f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save re-raises write errors as RuntimeError
            cause = err
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            reason = (cause.strerror or str(cause)) if cause is not None else str(err).splitlines()[0]
            raise CheckpointWriteError(f"could not write {path} ({reason}); the previous checkpoint is intact") from None
        raise


def remove_partial_files(folder: str) -> list[str]:
    """Delete temporary files left by writes that were killed half-way (never loaded, only litter)."""
    removed = []
    for tmp in glob.glob(os.path.join(folder, ".*.tmp*")):
        os.remove(tmp)
        removed.append(tmp)
    return removed


def load_checkpoint(path: str) -> dict:
    """Load a training checkpoint or exported file with ``weights_only=True``; clear errors otherwise."""
    from teachers.convert import load_weights_file

    ckpt = load_weights_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a UNIC checkpoint (top level is {type(ckpt).__name__})")
    return ckpt


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
