"""TrainMonitor: aggregation and validation (local prometheus_client backend, no Ray), the
PodMonitor manifest, and an end-to-end scrape: Ray workers record steps, Ray's metrics agent
exports them, a real Prometheus server scrapes it and the values come back through its query API."""

from __future__ import annotations

import math
import statistics
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from vtd_train.train import monitoring
from vtd_train.train.monitoring import LOCAL_REGISTRY, METRICS, TrainMonitor

ROOT = Path(__file__).resolve().parents[1]
NEVER = 3600.0  # flush_interval_s that leaves flushing to flush()/close()


def _run_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _local(name: str, run: str, rank: int = 0, stage: str = "cls", **extra: str) -> float | None:
    return LOCAL_REGISTRY.get_sample_value(name, {"run": run, "stage": stage, "rank": str(rank), **extra})


def _step(**over):
    kw = dict(
        losses={"loss/det/cls": 0.5}, total_loss=0.5, lr=1e-3, loss_scale=1.0,
        step_time_s=0.2, data_wait_s=0.05, images=4, set_name="det", skipped=False,
    )
    kw.update(over)
    return kw


def _rank_steps(rank: int) -> list[dict]:
    """Three steps of one simulated rank; the third is skipped with a NaN loss."""
    return [
        _step(losses={"loss/det/cls": 0.25 + rank, "loss/sem/ce": 1.0 * (rank + 1)}, total_loss=10.0 + rank,
              lr=1e-3, loss_scale=1024.0, step_time_s=0.5, data_wait_s=0.1, images=4, set_name="det"),
        _step(losses={"loss/det/cls": 0.5 + rank, "loss/sem/ce": 2.0 * (rank + 1)}, total_loss=20.0 + rank,
              lr=2e-3 * (rank + 1), loss_scale=2048.0, step_time_s=0.25, data_wait_s=0.0, images=2, set_name="sem_seg"),
        _step(losses={"loss/det/cls": 0.75 + rank, "loss/sem/ce": math.nan}, total_loss=math.nan,
              lr=2e-3 * (rank + 1), loss_scale=1024.0 * (rank + 1), step_time_s=0.75, data_wait_s=0.5, images=4,
              set_name="det", skipped=True),
    ]


def _expected(rank: int) -> dict[str, float]:
    return {
        "loss/det/cls": 0.5 + rank,            # mean of 0.25, 0.5, 0.75 (+ rank)
        "loss/sem/ce": 1.5 * (rank + 1),       # the NaN of the skipped step is left out
        "total": 15.0 + rank,
        "lr": 2e-3 * (rank + 1),               # last value
        "loss_scale": 1024.0 * (rank + 1),     # last value
        "steps": 3, "skipped": 1, "images": 10, "samples/det": 8, "samples/sem_seg": 2,
    }


# ---------------------------------------------------------------------------------------------
# Aggregation, local backend


def test_flush_writes_means_last_values_and_counters():
    run = _run_name("agg")
    with TrainMonitor(run, "cls", 0, flush_interval_s=NEVER, backend="local") as m:
        assert m.backend == "local"
        for kw in _rank_steps(0):
            m.record_step(**kw)
        m.record_bad_samples(3)
        assert _local("vtd_train_steps_total", run) is None, "nothing is written before the flush"
    want = _expected(0)
    assert _local("vtd_train_loss", run, term="loss/det/cls") == pytest.approx(want["loss/det/cls"])
    assert _local("vtd_train_loss", run, term="loss/sem/ce") == pytest.approx(want["loss/sem/ce"])
    assert _local("vtd_train_total_loss", run) == pytest.approx(want["total"])
    assert _local("vtd_train_learning_rate", run) == pytest.approx(want["lr"])
    assert _local("vtd_train_loss_scale", run) == pytest.approx(want["loss_scale"])
    assert _local("vtd_train_step_time_seconds", run) == pytest.approx(0.5)   # (0.5 + 0.25 + 0.75) / 3
    assert _local("vtd_train_data_wait_seconds", run) == pytest.approx(0.2)   # (0.1 + 0 + 0.5) / 3
    assert _local("vtd_train_images_per_second", run) == pytest.approx(10 / 1.5)
    assert _local("vtd_train_steps_total", run) == 3
    assert _local("vtd_train_skipped_steps_total", run) == 1
    assert _local("vtd_train_images_total", run) == 10
    assert _local("vtd_train_samples_total", run, set="det") == 8
    assert _local("vtd_train_samples_total", run, set="sem_seg") == 2
    assert _local("vtd_train_bad_samples_total", run) == 3
    assert _local("vtd_train_step_duration_seconds_count", run) == 3
    assert _local("vtd_train_step_duration_seconds_bucket", run, le="0.5") == 2
    assert _local("vtd_train_step_duration_seconds_sum", run) == pytest.approx(1.5)
    if not torch.cuda.is_available():
        assert _local("vtd_train_gpu_memory_allocated_bytes", run) is None
        assert _local("vtd_train_gpu_utilization_percent", run) is None


