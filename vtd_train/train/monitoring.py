"""Training metrics for Prometheus: one :class:`TrainMonitor` per rank.

Every rank of a training run builds ``TrainMonitor(run, stage, rank)`` and calls
:meth:`TrainMonitor.record_step` once per optimizer step. Values are aggregated in plain Python
and written to the metrics backend once per *flush interval* (``flush_interval_s``, 2 s by
default), because one backend write costs ~7-9 µs (measured, Ray 2.60) and a step has ~40
values (22 loss terms in a joint stage): aggregated, a ``record_step`` call costs ~10 µs and a
flush ~0.2-0.5 ms every 2 s (docs/MONITORING.md, "Cost").

Backends (chosen once, at construction):

``ray``    (the default inside a Ray worker or driver, i.e. whenever ``ray.is_initialized()``)
           ``ray.util.metrics`` Gauge/Counter/Histogram. Each node's Ray metrics agent exports
           them on its ``--metrics-export-port`` (``metrics``, 8080, under KubeRay) as
           ``ray_<name>`` (counters ``ray_<name>_total``), with Ray's labels (``Component``,
           ``NodeAddress``, ``SessionName``, ``WorkerId``, ...) beside ours. Eight ranks per node
           share that one port; per-worker HTTP servers would collide on it.
``local``  (the default when Ray is not initialised) a ``prometheus_client`` registry private
           to this process, :data:`LOCAL_REGISTRY`, with the same names minus ``ray_``. Nothing
           is served unless the caller does so (``prometheus_client.start_http_server(port,
           registry=LOCAL_REGISTRY)``). The same aggregation and validation run in both modes.

Every series carries the labels ``run``, ``stage`` and ``rank``; :data:`METRICS` lists them all
(docs/MONITORING.md explains each and gives PromQL). A ``TrainMonitor`` is not thread-safe:
call it from the training loop's thread.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from dataclasses import dataclass
from typing import Any, Literal

import prometheus_client
import torch

log = logging.getLogger(__name__)

Kind = Literal["gauge", "counter", "histogram"]
Backend = Literal["auto", "ray", "local"]

RAY_PREFIX = "ray_"
"""Ray's metrics agent prefixes every application metric name with this."""
BASE_TAGS = ("run", "stage", "rank")
STEP_TIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_FLUSH_INTERVAL_S = 2.0
MAX_PENDING_STEPS = 256
"""A flush also happens after this many unflushed steps: a fast loop (tiny CPU runs) keeps its
buffered step times, and the cost of one flush, bounded."""


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """One metric: its backend name (``vtd_train_*``), kind, help text and tags beyond
    :data:`BASE_TAGS`."""

    name: str
    kind: Kind
    description: str
    extra_tags: tuple[str, ...] = ()

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return BASE_TAGS + self.extra_tags

    def exported_name(self, backend: Literal["ray", "local"] = "ray") -> str:
        """The name Prometheus sees: ``ray_`` for Ray, ``_total`` on counters; for a histogram
        the stem of its ``_bucket`` / ``_sum`` / ``_count`` series."""
        stem = (RAY_PREFIX if backend == "ray" else "") + self.name
        return stem + "_total" if self.kind == "counter" else stem


LOSS = MetricSpec(name="vtd_train_loss", kind="gauge", extra_tags=("term",),
                  description="Mean of one loss term (e.g. term=loss/det/cls) over the finite values of the last flush interval")
TOTAL_LOSS = MetricSpec(name="vtd_train_total_loss", kind="gauge",
                        description="Mean of the total (summed, weighted) loss over the finite values of the last flush interval")
LEARNING_RATE = MetricSpec(name="vtd_train_learning_rate", kind="gauge", description="Learning rate at the last step")
LOSS_SCALE = MetricSpec(name="vtd_train_loss_scale", kind="gauge",
                        description="AMP GradScaler scale at the last step (1 without AMP)")
STEP_TIME = MetricSpec(name="vtd_train_step_time_seconds", kind="gauge",
                       description="Mean wall time per step (data wait included) over the last flush interval")
DATA_WAIT = MetricSpec(name="vtd_train_data_wait_seconds", kind="gauge",
                       description="Mean time per step spent waiting for the next batch over the last flush interval")
IMAGES_PER_SECOND = MetricSpec(name="vtd_train_images_per_second", kind="gauge",
                               description="Images / summed step time over the last flush interval (this rank)")
STEP_DURATION = MetricSpec(name="vtd_train_step_duration_seconds", kind="histogram",
                           description="Distribution of per-step wall time (data wait included)")
