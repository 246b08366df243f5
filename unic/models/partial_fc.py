"""Partial FC (An et al., CVPR 2022; Unicom): margin heads whose class centres are sharded over ranks.

``heads.partial_fc=<rate>`` turns any margin head of SPEC section 5 into a model-parallel classifier:

* **Shards.** Class c lives on one rank, in contiguous blocks: with C classes on W ranks, rank r holds
  ``C // W + (r < C % W)`` classes starting at ``r * (C // W) + min(r, C % W)`` (:func:`shard_range`),
  i.e. the rows ``c*k .. c*k+k-1`` of its k sub-centres. The centres are a plain per-rank parameter, never
  DDP-wrapped and never all-reduced; AdamW's state for them is sharded with them.
* **Sampling.** Each step keeps every positive class of the global batch plus random negatives, in all
  ``min(C, max(P, ceil(rate * C)))`` classes, P = number of distinct labels in the global batch
  (:func:`num_sampled_classes`). The draw is global: every class gets a priority from a generator seeded by
  ``(seed, step)`` (positives first) and the top ones are kept (:func:`draw_classes`), so it is the same on
  every rank, reproducible, and independent of the number of ranks: a job resumed on another world size
  samples the same classes. Each rank computes the columns of the sampled classes it holds (their number
  varies from step to step; on average the total over W). At rate 1 nothing is drawn: every class is used.
* **Softmax over all ranks.** Embeddings and labels are all-gathered; each rank computes the logits of the
  whole global batch against its sampled classes and the cross-entropy uses a distributed max and
  log-sum-exp (:func:`sharded_log_softmax`), so at rate 1 the loss is the full-softmax loss exactly.
  The margins act on the target columns; statistics of the stateful heads are reduced over the right axis
  (see :class:`unic.models.heads.Targets`): AdaCos's B_avg sums over the sampled classes (the softmax
  actually computed), CurricularFace's hard negatives are the sampled ones, every per-row statistic (AdaCos
  median, CurricularFace t, AdaFace norms) is taken over the whole global batch. At rate 1 all are exact.

Gradient contract (what :class:`PartialFC` returns, DDP averaging included): the loss returned on every
rank is the full-softmax head's mean loss L over the global batch (the same value on every rank). The
gradient reaching each rank's *local* embeddings is ``W * dL/de_local``, so that DDP's average over ranks of
the backbone gradients (each rank's local loss) gives exactly dL/dtheta; each rank's centre-shard gradient
is exactly the corresponding rows of dL/dW of the full head (no all-reduce, no world-size factor). A
parameter between the backbone and the head that is averaged by hand (UDON's teacher heads,
``DomainHeads.sync_gradients``) gets the same treatment as a DDP one.

Checkpoints: a module's ``state_dict`` holds the replicated head state only (AdaCos scale, ...); the centres
and their optimizer state travel through :func:`full_state` / :func:`load_full_state` (collective), which
gather them in class order and load them back on any number of ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from unic import distributed
from unic.models.heads import Targets, build_margin_formula, class_cosine

logger = logging.getLogger(__name__)

INIT_CHUNK_CLASSES = 4096  # centres are initialised in chunks of classes, each from its own seeded generator
_INIT_STREAM = 1 << 40  # keeps the init generators' seeds apart from the per-step sampling seeds


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the classes rank ``rank`` holds: contiguous blocks, the first ``C % W`` one larger."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + int(rank < extra)


def num_sampled_classes(num_positive: int, num_classes: int, sample_rate: float) -> int:
    """Classes in one step's softmax: every positive, at least ``ceil(rate * C)`` in all, at most C."""
    wanted = math.ceil(sample_rate * num_classes - 1e-9)  # 0.3 * 10 is 3.0000000000000004 in floating point
    return min(num_classes, max(num_positive, wanted))


