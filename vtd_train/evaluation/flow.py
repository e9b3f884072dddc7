"""Optical-flow proxy IoU (``iou_flow``, paper appendix F.1).

BDD100K has no flow labels; the MOTS masks stand in. For consecutive tracking frames
``t − 1`` and ``t`` and a predicted flow ``V``, frame ``t``'s masks are warped back to frame
``t − 1`` by nearest sampling, ``M̂_{t−1}(p) = M_t(p + V(p))``, and compared with frame
``t − 1``'s masks.

Flow convention (what the model must produce): ``flow`` is ``[H, W, 2]`` on the pixel grid of
frame ``t − 1``; ``flow[y, x] = (dx, dy)`` says that the scene point at pixel ``(x, y)`` of
frame ``t − 1`` is at ``(x + dx, y + dy)`` in frame ``t`` — the forward flow ``t−1 → t``,
used to sample (backward-warp) frame ``t``. Pixel ``(x, y)`` is the centre of column ``x``,
row ``y``; the sample position is rounded to the nearest pixel (``np.rint``, half to even,
as ``torch.nn.functional.grid_sample(mode="nearest")``); a position outside the image
samples background.

Score: for each ground-truth instance with the same track id in both frames (ignore regions
excluded), the IoU of its warped mask with its mask in ``t − 1``; the metric is the mean over
all such instance pairs of the split, × 100. A pair whose two masks are both empty is skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.errors import VTDInputError

from .containers import InstanceFrame, MetricUndefinedError, require


def warp_nearest(masks: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``masks`` [N, H, W] of frame ``t`` to frame ``t − 1`` with ``flow`` [H, W, 2]."""
    n, h, w = masks.shape
    ys, xs = np.mgrid[0:h, 0:w]
    sx = np.rint(xs + flow[..., 0]).astype(np.int64)
    sy = np.rint(ys + flow[..., 1]).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.zeros_like(masks, dtype=bool)
    out[:, inside] = masks[:, sy[inside], sx[inside]]
    return out


def _track_index(frame: InstanceFrame, ids: np.ndarray, what: str) -> dict[int, int]:
    """Track id → instance index over the non-ignored instances of ``frame``."""
    out: dict[int, int] = {}
    for i, t in enumerate(ids.tolist()):
        if frame.ignore_mask[i]:
            continue
        if t in out:
            raise VTDInputError(f"{what}: ground-truth frame {frame.name!r}: track id {t} appears more than once")
        out[t] = i
    return out


class FlowProxyIoU:
    """Streaming ``iou_flow``: :meth:`update` per frame pair, :meth:`merge`, :meth:`compute`."""

    def __init__(self) -> None:
        self.iou_sum = 0.0
        self.count = 0

    def update(self, flow: Any, prev: InstanceFrame, cur: InstanceFrame) -> None:
        """Add one pair: predicted ``flow`` [H, W, 2] and the ground truth of frames ``t − 1``
        (``prev``) and ``t`` (``cur``), both with ``masks`` and ``track_ids``."""
        what = "flow proxy IoU"
        f = np.asarray(flow, dtype=np.float64) if np.asarray(flow).dtype.kind in "biuf" else None
        if f is None or f.ndim != 3 or f.shape[2] != 2:
            raise VTDInputError(f"{what}: frame {prev.name!r}: flow must be a numeric [H, W, 2] array, got shape {np.shape(flow)}")
        if not np.isfinite(f).all():
            raise VTDInputError(f"{what}: frame {prev.name!r}: flow contains NaN or inf")
        pm, cm = require(prev, "masks", what, side="ground-truth"), require(cur, "masks", what, side="ground-truth")
        pid, cid = require(prev, "track_ids", what, side="ground-truth"), require(cur, "track_ids", what, side="ground-truth")
        for fr, m in ((prev, pm), (cur, cm)):
            if len(fr) and m.shape[1:] != f.shape[:2]:
                raise VTDInputError(f"{what}: frame {fr.name!r}: masks are {list(m.shape[1:])} but the flow is {list(f.shape[:2])}")
        if prev.video and cur.video and (prev.video != cur.video or cur.frame_index <= prev.frame_index):
            raise VTDInputError(
                f"{what}: frames {prev.name!r} and {cur.name!r} are not an ordered pair of one video "
                f"({prev.video}#{prev.frame_index} → {cur.video}#{cur.frame_index})"
            )
        prev_index, cur_index = _track_index(prev, pid, what), _track_index(cur, cid, what)
        shared = sorted(prev_index.keys() & cur_index.keys())
        if not shared:
            return
        warped = warp_nearest(cm[[cur_index[t] for t in shared]], f)
        target = pm[[prev_index[t] for t in shared]]
        inter = (warped & target).sum(axis=(1, 2))
        union = (warped | target).sum(axis=(1, 2))
        scored = union > 0
        self.iou_sum += float((inter[scored] / union[scored]).sum())
        self.count += int(scored.sum())

    def merge(self, other: FlowProxyIoU) -> None:
        self.iou_sum += other.iou_sum
        self.count += other.count

    def compute(self) -> float:
        if self.count == 0:
            raise MetricUndefinedError("flow proxy IoU: no instance appears in two consecutive frames")
        return self.iou_sum / self.count * 100.0
