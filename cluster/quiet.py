"""One line, not a traceback, for Ray Train's own transient warnings.

Ray Train's controller polls two services with short timeouts and logs a failed poll as a
warning *with its traceback* (``exc_info=True``): the preemption watcher
(``PreemptionWatcher poll failed``) and the autoscaling coordinator's client. On a busy machine
a poll times out now and then (``GetTimeoutError``), the run carries on and succeeds, and the
user's terminal shows Python tracebacks of a run that had no error. :func:`quiet_ray_warnings`
keeps each such warning and its cause as one line.

It must run in Ray's worker processes (the controller is an actor): the embedded cluster
(:func:`cluster.local.connect`) and every stage job the orchestrator submits name it as the
runtime environment's ``worker_process_setup_hook`` (:data:`SETUP_HOOK`).
"""

from __future__ import annotations

import logging

#: Import path of :func:`quiet_ray_warnings` for ``runtime_env={"worker_process_setup_hook": ...}``.
SETUP_HOOK = "cluster.quiet.quiet_ray_warnings"

#: Loggers of Ray Train's periodic polls whose failures are transient and retried.
POLL_LOGGERS = (
    "ray.train.v2._internal.execution.preemption",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


class OneLineExceptions(logging.Filter):
    """Turns a record's traceback into ``message (ExcType: text)`` on the same line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = " ".join(str(exc).split())
            record.msg = f"{record.getMessage()} ({type(exc).__name__}{': ' + text if text else ''})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_ray_warnings() -> None:
    """Install :class:`OneLineExceptions` on Ray Train's poll loggers (idempotent)."""
    for name in POLL_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, OneLineExceptions) for f in log.filters):
            log.addFilter(OneLineExceptions())
