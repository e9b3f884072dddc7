"""Predictions → metric inputs: the glue between ``VTDNet.predict`` / :class:`QDTracker` and the
metrics of :mod:`vtd_train.evaluation.metrics`.

Everything a prediction contributes to a score passes through the validated containers
(:class:`InstanceFrame`, :class:`PoseFrame`) or the streaming accumulators (their ``update``
checks shapes and class ids), so a prediction with a wrong shape, an unknown class id or a frame
name that does not match the ground truth raises :class:`VTDInputError` instead of producing a
wrong number. This module has no model and no Ray in it: :mod:`.evaluate` runs the model and
calls the functions here, and tests feed ground truth through the same functions.

What is scored, per frame, from the tasks the frame is labelled for (only *real* labels count;
a pseudo label is not ground truth):

==========  =======================================================  ===========================
task        prediction (:class:`FramePrediction` field)               metric key(s)
==========  =======================================================  ===========================
tag         ``weather`` / ``scene`` probabilities → argmax            acc_weather, acc_scene
sem         ``sem``                                                  iou_sem
drivable    ``drivable``                                             iou_drivable
lane        ``lane``                                                 iou_lane
det         ``boxes``, ``classes``, ``scores``                       ap_det
ins         … + ``masks``                                            ap_ins
pose        ``keypoints``, ``keypoint_scores``                       ap_pose
mot         tracker output (boxes, classes, scores, track ids)       ap_mot, assa_mot
mots        tracker output with the detections' masks                ap_mots, assa_mots
flow        ``flow`` of key frame t−1 with reference frame t           iou_flow
==========  =======================================================  ===========================

Flow direction: the model's flow maps key-frame pixels to reference-frame pixels,
``key(x, y) ≈ ref(x + dx, y + dy)`` (:mod:`vtd_train.model.flow`); the proxy metric wants, on the
grid of frame t−1, where each pixel is in frame t (:mod:`.flow`). Both say the same thing when
the model runs with key = frame t−1 and reference = frame t, which is how :mod:`.evaluate` pairs
them; :func:`metric_flow` only moves the channel axis (``[2, H, W]`` → ``[H, W, 2]``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch

from data_pipeline.bdd100k.format import SCENES, WEATHERS, decode_lane_mask
from data_pipeline.errors import VTDInputError
from data_pipeline.loading.structures import FrameTargets, LabelSource
from vtd_train.model.outputs import FramePrediction
from vtd_train.tracker import TrackResult

from .coco import CocoAP
from .containers import InstanceFrame, MetricUndefinedError, PoseFrame
from .flow import FlowProxyIoU
from .segmentation import DrivableIoU, LaneBoundaryIoU, SemanticIoU
from .tagging import scene_accuracy, weather_accuracy
from .tracking import TrackingScore

#: Metric keys of each task (a task absent from the model or the data leaves its keys out).
TASK_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "tag": ("acc_weather", "acc_scene"),
    "sem": ("iou_sem",),
    "drivable": ("iou_drivable",),
    "lane": ("iou_lane",),
    "det": ("ap_det",),
    "ins": ("ap_ins",),
    "pose": ("ap_pose",),
    "mot": ("ap_mot", "assa_mot"),
    "mots": ("ap_mots", "assa_mots"),
    "flow": ("iou_flow",),
}


def labelled(sources: Mapping[str, LabelSource], task: str) -> bool:
    """Whether a frame carries ground truth for ``task`` (real labels only)."""
    return sources.get(task) == LabelSource.REAL


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _need(pred: FramePrediction, name: str, frame: str, task: str) -> Any:
    value = getattr(pred, name)
    if value is None:
        raise VTDInputError(f"frame {frame!r}: the model predicts {task!r} but its prediction has no {name!r}")
    return value


def check_prediction(pred: FramePrediction, frame: str, size: tuple[int, int]) -> None:
    """A prediction must be a :class:`FramePrediction` at the frame's size ``(H, W)``."""
    if not isinstance(pred, FramePrediction):
        raise VTDInputError(f"frame {frame!r}: expected a FramePrediction, got {type(pred).__name__}")
    if tuple(pred.size) != tuple(size):
        raise VTDInputError(f"frame {frame!r}: prediction is {tuple(pred.size)} (H, W) but the image is {tuple(size)}")


