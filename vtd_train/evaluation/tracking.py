"""MOT / MOTS: AP on the tracking frames (localization) and AssA from HOTA (association).

AP is :func:`coco.box_ap` (MOT) / :func:`coco.mask_ap` (MOTS) over all tracking frames.
AssA comes from ``trackeval.metrics.HOTA``, fed one sequence at a time per class with the
data dict ``HOTA.eval_sequence`` expects (``gt_ids``, ``tracker_ids``, ``similarity_scores``
per timestep, ``num_gt_dets``, ``num_tracker_dets``, ``num_gt_ids``, ``num_tracker_ids``; ids
relabelled to ``0..n-1``), combined over sequences with ``HOTA.combine_sequences`` and over
classes with ``HOTA.combine_classes_class_averaged``; AssA is the mean over HOTA's 19 α
thresholds, × 100.

Protocol (trackeval's BDD100K dataset, ``datasets/bdd100k.py``, reproduced on arrays):

* the 8 thing classes are evaluated separately; a class without ground truth in the data is
  skipped (its AssA is undefined), the others are averaged with equal weight;
* similarity: box IoU for MOT, mask IoU for MOTS (pycocotools ``mask.iou``);
* ignore regions: ground truth with ``ignore`` set (crowd, ignored, mapped categories), of any
  class, is not evaluated. Per frame and class, predictions are matched to the non-ignored
  ground truth of that class (Hungarian on similarity ≥ 0.5); an *unmatched* prediction
  covering an ignore region by more than 50% of its own area (box / mask IoA) is removed;
* a video is a sequence of ground-truth frames with the same ``video``, ordered by
  ``frame_index``; all predicted instances count (no score threshold: that is the tracker's
  job).

Streaming (:class:`TrackingScore`, what the evaluation's workers use): a worker tracks a whole
video, so it reduces each frame to its similarity matrix and ids as the frame comes (masks
RLE-encoded for the IoUs, then dropped) and, at the video's end, each class's sequence to
``HOTA.eval_sequence``'s result (a few arrays over the 19 α); AP goes through
:class:`coco.CocoAP`. The driver merges those per-sequence results and combines them: memory
grows with the number of videos, not with frames or pixels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from trackeval.metrics import HOTA

from data_pipeline.bdd100k.format import THING_CATEGORIES
from data_pipeline.errors import VTDInputError

from .coco import CocoAP, IouType, encode_masks, xyxy_to_xywh
from .containers import InstanceFrame, MetricUndefinedError, pair_frames, require

#: Prediction ↔ ground-truth similarity needed for a match before ignore-region filtering.
MATCH_THRESHOLD = 0.5
#: Fraction of an unmatched prediction inside an ignore region above which it is removed.
IGNORE_IOA = 0.5
_EPS = np.finfo("float").eps


def _overlaps(a: list[Any] | np.ndarray, b: list[Any] | np.ndarray, *, ioa: bool) -> np.ndarray:
    """``[len(a), len(b)]`` IoU (or, with ``ioa``, intersection over the area of ``a``).

    ``a``/``b`` are both ``[N, 4]`` xywh box arrays or both lists of RLEs (pycocotools).
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(a, b, [int(ioa)] * len(b)), dtype=np.float64).reshape(len(a), len(b))


@dataclass
class _Frame:
    """One timestep, precomputed for all classes."""

    gt_ids: np.ndarray  # [G] track ids of the evaluated (non-ignored) ground truth
    gt_classes: np.ndarray  # [G]
    tr_ids: np.ndarray  # [D]
    tr_classes: np.ndarray  # [D]
    similarity: np.ndarray  # [G, D]
    in_ignore: np.ndarray  # [D] bool: prediction > IGNORE_IOA inside some ignore region


