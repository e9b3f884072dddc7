"""The orchestrator: runs a pipeline's stages as Ray jobs, in dependency order, with retries,
resume and adoption of running jobs.

One loop (:meth:`Orchestrator.run`), every ``poll_s`` seconds:

1. poll every submitted/running stage job through the Jobs API (its status is the truth, not
   the manifest's: a dead driver does not stay "running" there); a finished job's outputs are
   collected and hashed, a failed one is retried after ``retry_backoff_s × 2^(failures-1)``
   while it has retries left;
2. for every stage whose inputs have all succeeded, compute its cache key; a stage whose key
   and outputs are unchanged since an earlier run is skipped, a changed one is superseded and
   run again (and, through its outputs' hashes, its dependants), a pending one is submitted
   while fewer than ``max_parallel`` stage jobs are active;
3. stop when every stage has succeeded (then write the per-stage report), or when a stage has
   failed for good and nothing else is running, or on a cancel request.

Exactly-once submission: a stage attempt's submission id is derived from (run, stage, key,
attempt) (:func:`orchestrator.state.job_id`), the manifest records it *before* the job is
submitted, and a submission id the cluster already knows means "attach". So a restarted
orchestrator adopts running jobs, and resubmits an attempt that never reached the cluster.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from cluster.quiet import SETUP_HOOK
from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from orchestrator.metrics import PipelineMetrics
from orchestrator.spec import PipelineSpec, Stage
from orchestrator.stages import StageExecutor, select_stages, with_evaluations
from orchestrator.state import (
    ACTIVE,
    CANCEL_MARKER,
    RunManifest,
    StageRecord,
    cache_key,
    code_version,
    hash_files,
    job_id,
    whoami,
)


def _use_local_token() -> None:
    """Send the cluster's auth token like ``ray job submit`` does (:func:`cluster.local.use_local_token`)."""
    from cluster.local import use_local_token

    use_local_token()


#: How long a submission waits for a fresh cluster's job agent.
AGENT_WAIT_S = 120.0


class JobsClient:
    """The Ray Jobs API calls the orchestrator makes (``ray.job_submission.JobSubmissionClient``)."""

    def __init__(self, address: str | None) -> None:
        from ray.job_submission import JobSubmissionClient

        _use_local_token()
        try:
            self.client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConnectionError(f"cannot reach the Ray Jobs API at {address or os.environ.get('RAY_ADDRESS')!r}: {e}") from None
        self.address = self.client.get_address()

    def submit(self, submission_id: str, entrypoint: str, *, num_cpus: float, num_gpus: float,
               metadata: dict[str, str]) -> bool:
        """Submit, or attach when the id exists already; returns whether it was new. A cluster
        whose job agent is not up yet ("no available agent", a fresh head) is asked again for
        up to ``AGENT_WAIT_S``."""
        deadline = time.time() + AGENT_WAIT_S
        while True:
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id, entrypoint_num_cpus=num_cpus,
                                       entrypoint_num_gpus=num_gpus, metadata=metadata,
                                       runtime_env={"worker_process_setup_hook": SETUP_HOOK})
                return True
            except RuntimeError as e:
                if "already exists" in str(e) or "already been used" in str(e):
                    return False
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                time.sleep(1.0)

    def status(self, submission_id: str) -> str | None:
        """``PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED``, or ``None`` for an id the cluster does
        not know."""
        try:
            return str(self.client.get_job_status(submission_id).value)
        except RuntimeError as e:
            if "does not exist" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def info(self, submission_id: str) -> Any:
        return self.client.get_job_info(submission_id)

    def logs(self, submission_id: str) -> str:
        return self.client.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        """Stop a job; ``False`` when it was not running (finished, or unknown to the cluster)."""
        try:
            return bool(self.client.stop_job(submission_id))
        except RuntimeError:
            if self.status(submission_id) in (None, "SUCCEEDED", "FAILED", "STOPPED"):
                return False
            raise


def _error_line(logs: str, fallback: str) -> str:
    """The root cause a failed stage's log ends with: its last ``vtd: error:`` line, else the
    last ``...Error: ...`` line, else ``fallback``."""
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("vtd: error:"):
            return ln
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln[:500]
    return fallback