# ---------------------------------------------------------------------------------------------
# Containers from ground truth and predictions
# ---------------------------------------------------------------------------------------------


def gt_instances(name: str, t: FrameTargets, *, masks: bool = False, video: str = "", frame_index: int = -1) -> InstanceFrame:
    """Ground-truth objects of a frame. With ``masks``, instances without a mask
    (``mask_valid`` False) become ignore regions: they cannot be scored by mask IoU."""
    if t.boxes is None or t.classes is None:
        raise VTDInputError(f"frame {name!r}: labelled for an instance task but carries no boxes")
    n = t.num_instances
    ignore = _np(t.ignore).astype(bool) if t.ignore is not None else np.zeros(n, bool)
    m = None
    if masks:
        if t.instance_map is None:
            raise VTDInputError(f"frame {name!r}: labelled for a mask task but carries no instance masks")
        m = _np(t.instance_masks())
        if t.mask_valid is not None:
            ignore = ignore | ~_np(t.mask_valid).astype(bool)
    return InstanceFrame(
        name=name, boxes=_np(t.boxes), classes=_np(t.classes), ignore=ignore, masks=m,
        track_ids=None if t.track_ids is None else _np(t.track_ids), video=video, frame_index=frame_index,
    )


def pred_instances(name: str, pred: FramePrediction, *, masks: bool = False, task: str = "det") -> InstanceFrame:
    """Detections of one frame (``masks`` for instance segmentation)."""
    return InstanceFrame(
        name=name,
        boxes=_np(_need(pred, "boxes", name, task)),
        classes=_np(_need(pred, "classes", name, task)),
        scores=_np(_need(pred, "scores", name, task)),
        masks=_np(_need(pred, "masks", name, task)) if masks else None,
    )


def tracked_instances(name: str, result: TrackResult, *, masks: bool = False) -> InstanceFrame:
    """The tracker's output for one frame (MOT; with ``masks``, MOTS)."""
    if masks and result.masks is None:
        raise VTDInputError(f"frame {name!r}: MOTS needs the tracker to be given the detections' masks")
    return InstanceFrame(
        name=name, boxes=_np(result.boxes), classes=_np(result.classes), scores=_np(result.scores),
        track_ids=_np(result.track_ids), masks=_np(result.masks) if masks else None,
    )


def gt_pose(name: str, t: FrameTargets) -> PoseFrame:
    if t.keypoints is None or t.pose_boxes is None:
        raise VTDInputError(f"frame {name!r}: labelled for pose but carries no keypoints / pose boxes")
    return PoseFrame(name=name, keypoints=_np(t.keypoints), boxes=_np(t.pose_boxes))


def pred_pose(name: str, pred: FramePrediction) -> PoseFrame:
    return PoseFrame(
        name=name,
        keypoints=_np(_need(pred, "keypoints", name, "pose")),
        scores=_np(_need(pred, "keypoint_scores", name, "pose")),
    )


def metric_flow(pred: FramePrediction, frame: str) -> np.ndarray:
    """The model's ``flow`` ``[2, H, W]`` (key t−1 → reference t) as the metric's ``[H, W, 2]``."""
    f = _np(_need(pred, "flow", frame, "flow"))
    if f.ndim != 3 or f.shape[0] != 2 or tuple(f.shape[1:]) != tuple(pred.size):
        raise VTDInputError(f"frame {frame!r}: flow must be [2, {pred.size[0]}, {pred.size[1]}], got {list(f.shape)}")
    return np.moveaxis(f, 0, -1)