def test_intervals_gauges_keep_values_counters_accumulate():
    run = _run_name("intervals")
    m = TrainMonitor(run, "cls", 2, flush_interval_s=NEVER, backend="local")
    m.record_step(**_step(losses={"loss/det/cls": 1.0, "loss/tag/weather": 4.0}, total_loss=5.0))
    m.flush()
    m.record_step(**_step(losses={"loss/det/cls": 3.0}, total_loss=3.0, set_name="tagging"))
    m.record_step(**_step(losses={"loss/det/cls": 5.0}, total_loss=5.0, set_name="tagging"))
    m.flush()
    m.flush()  # an empty interval changes nothing
    assert _local("vtd_train_loss", run, rank=2, term="loss/det/cls") == 4.0
    assert _local("vtd_train_loss", run, rank=2, term="loss/tag/weather") == 4.0, "absent term keeps its value"
    assert _local("vtd_train_total_loss", run, rank=2) == 4.0
    assert _local("vtd_train_steps_total", run, rank=2) == 3
    assert _local("vtd_train_samples_total", run, rank=2, set="tagging") == 8
    assert _local("vtd_train_images_total", run, rank=2) == 12
    m.close()


def test_record_step_flushes_by_time_and_by_count(monkeypatch):
    run = _run_name("auto-flush")
    m = TrainMonitor(run, "cls", 0, flush_interval_s=1e-9, backend="local")
    m.record_step(**_step())
    assert _local("vtd_train_steps_total", run) == 1, "an elapsed interval flushes at the step"
    monkeypatch.setattr(monitoring, "MAX_PENDING_STEPS", 5)
    run2 = _run_name("count-flush")
    m2 = TrainMonitor(run2, "cls", 0, flush_interval_s=NEVER, backend="local")
    for _ in range(12):
        m2.record_step(**_step())
    assert _local("vtd_train_steps_total", run2) == 10, "a flush every MAX_PENDING_STEPS steps"
    m.close()
    m2.close()
    assert _local("vtd_train_steps_total", run2) == 12


@pytest.mark.parametrize(
    ("over", "exc", "fragment"),
    [
        ({"images": -1}, ValueError, "images must be >= 0, got -1"),
        ({"images": 2.0}, TypeError, "images must be an int"),
        ({"images": True}, TypeError, "images must be an int"),
        ({"lr": -1e-3}, ValueError, "lr must be finite and >= 0"),
        ({"lr": math.inf}, ValueError, "lr must be finite"),
        ({"loss_scale": 0.0}, ValueError, "loss_scale must be finite and > 0"),
        ({"step_time_s": -0.1}, ValueError, "step_time_s must be finite and >= 0"),
        ({"step_time_s": math.nan}, ValueError, "step_time_s must be finite"),
        ({"data_wait_s": 0.3}, ValueError, "data_wait_s must be in [0, step_time_s=0.2]"),
        ({"data_wait_s": -0.01}, ValueError, "data_wait_s must be in"),
        ({"set_name": ""}, ValueError, "set_name must be a non-empty string"),
        ({"set_name": None}, ValueError, "set_name must be a non-empty string"),
        ({"skipped": 1}, TypeError, "skipped must be a bool"),
        ({"losses": [("loss/det/cls", 1.0)]}, TypeError, "losses must be a dict"),
        ({"losses": {"": 1.0}}, ValueError, "loss names must be non-empty strings"),
        ({"losses": {"loss/det/cls": "x"}}, ValueError, "could not convert"),
        ({"losses": {"loss/det/cls": math.nan}}, ValueError, "non-finite loss loss/det/cls=nan on a step that was not skipped"),
        ({"total_loss": math.inf}, ValueError, "non-finite total_loss=inf on a step that was not skipped"),
    ],
)
def test_record_step_rejects_bad_input_before_recording(over, exc, fragment):
    run = _run_name("bad")
    m = TrainMonitor(run, "cls", 0, flush_interval_s=NEVER, backend="local")
    with pytest.raises(exc) as err:
        m.record_step(**_step(**over))
    assert fragment in str(err.value)
    m.close()
    assert _local("vtd_train_steps_total", run) is None, "a rejected step records nothing"
    assert _local("vtd_train_loss", run, term="loss/det/cls") is None