def _prepare_frame(p: InstanceFrame, g: InstanceFrame, iou_type: IouType, what: str) -> _Frame:
    tr_ids = require(p, "track_ids", what, side="prediction")
    keep = ~g.ignore_mask
    # ignored ground truth needs no track id
    gt_ids = require(g, "track_ids", what, side="ground-truth")[keep] if keep.any() else np.zeros(0, np.int64)
    for side, ids, cls in (("ground-truth", gt_ids, g.classes[keep]), ("prediction", tr_ids, p.classes)):
        if len(np.unique(ids)) != len(ids):
            dup = [int(i) for i in np.unique(ids) if (ids == i).sum() > 1]
            raise VTDInputError(f"{what}: {side} frame {g.name!r}: track id(s) {dup} appear more than once")
    if iou_type == "segm":
        gm, pm = require(g, "masks", what, side="ground-truth"), require(p, "masks", what, side="prediction")
        if len(p) and len(g) and pm.shape[1:] != gm.shape[1:]:
            raise VTDInputError(f"{what}: frame {g.name!r}: predicted masks are {list(pm.shape[1:])}, ground truth {list(gm.shape[1:])}")
        g_geo, p_geo = encode_masks(gm), encode_masks(pm)
        gt_keep = [r for r, k in zip(g_geo, keep) if k]
        gt_ign = [r for r, k in zip(g_geo, keep) if not k]
    else:
        g_xywh, p_geo = xyxy_to_xywh(g.boxes), xyxy_to_xywh(p.boxes)
        gt_keep, gt_ign = g_xywh[keep], g_xywh[~keep]
    similarity = _overlaps(p_geo, gt_keep, ioa=False).T
    in_ignore = (_overlaps(p_geo, gt_ign, ioa=True) > IGNORE_IOA + _EPS).any(axis=1)
    return _Frame(gt_ids, g.classes[keep], tr_ids, p.classes, similarity, in_ignore)


def _sequence_data(frames: list[_Frame], cls: int) -> dict[str, Any]:
    """The ``HOTA.eval_sequence`` input of one class in one video (trackeval's BDD100K preproc)."""
    gt_ids, tr_ids, sims = [], [], []
    for f in frames:
        gm, tm = f.gt_classes == cls, f.tr_classes == cls
        sim = f.similarity[gm][:, tm]
        unmatched = np.arange(int(tm.sum()))
        if sim.size:
            scores = np.where(sim < MATCH_THRESHOLD - _EPS, 0.0, sim)
            rows, cols = linear_sum_assignment(-scores)
            unmatched = np.delete(unmatched, cols[scores[rows, cols] > _EPS])
        remove = unmatched[f.in_ignore[tm][unmatched]]
        gt_ids.append(f.gt_ids[gm])
        tr_ids.append(np.delete(f.tr_ids[tm], remove))
        sims.append(np.delete(sim, remove, axis=1))
    data: dict[str, Any] = {"num_timesteps": len(frames), "similarity_scores": sims}
    for key, ids in (("gt", gt_ids), ("tracker", tr_ids)):
        unique = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
        data[f"{key}_ids"] = [np.searchsorted(unique, i).astype(int) for i in ids]  # relabel to 0..n-1
        data[f"num_{key}_ids"] = len(unique)
        data[f"num_{key}_dets"] = int(sum(len(i) for i in ids))
    return data


def _videos(pairs: list[tuple[InstanceFrame, InstanceFrame]], what: str) -> dict[str, list[tuple[InstanceFrame, InstanceFrame]]]:
    videos: dict[str, list[tuple[InstanceFrame, InstanceFrame]]] = defaultdict(list)
    for p, g in pairs:
        if not g.video:
            raise VTDInputError(f"{what}: ground-truth frame {g.name!r} has no video name (tracking frames need video and frame_index)")
        videos[g.video].append((p, g))
    for video, frames in videos.items():
        frames.sort(key=lambda pg: pg[1].frame_index)
        idx = [g.frame_index for _, g in frames]
        if len(set(idx)) != len(idx):
            raise VTDInputError(f"{what}: video {video!r}: frame_index values repeat")
    return videos


