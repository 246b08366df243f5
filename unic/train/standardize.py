"""Teacher-feature standardisation (UNIC): per teacher, token type and channel running mean/std."""

from __future__ import annotations

import math

import torch
from torch import nn

from unic import distributed
from unic.models.ladder import TOKEN_TYPES


def std_momentum(step: int, total_steps: int, start: float = 1.0, end: float = 0.001) -> float:
    """Per-iteration cosine from ``start`` (step 0) to ``end`` (last step)."""
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


class TeacherStandardizer(nn.Module):
    """Normalises teacher features with running statistics synchronised across ranks.

    Each training step: the batch statistics are reduced over all ranks; the features are normalised with
    the running values from before this step (at step 0, when nothing is tracked yet, the running values are
    initialised with the first batch's statistics), then ``running = (1 - m) * running + m * batch``.
    In eval mode (m = 0) only the running values are used. The std is the unbiased one over the global batch
    (and tokens, for patches); features are divided by ``std + eps``.
    """

    def __init__(self, teacher_dims: dict[str, int], eps: float = 1e-6):
        super().__init__()
        self.names = sorted(teacher_dims)
        self.eps = eps
        for name in self.names:
            for ttype in TOKEN_TYPES:
                self.register_buffer(self._key(name, ttype, "mean"), torch.zeros(teacher_dims[name]))
                self.register_buffer(self._key(name, ttype, "std"), torch.ones(teacher_dims[name]))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _key(name: str, ttype: str, stat: str) -> str:
        return f"{name.replace('.', '_').replace(':', '_')}__{ttype}__{stat}"

    def running(self, name: str, ttype: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._key(name, ttype, "mean")), getattr(self, self._key(name, ttype, "std"))

    @torch.no_grad()
    def batch_statistics(self, feats: dict[str, dict[str, torch.Tensor]]) -> dict[tuple[str, str], tuple]:
        """Global per-channel mean and unbiased std of every (teacher, token type), two all-reduces in all."""
        flat = {(n, t): feats[n][t].float().reshape(-1, feats[n][t].shape[-1]) for n in self.names for t in TOKEN_TYPES}
        device = next(iter(flat.values())).device
        # filled on the device (a tensor copied from the host would synchronise)
        counts = torch.cat([torch.full((1,), float(x.shape[0]), device=device) for x in flat.values()])
        sums = torch.cat([x.sum(0) for x in flat.values()])
        distributed.all_reduce_sum(packed := torch.cat([counts, sums]))
        counts, sums = packed[: len(flat)], packed[len(flat):]
        means, offset = {}, 0
        for i, (key, x) in enumerate(flat.items()):
            means[key] = sums[offset:offset + x.shape[1]] / counts[i]
            offset += x.shape[1]
        sq = distributed.all_reduce_sum(torch.cat([((x - means[k]) ** 2).sum(0) for k, x in flat.items()]))
        stats, offset = {}, 0
        for i, (key, x) in enumerate(flat.items()):
            var = sq[offset:offset + x.shape[1]] / (counts[i] - 1).clamp_min(1)
            stats[key] = (means[key], var.sqrt())
            offset += x.shape[1]
        return stats

    @torch.no_grad()
    def forward(self, feats: dict[str, dict[str, torch.Tensor]], momentum: float = 0.0) -> dict[str, dict[str, torch.Tensor]]:
        update = self.training and momentum > 0
        stats = self.batch_statistics(feats) if update else None
        if update:  # first update: start from the batch statistics (torch.where: no host sync)
            for (name, ttype), (mean, std) in stats.items():
                run_mean, run_std = self.running(name, ttype)
                run_mean.copy_(torch.where(self.initialized, run_mean, mean))
                run_std.copy_(torch.where(self.initialized, run_std, std))
            self.initialized.fill_(True)
        out = {}
        for name in self.names:
            out[name] = {}
            for ttype in TOKEN_TYPES:
                run_mean, run_std = self.running(name, ttype)
                out[name][ttype] = (feats[name][ttype].float() - run_mean) / (run_std + self.eps)
                if update:
                    mean, std = stats[(name, ttype)]
                    run_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                    run_std.mul_(1 - momentum).add_(std, alpha=momentum)
        return out
