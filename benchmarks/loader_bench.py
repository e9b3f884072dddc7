"""Loader throughput against the JPEG-decode floor, and loader memory as the dataset grows.

Usage::

    uv run python benchmarks/loader_bench.py [--repeat 5] [--frames 600] [--sets det,seg,track]
        [--throughput-only] [--handoff-ab N] [--workdir /tmp/vtd-loader-bench]

What it measures, all on one core (``torch.set_num_threads(1)``, loader with ``num_workers=0``
so the loop runs in this process, which gets a DataLoader worker's malloc settings,
:func:`data_pipeline.loading.loader.keep_freed_memory`), in interleaved rounds (floor pass, loader epoch, ...), so
that a noisy host slows both sides of a ratio alike; it reports medians:

* ``jpeg floor``: the bare decode of the very JPEG bytes stored in the shards by the fastest
  decoder installed, frames/s: each round times both ``torchvision.io.decode_jpeg`` and
  ``simplejpeg.decode_jpeg`` (the loader's decoder, :mod:`data_pipeline.loading.jpeg`); the floor is
  the decoder with the higher median over the run's rounds (``tv``/``sj`` columns: each
  decoder's median), and each round's ratio uses that decoder's passes of the round. (Taking
  the faster of the two in each round instead, as this script did until 2026-11-22, picks the
  luckier of two noisy timings: it overstated the floor by 0.4-3% when the two decoders are
  close, ``max/round`` column);
* ``jpeg+labels``: the same (by the loader's decoder) plus the decode of the label maps stored with each frame
  (drivable, lane, sem, instance map; run-length members): the bare decode work a labelled
  sample needs;
* ``loader``: the training loader (shard read → decode of JPEG, label maps and records →
  typed batch), frames/s, per image set, and its ratio to the floor (side by side, same run);
* ``1 worker``: the same loader as training runs it, ``DataLoader(num_workers=1)``: the worker
  process decodes, the main process receives the batches through shared memory, timed from
  the worker's first batch on, in every round; ``steady``: the same epoch from its batch ``W``
  on, once the worker has claimed each of its shared-memory slots twice (see
  :func:`one_worker_fps`), the rate of a real epoch of thousands of batches; ``start ms``:
  until the first batch, the worker's start-up; ``warm ms``: what batches ``1..W`` took beyond
  the steady rate (first writes to the worker's segments). Both are paid once per epoch. A
  line under each set lists the per-round ratios of ``steady`` and ``loader`` (the spread);
* ``/in-situ``: ``steady`` against a floor timed inside the worker, at the same moments: the
  worker's own JPEG decode calls are timed (``data_pipeline.loading.jpeg.decode_into`` wrapped while the
  worker forks, a shared counter), and the floor is one frame per mean decode time of that
  window. The host's speed drifts by several percent within minutes on a shared VM (other
  tenants' load, ``steal %``: the share of the machine's CPU time the hypervisor gave elsewhere
  during the round), and the floor passes and the loader epoch run at different moments; this
  ratio does not depend on that. It leans the loader's way by what decoding inside the worker
  loses to the caches the worker's other work disturbs (decode calls in the worker took 1.5-3.5%
  longer than those of a floor pass run right after them, benchmarks/RESULTS.md);
* row ``all``: the same for the sets together, as training reads them: one loader over every
  set (``round_robin``, one batch of each set in turn), each set listed to ``--frames`` frames,
  against the floor decoding the same frames (the decode cost of an epoch depends on which
  images it holds: seg frames decode about 5% faster than det ones);
* ``--handoff-ab N``: one more ``1 worker`` epoch per round whose worker hands over ``N``
  batches per DataLoader item instead of the default ``handoff_batches``, and the per-round
  ratio of the two (steady state);
* ``loader+aug``: the loader preparing batches itself (scale + flip + padding on the CPU,
  ``augment_in_loader``) instead of the training device;
* ms per label map: decoding the dataset's PNG vs the shard's run-length member;
* ms per frame to read the shards into samples: webdataset's reader vs the project's
  ``tar_reader`` (why the loader has its own);
* ms to write a batch's frames into a fresh shared-memory segment vs into an already-faulted
  one: the page faults a worker would pay per batch without reusing its segments
  (:mod:`data_pipeline.loading.shm_pool`; it decodes the frames straight into the segment);
* peak RSS of a fresh process streaming 1×, 2× and 4× the dataset (shards repeated).

Each epoch and each floor pass covers at least ``--frames`` frames (the set's shards listed
repeatedly): a real BDD100K epoch has tens of thousands, so per-epoch costs (opening shards,
filling the shuffle buffer, a new worker's first writes to its segments) are amortised as in
training, and a short timing does not let one slow moment of the host decide a round. Each
round's floor is the mean of the floor passes before and after its loader epochs.

Images are 1280×720 (the synth generator's ``full`` size).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import simplejpeg
import torch
from PIL import Image
from torchvision.io import decode_jpeg, decode_png
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.loading import jpeg
from data_pipeline.bdd100k.convert import ConvertOptions, convert
from data_pipeline.loading.loader import (
    LoaderConfig,
    MultiSetDataset,
    ShardFamily,
    build_train_loader,
    iter_shard,
    keep_freed_memory,
)
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.shards.format import FORMAT_VERSION, decode_label_map, encode_label_map
from data_pipeline.bdd100k.synth import generate
from data_pipeline.loading.config import AugmentConfig


def floor_blobs(urls, with_labels: bool) -> tuple[list[tuple[bool, object]], int]:
    """The JPEGs (and, with ``with_labels``, the label maps) stored in the shards, and the frame count."""
    blobs = [
        (k.endswith(".jpg"), torch.frombuffer(bytearray(v), dtype=torch.uint8) if k.endswith(".jpg") else v)
        for u in urls
        for s in iter_shard(u)
        for k, v in s.items()
        if k.endswith(".jpg") or (with_labels and k.endswith(".rle"))
    ]
    return blobs, sum(is_jpg for is_jpg, _ in blobs)


def epoch_blobs(fams: list[ShardFamily], frames: int, with_labels: bool) -> tuple[list[tuple[bool, object]], int]:
    """:func:`floor_blobs` of each family, repeated as :func:`long_family` repeats its shards for
    an epoch of ``frames`` frames per set: one pass over them decodes what that epoch decodes."""
    out, n = [], 0
    for fam in fams:
        blobs, k = floor_blobs(fam.urls, with_labels)
        times = -(-frames // fam.frames)
        out += blobs * times
        n += k * times
    return out, n


DECODERS = {
    "tv": decode_jpeg,
    "sj": lambda b: simplejpeg.decode_jpeg(b.numpy(), colorspace="RGB"),
}


def floor_pass(blobs, n: int, decoder: str = "tv") -> float:
    """Frames/s of bare decoding of the blobs with ``decoder`` (+ the label maps' runs expanded)."""
    dec = DECODERS[decoder]
    t0 = time.perf_counter()
    for is_jpg, b in blobs:
        dec(b) if is_jpg else decode_label_map(b)
    return n / (time.perf_counter() - t0)


# seconds and calls of the loader's JPEG decodes, counted in a forked DataLoader worker (read
# while it writes: a reading may count one decode's time and not yet the call, 0.1% of a window)
_DECODE_CLOCK = torch.zeros(2, dtype=torch.float64).share_memory_()
_CLOCK = _DECODE_CLOCK.numpy()
_DECODE_INTO = jpeg.decode_into


def _timed_decode_into(data, out) -> None:
    t = time.perf_counter()
    _DECODE_INTO(data, out)
    _CLOCK[0] += time.perf_counter() - t
    _CLOCK[1] += 1


def steal_share(before, after) -> float:
    """The share of the machine's CPU time the hypervisor gave to others between two
    ``psutil.cpu_times()`` readings (0 where the platform does not report steal)."""
    total = sum(after) - sum(before)
    return (getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)) / total if total > 0 else 0.0