STEPS = MetricSpec(name="vtd_train_steps", kind="counter", description="Steps recorded, skipped ones included")
SKIPPED_STEPS = MetricSpec(name="vtd_train_skipped_steps", kind="counter",
                           description="Steps whose optimizer update was skipped (non-finite loss or gradients)")
IMAGES = MetricSpec(name="vtd_train_images", kind="counter", description="Images processed, skipped steps included")
SAMPLES = MetricSpec(name="vtd_train_samples", kind="counter", extra_tags=("set",),
                     description="Images processed per image set (set=det, sem_seg, box_track, ...)")
BAD_SAMPLES = MetricSpec(name="vtd_train_bad_samples", kind="counter",
                         description="Images of batches whose loss was non-finite on this rank (the step was "
                                     "skipped on every rank); corrupt data never counts: it stops the run")
GPU_MEMORY_ALLOCATED = MetricSpec(name="vtd_train_gpu_memory_allocated_bytes", kind="gauge",
                                  description="torch.cuda.memory_allocated() of this rank's device at the last flush")
GPU_MEMORY_RESERVED = MetricSpec(name="vtd_train_gpu_memory_reserved_bytes", kind="gauge",
                                 description="torch.cuda.memory_reserved() of this rank's device at the last flush")
GPU_MEMORY_PEAK = MetricSpec(name="vtd_train_gpu_memory_peak_bytes", kind="gauge",
                             description="torch.cuda.max_memory_allocated() of this rank's device since the process started")
GPU_UTILIZATION = MetricSpec(name="vtd_train_gpu_utilization_percent", kind="gauge",
                             description="torch.cuda.utilization() (NVML, percent of time a kernel ran) at the last flush")

METRICS: tuple[MetricSpec, ...] = (
    LOSS, TOTAL_LOSS, LEARNING_RATE, LOSS_SCALE, STEP_TIME, DATA_WAIT, IMAGES_PER_SECOND, STEP_DURATION,
    STEPS, SKIPPED_STEPS, IMAGES, SAMPLES, BAD_SAMPLES,
    GPU_MEMORY_ALLOCATED, GPU_MEMORY_RESERVED, GPU_MEMORY_PEAK, GPU_UTILIZATION,
)

LOCAL_REGISTRY = prometheus_client.CollectorRegistry(auto_describe=True)
"""Where the ``local`` backend writes (never the global default registry, so importing this
module adds nothing to a process's own ``/metrics``)."""


class _RaySink:
    """``ray.util.metrics`` objects, one per metric per process (shared by all monitors in it)."""

    _metrics: dict[str, Any] = {}

    def __init__(self) -> None:
        from ray.util import metrics as rm

        for spec in METRICS:
            if spec.name in self._metrics:
                continue
            if spec.kind == "gauge":
                m = rm.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "counter":
                m = rm.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
            else:
                m = rm.Histogram(spec.name, spec.description, boundaries=list(STEP_TIME_BUCKETS_S), tag_keys=spec.tag_keys)
            self._metrics[spec.name] = m

    def set(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].set(value, tags=tags)

    def inc(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].inc(value, tags=tags)

    def observe(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].observe(value, tags=tags)


