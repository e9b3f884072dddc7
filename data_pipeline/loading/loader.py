"""The training loader: per-set WebDataset streams, set-level scheduling, typed batches.

Data flow inside one DataLoader worker (``torch.utils.data`` workers, one process each)::

    shards of set s (fsspec URIs) ──frames split by (rank, worker)──► tar samples (tar_reader)
        ──seeded shuffle buffer──► decode_clip (JSON, JPEG header, run-length label maps only)
        ──key frame + reference frame──► collate into a Batch ──(augment plan drawn)──►
        ──``handoff_batches`` consecutive steps──► pack_batches: each batch's tensors written
        to a reused shared-memory segment, then the JPEGs of all decoded straight into them
        ──► yield the hand-off (one DataLoader item)

Batches leave the worker unpadded, with compact label maps (:mod:`data_pipeline.loading.structures`);
:func:`data_pipeline.loading.transforms.prepare_batch` resizes, flips and pads them on the training
device, or in the worker with ``augment_in_loader``.

Each rank takes exactly ``len(dataset)`` batches per epoch (:mod:`data_pipeline.loading.sampler`): the
per-set quota is ``frames // (world_size * batch_size)``, identical on every rank, so unequal
shard counts never make ranks disagree on the number of steps (the DDP hang of
shared/REFERENCE.md §4). Each global worker reads its own contiguous range of the epoch's
(shuffled) frames, as many as it makes key frames (:func:`~data_pipeline.loading.sampler.split_frames`):
no worker runs out and repeats frames while another leaves frames out. Output is
deterministic for a given (seed, epoch, world size, workers); the augmentation drawn for a
step does not depend on the workers.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.bdd100k import format as bdd100k

from data_pipeline import fsio
from data_pipeline.loading.decode import DecodedFrame, decode_clip, decode_frames, split_members
from data_pipeline.errors import DataError
from data_pipeline.loading.pseudo import PseudoShards, attach_pseudo, check_key, iter_pseudo_shard, join_pseudo
from data_pipeline.loading.sampler import (
    batches_per_rank,
    frames_needed,
    rng_for,
    set_schedule,
    split_frames,
)
from data_pipeline.shards.format import INSTANCE_MEMBER, LABEL_MEMBER
from data_pipeline.loading.shm_pool import BufferPool
from data_pipeline.loading.structures import TASK_INDEX, AugmentPlan, Batch, LabelSource
from data_pipeline.loading.transfer import PackedBatch, PackedBatches, decode_images, pack_batch, pack_batches
from data_pipeline.shards.tar_reader import TruncatedTarError, iter_samples
from data_pipeline.loading.transforms import prepare_batch
from data_pipeline.loading.config import LoaderConfig


@dataclass(frozen=True, kw_only=True)
class ShardFamily:
    """The shards of one image set and split, with the frame counts (from the manifest) that
    the quotas and each worker's part of the set are made from.

    ``shard_frames[i]`` is the number of frames in ``urls[i]``; ``shard_label_sets[i]`` counts
    them by the set of tasks they are labelled for (``{frozenset({"det", "tag", ...}): frames}``;
    needed only to require tasks, see :attr:`LoaderConfig.require_tasks`, and exact for any
    combination of them); ``shard_clip_frames[i]`` the frames of each of its samples and
    ``shard_sample_offsets[i]`` the byte where each begins (optional: with them, a worker whose
    part begins inside the shard starts reading there). ``root``: the shard root whose manifest
    lists them (needed to join pseudo-labels); ``pseudo``: the pseudo-label shards read alongside
    (:func:`data_pipeline.loading.pseudo.attach_pseudo`; set by :class:`MultiSetDataset` from
    :attr:`LoaderConfig.pseudo`).
    """

    set_name: str
    split: str
    urls: tuple[str, ...]
    shard_frames: tuple[int, ...]
    shard_label_sets: tuple[dict[frozenset[str], int], ...] = ()
    shard_clip_frames: tuple[tuple[int, ...], ...] = ()
    shard_sample_offsets: tuple[tuple[int, ...], ...] = ()
    root: str | None = None
    pseudo: PseudoShards | None = None

    def __post_init__(self):
        if len(self.shard_frames) != len(self.urls):
            raise ValueError(f"image set {self.set_name!r}: {len(self.urls)} shards, {len(self.shard_frames)} frame counts")
        if self.shard_label_sets and [sum(c.values()) for c in self.shard_label_sets] != list(self.shard_frames):
            raise ValueError(f"image set {self.set_name!r}: the frames counted by label set do not add up to the shards'")
        if self.shard_clip_frames and [sum(c) for c in self.shard_clip_frames] != list(self.shard_frames):
            raise ValueError(f"image set {self.set_name!r}: the samples' frame counts do not add up to the shards'")
        if self.shard_sample_offsets and [len(c) for c in self.shard_sample_offsets] != [len(c) for c in self.shard_clip_frames]:
            raise ValueError(f"image set {self.set_name!r}: sample offsets need the samples' frame counts, one per sample")
        if any(n < 0 for n in self.shard_frames):
            raise ValueError(f"image set {self.set_name!r}: negative frame count in {self.shard_frames}")
        if self.pseudo is not None and len(self.pseudo.urls) != len(self.urls):
            raise ValueError(f"image set {self.set_name!r}: {len(self.urls)} shards, {len(self.pseudo.urls)} pseudo shards")

    @property
    def frames(self) -> int:
        return sum(self.shard_frames)

    @property
    def task_frames(self) -> dict[str, int]:
        """Frames labelled for each task, over all shards."""
        out: dict[str, int] = {}
        for counts in self.shard_label_sets:
            for tasks, n in counts.items():
                for t in tasks:
                    out[t] = out.get(t, 0) + n
        return out

    def shard_eligible(self, require: tuple[str, ...]) -> tuple[int, ...]:
        """Frames of each shard usable as key frames: those labelled for every task in ``require``."""
        if not require:
            return self.shard_frames
        if not self.shard_label_sets:
            raise ValueError(f"image set {self.set_name!r}: requiring tasks {require} needs the shards' label sets")
        need = frozenset(require)
        return tuple(sum(n for tasks, n in counts.items() if need <= tasks) for counts in self.shard_label_sets)

    def eligible_frames(self, require: tuple[str, ...]) -> int:
        """Frames usable as key frames (see :meth:`shard_eligible`)."""
        return sum(self.shard_eligible(require))


def iter_shard(url: str, offset: int = 0) -> Iterator[dict]:
    """Raw grouped samples of one tar shard at any fsspec URI (bytes only, nothing decoded),
    from the sample that begins at byte ``offset`` on (see :attr:`ShardFamily.shard_sample_offsets`)."""
    with fsio.open_read(url) as f:
        if offset:
            f.seek(offset)
        yield from iter_samples(f, url, offset)


def iter_frames(urls: tuple[str, ...] | list[str]) -> Iterator[DecodedFrame]:
    """Every frame of the given shards once, in shard order, undecorated (evaluation, tools)."""
    for url in urls:
        for sample in iter_shard(url):
            yield from decode_clip(sample)


def _ref_index(rng: np.random.Generator, frames: list[DecodedFrame], k: int, ref_range: int) -> int | None:
    """A reference frame for key frame ``k``: another frame of the same clip within ±ref_range."""
    fi = frames[k].record.get("frame_index")
    if fi is None or len(frames) < 2:
        return None
    cands = [
        j for j, f in enumerate(frames)
        if j != k and f.record.get("frame_index") is not None and 0 < abs(f.record["frame_index"] - fi) <= ref_range
    ]
    return cands[int(rng.integers(len(cands)))] if cands else None


class MultiSetDataset(IterableDataset):
    """Yields :class:`Batch` objects in step order, in the training process or through any
    DataLoader (``batch_size=None``); :func:`build_train_loader` makes the fast one. Inside a
    DataLoader worker a batch travels packed into one shared-memory buffer
    (:class:`~data_pipeline.loading.transfer.PackedBatch`, received as a :class:`Batch`). The workers
    of :func:`build_train_loader`'s loader, which hands them a pool of reused segments
    (:attr:`buffer_pool`), pack ``handoff_batches`` batches together instead
    (:class:`~data_pipeline.loading.transfer.PackedBatches`, received as a list that loader unrolls).

    ``len(dataset)`` is the number of batches every rank takes per epoch. Call
    :meth:`set_epoch` before iterating each epoch (workers receive a copy of the dataset when
    iteration starts, so non-persistent workers see the new epoch).
    """

    def __init__(self, families: list[ShardFamily], cfg: LoaderConfig, *, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        if cfg.pseudo is not None:
            families = attach_pseudo(families, cfg.pseudo)
        self.families = {f.set_name: f for f in families}
        if len(self.families) != len(families):
            raise ValueError(f"duplicate image sets in {[f.set_name for f in families]}")
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        for s, f in self.families.items():
            if not f.urls:
                raise ValueError(f"image set {s!r} ({f.split}) has no shards")
        self.epoch = 0
        # build_train_loader's loader sets it while it starts an iteration's workers
        self.buffer_pool: BufferPool | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches_per_set(self) -> dict[str, int]:
        return {
            s: batches_per_rank(f.eligible_frames(self.cfg.require_tasks.get(s, ())), self.world_size, self.cfg.batch_size)
            for s, f in self.families.items()
        }

    def schedule(self) -> list[str]:
        return set_schedule(self.batches_per_set(), self.cfg.sampling, seed=self.cfg.seed, epoch=self.epoch)

    def __len__(self) -> int:
        return sum(self.batches_per_set().values())

    # -- inside a worker ---------------------------------------------------------------------

    def _frame_stream(self, fam: ShardFamily, gworker: int, needs: list[int]) -> Iterator[tuple[DecodedFrame, DecodedFrame | None]]:
        """Global worker ``gworker``'s (key frame, reference frame) pairs of ``fam``: its part of
        the set (:func:`~data_pipeline.loading.sampler.split_frames`, ``needs[g]`` key frames per global
        worker), shuffled."""
        cfg = self.cfg
        require = cfg.require_tasks.get(fam.set_name, ())
        rng = rng_for(cfg.seed, self.epoch, "frames", fam.set_name, gworker)
        part = split_frames(fam.shard_eligible(require), needs, gworker, seed=cfg.seed, epoch=self.epoch, set_name=fam.set_name)

        def emit(clip: dict, members: dict, where: str, keys: list[int]):
            frames = decode_frames(clip, members, where, compact=True)
            rng.shuffle(keys)
            if fam.set_name == "track":
                # A key frame without any neighbour is its own reference (zero motion); flow
                # and MOT pairs are then trivially consistent rather than missing.
                refs = [_ref_index(rng, frames, k, cfg.ref_range) for k in keys]
                pairs = [(k, k if r is None else r) for k, r in zip(keys, refs)]
            else:
                pairs = [(k, None) for k in keys]
            for f in frames:
                f.image.uses = 0
            for k, r in pairs:  # a frame used twice is decoded once (EncodedImage.uses)
                frames[k].image.uses += 1
                if r is not None:
                    frames[r].image.uses += 1
            for k, r in pairs:
                yield frames[k], (None if r is None else frames[r])

        tasks = None if cfg.tasks is None else frozenset(cfg.tasks)
        buffer: list[tuple] = []
        for shard, start, stop in part:
            for item in _shard_part(fam, shard, start, stop, require, tasks):
                buffer.append(item)
                if len(buffer) >= max(1, cfg.shuffle_buffer):
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield from emit(*buffer.pop())
        rng.shuffle(buffer)
        for item in buffer:
            yield from emit(*item)

    def augment_plans(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's augmentation draws, one row per step: image heights ``[steps]`` (-1: keep
        the size) and horizontal flips ``[steps, batch_size]``. One generator per (seed, epoch,
        rank), so the draws do not depend on how the steps are split over workers."""
        aug = self.cfg.augment
        rng = rng_for(self.cfg.seed, self.epoch, "augment", self.rank)
        scales = np.asarray(aug.scales, dtype=np.int64)
        heights = scales[rng.integers(len(scales), size=steps)] if len(scales) else np.full(steps, -1)
        return heights, rng.random((steps, self.cfg.batch_size)) < aug.flip_prob

    def _collate(self, set_name: str, items: list[tuple[DecodedFrame, DecodedFrame | None]], step: int,
                 height: int, flips: np.ndarray) -> Batch:
        cfg = self.cfg
        labels = np.full((len(items), len(bdd100k.TASKS)), int(LabelSource.ABSENT), dtype=np.int8)
        for row, (key, _) in zip(labels, items):
            for t, src in key.sources.items():
                row[TASK_INDEX[t]] = src
        has_ref = set_name == "track"  # every tracking key frame comes with a reference (_frame_stream)
        batch = Batch(
            set_name=set_name,
            images=[k.image for k, _ in items],
            image_sizes=[(int(k.image.shape[1]), int(k.image.shape[2])) for k, _ in items],
            targets=[k.targets for k, _ in items],
            labels=torch.from_numpy(labels),
            meta=[
                {
                    "name": k.record.get("name"),
                    "video": k.record.get("video"),
                    "frame_index": k.record.get("frame_index"),
                    "ref_frame_index": None if r is None else r.record.get("frame_index"),
                    "step": step,
                }
                for k, r in items
            ],
            ref_images=[r.image for _, r in items] if has_ref else None,
            ref_targets=[r.targets for _, r in items] if has_ref else None,
            augment=AugmentPlan(height=None if height < 0 else int(height), flips=tuple(flips.tolist())),
            size_divisor=cfg.size_divisor,
        )
        # frames are still JPEG here; they are decoded into the memory the batch leaves in
        return prepare_batch(decode_images(batch)) if cfg.augment_in_loader else batch

    def __iter__(self) -> Iterator[Batch | PackedBatch | PackedBatches | DataError]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
            keep_freed_memory()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        schedule = self.schedule()
        n = len(schedule)
        heights, flips = self.augment_plans(n)
        # the steps each worker of a rank makes, in groups (hand-offs, or all in one): every
        # worker of every rank computes them all, to know each one's part of the sets
        if info is None:
            worker_steps = [[range(n)]]
        elif self.buffer_pool is None:
            # a DataLoader other than build_train_loader's: one batch per item, as it expects
            # (in step order: it takes items from its workers in turn)
            worker_steps = [[range(w, n, nw)] for w in range(nw)]
        else:
            worker_steps = [list(handoff_steps(n, w, nw, self.cfg.handoff_batches)) for w in range(nw)]
        needs = frames_needed(schedule, worker_steps, self.world_size, self.cfg.batch_size)
        streams: dict[str, Iterator] = {}
        gworker = self.rank * nw + wid

        def batch(step: int) -> Batch:
            s = schedule[step]
            if s not in streams:
                streams[s] = self._frame_stream(self.families[s], gworker, needs[s])
            items = [next(streams[s], None) for _ in range(self.cfg.batch_size)]
            if None in items:  # split_frames gives every worker at least the frames it takes
                raise RuntimeError(f"worker {gworker}'s part of image set {s!r} ran out at step {step} (a bug)")
            return self._collate(s, items, step, int(heights[step]), flips[step])

        if info is None:
            for step in worker_steps[0][0]:
                yield decode_images(batch(step))
            return
        if self.buffer_pool is None:  # errors raised as usual
            for step in worker_steps[wid][0]:
                yield pack_batch(batch(step))
            return
        try:
            for steps in worker_steps[wid]:
                # Pack the batches (decoding their frames straight into shared memory, after the
                # hand-off's other work) here rather than when the queue's feeder thread pickles
                # the hand-off, where it would contend for the GIL.
                yield pack_batches([batch(step) for step in steps])
        except DataError as e:
            # The DataLoader would re-raise it in the training process as a RuntimeError holding
            # the worker's traceback as text; sent as an item, it is raised there as itself.
            yield e


