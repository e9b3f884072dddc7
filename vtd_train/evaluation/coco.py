"""COCO AP with pycocotools: box AP (``ap_det``, ``ap_mot``), mask AP (``ap_ins``, ``ap_mots``)
and keypoint OKS AP (``ap_pose``).

Ground truth and predictions are turned into in-memory COCO datasets (no files): one COCO
image per frame, categories 1..8 = ``bdd100k.THING_CATEGORIES`` (pose: one "person"
category). Conventions, as in the BDD100K/Scalabel COCO conversion:

* ignored / crowd ground truth (``ignore``) becomes ``iscrowd=1``: COCOeval then treats it as
  an ignore region, so a detection matching it (IoU computed over the detection's area) is
  neither a true nor a false positive;
* AP is COCOeval's ``stats[0]``: AP@[.50:.95], area "all", 100 detections per image for
  boxes and masks; for pose ``maxDets = [20]`` and ``kpt_oks_sigmas = bdd100k.POSE_SIGMAS``;
* ground-truth area: box ``w·h`` for boxes and for pose (it normalises OKS), mask pixel
  count for masks; a pose GT with no labelled joint is ignored (COCO's ``num_keypoints == 0``);
* class averaging is COCO's: classes without (non-ignored) ground truth do not count; with
  none at all the AP is undefined (:class:`MetricUndefinedError`).

Results are AP × 100.

Streaming (:class:`CocoAP`, what the evaluation's workers use): pycocotools evaluates each image
on its own (``COCOeval.evaluateImg``: which detection matches which ground truth at each IoU
threshold, which are ignored) and only ``accumulate`` looks across images. So a worker runs
``COCOeval.evaluate`` on one frame at a time and keeps only those per-image matches (a score, a
match flag and an ignore flag per detection and IoU threshold; an ignore flag per ground truth),
for COCO's area range "all", the one VTD reports; masks are RLE-encoded for the IoUs and then
dropped. The driver merges the matches of all frames and runs pycocotools' ``accumulate`` and
``summarize`` on them, frames in name order: the AP of one ``COCOeval`` over the whole split,
exactly, while what is held grows by a few bytes per detection rather than a full-frame mask.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any, Final, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data_pipeline.bdd100k.format import POSE_SIGMAS, THING_CATEGORIES
from data_pipeline.errors import VTDInputError

from .containers import InstanceFrame, MetricUndefinedError, PoseFrame, pair_frames, require

IouType = Literal["bbox", "segm"]
#: ``maxDets`` for pose OKS AP (BDD100K pose evaluation; also COCO's keypoint default).
POSE_MAX_DETS = 20
#: COCO's area range "all" (``Params.areaRng[0]``): the only one scored.
AREA_ALL: Final = [0.0, 1e5**2]


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` ``x1 y1 x2 y2`` → COCO ``x y w h``."""
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """``[N, H, W]`` bool → N compressed RLEs (pycocotools.mask)."""
    if masks.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8)))


