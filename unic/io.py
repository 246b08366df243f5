"""Files written and read the safe way, in one place: atomic writes (JSON, checkpoints, any bytes) and
weights-only checkpoint loading. Every result file, checkpoint and export of the package goes through here."""

from __future__ import annotations

import json
import os
import re
import pickle
from collections.abc import Callable
from typing import IO, Any

import torch


class CheckpointFormatError(ValueError):
    """A file that is not a checkpoint of the expected kind."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, ...); the previous one is intact."""


def atomic_write(path: str, write: Callable[[IO[bytes]], None], durable: bool = False) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, then rename it to ``path``: readers see the
    old file or the new one, never half of one. A failed write leaves ``path`` untouched and the temporary
    file removed. ``durable``: fsync the file and the folder before and after the rename (checkpoints)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, indent: int = 1, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as JSON atomically; a value JSON cannot hold is an error unless ``default`` maps it."""
    text = json.dumps(obj, indent=indent, default=default).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(obj: Any, path: str, wrap: Callable[[IO[bytes]], IO[bytes]] | None = None) -> None:
    """``torch.save`` atomically and durably; a failed write (full disk, killed process) raises
    :class:`CheckpointWriteError` and leaves the previous file intact. ``wrap`` only serves fault injection."""
    try:
        atomic_write(path, lambda f: torch.save(obj, wrap(f) if wrap else f), durable=True)
    except (OSError, RuntimeError) as err:  # torch.save re-raises write errors as RuntimeError
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        reason = (cause.strerror or str(cause)) if cause is not None else str(err).splitlines()[0]
        raise CheckpointWriteError(f"could not write {path} ({reason}); the previous checkpoint is intact") from None


def load_weights_file(path: str) -> Any:
    """Read a ``.safetensors`` file or a weights-only torch file (memory-mapped); never unpickles code."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        # mmap: a multi-GB teacher is paged in as it is copied to the model, not held twice in RAM per rank
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFormatError(
            f"{path} is not a weights-only checkpoint (it holds pickled Python objects, which are refused "
            f"because loading them can run code): {str(err).splitlines()[0]}"
        ) from None
    except RuntimeError as err:  # zip/TorchScript archives, truncated files
        raise CheckpointFormatError(f"{path} is not a readable torch checkpoint: {str(err).splitlines()[0]}") from None


def load_checkpoint(path: str) -> dict:
    """A UNIC training checkpoint or export (a dict), loaded weights-only; clear errors otherwise."""
    ckpt = load_weights_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path} is not a UNIC checkpoint (top level is {type(ckpt).__name__})")
    return ckpt


def safe_filename(text: str) -> str:
    """``text`` (a model source, a data set, a domain) as one file or folder name: runs of anything but
    letters, digits, ``.``, ``_`` and ``-`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
