"""The monitoring assets (k8s/base/prometheusrule.yaml, k8s/base/dashboards/vtd-training.json)
query what the code exports:

- ``promtool check rules`` on the PrometheusRule's groups, and ``promtool test rules``: each alert
  fires on a synthetic history that should fire it and stays quiet on one that should not;
- every metric and grouping label in the alerts and the dashboard is one the training monitor
  (``vtd_train.train.monitoring.METRICS``) or the orchestrator (``orchestrator.metrics``) exports;
- against a real Prometheus that scraped a real 2-worker CPU training run (Ray's metrics agent)
  and the real orchestrator metrics server: every dashboard query returns data over the run (the
  GPU panels: valid and empty, as on any CPU run), every template variable lists the run, every
  alert expression evaluates, and the stage-failed alert fires for the failed stage.

Prometheus (and its promtool) is Debian's package, installed when missing (tests/prometheus_server.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from functools import cache
from pathlib import Path

import pytest
import yaml

from vtd_train.train.monitoring import BASE_TAGS, METRICS

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD = ROOT / "k8s" / "base" / "dashboards" / "vtd-training.json"
#: Labels Ray adds to every series a worker records (docs/MONITORING.md)
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "WorkerId", "Version"}


# ---------------------------------------------------------------------------------------------
# What the code exports


@cache
def pipeline_metrics() -> dict[str, set[str]]:
    """Series names the orchestrator's registry exports (every gauge set once) → their labels."""
    from orchestrator.metrics import PipelineMetrics
    from orchestrator.state import StageRecord

    pm = PipelineMetrics(None)
    pm.stage("r", "s", StageRecord(key="k", state="failed", attempt=2, started_at=1.0, ended_at=2.0,
                                   metrics={"queued_s": 1.0, "start_gap_s": 1.0, "first_step_gap_s": 1.0}))
    pm.submitted("r", "s", 0.1)
    out: dict[str, set[str]] = {}
    for family in pm.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@cache
def train_metrics() -> dict[str, set[str]]:
    """Exported names of the training monitor's metrics (Ray backend) → their labels."""
    out = {}
    for spec in METRICS:
        labels = set(BASE_TAGS) | set(spec.extra_tags) | RAY_LABELS
        name = spec.exported_name("ray")
        if spec.kind == "histogram":
            out[f"{name}_bucket"] = labels | {"le"}
            out[f"{name}_sum"] = out[f"{name}_count"] = labels
        else:
            out[name] = labels
    return out


def exported() -> dict[str, set[str]]:
    return {**train_metrics(), **pipeline_metrics()}


def gpu_only(name: str) -> bool:
    return "_gpu_" in name


# ---------------------------------------------------------------------------------------------
# What the assets query


@cache
def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


