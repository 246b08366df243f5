"""Fault injection for the chaos suite (``scripts/chaos.py``); inert unless ``UNIC_FAULTS`` is set.

The production step holds no fault code: :func:`install` (called by ``main_unic.py`` on the trainer it built)
wraps the trainer's batch source (process faults, checked when a step fetches its batch), its task (a NaN
loss) and its checkpoint writer (a crash or a full disk half-way through a write), and does nothing when no
fault is planned.

``UNIC_FAULTS="kill:rank=1:step=7:attempt=0;nan:rank=0:step=3"`` — each fault fires once, on that rank,
when the training step counter reaches ``step``, in the torchrun attempt ``attempt`` (the restart count,
default 0). With ``UNIC_FAULTS_DIR`` set, a fault instead fires the first time its step is reached in any
attempt (a marker file records it), so restarts that fail for other reasons do not skip planned faults. Kinds: ``kill`` (SIGKILL), ``term`` (SIGTERM), ``hang`` (sleep forever), ``nan`` (the step's
loss becomes NaN), ``save_crash`` (killed half-way through writing a checkpoint) and ``save_enospc`` (the
checkpoint write fails with "no space left on device").
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

KINDS = ("kill", "term", "hang", "nan", "save_crash", "save_enospc")


@dataclass
class Fault:
    kind: str
    rank: int
    step: int
    attempt: int = 0


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"UNIC_FAULTS: unknown fault kind {kind!r} (known: {', '.join(KINDS)})")
        values = dict(f.split("=", 1) for f in fields)
        faults.append(Fault(kind, int(values.get("rank", 0)), int(values["step"]), int(values.get("attempt", 0))))
    return faults


_FAULTS = parse(os.environ.get("UNIC_FAULTS", ""))


def _due(kind: str, step: int) -> bool:
    if not _FAULTS:
        return False
    from unic import distributed

    rank = distributed.get_rank()
    markers = os.environ.get("UNIC_FAULTS_DIR")
    if markers:
        for f in _FAULTS:
            marker = os.path.join(markers, f"{f.kind}-rank{f.rank}-step{f.step}")
            if f.kind == kind and f.rank == rank and f.step == step and not os.path.exists(marker):
                open(marker, "w").close()
                return True
        return False
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    return any(f.kind == kind and f.rank == rank and f.step == step and f.attempt == attempt for f in _FAULTS)


def at_step(step: int) -> None:
    """Process-level faults, checked at the start of each step (before its batch is fetched)."""
    if _due("kill", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due("term", step):
        os.kill(os.getpid(), signal.SIGTERM)
    if _due("hang", step):
        while True:
            time.sleep(3600)


def poison_loss(step: int | None) -> bool:
    return step is not None and _due("nan", step)


class _FaultyFile:
    """Wraps a file being written: dies (or reports a full disk) after half of ``limit`` bytes."""

    def __init__(self, f, kind: str, limit: int = 4096):
        self.f, self.kind, self.limit, self.written = f, kind, limit, 0

    def write(self, data) -> int:
        if self.written + len(data) > self.limit // 2:
            if self.kind == "save_crash":
                self.f.write(bytes(data[: max(self.limit // 2 - self.written, 0)]))
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def wrap_checkpoint_file(f, step: int):
    for kind in ("save_crash", "save_enospc"):
        if _due(kind, step):
            return _FaultyFile(f, kind)
    return f


def faulty_save(obj, path: str, step: int) -> None:
    """:func:`unic.io.save_checkpoint` with the write faults planned at ``step``."""
    from unic.io import save_checkpoint

    save_checkpoint(obj, path, lambda f: wrap_checkpoint_file(f, step))


class _FaultyBatches:
    """The trainer's batch source, with the process faults of the step about to start."""

    def __init__(self, batches, trainer):
        self._batches, self._trainer = batches, trainer

    def next(self):
        at_step(self._trainer.step)
        return self._batches.next()

    def __getattr__(self, name):
        return getattr(self._batches, name)


class _FaultyTask:
    """The trainer's task, whose training loss becomes NaN at the planned steps."""

    def __init__(self, task):
        self._task = task

    def __call__(self, images, step=None, *args, **kwargs):
        out = self._task(images, step, *args, **kwargs)
        if poison_loss(step):
            out["loss"] = out["loss"] * float("nan")
        return out

    def __getattr__(self, name):
        return getattr(self._task, name)


def install(trainer) -> None:
    """Put the planned faults around ``trainer`` (a :class:`unic.train.loop.Trainer`); a no-op without any."""
    if not _FAULTS:
        return
    trainer.batches = _FaultyBatches(trainer.batches, trainer)
    trainer.task = _FaultyTask(trainer.task)
    trainer.write_checkpoint = lambda obj, path: faulty_save(obj, path, trainer.step)
