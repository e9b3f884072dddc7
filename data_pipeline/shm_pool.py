"""Shared-memory segments that DataLoader workers reuse for the batches they hand over.

A worker sends each batch to the training process as one shared-memory buffer
(``Batch.__reduce__``). A fresh segment per batch costs a page fault per 4 KiB page on first
write: 7 ms for a det batch's 5.3 MiB on the project's VM, more than a JPEG decode per frame,
while copying into a segment already faulted in costs 0.3 ms (benchmarks/RESULTS.md). So each
worker keeps a few segments and reuses one as soon as the training process has dropped every
tensor of the batch it carried.

Protocol, per DataLoader iteration (one :class:`BufferPool`, created in the training process
before the workers start, so its ``state`` tensor is shared with them):

* ``state[slot]`` is 0 when the slot is free, else the token of the batch in it. Worker ``w``
  owns slots ``[w * slots_per_worker, (w + 1) * slots_per_worker)`` and a segment per slot.
* A worker claims a free slot of its own (writes a fresh token), copies the batch into the
  slot's segment and sends ``(pool id, slot, token)`` along. With no free slot it uses a fresh,
  unpooled segment, as torch would.
* The training process tracks the segment's storage with a weak reference. Once the storage is
  gone (no tensor of the batch is left, wherever it was handed), it clears the slot, if the slot
  still holds that batch's token. Only the owner writes a free slot and only the training
  process clears a claimed one, so the two never race on a slot; the storage's reference count
  is released with acquire/release ordering before the slot is cleared.

Segments belong to worker processes: a new iteration starts new workers with new segments and
a new pool, so nothing of an earlier iteration is ever overwritten. Requires non-persistent
workers (``build_train_loader`` creates them so).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

_SEGMENT_ROUND = 1 << 20  # segment sizes are rounded up to whole MiB, with 25% headroom
_pools: dict[str, BufferPool] = {}  # the training process's pools by id (a few iterations' worth)
_MAX_POOLS = 4
_lock = threading.Lock()


class BufferPool:
    """Reusable shared-memory segments for the batches of one DataLoader iteration."""

    def __init__(self, num_workers: int, slots_per_worker: int) -> None:
        self.id = uuid.uuid4().hex
        self.slots_per_worker = slots_per_worker
        self.state = torch.zeros(max(1, num_workers) * slots_per_worker, dtype=torch.int64).share_memory_()
        self._segments: dict[int, Tensor] = {}  # worker side: slot -> segment
        self._pending: list[tuple[StorageWeakRef, int, int]] = []  # training side
        self._tokens = itertools.count(1)
        with _lock:
            _pools[self.id] = self
            while len(_pools) > _MAX_POOLS:  # forget the oldest: its slots are simply never cleared
                _pools.pop(next(iter(_pools)))

    def __getstate__(self) -> dict[str, Any]:  # to a (spawned) worker: no segments, no tracking
        return {"id": self.id, "slots_per_worker": self.slots_per_worker, "state": self.state}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d, _segments={}, _pending=[], _tokens=itertools.count(1))

    # -- worker side ---------------------------------------------------------------------------

    def acquire(self, worker: int, nbytes: int) -> tuple[Tensor, int, int]:
        """A shared uint8 buffer of ``nbytes`` for a batch of worker ``worker``, with its slot
        and token (slot −1: a fresh segment outside the pool)."""
        first = worker * self.slots_per_worker
        free = [s for s in range(first, first + self.slots_per_worker) if int(self.state[s]) == 0]
        if not free:
            return _new_segment(nbytes), -1, 0
        sizes = {s: (self._segments[s].numel() if s in self._segments else 0) for s in free}
        # the smallest free segment that fits; else grow the largest free one (sizes settle)
        fits = [s for s in free if sizes[s] >= nbytes]
        slot = min(fits, key=sizes.__getitem__) if fits else max(free, key=sizes.__getitem__)
        if not fits:
            self._segments[slot] = _new_segment(-(-nbytes * 5 // 4 // _SEGMENT_ROUND) * _SEGMENT_ROUND)
        token = (os.getpid() << 32) | next(self._tokens)
        self.state[slot] = token
        return self._segments[slot][:nbytes], slot, token

    # -- training side -------------------------------------------------------------------------

    def track(self, buf: Tensor, slot: int, token: int) -> None:
        """Clear ``slot`` once ``buf``'s storage is gone (checked on each arriving batch)."""
        with _lock:
            self._pending.append((StorageWeakRef(buf.untyped_storage()), slot, token))

    def _release_expired(self) -> None:
        keep = []
        for ref, slot, token in self._pending:
            if not ref.expired():
                keep.append((ref, slot, token))
            elif int(self.state[slot]) == token:
                self.state[slot] = 0
        self._pending = keep


def _new_segment(nbytes: int) -> Tensor:
    buf = torch.empty(0, dtype=torch.uint8)
    return buf.set_(buf.untyped_storage()._new_shared(max(nbytes, 1))).resize_(nbytes)


def track(pool_id: str, buf: Tensor, slot: int, token: int) -> None:
    """Training side: a batch arrived in ``slot`` of pool ``pool_id``; also clear the slots of
    every batch whose tensors are all gone by now."""
    with _lock:
        pools = list(_pools.values())
    for pool in pools:
        with _lock:
            pool._release_expired()
    pool = _pools.get(pool_id)
    if pool is not None and slot >= 0:
        pool.track(buf, slot, token)