def _coco(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints
        coco.createIndex()
    return coco


def _images(frames: Sequence[Any], sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """COCO image records; ``sizes`` (H, W) are needed for masks (``COCO.annToRLE`` reads them)."""
    sizes = sizes or [(0, 0)] * len(frames)
    return [{"id": i + 1, "file_name": f.name, "height": h, "width": w} for i, (f, (h, w)) in enumerate(zip(frames, sizes))]


_THING_CATS = [{"id": c + 1, "name": n} for c, n in enumerate(THING_CATEGORIES)]


def instance_coco(
    preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame], iou_type: IouType, *, what: str
) -> tuple[COCO, COCO]:
    """Ground truth and predictions as in-memory COCO objects (image ``i + 1`` = ``gts[i]``)."""
    pairs = pair_frames(preds, gts, what=what)
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    sizes: list[tuple[int, int]] = []
    for img_id, (p, g) in enumerate(pairs, start=1):
        scores = require(p, "scores", what, side="prediction")
        sizes.append((0, 0))
        if iou_type == "segm":
            gm = require(g, "masks", what, side="ground-truth")
            pm = require(p, "masks", what, side="prediction")
            if len(p) and len(g) and pm.shape[1:] != gm.shape[1:]:
                raise VTDInputError(f"{what}: frame {g.name!r}: predicted masks are {list(pm.shape[1:])}, ground truth {list(gm.shape[1:])}")
            g_rle, p_rle = encode_masks(gm), encode_masks(pm)
            sizes[-1] = tuple(gm.shape[1:]) if len(g) else tuple(pm.shape[1:])
        for i, (box, cls, crowd) in enumerate(zip(xyxy_to_xywh(g.boxes), g.classes, g.ignore_mask)):
            ann = {
                "id": len(gt_anns) + 1, "image_id": img_id, "category_id": int(cls) + 1,
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(crowd),
            }
            if iou_type == "segm":
                ann["segmentation"] = g_rle[i]
                ann["area"] = float(mask_utils.area(g_rle[i]))
            gt_anns.append(ann)
        for i, (box, cls, score) in enumerate(zip(xyxy_to_xywh(p.boxes), p.classes, scores)):
            ann = {
                "id": len(dt_anns) + 1, "image_id": img_id, "category_id": int(cls) + 1,
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": 0, "score": float(score),
            }
            if iou_type == "segm":
                ann["segmentation"] = p_rle[i]
                ann["area"] = float(mask_utils.area(p_rle[i]))
            dt_anns.append(ann)
    images = _images([g for _, g in pairs], sizes)
    gt = _coco({"images": images, "categories": _THING_CATS, "annotations": gt_anns})
    dt = _coco({"images": images, "categories": _THING_CATS, "annotations": dt_anns})
    return gt, dt


#: One frame's matches for one category: ``(category index, dtScores [D] float64, dtMatches
#: [T, D] bool, dtIgnore [T, D] bool, gtIgnore [G] bool)`` (``COCOeval.evaluateImg``'s fields
#: that ``accumulate`` reads).
ImageMatches = tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class CocoAP:
    """Streaming COCO AP (see the module docstring): :meth:`update` per frame, :meth:`merge`
    across workers, :meth:`compute` once.

    ``iou_type``: ``"bbox"`` (``ap_det``, ``ap_mot``), ``"segm"`` (``ap_ins``, ``ap_mots``) or
    ``"keypoints"`` (``ap_pose``; frames are :class:`PoseFrame`). ``what`` names the metric in
    errors.
    """

    def __init__(self, iou_type: Literal["bbox", "segm", "keypoints"], *, what: str) -> None:
        self.iou_type = iou_type
        self.what = what
        self.frames: dict[str, list[ImageMatches]] = {}

    def _params(self, ev: COCOeval) -> None:
        if self.iou_type == "keypoints":
            configure_pose_params(ev.params)
        ev.params.areaRng = [list(AREA_ALL)]
        ev.params.areaRngLbl = ["all"]

    def update(self, pred: Any, gt: Any) -> None:
        """Match one frame's predictions with its ground truth (same frame name)."""
        if gt.name in self.frames:
            raise VTDInputError(f"{self.what}: ground truth: frame name {gt.name!r} appears twice")
        if self.iou_type == "keypoints":
            gt_coco, dt_coco = pose_coco([pred], [gt], what=self.what)
        else:
            gt_coco, dt_coco = instance_coco([pred], [gt], self.iou_type, what=self.what)
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt_coco, dt_coco, self.iou_type)
            self._params(ev)
            ev.evaluate()
        # evalImgs: one entry per category (one area range, one image); None: nothing of it here
        self.frames[gt.name] = [
            (k, np.asarray(e["dtScores"], np.float64), np.asarray(e["dtMatches"]) > 0,
             np.asarray(e["dtIgnore"], bool), np.asarray(e["gtIgnore"], bool))
            for k, e in enumerate(ev.evalImgs) if e is not None
        ]

    def merge(self, other: CocoAP) -> None:
        twice = self.frames.keys() & other.frames.keys()
        if twice:
            raise VTDInputError(f"{self.what}: ground truth: frame name {sorted(twice)[0]!r} appears twice")
        self.frames.update(other.frames)

    def compute(self) -> float:
        """COCOeval ``stats[0]`` × 100 over every frame given, frames in name order."""
        names = sorted(self.frames)
        n_cats = 1 if self.iou_type == "keypoints" else len(THING_CATEGORIES)
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(iouType=self.iou_type)
            self._params(ev)
            ev.params.imgIds = list(range(len(names)))
            ev.params.catIds = list(range(1, n_cats + 1))
            ev.evalImgs = [None] * (n_cats * len(names))  # COCOeval's layout: [category][area][image]
            for i, name in enumerate(names):
                for k, scores, matches, dt_ignore, gt_ignore in self.frames[name]:
                    ev.evalImgs[k * len(names) + i] = {"dtScores": scores, "dtMatches": matches,
                                                       "dtIgnore": dt_ignore, "gtIgnore": gt_ignore}
            ev._paramsEval = copy.deepcopy(ev.params)
            if names:
                ev.accumulate()
                ev.summarize()
        ap = float(ev.stats[0]) if names else -1.0
        if ap < 0:  # COCO's −1: no category has non-ignored ground truth
            raise MetricUndefinedError(f"{self.what}: no (non-ignored) ground-truth instance to score")
        return ap * 100.0


