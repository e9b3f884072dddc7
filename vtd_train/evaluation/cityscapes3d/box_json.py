"""3D boxes → the JSON files ``cityscapesscripts/evaluation/evalObjectDetection3d.py`` reads.

One file per frame, named ``{frame}_{suffix}.json`` (the evaluation keys a file by the name up to
its last ``_``, so ``{frame}`` is the record's ``{city}_{seq}_{frame}`` base):

* ground truth (``{frame}_gtBbox3d.json``), rebuilt from a shard record (the converter keeps the
  six evaluated classes, the sensor and the ignore regions): ``imgWidth``, ``imgHeight``,
  ``sensor`` (``sensor_T_ISO_8855``, ``fx``, ``fy``, ``u0``, ``v0``, ``baseline``), ``objects``
  (``2d.modal`` / ``2d.amodal`` ``[x, y, w, h]``, ``3d.center`` / ``dimensions`` / ``rotation``
  in V, ``label``, ``instanceId``, ``score``) and ``ignore`` (``2d`` ``[x, y, w, h]``);
* predictions (``{frame}_pred.json``): ``{"objects": [...]}`` in the same object format, with
  the detection's confidence as ``score``; a frame without detections still gets its file.

A :class:`~vtd_train.taskprompter.det3d.Det3DPrediction` is in the S frame of the model's input
image: its projected centre is un-projected at its depth with the frame's intrinsics (scaled
when the model saw a resized image), centre and S Euler angles go to V through
``sensor_T_ISO_8855`` (:func:`data_pipeline.cityscapes3d.geometry.box_s_to_v`), the 2D box is
the modal one the head regresses. The evaluation recomputes a prediction's amodal box from its
3D box itself; the one written here is the projected corners', clipped to the image, for readers
that take the file as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.cityscapes3d import geometry as G
from data_pipeline.cityscapes3d.format import DET3D_CLASSES
from vtd_train.taskprompter.det3d import Det3DPrediction

GT_SUFFIX = "gtBbox3d"
PRED_SUFFIX = "pred"


def _xywh(box) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def _sensor(record: dict[str, Any]) -> dict[str, Any]:
    cam = record.get("camera")
    if not cam or cam.get("sensor_T_ISO_8855") is None:
        raise ValueError(f"frame {record.get('name')!r}: the record has no camera.sensor_T_ISO_8855 (no gtBbox3d or "
                         "camera JSON was converted for it); 3D boxes cannot be placed")
    return {"sensor_T_ISO_8855": cam["sensor_T_ISO_8855"], **{k: cam[k] for k in ("fx", "fy", "u0", "v0", "baseline")}}


def gt_json(record: dict[str, Any]) -> dict[str, Any]:
    """The ``gtBbox3d`` document of a shard record (:mod:`data_pipeline.cityscapes3d.convert`)."""
    objects = [{
        "2d": {"modal": _xywh(b["modal"]), "amodal": _xywh(b["amodal"])},
        "3d": {"center": b["center"], "dimensions": b["dimensions"], "rotation": b["rotation"]},
        "label": b["label"], "instanceId": b.get("instance_id", -1), "score": b.get("score", 1.0),
        "occlusion": b.get("occlusion", 0.0), "truncation": b.get("truncation", 0.0),
    } for b in record["boxes3d"]]
    return {"imgWidth": record["width"], "imgHeight": record["height"], "sensor": _sensor(record), "objects": objects,
            "ignore": [{"2d": _xywh(r)} for r in record.get("ignore", [])]}


def prediction_json(pred: Det3DPrediction, record: dict[str, Any], pixel_scale: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """The prediction document of one frame. ``pixel_scale``: (x, y) image pixels per model-input
    pixel (1 when the model saw the image at its stored size)."""
    sensor = _sensor(record)
    t = np.asarray(sensor["sensor_T_ISO_8855"], dtype=np.float64)
    sx, sy = pixel_scale
    scale = np.array([sx, sy, sx, sy])
    boxes2d = pred.boxes2d.detach().cpu().double().numpy() * scale
    centers = pred.centers2d.detach().cpu().double().numpy() * np.array([sx, sy])
    depths = pred.depths.detach().cpu().double().numpy()
    dims = pred.dims.detach().cpu().double().numpy()
    euler = pred.euler.detach().cpu().double().numpy()
    scores = pred.scores.detach().cpu().double().numpy()
    classes = pred.classes.detach().cpu().numpy()
    w, h = record["width"], record["height"]
    objects = []
    for i in range(len(scores)):
        if not (depths[i] > 0 and np.isfinite(depths[i]) and np.isfinite(dims[i]).all() and np.isfinite(euler[i]).all()):
            continue  # a box behind the camera or non-finite has no place in V
        c_s = G.unproject(centers[i:i + 1], depths[i:i + 1], sensor["fx"], sensor["fy"], sensor["u0"], sensor["v0"])[0]
        c_v, q_v = G.box_s_to_v(c_s, euler[i], t)
        size = [float(max(d, 1e-3)) for d in dims[i]]  # the evaluation divides by the sizes
        x1, y1 = max(0.0, boxes2d[i, 0]), max(0.0, boxes2d[i, 1])
        x2, y2 = min(float(w), boxes2d[i, 2]), min(float(h), boxes2d[i, 3])
        modal = [x1, y1, max(x1, x2), max(y1, y2)]
        amodal = G.amodal_box(c_v, size, q_v, t, sensor["fx"], sensor["fy"], sensor["u0"], sensor["v0"], w, h) or modal
        objects.append({
            "2d": {"modal": _xywh(modal), "amodal": _xywh(amodal)},
            "3d": {"center": [float(v) for v in c_v], "dimensions": size, "rotation": [float(v) for v in q_v]},
            "label": DET3D_CLASSES[int(classes[i])], "score": float(scores[i]),
        })
    return {"objects": objects}


def write_frame(gt_dir: str | Path | None, pred_dir: str | Path, record: dict[str, Any], pred: Det3DPrediction,
                pixel_scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """Write one frame's prediction file (and its ground-truth file when ``gt_dir`` is given)."""
    name = record["name"]
    if gt_dir is not None:
        Path(gt_dir).mkdir(parents=True, exist_ok=True)
        (Path(gt_dir) / f"{name}_{GT_SUFFIX}.json").write_text(json.dumps(gt_json(record)))
    Path(pred_dir).mkdir(parents=True, exist_ok=True)
    doc = prediction_json(pred, record, pixel_scale)
    (Path(pred_dir) / f"{name}_{PRED_SUFFIX}.json").write_text(json.dumps(doc, allow_nan=False))

