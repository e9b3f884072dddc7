"""A real Prometheus server for tests: installed from Debian when missing, started on a free
port with a throw-away config and TSDB, queried through its HTTP API, stopped at the end.

    with PrometheusServer(["127.0.0.1:8080"], scrape_interval_s=1.0) as prom:
        series = prom.wait_for('ray_vtd_train_loss{run="x"}', lambda r: len(r) == 4, timeout_s=60)

Installation (``apt-get update && apt-get install -y prometheus``) needs root on Debian, which
is how CI runs; elsewhere install Prometheus yourself (any 2.x on ``PATH``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cluster.local import free_port

DEBIAN_BINARY = "/usr/bin/prometheus"
INSTALL_TIMEOUT_S = 600
READY_TIMEOUT_S = 30.0

Series = list[dict]  # the "result" list of an instant-vector query: [{"metric": {...}, "value": [ts, "1.5"]}]


def ensure_prometheus() -> str:
    """The path of a ``prometheus`` binary, installing Debian's package when there is none."""
    found = shutil.which("prometheus") or (DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError(
            "prometheus is not installed and cannot be installed here (needs root and apt-get); "
            "install Prometheus 2.x and put it on PATH"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    if not os.access(DEBIAN_BINARY, os.X_OK):
        raise RuntimeError(f"apt-get installed prometheus but {DEBIAN_BINARY} is missing")
    return DEBIAN_BINARY


class PrometheusServer:
    """One Prometheus process scraping ``targets`` (``host:port``, path ``/metrics``)."""

    def __init__(self, targets: list[str], *, scrape_interval_s: float = 1.0) -> None:
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        binary = ensure_prometheus()
        self._tmp = tempfile.TemporaryDirectory(prefix="prometheus-test-")
        tmp = Path(self._tmp.name)
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        config = {  # JSON is YAML
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}],
        }
        (tmp / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self._log = tmp / "prometheus.log"
        self.port = free_port()
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus on port {self.port} not ready after {READY_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)
        self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self._log.read_text(errors="replace")[-n:] if self._log else ""
        except OSError:
            return ""

    def query(self, promql: str) -> Series:
        """An instant query through ``/api/v1/query``: the result vector."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        if doc.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {doc}")
        if doc["data"]["resultType"] != "vector":
            raise RuntimeError(f"query {promql!r}: expected an instant vector, got {doc['data']['resultType']}")
        return doc["data"]["result"]

    def targets_health(self) -> list[dict]:
        """``/api/v1/targets``'s active targets (scrape URL, health, last error)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            return [
                {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                for t in json.load(r)["data"]["activeTargets"]
            ]

    def wait_for(self, promql: str, done: Callable[[Series], bool], *, timeout_s: float = 60.0, poll_s: float = 1.0) -> Series:
        """Poll ``promql`` until ``done(result)``; on timeout fail with the last result and the
        scrape targets' health."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if done(result):
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"Prometheus query {promql!r} did not reach the expected state in {timeout_s:.0f} s.\n"
                    f"last result: {json.dumps(result)[:3000]}\n"
                    f"targets: {self.targets_health()}\nprometheus log:\n{self.log_tail(1500)}"
                )
            time.sleep(poll_s)
