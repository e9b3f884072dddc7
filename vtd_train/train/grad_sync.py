"""Data parallelism for partial-task batches: presence-aware gradient averaging, overlapped with
the backward pass in buckets like DDP's (no DDP wrapper).

**The problem.** In joint training a step carries the labels of one image set only, so the
decoders of the other tasks get no gradient (``grad is None``, see ``VTDNet.forward``). With the
set-level round-robin schedule every rank holds the same set at the same step, but a custom or
stochastic schedule may give ranks different sets in the same step. We need: no hang and no
unused-parameter error; a decoder that saw data on *no* rank is not touched at all (AdamW's
weight decay and momentum would otherwise move it: ``p ← p − lr·(wd·p + m̂/√v̂)`` even with a zero
gradient); a decoder that saw data on *some* ranks gets the same, correctly averaged update on
every rank; frozen parameters are ignored; a non-finite loss on any rank skips the step on all.

**The rule.** A trainable parameter fed on ``n_p`` ranks gets **the mean over those ranks**
(``Σ_r g_r / n_p``, a rank without a local gradient contributing nothing); with ``n_p = 0`` it
keeps ``grad = None`` on every rank, so the optimizer skips it entirely (``torch.optim.AdamW``
and apex's fused optimizers skip ``grad is None``: no weight decay, no moment update, no step
count). This is the convention the model already uses inside a batch (a task's loss is averaged
over the samples labelled for it), so a decoder's update does not shrink because other ranks
were busy with other image sets; the backbone, used by every rank, gets the plain mean. When all
ranks hold the same set (the default schedule) this is exactly DDP's average.

**The schedule** (:class:`GradSync`, driven by :class:`vtd_train.train.step.TrainStep`):

1. *After the forward, before the backward* — :meth:`GradSync.agree`: each rank walks its loss's
   autograd graph (:func:`~vtd_train.train.grad_buckets.reachable`) for the parameters whose
   ``AccumulateGrad`` node it reaches — exactly those its backward will give a gradient, the
   set DDP's ``find_unused_parameters`` computes — and *launches* an asynchronous all-reduce
   (SUM) of one small float vector ``[non-finite flags per task ..., presence per trainable
   parameter ...]``, then returns: the backward starts at once. (The graph, not the batch's
   label presence, decides presence: it is exact whatever the model does with a task's labels —
   a head that runs only on positive RoIs, a decoder frozen — and it keeps the runtime free of
   model knowledge.)
2. *During the backward* — a ``register_post_accumulate_grad_hook`` on every trainable
   parameter. Until the agreement has arrived (each hook polls it without blocking: gloo's
   ``Work.is_completed``; on CUDA an event behind a pinned-memory copy made on a side stream,
   so neither the host nor the backward's stream waits), a gradient simply stays in ``p.grad``.
   The first hook that finds it arrived *arms* the step — every rank now knows ``n_p`` for
   every parameter and whether any rank's loss is non-finite — and packs the gradients kept so
   far; from then on each hook copies ``g / n_p`` into its bucket's flat buffer, in the
   communication dtype, and drops the local gradient. Buckets
   (:mod:`~vtd_train.train.grad_buckets`: reverse registration order, ``bucket_mb`` each, a
   1 MB first one, as DDP) are sent with an asynchronous all-reduce as soon as every member
   *this rank's loss reaches* has arrived; members fed only on other ranks are zeros here and are
   never waited for, and a bucket with no local member at all is sent as soon as its turn
   comes. Buckets are sent in bucket order on every rank (collectives must be issued in the same
   order everywhere, or gloo and NCCL hang; the agreement, issued first, always precedes them):
   like DDP's, a bucket that fills early waits for the earlier ones. Only parameters fed
   somewhere are packed, so decoders no rank fed cost no bytes. So the ranks meet where DDP's
   do — at the end of the backward, a fast rank's backward running on while a slow one still
   does its forward — not between forward and backward.
3. *After the backward* — :meth:`GradSync.finish`: wait for the agreement if it has not arrived
   (then arm and pack everything now: ``StepOutput.agree_s``, waiting for a slower rank's
   forward), send what is left (in order), wait for every all-reduce, cast the buckets back to
   the parameters' dtype and hand the gradients back as views of the flat buffers (no copy;
   ``zero_grad(set_to_none=True)`` drops them before the next step). If the agreement flags a
   non-finite loss on any rank, nothing was sent: every rank drops the gradients its (wasted)
   backward computed and skips the update, together. The optimizer step follows.
   :meth:`GradSync.agreement` waits for the agreement before the backward instead (the
   schedule the tests pin down; TrainStep does not use it).

**Communication dtype.** ``comm_dtype`` (config ``grad_sync.comm_dtype: auto``: the training
precision's — fp16 or bf16 — else fp32) is DDP's ``fp16_compress_hook`` / ``bf16_compress_hook``
done in the hook: cast, all-reduce, cast back, half the bytes of fp32. The division by ``n_p``
happens *before* the sum, in the gradient's own dtype, as those hooks divide before reducing:
the sum of means cannot overflow where the mean itself would not. ``fp32`` sends fp32.

**GradScaler agreement.** The all-reduced buffers are bit-identical on every rank (the
collective's result is broadcast), so the unscaled gradients, the GradScaler's inf/NaN check,
the clipping norm and the updates agree without further communication: an inf or NaN in any
rank's gradient — or a scaled fp32 gradient beyond fp16's range when sending fp16 — is inf/NaN
in the sum on every rank, every rank's scaler skips the step and backs off its scale, and the
loss scale settles where the compressed gradients fit (the same calibration as DDP with the
fp16 hook). :func:`replica_divergence` checks the replicas at every report.

**Edge cases.** A parameter the graph reaches whose backward yields no gradient (a custom
autograd ``Function`` returning ``None`` for it) counts as fed on that rank with a zero
gradient (its hook still runs). A gradient that arrives for a parameter the walk did not
foresee, or a second accumulation after its bucket was sent (two backward calls in a step,
reentrant activation checkpointing), is a ``RuntimeError``, not a wrong sum, and so is a
gradient already held when :meth:`GradSync.agree` is called (no accumulation across steps: the
previous step's gradients are views of the buckets, whose packing changes per step);
``overlap=False``
(``grad_sync.overlap: false``) copies every gradient after the backward instead and sends the
buckets then — the previous post-backward sync's schedule. With one process nothing is sent.

**Why not DDP.** ``find_unused_parameters=True`` also keeps a globally unused gradient ``None``
and averages a locally unused one with zeros, but (a) it divides by the world size, diluting a
decoder that only some ranks fed; (b) it has no non-finite agreement: a rank that saw a NaN
loss cannot skip alone without hanging the others, so every rank must learn it before any
rank updates — here that travels with the presence vector; (c) it sends every bucket every
step, fed or not (``benchmarks/grad_sync_bench.py`` measures both; benchmarks/RESULTS.md). Frozen parameters
(``requires_grad=False``) are simply not in the list. Mutable buffers (``BatchNorm`` running
statistics with ``norm: bn``) are broadcast from rank 0 before each forward, like DDP's
``broadcast_buffers``.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vtd_train.train.grad_buckets import FIRST_BUCKET_MB, StepBucket, assign_buckets, reachable, step_buckets

#: ``grad_sync.comm_dtype`` names → dtype (``None``: the gradients' own dtype).
COMM_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def comm_dtype_for(name: str, precision: str) -> torch.dtype | None:
    """The dtype gradients travel in: ``auto`` → the training precision's (``fp16``/``bf16``;
    ``None`` — the gradients' own fp32 — for ``fp32``), or the one named."""
    return COMM_DTYPES[precision if name == "auto" else name]


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


