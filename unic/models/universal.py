"""UDON heads: per-domain teacher heads and classifiers, one universal projection (SPEC section 6).

The universal projection gets a gradient every step and lives in the DDP-wrapped model; the per-domain
modules get one only when their domain is drawn, so they stay outside DDP and their gradients are averaged
across ranks by hand (every rank draws the same domain). Their optimizer state is only touched on steps of
their domain (gradients of other domains stay ``None``, which AdamW skips).

With ``partial_fc`` (a sample rate), every classifier is a :class:`~unic.models.partial_fc.PartialFC`: its
class centres are sharded over ranks (never all-reduced), both classifiers of a domain share one class draw
per step, and the centres are checkpointed through ``unic.models.partial_fc.full_state`` /
``load_full_state`` (their module ``state_dict`` holds only the replicated head state).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from unic import distributed
from unic.models.heads import build_margin_head
from unic.models.partial_fc import PartialFC, memory_bytes, sharded_parameters

logger = logging.getLogger(__name__)


class DomainHeads(nn.Module):
    """For each domain d: teacher head Linear(D, 256) with classifier W^T_d and universal classifier W^U_d.

    Classifiers start as UDON's ``lecun_uniform`` (the margin heads' default, std 1/sqrt of their input
    dimension). The teacher heads keep torch's ``Linear`` init (U(+-1/sqrt(D)) weights and bias) rather than
    UDON's flax ``Dense`` (lecun_normal kernel, zero bias): on the demo the flax init cut the trained
    universal R@1 from about 0.5 to about 0.2 (3 seeds), so it is left as a documented deviation.
    """

    def __init__(self, embed_dim: int, num_classes: dict[str, int], teacher_dim: int = 256,
                 universal_dim: int = 64, head_name: str = "normface", head_kwargs: dict | None = None,
                 class_counts: dict[str, list[int]] | None = None, *, partial_fc: float | None = None,
                 seed: int = 0):
        """``partial_fc``: sample rate of Partial FC classifiers (None: ordinary replicated heads); ``seed``
        seeds their centres and class draws (domain i: teacher ``seed + 2i``, universal ``seed + 2i + 1``;
        the universal classifier uses the teacher's draw)."""
        super().__init__()
        self.domains = list(num_classes)
        self.partial_fc = partial_fc
        self.teacher_heads = nn.ModuleDict()
        self.teacher_classifiers = nn.ModuleDict()
        self.universal_classifiers = nn.ModuleDict()
        for i, (domain, classes) in enumerate(num_classes.items()):
            kw = dict(head_kwargs or {})
            if head_name == "dynm_arcface":
                kw["class_counts"] = class_counts[domain]
            self.teacher_heads[domain] = nn.Linear(embed_dim, teacher_dim)
            if partial_fc is None:
                self.teacher_classifiers[domain] = build_margin_head(head_name, teacher_dim, classes, **kw)
                self.universal_classifiers[domain] = build_margin_head(head_name, universal_dim, classes, **kw)
            else:
                self.teacher_classifiers[domain] = PartialFC(head_name, teacher_dim, classes, partial_fc,
                                                             seed + 2 * i, **kw)
                self.universal_classifiers[domain] = PartialFC(head_name, universal_dim, classes, partial_fc,
                                                               seed + 2 * i + 1, **kw)

    def domain_parameters(self, domain: str) -> list[nn.Parameter]:
        return [p for m in (self.teacher_heads[domain], self.teacher_classifiers[domain],
                            self.universal_classifiers[domain]) for p in m.parameters()]

    def sync_gradients(self, domain: str) -> None:
        """Average the drawn domain's gradients over ranks (one flat all-reduce); Partial FC centres are
        per-rank shards whose gradients are already exact, so they are left alone."""
        if not distributed.is_enabled():
            return
        sharded = {id(p) for p in sharded_parameters(self)}
        distributed.average_gradients([p for p in self.domain_parameters(domain) if id(p) not in sharded])

    def memory_report(self) -> dict[str, float]:
        """MB per domain and per rank of weights, gradients and AdamW state (x4 in fp32), logged at start-up;
        Partial FC counts the largest shard (rank 0's) of the centres."""
        report = {}
        for d in self.domains:
            modules = (self.teacher_heads[d], self.teacher_classifiers[d], self.universal_classifiers[d])
            total = 0.0
            for m in modules:
                if isinstance(m, PartialFC):
                    total += memory_bytes(m.num_classes, m.embed_dim, m.world_size, m.k)["total"]
                else:
                    total += 4 * sum(p.numel() * p.element_size() for p in m.parameters())
            report[d] = total / 2**20
        return report


def udon_embeddings(cls_BD: torch.Tensor, projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(unnormalised projection, L2-normalised embedding) of the L2-normalised backbone feature."""
    raw = projection(F.normalize(cls_BD.float(), dim=-1))
    return raw, F.normalize(raw, dim=-1)
