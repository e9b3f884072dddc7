"""The main job, ``vtd demo``: mini BDD100K dataset → WebDataset shards → loader throughput.

Later stages (training on a local Ray cluster, evaluation, VTDA) extend this same command.
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
from data_pipeline.transforms import AugmentConfig, apply_augment


def run_demo(workdir: str, seed: int = 0, size: str = "tiny") -> int:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    root, shards = work / "bdd100k", work / "shards"

    t0 = time.perf_counter()
    generate(str(root), seed=seed, size=size, overwrite=True)
    print(f"[1/3] generated a BDD100K-format {size} dataset in {root} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    convert(ConvertOptions(bdd_root=str(root), out=str(shards), shard_size=8, workers=2, overwrite=True, progress=False))
    report = inspect_shards(str(shards))
    print(f"[2/3] converted to WebDataset shards in {shards} ({time.perf_counter() - t0:.1f} s); read back from the shards:")
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
            batch = apply_augment(batch)  # what the training step does on its device
            per_set[batch.set_name] += 1
            frames += len(batch)
            n += 1
        assert n == len(ds), (n, len(ds))
    dt = time.perf_counter() - t0
    print(
        f"[3/3] streamed one epoch for 2 ranks × {len(ds)} batches (round-robin over sets: "
        + ", ".join(f"{s} {c}" for s, c in sorted(per_set.items()))
        + f"): {frames} frames in {dt:.1f} s = {frames / dt:.0f} frames/s incl. worker start-up"
    )
    return 0
