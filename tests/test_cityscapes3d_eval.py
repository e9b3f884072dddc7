"""Cityscapes-3D evaluation: 3D boxes the project writes in the official JSON format, scored by
``cityscapesscripts``' own ``evalObjectDetection3d`` (mDS is never recomputed here).

The predictions are the ground truth of the synthetic validation frames in the model's output
form (S-frame centre, depth, Euler angles: what the FCOS3D head regresses), then changed in ways
whose effect on the official score is known: a perfect set scores 100 with either matching, so
the S → V conversion agrees with the script's own geometry (its amodal boxes are recomputed
from the written 3D boxes); 2 m more depth costs about 2 points of BEV centre score and nothing
else; a yaw turned by π makes the yaw similarity 0 (DS = 75); half-resolution predictions with
their pixel scale score as the full ones. The synthetic vehicles sit 8-45 m away, so every class
has true positives in several 5 m bins (the script scores a class with one bin as 0).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d
from data_pipeline.cityscapes3d.decode import iter_cityscapes_frames
from data_pipeline.cityscapes3d.synth import generate
from vtd_train.evaluation.cityscapes3d.box_json import gt_json, prediction_json, write_frame
from vtd_train.evaluation.cityscapes3d.mds import MDSParams, official_mds
from vtd_train.taskprompter.batch import det3d_targets
from vtd_train.taskprompter.det3d import Det3DPrediction


@pytest.fixture(scope="module")
def val_frames(tmp_path_factory):
    d = tmp_path_factory.mktemp("cs3d-eval")
    generate(d / "root", seed=0, size="tiny")
    convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(d / "root"), out=str(d / "shards"), splits="val", progress=False))
    return list(iter_cityscapes_frames(str(d / "shards"), "val"))


def _oracle(record, score: float = 0.9) -> Det3DPrediction:
    t = det3d_targets(record)
    return Det3DPrediction(boxes2d=t.boxes2d, scores=torch.full((len(t.classes),), score), classes=t.classes,
                           centers2d=t.centers2d, depths=t.depths, dims=t.dims, euler=t.euler)


def _score(frames, tmp_path, change=lambda p: p, params=MDSParams(), pixel_scale=(1.0, 1.0)):
    for f in frames:
        write_frame(tmp_path / "gt", tmp_path / "pred", f.record, change(_oracle(f.record)), pixel_scale)
    return official_mds(tmp_path / "gt", tmp_path / "pred", params)


@pytest.mark.parametrize("matching", ["modal", "amodal"])
def test_ground_truth_as_predictions_scores_100(val_frames, tmp_path, matching):
    r = _score(val_frames, tmp_path, params=MDSParams(matching=matching))
    assert r["gt_counts"]["car"] > 0 and r["gt_counts"]["truck"] > 0  # the classes of the synthetic val set
    assert r["mds"] == pytest.approx(100.0, abs=1e-6), r["summary"]
    assert set(r["per_class"]) == {k for k, n in r["gt_counts"].items() if n}
    assert r["results"]["eval_params"]["matching_method"] == matching.capitalize()
    # more than one 5 m bin holds true positives for every scored class
    for label in r["per_class"]:
        assert len(r["results"]["Center_Dist"][label]["items"]) > 1


def test_deeper_boxes_cost_centre_distance_only(val_frames, tmp_path):
    def deeper(p):
        p.depths = p.depths + 2.0
        return p

    s = _score(val_frames, tmp_path, deeper)["summary"]
    # the camera looks nearly along the ground: 2 m along the ray ≈ 2 m in BEV = 2 of 100 points
    assert 97.5 < s["mCenter_Dist"] < 98.5, s
    assert s["mAP"] == s["mSize_Similarity"] == s["mOS_Yaw"] == 100.0
    assert s["mDetection_Score"] == pytest.approx((300 + s["mCenter_Dist"]) / 4, abs=1e-3)


def test_turned_boxes_lose_the_yaw_similarity(val_frames, tmp_path):
    def turned(p):
        p.euler = p.euler + torch.tensor([math.pi, 0.0, 0.0])  # S yaw is about the image's y axis
        return p

    r = _score(val_frames, tmp_path, turned)
    assert r["summary"]["mOS_Yaw"] == pytest.approx(0.0, abs=1e-3)
    # the camera's pitch (0-0.04 rad) tilts S's y axis against V's z: a π turn about it leaves a
    # trace in the V pitch / roll
    assert r["summary"]["mOS_Pitch_Roll"] > 99.9
    assert r["mds"] == pytest.approx(75.0, abs=0.01)


def test_half_resolution_predictions_with_their_pixel_scale(val_frames, tmp_path):
    def halved(p):
        p.boxes2d, p.centers2d = p.boxes2d / 2, p.centers2d / 2
        return p

    assert _score(val_frames, tmp_path, halved, pixel_scale=(2.0, 2.0))["mds"] == pytest.approx(100.0, abs=1e-6)


def test_missed_and_false_detections_lower_ap(val_frames, tmp_path):
    frames = val_frames
    for k, f in enumerate(frames):
        p = _oracle(f.record)
        if k == 0:  # the first frame's boxes are missed
            p = Det3DPrediction(**{n: v[:0] for n, v in vars(p).items()})
        write_frame(tmp_path / "gt", tmp_path / "pred", f.record, p)
    doc = json.loads(next((tmp_path / "pred").glob(f"{frames[0].record['name']}_pred.json")).read_text())
    assert doc == {"objects": []}  # a frame without detections still has its file
    r = official_mds(tmp_path / "gt", tmp_path / "pred")
    n_gt = sum(len(f.record["boxes3d"]) for f in frames)
    assert r["summary"]["mAP"] < 100.0 and r["mds"] < 100.0
    assert r["summary"]["mCenter_Dist"] == pytest.approx(100.0)  # the true positives are still exact
    assert n_gt > len(frames[0].record["boxes3d"])


def test_prediction_json_in_v_frame(val_frames):
    rec = val_frames[0].record
    doc = prediction_json(_oracle(rec), rec)
    gt = gt_json(rec)
    assert len(doc["objects"]) == len(gt["objects"])
    for p, g in zip(doc["objects"], gt["objects"]):
        assert p["label"] == g["label"] and p["score"] == pytest.approx(0.9)
        assert p["3d"]["center"] == pytest.approx(g["3d"]["center"], abs=1e-3)
        assert p["2d"]["modal"] == pytest.approx(g["2d"]["modal"], abs=0.01)
    bad = {k: v for k, v in rec.items() if k != "camera"} | {"camera": None}
    with pytest.raises(ValueError, match=rec["name"]):
        prediction_json(_oracle(rec), bad)


def test_bad_folders_and_params(tmp_path):
    with pytest.raises(FileNotFoundError, match="ground-truth folder"):
        official_mds(tmp_path / "nope", tmp_path)
    with pytest.raises(ValueError, match="matching"):
        MDSParams(matching="3d")
    with pytest.raises(ValueError, match="tram"):
        MDSParams(labels=("car", "tram"))