class _LocalSink:
    """``prometheus_client`` metrics in :data:`LOCAL_REGISTRY`, one per metric per process."""

    _metrics: dict[str, Any] = {}

    def __init__(self) -> None:
        for spec in METRICS:
            if spec.name in self._metrics:
                continue
            kw = dict(labelnames=spec.tag_keys, registry=LOCAL_REGISTRY)
            if spec.kind == "gauge":
                m = prometheus_client.Gauge(spec.name, spec.description, **kw)
            elif spec.kind == "counter":
                m = prometheus_client.Counter(spec.name, spec.description, **kw)
            else:
                m = prometheus_client.Histogram(spec.name, spec.description, buckets=STEP_TIME_BUCKETS_S, **kw)
            self._metrics[spec.name] = m

    def set(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].labels(**tags).set(value)

    def inc(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].labels(**tags).inc(value)

    def observe(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._metrics[spec.name].labels(**tags).observe(value)


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _nonempty_str(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _count(what: str, value: object) -> int:
    """A non-negative int (numpy ints accepted; bools and floats rejected)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


class TrainMonitor:
    """Prometheus metrics of one rank of one training stage.

    Args:
        run: the run's name (``RunConfig.name``); label ``run``.
        stage: the training stage (e.g. ``cls``, ``seg``, ``loc``, ``ass``, ``cpf``); label ``stage``.
        rank: this worker's global rank; label ``rank``.
        flush_interval_s: how often aggregated values are written to the backend (checked at
            each :meth:`record_step`, which also flushes after :data:`MAX_PENDING_STEPS`
            unflushed steps; :meth:`flush` and :meth:`close` write at once). Keep it
            below Ray's metrics report interval (~10 s) so each report carries fresh values.
        backend: ``"ray"``, ``"local"`` or ``"auto"`` (``ray`` when ``ray.is_initialized()``).

    Gauges written at a flush summarise the steps since the previous flush (means for losses
    and times, the last value for the learning rate and loss scale); a gauge with no new data
    in an interval (a loss term whose set did not come up) keeps its previous value. Counters
    are exact totals.
    """

    def __init__(
        self,
        run: str,
        stage: str,
        rank: int,
        *,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        backend: Backend = "auto",
    ) -> None:
        _nonempty_str("run", run)
        _nonempty_str("stage", stage)
        rank = _count("rank", rank)
        if not flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s!r}")
        if backend == "auto":
            backend = "ray" if _ray_initialized() else "local"
        if backend == "ray":
            if not _ray_initialized():
                raise ValueError("backend='ray' needs Ray initialised in this process (ray.init or a Ray worker)")
            self._sink: _RaySink | _LocalSink = _RaySink()
        elif backend == "local":
            self._sink = _LocalSink()
        else:
            raise ValueError(f"backend must be 'auto', 'ray' or 'local', got {backend!r}")
        self.backend: Literal["ray", "local"] = backend
        self.run, self.stage, self.rank = run, stage, rank
        self._tags = {"run": run, "stage": stage, "rank": str(rank)}
        self._term_tags: dict[str, dict[str, str]] = {}
        self._set_tags: dict[str, dict[str, str]] = {}
        self._interval = float(flush_interval_s)
        # Never initialise CUDA from here: only a process that already uses it is probed.
        self._gpu = torch.cuda.is_available()
        self._gpu_utilization = True  # cleared when torch.cuda.utilization() is unavailable
        self._closed = False
        self._reset()
        self._last_flush = time.monotonic()

    # -- per step ---------------------------------------------------------------------------

    def record_step(
        self,
        *,
        losses: dict[str, float],
        total_loss: float,
        lr: float,
        loss_scale: float,
        step_time_s: float,
        data_wait_s: float,
        images: int,
        set_name: str,
        skipped: bool,
    ) -> None:
        """Record one optimizer step of this rank.

        Args:
            losses: ``{"loss/<task>/<term>": value}`` (the model's flat loss dict, as floats);
                only the terms present in this step's batch.
            total_loss: the summed loss that was back-propagated.
            lr: learning rate (>= 0, finite). loss_scale: GradScaler scale (> 0, finite; 1 without AMP).
            step_time_s: wall time of the whole step, *data wait included* (>= 0).
            data_wait_s: the part of ``step_time_s`` spent waiting for the batch (0 <= . <= step_time_s).
            images: images in this rank's batch (>= 0). set_name: the image set it came from.
            skipped: True when the optimizer update was skipped.

        Non-finite loss values are allowed only on a skipped step, and are left out of the loss
        gauges; on a step that was not skipped they raise ``ValueError`` (the loop stepped on a
        NaN). Invalid arguments raise before anything is recorded.
        """
        if self._closed:
            raise RuntimeError(f"TrainMonitor(run={self.run!r}, stage={self.stage!r}, rank={self.rank}) is closed")
        if not isinstance(skipped, bool):
            raise TypeError(f"skipped must be a bool, got {skipped!r}")
        images = _count("images", images)
        if set_name.__class__ is not str or not set_name:
            _nonempty_str("set_name", set_name)
        lr, scale = float(lr), float(loss_scale)
        step_time_s, data_wait_s = float(step_time_s), float(data_wait_s)
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        if not 0.0 < scale < math.inf:
            raise ValueError(f"loss_scale must be finite and > 0, got {scale}")
        if not 0.0 <= step_time_s < math.inf:
            raise ValueError(f"step_time_s must be finite and >= 0, got {step_time_s}")
        if not 0.0 <= data_wait_s <= step_time_s:
            raise ValueError(
                f"data_wait_s must be in [0, step_time_s={step_time_s}] (step_time_s includes the wait), got {data_wait_s}"
            )
        if not isinstance(losses, dict):
            raise TypeError(f"losses must be a dict of name -> float, got {type(losses).__name__}")
        finite: list[tuple[str, float]] = []
        for term, value in losses.items():
            if term.__class__ is not str or not term:
                raise ValueError(f"loss names must be non-empty strings, got {term!r}")
            v = float(value)
            if math.isfinite(v):
                finite.append((term, v))
            elif not skipped:
                raise ValueError(f"non-finite loss {term}={v} on a step that was not skipped (rank {self.rank})")
        total = float(total_loss)
        total_finite = math.isfinite(total)
        if not total_finite and not skipped:
            raise ValueError(f"non-finite total_loss={total} on a step that was not skipped (rank {self.rank})")

        # Validated: accumulate.
        self._steps += 1
        self._skipped += skipped
        self._images += images
        self._set_images[set_name] = self._set_images.get(set_name, 0) + images
        self._step_times.append(step_time_s)
        self._wait_sum += data_wait_s
        self._lr, self._scale = lr, scale
        loss_sum, loss_n = self._loss_sum, self._loss_n
        for term, v in finite:
            if term in loss_sum:
                loss_sum[term] += v
                loss_n[term] += 1
            else:
                loss_sum[term], loss_n[term] = v, 1
        if total_finite:
            self._total_sum += total
            self._total_n += 1
        if self._steps >= MAX_PENDING_STEPS or time.monotonic() - self._last_flush >= self._interval:
            self.flush()

    def record_bad_samples(self, n: int) -> None:
        """Count ``n`` samples dropped as bad (written at once: rare). The training loop counts
        the images of a batch whose loss was non-finite on this rank (docs/MONITORING.md)."""
        if self._closed:
            raise RuntimeError(f"TrainMonitor(run={self.run!r}, stage={self.stage!r}, rank={self.rank}) is closed")
        n = _count("n", n)
        if n:
            self._sink.inc(BAD_SAMPLES, n, self._tags)

    # -- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what was aggregated since the last flush (and the GPU probes) to the backend."""
        sink, tags = self._sink, self._tags
        for term, s in self._loss_sum.items():
            sink.set(LOSS, s / self._loss_n[term], self._tags_for(self._term_tags, "term", term))
        if self._total_n:
            sink.set(TOTAL_LOSS, self._total_sum / self._total_n, tags)
        if self._steps:
            sink.set(LEARNING_RATE, self._lr, tags)
            sink.set(LOSS_SCALE, self._scale, tags)
            step_sum = math.fsum(self._step_times)
            sink.set(STEP_TIME, step_sum / self._steps, tags)
            sink.set(DATA_WAIT, self._wait_sum / self._steps, tags)
            if step_sum > 0:
                sink.set(IMAGES_PER_SECOND, self._images / step_sum, tags)
            for t in self._step_times:
                sink.observe(STEP_DURATION, t, tags)
            sink.inc(STEPS, self._steps, tags)
            if self._skipped:
                sink.inc(SKIPPED_STEPS, self._skipped, tags)
            if self._images:
                sink.inc(IMAGES, self._images, tags)
            for set_name, n in self._set_images.items():
                if n:
                    sink.inc(SAMPLES, n, self._tags_for(self._set_tags, "set", set_name))
        self._probe_gpu()
        self._reset()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and stop accepting records. Idempotent. The series stay exported until the
        process exits (Ray drops a dead worker's series about 20 s later)."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TrainMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _reset(self) -> None:
        self._steps = self._skipped = self._images = self._total_n = 0
        self._total_sum = self._wait_sum = 0.0
        self._lr = self._scale = 0.0
        self._step_times: list[float] = []
        self._set_images: dict[str, int] = {}
        self._loss_sum: dict[str, float] = {}
        self._loss_n: dict[str, int] = {}

    def _tags_for(self, cache: dict[str, dict[str, str]], key: str, value: str) -> dict[str, str]:
        tags = cache.get(value)
        if tags is None:
            tags = cache[value] = {**self._tags, key: value}
        return tags

    def _probe_gpu(self) -> None:
        if not self._gpu or not torch.cuda.is_initialized():
            return
        dev = torch.cuda.current_device()
        self._sink.set(GPU_MEMORY_ALLOCATED, float(torch.cuda.memory_allocated(dev)), self._tags)
        self._sink.set(GPU_MEMORY_RESERVED, float(torch.cuda.memory_reserved(dev)), self._tags)
        self._sink.set(GPU_MEMORY_PEAK, float(torch.cuda.max_memory_allocated(dev)), self._tags)
        if self._gpu_utilization:
            # Optional probe: torch.cuda.utilization needs NVML (pynvml) or amdsmi, which an
            # image may lack, and NVML can be unavailable in a container. Give up once, quietly.
            try:
                util = float(torch.cuda.utilization(dev))
            except Exception as e:  # noqa: BLE001 - environment-dependent, never a bug of ours
                self._gpu_utilization = False
                log.info("GPU utilisation metric disabled: torch.cuda.utilization() failed: %s", e)
                return
            self._sink.set(GPU_UTILIZATION, util, self._tags)