def test_constructor_bad_samples_and_close_contracts():
    with pytest.raises(ValueError, match="run must be a non-empty string"):
        TrainMonitor("", "cls", 0, backend="local")
    with pytest.raises(ValueError, match="stage must be a non-empty string"):
        TrainMonitor("r", "", 0, backend="local")
    with pytest.raises(ValueError, match="rank must be >= 0, got -1"):
        TrainMonitor("r", "cls", -1, backend="local")
    with pytest.raises(ValueError, match="flush_interval_s must be > 0"):
        TrainMonitor("r", "cls", 0, flush_interval_s=0, backend="local")
    with pytest.raises(ValueError, match="backend must be"):
        TrainMonitor("r", "cls", 0, backend="statsd")  # type: ignore[arg-type]

    run = _run_name("close")
    m = TrainMonitor(run, "cls", 1, backend="local")
    with pytest.raises(ValueError, match="n must be >= 0, got -2"):
        m.record_bad_samples(-2)
    m.record_bad_samples(0)
    assert _local("vtd_train_bad_samples_total", run, rank=1) is None, "zero is not an event"
    m.close()
    m.close()  # idempotent
    with pytest.raises(RuntimeError, match="is closed"):
        m.record_step(**_step())
    with pytest.raises(RuntimeError, match="is closed"):
        m.record_bad_samples(1)


def test_auto_backend_follows_ray_initialisation():
    import ray

    m = TrainMonitor(_run_name("auto"), "cls", 0)
    assert m.backend == ("ray" if ray.is_initialized() else "local")
    m.close()
    if not ray.is_initialized():
        with pytest.raises(ValueError, match="backend='ray' needs Ray initialised"):
            TrainMonitor("r", "cls", 0, backend="ray")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_gauges_on_cuda():
    run = _run_name("gpu")
    x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # 64 MiB
    m = TrainMonitor(run, "cls", 0, backend="local")
    m.record_step(**_step())
    m.close()
    assert _local("vtd_train_gpu_memory_allocated_bytes", run) >= x.numel()
    assert _local("vtd_train_gpu_memory_reserved_bytes", run) >= x.numel()
    assert _local("vtd_train_gpu_memory_peak_bytes", run) >= x.numel()
    util = _local("vtd_train_gpu_utilization_percent", run)
    assert util is None or 0 <= util <= 100


# ---------------------------------------------------------------------------------------------
# Names, documentation, manifest


def test_metric_names_and_docs_agree():
    names = [s.name for s in METRICS]
    assert len(set(names)) == len(names)
    for spec in METRICS:
        assert spec.name.startswith("vtd_train_") and not spec.name.endswith("_total"), spec.name
        assert spec.tag_keys[:3] == ("run", "stage", "rank")
    doc = (ROOT / "docs" / "MONITORING.md").read_text()
    missing = [s.exported_name("ray") for s in METRICS if f"`{s.exported_name('ray')}`" not in doc]
    assert not missing, f"docs/MONITORING.md does not document {missing}"