def _tag_index(probs: Any, classes: tuple[str, ...], frame: str, what: str) -> int:
    p = _np(probs)
    if p.shape != (len(classes),):
        raise VTDInputError(f"frame {frame!r}: {what} prediction must hold {len(classes)} probabilities, got shape {list(p.shape)}")
    if not np.isfinite(p).all():
        raise VTDInputError(f"frame {frame!r}: {what} prediction contains NaN or inf")
    return int(p.argmax())


# ---------------------------------------------------------------------------------------------
# Partial results of some frames: update, merge, compute
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalState:
    """Metric inputs of a part of the split (a shard, a group of videos), mergeable.

    ``labelled[task]`` counts the frames (for ``flow``: frame pairs) that carried ground truth
    for ``task``, whether or not the model predicts it. Every metric is a streaming accumulator
    whose size does not grow with the frames' pixels: confusion histograms and lane sums, the
    per-frame COCO matches of :class:`coco.CocoAP` (det, ins, pose, and the AP of MOT / MOTS)
    and the per-sequence HOTA results of :class:`tracking.TrackingScore`; a mask lives only
    while its frame is scored. :meth:`merge` adds the parts (frames and videos of one part must
    not appear in another), and ``compute`` orders frames by name, so merging the parts in any
    order gives the same metrics.
    """

    tag: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # name, pred/true weather, pred/true scene
    sem: SemanticIoU = field(default_factory=SemanticIoU)
    drivable: DrivableIoU = field(default_factory=DrivableIoU)
    lane: LaneBoundaryIoU = field(default_factory=LaneBoundaryIoU)
    det: CocoAP = field(default_factory=lambda: CocoAP("bbox", what="box AP"))
    ins: CocoAP = field(default_factory=lambda: CocoAP("segm", what="mask AP"))
    pose: CocoAP = field(default_factory=lambda: CocoAP("keypoints", what="pose AP"))
    mot: TrackingScore = field(default_factory=lambda: TrackingScore("bbox"))
    mots: TrackingScore = field(default_factory=lambda: TrackingScore("segm"))
    flow: FlowProxyIoU = field(default_factory=FlowProxyIoU)
    labelled: Counter = field(default_factory=Counter)
    frames: int = 0

    def merge(self, other: EvalState) -> None:
        self.tag += other.tag
        for k in ("sem", "drivable", "lane", "det", "ins", "pose", "mot", "mots", "flow"):
            getattr(self, k).merge(getattr(other, k))
        self.labelled.update(other.labelled)
        self.frames += other.frames

    # -- per frame -----------------------------------------------------------------------------

    def add_frame(self, name: str, t: FrameTargets, sources: Mapping[str, LabelSource], pred: FramePrediction,
                  tasks: tuple[str, ...]) -> None:
        """Score the image-level tasks of one frame (tag, sem, drivable, lane, det, ins, pose)
        that it is labelled for and the model (``tasks``) predicts."""
        self.frames += 1
        for task in ("tag", "sem", "drivable", "lane", "det", "ins", "pose"):
            if not labelled(sources, task):
                continue
            self.labelled[task] += 1
            if task not in tasks:
                continue
            if task == "tag":
                if t.weather < 0 and t.scene < 0:
                    raise VTDInputError(f"frame {name!r}: labelled for tagging but has neither weather nor scene")
                w = _tag_index(_need(pred, "weather", name, task), WEATHERS, name, "weather")
                s = _tag_index(_need(pred, "scene", name, task), SCENES, name, "scene")
                self.tag.append((name, w, t.weather, s, t.scene))
            elif task in ("sem", "drivable", "lane"):
                gt = getattr(t, task)
                if gt is None:
                    raise VTDInputError(f"frame {name!r}: labelled for {task} but carries no {task} map")
                if task == "lane":  # the compact lane bytes → direction / style / category maps
                    gt = decode_lane_mask(gt)
                acc = getattr(self, task)
                try:
                    acc.update(_np(_need(pred, task, name, task)), _np(gt))
                except VTDInputError as e:
                    raise VTDInputError(f"frame {name!r}: {e}") from None
            elif task == "det":
                self.det.update(pred_instances(name, pred), gt_instances(name, t))
            elif task == "ins":
                self.ins.update(pred_instances(name, pred, masks=True, task="ins"), gt_instances(name, t, masks=True))
            elif task == "pose":
                self.pose.update(pred_pose(name, pred), gt_pose(name, t))

    def add_tracked(self, name: str, t: FrameTargets, sources: Mapping[str, LabelSource], result: TrackResult | None,
                    tasks: tuple[str, ...], *, video: str, frame_index: int) -> InstanceFrame | None:
        """Score the tracker's output on one tracking frame (MOT, MOTS); frames of a video in
        frame order, then :meth:`end_video`. Returns the frame's MOTS ground truth (for the flow
        proxy), or ``None`` if it has none."""
        mots_gt = None
        if labelled(sources, "mots"):
            mots_gt = gt_instances(name, t, masks=True, video=video, frame_index=frame_index)
        for task, masks in (("mot", False), ("mots", True)):
            if not labelled(sources, task):
                continue
            self.labelled[task] += 1
            if task not in tasks:
                continue
            if result is None:
                raise VTDInputError(f"frame {name!r}: the model predicts {task!r} but no tracker output was given")
            gt = mots_gt if masks else gt_instances(name, t, video=video, frame_index=frame_index)
            getattr(self, task).update(tracked_instances(name, result, masks=masks), gt)
        return mots_gt

    def end_video(self) -> None:
        """A video's last frame was added: score its sequences (AssA)."""
        self.mot.end_video()
        self.mots.end_video()

    def add_flow_pair(self, pred_prev: FramePrediction | None, prev: InstanceFrame, cur: InstanceFrame,
                      tasks: tuple[str, ...]) -> None:
        """Score the flow predicted for frame t−1 (key) with frame t (reference) against the
        MOTS masks of the two frames (``prev`` = t−1, ``cur`` = t)."""
        self.labelled["flow"] += 1
        if "flow" not in tasks:
            return
        if pred_prev is None:
            raise VTDInputError(f"frame {prev.name!r}: the model predicts flow but no flow prediction was given")
        self.flow.update(metric_flow(pred_prev, prev.name), prev, cur)

    # -- the result ----------------------------------------------------------------------------

    def compute(self, tasks: tuple[str, ...]) -> tuple[dict[str, float], dict[str, str]]:
        """``(metrics, missing)``: canonical metric values, and a reason for every canonical key
        left out (task not in the model ``tasks``, nothing labelled, nothing to score)."""
        metrics: dict[str, float] = {}
        missing: dict[str, str] = {}
        for task, keys in TASK_METRICS.items():
            if task not in tasks:
                missing |= {k: f"the model has no {task} decoder" for k in keys}
                continue
            if not self.labelled[task]:
                what = "consecutive MOTS frame pair" if task == "flow" else f"frame labelled for {task}"
                missing |= {k: f"no {what} in the data" for k in keys}
                continue
            try:
                if task == "tag":
                    rows = sorted(self.tag)
                    for key, col, fn in (("acc_weather", 1, weather_accuracy), ("acc_scene", 3, scene_accuracy)):
                        scored = [r for r in rows if r[col + 1] >= 0]
                        if not scored:
                            missing[key] = f"no frame has a {key[4:]} label"
                            continue
                        metrics[key] = fn(np.array([r[col] for r in scored]), np.array([r[col + 1] for r in scored]))
                elif task in ("sem", "drivable", "lane", "det", "ins", "pose"):
                    metrics[keys[0]] = getattr(self, task).compute()
                elif task in ("mot", "mots"):
                    score = getattr(self, task)
                    metrics[keys[0]] = score.ap.compute()
                    metrics[keys[1]] = score.assa.compute()
                elif task == "flow":
                    metrics["iou_flow"] = self.flow.compute()
            except MetricUndefinedError as e:
                missing |= {k: str(e) for k in keys if k not in metrics}
        return metrics, missing
