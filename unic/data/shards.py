"""WebDataset tar shards for training at cluster scale: writing them from any trainable layout, and reading
them as exact, resumable batches of the trainer (``data.dataset=wds``).

**On disk.** A folder with ``index.json`` and standard webdataset tars (``webdataset.WebDataset`` reads them):
each sample is ``<key>.cls`` (its first class id, ASCII), ``<key>.json`` (``{"labels", "domain", "path",
"index"}``) and ``<key>.<ext>``, the original encoded image bytes (``jpg``, ``png``, ... as the source file;
never re-encoded). The index lists the shards with their sample counts per domain, the domain and class tables,
the class counts and the source (layout, root, split), so a reader knows the data set without opening a tar.

**Data order.** A *stream* (the whole train set, or one domain for UDON) is read in *passes* (epochs): pass
``p`` permutes the shards (seeded by the stream's key and ``p``) and shuffles each shard's samples with a
shuffle buffer of ``shuffle_buffer`` samples seeded by (key, p, shard), the shard read sequentially; the
concatenation gives every sample a *position* in the pass. With ``S = N // global_batch`` steps per pass, rank
``r`` owns the positions ``[r S b, (r + 1) S b)`` (``b`` = per-rank batch), cut into ``W`` contiguous *slots*
(``W = streams``, by default ``max(1, num_workers)``): slot ``w`` produces this rank's batches ``s`` with
``s % W == w``, in order. So an epoch is exactly ``S`` steps, each rank yields exactly ``S b`` samples, every
sample is used at most once and the last ``N - S * global_batch`` positions (the end of the last shards of the
permutation, different ones every pass) are left out, as the folder loader drops its remainder. A slot starting
in the middle of a shard reads that shard from its start (without decoding what it skips), so keep the shards
well above ranks x streams. The augmentation of position ``p`` is seeded by (key, p) as in
:class:`unic.data.sampling.GlobalBatchSampler`.

**Exact resume.** Step ``s`` is at a position computed from (seed, world, streams, s) and the index's counts
alone, so ``start(s)`` goes straight there. The order depends on the world size and ``streams``, not on the
number of worker processes actually started (each process plays whole slots: the largest divisor of ``W`` that
the machine allows), so a resume on another machine is exact; a resume with another world size or ``streams``
follows the new layout from that step on (the interrupted epoch may then repeat or miss some samples).

**Broken images.** As :class:`unic.data.folders.ImageListDataset`: an image that does not decode is replaced
by the next readable image of the same domain (later in the pass, wrapping, at most ``MAX_REPLACEMENTS``
candidates), the item carries ``skipped`` and ``bad`` (one line per broken file: shard, key, source path,
reason), each bad file is logged once per process, and the stream positions do not move (a resume is exact).
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unic.data.folders import IMG_EXTENSIONS, MAX_REPLACEMENTS, BadImageError, to_rgb
from unic.data.sampling import _SEED_MULT
from unic.train.batches import DomainBatches

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "unic-webdataset"
INDEX_VERSION = 1
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
DEFAULT_SHUFFLE_BUFFER = 1000  # samples held per slot while reading (webdataset's usual shuffle(1000))
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot
_TAR_BLOCK, _TAR_RECORD = 512, 10240


class ShardFormatError(ValueError):
    """A shard folder, index or tar that is not what the writer makes (or disagrees with its index)."""


# ------------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes to RGB exactly as :func:`unic.data.folders.load_image` decodes a file
    (:func:`unic.data.folders.to_rgb`); any problem is a BadImageError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except Exception as err:  # noqa: BLE001 - hostile bytes raise anything from OSError to SyntaxError
        raise BadImageError(f"{name}: {type(err).__name__}: {err}") from None


# ------------------------------------------------------------------------------------------------ writing
def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_bytes(member_sizes: int) -> int:
    """Size of a tar holding members of ``member_sizes`` total (headers and padding included)."""
    return -(-(member_sizes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def plan_shards(sample_bytes: Sequence[int], max_count: int, max_size: float | None) -> list[range]:
    """Consecutive groups of samples (ranges of positions in the given order): at most ``max_count`` samples
    and ``max_size`` bytes of tar each (a single larger sample gets a shard of its own)."""
    groups, start, total = [], 0, 0
    for i, size in enumerate(sample_bytes):
        count = i - start
        if count and (count >= max_count or (max_size is not None and _tar_bytes(total + size) > max_size)):
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sample_bytes):
        groups.append(range(start, len(sample_bytes)))
    return groups


def _read_source(path: str) -> tuple[bytes, str | None]:
    """The file's bytes, or (b"", why) when it cannot be read (kept as a broken image, like the folder path)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError("not a regular file")
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as err:
        return b"", f"{type(err).__name__}: {err}"