def _seed(*values: int) -> int:
    """A 63-bit generator seed mixing ``values`` (numpy's SeedSequence, so nearby inputs are unrelated)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def draw_classes(labels_G: torch.Tensor, num_classes: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """Sorted global ids of one step's classes: the global batch's labels plus random negatives.

    Depends only on (labels, C, rate, seed, step) and the device type, never on the number of ranks."""
    device = labels_G.device
    positives = torch.unique(labels_G)
    count = num_sampled_classes(positives.numel(), num_classes, sample_rate)
    if count >= num_classes:
        return torch.arange(num_classes, device=device)
    generator = torch.Generator(device=device).manual_seed(_seed(seed, step))
    priority = torch.rand(num_classes, generator=generator, device=device)
    priority[positives] = 2.0  # above any draw: positives are always kept
    return priority.topk(count, sorted=False).indices.sort().values


# ---------------------------------------------------------------- collectives with autograd


def _gather_sizes(num_rows: int) -> list[int]:
    """Every rank's row count: host numbers, exchanged between the hosts (no device synchronisation)."""
    return distributed.host_all_gather(num_rows)


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if len(sizes) == 1:
        return x
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward: the summed gradient of this rank's rows, times W (see the module
    docstring: DDP then averages the backbone gradients over ranks)."""

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        return _all_gather_rows(x_BD, sizes)

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor):
        sizes = ctx.sizes
        if len(sizes) == 1:
            return grad_GD, None
        grad_GD = distributed.all_reduce_sum(grad_GD.contiguous().clone())
        start = sum(sizes[: distributed.get_rank()])
        return grad_GD[start : start + sizes[distributed.get_rank()]] * len(sizes), None


@dataclass(frozen=True)
class GatheredBatch:
    """The global batch every rank sees: rows in rank order, ``sizes`` the local batch sizes."""

    labels_G: torch.Tensor
    sizes: list[int]

    def gather(self, x_BD: torch.Tensor) -> torch.Tensor:
        """All-gather a local (B, D) tensor with the gradient contract of the module docstring."""
        return _GatherRows.apply(x_BD, self.sizes)


def gather_batch(labels_B: torch.Tensor) -> GatheredBatch:
    """Gather the labels of the global batch (collective); its ``gather`` then gathers the embeddings."""
    sizes = _gather_sizes(labels_B.shape[0])
    return GatheredBatch(_all_gather_rows(labels_B, sizes), sizes)


class _AllReduceSum(torch.autograd.Function):
    """Sum of per-rank terms into a value replicated on every rank; backward passes each rank's gradient to
    its own term unchanged (valid because the loss built from the sum is the same on every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Replicated sum of each rank's ``x`` (autograd-correct for a loss every rank computes alike)."""
    return _AllReduceSum.apply(x) if distributed.is_enabled() else x


class _ShardedLogSoftmax(torch.autograd.Function):
    """log-softmax over the classes of all ranks, each rank holding some columns (distributed max and
    log-sum-exp); backward needs the row sums of the upstream gradient over every rank's columns."""

    @staticmethod
    def forward(ctx, z_GN: torch.Tensor) -> torch.Tensor:
        if z_GN.shape[1]:
            max_G = z_GN.detach().amax(dim=1)
        else:
            max_G = z_GN.new_full((z_GN.shape[0],), -math.inf)
        max_G = distributed.all_reduce_max(max_G.contiguous())
        sum_exp_G = distributed.all_reduce_sum(torch.exp(z_GN - max_G[:, None]).sum(dim=1))
        log_p_GN = z_GN - (max_G + torch.log(sum_exp_G))[:, None]
        ctx.save_for_backward(log_p_GN)
        return log_p_GN

    @staticmethod
    def backward(ctx, grad_GN: torch.Tensor) -> torch.Tensor:
        (log_p_GN,) = ctx.saved_tensors
        total_G = distributed.all_reduce_sum(grad_GN.sum(dim=1))
        return grad_GN - torch.exp(log_p_GN) * total_G[:, None]


def sharded_log_softmax(z_GN: torch.Tensor) -> torch.Tensor:
    """This rank's columns of log_softmax(z) taken over the columns of every rank (float32)."""
    if not distributed.is_enabled():
        return torch.log_softmax(z_GN.float(), dim=1)
    return _ShardedLogSoftmax.apply(z_GN.float())


def take_target(x_GN: torch.Tensor, col_G: torch.Tensor) -> torch.Tensor:
    """x[i, col_i] where this rank holds row i's target, 0 elsewhere (stays in the graph with no columns)."""
    if x_GN.shape[1] == 0:
        return x_GN.sum(dim=1)
    picked = x_GN.gather(1, col_G.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(col_G >= 0, picked, torch.zeros_like(picked))


def sharded_cross_entropy(logits_GN: torch.Tensor, col_G: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy (G,) of the softmax over all ranks' columns, the same on every rank."""
    return -sum_over_ranks(take_target(sharded_log_softmax(logits_GN), col_G))


def sharded_kl(log_p_target_GN: torch.Tensor, log_p_GN: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_target || p) (G,) over all ranks' columns, the same on every rank."""
    return sum_over_ranks((torch.exp(log_p_target_GN) * (log_p_target_GN - log_p_GN)).sum(dim=1))


# ---------------------------------------------------------------- the module


@dataclass(frozen=True)
class ClassSample:
    """One step's classes as this rank sees them.

    ``classes_N``: the sampled classes this rank holds (global ids, sorted), None for its whole shard (rate 1);
    ``col_G``: each global row's target column among them, -1 where another rank holds it;
    ``num_sampled``: classes in the softmax over all ranks."""

    labels_G: torch.Tensor
    classes_N: torch.Tensor | None
    col_G: torch.Tensor
    num_sampled: int


class PartialFC(nn.Module):
    """Margin head ``head_name`` with its C class centres sharded over ranks and a sampled softmax.

    ``forward(embeddings_BD, labels_B, step)`` takes this rank's local batch and returns ``loss`` (the mean
    cross-entropy over the global batch, the same on every rank) with ``ce_G`` (per global row), ``logits``
    and ``cosine`` (global rows x this rank's sampled classes) and ``sample``; the gradient contract is the
    module docstring's. Every rank must call it (collective). ``sample_rate`` in (0, 1]; ``seed`` seeds both
    the centres' initialisation (chunked, so the same full matrix on any number of ranks) and the per-step
    draws. ``shard=(rank, world)`` overrides this process's shard, only to simulate one rank of a larger job
    without a process group (benchmarks). Head options (s, m, k, init, class_counts, ...) as
    :func:`unic.models.heads.build_margin_head`.
    """

    def __init__(self, head_name: str, embed_dim: int, num_classes: int, sample_rate: float = 1.0,
                 seed: int = 0, *, shard: tuple[int, int] | None = None, **head_kwargs) -> None:
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"partial_fc sample rate must be in (0, 1], got {sample_rate}")
        self.head = build_margin_formula(head_name, embed_dim, num_classes, **head_kwargs)
        self.head_name, self.embed_dim, self.num_classes, self.k = head_name, embed_dim, num_classes, self.head.k
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        self.rank, self.world_size = shard if shard is not None else (distributed.get_rank(),
                                                                      distributed.get_world_size())
        self.class_start, self.class_stop = shard_range(num_classes, self.rank, self.world_size)
        self.weight = nn.Parameter(torch.empty(self.num_local * self.k, embed_dim))
        self.reset_parameters()
        self.register_state_dict_post_hook(_drop_centres)
        self.register_load_state_dict_pre_hook(_keep_centres)

    @property
    def num_local(self) -> int:
        return self.class_stop - self.class_start

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This shard's rows of the full (C*k, D) matrix, drawn chunk by chunk (chunks of
        ``INIT_CHUNK_CLASSES`` classes, each from its own generator), with the head's init scheme."""
        rows = INIT_CHUNK_CLASSES * self.k
        first, last = self.class_start * self.k, self.class_stop * self.k
        for chunk in range(first // rows, -(-last // rows)):
            lo = chunk * rows
            hi = min(lo + rows, self.num_classes * self.k)
            block = torch.empty(hi - lo, self.embed_dim)
            generator = torch.Generator().manual_seed(_seed(self.seed, _INIT_STREAM + chunk))
            if self.head.init == "lecun_uniform":
                bound = math.sqrt(3.0 / self.embed_dim)
                block.uniform_(-bound, bound, generator=generator)
            else:  # "normal", the only other scheme (the head checked the name)
                block.normal_(0.0, 0.01, generator=generator)
            a, b = max(lo, first), min(hi, last)
            self.weight[a - first : b - first] = block[a - lo : b - lo].to(self.weight.device)

    def sample(self, labels_G: torch.Tensor, step: int | None) -> ClassSample:
        """The classes of ``step`` for the global labels (identical on every rank; no collective)."""
        start, stop = self.class_start, self.class_stop
        here_G = (labels_G >= start) & (labels_G < stop)
        if self.sample_rate >= 1:
            col_G = torch.where(here_G, labels_G - start, torch.full_like(labels_G, -1))
            return ClassSample(labels_G, None, col_G, self.num_classes)
        if step is None:
            raise ValueError("Partial FC with sample rate < 1 needs the training step to draw its classes")
        chosen = draw_classes(labels_G, self.num_classes, self.sample_rate, self.seed, step)
        classes_N = chosen[(chosen >= start) & (chosen < stop)]
        col_G = torch.where(here_G, torch.searchsorted(classes_N, labels_G), torch.full_like(labels_G, -1))
        return ClassSample(labels_G, classes_N, col_G, chosen.numel())

    def logits(self, embeddings_GD: torch.Tensor, sample: ClassSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled logits and float32 cosines (G, N) of the gathered batch against this rank's sampled classes."""
        with torch.autocast(device_type=embeddings_GD.device.type, enabled=False):
            weight = self.weight
            if sample.classes_N is not None:
                weight = weight.view(self.num_local, self.k, self.embed_dim)[sample.classes_N - self.class_start]
                weight = weight.reshape(-1, self.embed_dim)
            cos_GN = class_cosine(embeddings_GD, weight, self.k)
            cos_y_here = take_target(cos_GN, sample.col_G)
            cos_y_all = distributed.all_reduce_sum(cos_y_here.detach().clone())  # each row's target cos
            cos_y_G = torch.where(sample.col_G >= 0, cos_y_here, cos_y_all)
            targets = Targets(sample.labels_G, sample.col_G, cos_y_G, rows_split=False)
            return self.head.margin_logits(cos_GN, targets, embeddings_GD), cos_GN

    def forward(self, embeddings_BD: torch.Tensor, labels_B: torch.Tensor, step: int | None = None) -> dict:
        batch = gather_batch(labels_B)
        embeddings_GD = batch.gather(embeddings_BD)
        sample = self.sample(batch.labels_G, step)
        logits_GN, cos_GN = self.logits(embeddings_GD, sample)
        ce_G = sharded_cross_entropy(logits_GN, sample.col_G)
        return {"loss": ce_G.mean(), "ce_G": ce_G, "logits": logits_GN, "cosine": cos_GN, "sample": sample}

    def extra_repr(self) -> str:
        return (f"head={self.head_name}, num_classes={self.num_classes}, k={self.k}, sample_rate={self.sample_rate}, "
                f"shard={self.rank}/{self.world_size} classes [{self.class_start}, {self.class_stop})")


def _drop_centres(module: PartialFC, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict.pop(prefix + "weight", None)


def _keep_centres(module: PartialFC, state_dict: dict, prefix: str, *args) -> None:
    """Loading a ``state_dict`` (which has no centres) keeps the current ones instead of missing a key."""
    state_dict.setdefault(prefix + "weight", module.weight.detach())


# ---------------------------------------------------------------- checkpoints and optimizer state


def partial_fc_modules(module: nn.Module) -> dict[str, PartialFC]:
    """Every :class:`PartialFC` inside ``module`` by its qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, PartialFC)}


def sharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The sharded class centres inside ``module`` (per-rank parameters: never all-reduce their gradients)."""
    return [m.weight for m in partial_fc_modules(module).values()]


def _gather_to_main(x: torch.Tensor) -> torch.Tensor | None:
    """Rows of every rank's ``x`` concatenated in rank order, on rank 0 (CPU); None elsewhere.

    One shard at a time (point-to-point into one shard-sized buffer, then to the CPU): rank 0's device never
    holds the full centres, which is the point of sharding them."""
    if not distributed.is_enabled():
        return x.detach().cpu().clone()
    sizes = _gather_sizes(x.shape[0])
    if distributed.get_rank() != 0:
        if x.shape[0]:
            dist.send(x.detach().contiguous(), dst=0)
        return None
    full = torch.empty((sum(sizes), *x.shape[1:]), dtype=x.dtype)
    full[: sizes[0]] = x.detach().cpu()
    buffer = x.new_empty((max(sizes), *x.shape[1:]))
    offset = sizes[0]
    for src, rows in enumerate(sizes[1:], start=1):
        if rows:
            part = buffer[:rows]
            dist.recv(part, src=src)
            full[offset:offset + rows] = part.cpu()
            offset += rows
    return full


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The full class centres of every Partial FC in ``module`` and their optimizer state, in class order.

    Collective (every rank calls it, one tensor at a time); the result is complete on rank 0 and ``{}``
    elsewhere: ``{name: {"num_classes", "k", "embed_dim", "weight": (C*k, D), "optimizer": {key: value}}}``,
    where each per-element optimizer tensor (AdamW's exp_avg, exp_avg_sq, ...) is gathered like the weight
    and scalars (AdamW's step) are taken as they are (every rank holds the same)."""
    out = {}
    for name, m in sorted(partial_fc_modules(module).items()):
        entry = {"num_classes": m.num_classes, "k": m.k, "embed_dim": m.embed_dim,
                 "weight": _gather_to_main(m.weight)}
        if optimizer is not None:
            state = optimizer.state.get(m.weight, {})
            entry["optimizer"] = {
                key: (_gather_to_main(v) if torch.is_tensor(v) and v.shape == m.weight.shape
                      else v.detach().cpu().clone() if torch.is_tensor(v) else v)
                for key, v in sorted(state.items())
            }
        out[name] = entry
    return out if distributed.get_rank() == 0 else {}


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Load :func:`full_state`'s output into this rank's shards (any number of ranks; every rank calls it
    with the full state). Call it after ``optimizer.load_state_dict``, which replaces the whole state."""
    for name, m in partial_fc_modules(module).items():
        if name not in state:
            raise KeyError(f"no Partial FC centres for {name!r} in the checkpoint (has {sorted(state)})")
        entry = state[name]
        saved = (entry["num_classes"], entry["k"], entry["embed_dim"])
        if saved != (m.num_classes, m.k, m.embed_dim):
            raise ValueError(f"Partial FC {name!r}: checkpoint has (classes, k, dim) = {saved}, "
                             f"the model {(m.num_classes, m.k, m.embed_dim)}")
        full = entry["weight"]
        rows = slice(m.class_start * m.k, m.class_stop * m.k)
        with torch.no_grad():
            m.weight.copy_(full[rows])
        if optimizer is None or "optimizer" not in entry:
            continue
        group = next((g for g in optimizer.param_groups if any(p is m.weight for p in g["params"])), None)
        if group is None:
            raise ValueError(f"Partial FC {name!r}: its centres are not in the optimizer")
        on_device = group.get("capturable", False) or group.get("fused", False)
        param_state = {}
        for key, value in entry["optimizer"].items():
            if torch.is_tensor(value) and value.shape == full.shape:
                param_state[key] = value[rows].to(m.weight.device, m.weight.dtype).clone()
            elif torch.is_tensor(value):
                param_state[key] = value.clone().to(m.weight.device) if on_device else value.clone()
            else:
                param_state[key] = value
        optimizer.state[m.weight] = param_state


def optimizer_state_dict(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict:
    """``optimizer.state_dict()`` without the state of ``module``'s sharded centres (saved by
    :func:`full_state` instead), so that it loads on any number of ranks."""
    sharded = {id(p) for p in sharded_parameters(module)}
    state = optimizer.state_dict()
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in sharded:
                state["state"].pop(index, None)
            index += 1
    return state


# ---------------------------------------------------------------- memory


def memory_bytes(num_classes: int, embed_dim: int, world_size: int = 1, k: int = 1, global_batch: int = 0,
                 sample_rate: float = 1.0, bytes_per_value: int = 4, optimizer_copies: int = 2) -> dict[str, float]:
    """Per-rank bytes of the largest shard: centres, their gradient (dense over the whole shard, also at
    rate < 1), their optimizer state (AdamW: 2 copies) and, for ``global_batch`` rows, one (G, N*k) float32
    logits/cosine matrix at the expected sampled classes."""
    shard = shard_range(num_classes, 0, world_size)
    rows = (shard[1] - shard[0]) * k
    centres = rows * embed_dim * bytes_per_value
    sampled_rows = min(rows, math.ceil(sample_rate * rows))
    return {
        "centres": float(centres),
        "gradients": float(centres),
        "optimizer": float(optimizer_copies * centres),
        "total": float((2 + optimizer_copies) * centres),
        "logits": float(global_batch * sampled_rows * 4),
    }
