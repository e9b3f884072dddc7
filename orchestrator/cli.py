"""``vtd jobs ...``: run a pipeline and look at it from another shell.

=====================================================  ==========================================
``vtd jobs run PIPELINE [--profile P] [--address A]``  run the orchestrator here: on an embedded
                                                       local Ray cluster by default, on the cluster
                                                       whose Jobs API is ``A``, or — inside a Ray
                                                       job (``ray job submit -- vtd jobs run``) —
                                                       on that job's cluster
``vtd jobs submit PIPELINE --address http://HEAD:8265``  the same from a laptop (``--address``
                                                       required)
``vtd jobs status PIPELINE``                           stages, states, attempts, jobs, VTDA
``vtd jobs logs PIPELINE STAGE``                       the stage's latest job's log
``vtd jobs cancel PIPELINE``                           stop every running stage job and the
                                                       orchestrator; a later ``run`` resumes
=====================================================  ==========================================

Every command takes ``--profile`` (default ``tiny``), ``--run`` (default ``<pipeline>-<profile>``)
and ``--storage`` / ``--data`` (default: the profile's) to find the run. ``run`` and ``submit``
take ``--stages A,B``: only those stages (pipeline stages or ``eval-<stage>``) and what they
need, e.g. ``--stages eval-untrained`` runs the ``untrained`` init stage and its evaluation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from data_pipeline import fsio


def add_jobs_commands(sub) -> None:
    jobs = sub.add_parser("jobs", help="the CPF pipeline (jobs/cpf.yaml) as Ray jobs").add_subparsers(
        dest="jobs_command", required=True)

    def common(p, *, data: bool = False) -> None:
        p.add_argument("pipeline", help="pipeline file, e.g. jobs/cpf.yaml")
        p.add_argument("--profile", default="tiny", help="profile of the pipeline file (tiny | paper | ...)")
        p.add_argument("--run", default=None, help="run name (default: <pipeline>-<profile>); reuse it to resume")
        p.add_argument("--storage", default=None, help="where runs live (default: the profile's storage)")
        if data:
            p.add_argument("--data", default=None, help="shard root (default: the profile's data)")

    for name, helptext in (("run", "run the pipeline (orchestrator in this process)"),
                           ("submit", "run the pipeline against a remote cluster's Jobs API")):
        p = jobs.add_parser(name, help=helptext)
        common(p, data=True)
        p.add_argument("--address", default=None, required=name == "submit",
                       help="Ray Jobs API (http://HEAD:8265); default: the Ray job's cluster, else an embedded local one")
        p.add_argument("--python", default=None,
                       help="python on the cluster's nodes that runs the stage entrypoints (default: this interpreter "
                            "for a local cluster, else `python`)")
        p.add_argument("--metrics-port", type=int, default=None, help="serve the orchestrator's Prometheus metrics here")
        p.add_argument("--takeover", action="store_true",
                       help="take the run over from a live orchestrator (which then stops)")
        p.add_argument("--stages", default=None, type=_stage_list, metavar="STAGE[,STAGE...]",
                       help="run only these stages and the stages they need, e.g. eval-untrained (default: all)")
        p.set_defaults(func=_cmd_run)

    st = jobs.add_parser("status", help="where a run stands")
    common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    lg = jobs.add_parser("logs", help="the log of a stage's latest job")
    common(lg)
    lg.add_argument("stage")
    lg.add_argument("--address", default=None, help="Jobs API (default: the one the run recorded)")
    lg.set_defaults(func=_cmd_logs)

    cn = jobs.add_parser("cancel", help="stop every running stage job of a run")
    common(cn)
    cn.add_argument("--address", default=None, help="Jobs API (default: the one the run recorded)")
    cn.set_defaults(func=_cmd_cancel)


def _stage_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected stage names separated by commas, got {text!r}")
    return names


def _spec(a: argparse.Namespace):
    from orchestrator.spec import load_pipeline

    return load_pipeline(a.pipeline, profile=a.profile)


def _run_dir(a: argparse.Namespace, spec) -> tuple[str, str]:
    run = a.run or f"{spec.name}-{spec.profile.name}"
    if not run.replace("-", "").replace("_", "").isalnum():
        from data_pipeline.errors import VTDInputError

        raise VTDInputError(f"--run: a run name is letters, digits, '-' and '_', got {run!r}")
    storage = a.storage or spec.profile.storage
    storage = storage if "://" in storage else os.path.abspath(storage)
    return run, fsio.join(storage, run)


def _local(address: str | None) -> bool:
    if address is None:
        return True
    host = address.split("://", 1)[-1].split(":", 1)[0].split("/", 1)[0]
    return host in ("127.0.0.1", "localhost", "0.0.0.0")


def _cmd_run(a: argparse.Namespace) -> int:
    from orchestrator.metrics import PipelineMetrics
    from orchestrator.runner import JobsClient, Orchestrator

    spec = _spec(a)
    run, run_dir = _run_dir(a, spec)
    if a.stages is not None:  # a misspelt stage stops here, before any cluster is started
        from orchestrator.stages import select_stages, with_evaluations

        select_stages(with_evaluations(spec), a.stages)
    address = a.address
    embedded = address is None and not os.environ.get("RAY_ADDRESS")
    if embedded:
        import ray

        from cluster.local import connect

        connect(None)
        address = "http://" + ray._private.worker.get_dashboard_url()
        client = _connect_jobs_api(address)
    else:
        client = JobsClient(address)
    python = a.python or (sys.executable if _local(address) or os.environ.get("RAY_ADDRESS") else "python")
    orch = Orchestrator(spec, run=run, data=a.data or spec.profile.data, storage=a.storage or spec.profile.storage,
                        client=client, python=python, metrics=PipelineMetrics(a.metrics_port, addr="127.0.0.1" if embedded else "0.0.0.0"), takeover=a.takeover,
                        only=a.stages)
    return orch.run()


def _connect_jobs_api(address: str, timeout_s: float = 60.0):
    """The embedded cluster's dashboard serves the Jobs API a moment after ``ray.init``
    returns: submit only once it answers (REFERENCE §2). The client carries the cluster's auth
    token (Ray's token authentication is on by default)."""
    from orchestrator.runner import JobsClient

    deadline = time.time() + timeout_s
    while True:
        try:
            return JobsClient(address)
        except ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _manifest(a: argparse.Namespace):
    from orchestrator.state import RunManifest

    spec = _spec(a)
    run, run_dir = _run_dir(a, spec)
    m = RunManifest.load(run_dir)
    if m is None:
        raise FileNotFoundError(f"{RunManifest.path(run_dir)}: no such run (check --run / --storage / --profile)")
    return spec, m, run_dir


def _cmd_status(a: argparse.Namespace) -> int:
    import json

    from orchestrator.stages import with_evaluations
    from vtd_train.train.families import headline

    spec, m, run_dir = _manifest(a)
    if a.json:
        from dataclasses import asdict

        print(json.dumps({"run": m.run, "state": m.state, "stages": {k: asdict(v) for k, v in m.stages.items()}}, indent=2))
        return 0
    only = (m.orchestrator or {}).get("stages")
    part = f" (--stages {','.join(only)}: {len(only)} of {len(with_evaluations(spec))} stages)" if only else ""
    print(f"run {m.run} ({m.pipeline}, profile {m.profile}): {m.state}{part}; {run_dir}")
    for name in with_evaluations(spec):
        rec = m.stages.get(name)
        if rec is None:
            print(f"  {name:<28} not started")
            continue
        wall = f"{rec.ended_at - rec.started_at:5.0f} s" if rec.ended_at and rec.started_at else "      "
        extra = ""
        if rec.state == "succeeded" and "metrics_file" in rec.outputs and (h := headline(spec.family, rec.outputs)):
            extra = f"  {h}"
        if rec.error and rec.state != "succeeded":
            extra += f"  ({rec.error})"
        print(f"  {name:<28} {rec.state:<10} attempt {rec.attempt}  {wall}  {rec.job_id or ''}{extra}")
    return 0


def _client_for(a: argparse.Namespace, m):
    from orchestrator.runner import JobsClient

    address = a.address or m.cluster.get("jobs_api")
    if not address:
        raise ConnectionError("the run records no Jobs API address; pass --address http://HEAD:8265")
    return JobsClient(address)


def _cmd_logs(a: argparse.Namespace) -> int:
    from data_pipeline.errors import VTDInputError

    spec, m, _ = _manifest(a)
    rec = m.stages.get(a.stage)
    if rec is None or not rec.job_id:
        raise VTDInputError(f"stage {a.stage!r} of run {m.run} has no job yet; stages: {sorted(m.stages)}")
    print(_client_for(a, m).logs(rec.job_id), end="")
    return 0


def _cmd_cancel(a: argparse.Namespace) -> int:
    from orchestrator.state import ACTIVE, CANCEL_MARKER

    spec, m, run_dir = _manifest(a)
    fsio.write_bytes_atomic(fsio.join(run_dir, CANCEL_MARKER), f"cancel requested at {time.time()}\n".encode())
    client = _client_for(a, m)
    # The marker goes first: a live orchestrator that saw a job stopped without it would retry
    # it. It may also stop the jobs itself before we do, so what counts is the state they end in.
    jobs = {name: rec.job_id for name, rec in m.stages.items() if rec.state in ACTIVE and rec.job_id}
    orch_job = (m.orchestrator or {}).get("ray_job_id")
    if orch_job and client.status(orch_job) in ("PENDING", "RUNNING"):
        jobs["the orchestrator"] = orch_job
    for job in jobs.values():
        client.stop(job)
    deadline = time.time() + 30
    while time.time() < deadline and any(client.status(j) in ("PENDING", "RUNNING") for j in jobs.values()):
        time.sleep(0.5)
    stopped = [f"{name} ({job})" for name, job in jobs.items() if client.status(job) == "STOPPED"]
    still = [f"{name} ({job})" for name, job in jobs.items() if client.status(job) in ("PENDING", "RUNNING")]
    if still:
        print(f"run {m.run}: cancel requested; still running after 30 s: {', '.join(still)}", file=sys.stderr)
        return 1
    print(f"run {m.run}: cancel requested; stopped {', '.join(stopped) if stopped else 'no running job'}")
    return 0
