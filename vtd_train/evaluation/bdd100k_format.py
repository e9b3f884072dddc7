"""Predictions → the files BDD100K's toolkit (``bdd100k`` / ``scalabel`` on PyPI) and evaluation
server take (``vtd predict``).

Layout of an output directory (paths relative to it; ``<stem>`` is the frame's image name
without ``.jpg``, which is how the toolkit pairs a PNG with its ground truth):

==============================  ==============================  ==================================
file                            what                            toolkit (``bdd100k.eval.run -t``)
==============================  ==============================  ==================================
``det.json``                    det-set frames: ``labels`` with  ``det`` (boxes); scalabel's
                                ``box2d`` + ``score``; frame     ``evaluate_tagging`` (attributes)
                                ``attributes`` weather / scene
``pose.json``                   det-set frames: ``graph`` of 18  ``pose``
                                joints (``score`` per node) +
                                person ``score``
``drivable/masks/<stem>.png``   L: 0 direct, 1 alternative,      ``drivable``
                                2 background
``lane/masks/<stem>.png``       L: the lane byte (REFERENCE §6)  ``lane_mark``
``sem_seg/masks/<stem>.png``    L: train ids 0..18               ``sem_seg``
``ins_seg/bitmasks/<stem>.png`` RGBA bitmask (below)             ``ins_seg --score-file
``ins_seg/scores.json``         per frame ``labels[{index,       ins_seg/scores.json``
                                score, category}]``
``box_track/<video>.json``      a box-tracking video's frames:   ``box_track`` (the directory)
                                ``labels`` with track ``id``
``seg_track/bitmasks/<video>/   RGBA bitmask, instance id =      ``seg_track``
<stem>.png``                    track id + 1
==============================  ==============================  ==================================

Conventions: Scalabel's ``box2d`` is inclusive (``x2`` is the last pixel column), ours
continuous (``data_pipeline/bdd100k/convert.py`` stores ``x2 + 1``), so a box ``x1 y1 x2 y2`` is written
as ``x2 − 1``, ``y2 − 1``. Bitmasks (REFERENCE §6): R = category id 1..8, G = 0 (no attribute
bits), instance id ``(B << 8) + A``; they hold one instance per pixel, so overlapping masks are
painted in increasing score order and a pixel goes to the highest-scoring instance covering it.
The lane byte has one foreground bit for the three lane maps the model predicts (direction,
style, category, each with its own background): a pixel is a lane pixel where the category map
says so, its direction and style are those maps' classes (the first value, parallel / solid,
where that map says background). Tracking: a video whose frames carry MOTS labels is a
``seg_track_20`` video (bitmasks, when the model predicts ``mots``); the others are
``box_track_20`` videos (JSON, when it predicts ``mot``). Flow has no BDD100K format and is
not written.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from PIL import Image

from data_pipeline.bdd100k.format import (
    DRIVABLE_CLASSES,
    LANE_BACKGROUND,
    LANE_CATEGORIES,
    LANE_DIRECTIONS,
    LANE_STYLES,
    POSE_GRAPH_TYPE,
    POSE_JOINTS,
    SCENES,
    SEM_CLASSES,
    SET_TASKS,
    THING_CATEGORIES,
    WEATHERS,
    encode_bitmask,
)
from data_pipeline.errors import VTDInputError
from vtd_train.model.outputs import FramePrediction

from .inference import labelled, pred_instances, pred_pose, tracked_instances

__all__ = [
    "OUTPUTS", "UnitExport", "UnitExporter", "det_frame", "encode_lane", "instance_bitmask", "pose_frame",
    "scalabel_box", "track_frame",
]

#: Every file or directory ``vtd predict`` writes at the top of its output directory.
OUTPUTS: Final = ("det.json", "pose.json", "drivable", "lane", "sem_seg", "ins_seg", "box_track", "seg_track",
                  "predict_info.json")
#: The most instances a bitmask can hold (16-bit instance ids, 0 = background).
MAX_BITMASK_INSTANCES: Final = (1 << 16) - 1


# ---------------------------------------------------------------------------------------------
# One frame → Scalabel records / PNG bytes
# ---------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def stem(name: str) -> str:
    """``abc.jpg`` → ``abc``: the toolkit pairs a PNG with its ground truth by this."""
    return os.path.splitext(os.path.basename(name))[0]


def png(array: np.ndarray, mode: str) -> bytes:
    """``[H, W]`` uint8 (``L``) or ``[H, W, 4]`` uint8 (``RGBA``) as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode=mode).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def scalabel_box(box: np.ndarray) -> dict[str, float]:
    """Continuous ``x1 y1 x2 y2`` → Scalabel's inclusive ``box2d`` (``x2 − 1``, ``y2 − 1``)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"x1": x1, "y1": y1, "x2": x2 - 1.0, "y2": y2 - 1.0}


def _class_map(pred: FramePrediction, task: str, frame: str, n: int, shape: tuple[int, ...]) -> np.ndarray:
    a = getattr(pred, task)
    if a is None:
        raise VTDInputError(f"frame {frame!r}: the model predicts {task!r} but its prediction has no {task!r}")
    a = _np(a)
    if a.dtype.kind not in "iu" or a.shape != shape:
        raise VTDInputError(f"frame {frame!r}: {task}: expected an integer map of shape {list(shape)}, "
                            f"got {a.dtype} {list(a.shape)}")
    if a.size and (a.min() < 0 or a.max() > n):
        raise VTDInputError(f"frame {frame!r}: {task}: values must be 0..{n}, got {int(a.min())}..{int(a.max())}")
    return a.astype(np.uint8)


def encode_lane(lane: np.ndarray) -> np.ndarray:
    """The model's lane maps ``[3, H, W]`` (direction, style, category; 0 background, else
    ``1 + value``) → BDD100K's lane byte ``[H, W]``: ``category + (direction << 5) + (style << 4)``
    on lane pixels (where the category map is not background), 255 elsewhere."""
    direction, style, category = (lane[i].astype(np.int32) for i in range(3))
    fg = category > 0
    value = (category - 1) + (np.maximum(direction - 1, 0) << 5) + (np.maximum(style - 1, 0) << 4)
    return np.where(fg, value, LANE_BACKGROUND).astype(np.uint8)


def instance_bitmask(masks: np.ndarray, classes: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                     size: tuple[int, int]) -> np.ndarray:
    """RGBA bitmask ``[H, W, 4]`` of instances ``masks [N, H, W]`` with thing ``classes`` 0..7 and
    instance ``ids`` 1..65535: painted in increasing score order (ties: later first), so each
    pixel holds the highest-scoring instance covering it."""
    h, w = size
    category = np.zeros((h, w), np.int32)
    instance = np.zeros((h, w), np.int32)
    for i in np.argsort(scores, kind="stable"):
        m = masks[i]
        category[m] = int(classes[i]) + 1
        instance[m] = int(ids[i])
    return encode_bitmask(category, instance)


def det_frame(name: str, pred: FramePrediction, tasks: tuple[str, ...]) -> dict[str, Any]:
    """A det-set frame for ``det.json``: tagging as frame ``attributes`` (``tag``), detections as
    ``labels`` (``det``; ``id`` = index in the frame)."""
    frame: dict[str, Any] = {"name": name}
    if "tag" in tasks:
        attrs = {}
        for key, probs, classes in (("weather", pred.weather, WEATHERS), ("scene", pred.scene, SCENES)):
            if probs is None:
                raise VTDInputError(f"frame {name!r}: the model predicts 'tag' but its prediction has no {key!r}")
            p = _np(probs)
            if p.shape != (len(classes),) or not np.isfinite(p).all():
                raise VTDInputError(f"frame {name!r}: {key}: expected {len(classes)} finite probabilities, got shape {list(p.shape)}")
            attrs[key] = classes[int(p.argmax())]
        frame["attributes"] = attrs
    labels = []
    if "det" in tasks:
        inst = pred_instances(name, pred)
        labels = [{"id": str(k), "category": THING_CATEGORIES[int(c)], "score": float(s), "box2d": scalabel_box(b)}
                  for k, (b, c, s) in enumerate(zip(inst.boxes, inst.classes, inst.scores))]
    frame["labels"] = labels
    return frame


def pose_frame(name: str, pred: FramePrediction) -> dict[str, Any]:
    """A frame for ``pose.json``: one ``pedestrian`` label per predicted person, its ``graph`` the
    18 joints in ``POSE_JOINTS`` order with their scores, ``score`` the person's."""
    poses = pred_pose(name, pred)
    labels = []
    for k, (kp, score) in enumerate(zip(poses.keypoints, poses.scores)):
        nodes = [{"location": [float(x), float(y)], "category": joint, "id": f"{k}-{j}", "score": float(v)}
                 for j, (joint, (x, y, v)) in enumerate(zip(POSE_JOINTS, kp))]
        labels.append({"id": str(k), "category": "pedestrian", "score": float(score),
                       "graph": {"nodes": nodes, "edges": [], "type": POSE_GRAPH_TYPE}})
    return {"name": name, "labels": labels}


