"""Validation during training: when it runs and what it measures, behind one seam for the loop."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from unic import distributed
from unic.data.folders import ImageListDataset
from unic.train.build import ModelParts

logger = logging.getLogger(__name__)


def unique_labels(labels: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """Class ids made distinct across domains (UnED domains all count classes from 0)."""
    return domains.long() * (int(labels.max().item()) + 1) + labels.long()


def _readable_rows(out: dict) -> dict:
    """Drop the rows of images that were unreadable (the loader put another image there)."""
    keep = out["item_skipped"] == 0
    return {k: (v[keep] if torch.is_tensor(v) and v.dim() > 0 and len(v) == len(keep) else v) for k, v in out.items()}


class Validator:
    """Distillation loss without dropping, weighted kNN top-1 of the backbone and, with UDON, the universal
    embedding's leave-one-out R@1 per val domain (:func:`unic.eval.metrics.universal_recall`). The UniFEx
    recipe scores its descriptor (the neck's output) both ways: kNN top-1 and R@1 per domain.

    It runs at every epoch end and, with ``train.validate_first``, before the first step; never without
    ``train.validate`` or a val split.
    """

    def __init__(self, cfg: DictConfig, parts: ModelParts, task, val_set: ImageListDataset | None,
                 bank: ImageListDataset | None, steps_per_epoch: int, batch_per_gpu: int, device: torch.device,
                 autocast_dtype: torch.dtype | None, metrics, modes: list):
        self.cfg, self.parts, self.task = cfg, parts, task
        self.val_set, self.bank, self.steps_per_epoch = val_set, bank, steps_per_epoch
        self.batch_per_gpu, self.device, self.dtype = batch_per_gpu, device, autocast_dtype
        self.metrics, self.modes = metrics, modes  # the writer; modules switched to eval mode (DDP wrapper, ...)
        self.domains = list(val_set.domain_names) if val_set is not None else []
        self.unifex = parts.unifex_head is not None

    def should_validate(self, step: int) -> bool:
        """At step 0 (before training) with ``train.validate_first``, else after each epoch's last step."""
        if not self.cfg.train.validate or self.val_set is None:
            return False
        return self.cfg.train.validate_first if step == 0 else step % self.steps_per_epoch == 0

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """The metrics at ``step``, computed on rank 0 and shared with every rank. Rows that replaced
        unreadable images are left out."""
        from unic.eval.features import extract_features

        for module in self.modes:
            if module is not None:
                module.eval()
        loss_sum = torch.zeros(2, device=self.device)
        workers = self.cfg.data.num_workers
        val = extract_features(lambda images: self._encode(images, loss_sum), self.val_set, self.device,
                               self.batch_per_gpu, workers, self.dtype, desc="val")
        bank = extract_features(self._encode_backbone, self.bank, self.device, self.batch_per_gpu, workers,
                                self.dtype, desc="knn bank")
        distributed.all_reduce_sum(loss_sum)
        metrics = self._metrics(_readable_rows(val), _readable_rows(bank), loss_sum) if distributed.get_rank() == 0 else None
        if metrics is not None:
            self.metrics.write(step, metrics, prefix="val")
            logger.info("validation at step %d: %s", step,
                        ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "skipped_images"))
        return distributed.broadcast_object(metrics)

    def _encode(self, images: torch.Tensor, loss_sum: torch.Tensor) -> torch.Tensor:
        """L2-normalised backbone cls (+ UDON universal embedding) of a val batch; adds its loss to ``loss_sum``."""
        from unic.models.universal import udon_embeddings

        model = self.parts.model
        out = model(images)
        if self.unifex:
            return F.normalize(out["embedding"].float(), dim=-1)
        feats = [F.normalize(out["cls"].float(), dim=-1)]
        if self.parts.teachers is not None:
            loss = self.task(images, None, drop=False, model=model, outputs=out)["loss"]
            loss_sum[0] += loss.float() * images.shape[0]
            loss_sum[1] += images.shape[0]
        if self.parts.domain_heads is not None:
            feats.append(udon_embeddings(out["cls"], model.udon.universal)[1])
        return torch.cat(feats, dim=1)

    def _encode_backbone(self, images: torch.Tensor) -> torch.Tensor:
        from unic.models.student import backbone_embedding

        if self.unifex:
            return F.normalize(self.parts.model(images)["embedding"].float(), dim=-1)
        return F.normalize(backbone_embedding(self.parts.model.backbone, images).float(), dim=-1)

    def _metrics(self, val: dict, bank: dict, loss_sum: torch.Tensor) -> dict[str, float]:
        from unic.eval.knn import weighted_knn
        from unic.eval.metrics import universal_recall

        dim = self.parts.model.embed_dim if self.unifex else self.parts.model.backbone.embed_dim
        labels = torch.cat([unique_labels(bank["labels"], bank["domains"]),
                            unique_labels(val["labels"], val["domains"])])
        _, labels = torch.unique(labels, return_inverse=True)
        k = min(20, len(bank["labels"]))
        knn = weighted_knn(bank["features"], labels[: len(bank["labels"])], val["features"][:, :dim],
                           labels[len(bank["labels"]):], ks=(k,), device=self.device)
        metrics = {f"knn{k}_top1": float(knn[k]["top1"]), "skipped_images": int(val["skipped"] + bank["skipped"])}
        if self.parts.teachers is not None:
            metrics["loss"] = float(loss_sum[0] / loss_sum[1])
        if self.parts.domain_heads is not None or self.unifex:
            universal = val["features"][:, :dim] if self.unifex else val["features"][:, dim:]
            metrics.update(universal_recall(universal, val["labels"], val["domains"], self.domains))
        return metrics
