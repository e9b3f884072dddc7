"""Shared-memory segments that DataLoader workers reuse for the batches they hand over.

A worker sends each batch to the training process as one shared-memory buffer
(:func:`data_pipeline.loading.transfer.pack_batch`). Two costs would otherwise dominate the hand-off
on a busy host (benchmarks/RESULTS.md):

* a fresh segment per batch faults in a page per 4 KiB on first write, in the worker, and again
  in the training process when it reads the batch: 7 ms for a det batch's 5.3 MiB on the
  project's VM, more than a JPEG decode per frame, while copying into a segment already faulted
  in costs 0.3 ms;
* sending a segment means sending its file descriptor, a round trip through a listener thread
  of the worker (``multiprocessing.resource_sharer``) and an ``mmap`` in the training process.

So each worker keeps a few segments, the training process maps each of them once, and a batch
then travels as a small reference ``(pool, slot, generation, token, size)`` to a segment the
training process already holds.

Protocol, per DataLoader iteration (one :class:`BufferPool`, created in the training process
before the workers start, so that its ``state`` tensor is shared with them):

* ``state[slot]`` is 0 when the slot is free, else the token of the batch in it. Worker ``w``
  owns slots ``[w * slots_per_worker, (w + 1) * slots_per_worker)`` and a segment per slot;
  a segment that has to grow is replaced by a new one, the slot's next *generation*.
* A worker claims a free slot of its own (writes a fresh token), copies the batch into the
  slot's segment and sends a :class:`SegmentRef`, with the segment itself the first time it
  sends that generation. With no free slot it uses a fresh, unpooled segment, as torch would.
* The training process keeps the segments it received, by slot. For each arriving batch it
  makes a tensor of its own over the segment's memory (a storage of its own, not the cached
  segment's) and tracks that storage with a weak reference. Once the storage is gone (no tensor
  of the batch is left, wherever it was handed), it clears the slot, if the slot still holds
  that batch's token. Only the owner writes a free slot and only the training process clears a
  claimed one, so the two never race on a slot; the storage's reference count is released with
  acquire/release ordering before the slot is cleared.

Batches of one worker arrive in the order it sent them (one queue), so a segment arrives before
any reference to it. Segments belong to worker processes: a new iteration starts new workers
with new segments and a new pool, so nothing of an earlier iteration is ever overwritten. The
training process keeps a pool (and the segments it received) as long as the DataLoader iterator
that made it, and each batch keeps its own segment mapped as long as any of its tensors lives.
Requires non-persistent workers (``build_train_loader`` creates them so).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

_SEGMENT_ROUND = 1 << 20  # segment sizes are rounded up to whole MiB, with 25% headroom
# the training process's live pools by id; a pool lives as long as its DataLoader iterator
_pools: weakref.WeakValueDictionary[str, BufferPool] = weakref.WeakValueDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class SegmentRef:
    """Where a worker put a batch: ``nbytes`` at the start of segment ``generation`` of
    ``slot`` in pool ``pool``, claimed with ``token``."""

    pool: str
    slot: int
    generation: int
    token: int
    nbytes: int


class BufferPool:
    """Reusable shared-memory segments for the batches of one DataLoader iteration."""

    def __init__(self, num_workers: int, slots_per_worker: int) -> None:
        self.id = uuid.uuid4().hex
        self.slots_per_worker = slots_per_worker
        self.state = torch.zeros(max(1, num_workers) * slots_per_worker, dtype=torch.int64).share_memory_()
        self._init_local()
        with _lock:
            _pools[self.id] = self

    def _init_local(self) -> None:
        self._slots = self.state.numpy()  # the same shared memory; indexing it costs far less
        # worker side: slot -> (generation, segment, its numpy view), generations sent
        self._segments: dict[int, tuple[int, Tensor, np.ndarray]] = {}
        self._sent: set[tuple[int, int]] = set()
        self._claims: dict[int, int] = {}  # slot -> token of its last claim by this worker
        self._tokens = itertools.count(1)
        self._generations = itertools.count(1)
        # training side: slot -> (generation, numpy view of the segment) received; batches not
        # yet released
        self._received: dict[int, tuple[int, np.ndarray]] = {}
        self._pending: list[tuple[StorageWeakRef, int, int]] = []
        self.segments_received = 0

    def __getstate__(self) -> dict[str, Any]:  # to a (spawned) worker: no segments, no tracking
        return {"id": self.id, "slots_per_worker": self.slots_per_worker, "state": self.state}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._init_local()

    # -- worker side ---------------------------------------------------------------------------

    def acquire(self, worker: int, nbytes: int) -> tuple[np.ndarray, SegmentRef | None, Tensor | None]:
        """A shared uint8 buffer of ``nbytes`` (a numpy view) for a batch of worker ``worker``,
        the reference to send with it, and the segment to send along (``None`` once the training
        process has it). Without a free slot: a fresh segment, no reference, that segment to send."""
        first = worker * self.slots_per_worker
        state = self._slots.tolist()
        free = [s for s in range(first, first + self.slots_per_worker) if state[s] == 0]
        if not free:
            seg = new_segment(nbytes)
            return seg.numpy(), None, seg
        sizes = {s: (len(self._segments[s][2]) if s in self._segments else 0) for s in free}
        # the free segment claimed longest ago that fits (a batch's memory stays intact as long
        # as possible, see holds()); else grow the largest free one (sizes settle)
        fits = [s for s in free if sizes[s] >= nbytes]
        slot = min(fits, key=lambda s: self._claims.get(s, 0)) if fits else max(free, key=sizes.__getitem__)
        if not fits:
            size = -(-nbytes * 5 // 4 // _SEGMENT_ROUND) * _SEGMENT_ROUND
            seg = new_segment(size)
            self._segments[slot] = (next(self._generations), seg, seg.numpy())
        generation, segment, array = self._segments[slot]
        token = (os.getpid() << 32) | next(self._tokens)
        self._slots[slot] = self._claims[slot] = token
        send = None
        if (slot, generation) not in self._sent:
            self._sent.add((slot, generation))
            send = segment
        return array[:nbytes], SegmentRef(self.id, slot, generation, token, nbytes), send

    def holds(self, slot: int, token: int) -> bool:
        """Worker side: whether ``slot``'s segment still holds what the batch claimed with
        ``token`` wrote there (this worker, its only writer, has not claimed it again)."""
        return self._claims.get(slot) == token

    # -- training side -------------------------------------------------------------------------

    def receive(self, ref: SegmentRef, segment: Tensor | None) -> Tensor:
        """The batch's bytes: a uint8 tensor with a storage of its own over the segment's
        memory, tracked so that the slot is cleared once the batch is gone."""
        with _lock:
            if segment is not None:
                self._received[ref.slot] = (ref.generation, segment.numpy())
                self.segments_received += 1
            generation, array = self._received.get(ref.slot, (None, None))
            if generation != ref.generation:
                raise RuntimeError(
                    f"batch refers to generation {ref.generation} of shared-memory slot {ref.slot} of pool "
                    f"{ref.pool}, but this process holds generation {generation}: batches of a worker must "
                    "arrive in the order it sent them"
                )
            # torch.from_numpy makes a new storage that keeps the segment alive through the array
            buf = torch.from_numpy(array[: ref.nbytes])
            self._pending.append((StorageWeakRef(buf.untyped_storage()), ref.slot, ref.token))
        return buf

    def _release_expired(self) -> None:
        keep = []
        for ref, slot, token in self._pending:
            if not ref.expired():
                keep.append((ref, slot, token))
            elif int(self._slots[slot]) == token:
                self._slots[slot] = 0
        self._pending = keep


def new_segment(nbytes: int) -> Tensor:
    """A fresh shared-memory uint8 buffer of ``nbytes`` (pages faulted in on first write)."""
    buf = torch.empty(0, dtype=torch.uint8)
    return buf.set_(buf.untyped_storage()._new_shared(max(nbytes, 1))).resize_(nbytes)


def receive(ref: SegmentRef, segment: Tensor | None) -> Tensor:
    """Training side: a batch arrived in ``ref`` (with its segment, the first time); also
    clear the slots of every batch whose tensors are all gone by now. Returns the batch's bytes."""
    with _lock:
        pools = list(_pools.values())
    for pool in pools:
        with _lock:
            pool._release_expired()
    pool = _pools.get(ref.pool)
    if pool is None:
        raise RuntimeError(
            f"batch refers to shared-memory pool {ref.pool}, which this process no longer holds: "
            "the DataLoader iterator that made it is gone"
        )
    return pool.receive(ref, segment)
