"""Cityscapes-3D format facts: layout, label ids, disparity encoding, JSON field names.

Everything here is a fact of the dataset as published (Cordts et al. 2016, Gählert et al. 2020)
and of its official tooling, ``cityscapesscripts`` (``helpers/labels.py``,
``helpers/annotation.py``, ``helpers/box3dImageTransform.py``,
``evaluation/evalObjectDetection3d.py``), not a design choice of this project.

Layout of a root (``{split}`` is train / val / test, ``{city}`` a city, ``{base}`` is
``{city}_{sequence:06d}_{frame:06d}``)::

    leftImg8bit/{split}/{city}/{base}_leftImg8bit.png     8-bit RGB PNG
    gtFine/{split}/{city}/{base}_gtFine_labelIds.png      8-bit label ids 0..33
    disparity/{split}/{city}/{base}_disparity.png         16-bit: d = (p - 1) / 256, p = 0 invalid
    camera/{split}/{city}/{base}_camera.json              {"extrinsic": {baseline, x, y, z, yaw,
                                                           pitch, roll}, "intrinsic": {fx, fy, u0, v0}}
    gtBbox3d/{split}/{city}/{base}_gtBbox3d.json          3D boxes (below)

Depth in metres is ``baseline · fx / d`` (cityscapesScripts' README, "disparity").

``gtBbox3d`` JSON (what ``Box3dEvaluator.loadGT`` and ``CsBbox3d.fromJsonText`` read)::

    {"imgWidth": W, "imgHeight": H,
     "sensor": {"sensor_T_ISO_8855": 3×4 [R | t], "fx", "fy", "u0", "v0", "baseline"},
     "objects": [{"2d": {"modal": [x, y, w, h], "amodal": [x, y, w, h]},
                  "3d": {"center": [x, y, z], "dimensions": [length, width, height],
                         "rotation": [w, x, y, z] (unit quaternion), "type", "format": "CRS_ISO8855"},
                  "occlusion", "truncation", "instanceId", "label", "score"}],
     "ignore": [{"2d": [x, y, w, h], "label", "instanceId"}]}

Centres and rotations are in the vehicle frame V (ISO 8855: origin on the ground below the rear
axle, x forward, y left, z up); ``sensor_T_ISO_8855`` maps V to the camera frame C (same axes,
origin at the camera); the image frame S has x right, y down, z forward (geometry.py).
"""

from __future__ import annotations

from typing import Final

import numpy as np

#: Tasks of the MTCityscapes-3D benchmark (TaskPrompter report §2.1), in this project's names.
TASKS: Final = ("sem", "depth", "det3d")
#: The image set name used for shard paths (``cityscapes/{split}/cityscapes-{split}-NNNNNN.tar``).
SET_NAME: Final = "cityscapes"
SPLITS: Final = ("train", "val", "test")
BENCHMARK: Final = "cityscapes3d"

#: ``(name, labelId, trainId)`` of ``cityscapesscripts/helpers/labels.py`` (255 = not trained).
LABELS: Final = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, 255),
)
LABEL_ID: Final = {name: lid for name, lid, _ in LABELS}
#: The 19 train-id classes (same names and order as ``bdd100k.SEM_CLASSES``).
SEM_CLASSES: Final = tuple(name for name, _, tid in sorted((x for x in LABELS if x[2] != 255), key=lambda x: x[2]))
IGNORE_INDEX: Final = 255
#: labelId → trainId lookup table for uint8 label-id maps (ids above 33 are not valid).
MAX_LABEL_ID: Final = 33
LABEL_TO_TRAIN: Final = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _name, _lid, _tid in LABELS:
    if _lid >= 0:
        LABEL_TO_TRAIN[_lid] = _tid

#: The 3D detection classes: ``evalObjectDetection3d.py``'s default ``--labels``.
DET3D_CLASSES: Final = ("car", "truck", "bus", "train", "motorcycle", "bicycle")
DET3D_CLASS_ID: Final = {c: i for i, c in enumerate(DET3D_CLASSES)}

#: Cities of the published splits (the synthetic generator names its scenes after them).
CITIES: Final = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster"),
                 "test": ("berlin", "bielefeld")}


class Layout:
    """Paths of one frame relative to the root, from its split, city and base name."""

    KINDS: Final = {
        "image": ("leftImg8bit", "leftImg8bit.png"),
        "label_ids": ("gtFine", "gtFine_labelIds.png"),
        "disparity": ("disparity", "disparity.png"),
        "camera": ("camera", "camera.json"),
        "bbox3d": ("gtBbox3d", "gtBbox3d.json"),
    }

    @staticmethod
    def path(kind: str, split: str, city: str, base: str) -> str:
        folder, suffix = Layout.KINDS[kind]
        return f"{folder}/{split}/{city}/{base}_{suffix}"

    @staticmethod
    def folder(kind: str, split: str) -> str:
        return f"{Layout.KINDS[kind][0]}/{split}"

    @staticmethod
    def base_of(file_name: str, kind: str) -> str | None:
        """``aachen_000000_000019`` from ``aachen_000000_000019_leftImg8bit.png`` (None if the
        name does not end in ``kind``'s suffix)."""
        suffix = "_" + Layout.KINDS[kind][1]
        return file_name[: -len(suffix)] if file_name.endswith(suffix) and len(file_name) > len(suffix) else None


def disparity_to_png(d: np.ndarray) -> np.ndarray:
    """Disparity in pixels (0 or NaN = invalid) → the published 16-bit encoding ``p = d·256 + 1``."""
    d = np.nan_to_num(np.asarray(d, dtype=np.float64), nan=0.0)
    p = np.where(d > 0, np.round(d * 256.0) + 1.0, 0.0)
    return np.clip(p, 0, 65535).astype(np.uint16)


def png_to_depth(p: np.ndarray, baseline: float, fx: float) -> np.ndarray:
    """16-bit disparity PNG values → depth in metres, float32 ``[H, W]``; 0 where invalid
    (``p == 0``, or ``p == 1``: zero disparity, a point at infinity)."""
    p = np.asarray(p).astype(np.float32)
    d = (p - 1.0) / 256.0
    out = np.zeros_like(d)
    valid = d > 0
    out[valid] = baseline * fx / d[valid]
    return out
