"""Gradient sync side by side: the overlapped presence-aware sync vs DDP vs the post-backward
schedule, same model, same batches, same process group.

Usage::

    # 2 gloo processes on CPU, the tiny VTDNet and the mid-size one (the figures in RESULTS.md)
    uv run python benchmarks/grad_sync_bench.py --world 2 --models tiny,mid
    # the paper's VTDNet-R50 (69 M parameters; minutes per repeat on a 2-core CPU machine)
    uv run python benchmarks/grad_sync_bench.py --world 2 --models r50 --repeats 3
    # GPU machine with N GPUs (NCCL needs one GPU per rank), fp16 as the paper trains:
    uv run python benchmarks/grad_sync_bench.py --device cuda --backend nccl --world N --models r50 \\
        --precision fp16 --height 720 --batch 2

Every rank builds the model from the same seed and takes real loader batches of its own (the
synth generator's tiny dataset converted to shards, split by rank as training splits it), one
per image set; steps go round-robin det → seg → track, as joint training does, so most
decoders get no gradient on a given step. Variants (DDP on a replica of its own, the
other two sharing one; same initial weights), interleaved step by step (the order rotating), a
repeat being one round of steps per variant:

* ``overlap`` — production: :class:`~vtd_train.train.step.TrainStep` with
  :class:`~vtd_train.train.grad_sync.GradSync` (buckets of ``--bucket-mb`` all-reduced from the
  gradient hooks during the backward, one presence / non-finite all-reduce launched before it
  and read by the hooks once it has arrived, the precision's communication dtype);
* ``post`` — the same TrainStep and GradSync with ``overlap=False`` and one bucket: one flat
  all-reduce after the backward, the schedule of the sync this one replaced;
* ``ddp`` — ``torch.nn.parallel.DistributedDataParallel(find_unused_parameters=True,
  bucket_cap_mb=--bucket-mb)`` with the same autocast / GradScaler / gradient norm / AdamW step
  and, when gradients travel in fp16 / bf16, DDP's ``fp16_compress_hook`` / ``bf16_compress_hook``
  (no non-finite agreement: DDP offers none; buffers are not broadcast when the model has no
  mutable ones).

Per variant: the median over repeats of the mean step time of a repeat's rounds (a round is one
step per image set; each step's time is the slowest rank's, timed from a barrier), the spread
(min–max) of those per-repeat means; **vs ddp**: per repeat, the variant's summed step time over
DDP's on the same batches, interleaved — a ratio of neighbouring measurements, which a
neighbour's load on a shared machine shifts far less than the times themselves — its median and
min–max over the repeats; the same ratio step by step (each step's time over DDP's on the same
batch in the same rotation: median and quartiles over all steps — one stalled step moves a
repeat's sum, not this); the CPU time per step (``time.process_time``: every thread of the
process, gloo's included; the mean over ranks) as the same paired ratio, the work a variant
costs whatever the machine's load; the bytes
all-reduced per step (GradSync: its own count — the agreement vector plus the buckets sent;
DDP: every trainable parameter in the communication dtype plus its int32 used-parameter map,
which DDP reduces every step with ``find_unused_parameters``), the time a step still waited
after its backward for the agreement (a slower rank's forward) and then for the gradient
all-reduces (GradSync variants), and the buckets sent from inside the backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

MODELS = {"tiny": "VTDNetConfig.tiny() (ResNet-18, the CPU test model)",
          "mid": "VTDNetConfig.tiny(backbone='resnet50') (the tiny decoders on a ResNet-50)",
          "r50": "VTDNetConfig.vtdnet('resnet50') (the paper's VTDNet-R50)"}
VARIANTS = ("overlap", "post", "ddp")


def _shards(work: Path) -> str:
    from data_pipeline.bdd100k.convert import ConvertOptions, convert
    from data_pipeline.bdd100k.synth import generate

    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        generate(str(work / "bdd100k"), seed=0, size="tiny", overwrite=True)
        convert(ConvertOptions(bdd_root=str(work / "bdd100k"), out=str(shards), shard_size=3, clip_len=4, workers=1,
                               progress=False, overwrite=True))
    return str(shards)


def _batches(shards: str, *, rank: int, world: int, batch: int, height: int, device: torch.device) -> list:
    from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset
    from data_pipeline.shards.manifest import families_from_manifest
    from data_pipeline.loading.config import AugmentConfig
    from data_pipeline.loading.transforms import prepare_batch

    out = []
    for fam in families_from_manifest(shards, "train"):
        cfg = LoaderConfig(batch_size=batch, num_workers=0, seed=0, augment=AugmentConfig(scales=(height,), flip_prob=0.5))
        b = next(iter(MultiSetDataset([fam], cfg, rank=rank, world_size=world)))
        out.append(prepare_batch(b.to(device)))
    return out


def _model_config(name: str):
    from vtd_train.model.vtdnet import VTDNetConfig

    return {"tiny": VTDNetConfig.tiny, "mid": lambda: VTDNetConfig.tiny(backbone="resnet50"),
            "r50": lambda: VTDNetConfig.vtdnet("resnet50")}[name]()


class _DDPStep:
    """DDP's step: the same autocast, loss sum, GradScaler, gradient norm and AdamW as
    TrainStep; no non-finite agreement."""

    def __init__(self, ddp, optimizer, precision):
        self.ddp, self.optimizer, self.precision = ddp, optimizer, precision

    def __call__(self, batch, *, step: int, lr: float):
        from vtd_train.model.losses import total_loss

        opt, scaler = self.optimizer, self.precision.scaler
        opt.zero_grad(set_to_none=True)
        with self.precision.autocast():
            losses = self.ddp(batch)
        total = total_loss({k: v.float() for k, v in losses.items()})
        scaler.scale(total).backward()  # DDP's bucket all-reduces run and are waited for in here
        if scaler.is_enabled():
            scaler.unscale_(opt)
        grads = [p.grad for p in self.ddp.parameters() if p.grad is not None]
        float(torch.nn.utils.get_total_norm(grads, foreach=True))  # TrainStep reports it every step
        scaler.step(opt)
        scaler.update()


def _bench_model(name: str, a, rank: int, world: int, device: torch.device, shards: str) -> list[dict] | None:
    from torch.nn.parallel import DistributedDataParallel

    from vtd_train.model.vtdnet import VTDNet
    from vtd_train.train.amp import Precision
    from vtd_train.train.grad_sync import GradSync, broadcast_state, comm_dtype_for, mutable_buffers
    from vtd_train.train.step import TrainStep

    batches = _batches(shards, rank=rank, world=world, batch=a.batch, height=a.height, device=device)
    comm_dtype = comm_dtype_for(a.comm_dtype, a.precision)

    def replica():
        torch.manual_seed(0)
        m = VTDNet(_model_config(name)).to(device).train()
        broadcast_state(m)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=device.type == "cuda")
        return m, params, opt

    # The two GradSync variants share a replica (a sync's hooks act only in a step it armed);
    # DDP gets its own (its reducer holds the parameters' gradient hooks as long as it lives).
    steps, syncs = {}, {}
    m, params, opt = replica()
    for variant, kw in (("overlap", {"bucket_mb": a.bucket_mb}), ("post", {"bucket_mb": 1e9, "overlap": False})):
        syncs[variant] = GradSync(params, buffers=mutable_buffers(m), comm_dtype=comm_dtype, **kw)
        steps[variant] = TrainStep(m, opt, Precision(a.precision, device), syncs[variant], rank=rank)
    n_params = sum(p.numel() for p in params)
    m, params, opt = replica()
    ddp = DistributedDataParallel(m, find_unused_parameters=True, bucket_cap_mb=a.bucket_mb,
                                  forward_sync_buffers=bool(mutable_buffers(m)))
    if comm_dtype is not None:  # the same bytes on the wire: DDP's compression hook for the dtype
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.fp16_compress_hook if comm_dtype == torch.float16 else default_hooks.bf16_compress_hook
        ddp.register_comm_hook(None, hook)
    steps["ddp"] = _DDPStep(ddp, opt, Precision(a.precision, device))
    wire = comm_dtype.itemsize if comm_dtype is not None else None
    ddp_bytes = sum(p.numel() * (wire or p.dtype.itemsize) for p in params) + 4 * len(params)

    def one(variant: str, k: int) -> tuple[float, float, float, float, int, int]:
        b = batches[k % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        out = steps[variant](b, step=k, lr=1e-5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        if variant == "ddp":
            return dt, dc, float("nan"), float("nan"), ddp_bytes, 0
        st = syncs[variant].stats
        return dt, dc, out.agree_s, out.allreduce_s, st.bytes, sum(x.phase != "finish" for x in st.launches)

    for variant in VARIANTS:  # warm-up: one round of the image sets each
        for k in range(len(batches)):
            one(variant, k)
    # Interleaved step by step (the variant order rotating), so that a neighbour's load on a
    # shared machine falls on all variants alike rather than on one variant's block of steps.
    rows = {v: {"per_repeat": [], "ratio": [], "step_ratio": [], "cpu_ratio": [], "cpu": [], "wait": [], "agree": [],
                "bytes": [], "in_bwd": []} for v in VARIANTS}
    for r in range(a.repeats):
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for k in range(a.rounds * len(batches)):  # det, seg, track, det, ...
            n = r * len(batches) + k
            for variant in VARIANTS[n % len(VARIANTS):] + VARIANTS[: n % len(VARIANTS)]:
                dt, dc, agree, wait, nbytes, in_bwd = one(variant, k)
                t = torch.tensor([dt, agree, wait], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
                c = torch.tensor([dc], dtype=torch.float64)
                dist.all_reduce(c)  # summed over ranks
                times[variant].append(float(t[0]))
                cpus[variant].append(float(c[0]) / world)
                rows[variant]["agree"].append(float(t[1]))
                rows[variant]["wait"].append(float(t[2]))
                rows[variant]["bytes"].append(nbytes)
                rows[variant]["in_bwd"].append(in_bwd)
        for v in VARIANTS:
            rows[v]["per_repeat"].append(statistics.mean(times[v]))
            rows[v]["ratio"].append(sum(times[v]) / sum(times["ddp"]))
            rows[v]["step_ratio"] += [t / d for t, d in zip(times[v], times["ddp"])]
            rows[v]["cpu_ratio"].append(sum(cpus[v]) / sum(cpus["ddp"]))
            rows[v]["cpu"].append(statistics.mean(cpus[v]))
    if rank != 0:
        return None
    out = []
    for v in VARIANTS:
        x = rows[v]
        out.append({"model": name, "variant": v, "median_s": statistics.median(x["per_repeat"]),
                    "repeat_min_s": min(x["per_repeat"]), "repeat_max_s": max(x["per_repeat"]),
                    "vs_ddp": statistics.median(x["ratio"]), "vs_ddp_min": min(x["ratio"]), "vs_ddp_max": max(x["ratio"]),
                    "step_ratio": statistics.quantiles(x["step_ratio"], n=4) if len(x["step_ratio"]) > 1 else [1.0] * 3,
                    "cpu_s": statistics.median(x["cpu"]), "cpu_vs_ddp": statistics.median(x["cpu_ratio"]),
                    "wait_s": statistics.median(x["wait"]) if v != "ddp" else None,
                    "agree_s": statistics.median(x["agree"]) if v != "ddp" else None,
                    "mb_per_step": statistics.mean(x["bytes"]) / 1e6, "in_backward": statistics.mean(x["in_bwd"]),
                    "params_m": n_params / 1e6, "n_buckets": len(syncs["overlap"].buckets)})
    return out


def _worker(rank: int, a) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    torch.set_num_threads(a.threads)
    if a.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(a.backend, rank=rank, world_size=a.world)
    try:
        if rank == 0:  # written once, read by every rank
            _shards(Path(a.workdir))
        dist.barrier()
        shards = _shards(Path(a.workdir))
        for name in a.models.split(","):
            rows = _bench_model(name, a, rank, a.world, device, shards)
            if rows is not None:
                _print(rows, a)
    finally:
        dist.destroy_process_group()


def _print(rows: list[dict], a) -> None:
    r0 = rows[0]
    print(f"\n## {r0['model']}: {MODELS[r0['model']]}, {r0['params_m']:.1f} M trainable parameters; {a.world} × {a.backend} "
          f"on {a.device}, {a.precision}, comm {a.comm_dtype}, batch {a.batch}/rank at height {a.height}, bucket {a.bucket_mb} MB "
          f"({r0['n_buckets']} buckets); {a.repeats} repeats × {a.rounds} round(s) of det/seg/track steps per variant, interleaved")
    print(f"{'variant':<9} {'median ms':>10} {'repeat means ms':>17} {'vs ddp (min–max)':>20} {'per step (IQR)':>19} "
          f"{'cpu ms':>8} {'cpu vs ddp':>11} "
          f"{'MB/step':>8} {'agree wait ms':>14} {'wait after bwd ms':>18} {'buckets sent in bwd':>20}")
    for r in rows:
        agree = "-" if r["agree_s"] is None else f"{r['agree_s'] * 1e3:.1f}"
        wait = "-" if r["wait_s"] is None else f"{r['wait_s'] * 1e3:.1f}"
        spread = f"{r['repeat_min_s'] * 1e3:.0f}–{r['repeat_max_s'] * 1e3:.0f}"
        ratio = f"{r['vs_ddp']:.3f} ({r['vs_ddp_min']:.2f}–{r['vs_ddp_max']:.2f})"
        q1, q2, q3 = r["step_ratio"]
        per_step = f"{q2:.3f} ({q1:.2f}–{q3:.2f})"
        in_bwd = "-" if r["variant"] == "ddp" else f"{r['in_backward']:.1f}"
        print(f"{r['variant']:<9} {r['median_s'] * 1e3:>10.1f} {spread:>17} {ratio:>20} {per_step:>19} {r['cpu_s'] * 1e3:>8.0f} "
              f"{r['cpu_vs_ddp']:>11.3f} {r['mb_per_step']:>8.1f} {agree:>14} {wait:>18} {in_bwd:>20}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2, help="processes (one GPU each with --device cuda)")
    ap.add_argument("--models", default="tiny,mid", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--comm-dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--batch", type=int, default=2, help="images per rank")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (one step per image set) per variant and repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--workdir", default="/tmp/vtd-grad-sync-bench")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    bad = [m for m in a.models.split(",") if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    if a.world < 2:
        ap.error("--world must be >= 2 (one process has nothing to synchronise)")
    if a.device == "cuda" and torch.cuda.device_count() < a.world:
        ap.error(f"--world {a.world} needs {a.world} GPUs, found {torch.cuda.device_count()} (NCCL: one GPU per rank)")
    if a.port == 0:
        from cluster.local import free_port

        a.port = free_port()
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(a,), nprocs=a.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
