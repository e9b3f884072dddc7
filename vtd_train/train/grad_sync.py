"""Data parallelism for partial-task batches: presence-aware gradient averaging (no DDP wrapper).

**The problem.** In joint training a step carries the labels of one image set only, so the
decoders of the other tasks get no gradient (``grad is None``, see ``VTDNet.forward``). With the
set-level round-robin schedule every rank holds the same set at the same step, but a custom or
stochastic schedule may give ranks different sets in the same step. We need: no hang and no
unused-parameter error; a decoder that saw data on *no* rank is not touched at all (AdamW's
weight decay and momentum would otherwise move it: ``p ← p − lr·(wd·p + m̂/√v̂)`` even with a zero
gradient); a decoder that saw data on *some* ranks gets the same, correctly averaged update on
every rank; frozen parameters are ignored.

**The choice: no ``DistributedDataParallel``; one small all-reduce per step of a presence vector,
then one all-reduce of the gradients that exist somewhere.** After the local backward:

1. every rank all-reduces (SUM) one float vector ``[non-finite flags per task ..., presence per
   trainable parameter ...]`` where presence is ``p.grad is not None``. That is the step's only
   host sync; it gives every rank the same view of which parameters have a gradient where, and
   whether any rank saw a non-finite loss (:mod:`vtd_train.train.step` then skips the step on all
   ranks together, before any gradient traffic).
2. parameters with count ``n_p = 0`` keep ``grad = None`` on every rank, so the optimizer skips
   them entirely (``torch.optim.AdamW`` and apex's fused optimizers skip ``grad is None``): no
   weight decay, no moment update, no step count.
3. parameters with ``n_p > 0`` are packed in model order into one flat buffer and all-reduced in a
   single collective (a rank without a local gradient contributes zeros), then divided by
   ``n_p``: **the mean over the ranks that had data for the parameter.** This is the
   convention the model already uses inside a batch (a task's loss is averaged over the
   samples labelled for it), so a decoder's update does not shrink because other ranks were
   busy with other image sets; the backbone, used by every rank, gets the plain mean. When all
   ranks hold the same set (the default schedule) this is exactly DDP's average.

The summed buffers are bit-identical on every rank (the collective's result is broadcast), so the
ranks' gradients, the GradScaler's inf check, the clipping norm and the updates agree without
further communication (checked each report by :func:`replica_divergence`).

**Why not DDP.** ``find_unused_parameters=True`` also keeps a globally unused gradient ``None``
and averages a locally unused one with zeros, but (a) it divides by the world size, diluting a
decoder that only some ranks fed; (b) a rank cannot skip its backward after a non-finite loss
without hanging the others, so non-finite agreement would need a second collective *before*
backward; (c) it walks the autograd graph every step. What we give up is DDP's overlap of
communication with the backward pass: the all-reduce runs after it (measured by
``benchmarks/train_overhead.py`` as ``all-reduce``; on 2 CPU cores it is compute-bound either
way). Frozen parameters (``requires_grad=False``) are simply not in the list. Mutable buffers
(``BatchNorm`` running statistics with ``norm: bn``) are broadcast from rank 0 before
each forward, like DDP's ``broadcast_buffers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (a collective; ``[obj]`` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_state(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (start of training / after a
    restore), so the replicas are identical whatever each rank initialised."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src)


def mutable_buffers(model: nn.Module) -> list[Tensor]:
    """Running statistics that change in training (trainable ``BatchNorm``); empty for the default
    frozen-BN ResNets."""
    out: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var) if b is not None]
    return out


class GradSync:
    """Presence-aware gradient averaging over the default process group (see the module doc).

    ``params``: the trainable parameters, in the same order on every rank. Gradients that exist
    somewhere are packed (model order) into one persistent flat buffer per dtype/device, reduced
    with a single all-reduce, divided, and handed back as views of that buffer (no copy back;
    ``zero_grad(set_to_none=True)`` drops the views before the next step). One collective per
    step is cheapest on gloo, and NCCL pipelines a large all-reduce internally.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, buffers: Sequence[Tensor] = ()):
        self.params = list(params)
        self.buffers = list(buffers)
        self.world = world_size()
        self._flat: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def sync_buffers(self) -> None:
        """Broadcast rank 0's mutable buffers (before the forward)."""
        if self.world > 1:
            for b in self.buffers:
                dist.broadcast(b, 0)

    def agree(self, flags: Tensor) -> tuple[list[float], list[int]]:
        """All-reduce (SUM) ``flags`` together with this rank's gradient presence.

        Returns ``(summed flags, per-parameter count of ranks holding a gradient)`` as Python
        lists (this is the step's host synchronisation).
        """
        device = flags.device
        presence = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=device)
        vec = torch.cat([flags.to(torch.float32).reshape(-1), presence])
        if self.world > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        k = flags.numel()
        return values[:k], [int(round(c)) for c in values[k:]]

    def average(self, counts: Sequence[int]) -> None:
        """Make every parameter's gradient the mean over the ranks that had one (``counts`` from
        :meth:`agree`); gradients absent on every rank stay ``None``."""
        if len(counts) != len(self.params):
            raise ValueError(f"{len(counts)} counts for {len(self.params)} parameters")
        if self.world == 1:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[nn.Parameter, int]]] = {}
        for p, c in zip(self.params, counts):
            if c > 0:
                groups.setdefault((p.dtype, p.device), []).append((p, c))
        for key, members in groups.items():
            numels = [p.numel() for p, _ in members]
            total = sum(numels)
            buf = self._flat.get(key)
            if buf is None or buf.numel() < total:
                buf = self._flat[key] = torch.empty(total, dtype=key[0], device=key[1])
            flat = buf[:total]
            # a rank without a local gradient for a parameter others have contributes zeros
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p, _ in members], out=flat)
            dist.all_reduce(flat)
            cs = {c for _, c in members}
            if len(cs) == 1:
                flat.div_(cs.pop())
            else:
                div = torch.tensor([float(c) for _, c in members], dtype=flat.dtype, device=flat.device)
                flat.div_(torch.repeat_interleave(div, torch.tensor(numels, device=flat.device)))
            for (p, _), g in zip(members, flat.split(numels)):
                p.grad = g.view_as(p)


def replica_divergence(model: nn.Module) -> float:
    """max − min over ranks of a float64 checksum of all parameters (0.0 when the replicas are
    identical; a collective: every rank must call it)."""
    with torch.no_grad():
        params = [p.detach() for p in model.parameters()]
        s = torch.stack([p.double().sum() + p.double().abs().sum() * 1e-3 for p in params]).sum() if params else torch.zeros((), dtype=torch.float64)
        if world_size() == 1:
            return 0.0
        hi, lo = s.clone(), -s.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MAX)
        return float(hi + lo)
