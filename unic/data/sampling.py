"""Deterministic, resumable sampling of global batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

_SEED_MULT = 1_000_003


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of every global batch, as lists of ``(dataset index, sample seed)``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; global batch ``s`` is its ``s``-th chunk of
    ``global_batch`` indices and rank ``r`` takes the ``r``-th contiguous part. The per-sample seed depends on
    (seed, epoch, position in the epoch) only, so a run is the same whatever the number of processes and
    data workers, and resuming at (epoch, step) replays exactly what an uninterrupted run would have seen.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if num_samples < global_batch:
            raise ValueError(f"the data set has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = num_samples // global_batch
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, step_in_epoch: int = 0) -> None:
        self.epoch, self.start_step = epoch, step_in_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * _SEED_MULT + self.epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        base_seed = (self.seed * _SEED_MULT + self.epoch) * (self.num_samples + 1)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            yield [(order[pos], (base_seed + pos) % (2**63)) for pos in range(start, start + self.local_batch)]


class ShardSampler(Sampler):
    """Contiguous shards for evaluation: concatenating the ranks' outputs restores dataset order."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        per_rank = -(-num_samples // world_size)
        self.indices = list(range(rank * per_rank, min((rank + 1) * per_rank, num_samples)))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class DomainBatchSampler(Sampler):
    """Endless batches of one domain: pass ``p`` is a permutation seeded by (seed, domain, p); each batch takes
    the next ``global_batch`` positions (a pass's remainder is dropped) and this rank its contiguous slice.

    ``start_batch`` (batches of this domain already consumed) resumes the stream exactly.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 domain_index: int, start_batch: int = 0, offset: int = 0):
        if num_samples < global_batch:
            raise ValueError(f"domain {domain_index} has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.seed, self.domain_index, self.start_batch = seed, domain_index, start_batch
        self.offset = offset  # index of this domain's first sample in the concatenated dataset
        self.batches_per_pass = num_samples // global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs it for its own bookkeeping
        return 2**62

    def __iter__(self):
        batch = self.start_batch
        while True:
            pass_index, in_pass = divmod(batch, self.batches_per_pass)
            key = (self.seed * _SEED_MULT + self.domain_index) * _SEED_MULT + pass_index
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(key)).tolist()
            base_seed = key * (self.num_samples + 1)
            for b in range(in_pass, self.batches_per_pass):
                start = b * self.global_batch + self.rank * self.local_batch
                yield [(self.offset + order[pos], (base_seed + pos) % (2**63))
                       for pos in range(start, start + self.local_batch)]
            batch = (pass_index + 1) * self.batches_per_pass


class DomainSampler:
    """Draws one domain per step, the same on every rank (seeded generator, all-reduced losses).

    Strategies: ``round_robin``; ``size`` (p proportional to train-set size); ``uniform``; ``dynamic``
    (UDON): round-robin until the first update, then every ``update_every`` steps the sampling weights are
    re-estimated from the mean teacher CE of each domain over a window of past steps, exactly as
    ``Sampler.update_ds_indices`` in UDON's ``sampling_utils.py`` (see :func:`udon_update_weights`): the
    domains drawn in the window get p_d = CE_d / sum of their CEs, the others keep their previous p, and if
    any was not drawn every p is divided by the new total.

    The window is ``window_reset_every=0`` (default): the steps since the last update (a fixed window,
    emptied at each update; the update follows step ``n * update_every`` and applies from the next step).
    ``window_reset_every=L > 0`` reproduces UDON's own bookkeeping, where the window is whatever its training
    summary has accumulated: the statistics are emptied after step 1 and after every (1-based) step s with
    s % L == 1, not at updates (UDON: L = steps per epoch // 10), and the update is made before each step s
    with s % update_every == 0 from the steps before it.
    Losses are accumulated on ``device`` without host synchronisation and reduced over ranks at updates.
    """

    def __init__(self, sizes: list[int], strategy: str = "dynamic", update_every: int = 1000, seed: int = 0,
                 device: torch.device | str = "cpu", window_reset_every: int = 0):
        if window_reset_every < 0:
            raise ValueError(f"window_reset_every must be >= 0, got {window_reset_every}")
        self.num_domains = len(sizes)
        self.strategy, self.update_every = strategy, update_every
        self.window_reset_every = window_reset_every
        self.generator = torch.Generator().manual_seed(seed * _SEED_MULT + 7)
        if strategy == "size":
            self.probs = torch.tensor(sizes, dtype=torch.float64) / float(sum(sizes))
        else:
            self.probs = torch.full((self.num_domains,), 1.0 / self.num_domains, dtype=torch.float64)
        self.step = 0
        self.updated = False
        self.window_sum = torch.zeros(self.num_domains, dtype=torch.float64, device=device)
        self.window_count = torch.zeros(self.num_domains, dtype=torch.float64, device=device)

    def next_domain(self) -> int:
        if self.strategy == "round_robin" or (self.strategy == "dynamic" and not self.updated):
            domain = self.step % self.num_domains
        else:
            domain = int(torch.multinomial(self.probs, 1, generator=self.generator).item())
        self.step += 1
        return domain

    def record(self, domain: int, teacher_ce: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add a step's (local) teacher CE to the window, unless ``keep`` (a bool tensor, on the device) is
        false (a skipped step); no host synchronisation."""
        keep = torch.ones((), dtype=torch.bool, device=self.window_sum.device) if keep is None else keep
        keep = keep.to(self.window_sum.device)
        self.window_sum[domain] += torch.where(keep, teacher_ce.detach().to(self.window_sum), 0.0)
        self.window_count[domain] += keep.to(self.window_count.dtype)

    def _clear_window(self) -> None:
        self.window_sum.zero_()
        self.window_count.zero_()

    def maybe_update(self) -> bool:
        """Called once after every step (every rank at the same step): apply the dynamic update when due."""
        if self.strategy != "dynamic":
            return False
        reference_window = self.window_reset_every > 0
        if reference_window and (self.step % self.window_reset_every == 1 or self.step == 1):
            self._clear_window()  # UDON empties its summary after step 1 and after (1-based) steps s % L == 1
        due_after = self.step + 1 if reference_window else self.step  # UDON: before step s, s % update_every == 0
        if due_after % self.update_every:
            return False
        from unic import distributed

        sums = distributed.all_reduce_mean(self.window_sum.clone()).cpu()
        self.probs = udon_update_weights(self.probs, sums, self.window_count.cpu())
        self.updated = True
        if not reference_window:
            self._clear_window()
        return True

    def state_dict(self) -> dict:
        return {"probs": self.probs.clone(), "step": self.step, "updated": self.updated,
                "window_sum": self.window_sum.cpu().clone(), "window_count": self.window_count.cpu().clone(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.probs, self.step, self.updated = state["probs"].clone(), int(state["step"]), bool(state["updated"])
        self.window_sum.copy_(state["window_sum"])
        self.window_count.copy_(state["window_count"])
        self.generator.set_state(state["generator"])


def udon_update_weights(probs: torch.Tensor, loss_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """UDON's dynamic re-weighting (``sampling_utils.py``, ``Sampler.update_ds_indices``).

    Domains seen in the window (count > 0) get their mean loss divided by the sum of the seen domains' mean
    losses, so together they hold a mass of 1; unseen domains keep their previous weight; when some domain
    was unseen, all weights are then divided by their total. E.g. p = (0.1, 0.45, 0.45) with only domains
    1 and 2 seen, equal losses: (0.1, 0.5, 0.5) / 1.1 = (0.0909, 0.4545, 0.4545). An empty window leaves p
    unchanged. Mean losses are floored at 1e-12 so a zero loss cannot divide by zero.
    """
    seen = counts > 0
    if not seen.any():
        return probs.clone()
    mean_loss = (loss_sums.double() / counts.double().clamp_min(1)).clamp_min(1e-12)
    new = torch.where(seen, mean_loss / mean_loss[seen].sum(), probs.double())
    if not seen.all():
        new = new / new.sum()
    return new
