"""Qualitative overlays of ``vtd evaluate``: every task's prediction on a few frames."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Final

import numpy as np
from PIL import Image

from data_pipeline.bdd100k.format import SCENES, WEATHERS
from data_pipeline.loading.decode import DecodedFrame
from vtd_train.model.outputs import FramePrediction
from vtd_train.tracker import TrackResult

from .inference import metric_flow
from .report import OverlayFrame

__all__ = ["OVERLAY_MIN_SIDE", "OVERLAY_SCORE", "make_overlay", "pick_overlays"]

#: Detections (and poses) below this score are left out of the overlays (metrics use them all).
OVERLAY_SCORE: Final = 0.3
#: Overlays of frames whose shorter side is below this are enlarged (an integer factor), so
#: that labels and skeletons stay readable on the mini dataset's 96×160 frames.
OVERLAY_MIN_SIDE: Final = 360


def _np(x: Any) -> np.ndarray | None:
    return None if x is None else x.detach().cpu().numpy()


def make_overlay(set_name: str, frame: DecodedFrame, pred: FramePrediction, tracked: TrackResult | None = None,
                 *, show_flow: bool = True, threshold: float = OVERLAY_SCORE) -> OverlayFrame:
    """All of a frame's predictions as an :class:`OverlayFrame`: drivable, lanes and the
    semantic and flow panels as predicted (flow only with ``show_flow``: a frame whose flow was
    computed against a real next frame); objects from the tracker (coloured by track id) on
    tracking frames, otherwise the detections scoring at least ``threshold``; poses likewise."""
    name = frame.record["name"]
    h, w = int(frame.image.shape[1]), int(frame.image.shape[2])
    k = max(1, -(-OVERLAY_MIN_SIDE // min(h, w)))  # small frames are shown enlarged, k× per side

    def grid(a: np.ndarray | None, axes: tuple[int, int]) -> np.ndarray | None:  # nearest-neighbour k×
        return None if a is None or k == 1 else np.repeat(np.repeat(a, k, axis=axes[0]), k, axis=axes[1])

    kw: dict[str, Any] = {t: _np(getattr(pred, t)) for t in ("drivable", "lane", "sem")}
    notes = []
    if tracked is not None:
        kw |= dict(boxes=_np(tracked.boxes), classes=_np(tracked.classes), scores=_np(tracked.scores),
                   track_ids=_np(tracked.track_ids), masks=_np(tracked.masks))
        notes.append(f"frame {frame.record['frame_index']} of video {frame.record['video']}, tracker output")
    elif pred.boxes is not None:
        keep = pred.scores >= threshold
        kw |= dict(boxes=_np(pred.boxes[keep]), classes=_np(pred.classes[keep]), scores=_np(pred.scores[keep]),
                   masks=None if pred.masks is None else _np(pred.masks[keep]))
        notes.append(f"detections scoring >= {threshold}")
    if pred.keypoints is not None and pred.keypoint_scores is not None:
        kw["keypoints"] = _np(pred.keypoints[pred.keypoint_scores >= threshold])
    if show_flow and pred.flow is not None:
        kw["flow"] = metric_flow(pred, name)
        notes.append("flow to the next frame")
    image = frame.image.permute(1, 2, 0).cpu().numpy()
    if k > 1:
        image = np.asarray(Image.fromarray(image).resize((w * k, h * k), Image.Resampling.BILINEAR))
        for t in ("drivable", "lane", "sem", "masks"):
            kw[t] = grid(kw.get(t), (-2, -1))
        if kw.get("boxes") is not None:
            kw["boxes"] = kw["boxes"] * k
        if kw.get("keypoints") is not None:
            kw["keypoints"] = kw["keypoints"] * np.array([k, k, 1], np.float32)
        if kw.get("flow") is not None:
            kw["flow"] = grid(kw["flow"], (0, 1)) * k  # displacements in display pixels
        notes.append(f"{w}x{h} shown at {k}x")
    caption = f"{set_name} set: {name}" + (f" ({'; '.join(notes)})" if notes else "")
    tags = {}
    if pred.weather is not None:
        tags["weather"] = (WEATHERS[int(pred.weather.argmax())], float(pred.weather.max()))
    if pred.scene is not None:
        tags["scene"] = (SCENES[int(pred.scene.argmax())], float(pred.scene.max()))
    return OverlayFrame(name=caption, image=image, tags=tags or None, **kw)


def prefer_flow(frames: list[OverlayFrame]) -> list[OverlayFrame]:
    """``frames`` with those that show flow first, each group in its order."""
    return [f for f in frames if f.flow is not None] + [f for f in frames if f.flow is None]


def pick_overlays(results: list[tuple[Any, list[OverlayFrame]]], n: int) -> list[OverlayFrame]:
    """``n`` of the units' overlays (``(unit, its overlays)``): round-robin over the sets (track,
    det, seg), each set's frames in unit order."""
    per_set: dict[str, list[OverlayFrame]] = defaultdict(list)
    for u, frames in sorted(results, key=lambda ur: ur[0].key):
        per_set[u.set_name] += frames
    queues = [per_set[s] for s in ("track", "det", "seg") if per_set[s]]
    out: list[OverlayFrame] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out

