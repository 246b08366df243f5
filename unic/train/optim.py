"""AdamW parameter groups and per-iteration schedules (precomputed, as dinov2)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, tag: str = "default") -> list[dict]:
    """Two groups: decayed weights, and biases / norms / 1-D parameters without weight decay.

    ``tag`` names the schedule the groups follow (see :func:`apply_schedules`).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True, "tag": tag},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False, "tag": tag},
    ]
    return [g for g in groups if g["params"]]


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then cosine from ``base`` to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, tuple[float, float]]) -> None:
    """Set each group's (lr, weight decay) from ``values[tag]``; no-decay groups keep wd 0."""
    for group in optimizer.param_groups:
        lr, weight_decay = values[group["tag"]]
        group["lr"] = lr
        if group["apply_wd"]:
            group["weight_decay"] = weight_decay


def clip_gradients(params: list[torch.Tensor], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip the gradients of ``params`` in place and return their total norm before clipping (no host sync).

    ``global``: one norm over all gradients, scaled together (``clip_grad_norm_``). ``per_param``: each
    parameter's gradient scaled to at most ``max_norm`` on its own, by ``max_norm / (norm + 1e-6)`` as UNIC's
    ``utils.clip_gradients``. ``max_norm <= 0`` only measures.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0:
        return torch.nn.utils.get_total_norm(grads)
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if mode != "per_param":
        raise ValueError(f"clip mode must be 'global' or 'per_param', got {mode!r}")
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp_(max=1.0).unbind())
    return torch.linalg.vector_norm(norms)
