"""A one-machine development Ray cluster: a head and N worker nodes, each its own ``ray start``.

``vtd cluster up`` starts it, ``vtd cluster status`` looks at it, ``vtd cluster down`` stops it.
It is a real multi-node cluster (one GCS, one raylet per node, the dashboard and its Jobs API on
the head), so a pipeline submitted to it (``vtd jobs submit ... --address <its Jobs API>``) runs
its stage jobs and their Ray workers across nodes as on a cloud cluster, only on one machine.

What keeps it apart from every other Ray cluster on the machine (a test session's embedded one,
another user's, a second dev cluster) — lessons of :mod:`cluster.local`:

- **its own temp root** (``/tmp/vtd-dev-XXXX/<node>``): Ray resolves the address ``auto`` through
  ``<temp root>/ray_current_cluster``, and the job supervisor hands every stage job's driver the
  address found there; a shared root would send them to whichever cluster started last;
- **its own ports, chosen free**: the GCS, the dashboard / Jobs API, the Ray Client server, each
  node's dashboard agent (whose default, 52365, collides between clusters: the Jobs API then
  answers "No available agent") and metrics export port; worker processes bind random ports;
- **stopped by process, never with ``ray stop``** (which stops every Ray process of the user on
  the machine): each node runs as ``ray start --block`` in a session of its own; ``down`` stops
  those processes, then whatever they left (their descendants, and any process whose command line
  names the cluster's temp root), and checks that none is left.

Token authentication stays on (Ray 2.60's default for new clusters): the nodes run with
``RAY_AUTH_MODE=token`` (unless the environment sets it) and the token in ``~/.ray/auth_token``
(created once with ``ray get-auth-token --generate`` when there is none), which the Jobs client
of ``vtd jobs submit`` sends. The dashboard and its Jobs API listen on 127.0.0.1 only; Ray gives
the nodes the machine's own IP address (it never registers a node as 127.0.0.1).

The state file (``<dir>/cluster.json``; ``dir`` defaults to ``$VTD_DEV_CLUSTER_DIR`` or
``~/.vtd/dev-cluster``) records the addresses, each node's pid, start time, temp dir and ports;
``<dir>/logs/<node>.log`` holds each ``ray start``'s output.

The nodes advertise no GPUs (``--num-gpus 0``): nodes sharing one machine would each detect all of
its GPUs and hand the same devices out twice. GPU training runs on a cloud cluster
(``cluster/aws-gpu.yaml``) or an embedded local cluster (``vtd train``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from data_pipeline.errors import VTDInputError

STATE_FILE = "cluster.json"
FORMAT_VERSION = 1
HOST = "127.0.0.1"
#: Unix socket paths under a node's temp dir must stay below the kernel's 108 bytes; a node's
#: dir adds up to 10 (``/worker-NN``) and Ray about 63 (``/session_<date>_<pid>/sockets/plasma_store``).
MAX_TEMP_ROOT_LEN = 32
#: The smallest object store Ray accepts is 75 MB.
MIN_OBJECT_STORE_MB = 80


class DevClusterError(ConnectionError):
    """The dev cluster could not be started, reached or stopped (one line, naming what failed)."""


class NodeStartError(DevClusterError):
    """A node's ``ray start`` exited while the cluster came up."""

    def __init__(self, message: str, node: Node) -> None:
        super().__init__(message)
        self.node = node


def default_dir() -> str:
    return os.environ.get("VTD_DEV_CLUSTER_DIR") or os.path.join(os.path.expanduser("~"), ".vtd", "dev-cluster")


@dataclass(frozen=True, kw_only=True)
class Node:
    """One node: its ``ray start --block`` process (pid + start time identify it) and ports."""

    name: str                   # head, worker-1, worker-2, ...
    pid: int
    create_time: float          # psutil's, to tell our process from a later one given the same pid
    temp_dir: str
    log: str
    num_cpus: int
    metrics_export_port: int
    dashboard_agent_port: int


