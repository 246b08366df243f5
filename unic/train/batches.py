"""Where training batches come from: epochs over one data set, or one domain per step (UDON)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate

from unic.data.folders import ImageListDataset
from unic.data.sampling import DomainBatchSampler, DomainSampler, GlobalBatchSampler
from unic.distributed import all_reduce_mean, ignore_interrupts, worker_count


def collate_items(items: list[dict]) -> dict:
    """A training batch: ``default_collate`` of the items, plus ``skipped_images``, the batch's count of
    unreadable images passed over as a Python int (the step reads it without a tensor op). Images that are
    not tensors (encoded files for decoding on the device, ``data.decode=gpu``) stay a list."""
    images = [item["image"] for item in items]
    if isinstance(images[0], torch.Tensor):
        batch = default_collate(items)
    else:
        batch = default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])
        batch["image"] = images
    batch["skipped_images"] = sum(int(item["skipped"]) for item in items)
    return batch


def _loader(dataset, batch_sampler, num_workers: int, pin: bool, timeout_s: float) -> DataLoader:
    num_workers = worker_count(num_workers)
    # a private generator keeps DataLoader start-up from consuming the global RNG (exact resume);
    # the timeout turns a stuck worker (dead network file system, ...) into an error instead of a hang
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin,
                      collate_fn=collate_items, generator=torch.Generator(), persistent_workers=False,
                      worker_init_fn=ignore_interrupts,
                      timeout=timeout_s if num_workers > 0 else 0)


class EpochBatches:
    """Global batches of a shuffled data set, epoch after epoch; the position is the global step."""

    def __init__(self, dataset: ImageListDataset, sampler: GlobalBatchSampler, num_workers: int, pin: bool,
                 timeout_s: float = 0.0):
        self.dataset, self.sampler, self.num_workers, self.pin = dataset, sampler, num_workers, pin
        self.timeout_s = timeout_s
        self.step, self._iter = 0, None

    def start(self, step: int) -> None:
        self.step, self._iter = step, None

    def next(self) -> tuple[int | None, dict]:
        if self._iter is None:
            self.sampler.set_position(*divmod(self.step, self.sampler.steps_per_epoch))
            self._iter = iter(_loader(self.dataset, self.sampler, self.num_workers, self.pin, self.timeout_s))
        batch = next(self._iter)
        self.step += 1
        if self.step % self.sampler.steps_per_epoch == 0:
            self._iter = None
        return None, batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        self._iter = None


class DomainBatches:
    """One domain per step (the same on every rank), each domain an endless, resumable stream of batches."""

    def __init__(self, dataset: ImageListDataset, global_batch: int, rank: int, world: int, seed: int,
                 domain_sampler: DomainSampler, num_workers: int, pin: bool, timeout_s: float = 0.0):
        self.dataset, self.domain_sampler = dataset, domain_sampler
        self.timeout_s = timeout_s
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.pin = pin
        domains = [d for _, _, d in dataset.samples]
        self.num_domains = len(dataset.domain_names)
        self.offsets = [domains.index(d) for d in range(self.num_domains)]
        self.sizes = [domains.count(d) for d in range(self.num_domains)]
        self.num_workers = num_workers
        self.consumed = [0] * self.num_domains
        self._iters: list = [None] * self.num_domains
        self.workers = self.allocate_workers()
        self._probs_seen = self.domain_sampler.probs

    def allocate_workers(self) -> list[int]:
        """Data workers per domain stream, in proportion to the domain's sampling probability (at least one
        each, so the total can exceed ``num_workers`` by up to the number of domains): a domain drawn at 40 %
        of the steps gets 40 % of the decoding capacity. Which images a batch holds never depends on this."""
        if self.num_workers == 0:
            return [0] * self.num_domains
        probs = self.domain_sampler.probs.tolist()
        return [max(1, round(self.num_workers * p)) for p in probs]

    def _rebalance(self) -> None:
        """After a dynamic update, restart the streams whose share of the workers changed (at their position)."""
        workers = self.allocate_workers()
        if sum(abs(new - old) for old, new in zip(self.workers, workers)) * 4 < self.num_workers:
            return  # under a quarter of the workers would move: not worth restarting streams
        for domain, (old, new) in enumerate(zip(self.workers, workers)):
            if old != new:
                self._iters[domain] = None
        self.workers = workers

    def start(self, step: int) -> None:  # noqa: ARG002 - the position lives in the per-domain counters
        self._iters = [None] * self.num_domains

    def _stream(self, domain: int):
        if self._iters[domain] is None:
            sampler = DomainBatchSampler(self.sizes[domain], self.global_batch, self.rank, self.world, self.seed,
                                         domain, start_batch=self.consumed[domain], offset=self.offsets[domain])
            self._iters[domain] = iter(_loader(self.dataset, sampler, self.workers[domain], self.pin, self.timeout_s))
        return self._iters[domain]

    def next(self) -> tuple[int, dict]:
        if self.domain_sampler.probs is not self._probs_seen:  # a dynamic update replaced the probabilities
            self._probs_seen = self.domain_sampler.probs
            self._rebalance()
        domain = self.domain_sampler.next_domain()
        batch = next(self._stream(domain))
        self.consumed[domain] += 1
        return domain, batch

    def state_dict(self) -> dict:
        """The position (collective): consumed batches per domain and the domain sampler, whose window of
        per-rank losses is stored as its mean over ranks (what the next update reduces it to), so that the
        state resumes on any number of processes."""
        sampler = self.domain_sampler.state_dict()
        sampler["window_sum"] = all_reduce_mean(self.domain_sampler.window_sum.clone()).cpu()
        return {"consumed": list(self.consumed), "sampler": sampler}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = [int(c) for c in state["consumed"]]
        self.domain_sampler.load_state_dict(state["sampler"])
        self._iters = [None] * self.num_domains
        self.workers = self.allocate_workers()

    def close(self) -> None:
        self._iters = [None] * self.num_domains