@dataclass(frozen=True)
class Agreement:
    """What :meth:`GradSync.agree` established for one step; identical on every rank.

    ``flags``: the non-finite flag vector summed over ranks. ``counts[i]``: how many ranks'
    losses reach trainable parameter ``i`` (will give it a gradient)."""

    flags: list[float]
    counts: list[int]

    @property
    def nonfinite(self) -> bool:
        return any(self.flags)

    @property
    def any_grad(self) -> bool:
        return any(self.counts)


@dataclass(frozen=True)
class Launch:
    """One bucket's all-reduce: its fixed index, the bytes sent, when it was issued
    (``phase``: ``"agree"`` — from :meth:`GradSync.agreement` called before the backward, a
    bucket with no local member —, ``"backward"`` — from a gradient hook — or ``"finish"`` —
    after the backward) and ``time.perf_counter()`` then."""

    bucket: int
    nbytes: int
    phase: str
    t: float


@dataclass
class SyncStats:
    """The last step's communication: the agreement vector's bytes and the bucket launches, in
    the order issued (0 bytes and none with one process); ``armed``: where the agreement was
    first read (``"backward"``: in a gradient hook, ``"finish"`` or ``"agree"``, see
    :class:`Launch`); ``agree_wait_s``: time :meth:`GradSync.finish` (or
    :meth:`GradSync.agreement`) blocked on the agreement — 0 when it had arrived during the
    backward —; ``grad_wait_s``: time :meth:`GradSync.finish` then waited for the buckets."""

    agree_bytes: int = 0
    launches: list[Launch] = field(default_factory=list)
    armed: str | None = None
    agree_wait_s: float = 0.0
    grad_wait_s: float = 0.0

    @property
    def grad_bytes(self) -> int:
        return sum(x.nbytes for x in self.launches)

    @property
    def bytes(self) -> int:
        return self.agree_bytes + self.grad_bytes


