"""Image tagging: top-1 accuracy of weather (``acc_weather``) and scene (``acc_scene``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline.bdd100k.format import SCENES, WEATHERS
from data_pipeline.errors import VTDInputError

from .containers import MetricUndefinedError


def tagging_accuracy(pred: Any, true: Any, *, num_classes: int, what: str = "tagging") -> float:
    """Top-1 accuracy × 100 of predicted class indices ``pred`` [N] against ``true`` [N].

    Both hold integer indices in ``0..num_classes-1`` (``bdd100k.WEATHERS`` / ``SCENES``
    order; "undefined" is a class like any other, as in BDD100K). Unlabelled samples (−1 in
    ``FrameTargets``) must be filtered out by the caller: any index out of range is an error.
    """
    p, t = np.asarray(pred), np.asarray(true)
    if p.ndim != 1 or t.ndim != 1 or p.shape != t.shape:
        raise VTDInputError(f"{what}: expected two 1-D index arrays of equal length, got shapes {p.shape} and {t.shape}")
    if p.size == 0:
        raise MetricUndefinedError(f"{what}: no sample to score")
    for side, a in (("predictions", p), ("ground truth", t)):
        if a.dtype.kind not in "iu":
            raise VTDInputError(f"{what}: {side}: expected integer class indices, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= num_classes:
            bad = int(a[(a < 0) | (a >= num_classes)][0])
            raise VTDInputError(f"{what}: {side}: class index {bad} outside 0..{num_classes - 1}")
    return float((p == t).mean() * 100.0)


def weather_accuracy(pred: Any, true: Any) -> float:
    """``acc_weather``: :func:`tagging_accuracy` over the 7 ``bdd100k.WEATHERS``."""
    return tagging_accuracy(pred, true, num_classes=len(WEATHERS), what="weather tagging")


def scene_accuracy(pred: Any, true: Any) -> float:
    """``acc_scene``: :func:`tagging_accuracy` over the 7 ``bdd100k.SCENES``."""
    return tagging_accuracy(pred, true, num_classes=len(SCENES), what="scene tagging")
