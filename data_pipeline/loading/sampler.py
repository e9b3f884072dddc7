"""Set-level batch schedules and the split of each set's frames over ranks and DataLoader workers.

Every function here is pure and depends only on its arguments, so every rank computes the
same schedule: each rank takes exactly the same number of batches per epoch, from the same
image set at the same step, whatever the shard counts (paper §4.3 / H.1; STYLE §9).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

SamplingMode = Literal["round_robin", "none", "uniform", "weighted"]
SAMPLING_MODES: tuple[str, ...] = ("round_robin", "none", "uniform", "weighted")


def rng_for(*key: int | str) -> np.random.Generator:
    """A generator seeded by a tuple of ints/strings (strings hashed stably, not by ``hash()``)."""
    ints = []
    for k in key:
        if isinstance(k, str):
            ints.append(int.from_bytes(k.encode()[:16].ljust(16, b"\0"), "little") & 0xFFFFFFFF)
            ints.append(len(k))
        else:
            ints.append(int(k) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(ints))


def batches_per_rank(frames: int, world_size: int, batch_size: int) -> int:
    """Batches each rank takes from a set of ``frames`` samples per epoch (last partial dropped)."""
    return frames // (world_size * batch_size)


def set_schedule(
    batches: dict[str, int], mode: SamplingMode, *, seed: int, epoch: int
) -> list[str]:
    """The order in which one rank draws batches from the image sets during one epoch.

    ``batches`` maps set name → batches of that set per rank (insertion order is the set order).

    * ``round_robin`` (the paper's default): one batch from each set in turn; no set is
      oversampled; a smaller set is spread evenly over the epoch instead of being exhausted
      first (its k-th batch sits at time (k + ½) / n_set, ties broken by set order).
    * ``none``: no sampling strategy: every batch of every set once, in a seeded random order.
    * ``uniform`` / ``weighted``: a stochastic schedule of the same length, each step's set drawn
      uniformly / proportionally to set size (small sets may then be oversampled).
    """
    names = [s for s, n in batches.items() if n > 0]
    counts = np.array([batches[s] for s in names], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return []
    if mode == "round_robin":
        keyed = [((k + 0.5) / n, i, s) for i, (s, n) in enumerate(zip(names, counts)) for k in range(int(n))]
        return [s for _, _, s in sorted(keyed)]
    rng = rng_for(seed, epoch, "set-schedule", mode)
    if mode == "none":
        order = np.repeat(np.arange(len(names)), counts)
        rng.shuffle(order)
        return [names[i] for i in order]
    if mode == "uniform":
        p = np.full(len(names), 1.0 / len(names))
    elif mode == "weighted":
        p = counts / counts.sum()
    else:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    return [names[i] for i in rng.choice(len(names), size=total, p=p)]


def frames_needed(
    schedule: Sequence[str], worker_steps: Sequence[Iterable[Iterable[int]]], world_size: int, batch_size: int
) -> dict[str, list[int]]:
    """Key frames each global worker takes from each image set per epoch: ``{set: [frames of
    global worker g]}``, g = rank × workers + worker. ``worker_steps[w]`` are the steps worker
    ``w`` of a rank makes (in groups, as hand-offs), the same on every rank, as is the schedule."""
    needs: dict[str, list[int]] = {s: [0] * len(worker_steps) for s in schedule}
    for w, groups in enumerate(worker_steps):
        for group in groups:
            for step in group:
                needs[schedule[step]][w] += batch_size
    return {s: n * world_size for s, n in needs.items()}


def frame_ranges(needs: Sequence[int], available: int) -> list[tuple[int, int]]:
    """Split positions ``[0, available)`` into one contiguous range per worker, in worker order,
    sized in proportion to ``needs`` (the frames each worker takes this epoch). Every range
    holds at least its worker's need when ``available >= sum(needs)``; the surplus (less than
    one global batch per set, see :func:`batches_per_rank`) is spread over the ranges."""
    if min(needs, default=0) < 0 or available < 0:
        raise ValueError(f"needs and available frames must be >= 0, got {list(needs)} and {available}")
    total = sum(needs)
    if total == 0:
        return [(0, 0)] * len(needs)
    bounds = [available * c // total for c in np.cumsum([0, *needs]).tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def split_frames(
    shard_frames: Sequence[int], needs: Sequence[int], global_worker: int, *, seed: int, epoch: int, set_name: str
) -> list[tuple[int, int, int]]:
    """The part of an image set one global worker reads this epoch, as ``(shard, start, stop)``
    slices: shard index into ``shard_frames`` (the frames of each shard), and the range of the
    shard's frames, counted from its start, that the worker takes.

    The shards are shuffled by (seed, epoch, set) and their frames laid end to end; worker ``g``
    takes the ``g``-th of :func:`frame_ranges` (``needs[g]`` is the number of frames it takes),
    so across all ranks and workers every frame is taken at most once per epoch and all but
    the surplus of :func:`frame_ranges` are taken, whatever the shard sizes: no worker runs out
    and repeats frames while another leaves some out. A range may start and end inside a shard;
    that shard is then read by two workers, each keeping its part.
    """
    order = list(range(len(shard_frames)))
    rng_for(seed, epoch, "shards", set_name).shuffle(order)
    start, stop = frame_ranges(needs, sum(shard_frames))[global_worker]
    out, offset = [], 0
    for i in order:
        n = shard_frames[i]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset))
        offset += n
    return out