@dataclass
class _Pending:
    """An agreement in flight: the summed vector, on the host once ``ready()`` (``wait()``
    blocks until then), the number of flag slots, this rank's presence, and the parameters
    whose gradient arrived before the agreement did (kept in ``p.grad`` until then).
    ``keep``: tensors the all-reduce still uses."""

    vec: Tensor
    ready: Callable[[], bool]
    wait: Callable[[], Any]
    k: int
    local: list[bool]
    arrived: list[int] = field(default_factory=list)
    keep: tuple[Tensor, ...] = ()


@dataclass
class _Step:
    """An armed step: its buckets in sending order, where each fed parameter sits in them
    (``param → (step bucket, count, offset, numel)``), the parameters this rank's loss
    reaches, the next bucket to send."""

    buckets: list[StepBucket]
    where: dict[int, tuple[StepBucket, int, int, int]]
    local: set[int]
    counts: list[int]
    next: int = 0


def _grad_hook(ref: weakref.ref, index: int):
    """A post-accumulate-grad hook that tells the (weakly held) sync ``index`` is ready; a no-op
    once the sync is gone, so a replaced sync costs nothing and keeps nothing alive."""

    def hook(_param: Tensor) -> None:
        sync = ref()
        if sync is not None:
            sync._grad_ready(index)

    return hook


def _always() -> bool:
    return True  # (one process: the "agreement" is this rank's own vector)


