"""The main job, ``vtd demo``: the whole service on a BDD100K-format mini dataset.

1. generate the mini dataset (real BDD100K layout and encodings);
2. convert it to WebDataset shards and read the counts back from the shards;
3. run the CPF pipeline (``jobs/cpf.yaml``, profile ``tiny``) end to end as Ray jobs on an
   embedded local Ray cluster: curriculum, single-task baselines, pseudo-labels, joint training,
   nine decoder fine-tunings, the merge, and an evaluation of every stage's checkpoint; a
   progress line per stage;
4. print VTDA and its group scores per stage (the paper's Table 5 as this run), each metric of
   the final model against the joint stage's and the untrained model's, and where the report is.

A rerun with the same workdir skips the stages whose inputs did not change.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from data_pipeline.bdd100k.convert import ConvertOptions, convert
from data_pipeline.shards.inspect import inspect_shards
from data_pipeline.bdd100k.synth import generate

#: The pipeline the demo runs (its ``tiny`` profile: the tiny VTDNet on CPU, learning from
#: scratch at lr 1e-3; see the profile for each stage's epochs).
PIPELINE = Path(__file__).resolve().parents[1] / "jobs" / "cpf.yaml"


def run_demo(workdir: str, seed: int = 0, size: str = "demo") -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    root, shards = work / "bdd100k", work / "shards"

    t0 = time.perf_counter()
    generate(str(root), seed=seed, size=size, overwrite=True)
    print(f"[1/4] generated a BDD100K-format {size} dataset in {root} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    convert(ConvertOptions(bdd_root=str(root), out=str(shards), shard_size=8, workers=2, overwrite=True, progress=False))
    report = inspect_shards(str(shards))
    print(f"[2/4] converted to WebDataset shards in {shards} ({time.perf_counter() - t0:.1f} s); read back from the shards:")
    for key, s in sorted(report["sets"].items()):
        tasks = ", ".join(f"{t} {v['samples']}" for t, v in sorted(s["tasks"].items()))
        print(f"      {key:<12} {s['samples']:>4} frames in {s['shards']} shards; labelled frames: {tasks}")

    return run_pipeline(work, shards)


def run_pipeline(work: Path, shards: Path) -> int:
    """Steps 3 and 4: the tiny CPF pipeline on an embedded local cluster, then the comparison."""
    import ray

    from cluster.local import connect
    from orchestrator.cli import _connect_jobs_api
    from orchestrator.metrics import PipelineMetrics
    from orchestrator.runner import Orchestrator
    from orchestrator.spec import load_pipeline
    from orchestrator.state import RunManifest

    spec = load_pipeline(str(PIPELINE), profile="tiny")
    info = connect(None)
    client = _connect_jobs_api("http://" + ray._private.worker.get_dashboard_url())
    metrics_port = free_port()
    print(f"[3/4] the CPF pipeline ({PIPELINE.name}, profile tiny: {len(spec.stages)} stages + evaluations) as Ray jobs on "
          f"the embedded local Ray cluster ({info.num_cpus:g} CPUs; jobs: {client.address}, `ray job list --address "
          f"{client.address}`; orchestrator metrics on 127.0.0.1:{metrics_port}/metrics)", flush=True)
    t0 = time.perf_counter()
    orch = Orchestrator(spec, run="cpf-tiny", data=str(shards), storage=str(work / "runs"), client=client,
                        python=sys.executable, metrics=PipelineMetrics(metrics_port), log=lambda ln: print("      " + ln, flush=True))
    rc = orch.run()
    if rc != 0:
        print(f"vtd demo: the pipeline stopped (exit {rc}); `vtd jobs status {PIPELINE} --profile tiny --storage {work / 'runs'}`",
              file=sys.stderr)
        return rc
    manifest = RunManifest.load(orch.run_dir)
    assert manifest is not None
    compare(manifest, time.perf_counter() - t0, Path(orch.run_dir))
    return 0


def free_port() -> int:
    from cluster.local import free_port as port

    return port()


def compare(manifest, seconds: float, run_dir: Path) -> None:
    """Step 4: each metric of the final (merged) model against the joint stage's and the
    untrained model's."""
    from vtd_train.evaluation.vtda import METRIC_KEYS

    def scores(stage: str) -> dict:
        rec = manifest.stages[f"eval-{stage}"]
        return {**rec.outputs["metrics"], **rec.outputs["scores"]}

    u, j, f = scores("untrained"), scores("joint"), scores("final")
    print(f"[4/4] the pipeline took {seconds / 60:.1f} min; on the validation split:")
    print(f"      {'metric':<13} {'untrained':>9} {'joint':>9} {'final':>9} {'rise':>7} {'final-joint':>11}")
    flat = []
    for k in (*METRIC_KEYS, "vtda_cls", "vtda_seg", "vtda_loc", "vtda_ass", "vtda"):
        a, b, c = u.get(k), j.get(k), f.get(k)
        rise = None if a is None or c is None else c - a
        flag = ""
        if k in METRIC_KEYS and (rise is None or rise <= 0):
            flat.append(k)
            flag = "  <- did not rise"
        print(f"      {k:<13} {_fmt(a):>9} {_fmt(b):>9} {_fmt(c):>9} {_fmt(rise, sign=True):>7} "
              f"{_fmt(None if b is None or c is None else c - b, sign=True):>11}{flag}")
    n = len(METRIC_KEYS)
    print(f"      {n - len(flat)} of {n} metrics rose over the untrained model"
          + (f"; did not rise: {', '.join(flat)}" if flat else ""))
    above_u = f["vtda"] > u["vtda"]
    above_j = f["vtda"] > j["vtda"]
    print(f"      final VTDA {f['vtda']:.1f}: {'above' if above_u else 'NOT above'} the untrained model's {u['vtda']:.1f}, "
          f"{'above' if above_j else 'NOT above'} the joint-only stage's {j['vtda']:.1f}")
    print(f"      report: {run_dir / 'report.html'} (per-stage reports with overlays linked there)")


def _fmt(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")