class AssA:
    """Streaming class-averaged HOTA AssA: :meth:`add_frame` frame by frame (one video at a
    time, in frame order), :meth:`end_video`, :meth:`merge`, :meth:`compute`."""

    def __init__(self, iou_type: IouType = "bbox", *, what: str = "AssA") -> None:
        self.iou_type, self.what = iou_type, what
        self.sequences: dict[str, dict[str, dict[str, Any]]] = {}  # video → class → eval_sequence result
        self.gt_dets: dict[str, int] = dict.fromkeys(THING_CATEGORIES, 0)
        self._video: str | None = None
        self._frames: list[_Frame] = []
        self._last_index = -1

    def add_frame(self, p: InstanceFrame, g: InstanceFrame) -> None:
        if p.name != g.name:
            raise VTDInputError(f"{self.what}: prediction for frame {p.name!r} given with ground truth of {g.name!r}")
        if not g.video:
            raise VTDInputError(f"{self.what}: ground-truth frame {g.name!r} has no video name (tracking frames need video and frame_index)")
        if g.video != self._video:
            if self._frames:
                raise VTDInputError(f"{self.what}: frame {g.name!r} of video {g.video!r} before video {self._video!r} ended")
            if g.video in self.sequences:
                raise VTDInputError(f"{self.what}: video {g.video!r} given twice")
            self._video, self._last_index = g.video, -1
        if g.frame_index <= self._last_index:
            raise VTDInputError(f"{self.what}: video {g.video!r}: frame_index values repeat or go back ({g.frame_index} after {self._last_index})")
        self._last_index = g.frame_index
        self._frames.append(_prepare_frame(p, g, self.iou_type, self.what))

    def end_video(self) -> None:
        """Score the video given since the last call (nothing if none)."""
        if self._video is None:
            return
        hota = HOTA()
        per_class = {}
        for cls, name in enumerate(THING_CATEGORIES):
            data = _sequence_data(self._frames, cls)
            self.gt_dets[name] += data["num_gt_dets"]
            per_class[name] = hota.eval_sequence(data)
        self.sequences[self._video] = per_class
        self._video, self._frames = None, []

    def merge(self, other: AssA) -> None:
        if other._frames or self._frames:
            raise ValueError("merge AssA accumulators only between videos")
        twice = self.sequences.keys() & other.sequences.keys()
        if twice:
            raise VTDInputError(f"{self.what}: video {sorted(twice)[0]!r} given twice")
        self.sequences.update(other.sequences)
        for name, n in other.gt_dets.items():
            self.gt_dets[name] += n

    def compute(self) -> float:
        hota = HOTA()
        videos = sorted(self.sequences)
        per_class = {name: hota.combine_sequences({v: self.sequences[v][name] for v in videos})
                     for name in THING_CATEGORIES if self.gt_dets[name]}  # no ground truth: AssA undefined, skipped
        if not per_class:
            raise MetricUndefinedError(f"{self.what}: no (non-ignored) ground-truth instance to score")
        combined = hota.combine_classes_class_averaged(per_class)
        return float(np.mean(combined["AssA"]) * 100.0)


class TrackingScore:
    """Streaming MOT (``iou_type="bbox"``) or MOTS (``"segm"``) metrics: AP over the tracking
    frames and AssA. :meth:`update` per frame, :meth:`end_video` after a video's last frame,
    :meth:`merge`, :meth:`compute` → ``{"ap_<task>", "assa_<task>"}``."""

    def __init__(self, iou_type: IouType) -> None:
        self.task = "mot" if iou_type == "bbox" else "mots"
        label = self.task.upper()
        self.ap = CocoAP(iou_type, what=f"{label} AP")
        self.assa = AssA(iou_type, what=f"{label} AssA")

    def update(self, p: InstanceFrame, g: InstanceFrame) -> None:
        self.ap.update(p, g)
        self.assa.add_frame(p, g)

    def end_video(self) -> None:
        self.assa.end_video()

    def merge(self, other: TrackingScore) -> None:
        self.ap.merge(other.ap)
        self.assa.merge(other.assa)

    def compute(self) -> dict[str, float]:
        return {f"ap_{self.task}": self.ap.compute(), f"assa_{self.task}": self.assa.compute()}


def assa(preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame], *, iou_type: IouType = "bbox", what: str = "AssA") -> float:
    """Class-averaged HOTA AssA × 100 (``assa_mot`` with boxes, ``assa_mots`` with masks)."""
    acc = AssA(iou_type, what=what)
    for frames in _videos(pair_frames(preds, gts, what=what), what).values():
        for p, g in frames:
            acc.add_frame(p, g)
        acc.end_video()
    return acc.compute()


def _tracking(iou_type: IouType, preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame]) -> dict[str, float]:
    score = TrackingScore(iou_type)
    for frames in _videos(pair_frames(preds, gts, what=score.ap.what), score.assa.what).values():
        for p, g in frames:
            score.update(p, g)
        score.end_video()
    return score.compute()


def mot_metrics(preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame]) -> dict[str, float]:
    """``{"ap_mot": box AP, "assa_mot": AssA with box IoU}`` on the tracking frames."""
    return _tracking("bbox", preds, gts)


def mots_metrics(preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame]) -> dict[str, float]:
    """``{"ap_mots": mask AP, "assa_mots": AssA with mask IoU}`` on the tracking frames."""
    return _tracking("segm", preds, gts)