def track_frame(name: str, video: str, frame_index: int, tracked: Any) -> dict[str, Any]:
    """A frame of ``box_track/<video>.json``: the tracker's boxes, ``id`` = track id."""
    inst = tracked_instances(name, tracked)
    labels = [{"id": str(int(t)), "category": THING_CATEGORIES[int(c)], "score": float(s), "box2d": scalabel_box(b)}
              for b, c, s, t in zip(inst.boxes, inst.classes, inst.scores, inst.track_ids)]
    return {"name": name, "videoName": video, "frameIndex": int(frame_index), "labels": labels}


# ---------------------------------------------------------------------------------------------
# A unit's export
# ---------------------------------------------------------------------------------------------


@dataclass
class UnitExport:
    """What one work unit adds to an output directory.

    ``files``: ``(relative path, bytes)`` written as they are (PNGs, ``box_track/<video>.json``);
    ``records``: entries of the files that span units (``det.json``, ``pose.json``,
    ``ins_seg/scores.json``), in frame order; ``counts``: frames written per output; ``frames``:
    frames of the unit.
    """

    files: list[tuple[str, bytes]] = field(default_factory=list)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    frames: int = 0


class UnitExporter:
    """Collects the :class:`.worker.FrameOutput` of a unit into a :class:`UnitExport` for a model
    predicting ``tasks``. A frame is written for the tasks of its image set (``SET_TASKS``) that
    the model predicts, whether or not the frame is labelled for them; a tracking video is kept
    until its last frame, when it is known to be a box- or a segmentation-tracking video."""

    def __init__(self, tasks: tuple[str, ...]) -> None:
        self.tasks = tuple(tasks)
        self.out = UnitExport()
        self._video: list[tuple[dict[str, Any], tuple[str, bytes] | None]] = []
        self._video_mots = False

    def _record(self, key: str, entry: dict[str, Any]) -> None:
        self.out.records.setdefault(key, []).append(entry)

    def _file(self, output: str, path: str, data: bytes) -> None:
        self.out.files.append((path, data))
        self.out.counts[output] += 1

    def add(self, o: Any) -> None:
        name, pred = o.name, o.pred
        size = tuple(pred.size)
        self.out.frames += 1
        tasks = tuple(t for t in SET_TASKS[o.set_name] if t in self.tasks)
        if o.set_name == "det":
            if "det" in tasks or "tag" in tasks:
                self._record("det.json", det_frame(name, pred, tasks))
                self.out.counts["det"] += 1
            if "pose" in tasks:
                self._record("pose.json", pose_frame(name, pred))
                self.out.counts["pose"] += 1
            if "drivable" in tasks:
                self._file("drivable", f"drivable/masks/{stem(name)}.png",
                           png(_class_map(pred, "drivable", name, len(DRIVABLE_CLASSES) - 1, size), "L"))
            if "lane" in tasks:
                n = max(len(LANE_DIRECTIONS), len(LANE_STYLES), len(LANE_CATEGORIES))
                lane = _class_map(pred, "lane", name, n, (3, *size))
                self._file("lane", f"lane/masks/{stem(name)}.png", png(encode_lane(lane), "L"))
        elif o.set_name == "seg":
            if "sem" in tasks:
                self._file("sem_seg", f"sem_seg/masks/{stem(name)}.png",
                           png(_class_map(pred, "sem", name, len(SEM_CLASSES) - 1, size), "L"))
            if "ins" in tasks:
                inst = pred_instances(name, pred, masks=True, task="ins")
                if len(inst) > MAX_BITMASK_INSTANCES:
                    raise VTDInputError(f"frame {name!r}: {len(inst)} instances, a bitmask holds at most {MAX_BITMASK_INSTANCES}")
                ids = np.arange(1, len(inst) + 1)
                self._file("ins_seg", f"ins_seg/bitmasks/{stem(name)}.png",
                           png(instance_bitmask(inst.masks, inst.classes, inst.scores, ids, size), "RGBA"))
                self._record("ins_seg/scores.json", {"name": name, "labels": [
                    {"index": int(i), "score": float(s), "category": THING_CATEGORIES[int(c)]}
                    for i, s, c in zip(ids, inst.scores, inst.classes)]})
        else:
            self._add_track(o, tasks)

    def _add_track(self, o: Any, tasks: tuple[str, ...]) -> None:
        name = o.name
        if o.tracked is None and ("mot" in tasks or "mots" in tasks):
            raise VTDInputError(f"frame {name!r}: the model predicts {tasks} but no tracker output was given")
        self._video_mots |= labelled(o.frame.sources, "mots")
        frame = track_frame(name, o.video, o.frame.record["frame_index"], o.tracked) if "mot" in tasks else None
        mask = None
        if "mots" in tasks:
            inst = tracked_instances(name, o.tracked, masks=True)
            ids = inst.track_ids + 1
            if len(ids) and int(ids.max()) > MAX_BITMASK_INSTANCES:
                raise VTDInputError(f"frame {name!r}: track id {int(ids.max()) - 1} does not fit a bitmask's 16-bit instance id")
            mask = (f"seg_track/bitmasks/{o.video}/{stem(name)}.png",
                    png(instance_bitmask(inst.masks, inst.classes, inst.scores, ids, tuple(o.pred.size)), "RGBA"))
        self._video.append((frame, mask))
        if o.last:
            self._end_video(o.video)

    def _end_video(self, video: str) -> None:
        frames, masks = [f for f, _ in self._video], [m for _, m in self._video]
        if self._video_mots:
            for m in masks:
                if m is not None:
                    self._file("seg_track", *m)
        elif frames and frames[0] is not None:
            self.out.files.append((f"box_track/{video}.json", (json.dumps(frames, indent=1) + "\n").encode()))
            self.out.counts["box_track"] += len(frames)
        self._video, self._video_mots = [], False

    def result(self) -> UnitExport:
        if self._video:  # a unit ends with its videos' last frames
            raise VTDInputError(f"tracking video {self._video[0][0] and self._video[0][0]['videoName']!r} ended without its last frame")
        return self.out
