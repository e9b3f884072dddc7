"""Per-stage wall time and the orchestrator's own overhead of a finished pipeline run, read from
its run manifest (``<storage>/<run>/pipeline.json``).

    uv run vtd demo --workdir runs/demo                      # the tiny CPF pipeline
    uv run python benchmarks/pipeline_bench.py runs/demo/runs/cpf-tiny

Columns: the stage's job running time (Jobs API start → end), ``queued`` (submission → the job
running: the job supervisor's start), ``start gap`` (the last input's end → the job running:
polling + submission + queueing; for stages held back by ``max_parallel`` it includes that
wait), ``first step`` (the last input's end → the stage's first training step: the gap a
training stage's own start-up adds) and the Jobs API submission call's latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline import fsio  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="<storage>/<run> of a finished pipeline run")
    a = p.parse_args()
    m = json.loads(fsio.read_bytes(fsio.join(a.run_dir, "pipeline.json")))
    stages = m["stages"]

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:7.1f}"

    print(f"run {m['run']} ({m['pipeline']}, profile {m['profile']}): {m['state']}")
    print(f"{'stage':<26} {'wall s':>7} {'queued':>7} {'gap s':>7} {'1st step':>8} {'submit ms':>9}")
    lat, gaps, firsts = [], [], []
    t0 = min(r["submitted_at"] for r in stages.values() if r.get("submitted_at"))
    t1 = max(r["ended_at"] for r in stages.values() if r.get("ended_at"))
    for name, r in stages.items():
        mt = r.get("metrics", {})
        wall = r["ended_at"] - r["started_at"] if r.get("ended_at") and r.get("started_at") else None
        sl = mt.get("submit_latency_s")
        if sl is not None:
            lat.append(sl * 1000)
        if mt.get("start_gap_s") is not None:
            gaps.append(mt["start_gap_s"])
        if mt.get("first_step_gap_s") is not None:
            firsts.append(mt["first_step_gap_s"])
        print(f"{name:<26} {f(wall)} {f(mt.get('queued_s'))} {f(mt.get('start_gap_s'))} {f(mt.get('first_step_gap_s')):>8} "
              f"{'—' if sl is None else format(sl * 1000, '9.1f')}")
    print(f"pipeline wall time {t1 - t0:.0f} s over {len(stages)} stage jobs")
    if lat:
        print(f"submission latency: median {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms")
    if gaps:
        print(f"start gap (input end → job running): median {statistics.median(gaps):.1f} s, min {min(gaps):.1f} s "
              "(larger values: held back by max_parallel)")
    if firsts:
        print(f"first-step gap (input end → first training step): median {statistics.median(firsts):.1f} s, "
              f"min {min(firsts):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
