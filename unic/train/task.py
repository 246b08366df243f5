"""The method's math in one place: UNIC distillation and UDON domain heads on the same batch, or the UniFEx
recipe (:class:`UnifexTask`).

``task(images, step, domain, labels) -> {"loss", parts...}``; the loop only steps, logs and checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unic.losses.distill import distillation_loss_parts
from unic.losses.udon import udon_loss
from unic.models.universal import DomainHeads
from unic.train.standardize import TeacherStandardizer, std_momentum


class UnicTask:
    """``loss = w_distill * L_unic + w_udon * L_udon`` (either part may be absent).

    ``model`` is the trainable :class:`UnicModel` (possibly DDP-wrapped); teachers and per-domain heads stay
    outside DDP.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        teachers: nn.ModuleDict | None = None,
        standardizer: TeacherStandardizer | None = None,
        domain_heads: DomainHeads | None = None,
        patch_size: int = 16,
        input_mean: torch.Tensor | None = None,
        input_std: torch.Tensor | None = None,
        w_distill: float = 1.0,
        w_udon: float = 1.0,
        lam_cos: float = 0.5,
        lam_sl1: float = 0.5,
        drop_prob: float = 0.5,
        momentum_start: float = 1.0,
        momentum_end: float = 0.001,
        temperature: float = 0.1,
        relational_weight: float = 32.0,
        generator: torch.Generator | None = None,
    ):
        self.model, self.total_steps = model, total_steps
        self.teachers, self.standardizer, self.domain_heads = teachers, standardizer, domain_heads
        self.patch_size = patch_size
        if input_mean is not None:
            self.input_mean, self.input_std = input_mean.view(1, 3, 1, 1), input_std.view(1, 3, 1, 1)
        self.w_distill, self.w_udon = w_distill, w_udon
        self.lam_cos, self.lam_sl1, self.drop_prob = lam_cos, lam_sl1, drop_prob
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.temperature, self.relational_weight = temperature, relational_weight
        self.generator = generator

    @property
    def distills(self) -> bool:
        return self.teachers is not None

    def teacher_targets(self, images_BCHW: torch.Tensor, step: int | None) -> dict[str, dict[str, torch.Tensor]]:
        """Standardised teacher features; ``step=None`` (evaluation) uses the running statistics only."""
        grid = (images_BCHW.shape[-2] // self.patch_size, images_BCHW.shape[-1] // self.patch_size)
        raw = {}
        for name, teacher in self.teachers.items():
            # inference tensors; the standardiser's out-of-place ops turn them into ordinary tensors
            raw[name] = teacher(images_BCHW, self.input_mean, self.input_std, grid)
        momentum = 0.0 if step is None else std_momentum(step, self.total_steps, self.momentum_start, self.momentum_end)
        return self.standardizer(raw, momentum)

    def __call__(
        self,
        images_BCHW: torch.Tensor,
        step: int | None = None,
        drop: bool = True,
        model: nn.Module | None = None,
        domain: str | None = None,
        labels_B: torch.Tensor | None = None,
        outputs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training: ``step`` set, DDP model. Evaluation: ``step=None``, ``drop=False`` and the unwrapped
        ``model``, so that no collective runs per batch (ranks may see different numbers of batches).
        ``domain``/``labels`` enable the UDON terms for a batch of that domain; ``outputs`` reuses a forward
        pass of the model already made on these images."""
        out = outputs if outputs is not None else (model or self.model)(images_BCHW)
        result: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=images_BCHW.device)
        if self.distills:
            targets = self.teacher_targets(images_BCHW, step)
            distill, kept, parts = distillation_loss_parts(
                out["preds"], targets, self.lam_cos, self.lam_sl1, self.drop_prob if drop else 0.0,
                self.generator, across_ranks=step is not None,
            )
            loss = loss + self.w_distill * distill
            result["loss/distill"] = distill.detach()
            result.update({f"loss/{k}": v for k, v in parts.items()})
            result.update({f"kept/{k}": v for k, v in kept.items()})
        if domain is not None and self.domain_heads is not None:
            heads = self.domain_heads
            teacher_raw = heads.teacher_heads[domain](F.normalize(out["cls"].float(), dim=-1))
            terms = udon_loss(teacher_raw, out["universal_raw"], labels_B, heads.teacher_classifiers[domain],
                              heads.universal_classifiers[domain], self.temperature, self.relational_weight,
                              step=step)
            loss = loss + self.w_udon * terms["loss"]
            result["loss/udon"] = terms["loss"].detach()
            result.update({f"udon/{domain}/{k}": v.detach() for k, v in terms.items() if k != "loss"})
        result["loss"] = loss
        return result


class UnifexTask:
    """UniFEx: cross-entropy of one margin head over the merged label space, on the neck's descriptor.

    ``model`` is the (possibly DDP-wrapped) :class:`unic.models.unifex.UnifexModel`; ``head`` stays outside
    DDP: a replicated margin head (the loop averages its gradients; the loss is this rank's batch mean) or a
    :class:`unic.models.partial_fc.PartialFC` (collective; its loss is the global batch's mean, the same on
    every rank, with gradients that make DDP's average exact). ``labels_B`` are rows of the merged label space.
    """

    distills = False

    def __init__(self, model: nn.Module, head: nn.Module, generator: torch.Generator | None = None):
        from unic.models.unifex import is_sharded

        self.model, self.head = model, head
        self.sharded = is_sharded(head)
        self.generator = generator  # unused: kept so that every task's state is saved alike

    def __call__(self, images_BCHW: torch.Tensor, step: int | None = None, model: nn.Module | None = None,
                 labels_B: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
        out = (model or self.model)(images_BCHW)
        if self.sharded:
            loss = self.head(out["embedding"], labels_B, step)["loss"]
        else:
            logits_BC = self.head(out["embedding"], labels_B)
            loss = F.cross_entropy(logits_BC.float(), labels_B)
        return {"loss": loss, "loss/unifex": loss.detach()}
