"""Fault injection (``faults:`` in the run config): a NaN loss term, a killed worker process.

Used by the tests and for failure drills on a real cluster; everything is off by default and the
loop pays one attribute check per step for it.
"""

from __future__ import annotations

import logging
import os
import signal

from torch import Tensor

from vtd_train.train.config import FaultConfig

log = logging.getLogger(__name__)


def _wait_for_committed_checkpoints() -> None:
    """Let Ray register every checkpoint reported so far (the controller polls reports; a worker
    killed right after ``ray.train.report`` may otherwise die before its checkpoint is committed),
    so a drill restarts from a known checkpoint."""
    try:
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    except Exception as e:  # noqa: BLE001 - outside Ray Train or older Ray: kill anyway
        log.warning("fault injection: could not wait for committed checkpoints: %s", e)


class FaultInjector:
    def __init__(self, cfg: FaultConfig, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.nan_steps = frozenset(cfg.nan_steps) if cfg.nan_loss_term is not None and rank == cfg.nan_rank else frozenset()
        self.kill = cfg.kill_rank is not None and cfg.kill_rank == rank

    @property
    def loss_hook(self):
        return self._poison if self.nan_steps else None

    def _poison(self, step: int, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        key = self.cfg.nan_loss_term
        if step in self.nan_steps and key in losses:
            log.warning("fault injection: %s × NaN on rank %d at step %d", key, self.rank, step)
            losses = dict(losses)
            losses[key] = losses[key] * float("nan")
        return losses

    def before_step(self, step: int) -> None:
        """SIGKILL this worker process at ``kill_step`` unless ``kill_marker`` exists (once)."""
        if not self.kill or step != self.cfg.kill_step:
            return
        marker = self.cfg.kill_marker
        assert marker is not None
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"killed rank {self.rank} (pid {os.getpid()}) before step {step}\n".encode())
        os.close(fd)
        _wait_for_committed_checkpoints()
        log.warning("fault injection: killing rank %d (pid %d) before step %d", self.rank, os.getpid(), step)
        os.kill(os.getpid(), signal.SIGKILL)