def test_podmonitor_selects_ray_pods_metrics_port():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "podmonitor.yaml").read_text()) if d]
    assert len(docs) == 1
    pm = docs[0]
    assert (pm["apiVersion"], pm["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    (expr,) = pm["spec"]["selector"]["matchExpressions"]
    assert expr["key"] == "ray.io/node-type" and expr["operator"] == "In"
    assert set(expr["values"]) == {"head", "worker"}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


# ---------------------------------------------------------------------------------------------
# Cost (reported, not asserted: timing belongs in benchmarks)

TERMS_22 = [
    "loss/tag/weather", "loss/tag/scene", "loss/sem/ce", "loss/drivable/ce", "loss/lane/direction", "loss/lane/style",
    "loss/lane/category", "loss/rpn/cls", "loss/rpn/box", "loss/det/cls", "loss/det/box", "loss/ins/cls", "loss/ins/box",
    "loss/ins/mask", "loss/pose/heatmap", "loss/mot/cls", "loss/mot/box", "loss/mot/embed", "loss/mot/aux",
    "loss/mots/mask", "loss/flow/census", "loss/flow/smooth",
]


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_record_step_cost_is_reported(backend, request, capsys):
    """Median cost of a record_step without a flush and of a flush after 20 steps (a 2 s
    interval at 0.1 s/step), 22 loss terms."""
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    run, rounds, per_flush = _run_name("cost"), 15, 20
    kw = _step(losses={t: 0.01 * i for i, t in enumerate(TERMS_22)}, total_loss=2.31)
    m = TrainMonitor(run, "cls", 0, flush_interval_s=NEVER, backend=backend)
    calls, flushes = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_flush):
            m.record_step(**kw)
        t1 = time.perf_counter()
        m.flush()
        flushes.append(time.perf_counter() - t1)
        calls.append((t1 - t0) / per_flush)
    m.close()
    if backend == "local":
        assert _local("vtd_train_steps_total", run) == rounds * per_flush
        assert _local("vtd_train_loss", run, term="loss/flow/smooth") == pytest.approx(0.21)
    call_us, flush_us = statistics.median(calls) * 1e6, statistics.median(flushes) * 1e6
    with capsys.disabled():
        print(f"\n[monitoring] {backend}: record_step {call_us:.1f} us/call (22 terms, no flush); flush after "
              f"{per_flush} steps {flush_us:.0f} us; amortised {call_us + flush_us / per_flush:.1f} us/step")


# ---------------------------------------------------------------------------------------------
# End to end: Ray workers -> Ray metrics agent -> real Prometheus -> query API


@pytest.fixture(scope="module")
def prometheus(ray_cluster):
    """A real Prometheus scraping the shared Ray cluster's metrics agent every second."""
    from prometheus_server import PrometheusServer

    assert ray_cluster.metrics_export_port, "the shared cluster exports no metrics port"
    t0 = time.monotonic()
    with PrometheusServer([f"127.0.0.1:{ray_cluster.metrics_export_port}"], scrape_interval_s=1.0) as prom:
        print(f"\n[monitoring] Prometheus ready in {time.monotonic() - t0:.1f} s on port {prom.port}")
        yield prom


def _by(result: list[dict], *keys: str) -> dict[tuple, float]:
    return {tuple(s["metric"].get(k) for k in keys): float(s["value"][1]) for s in result}


def _close(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-9) for k in want)


