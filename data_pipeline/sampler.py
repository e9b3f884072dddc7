"""Set-level batch schedules and the split of shards over ranks and DataLoader workers.

Every function here is pure and depends only on its arguments, so every rank computes the
same schedule: each rank takes exactly the same number of batches per epoch, from the same
image set at the same step, whatever the shard counts (paper §4.3 / H.1; STYLE §9).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def split_shards(
    shards: Sequence[str], global_worker: int, total_workers: int, *, seed: int, epoch: int, set_name: str
) -> tuple[list[str], int, int]:
    """Which shards a global worker reads, and which of their samples it keeps.

    Returns ``(shards, modulo, remainder)``: the worker keeps the i-th sample of its stream when
    ``i % modulo == remainder``. With at least as many shards as workers, shards are dealt out
    (after a seeded shuffle) and every sample is kept; with fewer shards than workers every
    worker reads all shards and keeps every ``total_workers``-th sample, so no worker starves.
    """
    order = list(shards)
    rng_for(seed, epoch, "shards", set_name).shuffle(order)
    if len(order) >= total_workers:
        return order[global_worker::total_workers], 1, 0
    return order, total_workers, global_worker