def _remove_hooks(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


class GradSync:
    """Presence-aware gradient averaging over the default process group, overlapped with the
    backward pass (see the module doc). Per step: :meth:`agree` after the forward, then the
    backward, then :meth:`finish`.

    ``params``: the trainable parameters, in the same (registration) order on every rank.
    ``bucket_mb``: bucket size in MiB of parameter bytes (DDP's 25 by default; with overlap the
    first bucket is 1 MiB).
    ``comm_dtype``: the dtype floating-point gradients are all-reduced in (``None``: their own;
    :func:`comm_dtype_for` maps the config's names). ``overlap``: send buckets from the backward's
    gradient hooks as they fill (default), or all of them after the backward.
    ``buffers``: mutable buffers broadcast from rank 0 by :meth:`sync_buffers`.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, buffers: Sequence[Tensor] = (), bucket_mb: float = 25.0,
                 comm_dtype: torch.dtype | None = None, overlap: bool = True):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.params = list(params)
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters {frozen[:5]} do not require grad: pass only the trainable ones")
        self.buffers = list(buffers)
        self.world = world_size()
        self.overlap = overlap
        self.comm_dtype = comm_dtype
        # (a small first bucket only helps when buckets are sent during the backward)
        self.buckets = assign_buckets(self.params, bucket_mb=bucket_mb, comm_dtype=comm_dtype,
                                      first_bucket_mb=FIRST_BUCKET_MB if overlap else bucket_mb)
        # Each parameter's AccumulateGrad node, held so that the graph walk meets the same node
        # objects every step (autograd keeps a leaf's accumulator only while something holds it).
        self._accumulators = {torch.autograd.graph.get_gradient_edge(p).node: i for i, p in enumerate(self.params)}
        self._step: _Step | None = None
        self._pending: _Pending | None = None
        self._agreement: Agreement | None = None
        self._side: torch.cuda.Stream | None = None
        # Hooks run on autograd's threads: the calling thread for CPU work, one thread per
        # device for CUDA, so a model spread over devices (or CPU + CUDA) runs two at once; the
        # lock serialises the bucket state and keeps the buckets' send order the same everywhere.
        self._lock = threading.Lock()
        self.stats = SyncStats()
        if self.world > 1 and overlap:
            ref = weakref.ref(self)
            handles = [p.register_post_accumulate_grad_hook(_grad_hook(ref, i)) for i, p in enumerate(self.params)]
            self._unhook = weakref.finalize(self, _remove_hooks, handles)

    def close(self) -> None:
        """Remove the gradient hooks now (they also go when the sync is garbage-collected)."""
        unhook = getattr(self, "_unhook", None)
        if unhook is not None:
            unhook()

    def sync_buffers(self) -> None:
        """Broadcast rank 0's mutable buffers (before the forward): one broadcast per dtype and
        device of all of them flattened, as DDP's ``broadcast_buffers`` coalesces them (a
        ResNet-50 with ``norm: bn`` has 106, each a round trip of its own otherwise)."""
        if self.world == 1 or not self.buffers:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for b in self.buffers:
            groups.setdefault((b.dtype, b.device), []).append(b)
        with torch.no_grad():
            for bs in groups.values():
                flat = torch.cat([b.reshape(-1) for b in bs])
                dist.broadcast(flat, 0)
                torch._foreach_copy_(bs, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in bs]), bs)])

    # -- the step ---------------------------------------------------------------------------------

    def agree(self, flags: Tensor, loss: Tensor | None) -> None:
        """After the forward, before the backward of ``loss`` (``None``: this rank backpropagates
        nothing): launch the all-reduce (SUM) of ``flags`` with this rank's parameter presence —
        the parameters ``loss``'s graph reaches — and return at once. The gradient hooks read
        the result as soon as it has arrived (and arm the step: buckets, counts); the backward
        does not wait for it. :meth:`agreement` waits for it; :meth:`finish` returns it."""
        with self._lock:
            self._step = self._pending = self._agreement = None
        if self.world > 1:
            held = [i for i, p in enumerate(self.params) if p.grad is not None]
            if held:  # a previous step's gradients are views of the buckets, whose layout changes per step
                raise RuntimeError(f"{self._name(held[0])} and {len(held) - 1} more hold a gradient before the step's "
                                   f"backward: the sync does not accumulate across backward calls; "
                                   f"zero_grad(set_to_none=True) before the forward")
        local = [False] * len(self.params)
        for i in reachable(loss, self._accumulators):
            local[i] = True
        presence = torch.tensor(local, dtype=torch.float32).to(flags.device, non_blocking=True)
        vec = torch.cat([flags.to(torch.float32).reshape(-1), presence])
        self.stats = SyncStats()
        k = flags.numel()
        if self.world == 1:
            pend = _Pending(vec=vec, ready=_always, wait=_always, k=k, local=local)
        elif vec.device.type == "cuda":
            # On a side stream, so that the backward's kernels (queued behind the forward on the
            # current stream) do not wait for the slowest rank: the all-reduce, then the sum
            # copied to pinned host memory behind an event a hook can poll from any thread.
            side = self._side_stream(vec.device)
            side.wait_stream(torch.cuda.current_stream(vec.device))
            with torch.cuda.stream(side):
                work = dist.all_reduce(vec, async_op=True)
                work.wait()  # the side stream waits for the collective (not the host)
                host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
                host.copy_(vec, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            pend = _Pending(vec=host, ready=event.query, wait=event.synchronize, k=k, local=local, keep=(vec,))
        else:
            work = dist.all_reduce(vec, async_op=True)
            pend = _Pending(vec=vec, ready=work.is_completed, wait=work.wait, k=k, local=local)
        if self.world > 1:
            self.stats.agree_bytes = vec.numel() * vec.dtype.itemsize
        with self._lock:
            self._pending = pend

    def agreement(self) -> Agreement:
        """Wait for the agreement :meth:`agree` launched (a no-op once it is known) and arm the
        step; identical on every rank. Called before the backward, it is the old schedule's
        meeting point (buckets this rank feeds nothing of go at once)."""
        with self._lock:
            if self._agreement is None:
                self._arm("agree", wait=True)
            assert self._agreement is not None
            return self._agreement

    def finish(self) -> Agreement:
        """After the backward: wait for the agreement if it has not arrived, send the buckets not
        sent yet (in order), wait for every all-reduce and hand each fed parameter its averaged
        gradient (views of the buckets' buffers); parameters fed on no rank are left with
        ``grad = None``. When the agreement says a loss was non-finite somewhere, every rank drops
        the gradients it computed and nothing is sent. Returns the agreement."""
        t0 = time.perf_counter()
        with self._lock:  # (backward() has returned, so no hook runs now; the lock orders the memory all the same)
            if self._agreement is None:
                self._arm("finish", wait=True)
            t1 = time.perf_counter()
            agreement, st, self._step = self._agreement, self._step, None
            assert agreement is not None
            if st is not None:
                self._send_ready("finish", st=st, force=True)
        self.stats.agree_wait_s = t1 - t0
        if agreement.nonfinite:  # nothing was armed: this rank's gradients go, unsent
            for p in self.params:
                p.grad = None
            return agreement
        if st is None:  # one process, or no gradient anywhere
            return agreement
        for sb in st.buckets:
            assert sb.work is not None
            sb.work.wait()
        for sb in st.buckets:
            comm, grads = sb.bucket.buffers()
            if grads is not comm:
                grads[: sb.numel].copy_(comm[: sb.numel])
            for i, _, off, n in sb.members:
                p = self.params[i]
                p.grad = grads[off: off + n].view_as(p)
        for i, c in enumerate(st.counts):
            if c == 0 and self.params[i].grad is not None:
                raise RuntimeError(f"{self._name(i)} has a gradient although no rank's loss reached it before the "
                                   f"backward (a backward of another loss inside the step?)")
        self.stats.grad_wait_s = time.perf_counter() - t1
        return agreement

    # -- internals --------------------------------------------------------------------------------

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        return self._side

    def _name(self, i: int) -> str:
        return f"trainable parameter #{i} {tuple(self.params[i].shape)}"

    def _arm(self, phase: str, *, wait: bool) -> None:
        """(Under the lock.) Read the agreement in flight — waiting for it with ``wait``, else only
        if it has arrived —, and unless a flag is set or no rank has a gradient, arm the step:
        its buckets, the gradients that arrived meanwhile packed, the buckets ready sent."""
        pend = self._pending
        if pend is None:
            raise RuntimeError("GradSync.finish/agreement without GradSync.agree in this step")
        if not wait and not pend.ready():
            return
        pend.wait()
        values = pend.vec.tolist()
        self._pending = None
        agreement = Agreement(flags=values[: pend.k], counts=[int(round(c)) for c in values[pend.k:]])
        self._agreement = agreement
        self.stats.armed = phase
        if self.world == 1 or agreement.nonfinite or not agreement.any_grad:
            return
        buckets = step_buckets(self.buckets, agreement.counts, pend.local)
        where = {i: (sb, c, off, n) for sb in buckets for i, c, off, n in sb.members}
        st = self._step = _Step(buckets=buckets, where=where, local={i for i, x in enumerate(pend.local) if x},
                                counts=agreement.counts)
        for i in pend.arrived:
            self._accept(st, i)
        if self.overlap:  # complete buckets, and leading ones this rank feeds nothing of, go now
            self._send_ready(phase, st=st)

    def _grad_ready(self, i: int) -> None:
        """Hook body: parameter ``i``'s gradient is accumulated. Before the agreement has arrived,
        keep it where it is (and check whether the agreement has arrived now); after, copy it
        into its bucket and send whatever buckets are complete, in order."""
        with self._lock:
            st = self._step
            if st is None:
                pend = self._pending
                if pend is None:  # not in a step this sync launched, or one it will not send
                    return
                pend.arrived.append(i)
                self._arm("backward", wait=False)
                return
            self._accept(st, i)
            self._send_ready("backward", st=st)

    def _accept(self, st: _Step, i: int) -> None:
        """(Under the lock.) Pack parameter ``i``'s gradient into its bucket."""
        slot = st.where.get(i)
        if slot is None or i not in st.local:
            raise RuntimeError(f"{self._name(i)} got a gradient although this rank's loss did not reach it before the "
                               f"backward (a backward of another loss inside the step?)")
        sb, c, off, n = slot
        if i in sb.filled:
            raise RuntimeError(f"{self._name(i)} accumulated a second gradient in one step after it was packed for "
                               f"sending (two backward calls, reentrant activation checkpointing): use grad_sync.overlap: false")
        self._fill(sb, i, c, off, n, from_grad=True)
        sb.pending -= 1

    def _fill(self, sb: StepBucket, i: int, count: int, off: int, n: int, *, from_grad: bool) -> None:
        """Write ``grad / count`` of parameter ``i`` (zeros: none here, or ``from_grad=False``)
        into its slot of the bucket's send buffer and drop the local gradient."""
        comm, _ = sb.bucket.buffers()
        dst = comm[off: off + n]
        p = self.params[i]
        g = p.grad if from_grad else None
        if g is None:
            dst.zero_()
        elif count == 1:
            dst.copy_(g.reshape(-1))
        else:  # divided in the gradient's dtype, then cast: the sum of the means cannot overflow
            torch.div(g.reshape(-1), count, out=dst)
        p.grad = None
        sb.filled.add(i)

    def _send_ready(self, phase: str, *, st: _Step | None = None, force: bool = False) -> None:
        """All-reduce (async) the next buckets in order while they are complete (``force``: all)."""
        st = st if st is not None else self._step
        assert st is not None
        while st.next < len(st.buckets):
            sb = st.buckets[st.next]
            if sb.pending > 0 and not force:
                return
            for i, c, off, n in sb.members:
                if i not in sb.filled:  # fed on other ranks only; or, without overlap, this rank's gradient
                    self._fill(sb, i, c, off, n, from_grad=i in st.local)
            comm, _ = sb.bucket.buffers()
            sb.work = dist.all_reduce(comm[: sb.numel], async_op=True)
            self.stats.launches.append(Launch(bucket=sb.bucket.index, nbytes=sb.nbytes, phase=phase, t=time.perf_counter()))
            st.next += 1


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
