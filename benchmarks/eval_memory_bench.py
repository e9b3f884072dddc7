"""Peak memory of the evaluation's driver as the validation set grows (issue 21, item 2).

Usage::

    uv run python benchmarks/eval_memory_bench.py [--frames 200,1000,5000] [--height 720 --width 1280]
        [--unit-frames 50] [--instances 6]

What runs: the evaluation's scoring and merging, as ``vtd evaluate`` does them, on synthetic
validation sets of ``--frames`` frames at BDD100K's resolution (half from the det set, a quarter
from the seg set, a quarter tracking frames in videos of 10, every other video a MOTS video):
a worker process (``ProcessPoolExecutor``, one process; the results come back pickled, as from a
Ray actor) scores each unit of ``--unit-frames`` frames (a tracking unit: whole videos) with
:class:`vtd_train.evaluation.inference.EvalState` — the calls ``EvalWorker.run`` makes per
frame (``add_frame``, ``add_tracked``, ``add_flow_pair``, ``end_video``) — and the driver merges
each unit's state as it comes in, then computes all 13 metrics, as ``run_evaluation`` does. What
the worker scores is made in memory rather than read from shards and predicted by a model
(those steps happen on the workers, one frame at a time, and never reach the driver): ground
truth of ``--instances`` objects per frame (boxes, instance masks, poses, tracks), sem /
drivable / lane maps, and a prediction that is the ground truth shifted by a few pixels.

Each size runs in a fresh driver process, since the peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) is a high-water mark; ``base`` is the driver's RSS
after its imports, before the first unit. Printed per size: frames, peak driver RSS, its growth
over the smallest size, the driver's held state (peak − base), wall time per frame (the worker's
scoring dominates), and two metrics as a check that everything was scored. Run it from another
checkout to measure that code (``cd OTHER && python /path/to/eval_memory_bench.py``: the
``vtd_train`` imported is the one on the path); the harness needs only ``EvalState``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

#: Objects of the tracking videos keep their identity over this many frames.
VIDEO_FRAMES = 10


@dataclass(frozen=True)
class UnitSpec:
    set_name: str
    first: int  # first frame (det / seg) or first video (track)
    count: int  # frames (det / seg) or videos (track)
    height: int
    width: int
    instances: int


def plan(frames: int, unit_frames: int, height: int, width: int, instances: int) -> list[UnitSpec]:
    n_det, n_seg = frames // 2, frames // 4
    n_videos = max(1, (frames - n_det - n_seg) // VIDEO_FRAMES)
    units = [UnitSpec("det", i, min(unit_frames, n_det - i), height, width, instances) for i in range(0, n_det, unit_frames)]
    units += [UnitSpec("seg", i, min(unit_frames, n_seg - i), height, width, instances) for i in range(0, n_seg, unit_frames)]
    per_unit = max(1, unit_frames // VIDEO_FRAMES)
    units += [UnitSpec("track", v, min(per_unit, n_videos - v), height, width, instances) for v in range(0, n_videos, per_unit)]
    return units


# ---------------------------------------------------------------------------------------------
# The worker: synthetic frames → EvalState (the evaluation's per-frame calls)
# ---------------------------------------------------------------------------------------------


def _objects(rng: np.random.Generator, n: int, h: int, w: int, shift: int = 0):
    """``n`` rectangles: boxes [n, 4] (x1 y1 x2 y2) and an instance map (value i + 1)."""
    import torch

    sizes = rng.integers(h // 12, h // 4, (n, 2))
    x0 = rng.integers(0, w - sizes[:, 0]) + shift
    y0 = rng.integers(0, h - sizes[:, 1])
    boxes = np.stack([x0, y0, np.minimum(x0 + sizes[:, 0], w), y0 + sizes[:, 1]], 1).astype(np.float32)
    inst = np.zeros((h, w), np.int32)
    for i, (a, b, c, d) in enumerate(boxes.astype(int)):
        inst[b:d, a:c] = i + 1
    return torch.from_numpy(boxes), torch.from_numpy(inst)


def _frame(spec: UnitSpec, key: int, *, video_seed: int | None = None, t: int = 0):
    """(targets, prediction, sources) of one synthetic frame."""
    import torch

    from data_pipeline.bdd100k.format import SCENES, WEATHERS, decode_lane_mask
    from data_pipeline.loading.structures import FrameTargets, LabelSource
    from vtd_train.model.outputs import FramePrediction

    h, w, n = spec.height, spec.width, spec.instances
    rng = np.random.default_rng(key if video_seed is None else video_seed)
    boxes, inst = _objects(rng, n, h, w)
    if video_seed is not None:  # objects move 4 px a frame
        boxes = boxes + torch.tensor([4.0 * t, 0, 4.0 * t, 0])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        inst = torch.roll(inst, 4 * t, dims=1)
    classes = torch.from_numpy(rng.integers(0, 8, n))
    t_kw = dict(boxes=boxes, classes=classes, ignore=torch.zeros(n, dtype=torch.bool))
    p = FramePrediction(size=(h, w))
    jitter = torch.from_numpy(np.random.default_rng(key + 1).uniform(-3, 3, (n, 4))).float()
    pboxes = (boxes + jitter).clamp(min=0)
    pboxes[:, 2:] = torch.maximum(pboxes[:, 2:], pboxes[:, :2] + 1)
    scores = torch.linspace(0.99, 0.71, n)
    if spec.set_name == "det":
        yy = torch.arange(h)[:, None].expand(h, w)
        drivable = torch.where(yy > h // 2, 0, 2).to(torch.uint8)
        drivable[h * 3 // 4 :, : w // 3] = 1
        lane = torch.full((h, w), 255, dtype=torch.uint8)
        for k, x in enumerate((w // 4, w // 2, 3 * w // 4)):
            lane[h // 2 :, x : x + 6] = k + (k % 2 << 4)
        kp = torch.zeros(2, 18, 3)
        kp[..., 0] = torch.from_numpy(rng.uniform(100, w - 100, (2, 1))).float() + torch.arange(18) * 3
        kp[..., 1] = torch.from_numpy(rng.uniform(100, h - 100, (2, 1))).float() + torch.arange(18) * 5
        kp[..., 2] = 2
        pose_boxes = torch.stack([kp[..., 0].min(1).values, kp[..., 1].min(1).values,
                                  kp[..., 0].max(1).values, kp[..., 1].max(1).values], 1)
        t_ = FrameTargets(weather=int(rng.integers(0, 7)), scene=int(rng.integers(0, 7)), drivable=drivable, lane=lane,
                          keypoints=kp, pose_boxes=pose_boxes, **t_kw)
        p.weather = torch.nn.functional.one_hot(torch.tensor(t_.weather), len(WEATHERS)).float()
        p.scene = torch.nn.functional.one_hot(torch.tensor((t_.scene + key % 2) % 7), len(SCENES)).float()
        p.drivable = torch.roll(drivable, 3, dims=0)
        p.lane = decode_lane_mask(torch.roll(lane, 2, dims=1))
        p.boxes, p.classes, p.scores = pboxes, classes, scores
        p.keypoints = kp.clone()
        p.keypoints[..., :2] += 2
        p.keypoint_scores, p.keypoint_index = torch.ones(2), torch.zeros(2, dtype=torch.int64)
        sources = {s: LabelSource.REAL for s in ("tag", "drivable", "lane", "det", "pose")}
    elif spec.set_name == "seg":
        sem = (torch.arange(w)[None, :].expand(h, w) // 80 % 19).to(torch.uint8)
        t_ = FrameTargets(sem=sem, instance_map=inst, mask_valid=torch.ones(n, dtype=torch.bool), **t_kw)
        p.sem = torch.roll(sem, 5, dims=1)
        p.boxes, p.classes, p.scores = pboxes, classes, scores
        p.masks = torch.roll(t_.instance_masks(), 3, dims=2)
        sources = {"sem": LabelSource.REAL, "ins": LabelSource.REAL}
    else:
        mots = video_seed % 2 == 1
        t_ = FrameTargets(track_ids=torch.arange(n), instance_map=inst if mots else None,
                          mask_valid=torch.ones(n, dtype=torch.bool) if mots else None, **t_kw)
        sources = {"mot": LabelSource.REAL, "flow": LabelSource.REAL} | ({"mots": LabelSource.REAL} if mots else {})
        p.boxes, p.classes, p.scores = pboxes, classes, scores
        if mots:
            p.masks = torch.roll(t_.instance_masks(), 3, dims=2)
            p.flow = torch.zeros(2, h, w)
            p.flow[0] = 4.0
    return t_, p, sources


def score_unit(spec: UnitSpec):
    """The worker: one unit's EvalState (``EvalWorker.run``'s per-frame calls)."""
    import torch

    from data_pipeline.bdd100k.format import TASKS
    from vtd_train.evaluation.inference import EvalState, labelled
    from vtd_train.tracker import TrackResult

    torch.set_num_threads(1)
    state = EvalState()
    if spec.set_name != "track":
        for i in range(spec.first, spec.first + spec.count):
            t, p, sources = _frame(spec, i * 7919 + (spec.set_name == "seg"))
            state.add_frame(f"{spec.set_name}-{i:06d}.jpg", t, sources, p, TASKS)
        return state
    for v in range(spec.first, spec.first + spec.count):
        prev = None
        for k in range(VIDEO_FRAMES):
            t, p, sources = _frame(spec, v * 104729 + k, video_seed=v, t=k)
            name = f"video-{v:05d}-{k:07d}.jpg"
            state.add_frame(name, t, sources, p, TASKS)
            result = TrackResult(boxes=p.boxes, scores=p.scores, classes=p.classes, track_ids=torch.arange(len(p.boxes)) + 100,
                                 masks=p.masks, indices=torch.arange(len(p.boxes)))
            gt = state.add_tracked(name, t, sources, result, TASKS, video=f"video-{v:05d}", frame_index=k)
            if prev is not None:
                state.add_flow_pair(prev[0], prev[1], gt, TASKS)
            prev = (p, gt) if labelled(sources, "mots") and k + 1 < VIDEO_FRAMES else None
        if hasattr(state, "end_video"):  # the streaming EvalState scores a video at its end
            state.end_video()
    return state


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(frames: int, args: argparse.Namespace) -> dict:
    import multiprocessing

    from data_pipeline.bdd100k.format import TASKS
    from vtd_train.evaluation.inference import EvalState

    units = plan(frames, args.unit_frames, args.height, args.width, args.instances)
    base = rss_mb()
    t0 = time.perf_counter()
    state = EvalState()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
        for r in pool.map(score_unit, units):  # in unit order, as they come in
            state.merge(r)
            del r
    metrics, missing = state.compute(TASKS)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"frames": state.frames, "units": len(units), "base_mb": round(base, 1), "peak_mb": round(peak, 1),
            "wall_s": round(wall, 1), "ms_per_frame": round(1000 * wall / max(state.frames, 1), 1),
            "metrics": {k: round(v, 2) for k, v in metrics.items()}, "missing": sorted(missing)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="200,1000,5000", help="validation set sizes, comma-separated")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--unit-frames", type=int, default=50, help="frames per work unit (a det / seg shard)")
    ap.add_argument("--instances", type=int, default=6, help="objects per frame")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return 0
    rows = []
    for n in (int(x) for x in args.frames.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--height", str(args.height), "--width",
               str(args.width), "--unit-frames", str(args.unit_frames), "--instances", str(args.instances)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{row['frames']:6d} frames  {row['units']:4d} units  peak driver RSS {row['peak_mb']:8.1f} MB "
              f"(+{100 * (row['peak_mb'] / rows[0]['peak_mb'] - 1):5.1f}% vs {rows[0]['frames']})  "
              f"held {row['peak_mb'] - row['base_mb']:7.1f} MB  {row['ms_per_frame']:6.1f} ms/frame  "
              f"ap_ins {row['metrics'].get('ap_ins')}  assa_mots {row['metrics'].get('assa_mots')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
