"""What a checkpoint costs the training: the step-time spike with the upload inside the report
(``checkpoint.upload: sync``) and in Ray Train's background thread (``async``), and the hashing
cost per GB of the verification.

Usage::

    uv run python benchmarks/checkpoint_bench.py [--steps 30] [--checkpoint-every 6] [--rounds 2]
        [--hash-mb 1024] [--workdir /tmp/vtd-ckpt-bench]

1. **Hashing.** SHA-256 of ``--hash-mb`` MB in memory (``hashlib``, the 8 MiB chunks
   :mod:`vtd_train.checkpoint` reads), and :func:`~vtd_train.checkpoint.verify_checkpoint` of a
   real training checkpoint of the tiny model (its files read back from the page cache and
   hashed), both as seconds per GB. A checkpoint is hashed twice on its way: once written
   (``write_checkpoint`` reads its files back) and once stored (the upload verifies the copy).
2. **Step-time spike.** The production path (``run_training`` → TorchTrainer → the per-worker loop,
   with our ``checkpoint_upload_fn``) on an embedded local Ray cluster, ``configs/tiny.yaml``
   (2 gloo workers, the tiny VTDNet: a training checkpoint with AdamW moments is ~140 MB), a
   report every step, on the synthetic mini dataset; three settings — no checkpoint until the
   last step, checkpoints every ``--checkpoint-every`` steps with ``upload: sync``, the same with
   ``upload: async`` — alternated ``--rounds`` times (this VM is noisy: all runs are printed).
   A recorder on Ray Train's controller (``ray.train.UserCallback``) keeps every report's rank-0
   timers (:mod:`vtd_train.train.reporting`). Per run:

   * ``plain step``: median wall time from one report to the next (``time/wall_s``) away from
     checkpoints, after the first 3 steps (warm-up) and before the last (the final checkpoint);
   * ``spike at a checkpoint``: the two intervals a checkpoint touches (its step, with the local
     write and hash, and the next, which holds the report call — the copy to storage and its
     verification in ``sync`` mode) minus two plain steps, averaged over the checkpoints;
   * ``over the run``: what one checkpoint costs the run's wall time, ``(wall/step − wall/step
     of the same round's run without checkpoints) × steps / checkpoints``: contention of a
     background upload with later steps included (but runs differ by more than steps: noisier).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    import ray.train

    class _Recorder(ray.train.UserCallback):
        """Appends rank 0's metrics of every report to a JSON-lines file (runs on the controller)."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            m = metrics[0]
            keep = {k: v for k, v in m.items() if k.startswith("time/") or k in ("step", "checkpoint")}
            with open(self.path, "a") as f:
                f.write(json.dumps(keep) + "\n")
except ImportError:  # pragma: no cover
    _Recorder = None