def _streamed(acc: CocoAP, preds: Sequence[Any], gts: Sequence[Any]) -> float:
    for p, g in pair_frames(preds, gts, what=acc.what):
        acc.update(p, g)
    return acc.compute()


def box_ap(preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame], *, what: str = "box AP") -> float:
    """Box AP × 100 over the 8 thing classes (``ap_det``; ``ap_mot`` on tracking frames)."""
    return _streamed(CocoAP("bbox", what=what), preds, gts)


def mask_ap(preds: Sequence[InstanceFrame], gts: Sequence[InstanceFrame], *, what: str = "mask AP") -> float:
    """Mask AP × 100 over the 8 thing classes (``ap_ins``; ``ap_mots`` on tracking frames)."""
    return _streamed(CocoAP("segm", what=what), preds, gts)
def pose_coco(preds: Sequence[PoseFrame], gts: Sequence[PoseFrame], *, what: str = "pose AP") -> tuple[COCO, COCO]:
    """Pose ground truth and predictions as in-memory COCO keypoint datasets.

    Prediction boxes and areas come from the keypoint extent, as ``COCO.loadRes`` derives them
    (``PoseFrame.boxes`` of predictions is not used).
    """
    pairs = pair_frames(preds, gts, what=what)
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for img_id, (p, g) in enumerate(pairs, start=1):
        boxes = require(g, "boxes", what, side="ground-truth")
        scores = require(p, "scores", what, side="prediction")
        vis = g.keypoints[:, :, 2]
        if ((vis != 0) & (vis != 1) & (vis != 2)).any():
            raise VTDInputError(f"{what}: ground-truth frame {g.name!r}: keypoint visibility must be 0, 1 or 2")
        crowd = np.zeros(len(g), bool) if g.ignore is None else g.ignore
        for kp, box, ig in zip(g.keypoints, xyxy_to_xywh(boxes), crowd):
            gt_anns.append({
                "id": len(gt_anns) + 1, "image_id": img_id, "category_id": 1,
                "keypoints": kp.reshape(-1).tolist(), "num_keypoints": int((kp[:, 2] > 0).sum()),
                "bbox": box.tolist(), "area": float(box[2] * box[3]), "iscrowd": int(ig),
            })
        for kp, score in zip(p.keypoints, scores):
            x0, y0 = kp[:, :2].min(axis=0)
            x1, y1 = kp[:, :2].max(axis=0)
            dt_anns.append({
                "id": len(dt_anns) + 1, "image_id": img_id, "category_id": 1,
                "keypoints": kp.reshape(-1).tolist(), "score": float(score),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
            })
    images = _images([g for _, g in pairs])
    cats = [{"id": 1, "name": "person"}]
    return (
        _coco({"images": images, "categories": cats, "annotations": gt_anns}),
        _coco({"images": images, "categories": cats, "annotations": dt_anns}),
    )


def configure_pose_params(params: Any) -> None:
    """BDD100K pose evaluation settings on a keypoint ``COCOeval.params``."""
    params.kpt_oks_sigmas = np.asarray(POSE_SIGMAS, dtype=np.float64)
    params.maxDets = [POSE_MAX_DETS]


def pose_ap(preds: Sequence[PoseFrame], gts: Sequence[PoseFrame], *, what: str = "pose AP") -> float:
    """``ap_pose``: keypoint OKS AP × 100 with the 18 BDD100K sigmas and 20 detections per image."""
    return _streamed(CocoAP("keypoints", what=what), preds, gts)
