"""Ray Train's transient poll failures reach the terminal as one line, not a traceback."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from cluster.quiet import POLL_LOGGERS, OneLineExceptions, quiet_ray_warnings

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.ray
def test_the_embedded_cluster_listens_on_loopback_only(ray_cluster, scraped_run):
    """Every listening socket of the embedded cluster's processes (GCS, raylet, agents, workers,
    the metrics export) is on the loopback interface, and so were those of the suite's 2-worker
    training run while it ran (``scraped_run``): torch's rendezvous store on rank 0
    (``vtd_train.train.rendezvous``) and the gloo pairs (``cluster.local.one_machine_env``), both
    on every interface before."""
    from conftest import cluster_listeners

    listening = cluster_listeners()
    ports = {port for _, _, port, _ in listening}
    assert ray_cluster.metrics_export_port in ports and int(ray_cluster.address.rsplit(":", 1)[1]) in ports
    assert len({p for p, _, _, _ in listening}) >= 3, listening  # GCS, raylet, agents at least
    seen = set(listening) | scraped_run["listeners"]
    workers = {x for x in seen if "RayTrainWorker" in x[3]}
    assert len({pid for pid, _, _, _ in workers}) == 2, f"both ranks' sockets seen while they trained: {sorted(seen)}"
    outside = [x for x in seen if x[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not outside, outside


@pytest.mark.ray
def test_another_process_joins_the_loopback_cluster_by_its_address(ray_cluster):
    """A second driver (``vtd train --address 127.0.0.1:PORT`` beside the embedded cluster) joins
    it: without Ray's local-only mode in that process too, Ray would rewrite the loopback host to
    the machine's external address, where nothing listens, and give up after a minute."""
    import subprocess
    import sys

    code = ("import ray; from cluster.local import connect; "
            f"info = connect({ray_cluster.address!r}); print('CPUS', info.num_cpus, flush=True); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert out.returncode == 0 and f"CPUS {ray_cluster.num_cpus}" in out.stdout, out.stdout + out.stderr[-2000:]
