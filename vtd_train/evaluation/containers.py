"""Typed inputs of the instance metrics (detection, instance segmentation, pose, MOT, MOTS, flow).

One container per frame, plain numpy arrays (CPU torch tensors are accepted and converted with
``np.asarray``). Coordinates are pixels of the evaluated image, ``x`` right, ``y`` down.

:class:`InstanceFrame` — objects of one frame, ground truth or prediction:

=============  ===================  ============================================================
field          shape / dtype        meaning
=============  ===================  ============================================================
name           str                  frame name; predictions and ground truth are paired by it
boxes          [N, 4] float64       ``x1 y1 x2 y2`` (``x2 >= x1``, ``y2 >= y1``)
classes        [N] int64            thing class 0..7 (``bdd100k.THING_CATEGORIES``)
scores         [N] float64          confidence; required for predictions, ``None`` for GT
masks          [N, H, W] bool       instance masks (needed for mask AP, MOTS and flow)
track_ids      [N] int64            track id within the video (needed for MOT/MOTS/flow)
ignore         [N] bool             GT only: crowd / ignored / mapped category → ignore region
video          str                  GT of tracking frames: the video (sequence) name
frame_index    int                  GT of tracking frames: position in the video
=============  ===================  ============================================================

:class:`PoseFrame` — people of one frame for OKS AP:

=============  ===================  ============================================================
name           str                  frame name
keypoints      [P, 18, 3] float64   ``x, y, v`` (joints of ``bdd100k.POSE_JOINTS``); GT ``v``:
                                    0 unlabelled, 1 occluded, 2 visible; predictions: ``v`` is
                                    the joint score (unused by OKS)
boxes          [P, 4] float64       ``x1 y1 x2 y2``; required for GT (its area normalises OKS,
                                    the Scalabel/BDD100K convention), optional for predictions
scores         [P] float64          person confidence; required for predictions
ignore         [P] bool             GT only: crowd / ignored people
=============  ===================  ============================================================

Every shape, dtype, class id and finiteness problem is a :class:`VTDInputError` naming the
frame and field; so are predictions and ground truth whose frame names differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.bdd100k.format import POSE_JOINTS, THING_CATEGORIES
from data_pipeline.errors import VTDInputError

NUM_THINGS = len(THING_CATEGORIES)
NUM_JOINTS = len(POSE_JOINTS)


class MetricUndefinedError(VTDInputError):
    """The data holds nothing to score (e.g. no ground-truth instance of any class).

    A metric that cannot be computed is reported by raising this rather than returning a
    number; the caller leaves the metric out (VTDA then lists it as missing).
    """


def _err(frame: str, field: str, msg: str) -> VTDInputError:
    return VTDInputError(f"frame {frame!r}: {field}: {msg}")


def _as_array(frame: str, field: str, value: Any, shape: tuple[int | None, ...], kinds: str, what: str) -> np.ndarray:
    raw = np.asarray(value)
    if raw.size == 0 and all(s is not None for s in shape[1:]):
        raw = raw.reshape((0,) + tuple(shape[1:]))  # [] for "no instances"
    if raw.size and raw.dtype.kind not in kinds:
        raise _err(frame, field, f"expected {what}, got dtype {raw.dtype}")
    _check_shape(frame, field, raw, shape)
    return raw


def _float_array(frame: str, field: str, value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    a = _as_array(frame, field, value, shape, "biuf", "numbers").astype(np.float64)
    if not np.isfinite(a).all():
        raise _err(frame, field, "contains NaN or inf")
    return a


def _int_array(frame: str, field: str, value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    raw = _as_array(frame, field, value, shape, "biuf", "integers")
    if raw.dtype.kind == "f" and not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
        raise _err(frame, field, "expected integers, got non-integral values")  # integral floats are fine
    return raw.astype(np.int64)


def _bool_array(frame: str, field: str, value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    raw = _as_array(frame, field, value, shape, "biu", "booleans (or 0/1)")
    if raw.dtype != np.bool_ and raw.size and not np.isin(raw, (0, 1)).all():
        raise _err(frame, field, "expected booleans (or 0/1), got other values")
    return raw.astype(bool)


def _check_shape(frame: str, field: str, a: np.ndarray, shape: tuple[int | None, ...]) -> None:
    ok = a.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, a.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise _err(frame, field, f"expected shape {want}, got {list(a.shape)}")


def _check_boxes(frame: str, boxes: np.ndarray, field: str = "boxes") -> None:
    if boxes.size and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        i = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
        raise _err(frame, field, f"box {i} is not x1 y1 x2 y2 with x2 >= x1, y2 >= y1: {boxes[i].tolist()}")


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: identity equality
class InstanceFrame:
    """Objects of one frame (see the module docstring for the schema). Validated on creation."""

    name: str
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None = None
    masks: np.ndarray | None = None
    track_ids: np.ndarray | None = None
    ignore: np.ndarray | None = None
    video: str = ""
    frame_index: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise VTDInputError(f"InstanceFrame: name must be a non-empty string, got {self.name!r}")
        f = self.name
        boxes = _float_array(f, "boxes", self.boxes, (None, 4))
        _check_boxes(f, boxes)
        n = boxes.shape[0]
        classes = _int_array(f, "classes", self.classes, (n,))
        if classes.size and (classes.min() < 0 or classes.max() >= NUM_THINGS):
            bad = int(classes[(classes < 0) | (classes >= NUM_THINGS)][0])
            raise _err(f, "classes", f"unknown class id {bad} (expected 0..{NUM_THINGS - 1}: {', '.join(THING_CATEGORIES)})")
        set_ = object.__setattr__
        set_(self, "boxes", boxes)
        set_(self, "classes", classes)
        if self.scores is not None:
            set_(self, "scores", _float_array(f, "scores", self.scores, (n,)))
        if self.masks is not None:
            set_(self, "masks", _bool_array(f, "masks", self.masks, (n, None, None)))
        if self.track_ids is not None:
            set_(self, "track_ids", _int_array(f, "track_ids", self.track_ids, (n,)))
        if self.ignore is not None:
            set_(self, "ignore", _bool_array(f, "ignore", self.ignore, (n,)))
        if not isinstance(self.video, str):
            raise _err(f, "video", f"expected a string, got {self.video!r}")
        if isinstance(self.frame_index, bool) or not isinstance(self.frame_index, (int, np.integer)):
            raise _err(f, "frame_index", f"expected an integer, got {self.frame_index!r}")
        set_(self, "frame_index", int(self.frame_index))

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @property
    def ignore_mask(self) -> np.ndarray:
        """``[N]`` bool: which instances are ignore regions (all False when ``ignore`` is None)."""
        return np.zeros(len(self), bool) if self.ignore is None else self.ignore


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: identity equality
class PoseFrame:
    """People of one frame with 18 keypoints each (see the module docstring). Validated on creation."""

    name: str
    keypoints: np.ndarray
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    ignore: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise VTDInputError(f"PoseFrame: name must be a non-empty string, got {self.name!r}")
        f = self.name
        kp = _float_array(f, "keypoints", self.keypoints, (None, NUM_JOINTS, 3))
        n = kp.shape[0]
        set_ = object.__setattr__
        set_(self, "keypoints", kp)
        if self.boxes is not None:
            boxes = _float_array(f, "boxes", self.boxes, (n, 4))
            _check_boxes(f, boxes)
            set_(self, "boxes", boxes)
        if self.scores is not None:
            set_(self, "scores", _float_array(f, "scores", self.scores, (n,)))
        if self.ignore is not None:
            set_(self, "ignore", _bool_array(f, "ignore", self.ignore, (n,)))

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])


def pair_frames(preds: Sequence[Any], gts: Sequence[Any], *, what: str) -> list[tuple[Any, Any]]:
    """Pair predictions with ground truth by frame name, in ground-truth order.

    Names must be unique on each side and the two sets equal (a frame without a prediction
    must still be passed, empty); otherwise a :class:`VTDInputError` lists the offenders.
    """
    def index(frames: Sequence[Any], side: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fr in frames:
            if fr.name in out:
                raise VTDInputError(f"{what}: {side}: frame name {fr.name!r} appears twice")
            out[fr.name] = fr
        return out

    p, g = index(preds, "predictions"), index(gts, "ground truth")
    if p.keys() != g.keys():
        no_pred = sorted(g.keys() - p.keys())
        no_gt = sorted(p.keys() - g.keys())
        parts = []
        if no_pred:
            parts.append(f"{len(no_pred)} ground-truth frame(s) without prediction (e.g. {no_pred[:3]})")
        if no_gt:
            parts.append(f"{len(no_gt)} predicted frame(s) without ground truth (e.g. {no_gt[:3]})")
        raise VTDInputError(f"{what}: frame names of predictions and ground truth differ: " + "; ".join(parts))
    return [(p[name], g[name]) for name in g]


_EMPTY = {"boxes": ((0, 4), np.float64), "masks": ((0, 0, 0), np.bool_), "track_ids": ((0,), np.int64)}


def require(frame: Any, field: str, what: str, *, side: str) -> np.ndarray:
    """Return ``frame.<field>``, raising a :class:`VTDInputError` if it is ``None``.

    A frame without instances may leave any field ``None``: an empty array stands in.
    """
    v = getattr(frame, field)
    if v is None:
        if len(frame) == 0:
            shape, dtype = _EMPTY.get(field, ((0,), np.float64))
            return np.zeros(shape, dtype)
        raise VTDInputError(f"{what}: {side} frame {frame.name!r}: {field} is required")
    return v