@cache
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def dashboard_variables() -> dict[str, str]:
    return {v["name"]: v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"}


METRIC = re.compile(r"\b((?:ray_vtd_train|vtd_pipeline)_[a-z_]+)\b")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def metrics_in(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def concrete(expr: str, *, run: str, pipeline: str, stage: str = ".*") -> str:
    """A dashboard query with Grafana's variables filled in, as Grafana sends it."""
    return (expr.replace("$__rate_interval", "1m").replace("$run", run).replace("$pipeline", pipeline)
            .replace("$stage", stage))


# ---------------------------------------------------------------------------------------------
# Static checks


def test_every_metric_and_label_in_alerts_and_dashboard_is_exported():
    names = exported()
    queries = [(f"alert {a}", r["expr"]) for a, r in alerts().items()] + [
        (f"panel {t}", q) for t, q in dashboard_targets()] + [(f"variable {v}", q) for v, q in dashboard_variables().items()]
    assert len(queries) > 20
    for where, expr in queries:
        used = metrics_in(expr)
        assert used, f"{where}: queries none of the service's metrics: {expr}"
        unknown = used - names.keys()
        assert not unknown, f"{where}: {sorted(unknown)} is not exported by the code"
        available = set.union(*(names[m] for m in used)) | {"le"}
        for group in GROUPING.findall(expr):
            labels = {x.strip() for x in group.split(",") if x.strip()}
            assert labels <= available, f"{where}: groups by {sorted(labels - available)}, which {sorted(used)} do not carry"
    # the panels: per-task losses, images/s, data-wait share, GPU memory, step time, CPF progress
    text = " ".join(q for _, q in dashboard_targets())
    for needed in ("ray_vtd_train_loss{", "ray_vtd_train_images_total", "ray_vtd_train_data_wait_seconds",
                   "ray_vtd_train_gpu_memory_reserved_bytes", "ray_vtd_train_step_duration_seconds_bucket",
                   "vtd_pipeline_stage_state"):
        assert needed in text, f"the dashboard has no panel on {needed}"


def test_dashboard_is_a_grafana_dashboard_with_the_sidecar_shape():
    d = dashboard()
    assert d["uid"] == "vtd-training" and d["schemaVersion"] >= 36 and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "run", "stage", "pipeline"} <= variables
    used = set(re.findall(r"\$(\w+)", json.dumps([t for _, t in dashboard_targets()])))
    assert used - {"__rate_interval"} <= variables, used


@pytest.fixture(scope="module")
def promtool():
    from prometheus_server import ensure_prometheus

    binary = Path(ensure_prometheus()).with_name("promtool")
    assert binary.exists(), f"no promtool beside {binary.with_name('prometheus')}"
    return str(binary)


@pytest.fixture()
def rules_file(tmp_path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    return path


def test_promtool_check_rules(promtool, rules_file):
    proc = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in proc.stdout


def _s(name: str, values: str, **labels: str) -> dict:
    base = {"run": "r1", "stage": "joint", "rank": "0", "WorkerId": "w0"} if name.startswith("ray_") else {}
    base.update(labels)
    return {"series": name + "{" + ", ".join(f'{k}="{v}"' for k, v in base.items()) + "}", "values": values}


def _render(template: str, labels: dict[str, str], value: float) -> str:
    """The subset of Prometheus' alert templating the rules use."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
    text = re.sub(r"\{\{\s*\$value\s*\|\s*humanizePercentage\s*\}\}", f"{value * 100:g}%", text)
    return re.sub(r"\{\{\s*\$value\s*\}\}", f"{value:g}", text)


def _fires(alert: str, at: str, value: float, **labels: str) -> dict:
    """The alert fires with these labels, its annotations rendered with them and ``value``."""
    rule = alerts()[alert]
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{
        "exp_labels": {**labels, "severity": rule["labels"]["severity"]},
        "exp_annotations": {k: _render(v, labels, value) for k, v in rule["annotations"].items()},
    }]}


def _quiet(alert: str, at: str) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


TRAIN = {"run": "r1", "stage": "joint"}
#: (alert, histories that fire it, histories that must not)
ALERT_CASES = {
    "VTDTrainingStalled": [
        ([_s("ray_vtd_train_steps_total", "0+10x10 100x30")], _fires("VTDTrainingStalled", "35m", 0, **TRAIN)),
        ([_s("ray_vtd_train_steps_total", "0+10x40")], _quiet("VTDTrainingStalled", "35m")),
        # a finished run: its workers' series end; no alert once they are gone
        ([_s("ray_vtd_train_steps_total", "0+10x10 stale")], _quiet("VTDTrainingStalled", "35m")),
    ],
    "VTDTrainingNonFiniteSteps": [
        ([_s("ray_vtd_train_steps_total", "0+10x30"), _s("ray_vtd_train_skipped_steps_total", "0+1x30")],
         _fires("VTDTrainingNonFiniteSteps", "25m", 0.1, **TRAIN)),
        ([_s("ray_vtd_train_steps_total", "0+10x30"), _s("ray_vtd_train_skipped_steps_total", "2x30")],
         _quiet("VTDTrainingNonFiniteSteps", "25m")),
    ],
    "VTDTrainingLossScaleCollapsed": [
        ([_s("ray_vtd_train_loss_scale", "0.5x20")], _fires("VTDTrainingLossScaleCollapsed", "15m", 0.5, **TRAIN)),
        ([_s("ray_vtd_train_loss_scale", "1024x20")], _quiet("VTDTrainingLossScaleCollapsed", "15m")),
    ],
    "VTDTrainingBadSamples": [
        ([_s("ray_vtd_train_bad_samples_total", "0 0 0 5 5 5")], _fires("VTDTrainingBadSamples", "4m", 5, **TRAIN)),
        ([_s("ray_vtd_train_bad_samples_total", "0x6")], _quiet("VTDTrainingBadSamples", "4m")),
    ],
    "VTDTrainingDataBound": [
        ([_s("ray_vtd_train_data_wait_seconds", "0.5x30"), _s("ray_vtd_train_step_time_seconds", "1x30")],
         _fires("VTDTrainingDataBound", "20m", 0.5, rank="0", **TRAIN)),
        ([_s("ray_vtd_train_data_wait_seconds", "0.1x30"), _s("ray_vtd_train_step_time_seconds", "1x30")],
         _quiet("VTDTrainingDataBound", "20m")),
    ],
    "VTDTrainingWorkerRestarted": [
        ([_s("ray_vtd_train_steps_total", "0+1x5 stale", WorkerId="w0"),
          _s("ray_vtd_train_steps_total", "_x6 0+1x10", WorkerId="w1")],
         _fires("VTDTrainingWorkerRestarted", "10m", 2, rank="0", **TRAIN)),
        ([_s("ray_vtd_train_steps_total", "0+1x20", WorkerId="w0"),
          _s("ray_vtd_train_steps_total", "0+1x20", WorkerId="w9", rank="1")],   # two ranks, one worker each
         _quiet("VTDTrainingWorkerRestarted", "10m")),
    ],
    "VTDPipelineStageFailed": [
        ([_s("vtd_pipeline_stage_state", "0 0 1 1", run="cpf", stage="joint", state="failed"),
          _s("vtd_pipeline_stage_state", "1 1 0 0", run="cpf", stage="joint", state="running")],
         _fires("VTDPipelineStageFailed", "3m", 1, run="cpf", stage="joint")),
        ([_s("vtd_pipeline_stage_state", "0x3", run="cpf", stage="joint", state="failed")],
         _quiet("VTDPipelineStageFailed", "3m")),
    ],
    "VTDPipelineStageRetried": [
        ([_s("vtd_pipeline_stage_attempt", "1 1 2 2", run="cpf", stage="joint")],
         _fires("VTDPipelineStageRetried", "3m", 2, run="cpf", stage="joint")),
        ([_s("vtd_pipeline_stage_attempt", "1x3", run="cpf", stage="joint")], _quiet("VTDPipelineStageRetried", "3m")),
    ],
}


def test_promtool_unit_tests_cover_every_alert(promtool, rules_file, tmp_path):
    assert set(ALERT_CASES) == set(alerts()), "every alert needs a case that fires it and one that does not"
    tests = []
    for alert, cases in ALERT_CASES.items():
        assert any(c[1]["exp_alerts"] for c in cases) and any(not c[1]["exp_alerts"] for c in cases), alert
        for series, check in cases:
            for s in series:
                assert METRIC.search(s["series"]).group(1) in exported(), s
            tests.append({"interval": "1m", "input_series": series, "alert_rule_test": [check]})
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}))
    proc = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Against a real Prometheus that scraped a real training run


def _api(prom, path: str, **params) -> dict:
    url = f"{prom.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=20) as r:
        doc = json.load(r)
    assert doc.get("status") == "success", f"{path} {params}: {doc}"
    return doc["data"]


@pytest.mark.ray
def test_every_dashboard_query_returns_data_from_the_real_run(scraped_run):
    prom, end = scraped_run["prom"], time.time()
    empty = []
    for title, expr in dashboard_targets():
        # both training runs selected, as a user would pick them in the `run` variable: the real
        # run and the event counters the healthy run never increments
        runs = f'{scraped_run["run"]}|{scraped_run["run"]}-events'
        q = concrete(expr, run=runs, pipeline=scraped_run["pipeline"])
        data = _api(prom, "query_range", query=q, start=scraped_run["start"] - 5, end=end, step=1)
        has_data = any(s["values"] for s in data["result"])
        if all(gpu_only(m) for m in metrics_in(expr)):
            assert not has_data, f"{title}: GPU series on a CPU run?"     # valid PromQL, no GPU here
        elif not has_data:
            empty.append(f"{title}: {q}")
    assert not empty, "dashboard queries with no data over a real run:\n  " + "\n  ".join(empty)


@pytest.mark.ray
def test_dashboard_variables_list_the_run(scraped_run):
    prom = scraped_run["prom"]
    want = {"run": scraped_run["run"], "stage": scraped_run["stage"], "pipeline": scraped_run["pipeline"]}
    for name, query in dashboard_variables().items():
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert m, f"variable {name}: {query}"
        selector = m.group(1).replace("$run", scraped_run["run"])
        values = _api(prom, f"label/{m.group(2)}/values", **{"match[]": selector, "start": scraped_run["start"] - 5,
                                                            "end": time.time()})
        assert want[name] in values, f"variable {name} ({query}) lists {values}"


@pytest.mark.ray
def test_every_alert_expression_evaluates_on_the_real_series(scraped_run):
    prom, run, pipeline = scraped_run["prom"], scraped_run["run"], scraped_run["pipeline"]
    for alert, rule in alerts().items():
        prom.query(rule["expr"])                                     # valid on the real server
        for m in metrics_in(rule["expr"]):
            label = pipeline if m.startswith("vtd_pipeline") else f"{run}|{run}-events"
            found = prom.query(f'count(last_over_time({m}{{run=~"{label}"}}[10m]))')
            assert found and float(found[0]["value"][1]) > 0, f"{alert}: {m} has no series from the real run"
    fired = prom.query(alerts()["VTDPipelineStageFailed"]["expr"])
    assert {(s["metric"]["run"], s["metric"]["stage"]) for s in fired} >= {(pipeline, "finetune_det")}
    assert not [s for s in fired if s["metric"]["run"] == pipeline and s["metric"]["stage"] != "finetune_det"]
    retried = prom.query(alerts()["VTDPipelineStageRetried"]["expr"])
    assert (pipeline, "finetune_det") in {(s["metric"]["run"], s["metric"]["stage"]) for s in retried}
    # a healthy 3-step run restarts no worker: evaluated while its series were current
    restarted = _api(prom, "query", query=alerts()["VTDTrainingWorkerRestarted"]["expr"], time=time.time() - 2)["result"]
    assert not [s for s in restarted if s["metric"].get("run") == run], restarted
