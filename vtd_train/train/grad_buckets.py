"""Buckets of the overlapped gradient sync (:mod:`vtd_train.train.grad_sync`): which parameters
travel together, where each lands in its bucket's flat buffer on a given step, and which
parameters a step's loss reaches.

* :func:`assign_buckets` — fixed for a run: parameters in **reverse registration order** (the
  order backward tends to produce their gradients: the decoders registered last finish first),
  cut into buckets of ``bucket_mb`` of parameter bytes, the first one smaller (1 MB) so that
  communication starts early — DDP's initial layout (``bucket_cap_mb=25`` and its 1 MB first
  bucket). A bucket holds parameters of one dtype and device. (DDP rebuilds its buckets after the
  first step in the order the gradients arrived; here the layout stays, because that order
  changes with each step's image set.)
* :class:`StepBucket` — one bucket on one step: only the parameters some rank has a gradient
  for (``count > 0``) are packed, contiguously, so a decoder no rank fed costs no bytes; a
  bucket none of whose parameters is fed anywhere is not sent at all. The layout depends only
  on the agreed counts, so it is the same on every rank.
* :func:`reachable` — the parameters whose ``AccumulateGrad`` node the autograd graph of a loss
  reaches, i.e. those its backward will hand a gradient (what DDP's
  ``find_unused_parameters`` computes after the forward, in C++); about 1 ms for the tiny
  VTDNet's ~2,000 graph nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

#: DDP's first bucket (``dist._DEFAULT_FIRST_BUCKET_BYTES``): small, so the first all-reduce
#: starts after the first few gradients rather than after ``bucket_mb`` of them.
FIRST_BUCKET_MB = 1.0


@dataclass
class Bucket:
    """A fixed group of parameters (indices into the sync's parameter list, in the order they
    are packed) of one ``dtype``/``device``, sent in ``comm_dtype``. The flat buffers are
    allocated on first use and reused every step: ``comm`` (``comm_dtype``) is what is
    all-reduced; ``grads`` (the parameters' dtype) is what the gradients become views of — the
    same tensor when the two dtypes agree."""

    index: int
    params: list[int]
    numels: list[int]
    dtype: torch.dtype
    device: torch.device
    comm_dtype: torch.dtype
    comm: Tensor | None = None
    grads: Tensor | None = None

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def buffers(self) -> tuple[Tensor, Tensor]:
        if self.comm is None:
            self.comm = torch.empty(self.numel, dtype=self.comm_dtype, device=self.device)
            self.grads = self.comm if self.comm_dtype == self.dtype else torch.empty(self.numel, dtype=self.dtype, device=self.device)
        assert self.grads is not None
        return self.comm, self.grads


def assign_buckets(params: Sequence[nn.Parameter], *, bucket_mb: float, comm_dtype: torch.dtype | None,
                   first_bucket_mb: float = FIRST_BUCKET_MB) -> list[Bucket]:
    """``params`` in reverse order, cut into buckets of at most about ``bucket_mb`` MiB of
    parameter bytes (the first one ``min(first_bucket_mb, bucket_mb)``); a bucket closes once
    it reaches its cap, so one larger parameter makes a bucket of its own. ``comm_dtype``:
    the dtype floating-point gradients travel in (``None``: their own)."""
    caps = [min(first_bucket_mb, bucket_mb) * 2**20, bucket_mb * 2**20]
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    out: list[Bucket] = []

    def close(key: tuple[torch.dtype, torch.device], members: list[int]) -> None:
        dtype, device = key
        cd = comm_dtype if comm_dtype is not None and dtype.is_floating_point else dtype
        out.append(Bucket(index=len(out), params=members, numels=[params[i].numel() for i in members],
                          dtype=dtype, device=device, comm_dtype=cd))

    for i in reversed(range(len(params))):
        p = params[i]
        key = (p.dtype, p.device)
        members, nbytes = open_.get(key, ([], 0))
        members.append(i)
        nbytes += p.numel() * p.dtype.itemsize
        if nbytes >= caps[min(len(out), 1)]:
            close(key, members)
            open_.pop(key, None)
        else:
            open_[key] = (members, nbytes)
    for key, (members, _) in open_.items():
        close(key, members)
    return out


@dataclass
class StepBucket:
    """One bucket on one step. ``members``: ``(param index, count, offset, numel)`` of the
    parameters fed on some rank (``count`` ranks), packed from offset 0; ``numel``: their total.
    ``pending``: members whose local gradient this rank still waits for (those its loss
    reaches); the bucket may be sent once it is 0. ``filled``: members already copied in."""

    bucket: Bucket
    members: list[tuple[int, int, int, int]]
    numel: int
    pending: int
    filled: set[int] = field(default_factory=set)
    work: object | None = None
    sent: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.bucket.comm_dtype.itemsize


def step_buckets(buckets: Sequence[Bucket], counts: Sequence[int], local: Sequence[bool]) -> list[StepBucket]:
    """The buckets with at least one parameter fed on some rank, in bucket order, each packing
    only those parameters (``counts[i] > 0``); ``local[i]``: this rank's loss reaches ``i``."""
    out: list[StepBucket] = []
    for b in buckets:
        members, off, pending = [], 0, 0
        for i, n in zip(b.params, b.numels):
            c = counts[i]
            if c > 0:
                members.append((i, c, off, n))
                off += n
                pending += bool(local[i])
        if members:
            out.append(StepBucket(bucket=b, members=members, numel=off, pending=pending))
    return out


def reachable(loss: Tensor | None, accumulators: dict[object, int]) -> list[int]:
    """Indices (values of ``accumulators``, keyed by each parameter's ``AccumulateGrad`` node)
    of the parameters that ``loss.backward()`` will reach; ``[]`` for ``None`` or a loss
    without a graph."""
    root = None if loss is None else loss.grad_fn
    if root is None:
        return []
    found: list[int] = []
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        i = accumulators.get(node)
        if i is not None:
            found.append(i)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return found