def png_label_ms(root: Path, repeat: int) -> dict[str, tuple[float, float]]:
    """Per label kind: ms to decode the dataset's PNG vs the shard's run-length member of the
    same map (for bitmasks: the instance map the converter stores, one value per instance)."""
    out = {}
    kinds = {"drivable": "labels/drivable/masks/train", "lane": "labels/lane/masks/train",
             "sem": "labels/sem_seg/masks/train", "bitmask": "labels/ins_seg/bitmasks/train"}
    for kind, rel in kinds.items():
        pngs = [p.read_bytes() for p in sorted((root / rel).glob("*.png"))[:8]]
        arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in pngs]
        if kind == "bitmask":
            ids = [(a[..., 2].astype(np.int32) << 8) | a[..., 3] for a in arrays]
            arrays = [np.unique(i, return_inverse=True)[1].reshape(i.shape).astype(np.uint8) for i in ids]
        rles = [encode_label_map(a) for a in arrays]
        pt = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in pngs]
        t0 = time.perf_counter()
        for _ in range(repeat):
            for b in pt:
                decode_png(b)
        t_png = (time.perf_counter() - t0) / (repeat * len(pt)) * 1e3
        t0 = time.perf_counter()
        for _ in range(repeat):
            for b in rles:
                decode_label_map(b)
        t_rle = (time.perf_counter() - t0) / (repeat * len(rles)) * 1e3
        out[kind] = (t_png, t_rle)
    return out


