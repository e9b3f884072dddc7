"""The main job, ``vtd demo``: the whole service on a BDD100K-format mini dataset.

1. generate the mini dataset (real BDD100K layout and encodings);
2. convert it to WebDataset shards and read the counts back from the shards;
3. stream one epoch through the training loader (2 ranks), printing throughput;
4. train the tiny VTDNet on the embedded local Ray cluster (2 workers, gloo, CPU);
5. evaluate the trained model and the same model untrained on the validation split, print the
   VTDA breakdown side by side and where the report is.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from data_pipeline.convert import ConvertOptions, convert
from data_pipeline.inspect import inspect_shards
from data_pipeline.loader import LoaderConfig, MultiSetDataset, build_train_loader
from data_pipeline.manifest import families_from_manifest
from data_pipeline.synth import generate
from data_pipeline.transforms import AugmentConfig, prepare_batch

#: The demo's training run: configs/tiny.yaml with these changes (570 steps, about 7 minutes
#: on 2 CPU cores). The tiny model learns from scratch, so it takes a higher learning rate than the
#: paper's 1e-4 for ResNet-50 from ImageNet weights, and enough steps for the localization and
#: association decoders to move (tests/test_overfit.py: 300-800 steps to fit a few frames).
DEMO_EPOCHS = 30
DEMO_LR = 1e-3
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def run_demo(workdir: str, seed: int = 0, size: str = "tiny") -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    root, shards = work / "bdd100k", work / "shards"

    t0 = time.perf_counter()
    generate(str(root), seed=seed, size=size, overwrite=True)
    print(f"[1/5] generated a BDD100K-format {size} dataset in {root} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    convert(ConvertOptions(bdd_root=str(root), out=str(shards), shard_size=8, workers=2, overwrite=True, progress=False))
    report = inspect_shards(str(shards))
    print(f"[2/5] converted to WebDataset shards in {shards} ({time.perf_counter() - t0:.1f} s); read back from the shards:")
    for key, s in sorted(report["sets"].items()):
        tasks = ", ".join(f"{t} {v['samples']}" for t, v in sorted(s["tasks"].items()))
        print(f"      {key:<12} {s['samples']:>4} frames in {s['shards']} shards; labelled frames: {tasks}")

    scales = {"tiny": (80, 88, 96), "small": (160, 176, 192)}[size]
    cfg = LoaderConfig(batch_size=2, num_workers=2, seed=seed, augment=AugmentConfig(scales=scales))
    per_set = Counter()
    frames = 0
    t0 = time.perf_counter()
    for rank in range(2):  # the two ranks of a 2-worker run, one after the other
        ds = MultiSetDataset(families_from_manifest(str(shards), "train"), cfg, rank=rank, world_size=2)
        ds.set_epoch(0)
        n = 0
        for batch in build_train_loader(ds):
            batch = prepare_batch(batch)  # what the training step does on its device
            per_set[batch.set_name] += 1
            frames += len(batch)
            n += 1
        assert n == len(ds), (n, len(ds))
    dt = time.perf_counter() - t0
    print(
        f"[3/5] streamed one epoch for 2 ranks × {len(ds)} batches (round-robin over sets: "
        + ", ".join(f"{s} {c}" for s, c in sorted(per_set.items()))
        + f"): {frames} frames in {dt:.1f} s = {frames / dt:.0f} frames/s incl. worker start-up"
    )
    checkpoint = train(work, shards, seed)
    compare(work, shards, checkpoint, seed)
    return 0


def train(work: Path, shards: Path, seed: int) -> str:
    """Step 4: the tiny VTDNet on the embedded local Ray cluster; returns the final checkpoint."""
    import shutil

    from cluster.local import connect
    from vtd_train.train.launch import checkpoint_progress, config_with, run_training
    from vtd_train.train.config import load_train_config

    storage = work / "train"
    shutil.rmtree(storage, ignore_errors=True)  # a fresh run each time (same name would resume)
    cfg = load_train_config(str(CONFIG))
    cfg = config_with(
        cfg,
        name="demo",
        seed=seed,
        storage_path=str(storage),
        epochs=DEMO_EPOCHS,
        optimizer={"lr": DEMO_LR},
        lr_schedule={"milestones": (DEMO_EPOCHS * 5 // 6,), "warmup_steps": 20},
        # checkpoints at the end only: each one carries the optimizer state (~3× the weights)
        checkpoint={"every_steps": 0, "at_epoch_end": False},
        report_every_steps=50,
        data={"uri": str(shards), "scales": (96,)},
    )
    info = connect(None, num_cpus=4)
    print(f"[4/5] training the tiny VTDNet for {DEMO_EPOCHS} epochs on the embedded local Ray cluster "
          f"({cfg.resources.num_workers} workers, {cfg.precision}); progress lines follow", flush=True)
    t0 = time.perf_counter()
    result = run_training(cfg)
    p = checkpoint_progress(result.checkpoint)
    print(f"      done in {time.perf_counter() - t0:.0f} s: {p.global_step} steps, mean loss per epoch "
          f"{p.epoch_losses[0]:.3f} (first) → {p.epoch_losses[-1]:.3f} (last); checkpoint {result.checkpoint.path}"
          f" (Prometheus metrics were on 127.0.0.1:{info.metrics_export_port}/metrics)")
    return result.checkpoint.path


def compare(work: Path, shards: Path, checkpoint: str, seed: int) -> None:
    """Step 5: the trained model against the same model untrained, on the validation split."""
    import torch

    from vtd_train.checkpoint import load_model, save_model
    from vtd_train.evaluation.evaluate import evaluate
    from vtd_train.evaluation.vtda import METRIC_KEYS
    from vtd_train.model.vtdnet import VTDNet

    _, cfg, _ = load_model(checkpoint)
    torch.manual_seed(seed)
    untrained_dir = work / "untrained"
    save_model(str(untrained_dir), VTDNet(cfg), cfg, {"note": "random init, the demo's baseline"})
    t0 = time.perf_counter()
    before = evaluate(str(untrained_dir), str(shards), out_dir=str(work / "report-untrained"), distributed=False)
    after = evaluate(checkpoint, str(shards), out_dir=str(work / "report"), distributed=False)
    print(f"[5/5] evaluated on the validation split ({time.perf_counter() - t0:.0f} s):")
    print(f"      {'metric':<13} {'untrained':>9} {'trained':>9} {'rise':>7}")
    flat = []
    for k in (*METRIC_KEYS, "vtda_cls", "vtda_seg", "vtda_loc", "vtda_ass", "vtda"):
        b, a = before.get(k), after.get(k)
        rise = None if a is None or b is None else a - b
        flag = "" if rise is None or rise > 0 else "  <- did not rise"
        if flag and k in METRIC_KEYS:
            flat.append(k)
        print(f"      {k:<13} {_fmt(b):>9} {_fmt(a):>9} {_fmt(rise, sign=True):>7}{flag}")
    verdict = "higher" if after["vtda"] > before["vtda"] else "NOT higher"
    print(f"      the trained model's VTDA is {verdict} than untrained ({after['vtda']:.1f} vs {before['vtda']:.1f}); "
          + (f"metrics that did not rise: {', '.join(flat)}" if flat else "every metric rose"))
    print(f"      report: {work / 'report' / 'report.html'}")


def _fmt(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")