def hashing(mb: int, checkpoint: str | None) -> dict[str, float]:
    """Seconds per GB: SHA-256 in memory, and verify_checkpoint of ``checkpoint`` (read + hash)."""
    from vtd_train.checkpoint import verify_checkpoint

    chunk = os.urandom(8 << 20)
    n = max(1, (mb << 20) // len(chunk))
    h = hashlib.sha256()
    t = time.perf_counter()
    for _ in range(n):
        h.update(chunk)
    mem = (time.perf_counter() - t) / (n * len(chunk) / 1e9)
    out = {"sha256_s_per_gb": mem}
    if checkpoint is not None:
        size = sum(f.stat().st_size for f in Path(checkpoint).iterdir())
        verify_checkpoint(checkpoint)  # into the page cache
        t = time.perf_counter()
        reps = max(1, int(2e9 // size))
        for _ in range(reps):
            verify_checkpoint(checkpoint)
        out["verify_s_per_gb"] = (time.perf_counter() - t) / (reps * size / 1e9)
        out["checkpoint_mb"] = size / 1e6
    return out


def timeline(path: Path) -> dict[str, float]:
    """The figures of one run from its recorded reports (see the module docstring)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 3]  # after the warm-up
    rows, final = rows[:-1], rows[-1]  # the last report holds the final checkpoint
    # wall[i]: from report i-1's start to report i's: report i-1's call (a sync upload), step i,
    # writing step i's checkpoint
    wall = [b["time/wall_s"] - a["time/wall_s"] for a, b in zip(rows, rows[1:])]
    at = [i for i, r in enumerate(rows[1:], 1) if r["checkpoint"] and i + 1 < len(rows)]
    near = {j for i in at for j in (i, i + 1)}
    plain = [w for i, w in enumerate(wall, 1) if i not in near]
    base = statistics.median(plain)
    local = [wall[i - 1] + wall[i] - 2 * base for i in at]
    return {"steps": len(wall), "plain_step_s": base, "wall_per_step_s": sum(wall) / len(wall), "checkpoints": len(at),
            "local_spike_s": statistics.fmean(local) if local else 0.0, "final_step": final["step"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/vtd-ckpt-bench")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--checkpoint-every", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hash-mb", type=int, default=1024)
    ap.add_argument("--no-train", action="store_true", help="hashing figures only")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    from cluster.local import connect
    from data_pipeline.bdd100k.convert import ConvertOptions, convert
    from data_pipeline.bdd100k.synth import generate
    from vtd_train.train.config import load_train_config
    from vtd_train.train.launch import config_with, run_training
    from vtd_train.train.recovery import resume_checkpoint

    work = Path(args.workdir)
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        generate(str(work / "bdd100k"), seed=0, size="tiny", overwrite=True)
        convert(ConvertOptions(bdd_root=str(work / "bdd100k"), out=str(shards), shard_size=3, clip_len=4,
                               workers=1, progress=False, overwrite=True))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} CPUs; {args.steps} steps, a report every step, "
          f"checkpoints every {args.checkpoint_every}, {args.rounds} round(s)")
    settings = {"none": {"every_steps": 0, "upload": "sync"},
                "sync": {"every_steps": args.checkpoint_every, "upload": "sync"},
                "async": {"every_steps": args.checkpoint_every, "upload": "async"}}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    last_checkpoint = None
    if not args.no_train:
        connect(num_cpus=4)
        for r in range(args.rounds):
            for mode, ckpt in settings.items():
                name = f"ckpt-{mode}-{r}-{int(time.time())}"
                cfg = load_train_config(str(ROOT / "configs" / "tiny.yaml"), storage_path=str(work / "runs"), name=name)
                cfg = config_with(cfg, data={"uri": str(shards)}, epochs=100, lr_schedule={"milestones": []},
                                  max_steps=args.steps, report_every_steps=1,
                                  checkpoint={**ckpt, "at_epoch_end": False, "num_to_keep": 2})
                log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".jsonl")[1])
                t = time.perf_counter()
                run_training(cfg, callbacks=(_Recorder(str(log)),))
                fig = timeline(log)
                fig["fit_s"] = time.perf_counter() - t
                results[mode].append(fig)
                print(f"round {r} {mode:5s}: plain step {fig['plain_step_s']:.3f} s, wall/step {fig['wall_per_step_s']:.3f} s, "
                      f"spike at a checkpoint {fig['local_spike_s']:.3f} s ({fig['checkpoints']} checkpoints), fit {fig['fit_s']:.0f} s",
                      flush=True)
                last_checkpoint = resume_checkpoint(str(work / "runs"), name)
        print("\n# per checkpoint: at it (its step and the next, against the run's plain steps) | over the run "
              "(wall/step against the same round's run without checkpoints)")
        for mode in ("sync", "async"):
            local = [f["local_spike_s"] for f in results[mode]]
            whole = [(f["wall_per_step_s"] - b["wall_per_step_s"]) * f["steps"] / max(1, f["checkpoints"])
                     for f, b in zip(results[mode], results["none"])]
            print(f"{mode:5s}: at it {statistics.fmean(local):.3f} s (runs {', '.join(f'{x:.3f}' for x in local)}) | "
                  f"over the run {statistics.fmean(whole):.3f} s (runs {', '.join(f'{x:.3f}' for x in whole)})")
        plain = [f["plain_step_s"] for fs in results.values() for f in fs]
        print(f"plain step: {statistics.median(plain):.3f} s (runs {min(plain):.3f} to {max(plain):.3f})")
    h = hashing(args.hash_mb, last_checkpoint)
    print("\n# hashing")
    print(f"sha256 in memory: {h['sha256_s_per_gb']:.3f} s/GB ({1 / h['sha256_s_per_gb']:.2f} GB/s)")
    if "verify_s_per_gb" in h:
        print(f"verify_checkpoint (read back from the page cache + sha256), a {h['checkpoint_mb']:.0f} MB checkpoint: "
              f"{h['verify_s_per_gb']:.3f} s/GB; hashed twice per checkpoint: "
              f"{2 * h['verify_s_per_gb'] * h['checkpoint_mb'] / 1e3:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