class Orchestrator:
    """Runs one pipeline run (see the module docstring)."""

    def __init__(self, spec: PipelineSpec, *, run: str, data: str, storage: str, client: JobsClient,
                 python: str, metrics: PipelineMetrics | None = None, log: Callable[[str], None] | None = None,
                 takeover: bool = False, only: list[str] | None = None) -> None:
        """``only``: run just these stages (pipeline or ``eval-`` stages) and the stages they need
        (:func:`orchestrator.stages.select_stages`); the run then ends once those succeeded."""
        self.spec, self.run_name, self.client, self.takeover = spec, run, client, takeover
        self.data = data if "://" in data else os.path.abspath(data)
        storage = storage if "://" in storage else os.path.abspath(storage)
        self.run_dir = fsio.join(storage, run)
        self.stages = select_stages(with_evaluations(spec), only)
        self.only = None if only is None else list(self.stages)
        self.executor = StageExecutor(spec, self.run_dir, self.data, python)
        self.metrics = metrics or PipelineMetrics(None)
        self.log = log or (lambda s: print(s, flush=True))
        self.manifest: RunManifest | None = None
        self._announced: set[str] = set()
        self._verified: set[str] = set()
        self._t0 = time.time()

    # -- manifest ----------------------------------------------------------------------------

    def _open(self) -> RunManifest:
        from data_pipeline.shards.format import MANIFEST_NAME

        data_manifest = fsio.join(self.data, MANIFEST_NAME)
        if not fsio.exists(data_manifest):
            raise FileNotFoundError(f"{data_manifest}: no dataset manifest; run `vtd data convert` first (or check --data)")
        m = RunManifest.load(self.run_dir)
        if m is None:
            m = RunManifest(uri=RunManifest.path(self.run_dir), pipeline=self.spec.name, profile=self.spec.profile.name,
                            run=self.run_name)
        elif m.pipeline != self.spec.name:
            raise VTDInputError(f"{m.uri}: run {self.run_name!r} belongs to pipeline {m.pipeline!r}, not {self.spec.name!r}")
        m.orchestrator = {**whoami(), "stages": self.only}  # None: the whole pipeline
        m.cluster = {"jobs_api": self.client.address}
        m.data_hash = hash_files([data_manifest])
        m.code_version = code_version()
        m.state = "running"
        for name, rec in m.stages.items():
            if rec.state in ("cancelled", "failed"):  # a new invocation resumes what stopped
                rec.state, rec.retry_at = "pending", None
                rec.history.append({"state": "reset", "at": time.time()})
        cancel = fsio.join(self.run_dir, CANCEL_MARKER)
        if fsio.exists(cancel):
            fsio.remove(cancel)
        m.save()
        return m

    # -- keys and inputs ---------------------------------------------------------------------

    def _inputs(self, st: Stage) -> dict[str, dict[str, Any]] | None:
        """Outputs of the stage's dependencies, or ``None`` while one has not succeeded."""
        assert self.manifest is not None
        out = {}
        for dep in st.needs:
            rec = self.manifest.stages.get(dep)
            if rec is None or rec.state != "succeeded":
                return None
            out[dep] = rec.outputs
        return out

    def _key(self, st: Stage, inputs: dict[str, dict[str, Any]]) -> str:
        assert self.manifest is not None and self.manifest.data_hash is not None
        p = self.spec.profile
        extra = {"eval_height": p.eval_height, "eval_overlays": p.eval_overlays} if st.kind == "evaluate" else {}
        return cache_key(st.describe(), {k: v["hash"] for k, v in sorted(inputs.items())}, self.manifest.data_hash, extra)

    # -- transitions -------------------------------------------------------------------------

    @staticmethod
    def _failures(rec: StageRecord) -> int:
        """Failed attempts since the run was last started (each invocation gets its retries)."""
        n = 0
        for h in rec.history:
            n = 0 if h["state"] == "reset" else n + (h["state"] == "failed")
        return n

    def _attempt_failed(self, st: Stage, rec: StageRecord, error: str) -> None:
        rec.ended_at = time.time()
        rec.close_attempt("failed", error)
        rec.error = error
        n = self._failures(rec)
        if n <= st.retries:
            delay = self.spec.profile.retry_backoff_s * 2 ** (n - 1)
            rec.state, rec.retry_at = "pending", time.time() + delay
            self.log(f"[{self.run_name}] {st.name}: attempt {rec.attempt} failed ({error}); retry {n} of {st.retries} in {delay:.0f} s")
        else:
            rec.state = "failed"
            self.log(f"[{self.run_name}] {st.name}: FAILED after {rec.attempt} attempt(s): {error}\n"
                     f"    logs: vtd jobs logs {self.spec.source} {st.name} --profile {self.spec.profile.name} --run {self.run_name}")
        self.metrics.stage(self.run_name, st.name, rec)

    def _poll(self, st: Stage, rec: StageRecord) -> None:
        assert rec.job_id is not None
        status = self.client.status(rec.job_id)
        now = time.time()
        if status is None:
            if rec.state == "submitted":  # recorded, never reached the cluster: submit it now
                inputs = self._inputs(st)
                if inputs is not None and self._key(st, inputs) == rec.key:
                    self._submit(st, rec, resubmit=True)
                # else: the stage changed meanwhile, and scheduling supersedes the record
            else:
                self._attempt_failed(st, rec, f"job {rec.job_id} is gone from the cluster (head restarted?)")
            return
        if status == "PENDING":
            return
        if status == "RUNNING":
            if rec.state != "running":
                rec.state, rec.started_at = "running", now
                self._gap(st, rec)
                self.log(f"[{self.run_name}] {st.name}: running (job {rec.job_id}, attempt {rec.attempt})")
                self.metrics.stage(self.run_name, st.name, rec)
            return
        self._job_times(rec)
        if rec.started_at is None:
            rec.started_at = now
        if status == "SUCCEEDED":
            try:
                rec.outputs = self.executor.collect(st, rec.key)
            except (FileNotFoundError, VTDInputError, OSError, KeyError, ValueError) as e:
                self._attempt_failed(st, rec, f"finished, but its outputs are unusable: {e}")
                return
            rec.ended_at = rec.ended_at or now
            rec.state, rec.error = "succeeded", None
            first = rec.outputs.get("first_step_at")
            if first is not None:
                ends = [self.manifest.stages[d].ended_at for d in st.needs if self.manifest.stages[d].ended_at]
                rec.metrics["first_step_gap_s"] = first - max(ends) if ends else None
            rec.close_attempt("succeeded")
            self._verified.add(st.name)
            extra = ""
            if st.kind == "evaluate":
                from vtd_train.train.families import headline

                extra = f", {h}" if (h := headline(self.spec.family, rec.outputs)) else ""
            self.log(f"[{self.run_name}] {st.name}: succeeded in {rec.ended_at - rec.started_at:.0f} s{extra}")
            self.metrics.stage(self.run_name, st.name, rec)
            return
        if status == "STOPPED" and self._cancel_requested():
            return  # the cancel path marks it
        try:
            logs = self.client.logs(rec.job_id)
        except Exception:  # noqa: BLE001 - the logs only improve the message
            logs = ""
        self._attempt_failed(st, rec, _error_line(logs, f"job {rec.job_id} ended {status}"))

    def _job_times(self, rec: StageRecord) -> None:
        """The job's own start and end times from the Jobs API (the poll only sees them late)."""
        try:
            info = self.client.info(rec.job_id)
        except Exception:  # noqa: BLE001 - the times only sharpen the figures
            return
        if getattr(info, "start_time", None):
            rec.metrics["job_started_at"] = info.start_time / 1000.0
        if getattr(info, "end_time", None):
            rec.ended_at = info.end_time / 1000.0

    def _gap(self, st: Stage, rec: StageRecord) -> None:
        assert self.manifest is not None
        ends = [self.manifest.stages[d].ended_at for d in st.needs if self.manifest.stages[d].ended_at]
        rec.metrics["start_gap_s"] = (rec.started_at - max(ends)) if ends and rec.started_at else None
        rec.metrics["queued_s"] = (rec.started_at - rec.submitted_at) if rec.submitted_at and rec.started_at else None

    def _submit(self, st: Stage, rec: StageRecord, *, resubmit: bool = False) -> None:
        assert self.manifest is not None
        inputs = self._inputs(st)
        assert inputs is not None
        if not resubmit:
            rec.attempt += 1
            rec.job_id = job_id(self.run_name, st.name, rec.key, rec.attempt)
            rec.state, rec.submitted_at, rec.started_at, rec.ended_at, rec.retry_at = "submitted", time.time(), None, None, None
            rec.inputs = {k: {kk: vv for kk, vv in v.items() if kk in ("checkpoint", "pseudo", "hash")} for k, v in inputs.items()}
            self.manifest.save()  # write-ahead: the id is on record before the cluster knows it
        launch = self.executor.prepare(st, rec.key, inputs)
        t = time.perf_counter()
        new = self.client.submit(rec.job_id, launch.entrypoint, num_cpus=launch.resources.entrypoint_num_cpus,
                                 num_gpus=launch.resources.entrypoint_num_gpus,
                                 metadata={"pipeline": self.spec.name, "run": self.run_name, "stage": st.name,
                                           "attempt": str(rec.attempt)})
        latency = time.perf_counter() - t
        rec.metrics["submit_latency_s"] = latency
        self.metrics.submitted(self.run_name, st.name, latency)
        self.log(f"[{self.run_name}] {st.name}: {'submitted' if new else 'attached to'} job {rec.job_id}"
                 f"{'' if rec.attempt == 1 else f' (attempt {rec.attempt})'}")
        self.metrics.stage(self.run_name, st.name, rec)
        self.manifest.save()

    # -- cancel ------------------------------------------------------------------------------

    def _cancel_requested(self) -> bool:
        return fsio.exists(fsio.join(self.run_dir, CANCEL_MARKER))

    def _cancel(self) -> int:
        assert self.manifest is not None
        for name, rec in self.manifest.stages.items():
            if rec.state in ACTIVE or rec.state == "pending":
                if rec.job_id and rec.state in ACTIVE:
                    self.client.stop(rec.job_id)
                    rec.close_attempt("cancelled")
                rec.state, rec.ended_at = "cancelled", time.time()
                if name in self.stages:
                    self.metrics.stage(self.run_name, name, rec)
        self.manifest.state = "cancelled"
        self.manifest.save()
        self.log(f"[{self.run_name}] cancelled; `vtd jobs run` again resumes from the finished stages")
        return 130

    # -- the loop ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        assert self.manifest is not None
        m = self.manifest
        active = sum(1 for n, r in m.stages.items() if r.state in ACTIVE and n in self.stages)
        for name, st in self.stages.items():
            inputs = self._inputs(st)
            if inputs is None:
                continue
            key = self._key(st, inputs)
            rec = m.stages.get(name)
            if rec is not None and rec.key != key:
                if rec.state in ACTIVE and rec.job_id:
                    self.client.stop(rec.job_id)  # running an outdated definition
                    self.log(f"[{self.run_name}] {name}: stopped job {rec.job_id} (its stage changed)")
                    active -= 1
                self.log(f"[{self.run_name}] {name}: changed since the last run (config, inputs or code): rerun")
                m.supersede(name)
                rec = None
            if rec is None:
                rec = m.stages[name] = StageRecord(key=key)
                m.save()
            if rec.state == "succeeded":
                if name not in self._verified:
                    if self.executor.still_valid(rec.outputs):
                        self._verified.add(name)
                        self.log(f"[{self.run_name}] {name}: up to date (finished earlier, outputs verified), skipped")
                        self.metrics.stage(self.run_name, name, rec)
                    else:
                        self.log(f"[{self.run_name}] {name}: recorded outputs are missing or changed: rerun")
                        rec.state = "pending"
                continue
            if rec.state == "pending" and active < self.spec.profile.max_parallel:
                if rec.retry_at is not None and time.time() < rec.retry_at:
                    continue
                self._submit(st, rec)
                active += 1

    def run(self) -> int:
        """Run the pipeline to its end, holding the run's lease (one orchestrator per run; a
        second one stops at once naming the holder); 0 when every stage succeeded, 1 when one
        failed for good (or the run was taken over), 130 when cancelled."""
        from vtd_train.train.lease import hold_lease

        lost: list[str] = []
        with hold_lease(self.run_dir, owner=f"vtd jobs run ({self.spec.name})", takeover=self.takeover,
                        on_lost=lambda holder: lost.append(holder.describe() if holder else "?"), say=self.log):
            return self._run(lost)

    def _run(self, lost: list[str]) -> int:
        self.manifest = m = self._open()
        part = "" if self.only is None else f" of {len(with_evaluations(self.spec))} (--stages: {', '.join(self.stages)})"
        self.log(f"[{self.run_name}] pipeline {self.spec.name!r} (profile {self.spec.profile.name}): {len(self.stages)} stages{part}, "
                 f"run directory {self.run_dir}, Ray Jobs API {self.client.address}")
        stop = {"signal": None}

        def on_signal(signum, _frame):  # SIGTERM (ray job stop of the orchestrator): stop like a cancel
            stop["signal"] = signum

        old = signal.signal(signal.SIGTERM, on_signal) if sys.platform != "win32" else None
        try:
            while True:
                if lost:
                    self.log(f"[{self.run_name}] another orchestrator took this run over ({lost[0]}); stopping here, "
                             "its stage jobs keep running under the new owner")
                    return 1
                if self._cancel_requested() or stop["signal"] is not None:
                    return self._cancel()
                for name, rec in list(m.stages.items()):
                    if rec.state in ACTIVE and name in self.stages:
                        self._poll(self.stages[name], rec)
                self._schedule()
                m.save()
                states = {n: (m.stages[n].state if n in m.stages else "pending") for n in self.stages}
                if all(s == "succeeded" for s in states.values()):
                    m.state = "succeeded"
                    m.save()
                    from orchestrator.report import write_report

                    report = write_report(self.spec, m, self.run_dir)
                    for line in report.table.splitlines():
                        self.log(line)
                    self.log(f"[{self.run_name}] done in {time.time() - self._t0:.0f} s; report: {report.html}")
                    return 0
                failed = [n for n, s in states.items() if s == "failed"]
                if failed and not any(s in ACTIVE for s in states.values()):
                    m.state = "failed"
                    m.save()
                    self.log(f"[{self.run_name}] stopped: stage(s) {', '.join(failed)} failed; the finished stages are kept, "
                             "`vtd jobs run` again retries from there")
                    return 1
                time.sleep(self.spec.profile.poll_s)
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
