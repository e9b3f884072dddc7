"""Score files with BDD100K's official toolkit (``bdd100k`` + ``scalabel`` on PyPI).

Run by ``tests/test_predict_toolkit.py`` with the Python of a *separate* environment that has
the toolkit installed (the toolkit's pins — pydantic 1, numpy 1.25 — clash with this
project's): ``python bdd100k_toolkit_eval.py JOBS.json OUT.json``. ``JOBS.json`` is a list of
``{"task", "gt", "result", "config"?, "score_file"?}``; each job runs the toolkit's own command
line, ``python -m bdd100k.eval.run --task T --gt G --result R [...] --nproc 1 --out-file F``
(its ``run()``, called in this process to pay the imports once), except ``"task": "tagging"``,
which the BDD100K command does not offer: that one is scalabel's ``evaluate_tagging`` with a
weather / scene config. ``OUT.json`` maps each job's ``name`` (default: its task) to the
result dict the toolkit wrote, or to ``{"error": traceback}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def run_bdd100k(job: dict, out_file: str) -> dict:
    from bdd100k.eval import run as bdd_run

    argv = ["bdd100k.eval.run", "--task", job["task"], "--gt", job["gt"], "--result", job["result"],
            "--nproc", "1", "--out-file", out_file, "--quiet"]
    if job.get("config"):
        argv += ["--config", job["config"]]
    if job.get("score_file"):
        argv += ["--score-file", job["score_file"]]
    saved = sys.argv
    sys.argv = argv
    try:
        bdd_run.run()
    finally:
        sys.argv = saved
    with open(out_file, encoding="utf-8") as fh:
        return json.load(fh)


def run_tagging(job: dict) -> dict:
    from scalabel.eval.tagging import evaluate_tagging
    from scalabel.label.io import load
    from scalabel.label.typing import Category, Config

    cats = [Category(name=tag, subcategories=[Category(name=v) for v in values]) for tag, values in job["classes"].items()]
    config = Config(categories=cats)
    gts, preds = load(job["gt"]).frames, load(job["result"]).frames
    if job.get("names"):  # score only these frames (those with a tagging label)
        keep = set(job["names"])
        gts = [f for f in gts if f.name in keep]
    return dict(evaluate_tagging(gts, preds, config, nproc=1))


def main(jobs_path: str, out_path: str) -> int:
    with open(jobs_path, encoding="utf-8") as fh:
        jobs = json.load(fh)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, job in enumerate(jobs):
            name = job.get("name", job["task"])
            try:
                if job["task"] == "tagging":
                    results[name] = run_tagging(job)
                else:
                    results[name] = run_bdd100k(job, os.path.join(tmp, f"{i}.json"))
            except Exception:  # noqa: BLE001 - reported to the test, which fails with it
                results[name] = {"error": traceback.format_exc()}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
