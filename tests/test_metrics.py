"""Per-task metrics on tiny hand-computable data, cross-checked with pycocotools / trackeval."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage
from trackeval.metrics import HOTA

from data_pipeline.bdd100k.format import POSE_SIGMAS, decode_lane_mask, encode_lane
from data_pipeline.errors import VTDInputError
from vtd_train.evaluation.metrics import (
    DrivableIoU,
    FlowProxyIoU,
    InstanceFrame,
    LaneBoundaryIoU,
    MetricUndefinedError,
    PoseFrame,
    SemanticIoU,
    assa,
    boundary_iou,
    box_ap,
    count_within,
    mask_ap,
    mot_metrics,
    mots_metrics,
    pose_ap,
    scene_accuracy,
    tagging_accuracy,
    warp_nearest,
    weather_accuracy,
)

# COCO AP averages 101 recall points: a detector that finds k/n of the objects with perfect
# precision scores (100·k/n + 1) / 101 points on each recall point up to k/n.
HALF_RECALL_AP = 51 / 101 * 100


def frame(name, boxes, classes, scores=None, **kw) -> InstanceFrame:
    return InstanceFrame(name=name, boxes=np.asarray(boxes, dtype=float), classes=np.asarray(classes, dtype=np.int64), scores=scores, **kw)


def square_mask(h, w, x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------------------------
# Tagging
# ---------------------------------------------------------------------------------------------


def test_tagging_accuracy():
    assert weather_accuracy([0, 1, 2, 3], [0, 1, 2, 0]) == pytest.approx(75.0)
    assert scene_accuracy(np.arange(7), np.arange(7)) == 100.0
    with pytest.raises(VTDInputError, match="class index 7 outside 0..6"):
        weather_accuracy([7], [0])
    with pytest.raises(VTDInputError, match="ground truth: class index -1"):
        scene_accuracy([0], [-1])
    with pytest.raises(VTDInputError, match="equal length"):
        tagging_accuracy([0, 1], [0], num_classes=7)
    with pytest.raises(VTDInputError, match="integer"):
        tagging_accuracy([0.5], [0], num_classes=7)
    with pytest.raises(MetricUndefinedError):
        weather_accuracy([], [])


# ---------------------------------------------------------------------------------------------
# Semantic / drivable mIoU
# ---------------------------------------------------------------------------------------------


def test_semantic_miou_hand_computed_and_streaming():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 0, 0, 2]], np.uint8)
    # class 0: TP 3, FN 1, FP 1 → 3/5; class 1: TP 2, FN 1, FP 1 → 2/4; the 2 sits on an
    # ignored pixel and class 2 has no ground truth, so it is not averaged.
    m = SemanticIoU()
    m.update(pred, gt)
    assert m.compute() == pytest.approx((3 / 5 + 2 / 4) / 2 * 100)
    iou = m.per_class_iou()
    assert iou[0] == pytest.approx(60.0) and iou[1] == pytest.approx(50.0) and np.isnan(iou[2:]).all()
    # streaming: two frames (second one perfect) == the histogram of both
    m.update(gt.clip(0, 18), gt.clip(0, 18))
    both = SemanticIoU()
    both.update(np.concatenate([pred, gt.clip(0, 18)]), np.concatenate([gt, gt.clip(0, 18)]))
    assert m.compute() == pytest.approx(both.compute())
    # class 0: TP 3+4=7, union 7+1+1 → 7/9; class 1: TP 2+3, union 5+2 → 5/7; class 18: 1/1
    assert m.compute() == pytest.approx((7 / 9 + 5 / 7 + 1.0) / 3 * 100)
    # merge across workers
    a, b = SemanticIoU(), SemanticIoU()
    a.update(pred, gt)
    b.update(gt.clip(0, 18), gt.clip(0, 18))
    a.merge(b)
    assert a.compute() == pytest.approx(m.compute())


def test_semantic_perfect_and_errors():
    gt = np.random.default_rng(0).integers(0, 19, size=(8, 8)).astype(np.uint8)
    m = SemanticIoU()
    m.update(gt, gt)
    assert m.compute() == 100.0
    with pytest.raises(VTDInputError, match="ground truth holds class 19"):
        m.update(gt, np.full_like(gt, 19))
    with pytest.raises(VTDInputError, match="prediction holds class 255"):
        m.update(np.full_like(gt, 255), gt)
    with pytest.raises(VTDInputError, match="shape"):
        m.update(gt[:4], gt)
    with pytest.raises(VTDInputError, match="integer class map"):
        m.update(gt.astype(float), gt)
    empty = SemanticIoU()
    empty.update(gt, np.full_like(gt, 255))
    with pytest.raises(MetricUndefinedError):
        empty.compute()


def test_drivable_background_is_predicted_but_not_scored():
    gt = np.array([[0, 0, 1, 2, 2]], np.uint8)
    pred = np.array([[0, 2, 1, 2, 0]], np.uint8)
    m = DrivableIoU()
    m.update(pred, gt)
    # direct: TP 1, FN 1 (→ background), FP 1 (background → direct) → 1/3; alternative: 1/1
    assert m.compute() == pytest.approx((1 / 3 + 1) / 2 * 100)
    bg_only = DrivableIoU()
    bg_only.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 2, np.uint8))
    with pytest.raises(MetricUndefinedError):
        bg_only.compute()


# ---------------------------------------------------------------------------------------------
# Lane boundary IoU
# ---------------------------------------------------------------------------------------------


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x**2 + y**2 <= r**2  # skimage.morphology.disk(r), used by the BDD100K toolkit


def test_count_within_equals_disk_dilation():
    # |a ∧ dil(b)| by the disk of radius 5 (skimage's disk, as the BDD100K toolkit dilates)
    rng = np.random.default_rng(1)
    for _ in range(3):
        a, b = rng.random((40, 50)) < 0.05, rng.random((40, 50)) < 0.02
        expect = int((a & ndimage.binary_dilation(b, structure=_disk(5))).sum())
        assert count_within(np.argwhere(a), np.argwhere(b), 5) == expect
    # exactly on the circle (a 3-4-5 triangle) counts, just outside does not
    assert count_within(np.array([[3, 4]]), np.array([[0, 0]]), 5) == 1
    assert count_within(np.array([[4, 4]]), np.array([[0, 0]]), 5) == 0
    assert count_within(np.zeros((0, 2)), np.array([[0, 0]]), 5) == 0


def test_boundary_iou_hand_computed():
    gt = np.zeros((30, 50), bool)
    gt[10, 10:30] = True  # 20 px horizontal line
    assert boundary_iou(gt, gt) == 1.0
    assert boundary_iou(np.roll(gt, 3, axis=1), gt) == 1.0  # within the 5 px tolerance
    shifted = np.roll(gt, 7, axis=1)  # cols 17..36
    # gt cols 12..29 have a prediction within 5 px (18), pred cols 17..34 have gt (18):
    assert boundary_iou(shifted, gt) == pytest.approx(36 / (40 + 40 - 36))
    assert boundary_iou(np.roll(gt, 20, axis=0), gt) == 0.0
    assert boundary_iou(np.zeros_like(gt), gt) == 0.0
    assert boundary_iou(gt, np.zeros_like(gt)) == 0.0
    assert boundary_iou(np.zeros_like(gt), np.zeros_like(gt)) is None
    # A thin prediction along a thick ground truth: REFERENCE's one-sided formula would give
    # |gt| / |pred| = 3; the symmetric form stays in [0, 1].
    thick = np.zeros_like(gt)
    thick[9:12, 10:30] = True
    assert boundary_iou(gt, thick) == 1.0


def _lane_maps(h, w, rows, category, direction, style, cols=slice(5, 35)):
    m = np.full((h, w), 255, np.uint8)
    for r in rows:
        m[r, cols] = encode_lane(category, direction, style)
    return decode_lane_mask(m)


def test_lane_accumulator():
    gt = _lane_maps(20, 40, [10], category=2, direction=0, style=1)
    m = LaneBoundaryIoU()
    m.update(gt, gt)
    assert m.compute() == 100.0
    # Right direction and style, wrong category: direction 100, style 100, category: value 2
    # (gt only) 0 and value 3 (prediction only) 0 → (100 + 100 + 0) / 3.
    wrong = _lane_maps(20, 40, [10], category=3, direction=0, style=1)
    m = LaneBoundaryIoU()
    m.update(wrong, gt)
    assert m.per_group_iou() == {"direction": 100.0, "style": 100.0, "category": 0.0}
    assert m.compute() == pytest.approx(200 / 3)
    # Averaged over frames: one perfect frame, one shifted by 7 px (IoU 36/44 as above).
    line = _lane_maps(20, 60, [10], 2, 0, 1, cols=slice(10, 30))
    shifted = _lane_maps(20, 60, [10], 2, 0, 1, cols=slice(17, 37))
    m = LaneBoundaryIoU()
    m.update(line, line)
    m.update(shifted, line)
    assert m.compute() == pytest.approx((1 + 36 / 44) / 2 * 100)
    # merge == one accumulator over both frames
    a, b = LaneBoundaryIoU(), LaneBoundaryIoU()
    a.update(line, line)
    b.update(shifted, line)
    a.merge(b)
    assert a.compute() == pytest.approx(m.compute())


def test_lane_ignore_and_errors():
    gt = _lane_maps(20, 40, [10], 2, 0, 1)
    pred = gt.copy()
    pred[:, 15, 5:35] = pred[:, 10, 5:35]  # a second, false line 5 rows lower …
    gt_ignored = gt.copy()
    gt_ignored[:, 13:, :] = 255  # … inside an ignored region
    m = LaneBoundaryIoU()
    m.update(pred, gt_ignored)
    assert m.compute() == 100.0
    with pytest.raises(VTDInputError, match=r"\[3, H, W\]"):
        m.update(gt[0], gt[0])
    bad = gt.copy()
    bad[2, 0, 0] = 9  # category map holds 0..8
    with pytest.raises(VTDInputError, match="prediction category map"):
        m.update(bad, gt)
    with pytest.raises(MetricUndefinedError):
        LaneBoundaryIoU().compute()


# ---------------------------------------------------------------------------------------------
# Box / mask AP
# ---------------------------------------------------------------------------------------------


def test_box_ap_perfect_partial_and_class_average():
    gts = [frame("a", [[0, 0, 10, 10], [20, 20, 40, 40]], [2, 0]), frame("b", [[5, 5, 25, 30]], [2])]
    perfect = [frame(g.name, g.boxes, g.classes, scores=np.ones(len(g))) for g in gts]
    assert box_ap(perfect, gts) == pytest.approx(100.0)
    # class 0 found, only one of the two cars found: (100 + HALF_RECALL_AP) / 2
    half = [frame("a", [[0, 0, 10, 10], [20, 20, 40, 40]], [2, 0], scores=[0.9, 0.9]), frame("b", [], [], scores=[])]
    assert box_ap(half, gts) == pytest.approx((100 + HALF_RECALL_AP) / 2)
    # a higher-scored false positive halves precision everywhere: AP 50 for cars; a prediction of
    # a class without ground truth (bus) does not count.
    fp = [
        frame("a", [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [0, 0, 9, 9]], [2, 0, 2, 4], scores=[0.8, 0.9, 0.95, 0.9]),
        frame("b", [[5, 5, 25, 30], [60, 0, 70, 10]], [2, 2], scores=[0.7, 0.99]),
    ]
    # cars ranked: FP .99, FP .95, TP .8, TP .7 → precision 1/3 at recall .5, 1/2 at recall 1
    assert box_ap(fp, gts) == pytest.approx((100 + 50) / 2)


def test_box_ap_empty_predictions_and_no_ground_truth():
    gts = [frame("a", [[0, 0, 10, 10]], [2])]
    assert box_ap([frame("a", [], [], scores=[])], gts) == 0.0
    assert box_ap([frame("a", [], [])], gts) == 0.0  # an empty frame needs no scores
    with pytest.raises(MetricUndefinedError):
        box_ap([frame("a", [[0, 0, 10, 10]], [2], scores=[1.0])], [frame("a", [], [])])
    # only an ignored ground truth: nothing to score either
    with pytest.raises(MetricUndefinedError):
        box_ap([frame("a", [], [], scores=[])], [frame("a", [[0, 0, 10, 10]], [2], ignore=[True])])


def test_box_ap_crowd_ground_truth_is_an_ignore_region():
    gts = [frame("a", [[0, 0, 10, 10], [50, 0, 100, 50]], [2, 2], ignore=[False, True])]
    preds = [frame("a", [[0, 0, 10, 10], [60, 10, 70, 20]], [2, 2], scores=[0.8, 0.9])]
    assert box_ap(preds, gts) == pytest.approx(100.0)  # the .9 box lies in the crowd region
    no_crowd = [frame("a", [[0, 0, 10, 10]], [2])]
    assert box_ap(preds, no_crowd) == pytest.approx(50.0)  # … otherwise it is a false positive


def _random_frames(rng, n_frames, with_masks=False, h=48, w=64):
    gts, preds = [], []
    for i in range(n_frames):
        def boxes(n):
            xy = rng.uniform(0, 40, (n, 2))
            wh = rng.uniform(4, 20, (n, 2))
            return np.round(np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], 1))
        ng, nd = rng.integers(1, 5), rng.integers(0, 6)
        gb = boxes(ng)
        db = np.concatenate([gb[: min(ng, nd)] + rng.normal(0, 2, (min(ng, nd), 4)), boxes(max(nd - ng, 0))])
        db = np.sort(db.reshape(-1, 2, 2), axis=1).reshape(-1, 4).clip(0, [w - 1, h - 1, w - 1, h - 1])
        gc, dc = rng.integers(0, 3, ng), rng.integers(0, 3, len(db))
        kw_g, kw_d = {}, {}
        if with_masks:
            kw_g["masks"] = np.stack([square_mask(h, w, *map(int, b)) for b in gb]) if ng else np.zeros((0, h, w), bool)
            kw_d["masks"] = np.stack([square_mask(h, w, *map(int, b)) for b in db]) if len(db) else np.zeros((0, h, w), bool)
        gts.append(frame(f"f{i}", gb, gc, ignore=rng.random(ng) < 0.2, **kw_g))
        preds.append(frame(f"f{i}", db, dc, scores=rng.random(len(db)), **kw_d))
    return preds, gts


def _direct_cocoeval(preds, gts, iou_type):
    """pycocotools run directly (``COCO`` + ``loadRes``), as its documentation shows."""
    images = [{"id": i + 1, "height": 48, "width": 64} for i in range(len(gts))]
    cats = [{"id": c + 1, "name": str(c)} for c in range(8)]
    anns, results = [], []
    for img, (p, g) in enumerate(zip(preds, gts), start=1):
        for j in range(len(g)):
            x1, y1, x2, y2 = g.boxes[j]
            ann = {"id": len(anns) + 1, "image_id": img, "category_id": int(g.classes[j]) + 1,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(g.ignore[j])}
            if iou_type == "segm":
                ann["segmentation"] = mask_utils.encode(np.asfortranarray(g.masks[j].astype(np.uint8)))
                ann["area"] = float(g.masks[j].sum())
            anns.append(ann)
        for j in range(len(p)):
            x1, y1, x2, y2 = p.boxes[j]
            res = {"image_id": img, "category_id": int(p.classes[j]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(p.scores[j])}
            if iou_type == "segm":
                res["segmentation"] = mask_utils.encode(np.asfortranarray(p.masks[j].astype(np.uint8)))
            results.append(res)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": cats, "annotations": anns}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0] * 100


def test_box_and_mask_ap_agree_with_pycocotools_run_directly():
    preds, gts = _random_frames(np.random.default_rng(7), 6, with_masks=True)
    assert sum(len(p) for p in preds) > 0 and any(g.ignore.any() for g in gts)
    ours = box_ap(preds, gts)
    assert 0 < ours < 100
    assert ours == pytest.approx(_direct_cocoeval(preds, gts, "bbox"), abs=1e-9)
    ours = mask_ap(preds, gts)
    assert 0 < ours < 100
    assert ours == pytest.approx(_direct_cocoeval(preds, gts, "segm"), abs=1e-9)


def test_mask_ap_hand_computed():
    h = w = 20
    g = frame("a", [[0, 0, 10, 10]], [1], masks=square_mask(h, w, 0, 0, 10, 10)[None])
    perfect = frame("a", [[0, 0, 10, 10]], [1], scores=[1.0], masks=g.masks)
    assert mask_ap([perfect], [g]) == pytest.approx(100.0)
    # an 8×8 mask inside the 10×10 one: IoU .64 passes the thresholds .50, .55, .60 of ten
    part = frame("a", [[0, 0, 10, 10]], [1], scores=[1.0], masks=square_mask(h, w, 0, 0, 8, 8)[None])
    assert mask_ap([part], [g]) == pytest.approx(30.0)
    with pytest.raises(VTDInputError, match="masks is required"):
        mask_ap([frame("a", [[0, 0, 10, 10]], [1], scores=[1.0])], [g])
    small = frame("a", [[0, 0, 10, 10]], [1], scores=[1.0], masks=np.zeros((1, 10, 10), bool))
    with pytest.raises(VTDInputError, match=r"predicted masks are \[10, 10\], ground truth \[20, 20\]"):
        mask_ap([small], [g])


def test_instance_input_errors():
    g = [frame("a", [[0, 0, 10, 10]], [2])]
    p = [frame("a", [[0, 0, 10, 10]], [2], scores=[1.0])]
    with pytest.raises(VTDInputError, match=r"ground-truth frame\(s\) without prediction \(e.g. \['a'\]\).*predicted frame\(s\) without ground truth \(e.g. \['b'\]\)"):
        box_ap([frame("b", [], [], scores=[])], g)
    with pytest.raises(VTDInputError, match="frame name 'a' appears twice"):
        box_ap(p + p, g)
    with pytest.raises(VTDInputError, match="scores is required"):
        box_ap([frame("a", [[0, 0, 10, 10]], [2])], g)
    with pytest.raises(VTDInputError, match=r"frame 'x': classes: unknown class id 8"):
        frame("x", [[0, 0, 1, 1]], [8])
    with pytest.raises(VTDInputError, match=r"frame 'x': boxes: expected shape \[\*, 4\], got \[1, 3\]"):
        frame("x", [[0, 0, 1]], [0])
    with pytest.raises(VTDInputError, match="x2 >= x1"):
        frame("x", [[5, 0, 1, 1]], [0])
    with pytest.raises(VTDInputError, match="NaN or inf"):
        frame("x", [[0, 0, 1, 1]], [0], scores=[np.nan])
    with pytest.raises(VTDInputError, match=r"classes: expected shape \[2\], got \[1\]"):
        frame("x", [[0, 0, 1, 1], [0, 0, 2, 2]], [0])
    with pytest.raises(VTDInputError, match=r"masks: expected shape \[1, \*, \*\]"):
        frame("x", [[0, 0, 1, 1]], [0], masks=np.zeros((2, 4, 4), bool))
    with pytest.raises(VTDInputError, match="masks: expected booleans"):
        frame("x", [[0, 0, 1, 1]], [0], masks=np.full((1, 4, 4), 3, np.uint8))
    with pytest.raises(VTDInputError, match="name must be a non-empty string"):
        frame("", [], [])


# ---------------------------------------------------------------------------------------------
# Pose OKS AP
# ---------------------------------------------------------------------------------------------


def _person(rng, x0, y0, w=30, h=80):
    kp = np.zeros((18, 3))
    kp[:, 0] = x0 + rng.uniform(0, w, 18)
    kp[:, 1] = y0 + rng.uniform(0, h, 18)
    kp[:, 2] = 2
    return kp, [x0, y0, x0 + w, y0 + h]


def test_pose_ap_perfect_and_hand_computed_oks():
    rng = np.random.default_rng(3)
    kp, box = _person(rng, 10, 10)
    kp[[14, 15], 2] = 0  # two unlabelled joints: not part of OKS
    gt = PoseFrame(name="a", keypoints=kp[None], boxes=np.array([box], float))
    perfect = PoseFrame(name="a", keypoints=kp[None], scores=np.array([0.9]))
    assert pose_ap([perfect], [gt]) == pytest.approx(100.0)
    # Every joint off by d pixels: OKS = mean_j exp(−d² / (2 · area · (2σ_j)²)) over labelled joints.
    d = 4.0
    off = kp.copy()
    off[:, 0] += d
    area = 30 * 80
    sig = np.asarray(POSE_SIGMAS)[kp[:, 2] > 0]
    oks = np.mean(np.exp(-(d**2) / (2 * area * (2 * sig) ** 2)))
    passed = sum(oks >= t for t in np.linspace(0.5, 0.95, 10))
    assert 0 < passed < 10
    got = pose_ap([PoseFrame(name="a", keypoints=off[None], scores=np.array([0.9]))], [gt])
    assert got == pytest.approx(passed * 10.0)


def test_pose_ap_agrees_with_pycocotools_run_directly():
    rng = np.random.default_rng(5)
    gts, preds = [], []
    for i in range(4):
        people = [_person(rng, 10 + 60 * j, 10) for j in range(int(rng.integers(1, 4)))]
        kps = np.stack([p[0] for p in people])
        kps[:, :, 2] = rng.choice([0, 1, 2], size=kps.shape[:2], p=[0.2, 0.2, 0.6])
        ignore = rng.random(len(people)) < 0.2
        gts.append(PoseFrame(name=f"f{i}", keypoints=kps, boxes=np.array([p[1] for p in people], float), ignore=ignore))
        pk = kps[: int(rng.integers(0, len(people) + 1))].copy()
        pk[:, :, :2] += rng.normal(0, 3, pk[:, :, :2].shape)
        pk[:, :, 2] = 1.0
        preds.append(PoseFrame(name=f"f{i}", keypoints=pk, scores=rng.random(len(pk))))
    ours = pose_ap(preds, gts)
    assert 0 < ours < 100
    anns, results = [], []
    for img, (p, g) in enumerate(zip(preds, gts), start=1):
        for kp, (x1, y1, x2, y2), ig in zip(g.keypoints, g.boxes, g.ignore):
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                         "num_keypoints": int((kp[:, 2] > 0).sum()), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": (x2 - x1) * (y2 - y1), "iscrowd": int(ig)})
        for kp, s in zip(p.keypoints, p.scores):
            results.append({"image_id": img, "category_id": 1, "keypoints": kp.reshape(-1).tolist(), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": [{"id": i + 1} for i in range(4)], "categories": [{"id": 1, "name": "person"}], "annotations": anns}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "keypoints")
        ev.params.kpt_oks_sigmas = np.array(POSE_SIGMAS)
        ev.params.maxDets = [20]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours == pytest.approx(ev.stats[0] * 100, abs=1e-9)


def test_pose_errors():
    kp = np.zeros((1, 18, 3))
    with pytest.raises(VTDInputError, match=r"keypoints: expected shape \[\*, 18, 3\], got \[1, 17, 3\]"):
        PoseFrame(name="a", keypoints=np.zeros((1, 17, 3)))
    with pytest.raises(VTDInputError, match="boxes is required"):
        pose_ap([PoseFrame(name="a", keypoints=kp, scores=np.ones(1))], [PoseFrame(name="a", keypoints=kp)])
    bad = kp.copy()
    bad[0, 0, 2] = 3
    with pytest.raises(VTDInputError, match="visibility must be 0, 1 or 2"):
        pose_ap([PoseFrame(name="a", keypoints=kp, scores=np.ones(1))], [PoseFrame(name="a", keypoints=bad, boxes=np.array([[0, 0, 5, 5.0]]))])
    # a ground-truth person without labelled joint is ignored → nothing to score
    with pytest.raises(MetricUndefinedError):
        pose_ap([PoseFrame(name="a", keypoints=kp, scores=np.ones(1))], [PoseFrame(name="a", keypoints=kp, boxes=np.array([[0, 0, 5, 5.0]]))])


# ---------------------------------------------------------------------------------------------
# MOT / MOTS: AP and AssA
# ---------------------------------------------------------------------------------------------

CAR, PED, BUS = 2, 0, 4


def track_frame(video, t, boxes, classes, ids, scores=None, ignore=None, masks=None):
    return frame(f"{video}-{t}", boxes, classes, scores=scores, track_ids=np.asarray(ids, np.int64),
                 ignore=ignore, masks=masks, video=video, frame_index=t)


def _car_box(t):
    return [10 + 5 * t, 10, 40 + 5 * t, 30]


def test_mot_perfect():
    gts, preds = [], []
    for video in ("v1", "v2"):
        for t in range(3):
            boxes = [_car_box(t), [100, 50, 120, 90]]
            gts.append(track_frame(video, t, boxes, [CAR, PED], [1, 2]))
            preds.append(track_frame(video, t, boxes, [CAR, PED], [7, 8], scores=[0.9, 0.8]))
    assert mot_metrics(preds, gts) == {"ap_mot": pytest.approx(100.0), "assa_mot": pytest.approx(100.0)}
    # an extra frame without objects on either side, passed without optional fields
    gts.append(frame("v1-3", [], [], video="v1", frame_index=3))
    preds.append(frame("v1-3", [], []))
    assert mot_metrics(preds, gts)["assa_mot"] == pytest.approx(100.0)


def test_assa_split_track_class_average_and_skipped_classes():
    gts, preds = [], []
    for t in range(4):
        gts.append(track_frame("v", t, [_car_box(t), [100, 50, 120, 90]], [CAR, PED], [1, 2]))
        car_id = 10 if t < 2 else 11  # the car's track is split in two halves
        preds.append(track_frame("v", t, [_car_box(t), [100, 50, 120, 90], [200, 0, 260, 40]],
                                 [CAR, PED, BUS], [car_id, 20, 30], scores=[0.9, 0.9, 0.9]))
    # Car: each of the 4 matches has TPA 2, FNA 2, FPA 0 → A = 0.5 at every α → AssA 50.
    # Pedestrian: 100. Bus has no ground truth: skipped (its false positives do not count).
    assert assa(preds, gts) == pytest.approx(75.0)
    only_car = [track_frame("v", t, [_car_box(t)], [CAR], [10 if t < 2 else 11], scores=[1.0]) for t in range(4)]
    gts_car = [track_frame("v", t, [_car_box(t)], [CAR], [1]) for t in range(4)]
    assert assa(only_car, gts_car) == pytest.approx(50.0)


def test_assa_removes_unmatched_predictions_in_ignore_regions():
    crowd = [150, 0, 250, 100]
    gts, preds = [], []
    for t in range(3):
        gts.append(track_frame("v", t, [_car_box(t)], [CAR], [1]))
        preds.append(track_frame("v", t, [_car_box(t)], [CAR], [10], scores=[0.9]))
    # Frame 3: the car is gone; its predicted track lives on inside a crowd (ignore) region.
    gts.append(track_frame("v", 3, [crowd], [CAR], [-1], ignore=[True]))
    preds.append(track_frame("v", 3, [[160, 10, 200, 50]], [CAR], [10], scores=[0.9]))
    # Removed inside the crowd region → AssA 100; otherwise an FPA of 1: A = 3 / (3 + 0 + 1).
    assert assa(preds, gts) == pytest.approx(100.0)
    far = gts[:3] + [track_frame("v", 3, [[300, 300, 400, 400]], [CAR], [-1], ignore=[True])]
    assert assa(preds, far) == pytest.approx(75.0)


def _box_iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_assa_agrees_with_trackeval_hota_run_directly():
    rng = np.random.default_rng(11)
    T = 6
    gt_tracks = {1: np.array([10.0, 10, 40, 40]), 2: np.array([60.0, 10, 90, 50]), 3: np.array([20.0, 60, 50, 95])}
    gts, preds, gt_ids, tr_ids, sims = [], [], [], [], []
    for t in range(T):
        g_ids = [k for k in gt_tracks if not (k == 3 and t < 2)]
        g_boxes = [gt_tracks[k] + [3 * t, 0, 3 * t, 0] for k in g_ids]
        # predictions: jittered copies with an identity switch between tracks 1 and 2 at t=3,
        # one missed detection and one false positive
        p_ids, p_boxes = [], []
        for k, b in zip(g_ids, g_boxes):
            if (k, t) == (2, 4):
                continue
            pid = {1: 101, 2: 102, 3: 103}[k]
            if t >= 3 and k in (1, 2):
                pid = 203 - pid  # 101 <-> 102
            p_ids.append(pid)
            p_boxes.append(b + rng.normal(0, 2.5, 4))
        if t == 1:
            p_ids.append(150)
            p_boxes.append(np.array([100.0, 100, 120, 120]))
        p_boxes = [np.array([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]) for b in p_boxes]
        gts.append(track_frame("v", t, g_boxes, [CAR] * len(g_ids), g_ids))
        preds.append(track_frame("v", t, p_boxes, [CAR] * len(p_ids), p_ids, scores=np.ones(len(p_ids))))
        gt_ids.append(np.array([k - 1 for k in g_ids]))
        tr_ids.append(np.array([{101: 0, 102: 1, 103: 2, 150: 3}[i] for i in p_ids]))
        sims.append(np.array([[_box_iou(g, p) for p in p_boxes] for g in g_boxes]))
    data = {"num_timesteps": T, "num_gt_ids": 3, "num_tracker_ids": 4, "gt_ids": gt_ids, "tracker_ids": tr_ids,
            "similarity_scores": sims, "num_gt_dets": sum(map(len, gt_ids)), "num_tracker_dets": sum(map(len, tr_ids))}
    expected = float(np.mean(HOTA().eval_sequence(data)["AssA"]) * 100)
    got = assa(preds, gts)
    assert 30 < expected < 95
    assert got == pytest.approx(expected, abs=1e-9)


def test_mots_metrics():
    h, w = 40, 60
    gts, preds, split = [], [], []
    for t in range(3):
        m = square_mask(h, w, 5 + 5 * t, 5, 20 + 5 * t, 25)[None]
        box = [[5 + 5 * t, 5, 20 + 5 * t, 25]]
        gts.append(track_frame("v", t, box, [CAR], [1], masks=m))
        preds.append(track_frame("v", t, box, [CAR], [4], scores=[0.9], masks=m))
        split.append(track_frame("v", t, box, [CAR], [4 if t == 0 else 5], scores=[0.9], masks=m))
    assert mots_metrics(preds, gts) == {"ap_mots": pytest.approx(100.0), "assa_mots": pytest.approx(100.0)}
    # 3 matches: the first has TPA 1, FNA 2 (A = 1/3), the other two TPA 2, FNA 1 (A = 2/3)
    assert assa(split, gts, iou_type="segm") == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3 * 100)
    with pytest.raises(VTDInputError, match="masks is required"):
        mots_metrics([track_frame("v", t, [[0, 0, 1, 1]], [CAR], [1], scores=[1.0]) for t in range(3)], gts)


def test_tracking_input_errors():
    g = [track_frame("v", 0, [[0, 0, 10, 10]], [CAR], [1])]
    p = [track_frame("v", 0, [[0, 0, 10, 10]], [CAR], [1], scores=[1.0])]
    no_video = [frame("v-0", [[0, 0, 10, 10]], [CAR], track_ids=[1])]
    with pytest.raises(VTDInputError, match="has no video name"):
        assa(p, no_video)
    with pytest.raises(VTDInputError, match="track_ids is required"):
        assa([frame("v-0", [[0, 0, 10, 10]], [CAR], scores=[1.0])], g)
    dup = [track_frame("v", 0, [[0, 0, 10, 10], [20, 20, 30, 30]], [CAR, PED], [3, 3], scores=[1.0, 1.0])]
    with pytest.raises(VTDInputError, match=r"track id\(s\) \[3\] appear more than once"):
        assa(dup, g)
    twice = g + [frame("v-0b", [], [], track_ids=[], video="v", frame_index=0)]
    with pytest.raises(VTDInputError, match="frame_index values repeat"):
        assa(p + [frame("v-0b", [], [], scores=[], track_ids=[])], twice)
    with pytest.raises(MetricUndefinedError):
        assa([track_frame("v", 0, [], [], [], scores=[])], [track_frame("v", 0, [], [], [])])


# ---------------------------------------------------------------------------------------------
# Flow proxy IoU
# ---------------------------------------------------------------------------------------------


def _flow_pair(h=30, w=40, shift=3):
    prev = frame("v-0", [[10, 5, 20, 15]], [CAR], masks=square_mask(h, w, 10, 5, 20, 15)[None], track_ids=[1], video="v", frame_index=0)
    cur = frame("v-1", [[10 + shift, 5, 20 + shift, 15]], [CAR], masks=square_mask(h, w, 10 + shift, 5, 20 + shift, 15)[None],
                track_ids=[1], video="v", frame_index=1)
    return prev, cur


def _uniform_flow(h, w, dx, dy=0.0):
    f = np.zeros((h, w, 2))
    f[..., 0], f[..., 1] = dx, dy
    return f


def test_flow_proxy_iou_direction_and_values():
    prev, cur = _flow_pair(shift=3)  # the object moves 3 px right from t−1 to t
    m = FlowProxyIoU()
    m.update(_uniform_flow(30, 40, 3), prev, cur)  # forward flow t−1 → t: exact
    assert m.compute() == pytest.approx(100.0)
    m = FlowProxyIoU()
    m.update(_uniform_flow(30, 40, 0), prev, cur)  # no motion: 10×10 squares 3 px apart
    assert m.compute() == pytest.approx(70 / 130 * 100)
    m = FlowProxyIoU()
    m.update(_uniform_flow(30, 40, -3), prev, cur)  # wrong direction: 6 px apart
    assert m.compute() == pytest.approx(40 / 160 * 100)
    m = FlowProxyIoU()
    m.update(_uniform_flow(30, 40, 2.6), prev, cur)  # nearest sampling: 2.6 → 3
    m.update(_uniform_flow(30, 40, 100), prev, cur)  # samples outside the image: background
    assert m.compute() == pytest.approx((100 + 0) / 2)


def test_flow_matches_instances_by_track_id():
    h, w = 30, 40
    a, b = square_mask(h, w, 0, 0, 10, 10), square_mask(h, w, 20, 10, 30, 20)
    prev = frame("v-0", [[0, 0, 10, 10], [20, 10, 30, 20]], [CAR, PED], masks=np.stack([a, b]), track_ids=[1, 2], video="v", frame_index=0)
    # frame t lists the same two objects in the other order, plus a new one and an ignored one
    c = square_mask(h, w, 0, 20, 5, 25)
    cur = frame("v-1", [[20, 10, 30, 20], [0, 0, 10, 10], [0, 20, 5, 25], [0, 0, 40, 30]], [PED, CAR, CAR, CAR],
                masks=np.stack([b, a, c, np.ones((h, w), bool)]), track_ids=[2, 1, 3, 1], ignore=[False, False, False, True],
                video="v", frame_index=1)
    m = FlowProxyIoU()
    m.update(np.zeros((h, w, 2)), prev, cur)
    assert (m.count, m.compute()) == (2, pytest.approx(100.0))


def test_warp_nearest_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    h, w = 12, 16
    masks = rng.random((3, h, w)) < 0.4
    flow = rng.uniform(-4, 4, (h, w, 2))
    ys, xs = np.mgrid[0:h, 0:w]
    gx = (xs + flow[..., 0]) / (w - 1) * 2 - 1
    gy = (ys + flow[..., 1]) / (h - 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1)[None]).float()
    ref = torch.nn.functional.grid_sample(torch.from_numpy(masks[:, None].astype(np.float32)).transpose(0, 1), grid,
                                          mode="nearest", padding_mode="zeros", align_corners=True)
    assert np.array_equal(warp_nearest(masks, flow), ref[0].numpy() > 0.5)


def test_flow_errors():
    prev, cur = _flow_pair()
    m = FlowProxyIoU()
    with pytest.raises(VTDInputError, match=r"\[H, W, 2\]"):
        m.update(np.zeros((2, 30, 40)), prev, cur)
    with pytest.raises(VTDInputError, match="NaN"):
        m.update(np.full((30, 40, 2), np.nan), prev, cur)
    with pytest.raises(VTDInputError, match=r"masks are \[30, 40\] but the flow is \[30, 41\]"):
        m.update(np.zeros((30, 41, 2)), prev, cur)
    with pytest.raises(VTDInputError, match="not an ordered pair"):
        m.update(np.zeros((30, 40, 2)), cur, prev)
    no_masks = frame("v-1", [[0, 0, 1, 1]], [CAR], track_ids=[1], video="v", frame_index=1)
    with pytest.raises(VTDInputError, match="masks is required"):
        m.update(np.zeros((30, 40, 2)), prev, no_masks)
    with pytest.raises(MetricUndefinedError):
        FlowProxyIoU().compute()


def test_streamed_ap_keeps_matches_not_masks():
    """A worker's AP accumulator holds per-detection matches, not the frames' masks: a 720p
    frame with 6 instances leaves a few hundred bytes (the masks alone are 5.5 MB)."""
    import pickle

    from vtd_train.evaluation.coco import CocoAP

    h, w = 720, 1280
    masks = np.stack([square_mask(h, w, 100 * i, 50, 100 * i + 80, 400) for i in range(6)])
    boxes = [[100 * i, 50, 100 * i + 80, 400] for i in range(6)]
    g = frame("a", boxes, [2] * 6, masks=masks)
    p = frame("a", boxes, [2] * 6, scores=np.linspace(0.5, 1, 6), masks=np.roll(masks, 3, axis=2))
    acc = CocoAP("segm", what="mask AP")
    acc.update(p, g)
    assert len(pickle.dumps(acc)) < 4000
    assert acc.compute() == pytest.approx(mask_ap([p], [g]))
