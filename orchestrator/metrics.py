"""The orchestrator's Prometheus metrics (one process: a plain ``prometheus_client`` HTTP
server, REFERENCE §2).

=============================================  =============================================
series (labels ``run``, ``stage``)             meaning
=============================================  =============================================
``vtd_pipeline_stage_state{state}``      1 for the stage's current state, 0 for the others
``vtd_pipeline_stage_attempt``           the stage's attempt number (1 = first)
``vtd_pipeline_stage_duration_seconds``  a finished attempt's running time
``vtd_pipeline_stage_queued_seconds``    submission → the job running (waiting for resources)
``vtd_pipeline_stage_start_gap_seconds`` the stage's inputs' end → the stage's job running
``vtd_pipeline_stage_first_step_gap_seconds``  the stage's inputs' end → its first training step
``vtd_pipeline_submit_latency_seconds``  histogram of the Jobs API submission call (label ``run``)
=============================================  =============================================

The training workers of a stage label their own metrics with ``stage`` = the stage's name
(its training config's ``stage``), so a dashboard joins both on ``stage``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from orchestrator.state import STATES

if TYPE_CHECKING:
    from orchestrator.state import StageRecord


class PipelineMetrics:
    """Gauges of one orchestrator process; ``port`` ``None``: kept in memory only (tests read
    :attr:`registry`), else served at ``http://ADDR:port/metrics``: every interface for a
    cluster's Prometheus to scrape, loopback only (``addr="127.0.0.1"``) beside an embedded local
    cluster, which itself listens on loopback only."""

    def __init__(self, port: int | None, addr: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        labels = ("run", "stage")
        self.state = Gauge("vtd_pipeline_stage_state", "1 for the stage's current state", (*labels, "state"), registry=self.registry)
        self.attempt = Gauge("vtd_pipeline_stage_attempt", "attempt number of the stage", labels, registry=self.registry)
        self.duration = Gauge("vtd_pipeline_stage_duration_seconds", "running time of the stage's last finished attempt",
                              labels, registry=self.registry)
        self.queued = Gauge("vtd_pipeline_stage_queued_seconds", "submission to running", labels, registry=self.registry)
        self.gap = Gauge("vtd_pipeline_stage_start_gap_seconds", "end of the stage's inputs to the stage running",
                         labels, registry=self.registry)
        self.first_step_gap = Gauge("vtd_pipeline_stage_first_step_gap_seconds",
                                    "end of the stage's inputs to the stage's first training step", labels, registry=self.registry)
        self.latency = Histogram("vtd_pipeline_submit_latency_seconds", "Jobs API submission call", ("run",),
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.port = port
        if port is not None:
            start_http_server(port, addr=addr, registry=self.registry)

    def stage(self, run: str, stage: str, rec: StageRecord) -> None:
        for s in STATES:
            self.state.labels(run, stage, s).set(1.0 if s == rec.state else 0.0)
        self.attempt.labels(run, stage).set(rec.attempt)
        if rec.ended_at and rec.started_at:
            self.duration.labels(run, stage).set(rec.ended_at - rec.started_at)
        if rec.metrics.get("queued_s") is not None:
            self.queued.labels(run, stage).set(rec.metrics["queued_s"])
        if rec.metrics.get("start_gap_s") is not None:
            self.gap.labels(run, stage).set(rec.metrics["start_gap_s"])
        if rec.metrics.get("first_step_gap_s") is not None:
            self.first_step_gap.labels(run, stage).set(rec.metrics["first_step_gap_s"])

    def submitted(self, run: str, stage: str, latency_s: float) -> None:
        self.latency.labels(run).observe(latency_s)
