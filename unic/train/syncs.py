"""Counting the places where the host waits for a tensor's value (host-device synchronisations).

On CUDA every such read stalls the host until the device has run everything queued before it, which starves
the GPU of work. ``torch.cuda.set_sync_debug_mode("error")`` finds them on a GPU; :class:`SyncCounter` finds
the same reads on any device, the CPU included, so a test can hold the training step to zero of them:

- scalar reads: ``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor (``aten._local_scalar_dense``);
- copies of device memory to the host (``.cpu()``, ``.to("cpu")``, ``.tolist()`` of a CUDA tensor);
- ops whose output shape depends on the values (``nonzero``, ``masked_select``, ``unique``, boolean indexing,
  ...): the host must learn the size;
- ``Tensor.tolist()`` and ``Tensor.numpy()`` of any tensor (on the CPU they read memory directly, below the
  dispatcher);
- ``torch.tensor`` / ``torch.as_tensor`` of Python data with a ``device``: on CUDA the copy from pageable host
  memory synchronises (``torch.full`` fills on the device instead).

On the CPU every tensor counts, host data included: code that must not synchronise keeps host-side values in
Python numbers or numpy, as the training step does (the loader's counts of skipped images are Python ints).
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_VALUE_READS = {"_local_scalar_dense"}
_DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
                   "unique_consecutive", "unique_dim_consecutive", "bincount", "repeat_interleave",
                   "argwhere", "histc", "_assert_async"}
_COPIES = {"_to_copy", "copy_", "to", "_copy_from", "_copy_from_and_resize"}


def _is_host_read(func, args, kwargs) -> bool:
    """A device-to-host copy: a non-CPU source into CPU memory."""
    name = func._schema.name.split("::")[-1]
    if name not in _COPIES:
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("copy_", "_copy_from", "_copy_from_and_resize"):  # (dst, src) or (src, dst)
        if len(tensors) < 2:
            return False
        dst, src = (tensors[0], tensors[1]) if name == "copy_" else (tensors[1], tensors[0])
        return src.device.type != "cpu" and dst.device.type == "cpu"
    if not tensors or tensors[0].device.type == "cpu":
        return False
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu"


class _HostReads(TorchFunctionMode):
    """What the dispatcher does not show: ``Tensor.tolist()`` / ``Tensor.numpy()`` (on the CPU they read the
    memory directly) and ``torch.tensor(data, device=...)`` / ``torch.as_tensor`` of host data (a copy from
    the host)."""

    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy") and args and isinstance(args[0], torch.Tensor):
            self.counter._record(f"Tensor.{name}()")
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None and args \
                and not isinstance(args[0], torch.Tensor):
            self.counter._record(f"host-to-device copy of Python data (torch.{name})")
        return func(*args, **kwargs)


class SyncCounter(TorchDispatchMode):
    """A context manager that counts host-device synchronisations (see the module docstring), each with the
    line of the caller that made it (``events``: (kind, where) pairs, ``by_phase``: counts per ``phase``).

    Use ``counter.phase = <label>`` to attribute the next events (e.g. the training step number)."""

    def __init__(self, stack_filter: str = "unic"):
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.by_phase: dict = collections.Counter()
        self.phase = None
        self._stack_filter = stack_filter

    @property
    def count(self) -> int:
        return len(self.events)

    def _record(self, kind: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if self._stack_filter in f.filename
                  and not f.filename.endswith("syncs.py")]
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else "?"
        self.events.append((kind, where))
        self.by_phase[self.phase] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _VALUE_READS:
            self._record(f"scalar read ({name})")
        elif name in _DATA_DEPENDENT or (name == "index" and _bool_index(args)):
            self._record(f"data-dependent shape ({name})")
        elif _is_host_read(func, args, kwargs):
            self._record(f"device-to-host copy ({name})")
        return func(*args, **kwargs)

    def __enter__(self):
        self._function_mode = _HostReads(self)
        self._function_mode.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._function_mode.__exit__(*exc)
        return result

    def report(self, limit: int = 10) -> str:
        """The most frequent synchronisation sites, one per line."""
        sites = collections.Counter(self.events)
        return "\n".join(f"{n} x {kind} at {where}" for (kind, where), n in sites.most_common(limit))


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def count_syncs(fn, device: torch.device) -> tuple[int, list[str]]:
    """Run ``fn()`` and count its host-device synchronisations, with the most frequent sites. On CUDA this
    is torch's own check (``set_sync_debug_mode("warn")``: one warning per synchronising CUDA call, which
    also holds inside compiled code); elsewhere :class:`SyncCounter`."""
    if device.type != "cuda":
        with SyncCounter() as counter:
            fn()
        return counter.count, counter.report(3).splitlines()
    import warnings

    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{w.filename}:{w.lineno}" for w in syncs)
    return len(syncs), [f"{n} x {where}" for where, n in sites.most_common(3)]
