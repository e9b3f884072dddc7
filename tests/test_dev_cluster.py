"""The one-machine development cluster (``vtd cluster up|status|down``, cluster/dev.py): a head and a
worker node as separate ``ray start`` processes, a short part of the CPF pipeline submitted to it
with ``vtd jobs submit --stages``, and a ``down`` that stops exactly its processes.

It runs beside the test session's shared cluster (tests/conftest.py) without touching it: its own
processes, temp root and ports, started and stopped through the real ``vtd`` command line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from data_pipeline.errors import VTDInputError

REPO = Path(__file__).resolve().parent.parent


def vtd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "vtd_train.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def auth_token() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()


def get_json(url: str, token: str | None) -> object:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def running(pid: int, create_time: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - create_time) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def processes_naming(text: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if any(text in a for a in (p.info.get("cmdline") or [])):
            out.append(p.pid)
    return out


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing started


def test_bad_input_is_one_line_and_starts_nothing(tmp_path):
    d = tmp_path / "devc"
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = vtd("cluster", "up", "--dir", d, "--dashboard-port", busy, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"vtd: error: --dashboard-port {busy}: the port is in use on this machine; "
                                             "pick another or leave it out"], r.stderr
    assert not (d / "cluster.json").exists()
    # the same checks in-process (cheaper than a `vtd` per case)
    from cluster.dev import down, status, up

    for kwargs, needle in (({"workers": -1}, "--workers"), ({"num_cpus": 0}, "--num-cpus"),
                           ({"object_store_mb": 10}, "--object-store-mb"), ({"port": 80}, "--port")):
        with pytest.raises(VTDInputError, match=f"^{needle}"):
            up(str(d), **kwargs)
    for fn in (down, status):
        with pytest.raises(VTDInputError, match=f"^no dev cluster is recorded in {d}"):
            fn(str(d))
    assert not d.exists() or not any(d.iterdir())
    r = vtd("jobs", "submit", "jobs/cpf.yaml", "--stages", "eval-untraind", "--address", "http://127.0.0.1:1", timeout=120)
    assert r.returncode == 2 and "--stages: unknown stage(s) ['eval-untraind']" in r.stderr, r.stderr


def test_stage_selection_takes_what_the_named_stages_need():
    from orchestrator.spec import load_pipeline
    from orchestrator.stages import select_stages, with_evaluations

    stages = with_evaluations(load_pipeline(str(REPO / "jobs" / "cpf.yaml"), profile="tiny"))
    assert list(select_stages(stages, ["eval-untrained"])) == ["untrained", "eval-untrained"]
    assert list(select_stages(stages, ["untrained"])) == ["untrained"]
    joint = select_stages(stages, ["joint"])
    assert set(joint) == {"curriculum_loc", "curriculum_ins_pose", "baseline_sem", "baseline_pose", "pseudo_labels", "joint"}
    assert list(joint) == [n for n in stages if n in joint], "pipeline order is kept"
    assert select_stages(stages, None) == stages
    with pytest.raises(VTDInputError, match=r"unknown stage\(s\) \['nope'\]"):
        select_stages(stages, ["untrained", "nope"])


# ---------------------------------------------------------------------------------------------
# The real thing


def job_driver_address() -> str:
    """The ``RAY_ADDRESS`` a job submitted to the test session's cluster gets for its driver."""
    import ray

    from orchestrator.cli import _connect_jobs_api

    client = _connect_jobs_api("http://" + ray._private.worker.get_dashboard_url()).client
    job = client.submit_job(entrypoint=f"{sys.executable} -c \"import os; print('ADDR=' + os.environ['RAY_ADDRESS'])\"")
    deadline = time.time() + 240
    while (status := str(client.get_job_status(job))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, f"job {job} still {status}"
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs
    return next(ln[5:].strip() for ln in logs.splitlines() if ln.startswith("ADDR="))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_dev_cluster_runs_pipeline_stages_and_down_stops_exactly_its_processes(ray_cluster, tiny_shards, tmp_path):
    # stands in for another cluster's process on this machine: `ray stop` would kill it (its
    # command line names log_monitor.py), `vtd cluster down` must not
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(900)", "log_monitor.py"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dev_cluster(tiny_shards, tmp_path, bystander, ray_cluster.address)
    finally:
        bystander.kill()
        bystander.wait()


def run_dev_cluster(tiny_shards: str, tmp_path: Path, bystander: subprocess.Popen, session_gcs: str) -> None:
    d = tmp_path / "devc"
    state_file = d / "cluster.json"
    t0 = time.time()
    up = vtd("cluster", "up", "--dir", d, "--workers", 1, "--num-cpus", 2, "--head-cpus", 0, "--object-store-mb", 256)
    t_up = time.time() - t0
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads(state_file.read_text())
        dash, nodes, temp_root = state["dashboard_url"], state["nodes"], state["temp_root"]
        head, worker = nodes
        assert (head["name"], worker["name"]) == ("head", "worker-1")
        # up printed where to submit and what Prometheus scrapes
        assert f"dashboard + Jobs API: {dash}" in up.stdout and state["gcs_address"] in up.stdout
        for n in nodes:
            assert f"{n['name']} http://127.0.0.1:{n['metrics_export_port']}/metrics" in up.stdout
            assert running(n["pid"], n["create_time"])
            assert n["temp_dir"].startswith(temp_root + "/")
        ports = {state["gcs_address"].rsplit(":", 1)[1], dash.rsplit(":", 1)[1],
                 *(str(n[k]) for n in nodes for k in ("metrics_export_port", "dashboard_agent_port"))}
        assert len(ports) == 6 and "52365" not in ports and "8265" not in ports, f"its own free ports: {ports}"
        assert processes_naming(temp_root), "the cluster's Ray processes name its temp root"
        # each node's metrics agent serves Ray's metrics for Prometheus
        for n in nodes:
            with urllib.request.urlopen(f"http://127.0.0.1:{n['metrics_export_port']}/metrics", timeout=30) as r:
                assert b"ray_" in r.read()
        # the cluster sees both nodes; the head takes no work (0 CPUs), the worker 2 CPUs
        st = vtd("cluster", "status", "--dir", d, "--json")
        assert st.returncode == 0, st.stderr
        seen = json.loads(st.stdout)["cluster_nodes"]
        assert sorted(n["resources"].get("CPU", 0) for n in seen) == [0, 2], seen
        head_id = next(n["node_id"] for n in seen if n["is_head"])
        worker_id = next(n["node_id"] for n in seen if not n["is_head"])
        # a second cluster in the same place is refused while this one runs
        again = vtd("cluster", "up", "--dir", d)
        assert again.returncode == 2 and "already up" in again.stderr and len(again.stderr.strip().splitlines()) == 1
        # `vtd train|evaluate --address GCS` join it the way they do (cluster.local.connect, with
        # the token); its processes resolve the address "auto" to it, not to another cluster here
        probe = subprocess.run([sys.executable, "-c", (
            "import json, os, ray; from cluster.local import connect; info = connect(os.environ['GCS']); "
            "f = ray.remote(num_cpus=1)(lambda: os.environ.get('RAY_ADDRESS')); "
            "print(json.dumps([info.address, info.num_cpus, ray.get(f.remote())]))")],
            cwd=REPO, env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "GCS": state["gcs_address"]},
            capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert json.loads(probe.stdout.strip().splitlines()[-1]) == [state["gcs_address"], 2.0, state["gcs_address"]]
        # with two clusters on the machine, a job submitted to the session's embedded cluster
        # runs its driver there: the job supervisor resolves "auto" against the cluster's temp
        # root (cluster.local writes the address file ``ray start`` writes), not against any GCS
        # process it finds (measured before: stage jobs of one embedded cluster ran on another)
        assert job_driver_address() == session_gcs
        # token authentication is on: the Jobs API refuses a request without the token
        with pytest.raises(urllib.error.HTTPError) as e:
            get_json(f"{dash}/api/jobs/", None)
        assert e.value.code in (401, 403)

        t1 = time.time()
        sub = vtd("jobs", "submit", "jobs/cpf.yaml", "--profile", "tiny", "--stages", "eval-untrained", "--address", dash,
                  "--data", tiny_shards, "--storage", tmp_path / "runs", timeout=600)
        t_submit = time.time() - t1
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        manifest = json.loads((tmp_path / "runs" / "cpf-tiny" / "pipeline.json").read_text())
        assert manifest["state"] == "succeeded" and manifest["cluster"]["jobs_api"] == dash
        assert manifest["orchestrator"]["stages"] == ["untrained", "eval-untrained"]
        assert {k: v["state"] for k, v in manifest["stages"].items()} == {"untrained": "succeeded", "eval-untrained": "succeeded"}
        assert manifest["stages"]["eval-untrained"]["outputs"]["scores"]["vtda"] is not None
        # the stage jobs ran on this cluster: its Jobs API lists them, finished, on its nodes; the
        # evaluation (1 CPU) had to run on the worker node, the head having none
        jobs = {j["submission_id"]: j for j in get_json(f"{dash}/api/jobs/", auth_token())}
        for name in ("untrained", "eval-untrained"):
            job = jobs[manifest["stages"][name]["job_id"]]
            assert job["status"] == "SUCCEEDED" and job["metadata"]["stage"] == name
            assert job["driver_node_id"] in (head_id, worker_id)
        assert jobs[manifest["stages"]["eval-untrained"]["job_id"]]["driver_node_id"] == worker_id
    finally:
        t2 = time.time()
        down = vtd("cluster", "down", "--dir", d)
        t_down = time.time() - t2
    assert down.returncode == 0, down.stderr
    assert "dev cluster down" in down.stdout
    # every process of it is gone, nothing else is touched
    assert not any(running(n["pid"], n["create_time"]) for n in nodes)
    assert processes_naming(temp_root) == []
    assert not os.path.exists(temp_root) and not state_file.exists()
    assert bystander.poll() is None, "`vtd cluster down` killed a process of another cluster"
    # a second down stops nothing and says so in one line
    again = vtd("cluster", "down", "--dir", d)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "no dev cluster" in again.stderr
    print(f"dev cluster: up {t_up:.0f} s, submit (untrained + eval-untrained) {t_submit:.0f} s, down {t_down:.0f} s")
