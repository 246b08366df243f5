"""AdamW parameter groups (layer-wise lr decay for UniFEx's trained backbone blocks) and per-iteration
schedules (precomputed, as dinov2)."""

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


def separate_sharded(groups: list[dict], sharded: list[torch.Tensor]) -> list[dict]:
    """``groups`` with the ``sharded`` parameters (Partial FC centres, one rank's rows each) moved to groups of
    their own (same settings, ``sharded: True``), after the others: their state is per rank."""
    ids = {id(p) for p in sharded}
    if not ids:
        return groups
    plain, split = [], []
    for group in groups:
        keep = [p for p in group["params"] if id(p) not in ids]
        moved = [p for p in group["params"] if id(p) in ids]
        if keep:
            plain.append({**group, "params": keep})
        if moved:
            split.append({**group, "params": moved, "sharded": True})
    return plain + split


def layer_decay_groups(backbone: nn.Module, weight_decay: float, tag: str, layer_decay: float = 1.0) -> list[dict]:
    """The trainable parameters of a :class:`unic.models.unifex.PretrainedBackbone` in groups of one
    ``lr_scale`` each (``layer_decay ** (last layer - layer)``, timm's numbering) and decay / no decay."""
    scales = backbone.lr_scales(layer_decay)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in backbone.model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        key = (scales[name], decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "apply_wd": decay,
                           "tag": tag, "lr_scale": scales[name]}
        groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], not k[1]))]


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then cosine from ``base`` to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    steps = np.arange(total_steps - warmup_steps)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(len(steps), 1)))
    return np.concatenate([warm, cos])


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, tuple[float, float]]) -> None:
    """Set each group's (lr, weight decay) from ``values[tag]``, the lr times the group's ``lr_scale`` (layer-wise
    decay; 1 when absent); no-decay groups keep wd 0."""
    for group in optimizer.param_groups:
        lr, weight_decay = values[group["tag"]]
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group["apply_wd"]:
            group["weight_decay"] = weight_decay


def clip_gradients(params: list[torch.Tensor], max_norm: float, mode: str = "global",
                   sharded: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Clip the gradients of ``params`` in place and return their total norm before clipping (no host sync).

    ``global``: one norm over all gradients, scaled together (``clip_grad_norm_``). ``per_param``: each
    parameter's gradient scaled to at most ``max_norm`` on its own, by ``max_norm / (norm + 1e-6)`` as UNIC's
    ``utils.clip_gradients``. ``max_norm <= 0`` only measures. ``sharded`` parameters (Partial FC centres)
    hold one rank's rows of a larger tensor: their norms are those of the whole tensor (squares summed over
    ranks, one all-reduce), so every rank scales its replicated gradients alike.
    """
    if mode not in ("global", "per_param"):
        raise ValueError(f"clip mode must be 'global' or 'per_param', got {mode!r}")
    if sharded:
        return _clip_with_shards(params, max_norm, mode, sharded)
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm <= 0:
        return torch.nn.utils.get_total_norm(grads)
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp_(max=1.0).unbind())
    return torch.linalg.vector_norm(norms)


def _clip_with_shards(params: list[torch.Tensor], max_norm: float, mode: str,
                      sharded: list[torch.Tensor]) -> torch.Tensor:
    """:func:`clip_gradients` where some parameters are per-rank shards (their squares summed over ranks)."""
    from unic import distributed

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    ids = {id(p) for p in sharded}
    split = [id(p) in ids for p in params if p.grad is not None]
    squares = [g.detach().float().square().sum() for g in grads]
    shards = [i for i, is_shard in enumerate(split) if is_shard]
    if shards:  # one all-reduce: the shards' squares summed over ranks, the replicated ones kept
        summed = distributed.all_reduce_sum(torch.stack([squares[i] for i in shards])).unbind()
        for i, value in zip(shards, summed):
            squares[i] = value
    squares = torch.stack(squares)
    norms = squares.sqrt()
    total = torch.linalg.vector_norm(norms)
    if max_norm <= 0:
        return total
    if mode == "global":
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    else:
        torch._foreach_mul_(grads, (max_norm / (norms + 1e-6)).clamp_(max=1.0).unbind())
    return total


def fused_available(device: torch.device) -> bool:
    """Whether torch has fused Adam(W) kernels for ``device`` (CUDA, CPU, ...): one launch updates every
    parameter, and a step flagged non-finite is skipped inside the kernel, on the device."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
    """Apply the step unless ``skip`` (a bool tensor on the device: the step's loss or gradients are not finite
    on some rank), without a host synchronisation when the optimizer is fused: its kernels read the flag
    (``found_inf``, the protocol GradScaler uses) and leave weights, moments and step counts untouched. An
    unfused optimizer cannot skip on the device: the flag is read on the host (one synchronisation).

    Under fp16 the GradScaler decides from the gradients it unscaled (a non-finite loss has made them
    non-finite, see :func:`poison_gradients`) and updates its scale."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif is_fused(optimizer):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not skip.item():  # host synchronisation: only fused kernels skip on the device
        optimizer.step()


def poison_gradients(params: list[torch.Tensor], bad: torch.Tensor) -> None:
    """Make every gradient non-finite where ``bad`` (a bool tensor on the device, the same on every rank),
    unchanged otherwise, without reading ``bad`` on the host: under fp16 GradScaler decides from the gradients
    alone, so a non-finite loss reaches it this way."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_add_(grads, torch.where(bad, float("nan"), 0.0).to(grads[0].dtype))
