"""The optimizer (AdamW, fused where possible, apex when importable) and the step-decay schedule.

The learning rate is a pure function of the global step (:func:`lr_at`), set on the optimizer
before every step: a resumed run recomputes it from the restored position, so there is no
scheduler state that could drift from the data position.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from data_pipeline.errors import VTDInputError
from vtd_train.train.config import LRScheduleConfig, OptimizerConfig

log = logging.getLogger(__name__)


def _apex_optimizers():
    try:
        import apex.optimizers as ao  # NVIDIA apex (built from source / NVIDIA containers)
    except ImportError:
        return None
    return ao if hasattr(ao, "FusedAdam") else None  # the PyPI "apex" is an unrelated package


def build_optimizer(params: Sequence[nn.Parameter], cfg: OptimizerConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer over ``params`` and a description of which implementation runs.

    ``auto``: apex ``FusedAdam(adam_w_mode=True)`` on CUDA when apex is importable, otherwise
    ``torch.optim.AdamW`` with ``fused=True`` when the device supports it (CUDA, CPU in recent
    torch), else ``foreach``. Every variant skips parameters whose ``grad`` is ``None``.
    """
    params = list(params)
    if not params:
        raise VTDInputError("no trainable parameters: every parameter is frozen (check `freeze`)")
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    impl = cfg.implementation
    if impl != "torch":
        ao = _apex_optimizers()
        usable = ao is not None and device.type == "cuda"
        if impl in ("apex_adam", "apex_lamb") and not usable:
            why = "apex is not importable" if ao is None else f"apex optimizers need CUDA, the workers run on {device.type}"
            raise VTDInputError(f"optimizer.implementation {impl!r}: {why}")
        if usable and impl == "apex_lamb":
            return ao.FusedLAMB(params, **kw), "apex.optimizers.FusedLAMB"
        if usable:
            return ao.FusedAdam(params, adam_w_mode=True, **kw), "apex.optimizers.FusedAdam(adam_w_mode=True)"
    if cfg.fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw), "torch.optim.AdamW(fused=True)"
        except (RuntimeError, ValueError) as e:  # device or dtype without a fused kernel
            log.info("fused AdamW unavailable on %s (%s); using foreach", device, e)
    return torch.optim.AdamW(params, foreach=True, **kw), "torch.optim.AdamW(foreach=True)"


def lr_at(step: int, *, base_lr: float, steps_per_epoch: int, cfg: LRScheduleConfig, total_steps: int | None = None) -> float:
    """Learning rate of global step ``step`` (0-based): ``step`` policy: ``base_lr × gamma^k``
    where ``k`` is the number of milestones ``m`` with ``step >= m × steps_per_epoch``; ``poly``:
    ``base_lr × (1 − step / total_steps)^power``; times the linear warm-up factor during the
    first ``warmup_steps`` steps."""
    if cfg.policy == "poly":
        if not total_steps:
            raise ValueError("the poly schedule needs total_steps")
        lr = base_lr * max(0.0, 1.0 - step / total_steps) ** cfg.power
    else:
        k = sum(step >= m * steps_per_epoch for m in cfg.milestones)
        lr = base_lr * cfg.gamma**k
    if step < cfg.warmup_steps:
        a = step / cfg.warmup_steps
        lr *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * a
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def check_freeze_prefixes(model: nn.Module, prefixes: Sequence[str]) -> None:
    """A freeze prefix that matches no parameter of ``model`` is an error (a typo would silently
    train all); ``model`` is not changed."""
    names = [n for n, _ in model.named_parameters()]
    for pre in prefixes:
        pre = pre.rstrip(".")
        if not any(n == pre or n.startswith(pre + ".") for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise VTDInputError(f"freeze: prefix {pre!r} matches no parameter of the model; top-level modules: {tops}")


def freeze(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every parameter under one of the module-name ``prefixes``
    (``backbone``, ``fpn``, ``seg_decoders.sem``...) and return the trainable ones, in model
    order. A prefix that matches no parameter is an error (a typo would silently train all)."""
    check_freeze_prefixes(model, prefixes)
    pres = tuple(p.rstrip(".") for p in prefixes)
    trainable = []
    for n, p in model.named_parameters():
        if any(n == pre or n.startswith(pre + ".") for pre in pres):
            p.requires_grad_(False)
        elif p.requires_grad:
            trainable.append(p)
    return trainable
