"""Where a model's ``iou_flow`` stands against the flow proxy's floor and what the data allow.

Usage::

    uv run python benchmarks/flow_proxy_probe.py SHARDS [--split val,train] [NAME=CHECKPOINT ...]
        [--height H]

On the consecutive MOTS frame pairs of each split of the shard root ``SHARDS`` (the pairs
``vtd evaluate`` scores, :class:`vtd_train.evaluation.flow.FlowProxyIoU` doing the scoring),
prints the proxy of:

* ``zero``: a zero flow, the floor a flow decoder must beat;
* ``instance oracle``: each instance's pixels in frame t−1 carry the integer translation (within
  ±16 px) that maximises its warped mask's IoU, the background zero — what a flow that gets every
  object's translation right scores (objects that turn, grow or leave the frame cap it);
* ``census global shift``: one translation per pair, the one with the lowest production census
  loss (:class:`vtd_train.model.flow.FlowLoss`, ±8 px in x, ±3 in y) — what a decoder that
  only learnt the camera's heading sway would score, and a check that the census sees the motion;
* each ``NAME=CHECKPOINT``: the checkpoint's flow, predicted as ``vtd evaluate`` predicts it
  (:meth:`EvalWorker.predict_frames`, at ``--height``, default the checkpoint's training scale),
  with the paired difference to the zero flow over the same instances (± its standard error)
  and the mean flow magnitude.

Each line: the mean over instance pairs ± its standard error, the number of instance pairs, and
the mean per video. One torch thread.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_pipeline.loading.loader import iter_frames  # noqa: E402
from data_pipeline.shards.manifest import families_from_manifest  # noqa: E402
from vtd_train.evaluation.containers import InstanceFrame  # noqa: E402
from vtd_train.evaluation.flow import FlowProxyIoU, warp_nearest  # noqa: E402
from vtd_train.evaluation.inference import gt_instances, labelled  # noqa: E402
from vtd_train.evaluation.worker import EvalWorker  # noqa: E402
from vtd_train.model.backbone import ImageNormalizer  # noqa: E402
from vtd_train.model.flow import FlowLoss, FlowLossConfig  # noqa: E402

Pair = tuple  # (video, frame t−1, frame t, ground truth t−1, ground truth t)


def mots_pairs(shards: str, split: str) -> list[Pair]:
    """Consecutive frames of one video that both carry MOTS masks, videos sorted."""
    videos = defaultdict(list)
    for family in families_from_manifest(shards, split, ("track",)):
        for f in iter_frames(family.urls):
            videos[f.record["video"]].append(f)
    pairs = []
    for video, frames in sorted(videos.items()):
        frames.sort(key=lambda f: f.record["frame_index"])
        for a, b in zip(frames, frames[1:]):
            if labelled(a.sources, "mots") and labelled(b.sources, "mots"):
                ga, gb = (gt_instances(f.record["name"], f.targets, masks=True, video=video,
                                       frame_index=f.record["frame_index"]) for f in (a, b))
                pairs.append((video, a, b, ga, gb))
    return pairs


def shared(prev: InstanceFrame, cur: InstanceFrame) -> list[tuple[int, int]]:
    """``(index in prev, index in cur)`` of the non-ignored instances of one track in both frames."""
    p = {int(t): i for i, t in enumerate(prev.track_ids) if not prev.ignore_mask[i]}
    c = {int(t): i for i, t in enumerate(cur.track_ids) if not cur.ignore_mask[i]}
    return [(p[t], c[t]) for t in sorted(p.keys() & c.keys())]


def per_instance(flow: np.ndarray, prev: InstanceFrame, cur: InstanceFrame) -> list[float]:
    """The IoUs :class:`FlowProxyIoU` averages for one pair (checked against it)."""
    out = []
    for i, j in shared(prev, cur):
        warped, target = warp_nearest(cur.masks[[j]], flow)[0], prev.masks[i]
        union = (warped | target).sum()
        if union:
            out.append(float((warped & target).sum() / union))
    metric = FlowProxyIoU()
    metric.update(flow, prev, cur)
    assert metric.count == len(out) and abs(metric.iou_sum - sum(out)) < 1e-6
    return out


def constant(shape: tuple[int, int], dx: float, dy: float) -> np.ndarray:
    f = np.zeros((*shape, 2))
    f[..., 0], f[..., 1] = dx, dy
    return f


def instance_oracle(prev: InstanceFrame, cur: InstanceFrame, radius: int = 16) -> np.ndarray:
    h, w = prev.masks.shape[1:]
    flow = np.zeros((h, w, 2))
    for i, j in shared(prev, cur):
        best = (-1.0, 0, 0)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                warped = warp_nearest(cur.masks[[j]], constant((h, w), dx, dy))[0]
                union = (warped | prev.masks[i]).sum()
                iou = (warped & prev.masks[i]).sum() / union if union else 0.0
                if iou > best[0] + 1e-9:
                    best = (iou, dx, dy)
        flow[prev.masks[i]] = best[1:]
    return flow


def census_global_shift(loss: FlowLoss, norm: ImageNormalizer, a, b) -> np.ndarray:
    key, ref = norm(a.image[None]), norm(b.image[None])
    h, w = key.shape[-2:]
    best = None
    for dy in range(-3, 4):
        for dx in range(-8, 9):
            full = torch.zeros(1, 2, h, w)
            full[:, 0], full[:, 1] = dx, dy
            levels = [F.interpolate(full, size=(h // s, w // s), mode="area") for s in (4, 8, 16, 32)]
            c = float(loss(levels, key, ref, backward_flows=[-f for f in levels])["census"])
            if best is None or c < best[0]:
                best = (c, dx, dy)
    return constant((h, w), *best[1:])


def report(name: str, pairs: list[Pair], flows: list[np.ndarray], zero: np.ndarray | None = None) -> np.ndarray:
    values, by_video = [], defaultdict(list)
    for (video, _, _, prev, cur), flow in zip(pairs, flows):
        ious = per_instance(flow, prev, cur)
        values += ious
        by_video[video] += ious
    v = np.array(values) * 100
    videos = "  ".join(f"{k[-6:]} {np.mean(x) * 100:.1f}" for k, x in sorted(by_video.items()))
    line = f"  {name:>20}: {v.mean():5.1f} ± {v.std(ddof=1) / np.sqrt(len(v)):.1f} (n={len(v)})   per video: {videos}"
    if zero is not None:
        d = v - zero
        mag = np.mean([np.hypot(f[..., 0], f[..., 1]).mean() for f in flows])
        line += f"   vs zero {d.mean():+.1f} ± {d.std(ddof=1) / np.sqrt(len(d)):.1f}, mean |flow| {mag:.2f} px"
    print(line, flush=True)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards")
    ap.add_argument("checkpoints", nargs="*", metavar="NAME=CHECKPOINT")
    ap.add_argument("--split", default="val,train")
    ap.add_argument("--height", type=int, default=None)
    args = ap.parse_intermixed_args()  # options anywhere, also between SHARDS and the checkpoints
    torch.set_num_threads(1)
    workers = {}
    for item in args.checkpoints:
        name, _, uri = item.partition("=")
        workers[name] = EvalWorker(uri, threads=1, cuda=False, height=args.height)
    loss, norm = FlowLoss(FlowLossConfig()), ImageNormalizer()
    for split in args.split.split(","):
        pairs = mots_pairs(args.shards, split)
        print(f"{split}: {len(pairs)} consecutive MOTS frame pairs in {len({p[0] for p in pairs})} videos", flush=True)
        shape = tuple(pairs[0][1].image.shape[1:])
        zero = report("zero", pairs, [np.zeros((*shape, 2)) for _ in pairs])
        report("instance oracle", pairs, [instance_oracle(p[3], p[4]) for p in pairs])
        with torch.no_grad():
            report("census global shift", pairs, [census_global_shift(loss, norm, p[1], p[2]) for p in pairs])
            for name, worker in workers.items():
                flows = [worker.predict_frames("track", [a], [b])[0].flow.permute(1, 2, 0).double().numpy()
                         for _, a, b, _, _ in pairs]
                report(name, pairs, flows, zero)


if __name__ == "__main__":
    main()
