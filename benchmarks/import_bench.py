"""Import time of the service's entry modules, each in a fresh interpreter: what a process pays
before it does any work (a Ray job's driver, the orchestrator, ``vtd jobs status``, a Ray Train
worker). Prints the median of ``--repeat`` fresh imports per module, and which heavy libraries
the import loaded.

    uv run python benchmarks/import_bench.py [--repeat 5] [--repo PATH]

``--repo`` times another checkout of the code with this interpreter (old and new side by side
on the same machine, e.g. a ``git worktree`` of an earlier commit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODULES = (
    "vtd_train.train.config",        # the training config: every driver and the orchestrator
    "orchestrator.runner",           # the pipeline orchestrator, `vtd jobs ...`
    "vtd_train.train.launch",        # a `vtd train` driver, before Ray Train
    "vtd_train.model.vtdnet",        # the model: workers, evaluation
)
HEAVY = ("torch", "torchvision", "sympy", "ray")

_CODE = """
import json, sys, time
t = time.perf_counter()
import {module}
dt = time.perf_counter() - t
print(json.dumps([dt, [m for m in {heavy!r} if m in sys.modules]]))
"""


def time_import(module: str, repo: Path) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, "-c", _CODE.format(module=module, heavy=HEAVY)], cwd=repo, env=env,
                         capture_output=True, text=True, check=True)
    dt, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return dt, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args()
    print(f"repo {args.repo}, {os.cpu_count()} cores, median of {args.repeat} fresh imports")
    for module in MODULES:
        runs = [time_import(module, args.repo) for _ in range(args.repeat)]
        times = sorted(t for t, _ in runs)
        print(f"{module:26s} {statistics.median(times):6.2f} s (min {times[0]:.2f}, max {times[-1]:.2f})  "
              f"loads {', '.join(runs[-1][1]) or 'none of ' + '/'.join(HEAVY)}")


if __name__ == "__main__":
    main()
