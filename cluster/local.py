"""Connecting to a Ray cluster, or starting the embedded local one.

Every command that runs on Ray (``vtd train``, ``vtd evaluate``) goes through
:func:`connect`: with an address it joins that cluster (``auto`` or ``ray://...`` or
``host:port``); without one it starts a local cluster in this process with Ray's metrics
agent exporting Prometheus metrics on ``metrics_export_port`` (the same port KubeRay names
``metrics``, 8080, on every pod).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from cluster.quiet import SETUP_HOOK


@dataclass(frozen=True)
class ClusterInfo:
    """What the caller needs to know about the cluster it is on."""

    address: str
    embedded: bool
    metrics_export_port: int | None
    num_cpus: float
    num_gpus: float


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    metrics_export_port: int | None = None,
    include_dashboard: bool = True,
) -> ClusterInfo:
    """Join the cluster at ``address``, or start an embedded local one when it is ``None``.

    The embedded cluster runs Ray's dashboard by default: Ray Train's controller queries the
    State API it serves (without it, Train logs a warning every few seconds).

    Inside a Ray job (``RAY_ADDRESS`` set by the job supervisor) ``address=None`` joins the job's
    cluster: a pipeline stage's ``vtd train`` / ``vtd evaluate`` runs on the cluster it was
    submitted to.

    Idempotent within a process: when Ray is already initialised the existing connection is
    described and reused (a test session shares one cluster across all tests).
    """
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        res = ray.cluster_resources()
        return ClusterInfo(
            address=ctx.gcs_address, embedded=address is None, metrics_export_port=_metrics_port(),
            num_cpus=res.get("CPU", 0.0), num_gpus=res.get("GPU", 0.0),
        )
    if address is None and os.environ.get("RAY_ADDRESS"):
        # inside a Ray job (a pipeline stage): join the job's cluster, never start another
        address = os.environ["RAY_ADDRESS"]
    if address is None:
        port = metrics_export_port if metrics_export_port is not None else free_port()
        _loopback_only()
        with _free_agent_port():
            ctx = ray.init(
                num_cpus=num_cpus, include_dashboard=include_dashboard, _metrics_export_port=port,
                logging_level="warning", log_to_driver=True, _temp_dir=_own_temp_dir(),
                runtime_env={"worker_process_setup_hook": SETUP_HOOK},
            )
        _name_as_current(ctx.address_info["gcs_address"])
        embedded = True
    else:
        use_local_token()
        if _loopback_only_cluster(address):
            _loopback_only()
        try:
            ctx = ray.init(address=address, logging_level="warning")
        except ConnectionError as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {e}") from None
        port, embedded = None, False
    res = ray.cluster_resources()
    return ClusterInfo(
        address=ctx.address_info["gcs_address"], embedded=embedded,
        metrics_export_port=port if embedded else _metrics_port(),
        num_cpus=res.get("CPU", 0.0), num_gpus=res.get("GPU", 0.0),
    )


def _name_as_current(gcs_address: str) -> None:
    """Write the embedded cluster's GCS address where its own processes resolve ``auto``.

    Ray's job supervisor starts every job's driver with ``RAY_ADDRESS`` resolved from ``auto``
    against the cluster's temp root: the ``ray_current_cluster`` file there, which ``ray start``
    writes and ``ray.init`` does not; without it Ray falls back to any GCS process it finds on the
    machine. Measured (2026-12-05): with two embedded clusters on one machine (a demo and a test
    run), stage jobs submitted to the first cluster's Jobs API ran their ``vtd train`` on the
    second one."""
    temp_dir = ray._private.worker._global_node.get_temp_dir_path()
    ray._private.utils.write_ray_address(gcs_address, temp_dir)


def _loopback_only() -> None:
    """Make the embedded cluster's every server listen on the loopback interface only.

    Ray binds its servers (GCS, raylet, object manager, the workers' gRPC servers, the agents,
    the metrics export) to the node's IP, and on Linux it replaces a loopback node address with
    the machine's external one (``resolve_ip_for_localhost``): measured, an embedded cluster
    listened on the external address, its metrics endpoint answering anyone unauthenticated.
    Ray's local-only mode (``ENABLE_RAY_CLUSTER`` off, what it runs on macOS and Windows) keeps
    the node address at loopback; it is read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` by every
    process the cluster starts and, Ray being imported
    here, set on Ray's constants in this process; the cluster's processes get it through the
    node's environment (:func:`_free_agent_port`), so other programs this process starts (a
    ``vtd cluster up``, a pipeline's drivers) keep Ray's default. A cluster joined with
    ``--address`` is unaffected: this runs only for the embedded one, whose process owns it."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _loopback_only_cluster(address: str) -> bool:
    """Whether ``address`` (``host:port`` on this machine) is an embedded cluster of ours, whose
    GCS listens on loopback only (:func:`_loopback_only`).

    Joining it needs Ray's local-only mode in this process too: otherwise Ray replaces the
    loopback host with the machine's external address (``resolve_ip_for_localhost``), where
    nothing listens, and the join fails after a minute of retries (measured: a ``vtd train
    --address 127.0.0.1:PORT`` beside a test session's embedded cluster). A cluster started with
    ``ray start`` listens on the node's address and is joined the default way, whatever host the
    user spelled."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        return False
    from ray._private.services import node_ip_address_from_perspective

    external = node_ip_address_from_perspective()
    if external.startswith("127.") or not _listening("127.0.0.1", int(port)):
        return False
    return not _listening(external, int(port))


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def use_local_token() -> None:
    """Send this machine's Ray auth token to a cluster we join, as ``ray job submit`` does: Ray
    2.60 turns token authentication on by default for new clusters, and a client process uses the
    token file (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH``) or ``RAY_AUTH_TOKEN`` only once
    token mode is enabled in it (``RAY_AUTH_MODE`` set explicitly is respected). Without it
    ``ray.init(address=...)`` and the Jobs API of such a cluster refuse us."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _own_temp_dir() -> str | None:
    """A temp root of the embedded cluster's own (``RAY_TMPDIR`` wins when set).

    Ray resolves the address ``auto`` through ``<temp root>/ray_current_cluster``, the file the
    latest cluster started on the machine wrote. Ray's job supervisor gives every job's driver
    that ``auto`` address, and ``ray.init()`` without an address joins that cluster: with a shared
    root, a stage job of our cluster would join (or hang on) whichever cluster started last on
    the machine, and the embedded cluster itself would join someone's ``ray start``."""
    if os.environ.get("RAY_TMPDIR"):
        return None
    return tempfile.mkdtemp(prefix="vtd-ray-")


def one_machine_env() -> dict[str, str]:
    """Settings for the processes of the embedded cluster, one machine on loopback that nothing
    drains (clusters joined with ``--address``, KubeRay or ``vtd cluster up``, keep the defaults):

    - gloo's and NCCL's sockets on the loopback interface (``GLOO_SOCKET_IFNAME`` /
      ``NCCL_SOCKET_IFNAME``): measured, a 2-worker run's gloo pairs listened on ``::``, every
      interface, while the rest of the cluster was on 127.0.0.1 (torch's rendezvous store:
      ``vtd_train.train.rendezvous``);
    - no Ray Train preemption watcher (an actor process per run polling Ray's node-drain state
      for spot and autoscaler reclaims: nothing to watch on one machine)."""
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    import psutil

    lo = next((name for name, addrs in psutil.net_if_addrs().items()
               if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs)), None)
    if lo:
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


@contextlib.contextmanager
def _free_agent_port() -> Iterator[None]:
    """Start the embedded cluster's dashboard agent on a free port (and its GCS on a known one,
    named to the cluster's processes as ``RAY_ADDRESS``).

    ``ray.init`` has no argument for it and the agent's default port (52365) is fixed, so a
    second Ray cluster on one machine (a test run beside the demo, two users' demos) gets an
    agent without its HTTP server, and the Jobs API then answers every submission with "No
    available agent to submit job". ``ray start --dashboard-agent-listen-port`` is the
    supported way; for ``ray.init`` the default of Ray's node parameters is replaced while the
    cluster starts."""
    try:
        from ray._private import parameter
    except ImportError:  # pragma: no cover - a Ray without this module: keep its default
        yield
        return
    original = parameter.RayParams.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", free_port())
        if kwargs.get("gcs_server_port") is None:  # only the head of the embedded cluster
            from ray._private.services import get_node_ip_address

            kwargs["gcs_server_port"] = free_port()
            ip = kwargs.get("node_ip_address") or get_node_ip_address()
            # the cluster's own processes (and the workers the raylet starts) resolve the address
            # "auto" to this cluster, not to whichever Ray runs beside it on the machine: Ray
            # Train's placement-group cleaner asks the State API that way, and a trial Tune
            # stops would otherwise leak its workers' placement group
            from ray._private import ray_constants

            # ... and stay in Ray's local-only mode, on loopback (:func:`_loopback_only`)
            local_only = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"} if not ray_constants.ENABLE_RAY_CLUSTER else {}
            kwargs["env_vars"] = {**(kwargs.get("env_vars") or {}), **local_only, **one_machine_env(),
                                  "RAY_ADDRESS": f"{ip}:{kwargs['gcs_server_port']}"}
        original(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = original


def _metrics_port() -> int | None:
    """The metrics export port of the node this process runs on, if Ray reports one."""
    node_id = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n.get("NodeID") == node_id:
            return n.get("MetricsExportPort")
    return None