def _shard_part(fam: ShardFamily, shard: int, start: int, stop: int, require: tuple[str, ...],
                tasks: frozenset[str] | None = None) -> Iterator[tuple]:
    """The samples of shard ``shard`` that hold its eligible frames ``start..stop - 1`` (counted
    from the shard's start, in order), as ``(clip, members, where, key frame indices)``; reading
    stops after the last. Reading starts at the sample that holds frame ``start`` where the
    shard's sample sizes and offsets are known; else, or with required tasks (which only a
    sample's record tells), the samples before are read but not decoded.

    With pseudo shards (``fam.pseudo``) the shard's pseudo shard is read in lockstep, sample for
    sample, and joined (:func:`~data_pipeline.loading.pseudo.join_pseudo`); then only the labels of
    ``tasks`` are kept (:func:`select_tasks`). Eligibility is decided by the real labels."""
    url = fam.urls[shard]
    pos = skip = 0  # eligible frames of this shard passed, samples not read
    if not require and fam.shard_sample_offsets:
        for n in fam.shard_clip_frames[shard]:
            if pos + n > start:
                break
            pos, skip = pos + n, skip + 1
    samples = iter_shard(url, fam.shard_sample_offsets[shard][skip] if skip else 0)
    pseudo = None
    if fam.pseudo is not None:
        pseudo = iter_pseudo_shard(fam.pseudo.urls[shard], fam.pseudo.sample_offsets[shard][skip] if skip else 0)
    try:
        for sample in _until_cut(samples, fam, shard):
            key = sample.get("__key__", "?")
            psample = None
            if pseudo is not None:
                psample = next(pseudo, None)
                if psample is None:
                    raise DataError(fam.pseudo.urls[shard], f"pseudo shard ends before sample {key!r} of image shard {url}")
                check_key(psample, key, url)
            clip, members = split_members(sample)
            keys = [k for k, rec in enumerate(clip["frames"]) if all(t in (rec.get("tasks") or {}) for t in require)]
            mine = [k for i, k in enumerate(keys) if start <= pos + i < stop]
            pos += len(keys)
            if mine:
                if psample is not None:
                    join_pseudo(clip, members, psample, image_key=key, image_url=url)
                if tasks is not None:
                    select_tasks(clip, members, tasks)
                yield clip, members, f"{url}:{key}", mine
            if pos >= stop:
                return  # before reading the next sample (the next worker's)
    finally:
        samples.close()  # closes the shard's file when stopping early
        if pseudo is not None:
            pseudo.close()
    if pos < stop:
        what = f"frames labelled for {' and '.join(map(repr, require))}" if require else "frames"
        raise DataError(url, f"truncated: {pos} of {fam.shard_eligible(require)[shard]} {what} (the shard ends after a "
                             "complete sample; or the manifest does not describe it: `vtd data inspect` checks)")


