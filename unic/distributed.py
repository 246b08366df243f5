"""Distributed helpers that also work before (or without) ``init_process_group``.

They read torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), pick nccl on CUDA and gloo on
CPU, and degrade to rank 0 / world 1 when no process group exists, so the same code runs under
``python`` and ``torchrun``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> str:
    """A precision setting on ``device``: auto = bf16 on CUDA, fp32 (no autocast) on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}: auto, bf16, fp16 or fp32")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: no autocast)."""
    return AUTOCAST_DTYPES[resolve_precision(precision, device)]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda`` as this rank's device; CUDA requested on a machine
    without it is a :class:`unic.config.ConfigError` (a user error, like any bad setting)."""
    from unic.config import COMMON_CHOICES, ConfigError

    if device not in COMMON_CHOICES["run.device"]:
        raise ConfigError(f"invalid value for 'run.device': {device!r}; choose one of auto, cpu, cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda was requested but CUDA is not available on this machine")
    return torch.device("cuda", get_local_rank()) if use_cuda else torch.device("cpu")


def ignore_interrupts(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """A DataLoader's ``worker_init_fn``: data workers leave Ctrl-C to the main process, which finishes the
    step and saves (a worker that took the terminal's SIGINT itself would quit and fail the step)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_count(requested: int) -> int:
    """Data-loading workers per process: ``requested``, at most the CPUs this process may use shared by
    the processes of this machine (so small machines are not oversubscribed and PyTorch does not warn)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(requested, cpus // max(local, 1) if cpus >= local else 1))


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Initialise the process group when launched by torchrun and return this rank's device.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda".
    """
    torch_device = resolve_device(device)
    use_cuda = torch_device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if launched_by_torchrun() and not is_enabled():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(store_prefix(), store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=torch_device if use_cuda else None,
        )
        global _HOST_GROUP
        # host-side flags (stop signals) travel over gloo: an NCCL collective would need the host to wait
        # for the device to read its result
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        logger.info("initialised %s process group: rank %d / %d", backend, get_rank(), get_world_size())
    return torch_device


_HOST_GROUP = None  # the gloo group of host_max when the default group's backend is not gloo (None: the default)


def _host_group():
    """The group host-side exchanges use: the default one when it is gloo, else a gloo group (made here on
    first use when the process group was not set up by :func:`init_distributed`; every rank gets here)."""
    global _HOST_GROUP
    if _HOST_GROUP is None and dist.get_backend() != "gloo":
        _HOST_GROUP = dist.new_group(backend="gloo")
    return _HOST_GROUP


def store_prefix() -> str:
    """The key prefix of this attempt's process group in the rendezvous store.

    When torchrun's agent shares its store with the workers (``TORCHELASTIC_USE_AGENT_STORE=True``: static
    rendezvous, ``--standalone``, c10d by default) that store outlives an attempt: without a per-attempt prefix
    a restarted group reads its peers' addresses from the previous attempt ("connectFullMesh ... Connection
    refused"); its one agent gives every worker the same restart count. Without sharing (c10d with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, how multi-node jobs run) rank 0 hosts a fresh store each
    attempt and the agents' restart counts differ (a relaunched node counts from 0 while a surviving one
    has restarted), so the prefix must not depend on them."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "True") == "False":
        return "unic/"
    return f"unic/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def destroy_distributed() -> None:
    global _HOST_GROUP
    if is_enabled():
        dist.destroy_process_group()
    _HOST_GROUP = None


def exit_process(code: int) -> NoReturn:
    """End an entry point with ``code``. Under torchrun the interpreter's finalisation is skipped
    (``os._exit`` after flushing logs and streams): a gloo worker thread may still be releasing the work
    of the last collective, which takes the GIL, and doing so while the interpreter shuts down aborts the
    process ("terminate called without an active exception", SIGABRT), which torchrun counts as a failure
    and answers with a restart. Call it after the process group is destroyed and files are closed."""
    if not launched_by_torchrun():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to lose
            pass
    os._exit(code)


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on a single process); returns the tensor."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks; returns the tensor."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def host_max(value: int) -> int:
    """The largest ``value`` over ranks, exchanged between the hosts (gloo, CPU memory): no rank waits for
    its device, so a training step can agree on host-side flags without a host-device synchronisation."""
    if not is_enabled():
        return value
    buffer = np.array([value], dtype=np.int64)  # read back through numpy: host memory, no tensor op
    dist.all_reduce(torch.from_numpy(buffer), op=dist.ReduceOp.MAX, group=_host_group())
    return int(buffer[0])


def host_all_gather(value: int) -> list[int]:
    """Every rank's ``value``, in rank order, exchanged between the hosts like :func:`host_max`."""
    if not is_enabled():
        return [value]
    out = np.zeros(get_world_size(), dtype=np.int64)
    parts = [torch.from_numpy(out[i:i + 1]) for i in range(len(out))]  # views: gloo writes into ``out``
    dist.all_gather(parts, torch.from_numpy(np.array([value], dtype=np.int64)), group=_host_group())
    return [int(v) for v in out]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns the tensor."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks; sizes may differ between ranks."""
    if not is_enabled():
        return tensor
    world = get_world_size()
    local_n = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local_n) for _ in range(world)]
    dist.all_gather(sizes, local_n)
    sizes_list = [int(s.item()) for s in sizes]
    max_n = max(sizes_list)
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes_list)], dim=0)


def heartbeat(step: int) -> None:
    """Record this rank's progress in the rendezvous store (read back to name a stalled rank)."""
    if is_enabled():
        dist.distributed_c10d._get_default_store().set(f"unic/heartbeat/{get_rank()}", str(step))


def describe_progress() -> str:
    """Each rank's last recorded step, e.g. "rank 0 at step 12, rank 1 at step 9 (behind)"."""
    if not is_enabled():
        return ""
    store = dist.distributed_c10d._get_default_store()
    steps = {}
    for rank in range(get_world_size()):
        key = f"unic/heartbeat/{rank}"
        try:
            steps[rank] = int(store.get(key)) if store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store may be gone with a dead rank 0
            steps[rank] = None
    known = [s for s in steps.values() if s is not None]
    lead = max(known) if known else None
    parts = []
    for rank, step in steps.items():
        if step is None:
            parts.append(f"rank {rank} never reported a step (stalled)")
        else:
            parts.append(f"rank {rank} at step {step}" + (" (stalled, behind)" if lead is not None and step < lead else ""))
    return ", ".join(parts)


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on a single process)."""
    if not is_enabled():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object from ``src`` to every rank (control data only, never tensors)."""
    if not is_enabled():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def average_gradients(params) -> None:
    """Average the gradients of parameters outside DDP over ranks, in one flat all-reduce (parameters
    without a gradient are skipped; a no-op without a process group)."""
    if not is_enabled():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