def _write_shard(job: tuple[str, list[tuple[str, str, str, int, bytes, int]], int]) -> dict:
    """Write one shard atomically; ``job`` = (tar path, [(key, image path, ext, label, json bytes, domain)],
    number of domains). Returns its index entry (without the url)."""
    from webdataset import TarWriter

    from unic.io import atomic_write

    path, members, num_domains = job
    domain_counts, unreadable = [0] * num_domains, []

    def write(f) -> None:
        # an integer mtime: a float one makes tarfile add a pax header to every member (slower to read)
        writer = TarWriter(f, encoder=False, mtime=0, user="unic", group="unic")
        try:
            for key, image_path, ext, label, meta, domain in members:
                data, why = _read_source(image_path)
                if why is not None:
                    unreadable.append(f"{image_path}: {why}")
                writer.write({"__key__": key, "cls": str(label).encode(), "json": meta, ext: data})
                domain_counts[domain] += 1
        finally:
            writer.close()

    atomic_write(path, write)
    return {"count": len(members), "bytes": os.path.getsize(path), "domain_counts": domain_counts,
            "unreadable": unreadable}


def write_shards(samples: Sequence[tuple[str, Sequence[int], int]], domain_names: Sequence[str], out_dir: str, *,
                 classes: Sequence[str] | None = None, source: dict | None = None, prefix: str = "shard",
                 max_count: int = 10_000, max_size: float | None = 1e9, shuffle: bool = True, seed: int = 0,
                 group_by_domain: bool = False, num_workers: int = 0, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Write ``samples`` ((image path, class ids, domain id), e.g. an ImageListDataset's) as webdataset tar
    shards in ``out_dir`` and its ``index.json``; returns the index.

    The key of a sample is its position in ``samples`` (zero-padded). ``shuffle``: the samples are spread over
    the shards in a random order seeded by ``seed`` (a batch then mixes classes even though a reader only
    shuffles within a shard); ``group_by_domain``: shards hold one domain each (what UDON's per-domain
    streams read best). Each shard and the index are written atomically (the index last, so a folder with an
    index is complete); ``num_workers`` processes write shards in parallel. An unreadable source file is kept as
    a sample with empty image bytes (the reader then skips it as a broken image) and listed in the index.
    """
    from tqdm import tqdm

    from unic.io import write_json

    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if not samples:
        raise ValueError("no sample to write")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    index_path = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(index_path) and not overwrite:
        raise FileExistsError(f"{index_path} exists: pick another output folder or overwrite it")
    os.makedirs(out_dir, exist_ok=True)
    order = list(range(len(samples)))
    if shuffle:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    if group_by_domain:
        order.sort(key=lambda i: samples[i][2])  # stable: the shuffled order within each domain
    width = max(8, len(str(len(samples) - 1)))
    root = os.path.realpath(source["root"]) if source and source.get("root") else None
    entries = []
    for i in order:
        path, labels, domain = samples[i]
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in IMAGE_EXTS:
            raise ValueError(f"{path}: not an image file name ({', '.join(IMAGE_EXTS)})")
        rel = os.path.relpath(os.path.realpath(path), root) if root else path
        meta = json.dumps({"labels": [int(c) for c in labels], "domain": domain_names[domain], "path": rel,
                           "index": i}).encode()
        entries.append((f"{i:0{width}d}", path, ext, int(labels[0]), meta, int(domain)))
    if max_size is not None:
        sizes = [_member_bytes(os.stat(p).st_size if os.path.exists(p) else 0) + _member_bytes(len(meta))
                 + _member_bytes(len(str(label))) for _, p, _, label, meta, _ in
                 tqdm(entries, desc="sizes", unit="img", disable=not progress, leave=False)]
    else:
        sizes = [0] * len(entries)
    groups = []
    domains_of = [e[5] for e in entries]
    start = 0
    for stop in range(1, len(entries) + 1):  # one run per domain when grouping, else one run
        if stop == len(entries) or (group_by_domain and domains_of[stop] != domains_of[start]):
            groups += [range(start + g.start, start + g.stop) for g in plan_shards(sizes[start:stop], max_count, max_size)]
            start = stop
    names = [f"{prefix}-{k:06d}.tar" for k in range(len(groups))]
    jobs = [(os.path.join(out_dir, name), [entries[j] for j in group], len(domain_names))
            for name, group in zip(names, groups)]
    results: list[dict | None] = [None] * len(jobs)
    pool = None
    if num_workers > 0 and len(jobs) > 1:  # started before the progress bar's thread; fork: no re-import
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(num_workers)
    bar = tqdm(total=len(entries), desc=f"shards -> {out_dir}", unit="img", disable=not progress)
    try:
        done = pool.imap_unordered(_write_indexed, list(enumerate(jobs))) if pool is not None else \
            ((k, _write_shard(job)) for k, job in enumerate(jobs))
        for k, result in done:
            results[k] = result
            bar.update(result["count"])
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    unreadable = [line for r in results for line in r.pop("unreadable")]
    for line in unreadable[:10]:
        logger.warning("unreadable source image kept as a broken sample: %s", line)
    if len(unreadable) > 10:
        logger.warning("%d unreadable source images in all (listed in %s)", len(unreadable), index_path)
    class_counts: list[dict[int, int]] = [{} for _ in domain_names]
    for _, labels, domain in samples:
        counts = class_counts[domain]
        counts[int(labels[0])] = counts.get(int(labels[0]), 0) + 1
    index = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "num_samples": len(samples),
        "layout": (source or {}).get("layout"), "root": (source or {}).get("root"),
        "split": (source or {}).get("split"),
        "domains": list(domain_names), "classes": list(classes) if classes is not None else None,
        "class_counts": [sorted(c.items()) for c in class_counts],
        "shards": [{"url": name, **result} for name, result in zip(names, results)],
        "shuffled": shuffle, "seed": seed, "group_by_domain": group_by_domain, "max_count": max_count,
        "max_size": max_size, "unreadable": unreadable,
    }
    if overwrite:  # shards of an earlier write that the new index does not list
        for name in os.listdir(out_dir):
            if name.startswith(f"{prefix}-") and name.endswith(".tar") and name not in set(names):
                os.remove(os.path.join(out_dir, name))
    write_json(index_path, index)
    return index


def _write_indexed(item: tuple[int, tuple]) -> tuple[int, dict]:
    k, job = item
    return k, _write_shard(job)


# ------------------------------------------------------------------------------------------------ the shard set
@dataclass(frozen=True)
class Shard:
    index: int  # position in the index's shard list (seeds its within-shard shuffle)
    path: str
    count: int  # samples of the selected domains (of the stream's domain, for a domain stream)
    pure: bool  # every sample of the tar counts (no domain to filter out: the JSON need not be read to skip)


class ShardSet:
    """The shards of an index and a selection of its domains: what the trainer reads as its train set.

    Like :class:`unic.data.folders.ImageListDataset` it has ``len``, ``domain_names`` (the selection, whose
    order gives the domain ids), ``classes`` and ``samples``: ``(SHARD_PATH, [class id], domain id)`` per
    sample, synthesised from the index's class counts (grouped by domain and class, no file path: they serve
    the label tables, class counts and domain sizes, not loading). ``transform`` is the train transform.
    """

    def __init__(self, root: str, domains: Sequence[str] | None = None, transform: Callable | None = None):
        root = os.path.abspath(os.path.expanduser(root))
        index_path = root if os.path.isfile(root) else os.path.join(root, INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no shard index {index_path} (write one with scripts/write_shards.py)")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except json.JSONDecodeError as err:
            raise ShardFormatError(f"{index_path} is not valid JSON: {err}") from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ShardFormatError(f"{index_path} is not a shard index written by scripts/write_shards.py")
        if index.get("version") != INDEX_VERSION:
            raise ShardFormatError(f"{index_path}: index version {index.get('version')}, this reader reads "
                                   f"version {INDEX_VERSION}")
        self.index, self.index_path, self.root = index, index_path, os.path.dirname(index_path)
        self.all_domains = list(index["domains"])
        names = list(domains) if domains else list(self.all_domains)
        unknown = [d for d in names if d not in self.all_domains]
        if unknown:
            raise ValueError(f"{index_path} has no domain {unknown} (domains: {self.all_domains})")
        self.domain_names = names
        # index domain id -> selected domain id
        self.domain_ids = {self.all_domains.index(name): d for d, name in enumerate(names)}
        self.name_to_id = {name: d for d, name in enumerate(names)}
        self.classes = index.get("classes")
        self.transform = transform
        self.layout, self.source_root, self.split = index.get("layout"), index.get("root"), index.get("split")
        self.shard_paths = [os.path.join(self.root, s["url"]) for s in index["shards"]]
        missing = [p for p in self.shard_paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {index_path} not found, e.g. {missing[0]}")
        self.domain_sizes = [sum(s["domain_counts"][i] for s in index["shards"]) for i in
                             (self.all_domains.index(n) for n in names)]
        self._samples: list | None = None

    def __getstate__(self) -> dict:  # worker processes started with spawn need not carry the label list
        return {**self.__dict__, "_samples": None}

    def __len__(self) -> int:
        return sum(self.domain_sizes)

    def shards(self, domain: int | None = None) -> list[Shard]:
        """The non-empty shards of the selection (``domain``: of that selected domain only)."""
        wanted = list(self.domain_ids.items()) if domain is None else \
            [(i, d) for i, d in self.domain_ids.items() if d == domain]
        out = []
        for k, (entry, path) in enumerate(zip(self.index["shards"], self.shard_paths)):
            count = sum(entry["domain_counts"][i] for i, _ in wanted)
            if count:
                out.append(Shard(k, path, count, count == entry["count"]))
        return out

    @property
    def samples(self) -> list[tuple[str, list[int], int]]:
        if self._samples is None:
            samples = []
            for name, d in self.name_to_id.items():
                for cls, count in self.index["class_counts"][self.all_domains.index(name)]:
                    samples += [(self.index_path, [int(cls)], d)] * int(count)
            self._samples = samples
        return self._samples

    def labels(self) -> list[list[int]]:
        return [labels for _, labels, _ in self.samples]

    def __repr__(self) -> str:
        return (f"ShardSet({self.root}, {len(self)} samples, {len(self.shard_paths)} shards, "
                f"domains={self.domain_names})")


def open_shards(root: str, domains: Sequence[str] | None = None, transform: Callable | None = None) -> ShardSet:
    """The shard set in ``root`` (the folder of ``index.json``, or the file), restricted to ``domains``."""
    return ShardSet(root, domains, transform)


def source_dataset(shards: ShardSet, split: str | None = None, transform: Callable | None = None):
    """The folder data set the shards were written from (``split``: another split of the same source, e.g.
    val), with the shards' domain selection and ids; FileNotFoundError when the source is not on this machine."""
    root, layout = shards.source_root, shards.layout
    split = split or shards.split
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"the source folder of {shards.index_path} ({root}) is not available")
    if layout == "uned":
        from unic.data.uned import uned_dataset

        return uned_dataset(root, split, shards.domain_names, transform)
    if layout == "csv":
        from unic.data.csv_list import csv_dataset

        return csv_dataset(root, split, shards.domain_names, transform)
    if layout == "imagenet":
        from unic.data.folders import image_folder_dataset

        return image_folder_dataset(os.path.join(root, split), transform)
    raise FileNotFoundError(f"{shards.index_path} does not say its source layout ({layout!r})")


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class RawSample:
    key: str
    where: str  # shard path and key, for messages
    index: int  # the sample's position in the written list (its key), -1 when unknown
    label: int
    domain: int  # selected domain id
    path: str  # source path (messages)
    image: bytes | None
    ext: str | None