def _until_cut(samples: Iterator[dict], fam: ShardFamily, shard: int) -> Iterator[dict]:
    """``samples`` of shard ``shard``; a shard whose data ends inside a member is said as
    ``truncated: N of M frames``: the frames of the samples before the cut (from the manifest's
    sample offsets), of the shard's."""
    try:
        yield from samples
    except TruncatedTarError as e:
        if e.file != fam.urls[shard]:
            raise
        if fam.shard_sample_offsets:
            starts = fam.shard_sample_offsets[shard][1:]
            before = f"{sum(n for n, nxt in zip(fam.shard_clip_frames[shard], starts) if nxt <= e.at)} of "
        else:
            before = ""
        raise DataError(e.file, f"truncated: {before}{fam.shard_frames[shard]} frames (the data ends inside a member "
                                f"at byte {e.at})") from None


#: The tasks whose labels each label-map member carries.
_MEMBER_TASKS = {LABEL_MEMBER["sem"]: ("sem",), LABEL_MEMBER["drivable"]: ("drivable",),
                 LABEL_MEMBER["lane"]: ("lane",), INSTANCE_MEMBER: ("ins", "mots")}


def select_tasks(clip: dict, members: dict[int, dict[str, bytes]], tasks: frozenset[str]) -> None:
    """Keep only the labels of ``tasks`` in a clip (``clip``, ``members`` from
    :func:`~data_pipeline.loading.decode.split_members`), in place: every other task leaves each frame
    record's ``tasks`` as if unlabelled, and a label map that only such tasks use is dropped."""
    for i, rec in enumerate(clip["frames"]):
        rec["tasks"] = {t: v for t, v in (rec.get("tasks") or {}).items() if t in tasks}
        frame = members.get(i)
        if frame:
            for suffix in [m for m, used_by in _MEMBER_TASKS.items() if m in frame and tasks.isdisjoint(used_by)]:
                del frame[suffix]


