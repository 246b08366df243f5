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


# ------------------------------------------------------------------------------------------------ FSDP
# An FSDP run (train.parallelism=fsdp) writes the same checkpoint as a DDP one: its model and optimizer state are
# gathered into full (unsharded) tensors with torch.distributed.checkpoint.state_dict, so a checkpoint resumes
# under either engine and on any number of processes.


def _full_options(cpu_offload: bool, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)


def full_model_state(model: torch.nn.Module, everywhere: bool = False) -> dict:
    """The full state dict of a sharded ``model`` (collective): on rank 0 only, on the CPU; with
    ``everywhere``, on every rank and on the model's device (what a per-rank unsharded copy needs)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=not everywhere))


def load_full_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full state dict (every rank holds it) into a sharded ``model``, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_full_options(cpu_offload=False))  # it rewrites the dict


def _param_names(modules: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The qualified name in ``modules`` of every optimizer parameter, in the optimizer's order (the
    integer ids of ``optimizer.state_dict()``)."""
    names = {id(p): name for name, p in modules.named_parameters()}
    missing = [i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters {missing[:5]} are not in the trained modules")
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(modules: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``'s layout (state by integer id, param groups) with every sharded state tensor
    gathered in full (collective; complete on rank 0, CPU tensors). ``modules`` holds every optimizer parameter
    (the sharded model and the replicated heads), whose names key the gathered state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    local = optimizer.state_dict()
    if not optimizer.state:  # nothing to gather (torch would take a zero-lr step to create the state)
        return local
    full = get_optimizer_state_dict(modules, optimizer, options=_full_options(cpu_offload=True))
    by_name = full.get("state", {})
    state = {i: by_name[name] for i, name in enumerate(_param_names(modules, optimizer)) if name in by_name}
    return {"state": state, "param_groups": local["param_groups"]}


def load_full_optimizer_state(modules: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``optimizer.state_dict()``-layout state of full tensors (every rank holds it) into the optimizer of
    sharded parameters. Parameters without saved state (none yet when saved) are left without state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(modules, optimizer)
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or \
            [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise ValueError("the checkpoint's optimizer has other parameter groups than this model's")
    by_index = {int(i): v for i, v in saved["state"].items()}
    state = {names[i]: value for i, value in by_index.items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in groups]
    set_optimizer_state_dict(modules, optimizer, {"state": state, "param_groups": groups},
                             options=_full_options(cpu_offload=False, strict=False))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):  # torch creates a zero state for every parameter: the unsaved ones lose it
        if i not in by_index:
            optimizer.state.pop(p, None)
