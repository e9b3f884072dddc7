"""The training shell: everything about running VTDNet on Ray Train, nothing about the model.

Module map (one concern each):

- :mod:`~vtd_train.train.config` — ``TrainConfig`` (frozen dataclasses) from YAML, with errors naming file/key/value
- :mod:`~vtd_train.train.launch` — config checks, the ``TorchTrainer``, ``vtd train``
- :mod:`~vtd_train.train.loop` — the per-worker function: model, data, resume, the step loop
- :mod:`~vtd_train.train.step` — one step: autocast, loss sum, backward, non-finite agreement, optimizer step
- :mod:`~vtd_train.train.grad_sync` — presence-aware gradient averaging across ranks (the DDP replacement),
  overlapped with the backward; :mod:`~vtd_train.train.grad_buckets` — its bucket layout and graph walk
- :mod:`~vtd_train.train.amp` — autocast + GradScaler
- :mod:`~vtd_train.train.optim` — AdamW / apex, the step-decay schedule, freezing
- :mod:`~vtd_train.train.checkpointing` — training checkpoints (atomic, verified at load), RNG capture/restore
- :mod:`~vtd_train.train.recovery` — a run's checkpoints in storage: which one a resume uses, clean-up after a crash
- :mod:`~vtd_train.train.lease` — one owner per run: the lease in the run's storage directory
- :mod:`~vtd_train.train.failures` — deterministic errors are not retried; the one-line cause of a failed run
- :mod:`~vtd_train.train.reporting` — the one ``ray.train.report`` call and the progress line
- :mod:`~vtd_train.train.monitoring` — Prometheus metrics per rank
- :mod:`~vtd_train.train.faults` — fault injection for drills and tests

Submodules are imported lazily (``vtd --help`` must stay fast).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "TrainConfig": "config",
    "load_train_config": "config",
    "train_config_from_dict": "config",
    "run_training": "launch",
    "train_command": "launch",
    "train_loop_per_worker": "loop",
    "NonFiniteLossError": "step",
    "load_checkpoint": "checkpointing",
    "resume_checkpoint": "recovery",
    "hold_lease": "lease",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"vtd_train.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vtd_train.train' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from vtd_train.train.checkpointing import load_checkpoint
    from vtd_train.train.lease import hold_lease
    from vtd_train.train.recovery import resume_checkpoint
    from vtd_train.train.config import TrainConfig, load_train_config, train_config_from_dict
    from vtd_train.train.launch import run_training, train_command
    from vtd_train.train.loop import train_loop_per_worker
    from vtd_train.train.step import NonFiniteLossError
