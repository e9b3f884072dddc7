"""One optimizer step: autocast forward → loss sum → agreement across ranks launched → (scaled)
backward with the gradient all-reduces overlapped → unscale / clip → optimizer step, or a skip on
every rank together.

Non-finite handling (STYLE §8: never step on one rank while another skips):

* every loss term is checked on the device after the forward; the per-task flags travel in the
  one small all-reduce launched before the backward, with the gradient-presence vector
  (:meth:`GradSync.agree`), so every rank knows whether *any* rank saw a non-finite loss, and in
  which tasks, before any gradient is sent. If so, no bucket is sent, every rank drops the
  gradients its backward computed and skips the update, together (the backward is not waited
  for the agreement, so it runs, wasted, on such steps); the ranks that saw one name their
  terms in :attr:`StepOutput.nonfinite` (gathered from all ranks; only on such steps).
* with fp16 the GradScaler skips steps whose (identical, all-reduced) gradients overflow; that is
  normal loss-scale calibration (``reason="overflow"``), not an error, and every rank's scaler
  decides the same (see :mod:`vtd_train.train.grad_sync`).
* without a scaler a non-finite gradient norm (finite loss) also skips the step on every rank
  (``reason="nonfinite_grad"``); the norm is computed from identical gradients, so it agrees.

:class:`NonFiniteGuard` counts consecutive non-finite steps and stops the run at the configured
limit, on every rank at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from data_pipeline.bdd100k.format import TASKS
from data_pipeline.loading.structures import Batch
from vtd_train.model.losses import total_loss
from vtd_train.train.amp import Precision
from vtd_train.train.grad_sync import GradSync, all_gather_objects, world_size
from vtd_train.train.optim import set_lr

#: Slots of the non-finite flag vector: the ``<task>`` of ``loss/<task>/<term>`` keys, then
#: ``other`` (a key outside these) and ``total`` (the sum overflowed with finite terms).
FLAG_SLOTS: tuple[str, ...] = ("rpn", *TASKS, "other", "total")
_SLOT = {s: i for i, s in enumerate(FLAG_SLOTS)}

LossHook = Callable[[int, dict[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class StepOutput:
    """What one step did on this rank.

    ``losses``/``total``: this rank's loss terms (floats, possibly non-finite when skipped).
    ``reason``: ``None`` (updated), ``"nonfinite_loss"``, ``"nonfinite_grad"``, ``"overflow"`` or
    ``"no_grad"`` (no trainable parameter got a gradient on any rank: nothing to update).
    ``nonfinite_tasks``: tasks whose loss was non-finite on any rank; ``nonfinite``: the terms,
    ``"rank R: loss/<task>/<term>=nan"``, from every rank. ``local_nonfinite``: this rank's batch
    produced a non-finite loss. ``agree_s``: time this rank waited after its backward for the
    agreement (the presence / non-finite all-reduce; 0 when it arrived during the backward): it
    is waiting for a slower rank's forward; ``allreduce_s``: time after that until every gradient
    all-reduce has finished (what the overlap with the backward did not hide, and waiting for a
    slower rank's backward).
    """

    losses: dict[str, float]
    total: float
    reason: str | None
    nonfinite_tasks: tuple[str, ...]
    nonfinite: tuple[str, ...]
    local_nonfinite: bool
    grad_norm: float | None
    loss_scale: float
    lr: float
    agree_s: float
    allreduce_s: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.reason is not None

    @property
    def counts_as_nonfinite(self) -> bool:
        """Steps that count towards ``failures.max_consecutive_nonfinite``."""
        return self.reason in ("nonfinite_loss", "nonfinite_grad")


def _task_of(key: str) -> str:
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[1] in _SLOT else "other"


class TrainStep:
    """Runs :meth:`__call__` once per batch. ``params``: the trainable parameters (those the
    optimizer and :class:`GradSync` hold). ``loss_hook(step, losses)`` may rewrite the loss dict
    (fault injection). ``forward(batch)`` yields the loss dict (default: ``model(batch)``; a
    model family whose ``forward`` returns predictions passes its own, :mod:`.families`)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        sync: GradSync,
        *,
        grad_clip: float | None = None,
        loss_hook: LossHook | None = None,
        rank: int = 0,
        forward: Callable[[object], dict[str, Tensor]] | None = None,
    ):
        self.model = model
        self.forward = forward if forward is not None else model
        self.optimizer = optimizer
        self.precision = precision
        self.sync = sync
        self.params = sync.params
        self.grad_clip = grad_clip
        self.loss_hook = loss_hook
        self.rank = rank

    def __call__(self, batch: Batch, *, step: int, lr: float) -> StepOutput:
        opt, scaler = self.optimizer, self.precision.scaler
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        self.sync.sync_buffers()
        with self.precision.autocast():
            losses = self.forward(batch)
        if self.loss_hook is not None:
            losses = self.loss_hook(step, losses)
        losses = {k: v.float() for k, v in losses.items()}
        total = total_loss(losses)  # the one place terms are summed
        keys = list(losses)
        values = torch.stack([total.detach(), *(v.detach() for v in losses.values())])
        bad = ~torch.isfinite(values)
        flags = torch.zeros(len(FLAG_SLOTS), device=values.device)
        slots = torch.tensor([_SLOT["total"], *(_SLOT[_task_of(k)] for k in keys)], device=values.device)
        flags.scatter_reduce_(0, slots, bad.float(), reduce="amax")
        # One small all-reduce launched before the backward and not waited for: every rank learns
        # whether any rank's loss is non-finite and which parameters get a gradient where. The
        # backward runs meanwhile (the gradient hooks arm the buckets once the sum has arrived),
        # so the ranks meet at the end of the backward, as DDP's do. (A batch whose labelled
        # tasks all sit in frozen modules has nothing to differentiate.)
        self.sync.agree(flags, total if total.requires_grad else None)
        if total.requires_grad:
            scaler.scale(total).backward()  # buckets are all-reduced from the gradient hooks meanwhile
        agreed = self.sync.finish()  # every rank's gradients averaged, or, on a non-finite step, dropped
        agree_s, allreduce_s = self.sync.stats.agree_wait_s, self.sync.stats.grad_wait_s
        vals = values.tolist()
        local = dict(zip(keys, vals[1:]))
        local_bad = any(not math.isfinite(v) for v in vals)
        if agreed.nonfinite:
            opt.zero_grad(set_to_none=True)
            names = [f"{k}={v}" for k, v in local.items() if not math.isfinite(v)]
            if not names and local_bad:
                names = [f"total={vals[0]} (every term finite: the sum overflowed)"]
            detail = _gather_names(names, self.rank)
            return StepOutput(
                losses=local, total=vals[0], reason="nonfinite_loss",
                nonfinite_tasks=_flagged(agreed.flags),
                nonfinite=detail, local_nonfinite=local_bad, grad_norm=None,
                loss_scale=self.precision.loss_scale, lr=lr, agree_s=agree_s,
            )
        if not agreed.any_grad:  # no trainable parameter gets a gradient on any rank
            return StepOutput(
                losses=local, total=vals[0], reason="no_grad", nonfinite_tasks=(), nonfinite=(),
                local_nonfinite=False, grad_norm=0.0, loss_scale=self.precision.loss_scale, lr=lr, agree_s=agree_s,
            )

        if scaler.is_enabled():
            scaler.unscale_(opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        if self.grad_clip is not None and grads:
            torch.nn.utils.clip_grads_with_norm_([p for p in self.params if p.grad is not None], self.grad_clip, norm, foreach=True)
        grad_norm = float(norm)
        reason = None
        if scaler.is_enabled():
            before = scaler.get_scale()
            scaler.step(opt)  # skips the update when the unscaled gradients hold inf/NaN
            scaler.update()
            if scaler.get_scale() < before:
                reason = "overflow"
        elif not math.isfinite(grad_norm):
            opt.zero_grad(set_to_none=True)
            reason = "nonfinite_grad"
        else:
            opt.step()
        return StepOutput(
            losses=local, total=vals[0], reason=reason, nonfinite_tasks=(),
            nonfinite=(f"gradient norm {grad_norm} with finite losses",) if reason == "nonfinite_grad" else (),
            local_nonfinite=False, grad_norm=grad_norm, loss_scale=self.precision.loss_scale, lr=lr,
            agree_s=agree_s, allreduce_s=allreduce_s,
        )


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss; the message names the loss terms."""


class NonFiniteGuard:
    """Counts consecutive non-finite steps (identical on every rank: the flags are agreed) and
    raises :class:`NonFiniteLossError` on every rank at the same step once ``limit`` is reached.
    An updated step resets the streak; scaler overflows and ``no_grad`` steps leave it as is."""

    def __init__(self, limit: int, *, streak: int = 0):
        self.limit = int(limit)
        self.streak = int(streak)

    def update(self, out: StepOutput, *, step: int, epoch: int) -> None:
        if out.counts_as_nonfinite:
            self.streak += 1
            if self.streak >= self.limit:
                raise NonFiniteLossError(
                    f"{self.streak} consecutive steps with non-finite losses (steps {step - self.streak + 1}..{step}, "
                    f"epoch {epoch}; failures.max_consecutive_nonfinite = {self.limit}); tasks "
                    f"{list(out.nonfinite_tasks)}; at step {step}: " + "; ".join(out.nonfinite)
                )
        elif out.reason is None:
            self.streak = 0


def _flagged(flag_sums: list[float]) -> tuple[str, ...]:
    """Flagged slots; ``total`` only when no task term was (the sum itself overflowed)."""
    tasks = tuple(s for s, f in zip(FLAG_SLOTS, flag_sums) if f > 0 and s != "total")
    return tasks or (("total",) if flag_sums[_SLOT["total"]] > 0 else ())


def _gather_names(names: list[str], rank: int) -> tuple[str, ...]:
    """Every rank's non-finite terms, as ``"rank R: key=value"`` (a collective)."""
    if world_size() > 1:
        return tuple(f"rank {r}: {n}" for r, ns in enumerate(all_gather_objects(names)) for n in ns)
    return tuple(f"rank {rank}: {n}" for n in names)