def buffer_order(n: int, buffer: int, generator: torch.Generator) -> list[int]:
    """The order in which a shuffle buffer of ``buffer`` samples emits a stream of ``n`` (webdataset's
    ``shuffle`` stage, computed without the data): fill the buffer, then each new sample takes the place of a
    uniformly drawn buffered one, which is emitted; the rest comes out in random order at the end. A reader
    that reads sequentially and emits in this order holds at most ``buffer`` samples."""
    if buffer <= 1:
        return list(range(n))
    fill = min(n, buffer)
    slots = list(range(fill))
    out = []
    if n > fill:
        for i, j in zip(range(fill, n), torch.randint(fill, (n - fill,), generator=generator).tolist()):
            out.append(slots[j])
            slots[j] = i
    out += [slots[k] for k in torch.randperm(fill, generator=generator).tolist()]
    return out


def _generator(key: int) -> torch.Generator:
    return torch.Generator().manual_seed(key % (2**63))


class _ShardReader:
    """Samples of one tar in file order, of the wanted domains only; image bytes read only when asked for."""

    def __init__(self, shard: Shard, domain_of: Callable[[str | None], int | None], name_to_default: int | None):
        self.shard, self.domain_of, self.default_domain = shard, domain_of, name_to_default

    def groups(self, tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
        key, members = None, {}
        for member in tar:  # headers only: tarfile seeks over the data
            if not member.isfile():
                continue
            match = _KEY.match(member.name)
            if not match:
                continue
            if match.group(1) != key:
                if members:
                    yield key, members
                key, members = match.group(1), {}
            members[match.group(2).lower()] = member
        if members:
            yield key, members

    def samples(self, want: Callable[[int], bool]) -> Iterator[tuple[int, RawSample | None]]:
        """(i, sample) for the i-th sample of the wanted domains; the sample is None unless ``want(i)``."""
        path = self.shard.path
        i = 0
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for key, members in self.groups(tar):
                    if self.shard.pure and not want(i):  # a skipped sample: nothing to read
                        yield i, None
                        i += 1
                        continue
                    meta = {}
                    if "json" in members:
                        meta = json.loads(tar.extractfile(members["json"]).read())
                    domain = self.domain_of(meta.get("domain")) if meta.get("domain") is not None \
                        else self.default_domain
                    if domain is None:
                        continue
                    if want(i):
                        if "cls" in members:
                            label = int(tar.extractfile(members["cls"]).read().decode().strip())
                        else:
                            label = int((meta.get("labels") or [meta.get("label", -1)])[0])
                        ext = next((e for e in members if e in IMAGE_EXTS), None)
                        image = tar.extractfile(members[ext]).read() if ext else None
                        index = meta.get("index", int(key) if key.isdigit() else -1)
                        yield i, RawSample(key, f"{path}:{key}", int(index), label, domain,
                                           str(meta.get("path", "")), image, ext)
                    else:
                        yield i, None
                    i += 1
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            raise ShardFormatError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
        if i != self.shard.count:
            raise ShardFormatError(f"{path} holds {i} samples of the selected domains, its index entry says "
                                   f"{self.shard.count}: rewrite the shards")


class StreamPass:
    """Pass ``p`` of a stream: the shard permutation, the positions of the concatenation and, per shard, the
    shuffle-buffer order; :meth:`iterate` reads the samples from any position on, wrapping at the end."""

    def __init__(self, shards: list[Shard], key: int, buffer: int, domain_of: Callable, default_domain: int | None):
        perm = torch.randperm(len(shards), generator=_generator(key)).tolist()
        self.order = [shards[i] for i in perm]
        self.starts = [0]
        for shard in self.order:
            self.starts.append(self.starts[-1] + shard.count)
        self.num_samples = self.starts[-1]
        self.key, self.buffer = key, buffer
        self.domain_of, self.default_domain = domain_of, default_domain

    def sample_seed(self, position: int) -> int:
        return (self.key * (self.num_samples + 1) + position) % (2**63)

    def _read(self, k: int, start: int) -> Iterator[RawSample]:
        shard = self.order[k]
        order = buffer_order(shard.count, self.buffer, _generator(self.key * _SEED_MULT + shard.index))
        wanted = set(order[start:])
        held: dict[int, RawSample] = {}
        reader = _ShardReader(shard, self.domain_of, self.default_domain).samples(wanted.__contains__)
        for target in order[start:]:
            while target not in held:
                try:
                    i, sample = next(reader)
                except StopIteration:
                    raise ShardFormatError(f"{shard.path} ended before its sample {target} (index count "
                                           f"{shard.count})") from None
                if sample is not None:
                    held[i] = sample
            yield held.pop(target)
        reader.close()

    def iterate(self, position: int) -> Iterator[tuple[int, RawSample]]:
        """(position, sample) from ``position`` on, endlessly (after the last position comes the first)."""
        position %= self.num_samples
        k = bisect.bisect_right(self.starts, position) - 1
        local = position - self.starts[k]
        while True:
            for sample in self._read(k, local):
                yield position, sample
                position += 1
            k, local = k + 1, 0
            if k == len(self.order):
                k, position = 0, 0


@dataclass(frozen=True)
class StreamLayout:
    """Which positions of a pass rank ``rank``'s slots read: the arithmetic of the module docstring."""

    num_samples: int
    global_batch: int
    rank: int
    world: int
    streams: int

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    @property
    def steps_per_pass(self) -> int:
        return self.num_samples // self.global_batch

    def slot_batches(self, slot: int) -> int:
        """Batches of slot ``slot`` in a pass (the steps s with s % streams == slot)."""
        return max(0, -(-(self.steps_per_pass - slot) // self.streams))

    def position(self, step: int) -> int:
        """First position of this rank's batch ``step`` (in the pass)."""
        slot, nth = step % self.streams, step // self.streams
        before = sum(self.slot_batches(w) for w in range(slot))
        return (self.rank * self.steps_per_pass + before + nth) * self.local_batch


class ShardStream(IterableDataset):
    """This rank's samples of a stream, endlessly, from its batch ``start_batch`` on (counted over passes):
    worker process ``i`` of ``n`` yields the batches ``start_batch + i + k n`` (complete batches, in order), so
    a DataLoader with ``batch_size = local batch`` hands them out in step order. ``n`` must divide ``streams``
    (each process then reads whole slots, sequentially)."""

    def __init__(self, shard_set: ShardSet, layout: StreamLayout, key_base: int, start_batch: int,
                 shuffle_buffer: int, domain: int | None = None):
        self.shard_set, self.layout, self.key_base = shard_set, layout, key_base  # pass p: key_base * M + p
        self.start_batch, self.shuffle_buffer, self.domain = start_batch, shuffle_buffer, domain
        self.transform = shard_set.transform
        self._reported: set[str] = set()

    def _domain_of(self, name: str | None) -> int | None:
        d = self.shard_set.name_to_id.get(name)
        return d if self.domain is None or d == self.domain else None

    def make_pass(self, p: int) -> StreamPass:
        shards = self.shard_set.shards(self.domain)
        default = None
        if len(self.shard_set.all_domains) == 1 and self.shard_set.name_to_id:  # foreign shards without json
            default = self._domain_of(self.shard_set.all_domains[0])
        return StreamPass(shards, self.key_base * _SEED_MULT + p, self.shuffle_buffer, self._domain_of, default)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        layout = self.layout
        if layout.streams % workers:
            raise ValueError(f"{workers} worker processes do not divide {layout.streams} streams")
        steps, b = layout.steps_per_pass, layout.local_batch
        current, readers = None, {}
        batch = self.start_batch + worker
        while True:
            p, step = divmod(batch, steps)
            if current is None or current[0] != p:
                current, readers = (p, self.make_pass(p)), {}
            pass_ = current[1]
            slot = step % layout.streams
            first = layout.position(step)
            if slot not in readers or readers[slot][0] != first:
                readers[slot] = [first, pass_.iterate(first)]
            reader = readers[slot]
            for _ in range(b):
                position, raw = next(reader[1])
                yield self.item(pass_, position, raw)
            reader[0] = first + b
            batch += workers

    def _decode(self, raw: RawSample) -> Image.Image:
        name = raw.where + (f".{raw.ext}" if raw.ext else "") + (f" [{raw.path}]" if raw.path else "")
        if raw.image is None:
            raise BadImageError(f"{name}: no image member")
        return decode_image(raw.image, name)

    def item(self, pass_: StreamPass, position: int, raw: RawSample) -> dict:
        """The batch item of ``position``: decoded (or replaced), transformed with the position's seed."""
        bad, sample, skipped = [], raw, 0
        candidates = None
        while True:
            try:
                img = self._decode(sample)
                break
            except BadImageError as err:
                bad.append(str(err))
                if sample.where not in self._reported:
                    self._reported.add(sample.where)
                    logger.warning("skipping unreadable image %s", err)
            skipped += 1
            if skipped >= MAX_REPLACEMENTS:
                raise BadImageError(f"{MAX_REPLACEMENTS} consecutive unreadable images of domain "
                                    f"{raw.domain} from {raw.where}")
            if candidates is None:  # the next samples of the same domain, in pass order, wrapping
                candidates = (s for _, s in _take(pass_.iterate(position + 1), pass_.num_samples - 1)
                              if s.domain == raw.domain)
            sample = next(candidates, None)
            if sample is None:
                raise BadImageError(f"no readable image of domain {raw.domain} to replace {raw.where}")
        seed = pass_.sample_seed(position)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator's state of torch.manual_seed(seed), without its accelerator seeding
                # (which records a stack trace per call: about 1 ms an image)
                torch.default_generator.manual_seed(seed)
                img = self.transform(img)
        return {"image": img, "label": sample.label, "domain": sample.domain, "index": raw.index,
                "skipped": skipped, "bad": "\n".join(bad), "seed": seed}


def _take(iterator: Iterator, n: int) -> Iterator:
    for _, item in zip(range(n), iterator):
        yield item


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (0 when limit < 1)."""
    return max((d for d in range(1, min(n, limit) + 1) if n % d == 0), default=0)


def _loader(stream: ShardStream, processes: int, pin: bool, timeout_s: float) -> DataLoader:
    from unic.distributed import ignore_interrupts
    from unic.train.batches import collate_items

    return DataLoader(stream, batch_size=stream.layout.local_batch, num_workers=processes, pin_memory=pin,
                      collate_fn=collate_items, generator=torch.Generator(), persistent_workers=False, worker_init_fn=ignore_interrupts,
                      timeout=timeout_s if processes > 0 else 0)


class ShardBatches:
    """Global batches of a shard set, epoch after epoch, as :class:`unic.train.batches.EpochBatches`: the
    position is the global step (``start(step)`` goes there directly), ``next() -> (None, batch)``."""

    def __init__(self, shard_set: ShardSet, global_batch: int, rank: int, world: int, seed: int, num_workers: int,
                 pin: bool = False, timeout_s: float = 0.0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 streams: int | None = None, processes: int | None = None):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if len(shard_set) < global_batch:
            raise ValueError(f"the shard set has {len(shard_set)} samples, fewer than one global batch ({global_batch})")
        self.shard_set, self.seed = shard_set, seed
        self.streams = streams or max(1, num_workers)
        self.layout = StreamLayout(len(shard_set), global_batch, rank, world, self.streams)
        self.steps_per_epoch = self.layout.steps_per_pass
        self.shuffle_buffer, self.pin, self.timeout_s = shuffle_buffer, pin, timeout_s
        if processes is None:
            from unic.distributed import worker_count

            processes = worker_count(num_workers)
        self.processes = _divisor_at_most(self.streams, processes)
        self.step, self._iter = 0, None

    def start(self, step: int) -> None:
        self.step, self._iter = step, None

    def next(self) -> tuple[None, dict]:
        if self._iter is None:
            # epoch e is keyed seed * M + e, as GlobalBatchSampler's
            stream = ShardStream(self.shard_set, self.layout, self.seed, self.step, self.shuffle_buffer)
            self._iter = iter(_loader(stream, self.processes, self.pin, self.timeout_s))
        batch = next(self._iter)
        self.step += 1
        return None, batch

    def state_dict(self) -> dict:
        """The data layout the positions were computed for (the position itself is the global step)."""
        return {"world": self.layout.world, "streams": self.streams}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("world"), state.get("streams"))
        if saved != (None, None) and saved != (self.layout.world, self.streams):
            logger.warning("resuming shard data written for world %s x %s streams with world %d x %d streams: "
                           "the order follows the new layout from here (this epoch may repeat or miss samples)",
                           *saved, self.layout.world, self.streams)

    def close(self) -> None:
        self._iter = None


def shard_batches(shard_set: ShardSet, global_batch: int, rank: int, world: int, seed: int, num_workers: int,
                  pin: bool = False, timeout_s: float = 0.0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  domain_sampler: Any = None) -> ShardBatches | DomainShardBatches:
    """The trainer's batch source over ``shard_set``: epochs of global batches, or (``domain_sampler`` given,
    UDON) one domain per step, each domain its own resumable stream of shards."""
    if domain_sampler is None:
        return ShardBatches(shard_set, global_batch, rank, world, seed, num_workers, pin, timeout_s, shuffle_buffer)
    return DomainShardBatches(shard_set, global_batch, rank, world, seed, domain_sampler, num_workers, pin,
                              timeout_s, shuffle_buffer)


class DomainShardBatches(DomainBatches):
    """UDON's one domain per step (:class:`unic.train.batches.DomainBatches`: same domain sampler, counters
    and state) with each domain an endless stream of its shards: pass ``p`` of domain ``d`` is keyed as
    :class:`unic.data.sampling.DomainBatchSampler`'s, and reads only that domain's samples (write the shards
    ``--group_by_domain`` so that a domain's stream opens only its own shards)."""

    def __init__(self, shard_set: ShardSet, global_batch: int, rank: int, world: int, seed: int, domain_sampler,
                 num_workers: int, pin: bool = False, timeout_s: float = 0.0,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, streams: int | None = None):
        for name, size in zip(shard_set.domain_names, shard_set.domain_sizes):
            if size < global_batch:
                raise ValueError(f"domain '{name}' has {size} samples, fewer than one global batch ({global_batch})")
        super().__init__(shard_set, global_batch, rank, world, seed, domain_sampler, num_workers, pin, timeout_s)
        self.shard_set, self.shuffle_buffer = shard_set, shuffle_buffer
        self.streams = streams or max(1, num_workers)
        self.layouts = [StreamLayout(size, global_batch, rank, world, self.streams) for size in shard_set.domain_sizes]

    def _stream(self, domain: int):
        if self._iters[domain] is None:
            from unic.distributed import worker_count

            # pass p of domain d is keyed (seed * M + d) * M + p, as DomainBatchSampler's
            stream = ShardStream(self.shard_set, self.layouts[domain], self.seed * _SEED_MULT + domain,
                                 self.consumed[domain], self.shuffle_buffer, domain)
            processes = _divisor_at_most(self.streams, worker_count(self.workers[domain]))
            self._iters[domain] = iter(_loader(stream, processes, self.pin, self.timeout_s))
        return self._iters[domain]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "streams": self.streams}