@dataclass(frozen=True, kw_only=True)
class DevCluster:
    """What ``up`` recorded (``<dir>/cluster.json``)."""

    dir: str
    temp_root: str
    gcs_address: str            # NODE_IP:PORT: ray.init(address=...), vtd train --address
    dashboard_url: str          # http://127.0.0.1:PORT, the dashboard and the Jobs API: vtd jobs submit --address
    client_address: str         # Ray Client: ray://HOST:PORT
    created_at: float
    nodes: tuple[Node, ...] = field(default_factory=tuple)

    @property
    def state_file(self) -> str:
        return os.path.join(self.dir, STATE_FILE)

    def save(self) -> None:
        doc = {"format_version": FORMAT_VERSION, **asdict(self)}
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, directory: str) -> DevCluster | None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                doc = json.load(f)
            if doc.pop("format_version", None) != FORMAT_VERSION:
                raise ValueError(f"format_version is not {FORMAT_VERSION}")
            doc["nodes"] = tuple(Node(**n) for n in doc["nodes"])
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as e:
            raise VTDInputError(f"{path}: not a dev cluster state file ({e}); remove it if no cluster of it runs") from None


# ---------------------------------------------------------------------------------------------
# Processes


def _process(node: Node) -> psutil.Process | None:
    """The node's ``ray start`` process if it still runs (and is ours, not a reused pid)."""
    try:
        p = psutil.Process(node.pid)
        if abs(p.create_time() - node.create_time) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def _cluster_processes(cluster: DevCluster) -> list[psutil.Process]:
    """Every process of the cluster: each node's ``ray start`` and its descendants, and any
    process whose command line names the cluster's temp root (one its parent left behind)."""
    found: dict[int, psutil.Process] = {}
    for node in cluster.nodes:
        p = _process(node)
        if p is not None:
            found[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    found.setdefault(c.pid, c)
            except psutil.Error:
                pass
    for p in psutil.process_iter(["cmdline"]):
        if any(cluster.temp_root in arg for arg in p.info.get("cmdline") or []):
            found.setdefault(p.pid, p)
    found.pop(os.getpid(), None)
    return list(found.values())


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _stop(cluster: DevCluster, timeout_s: float = 20.0) -> int:
    """Stop every process of the cluster: SIGTERM to each node's ``ray start`` (workers first; Ray
    then stops its own processes), SIGKILL to what is left after ``timeout_s``. Returns how many
    processes were running; raises when one survives SIGKILL."""
    procs = _cluster_processes(cluster)
    if not procs:
        return 0
    roots = [p for n in reversed(cluster.nodes) if (p := _process(n)) is not None]
    for p in roots:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        # a raylet may start a worker while it shuts down: look again
        procs = list({p.pid: p for p in procs + _cluster_processes(cluster)}.values())
        if not _alive(procs):
            return len(procs)
        time.sleep(0.3)
    left = _alive(list({p.pid: p for p in procs + _cluster_processes(cluster)}.values()))
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=5)
    if still:
        raise DevClusterError(f"dev cluster {cluster.dir}: processes still running after SIGKILL: "
                              f"{', '.join(str(p.pid) for p in still)}")
    return len(procs)


# ---------------------------------------------------------------------------------------------
# Ports, token, readiness


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _free_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct TCP ports free a moment ago, none in ``taken``."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            port = int(s.getsockname()[1])
            if port not in taken:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_binary() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise DevClusterError("the `ray` command is not installed beside this Python or on PATH")
    return found