def loader_dataset(fams: ShardFamily | list[ShardFamily], in_loader: bool, workers: int = 0,
                   handoff: int | None = None) -> MultiSetDataset:
    """The training loader over one set, or over several as training runs them (one batch of each
    set in turn, ``round_robin``)."""
    cfg = LoaderConfig(batch_size=2, num_workers=workers, augment_in_loader=in_loader, shuffle_buffer=8,
                       augment=AugmentConfig(), sampling="round_robin")
    if handoff is not None:
        cfg = replace(cfg, handoff_batches=handoff)
    return MultiSetDataset(fams if isinstance(fams, list) else [fams], cfg, rank=0, world_size=1)


def loader_pass(ds: MultiSetDataset, epoch: int) -> float:
    """Frames/s of one epoch of the loader in this process (``num_workers=0``)."""
    ds.set_epoch(epoch)
    t0 = time.perf_counter()
    frames = sum(len(b) for b in ds)
    return frames / (time.perf_counter() - t0)


def long_family(fam: ShardFamily, frames: int = 600) -> ShardFamily:
    """The family with its shards listed over and over: an epoch of at least ``frames`` frames,
    so that per-epoch set-up (opening shards, filling the shuffle buffer, a new worker's first
    writes to its shared-memory segments) is amortised as over a real BDD100K epoch of tens of
    thousands of frames."""
    times = -(-frames // fam.frames)
    return ShardFamily(set_name=fam.set_name, split=fam.split, urls=fam.urls * times,
                       shard_frames=fam.shard_frames * times, shard_label_sets=fam.shard_label_sets * times,
                       shard_clip_frames=fam.shard_clip_frames * times, shard_sample_offsets=fam.shard_sample_offsets * times)


def one_worker_fps(ds: MultiSetDataset, epoch: int) -> tuple[float, float, float, float, float]:
    """The loader as training runs it, ``DataLoader(num_workers=1)``, over one long epoch:
    frames/s from the worker's first batch on, frames/s in steady state (from batch ``W`` on),
    the ms until that first batch (the worker's start-up) and the warm-up, the ms batches
    ``1..W`` took beyond the steady rate; and the steady rate against the in-situ floor (from
    batch ``W`` until the worker is about to finish: the frames the training process received
    meanwhile, times the mean of the worker's decode calls meanwhile; the worker stays the same
    few hand-offs ahead throughout). ``W`` is twice the worker's shared-memory slots
    (:class:`~data_pipeline.loading.shm_pool.BufferPool`): it claims them least recently used first, so
    its first batches fault a fresh segment in each (about 0.5 ms per MiB on this VM, again in
    the training process); by batch ``W`` every slot has been claimed twice and sized. Start-up
    and warm-up are paid once per epoch: a tenth of a second against a real epoch of thousands
    of batches, but several percent of a benchmark epoch of a few hundred."""
    ds.set_epoch(epoch)
    t0 = time.perf_counter()
    jpeg.decode_into = _timed_decode_into  # in the worker, which forks now
    try:
        it = iter(build_train_loader(ds))
    finally:
        jpeg.decode_into = _DECODE_INTO
    w = 2 * it.buffer_pool.slots_per_worker
    last = len(it) - 1 - (ds.cfg.prefetch_factor + 2) * ds.cfg.handoff_batches  # the worker still at work
    if last < 2 * w:
        raise SystemExit(f"a 1-worker epoch of {len(it)} batches is too short to time after its {w} warm-up "
                         "batches: raise --frames")
    times, frames, clock = [], [], {}
    for i, b in enumerate(it):
        times.append(time.perf_counter())
        frames.append(len(b))
        if i in (w, last):
            clock[i] = _DECODE_CLOCK.clone()
    decode_s, decodes = (clock[last] - clock[w]).tolist()
    if not decodes:
        raise SystemExit("the worker's decode calls were not counted: the in-situ floor wraps "
                         "data_pipeline.loading.jpeg.decode_into, which the worker must call through the module, in DataLoader "
                         "workers started by fork (Linux)")
    in_situ = sum(frames[w + 1:last + 1]) / (times[last] - times[w]) * (decode_s / decodes)
    whole = sum(frames[1:]) / (times[-1] - times[0])
    steady = sum(frames[w + 1:]) / (times[-1] - times[w])
    per_batch = (times[-1] - times[w]) / (len(times) - 1 - w)
    warm_up = (times[w] - times[0]) - w * per_batch
    return whole, steady, (times[0] - t0) * 1e3, warm_up * 1e3, in_situ


def shard_read_ms(fam: ShardFamily, repeat: int) -> tuple[float, float]:
    """ms per frame to read a set's shards into grouped samples: webdataset's reader
    (``tar_file_expander`` + ``group_by_keys``) vs the project's (``iter_shard``); best of ``repeat``."""
    def wds():
        for u in fam.urls:
            with open(u, "rb") as f:
                for _ in group_by_keys(tar_file_expander([{"url": u, "stream": f}])):
                    pass

    def ours():
        for u in fam.urls:
            for _ in iter_shard(u):
                pass

    out = []
    for fn in (wds, ours):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(best / fam.frames * 1e3)
    return out[0], out[1]


def shm_copy_ms(nbytes: int, repeat: int = 20) -> tuple[float, float]:
    """ms to copy ``nbytes`` into a fresh shared-memory segment (what a DataLoader worker would
    pay per batch without reusing segments) and into an already-faulted buffer, for comparison."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    reused = torch.empty(nbytes, dtype=torch.uint8)

    def fresh():
        buf = torch.empty(0, dtype=torch.uint8)
        buf.set_(buf.untyped_storage()._new_shared(nbytes)).resize_(nbytes).copy_(src)

    out = []
    for fn in (fresh, lambda: reused.copy_(src)):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        out.append((time.perf_counter() - t0) / repeat * 1e3)
    return out[0], out[1]


def replicate(fam: ShardFamily, dst: Path, times: int) -> list[str]:
    """Copies of the family's (local) shards with renamed keys, in its order: a dataset
    ``times`` as large, same content."""
    dst.mkdir(parents=True, exist_ok=True)
    urls = []
    for k in range(times):
        for shard in map(Path, fam.urls):
            out = dst / f"rep{k}-{shard.name}"
            with tarfile.open(shard) as tin, tarfile.open(out, "w") as tout:
                for m in tin.getmembers():
                    data = tin.extractfile(m).read()
                    m.name = f"r{k}" + m.name
                    tout.addfile(m, io.BytesIO(data))
            urls.append(str(out))
    return urls


def peak_rss_child(urls: list[str], shard_frames: list[int]) -> float:
    """Peak RSS (MiB) of a fresh process streaming the given shards once through the loader."""
    code = (
        "import json,resource,sys,torch;torch.set_num_threads(1)\n"
        "from data_pipeline.loading.loader import LoaderConfig,MultiSetDataset,ShardFamily\n"
        "urls=json.loads(sys.argv[1]);n=json.loads(sys.argv[2])\n"
        "fam=ShardFamily(set_name='det',split='train',urls=tuple(urls),shard_frames=tuple(n))\n"
        "ds=MultiSetDataset([fam],LoaderConfig(batch_size=2,num_workers=0,shuffle_buffer=8),rank=0,world_size=1)\n"
        "c=sum(len(b) for b in ds)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(urls), json.dumps(shard_frames)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def throughput_row(label: str, fams: list[ShardFamily], a: argparse.Namespace) -> None:
    """One row of the throughput table: the loader over ``fams`` (one set, or several taken
    round-robin as in training, each listed to ``a.frames`` frames) against the floor decoding
    the same frames, in ``a.repeat`` interleaved rounds; then the per-round ratios."""
    med = statistics.median
    bj, nj = epoch_blobs(fams, a.frames, with_labels=False)
    bl, nl = epoch_blobs(fams, a.frames, with_labels=True)
    ds = loader_dataset([long_family(f, a.frames) for f in fams], in_loader=False)
    ds_aug = loader_dataset(fams, in_loader=True)
    ds1 = loader_dataset([long_family(f, a.frames) for f in fams], in_loader=False, workers=1)
    next(iter(ds)), next(iter(ds_aug)), floor_pass(bj[:4], 2, "tv"), floor_pass(bj[:4], 2, "sj")  # warm-up
    dsb = None if a.handoff_ab is None else loader_dataset([long_family(f, a.frames) for f in fams], False, 1,
                                                           a.handoff_ab)
    tv, sj, fm, lo, l1, l1s, l1i, st, wu, la, lb, steal = [], [], [], [], [], [], [], [], [], [], [], []

    def floors():  # both decoders, in alternating order
        for d in ("tv", "sj") if len(tv) % 2 == 0 else ("sj", "tv"):
            (tv if d == "tv" else sj).append(floor_pass(bj, nj, d))

    for r in range(a.repeat):
        c0 = psutil.cpu_times()
        floors()
        fm.append(floor_pass(bl, nl, "sj"))  # the loader's decoder, with the label maps
        lo.append(loader_pass(ds, r))
        if dsb is not None and r % 2:  # the A/B's order alternates between rounds
            lb.append(one_worker_fps(dsb, r)[1])
        whole, steady, start_ms, warm_ms, in_situ = one_worker_fps(ds1, r)
        l1.append(whole), l1s.append(steady), l1i.append(in_situ), st.append(start_ms), wu.append(warm_ms)
        if dsb is not None and not r % 2:
            lb.append(one_worker_fps(dsb, r)[1])
        floors()
        la.append(loader_pass(ds_aug, r))
        steal.append(steal_share(c0, psutil.cpu_times()))
    # the fastest decoder over the run; each round's floor: its passes before and after the epochs
    fastest = tv if med(tv) > med(sj) else sj
    fl = [(fastest[2 * r] + fastest[2 * r + 1]) / 2 for r in range(a.repeat)]
    fl_max = [(max(tv[2 * r], sj[2 * r]) + max(tv[2 * r + 1], sj[2 * r + 1])) / 2 for r in range(a.repeat)]
    r_lo = med(x / y for x, y in zip(lo, fl))
    r_lm = med(x / y for x, y in zip(lo, fm))
    r_l1 = med(x / y for x, y in zip(l1, fl))
    r_l1s = med(x / y for x, y in zip(l1s, fl))
    r_la = med(x / y for x, y in zip(la, fl))
    print(f"{label:<6} {len(ds) * ds.cfg.batch_size:>6} {med(tv):>6.1f} {med(sj):>6.1f} {med(fl):>10.1f} "
          f"{med(fl_max):>9.1f} {med(fm):>11.1f} "
          f"{med(lo):>7.1f} {r_lo:>6.2f} {r_lm:>12.2f} {med(l1):>8.1f} {r_l1:>6.2f} {med(l1s):>7.1f} {r_l1s:>6.2f} "
          f"{med(st):>8.0f} {med(wu):>7.0f} {med(la):>10.1f} {r_la:>6.2f} {med(l1i):>9.2f} {100 * med(steal):>7.1f}",
          flush=True)
    print(f"{'':<6} per round, steady / jpeg: " + " ".join(f"{x / y:.2f}" for x, y in zip(l1s, fl))
          + "; loader / jpeg: " + " ".join(f"{x / y:.2f}" for x, y in zip(lo, fl))
          + f"; steady / (max/round): {med(x / y for x, y in zip(l1s, fl_max)):.2f}", flush=True)
    print(f"{'':<6} per round, steady / in-situ: " + " ".join(f"{x:.2f}" for x in l1i)
          + "; steal %: " + " ".join(f"{100 * x:.1f}" for x in steal), flush=True)
    if dsb is not None:
        r_lb = med(x / y for x, y in zip(lb, fl))  # steady state, as the default's ``steady``
        gain = med(x / y for x, y in zip(l1s, lb))
        print(f"{'':<6} 1 worker, handoff_batches {a.handoff_ab}: {med(lb):.1f} f/s, /jpeg {r_lb:.2f}; default "
              f"({ds1.cfg.handoff_batches}) / this, per round: median {gain:.3f}, rounds "
              + " ".join(f"{x / y:.3f}" for x, y in zip(l1s, lb)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/vtd-loader-bench")
    p.add_argument("--repeat", type=int, default=5, help="measurement rounds per set")
    p.add_argument("--frames", type=int, default=600,
                   help="frames per loader epoch and per floor pass (the set's shards listed repeatedly)")
    p.add_argument("--sets", default="det,seg,track", help="image sets to measure (comma-separated)")
    p.add_argument("--throughput-only", action="store_true", help="only the loader-vs-floor table")
    p.add_argument("--handoff-ab", type=int, default=None, metavar="N",
                   help="also time, in every round, a 1-worker epoch whose worker hands over N batches at a time "
                        "(handoff_batches), side by side with the default")
    a = p.parse_args()
    torch.set_num_threads(1)
    # This process plays the loader worker: the same malloc settings a DataLoader worker gets.
    print(f"# worker malloc settings applied: {keep_freed_memory()}")
    work = Path(a.workdir)
    root, shards = work / "bdd100k", work / "shards"
    manifest = shards / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("format_version") != FORMAT_VERSION:
        if not (root / "labels").exists():
            generate(str(root), seed=0, size="full", overwrite=True)
        convert(ConvertOptions(bdd_root=str(root), out=str(shards), shard_size=4, workers=2, overwrite=True,
                               progress=False))
    fams = {f.set_name: f for f in families_from_manifest(str(shards), "train")}
    print(f"# torch {torch.__version__}, 1 thread, {os.cpu_count()} cores on this machine; 1280x720 frames")
    print("ratios are loader / floor, measured side by side in this run; frames/s on one core")
    print(f"# {a.repeat} rounds per set, each: floor passes (tv, sj), floor+labels pass, loader epoch, the same"
          f" through 1 worker, floor passes again, loader+aug epoch (the set once); epochs and floor passes of >="
          f" {a.frames} frames (shards listed repeatedly)")
    print("# frames/s are medians over rounds; ratios the median of the per-round ratios, each round's floor the"
          " mean of the passes before and after its loader epochs")
    print(f"{'set':<6} {'frames':>6} {'tv':>6} {'sj':>6} {'jpeg floor':>10} {'max/round':>9} {'jpeg+labels':>11} {'loader':>7} "
          f"{'/jpeg':>6} {'/jpeg+labels':>12} {'1 worker':>8} {'/jpeg':>6} {'steady':>7} {'/jpeg':>6} {'start ms':>8} "
          f"{'warm ms':>7} {'loader+aug':>10} {'/jpeg':>6} {'/in-situ':>9} {'steal %':>7}")
    unknown = sorted(set(a.sets.split(",")) - set(fams))
    if unknown:
        raise SystemExit(f"--sets: no image set {unknown} in {manifest}; it holds {sorted(fams)}")
    chosen = [fams[s] for s in a.sets.split(",")]
    for fam in chosen:
        throughput_row(fam.set_name, [fam], a)
    if len(chosen) > 1:  # the sets together, as training reads them
        throughput_row("all", chosen, a)

    if a.throughput_only:
        return
    print("\n# reading the shards into samples, ms per frame: webdataset's reader vs data_pipeline/shards/tar_reader.py")
    for s, fam in fams.items():
        t_wds, t_ours = shard_read_ms(fam, a.repeat)
        print(f"{s:<6} webdataset {t_wds:6.3f} ms   tar_reader {t_ours:6.3f} ms   ({t_wds / t_ours:.1f}x)")

    frame = 3 * 720 * 1280
    fresh, reused = shm_copy_ms(2 * frame)
    print(f"\n# writing a det batch's two 1280x720 frames ({2 * frame / 2**20:.1f} MiB) for the hand-off: into a fresh "
          f"shared-memory segment {fresh:.2f} ms, into a reused buffer {reused:.2f} ms")

    print("\n# one 1280x720 label map: ms to decode the dataset's PNG vs the shard's run-length member")
    for kind, (t_png, t_rle) in png_label_ms(root, a.repeat).items():
        print(f"{kind:<9} png {t_png:6.2f} ms   rle {t_rle:6.2f} ms   ({t_png / t_rle:.1f}x)")

    det = fams["det"]
    print("\n# peak RSS of a fresh loader process (det set, shards repeated)")
    for times in (1, 2, 4):
        d = work / f"rep{times}"
        shutil.rmtree(d, ignore_errors=True)
        urls = replicate(det, d, times)
        rss = peak_rss_child(urls, list(det.shard_frames) * times)
        print(f"dataset x{times}: {det.frames * times:>5} frames  peak RSS {rss:7.1f} MiB")
    print(f"# this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
