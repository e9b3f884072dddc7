"""Ray Train's transient poll failures reach the terminal as one line, not a traceback."""

from __future__ import annotations

import io
import logging

import pytest

from cluster.quiet import POLL_LOGGERS, OneLineExceptions, quiet_ray_warnings


def _log_with_traceback(logger: logging.Logger) -> str:
    from ray.exceptions import GetTimeoutError

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        try:
            raise GetTimeoutError("Get timed out: some object(s) not ready.")
        except GetTimeoutError:
            logger.warning("PreemptionWatcher poll failed for %s", "node-1", exc_info=True)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_a_poll_failure_is_one_line_with_its_cause():
    name = POLL_LOGGERS[0]
    logger = logging.getLogger(name)
    saved = list(logger.filters)
    try:
        for f in saved:
            logger.removeFilter(f)
        assert "Traceback" in _log_with_traceback(logger)  # Ray's own behaviour
        quiet_ray_warnings()
        quiet_ray_warnings()  # idempotent
        assert sum(isinstance(f, OneLineExceptions) for f in logger.filters) == 1
        text = _log_with_traceback(logger)
        assert text == "WARNING PreemptionWatcher poll failed for node-1 (GetTimeoutError: Get timed out: some object(s) not ready.)\n"
    finally:
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in saved:
            logger.addFilter(f)


@pytest.mark.ray
def test_the_embedded_clusters_workers_install_it(ray_cluster):
    """The controller of a training run is a Ray actor: the filter must be in Ray's worker
    processes, which the embedded cluster's runtime environment sets up (its setup hook)."""
    import ray

    @ray.remote(num_cpus=0.01)
    class Probe:
        def filters(self) -> list[list[str]]:
            return [[type(f).__name__ for f in logging.getLogger(n).filters] for n in POLL_LOGGERS]

    probe = Probe.remote()
    try:
        assert ray.get(probe.filters.remote(), timeout=120) == [["OneLineExceptions"]] * len(POLL_LOGGERS)
    finally:
        ray.kill(probe)
