"""Per-task metrics of VTD, one entry point per canonical metric key (REFERENCE §7).

=============  ===========================================  ======================================
key            how                                          input
=============  ===========================================  ======================================
acc_weather    :func:`weather_accuracy`                     predicted / true index arrays [N]
acc_scene      :func:`scene_accuracy`                       predicted / true index arrays [N]
iou_sem        :class:`SemanticIoU` (update / compute)      [H, W] maps per frame, 255 ignored
iou_drivable   :class:`DrivableIoU` (update / compute)      [H, W] maps per frame, 255 ignored
iou_lane       :class:`LaneBoundaryIoU` (update / compute)  [3, H, W] ``decode_lane_mask`` maps
ap_det         :func:`box_ap`                               :class:`InstanceFrame` lists
ap_ins         :func:`mask_ap`                              :class:`InstanceFrame` lists (masks)
ap_pose        :func:`pose_ap`                              :class:`PoseFrame` lists
ap_mot         :func:`mot_metrics` (or :func:`box_ap`)      tracking :class:`InstanceFrame` lists
assa_mot       :func:`mot_metrics` (or :func:`assa`)        … with ``track_ids``, ``video``
ap_mots        :func:`mots_metrics` (or :func:`mask_ap`)    … with ``masks`` too
assa_mots      :func:`mots_metrics` (or :func:`assa`)
iou_flow       :class:`FlowProxyIoU` (update / compute)     flow [H, W, 2] + GT frames t−1, t
=============  ===========================================  ======================================

All values are in ``[0, 100]``. Bad input raises ``VTDInputError``; a metric with nothing to
score (no ground truth) raises :class:`MetricUndefinedError` (a ``VTDInputError``) instead of
returning a number — leave that key out and VTDA lists it as missing.
"""

from __future__ import annotations

from .coco import box_ap, mask_ap, pose_ap
from .containers import InstanceFrame, MetricUndefinedError, PoseFrame
from .flow import FlowProxyIoU, warp_nearest
from .segmentation import (
    ConfusionIoU,
    DrivableIoU,
    LaneBoundaryIoU,
    SemanticIoU,
    boundary_iou,
    count_within,
)
from .tagging import scene_accuracy, tagging_accuracy, weather_accuracy
from .tracking import assa, mot_metrics, mots_metrics

__all__ = [
    "ConfusionIoU", "DrivableIoU", "FlowProxyIoU", "InstanceFrame", "LaneBoundaryIoU",
    "MetricUndefinedError", "PoseFrame", "SemanticIoU", "assa", "boundary_iou", "box_ap",
    "count_within", "mask_ap", "mot_metrics", "mots_metrics", "pose_ap", "scene_accuracy",
    "tagging_accuracy", "warp_nearest", "weather_accuracy",
]
