"""The training service's own overhead as a fraction of step time (tiny CPU config).

Usage::

    uv run python benchmarks/train_overhead.py [--steps 40] [--workers 2] [--workdir /tmp/vtd-train-bench]

Runs the production path (``vtd_train.train.launch.run_training`` → TorchTrainer → the per-worker
loop) on an embedded local Ray cluster with ``configs/tiny.yaml`` on the synthetic mini dataset,
then reads rank 0's cumulative timers from the final report (``time/*_s``, see
:mod:`vtd_train.train.reporting`) and prints:

* ``compute``   forward + backward + optimizer step (step time − data wait − agree − all-reduce;
                the gradient all-reduces that overlap the backward are inside it);
* ``agree``     the wait after the backward for the presence / non-finite all-reduce launched
                before it (0 when it arrived during the backward): waiting for a slower rank's
                forward (load imbalance between ranks' batches);
* ``all-reduce`` the wait after the backward for the gradient all-reduces still running (what
                the overlap did not hide; communication, not service overhead, but shown);
* ``data wait`` time blocked on the next batch (loader workers, or the in-process loader);
* ``monitor``   ``TrainMonitor.record_step`` (Prometheus metrics, every step);
* ``report``    ``ray.train.report`` barriers without a checkpoint (gather of interval stats,
                replica check, progress line);
* ``checkpoint`` writing the checkpoint locally + Ray's upload to storage, per checkpoint.

The service overhead outside checkpoint steps is (data wait + monitor + report) / (step time +
monitor + report); the target is ≤ 5 %. Checkpoint cost is given per checkpoint and as a fraction
at the configured interval.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/vtd-train-bench")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes per rank (default: the config's)")
    ap.add_argument("--report-every", type=int, default=10)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--scale", type=int, default=64, help="training image height")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from cluster.local import connect
    from data_pipeline.bdd100k.convert import ConvertOptions, convert
    from data_pipeline.bdd100k.synth import generate
    from vtd_train.train.config import load_train_config
    from vtd_train.train.launch import config_with, run_training

    work = Path(args.workdir)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        generate(str(work / "bdd100k"), seed=0, size="tiny", overwrite=True)
        convert(ConvertOptions(bdd_root=str(work / "bdd100k"), out=str(shards), shard_size=3, clip_len=4,
                               workers=1, progress=False, overwrite=True))
    cfg = load_train_config(str(ROOT / "configs" / "tiny.yaml"), storage_path=str(work / "runs"),
                            name=f"overhead-{int(time.time())}")
    loader_workers = cfg.data.loader_workers if args.loader_workers is None else args.loader_workers
    cfg = config_with(
        cfg, data={"uri": str(shards), "loader_workers": loader_workers, "scales": [args.scale]},
        resources={"num_workers": args.workers}, global_batch_size=2 * args.workers, epochs=100,
        lr_schedule={"milestones": []}, max_steps=args.steps, report_every_steps=args.report_every,
        checkpoint={"every_steps": args.checkpoint_every, "at_epoch_end": False, "num_to_keep": 1},
    )
    info = connect(num_cpus=max(4, args.workers * 2))
    t0 = time.perf_counter()
    result = run_training(cfg)
    wall = time.perf_counter() - t0
    m = result.metrics
    t = {k: m[f"time/{k}_s"] for k in ("step", "data_wait", "agree", "allreduce", "monitor", "report", "checkpoint")}
    steps = m["step"]
    n_ckpt = steps // args.checkpoint_every + (steps % args.checkpoint_every != 0)
    compute = t["step"] - t["data_wait"] - t["agree"] - t["allreduce"]
    base = t["step"] + t["monitor"] + t["report"]
    print(f"\ntrain overhead: {steps} steps, {args.workers} gloo workers, tiny VTDNet, batch 2/rank, height {args.scale}, "
          f"loader workers {loader_workers}; cluster {info.num_cpus:g} CPUs; fit wall {wall:.1f} s")
    print(f"{'component':<12} {'total s':>9} {'ms/step':>9} {'% of step':>10}")
    for name, v in (("compute", compute), ("agree", t["agree"]), ("all-reduce", t["allreduce"]), ("data wait", t["data_wait"]),
                    ("monitor", t["monitor"]), ("report", t["report"])):
        print(f"{name:<12} {v:>9.3f} {1e3 * v / steps:>9.2f} {100 * v / base:>9.2f}%")
    overhead = (t["data_wait"] + t["monitor"] + t["report"]) / base
    print(f"service overhead outside checkpoint steps (data wait + monitor + report): {100 * overhead:.2f}% (target <= 5%)")
    print(f"checkpoint: {n_ckpt} saves, {t['checkpoint'] / max(1, n_ckpt):.2f} s each (write + upload); "
          f"{100 * t['checkpoint'] / (base + t['checkpoint']):.1f}% of wall at one per {args.checkpoint_every} steps")
    print(f"throughput: {m['images_per_s']:.2f} img/s over the last interval; step {1e3 * t['step'] / steps:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