@pytest.mark.ray
def test_prometheus_scrapes_train_metrics_from_ray_workers(prometheus):
    """Two simulated ranks (Ray actors running the real TrainMonitor) with known values."""
    import ray

    prom, run, stage, ranks = prometheus, _run_name("prom"), "cls", (0, 1)

    @ray.remote(num_cpus=0)
    class Rank:
        """A stand-in for one Ray Train worker: the real TrainMonitor in a Ray worker process."""

        def __init__(self, run: str, stage: str, rank: int) -> None:
            self.monitor = TrainMonitor(run, stage, rank, flush_interval_s=NEVER)

        def train(self, steps: list[dict], bad: int) -> str:
            for kw in steps:
                self.monitor.record_step(**kw)
            self.monitor.record_bad_samples(bad)
            self.monitor.close()
            return self.monitor.backend

    t0 = time.monotonic()
    actors = [Rank.remote(run, stage, r) for r in ranks]
    try:
        backends = ray.get([a.train.remote(_rank_steps(r), r + 1) for a, r in zip(actors, ranks)], timeout=120)
        assert backends == ["ray", "ray"]
        sel = f'{{run="{run}"}}'

        losses = prom.wait_for(f"ray_vtd_train_loss{sel}", lambda r: len(r) == 4, timeout_s=60)
        for s in losses:
            labels = s["metric"]
            assert labels["run"] == run and labels["stage"] == stage, labels
            assert labels["__name__"] == "ray_vtd_train_loss"
            assert "WorkerId" in labels and "NodeAddress" in labels, "Ray's own labels are kept"
        got = _by(losses, "rank", "term")
        want = {(str(r), t): _expected(r)[t] for r in ranks for t in ("loss/det/cls", "loss/sem/ce")}
        assert got == pytest.approx(want)

        def check(name: str, keys: tuple[str, ...], expected: dict) -> None:
            result = prom.wait_for(f"{name}{sel}", lambda r: len(r) == len(expected), timeout_s=30)
            assert _by(result, *keys) == pytest.approx(expected), name

        check("ray_vtd_train_total_loss", ("rank",), {(str(r),): _expected(r)["total"] for r in ranks})
        check("ray_vtd_train_learning_rate", ("rank",), {(str(r),): _expected(r)["lr"] for r in ranks})
        check("ray_vtd_train_loss_scale", ("rank",), {(str(r),): _expected(r)["loss_scale"] for r in ranks})
        check("ray_vtd_train_steps_total", ("rank",), {(str(r),): 3 for r in ranks})
        check("ray_vtd_train_skipped_steps_total", ("rank",), {(str(r),): 1 for r in ranks})
        check("ray_vtd_train_images_total", ("rank",), {(str(r),): 10 for r in ranks})
        check("ray_vtd_train_bad_samples_total", ("rank",), {(str(r),): r + 1 for r in ranks})
        check("ray_vtd_train_samples_total", ("rank", "set"),
              {(str(r), s): _expected(r)[f"samples/{s}"] for r in ranks for s in ("det", "sem_seg")})
        check("ray_vtd_train_step_duration_seconds_count", ("rank",), {(str(r),): 3 for r in ranks})
        check("ray_vtd_train_step_time_seconds", ("rank",), {(str(r),): 0.5 for r in ranks})
        # The same numbers through PromQL aggregation, the way a dashboard reads them.
        total = prom.query(f"sum by (run) (ray_vtd_train_images_total{sel})")
        assert [float(s["value"][1]) for s in total] == [20.0]
        if not torch.cuda.is_available():
            assert prom.query(f"ray_vtd_train_gpu_memory_allocated_bytes{sel}") == []
    finally:
        for a in actors:
            ray.kill(a)
    print(f"\n[monitoring] simulated ranks -> Prometheus: {time.monotonic() - t0:.1f} s")


@pytest.mark.ray
def test_prometheus_scrapes_a_real_cpu_training_run(scraped_run):
    """A 3-step, 2-worker CPU run of the real training loop (vtd_train.train.launch, the suite's
    shared ``scraped_run``), scraped; the series agree with what the run reported through
    ray.train.report."""
    prom, run, m, world = scraped_run["prom"], scraped_run["run"], scraped_run["metrics"], scraped_run["world"]
    # The workers are gone when fit() returns; Prometheus marks their series stale, so read the
    # last scraped samples.
    sel = f'{{run="{run}"}}'

    def settled(name: str, keys: tuple[str, ...], expected: dict[tuple, float]) -> list[dict]:
        """The last scraped samples of ``name`` once they equal ``expected`` (a worker's final
        flush reaches Prometheus a scrape or two after fit() returns)."""
        return prom.wait_for(f"last_over_time({name}{sel}[10m])", lambda r: _close(_by(r, *keys), expected), timeout_s=60)

    settled("ray_vtd_train_steps_total", ("rank", "stage"), {(str(r), scraped_run["stage"]): m["step"] for r in range(world)})
    images = prom.wait_for(f"sum(last_over_time(ray_vtd_train_images_total{sel}[10m]))",
                           lambda r: len(r) == 1 and float(r[0]["value"][1]) == m["images_seen"], timeout_s=30)
    assert float(images[0]["value"][1]) == m["images_seen"] > 0
    losses = prom.query(f"last_over_time(ray_vtd_train_loss{sel}[10m])")
    assert {s["metric"]["rank"] for s in losses} == {str(r) for r in range(world)}
    for s in losses:
        assert s["metric"]["term"].startswith("loss/") and math.isfinite(float(s["value"][1])), s
    # Rank 0's last step is what the final report carries.
    lr = _by(prom.query(f'last_over_time(ray_vtd_train_learning_rate{{run="{run}", rank="0"}}[10m])'), "rank")
    assert _close(lr, {("0",): m["lr"]}), (lr, m["lr"])
    scale = _by(prom.query(f'last_over_time(ray_vtd_train_loss_scale{{run="{run}", rank="0"}}[10m])'), "rank")
    assert _close(scale, {("0",): m["loss_scale"]}), (scale, m["loss_scale"])
