"""The mean detection score (mDS) of Cityscapes-3D from ``cityscapesscripts`` itself.

:func:`official_mds` runs ``python -m cityscapesscripts.evaluation.evalObjectDetection3d`` in a
subprocess on a ground-truth folder and a prediction folder (:mod:`.box_json`) and reads the
``results.json`` it writes. A subprocess, not an import: the module configures the root logger
at import (``coloredlogs.install``) and writes ``eval.log`` into the working directory, which is
a temporary directory here.

What the script computes (its docstrings; Gählert et al. 2020): predictions and ground truth are
matched per class on 2D boxes at IoU ≥ ``min_iou``; the 2D AP over 50 confidence thresholds;
at the working confidence, the true positives' BEV centre distance, size similarity, yaw and
pitch/roll similarity, each averaged per 5 m bin of the ground truth's BEV distance up to
``max_depth`` and then over the bins that hold true positives (a class with true positives in
only one bin scores 0 there); ``DS = AP · (centre + size + yaw + pitch/roll) / 4`` per class;
mDS the mean over the classes that have ground truth.

Matching: ``modal`` (the visible 2D box, as TaskPrompter's code evaluates:
``detection_toolbox/det_eval.py``, ``MATCHING_MODAL``) or ``amodal`` (the script's command-line
default; the prediction's amodal box is then the projection of its 3D box).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_pipeline.cityscapes3d.format import DET3D_CLASSES


@dataclass(frozen=True, kw_only=True)
class MDSParams:
    """The evaluation's parameters (the script's defaults; ``matching`` TaskPrompter's)."""

    min_iou: float = 0.7
    max_depth: int = 100
    step_size: int = 5
    matching: Literal["modal", "amodal"] = "modal"
    labels: tuple[str, ...] = DET3D_CLASSES

    def __post_init__(self) -> None:
        if self.matching not in ("modal", "amodal"):
            raise ValueError(f"matching: {self.matching!r}, expected 'modal' or 'amodal'")
        bad = [x for x in self.labels if x not in DET3D_CLASSES]
        if bad or not self.labels:
            raise ValueError(f"labels: {list(self.labels)} must be among {list(DET3D_CLASSES)}")


#: The per-parameter means of results.json reported next to mDS (fractions, as the script writes them).
SUMMARY_KEYS = ("mDetection_Score", "mAP", "mCenter_Dist", "mSize_Similarity", "mOS_Yaw", "mOS_Pitch_Roll")


def official_mds(gt_dir: str | Path, pred_dir: str | Path, params: MDSParams = MDSParams(), timeout: float = 600.0) -> dict[str, Any]:
    """Run the official evaluation; returns ``{"mds": percent, "summary": {key: percent}
    (:data:`SUMMARY_KEYS`), "per_class": {label: DS percent}, "gt_counts": {label: n},
    "results": the full results.json}``. ``mds`` is None when no evaluated class has ground
    truth. Raises RuntimeError with the script's output when it fails."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for what, d in (("ground-truth", gt_dir), ("prediction", pred_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder {d} does not exist")
    with tempfile.TemporaryDirectory(prefix="cs3d-eval-") as tmp:
        cmd = [sys.executable, "-m", "cityscapesscripts.evaluation.evalObjectDetection3d",
               "--gt-folder", str(gt_dir.resolve()), "--prediction-folder", str(pred_dir.resolve()),
               "--results-folder", tmp, "--labels", *params.labels, "--min-iou", str(params.min_iou),
               "--max-depth", str(params.max_depth), "--step-size", str(params.step_size), "--noplot"]
        if params.matching == "modal":
            cmd.append("--modal")
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        results_file = Path(tmp) / "results.json"
        if proc.returncode != 0 or not results_file.exists():
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"cityscapesscripts' evalObjectDetection3d failed (exit {proc.returncode}) on {gt_dir} / "
                               f"{pred_dir}:\n{tail}")
        results = json.loads(results_file.read_text())
    gt_counts = {k: int(v) for k, v in results["GT_stats"].items()}
    has_gt = any(gt_counts.values())

    def pct(v: Any) -> float | None:
        return round(100.0 * float(v), 4) if has_gt and v is not None and v == v else None

    return {
        "mds": pct(results["mDetection_Score"]),
        "summary": {k: pct(results.get(k)) for k in SUMMARY_KEYS},
        "per_class": {k: pct(v) for k, v in results["Detection_Score"].items() if gt_counts.get(k)},
        "gt_counts": gt_counts,
        "results": results,
    }