def handoff_steps(steps: int, worker: int, workers: int, size: int) -> Iterator[range]:
    """The steps worker ``worker`` of ``workers`` makes, as hand-offs of consecutive steps.
    Hand-off ``j`` of the epoch goes to worker ``j % workers``: the first one of each worker is
    a single step (step ``j``, so that the epoch's first batches come as soon as one is made),
    the later ones ``size`` steps each. The DataLoader takes items from its workers in turn, so
    the training process receives the steps in order."""
    if worker < steps:
        yield range(worker, worker + 1)
    for first in range(workers + worker * size, steps, workers * size):
        yield range(first, min(first + size, steps))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_malloc_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (a DataLoader worker).

    By default glibc serves multi-megabyte blocks (a decoded 720p frame is 2.7 MB) with fresh
    ``mmap`` pages, or trims them off the heap when freed, so every frame the worker decodes
    faults its pages in anew: 100-250 page faults per frame, a large share of a JPEG decode on
    a virtualised host (benchmarks/RESULTS.md). With a 32 MiB mmap threshold and a 256 MiB trim
    threshold the worker reuses its own freed blocks instead; its memory stays bounded by its
    peak working set plus the trim threshold. Returns whether the settings took (``False``
    with a C library other than glibc, where nothing changes). Idempotent.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            _malloc_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _malloc_tuned = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1
    return _malloc_tuned


