"""Which failures Ray Train retries, and the one line the CLI prints for a failed run.

Ray Train retries every worker-group failure up to ``FailureConfig.max_failures`` times, from
the last checkpoint. That is right for a lost worker or node, a collective timeout or a
preemption, and wrong for a deterministic error: a corrupt shard, a bad checkpoint, a config
that does not fit, a full disk or a denied permission fail again identically, after minutes of
restarts, and bury the cause in repeated tracebacks. :class:`FailFastPolicy` wraps Ray's own
policy: a failure where any worker raised a deterministic error (:func:`deterministic_cause`:
a :class:`~data_pipeline.errors.VTDInputError`, or an ``OSError`` for no space, no permission, a
read-only filesystem or an exceeded quota, anywhere in its cause chain) ends the run at once;
everything else goes to Ray's policy (retries, preemption budget). Ray Train 2.60 has no public
hook for a failure policy; :class:`TorchTrainer` passes ours to the controller in place of the
default one.

:func:`describe_failure` turns ``fit()``'s ``TrainingFailedError`` into one line naming the root
cause (the file, key or value of a deterministic error).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from ray.train.torch import TorchTrainer as _RayTorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import ControllerError, TrainingFailedError, WorkerGroupError

from data_pipeline.errors import VTDInputError

log = logging.getLogger(__name__)

#: ``OSError`` numbers that a retry does not cure.
DETERMINISTIC_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def deterministic_cause(exc: BaseException | None) -> BaseException | None:
    """The deterministic error in ``exc``'s cause/context chain (see the module docstring), or
    ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, VTDInputError):
            return exc
        if isinstance(exc, OSError) and exc.errno in DETERMINISTIC_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class FailFastPolicy(FailurePolicy):
    """Ray's failure policy, except that deterministic worker errors are raised at once."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError):
            for rank, err in sorted(training_failed_error.worker_failures.items()):
                cause = deterministic_cause(err)
                if cause is not None:
                    log.warning("rank %d: %s: %s — deterministic, not retried", rank, type(cause).__name__, _first_line(cause))
                    return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class TorchTrainer(_RayTorchTrainer):
    """Ray's ``TorchTrainer`` with :class:`FailFastPolicy` in front of the failure policy its
    ``FailureConfig`` builds (the seam is ``_initialize_and_run_controller``'s keyword).

    Without Ray Datasets (the service reads WebDataset shards in the workers), Ray's
    ``DatasetsCallback`` is left out: it starts a ``DatasetManager`` actor per run, with nothing
    to manage, whose process start (importing Ray Data and Train, 5-9 s on a 2-core node) competes
    with the workers' start."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        return callbacks

    def _initialize_and_run_controller(self, **kwargs: Any):
        policy = kwargs.get("failure_policy")
        if policy is not None and not isinstance(policy, FailFastPolicy):
            kwargs["failure_policy"] = FailFastPolicy(policy)
        return super()._initialize_and_run_controller(**kwargs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, VTDInputError):
        return _first_line(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename or "(the error names no path)"
        return f"{where}: {exc.strerror}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def describe_failure(run: str, error: TrainingFailedError) -> str:
    """One line for a failed run: the deterministic root cause when there is one (as its own
    message: file, key, value), else what failed last, on which rank."""
    if isinstance(error, WorkerGroupError):
        failures = sorted(error.worker_failures.items())
        for rank, err in failures:
            cause = deterministic_cause(err)
            if cause is not None:
                return f"run {run!r}: {_describe(cause)}"
        if failures:
            rank, err = failures[0]
            return f"run {run!r} failed (retries used up): rank {rank}: {_describe(err)}"
    if isinstance(error, ControllerError):
        cause = error.controller_failure
        return f"run {run!r}: Ray Train controller: {_describe(deterministic_cause(cause) or cause)}"
    return f"run {run!r} failed: {_first_line(error)}"
