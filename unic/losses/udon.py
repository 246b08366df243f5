"""UDON loss for a batch of one domain (SPEC section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unic.models.heads import MarginHead
from unic.models.partial_fc import PartialFC, gather_batch, sharded_cross_entropy, sharded_kl, sharded_log_softmax


def udon_loss(
    teacher_raw_BD: torch.Tensor,
    universal_raw_BE: torch.Tensor,
    labels_B: torch.Tensor,
    teacher_classifier: MarginHead | PartialFC,
    universal_classifier: MarginHead | PartialFC,
    temperature: float = 0.1,
    relational_weight: float = 32.0,
    *,
    step: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean of the four terms CE(teacher), CE(universal), KL(p_T || p_S) and relational MSE (all weights 1).

    UDON (``udon_model.py``, ``loss_function``) returns ``sum_t w_t * L_t / sum_t w_t`` with every w_t = 1, i.e.
    the plain mean of the four terms; the returned parts are the unweighted terms themselves.

    ``*_raw`` are the unnormalised projections (margin heads normalise them; AdaFace reads their norms).
    The teacher side of the KL and relational terms is detached: no gradient reaches a teacher head from
    them. KL is averaged over the batch; relational = c * mean_{i,j} (e^T_i.e^T_j - e^U_i.e^U_j)^2.

    With :class:`PartialFC` classifiers (collective; ``step`` draws the classes) both CEs and the KL are
    taken over the global batch and over the step's sampled classes of all ranks (the same draw for both
    classifiers; every class at rate 1, where they equal the replicated heads' terms on the global batch),
    with the gradient contract of ``unic.models.partial_fc``; the relational term stays on the local batch.
    """
    if isinstance(teacher_classifier, PartialFC):
        ce_teacher, ce_universal, kl = _partial_fc_terms(teacher_raw_BD, universal_raw_BE, labels_B,
                                                         teacher_classifier, universal_classifier, temperature, step)
    else:
        logits_teacher, cos_teacher = teacher_classifier(teacher_raw_BD, labels_B, return_cosine=True)
        logits_universal, cos_universal = universal_classifier(universal_raw_BE, labels_B, return_cosine=True)
        ce_teacher = F.cross_entropy(logits_teacher, labels_B)
        ce_universal = F.cross_entropy(logits_universal, labels_B)
        # float32 even under autocast: similarities near 1 are below bf16 resolution
        with torch.autocast(device_type=teacher_raw_BD.device.type, enabled=False):
            log_p_teacher = F.log_softmax(cos_teacher.detach() / temperature, dim=-1)
            log_p_student = F.log_softmax(cos_universal / temperature, dim=-1)
            kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    with torch.autocast(device_type=teacher_raw_BD.device.type, enabled=False):
        e_teacher = F.normalize(teacher_raw_BD.detach().float(), dim=-1)
        e_universal = F.normalize(universal_raw_BE.float(), dim=-1)
        relational = relational_weight * (e_teacher @ e_teacher.T - e_universal @ e_universal.T).square().mean()
    loss = (ce_teacher + ce_universal + kl + relational) / 4
    return {"loss": loss, "ce_teacher": ce_teacher, "ce_universal": ce_universal, "kl": kl, "relational": relational}


def _partial_fc_terms(
    teacher_raw_BD: torch.Tensor,
    universal_raw_BE: torch.Tensor,
    labels_B: torch.Tensor,
    teacher_classifier: PartialFC,
    universal_classifier: PartialFC,
    temperature: float,
    step: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(teacher), CE(universal) and KL over the global batch with sharded classifiers sharing one draw."""
    if not isinstance(universal_classifier, PartialFC):
        raise TypeError("with a Partial FC teacher classifier the universal classifier must be Partial FC too")
    shard = (teacher_classifier.num_classes, teacher_classifier.class_start, teacher_classifier.class_stop)
    if shard != (universal_classifier.num_classes, universal_classifier.class_start, universal_classifier.class_stop):
        raise ValueError("the teacher and universal classifiers of a domain must hold the same classes")
    batch = gather_batch(labels_B)
    sample = teacher_classifier.sample(batch.labels_G, step)
    logits_teacher, cos_teacher = teacher_classifier.logits(batch.gather(teacher_raw_BD), sample)
    logits_universal, cos_universal = universal_classifier.logits(batch.gather(universal_raw_BE), sample)
    ce_teacher = sharded_cross_entropy(logits_teacher, sample.col_G).mean()
    ce_universal = sharded_cross_entropy(logits_universal, sample.col_G).mean()
    with torch.autocast(device_type=teacher_raw_BD.device.type, enabled=False):
        log_p_teacher = sharded_log_softmax(cos_teacher.detach() / temperature)
        log_p_student = sharded_log_softmax(cos_universal / temperature)
        kl = sharded_kl(log_p_teacher, log_p_student).mean()
    return ce_teacher, ce_universal, kl
