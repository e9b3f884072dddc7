"""Evaluation: per-task metrics and the VTDA aggregate.

Modules, in data-flow order: ``containers`` (typed per-frame inputs), ``tagging``,
``segmentation`` (sem / drivable mIoU, lane boundary IoU), ``coco`` (box / mask / pose AP with
pycocotools), ``tracking`` (MOT / MOTS AP and AssA with trackeval), ``flow`` (flow proxy
IoU), ``metrics`` (all of the above, keyed by canonical metric) and ``vtda`` (the score).

``vtda`` needs only the standard library, so ``vtd score`` stays fast; the metric names below
are imported on first use (pycocotools / trackeval / scipy load then).
"""

from __future__ import annotations

import importlib
from typing import Any

from .vtda import GROUPS, METRIC_KEYS, SCALING, VTDA_KEYS, score, score_file

__all__ = ["GROUPS", "METRIC_KEYS", "SCALING", "VTDA_KEYS", "score", "score_file"]


def __getattr__(name: str) -> Any:  # PEP 562: lazy access to the metric library
    metrics = importlib.import_module(f"{__name__}.metrics")
    if name in metrics.__all__:
        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
