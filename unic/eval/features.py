"""The one feature-extraction routine shared by validation, retrieval, kNN and transfer evaluation."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from unic import distributed
from unic.data.sampling import ShardSampler

logger = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 4,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "extract",
) -> dict[str, torch.Tensor]:
    """Run ``encode`` over ``dataset`` sharded across ranks; every rank gets all rows in dataset order.

    Returns float32 CPU tensors: ``features`` (N, D), ``labels`` (N,) (first class id), ``domains`` (N,),
    ``skipped`` (number of unreadable files replaced) and ``item_skipped`` (N,): for each row, how many
    unreadable files were passed over, so row i holds sample ``i + item_skipped[i]`` when it is not 0.
    """
    rank, world = distributed.get_rank(), distributed.get_world_size()
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
        num_workers=distributed.worker_count(num_workers), pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leaves the global RNG untouched (exact resume)
        worker_init_fn=distributed.ignore_interrupts,
    )
    feats, labels, domains, indices, item_skipped = [], [], [], [], []
    skipped = torch.zeros((), dtype=torch.long)
    progress = tqdm(loader, desc=desc, disable=not distributed.is_main_process(), leave=False, dynamic_ncols=True)
    for batch in progress:
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats.append(encode(images).float())
        labels.append(batch["label"])
        domains.append(batch["domain"])
        indices.append(batch["index"])
        item_skipped.append(batch["skipped"])
        skipped += batch["skipped"].sum()
    local_dim = torch.tensor([feats[0].shape[1] if feats else 0], device=device)
    if distributed.is_enabled():
        torch.distributed.all_reduce(local_dim, op=torch.distributed.ReduceOp.MAX)
    dim = int(local_dim.item())
    local = {
        "features": torch.cat(feats) if feats else torch.zeros((0, dim), device=device),
        "labels": torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.long, device=device),
        "domains": torch.cat(domains).to(device) if domains else torch.zeros(0, dtype=torch.long, device=device),
        "indices": torch.cat(indices).to(device) if indices else torch.zeros(0, dtype=torch.long, device=device),
        "item_skipped": (torch.cat(item_skipped).to(device) if item_skipped
                         else torch.zeros(0, dtype=torch.long, device=device)),
    }
    out = {key: distributed.all_gather_cat(value).cpu() for key, value in local.items()}
    if not torch.equal(out["indices"], torch.arange(len(dataset))):
        raise RuntimeError("gathered features are not in dataset order")
    out["skipped"] = distributed.all_reduce_sum(skipped.to(device)).cpu()
    del out["indices"]
    return out