def _ensure_token(env: dict[str, str]) -> None:
    """A token for Ray's token authentication: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``; the last is created (Ray's own command) when there is none."""
    if env.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if env.get("RAY_AUTH_TOKEN") or (env.get("RAY_AUTH_TOKEN_PATH") and os.path.exists(env["RAY_AUTH_TOKEN_PATH"])):
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    proc = subprocess.run([_ray_binary(), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise DevClusterError(f"`ray get-auth-token --generate` failed: {_last_line(proc.stderr or proc.stdout)}")


def _last_line(text: str) -> str:
    """The error a ``ray start`` log ends with: its last ``...Error: msg`` / ``Exception: msg``
    line (with the next line when the message is empty), else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        m = re.match(r"^[\w.]*(Error|Exception):(.*)$", lines[i])
        if m:
            msg = m.group(0) if m.group(2).strip() or i + 1 == len(lines) else f"{m.group(0)} {lines[i + 1]}"
            return msg[:400]
    return lines[-1][:400] if lines else "(no output)"


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return _last_line(f.read()[-20000:])
    except OSError:
        return "(no log)"


def _jobs_client(dashboard_url: str):
    from orchestrator.runner import JobsClient  # sends the token as `ray job submit` does

    return JobsClient(dashboard_url)


def _alive_nodes(dashboard_url: str) -> list[dict]:
    """The cluster's alive nodes, from the dashboard's State API."""
    from ray.util.state import list_nodes

    from cluster.local import use_local_token

    use_local_token()
    nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return [n if isinstance(n, dict) else asdict(n) for n in nodes]


def _wait(what: str, ready: Callable[[], bool], started: list[tuple[Node, subprocess.Popen]], timeout_s: float) -> None:
    """Wait until ``ready()``; fail at once (with the log's error line) when a node's ``ray
    start`` exits, or after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        for node, proc in started:
            rc = proc.poll()
            if rc is not None:
                raise NodeStartError(f"`ray start` of the {node.name} node exited with status {rc}: "
                                     f"{_log_tail(node.log)} (log: {node.log})", node)
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet: the dashboard refuses or answers half-started
            pass
        if time.time() > deadline:
            logs = "; ".join(f"{n.log}: {_log_tail(n.log)}" for n, _ in started)
            raise DevClusterError(f"{what} not ready after {timeout_s:.0f} s ({logs})")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# up / down / status


def up(directory: str | None = None, *, workers: int = 1, num_cpus: int | None = None, head_cpus: int = 1,
       object_store_mb: int = 512, port: int | None = None, dashboard_port: int | None = None,
       timeout_s: float = 120.0, say: Callable[[str], None] = print) -> DevCluster:
    """Start a head and ``workers`` worker nodes, each a ``ray start --block`` process with its
    own temp dir and ports, and wait until every node has joined and the Jobs API answers.

    ``num_cpus``: logical CPUs of each worker node (default: this machine's cores shared out
    over the workers, at least 1); ``head_cpus``: the head's (the stage jobs' drivers may run
    there; 0 keeps all work on the worker nodes). ``port`` / ``dashboard_port``: the GCS and
    dashboard ports (default: free ones). Raises :class:`VTDInputError` for bad arguments (a
    port in use, a cluster already up) and :class:`DevClusterError` when a node fails to start;
    whatever was started is then stopped again."""
    directory = os.path.abspath(directory or default_dir())
    if workers < 0:
        raise VTDInputError(f"--workers: expected 0 or more worker nodes, got {workers}")
    if num_cpus is None:
        num_cpus = max(1, (os.cpu_count() or 1) // max(workers, 1))
    if num_cpus < 1:
        raise VTDInputError(f"--num-cpus: expected at least 1 CPU per worker node, got {num_cpus}")
    if head_cpus < 0:
        raise VTDInputError(f"--head-cpus: expected 0 or more, got {head_cpus}")
    if object_store_mb < MIN_OBJECT_STORE_MB:
        raise VTDInputError(f"--object-store-mb: Ray needs at least {MIN_OBJECT_STORE_MB} MB per node, got {object_store_mb}")
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if p is not None and not 1024 <= p <= 65535:
            raise VTDInputError(f"{flag}: expected a port from 1024 to 65535, got {p}")
        if p is not None and _port_in_use(p):
            raise VTDInputError(f"{flag} {p}: the port is in use on this machine; pick another or leave it out")
    if port is not None and port == dashboard_port:
        raise VTDInputError(f"--port and --dashboard-port are both {port}")

    os.makedirs(os.path.join(directory, "logs"), exist_ok=True)
    old = DevCluster.load(directory)
    if old is not None:
        if _cluster_processes(old):
            raise VTDInputError(f"a dev cluster is already up here (Jobs API {old.dashboard_url}, state {old.state_file}); "
                                "`vtd cluster down` first, or pass another --dir")
        say(f"(a stopped dev cluster was recorded in {old.state_file}: replaced)")
        shutil.rmtree(old.temp_root, ignore_errors=True)
        os.remove(old.state_file)

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.setdefault("RAY_AUTH_MODE", "token")
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"   # workers use this environment, no `uv run` venvs
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray gives the dashboard 60 s to come up, which a loaded machine can exceed
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(max(timeout_s, 60))))
    _ensure_token(env)
    ray = _ray_binary()

    temp_root = tempfile.mkdtemp(prefix="vtd-dev-")
    if len(temp_root) > MAX_TEMP_ROOT_LEN:
        shutil.rmtree(temp_root, ignore_errors=True)
        raise VTDInputError(f"temp dir {temp_root} is too long for Ray's socket paths; set TMPDIR to a short directory such as /tmp")
    given = {p for p in (port, dashboard_port) if p is not None}
    free = iter(_free_ports(3 + 2 * (workers + 1), given))  # GCS, dashboard, client; per node: metrics, agent
    gcs_port = port or next(free)
    dash_port = dashboard_port or next(free)
    client_port = next(free)
    # Ray registers nodes under the machine's own address, never 127.0.0.1 (the same function picks it)
    from ray._private.services import get_node_ip_address

    node_ip = get_node_ip_address()
    cluster = DevCluster(dir=directory, temp_root=temp_root, gcs_address=f"{node_ip}:{gcs_port}",
                         dashboard_url=f"http://{HOST}:{dash_port}", client_address=f"ray://{node_ip}:{client_port}",
                         created_at=time.time())
    # every process of the cluster (the raylets' workers inherit it) resolves the address "auto" to
    # this cluster: Ray Train's State API calls and a bare ray.init() would otherwise read the
    # default temp root's ray_current_cluster, i.e. whichever cluster started last on the machine
    env["RAY_ADDRESS"] = cluster.gcs_address

    ports = {name: (next(free), next(free)) for name in ["head", *(f"worker-{i + 1}" for i in range(workers))]}

    def start(name: str, args: list[str], cpus: int) -> tuple[Node, subprocess.Popen]:
        nonlocal cluster
        temp_dir = os.path.join(temp_root, name)
        metrics, agent = ports[name]
        log = os.path.join(directory, "logs", f"{name}.log")
        cmd = [ray, "start", "--block", f"--temp-dir={temp_dir}", f"--num-cpus={cpus}",
               "--num-gpus=0", f"--object-store-memory={object_store_mb * 1024 * 1024}",
               f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", *args]
        with open(log, "w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            # a session of its own: no terminal signal reaches it, and `up` may exit
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        node = Node(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), temp_dir=temp_dir,
                    log=log, num_cpus=cpus, metrics_export_port=metrics, dashboard_agent_port=agent)
        cluster = dataclasses.replace(cluster, nodes=(*(n for n in cluster.nodes if n.name != name), node))
        cluster.save()  # on record at once: an interrupted `up` leaves nothing `down` cannot find
        return node, proc

    def start_and_wait(specs: list[tuple[str, list[str], int]], what: str, ready: Callable[[], bool],
                       running: list[tuple[Node, subprocess.Popen]]) -> list[tuple[Node, subprocess.Popen]]:
        """Start nodes and wait for ``ready()``. A node whose raylet did not register within
        Ray's fixed 30 s (a busy machine: "timed out during startup") is started once more."""
        started = [start(*spec) for spec in specs]
        for attempt in (1, 2):
            try:
                _wait(what, ready, running + started, timeout_s)
                return started
            except NodeStartError as e:
                if attempt == 2 or "timed out during startup" not in str(e) or e.node.name not in {n for n, _, _ in specs}:
                    raise
                say(f"(the {e.node.name} node did not register in time, the machine is busy: starting it once more)")
                _stop(dataclasses.replace(cluster, temp_root=e.node.temp_dir, nodes=(e.node,)))
                spec = next(sp for sp in specs if sp[0] == e.node.name)
                started = [(n, p) for n, p in started if n.name != e.node.name] + [start(*spec)]
        raise AssertionError("unreachable")  # pragma: no cover

    try:
        # `ray start` writes the cluster's address file once the head is up; then the Jobs API must
        # answer, with our token
        address_file = os.path.join(temp_root, "head", "ray_current_cluster")
        head = start_and_wait([("head", ["--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
                                         f"--dashboard-host={HOST}", "--include-dashboard=true",
                                         f"--ray-client-server-port={client_port}"], head_cpus)],
                              f"the head (Jobs API at {cluster.dashboard_url})",
                              lambda: os.path.exists(address_file) and bool(_jobs_client(cluster.dashboard_url)), [])
        with open(address_file) as f:
            written = f.read().strip()
        if written != cluster.gcs_address:
            raise DevClusterError(f"the head registered as {written}, not {cluster.gcs_address} as its nodes were told")
        start_and_wait([(f"worker-{i + 1}", [f"--address={cluster.gcs_address}"], num_cpus) for i in range(workers)],
                       f"{workers} worker node(s) joining",
                       lambda: len(_alive_nodes(cluster.dashboard_url)) == 1 + workers, head)
    except BaseException:
        try:
            _stop(cluster)
        finally:
            os.remove(cluster.state_file)
            shutil.rmtree(temp_root, ignore_errors=True)
        raise
    return cluster


def down(directory: str | None = None, *, timeout_s: float = 20.0) -> tuple[DevCluster, int]:
    """Stop the dev cluster recorded in ``directory`` — exactly its processes — and remove its
    state file and temp dirs. Returns the cluster and how many processes were running; raises
    :class:`VTDInputError` when none is recorded there (a second ``down``)."""
    directory = os.path.abspath(directory or default_dir())
    cluster = DevCluster.load(directory)
    if cluster is None:
        raise VTDInputError(f"no dev cluster is recorded in {directory} (already down, or started with another --dir)")
    n = _stop(cluster, timeout_s=timeout_s)
    os.remove(cluster.state_file)
    shutil.rmtree(cluster.temp_root, ignore_errors=True)
    return cluster, n


def status(directory: str | None = None) -> dict:
    """The recorded cluster, whether each node's process runs, and the nodes the cluster itself
    reports alive (``cluster_nodes``; ``None`` when its dashboard does not answer)."""
    directory = os.path.abspath(directory or default_dir())
    cluster = DevCluster.load(directory)
    if cluster is None:
        raise VTDInputError(f"no dev cluster is recorded in {directory} (`vtd cluster up` starts one)")
    nodes = [{**asdict(n), "running": _process(n) is not None} for n in cluster.nodes]
    try:
        alive = _alive_nodes(cluster.dashboard_url)
        reported = [{"node_id": n["node_id"], "is_head": n.get("is_head_node"), "resources": n.get("resources_total")}
                    for n in alive]
    except Exception:  # noqa: BLE001 - a stopped or broken cluster: reported as such
        reported = None
    healthy = all(n["running"] for n in nodes) and reported is not None and len(reported) == len(nodes)
    return {**asdict(cluster), "nodes": nodes, "cluster_nodes": reported, "healthy": healthy,
            "state_file": cluster.state_file}


def describe(cluster: DevCluster) -> list[str]:
    """What ``up`` prints: where to submit, what Prometheus scrapes, how to stop it."""
    workers = [n for n in cluster.nodes if n.name != "head"]
    cpus = sum(n.num_cpus for n in cluster.nodes)
    return [
        f"dev cluster up: head + {len(workers)} worker node(s), {cpus} CPUs, temp dir {cluster.temp_root}",
        f"  dashboard + Jobs API: {cluster.dashboard_url}",
        f"  GCS address:          {cluster.gcs_address}   (vtd train|evaluate --address {cluster.gcs_address})",
        f"  Ray Client:           {cluster.client_address}",
        "  Prometheus metrics:   " + ", ".join(f"{n.name} http://{HOST}:{n.metrics_export_port}/metrics" for n in cluster.nodes),
        f"  submit:               vtd jobs submit jobs/cpf.yaml --profile tiny --address {cluster.dashboard_url}",
        f"  state:                {cluster.state_file}   (stop: vtd cluster down"
        f"{'' if cluster.dir == os.path.abspath(default_dir()) else f' --dir {cluster.dir}'})",
    ]