class _TrainLoader(DataLoader):
    """A DataLoader over a :class:`MultiSetDataset` that yields batches one by one, in step
    order, while its workers hand them over ``handoff_batches`` at a time. The workers reuse
    shared-memory segments for them: every iteration (new, non-persistent workers) gets a new
    :class:`~data_pipeline.loading.shm_pool.BufferPool`, created here before its workers start."""

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            return super().__iter__()
        # in flight per worker: the hand-offs it was asked for (the prefetched ones, one of them
        # in the making), the one the training process is taking batches from, and the batches
        # the training process still holds (the previous one, one in the pin-memory thread)
        k = self.dataset.cfg.handoff_batches
        pool = self.dataset.buffer_pool = BufferPool(self.num_workers, (self.prefetch_factor + 1) * k + 3)
        try:
            items = super().__iter__()  # starts the workers, each with a copy of the dataset
        finally:
            self.dataset.buffer_pool = None  # the workers have theirs; any other loader gets none
        return _Handoffs(items, pool, len(self))


class _Handoffs:
    """The batches of a multi-process DataLoader iterator whose items are lists of batches,
    one by one. Keeps the iteration's :class:`BufferPool` (the training process's side of the
    shared-memory segments) as long as the iterator, and no batch longer than it is queued."""

    def __init__(self, items: Iterator[list[Batch]], pool: BufferPool, batches: int) -> None:
        self._items, self._len = items, batches
        self.buffer_pool = pool
        self._ready: deque[Batch] = deque()

    def __iter__(self) -> _Handoffs:
        return self

    def __next__(self) -> Batch:
        while not self._ready:
            item = next(self._items)  # StopIteration ends the epoch
            if isinstance(item, DataError):  # a worker met bad data (MultiSetDataset.__iter__)
                raise item
            self._ready.extend(item)
        return self._ready.popleft()

    def __len__(self) -> int:
        return self._len


def build_train_loader(dataset: MultiSetDataset) -> DataLoader:
    """A DataLoader over ``dataset`` (call ``dataset.set_epoch(e)`` before each epoch)."""
    cfg = dataset.cfg
    kw = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
    return _TrainLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        persistent_workers=False,
        **kw,
    )


__all__ = [
    "LabelSource",
    "LoaderConfig",
    "MultiSetDataset",
    "ShardFamily",
    "build_train_loader",
    "handoff_steps",
    "iter_frames",
    "iter_shard",
    "select_tasks",
]
