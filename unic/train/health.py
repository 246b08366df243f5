"""Skipped (non-finite) training steps, counted on the device and read where the host acts anyway."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SkipWindow:
    """What :meth:`SkippedSteps.read` found since the previous read."""

    skipped: int  # steps skipped since the previous read
    run: int  # consecutive skipped steps that end with the last step (0: the last step was applied)
    longest: int  # the longest run of consecutive skipped steps seen since the previous read
    first: int  # the first skipped step since the previous read (-1: none)
    last: int  # the last skipped step so far (-1: none)


class SkippedSteps:
    """Per-step bookkeeping of skipped steps with device ops only (:meth:`update`: no host synchronisation);
    :meth:`read` brings the counts to the host (one small copy) and starts a new window.

    Steps are numbered as the trainer's ``step`` before the step runs (0-based), from ``start``."""

    _FIELDS = ("skipped", "run", "longest", "first", "last", "step")

    def __init__(self, device: torch.device, start: int):
        self.device = device
        # longest counts the runs that go on in the window (a carried run that continues is counted whole)
        self._state = torch.tensor([0, 0, 0, -1, -1, start], dtype=torch.int64, device=device)

    def update(self, bad: torch.Tensor) -> None:
        """Record one step; ``bad`` is a bool scalar on the device (the same on every rank)."""
        skipped, run, longest, first, last, step = self._state.unbind()
        flag = bad.to(torch.int64)
        run = (run + 1) * flag
        self._state = torch.stack([
            skipped + flag, run, torch.maximum(longest, run),
            torch.where(bad & (first < 0), step, first), torch.where(bad, step, last), step + 1,
        ])

    def read(self) -> SkipWindow:
        """The window since the previous read (a host synchronisation); the next window starts here, with
        the current run of skipped steps carried over (a run that spans two windows counts as one)."""
        values = dict(zip(self._FIELDS, self._state.tolist()))
        step = values.pop("step")
        window = SkipWindow(**values)
        self._state = torch.tensor([0, window.run, 0, -1, window.last, step], dtype=torch.int64,
                                   device=self.device)
        return window
