"""``vtd evaluate`` of a TaskPrompter checkpoint: mIoU, depth RMSE and mDS on Cityscapes-3D shards.

Data flow::

    manifest (benchmark cityscapes3d) → frames of the split (decode.py), in manifest order
      → batches resized to the model's input size (taskprompter/batch.py) → model (eval mode)
      → per frame, at the stored resolution:
          sem: logits upsampled (bilinear) → argmax → confusion histogram    (segmentation.SemanticIoU)
          depth: upsampled (bilinear) → squared errors over 0 < depth < 80 m, pooled over the split
          det3d: decoded boxes (NMS 0.3) → {frame}_pred.json, ground truth → {frame}_gtBbox3d.json
                 (box_json.py) → cityscapesscripts' evalObjectDetection3d (mds.py)
      → metrics.json {"miou", "rmse_depth", "mds"}, report.md (against the paper's table),
        eval_info.json, the official results.json under det3d/

The depth protocol is TaskPrompter's code (``evaluation/eval_depth.py`` with ``depth_max`` 80,
``depth_min`` 0 from ``utils/config.py``): metres from the disparity maps, every valid pixel of the
split in one RMSE. The report's table (Ye & Xu, Cityscapes-3D report, Table 1) does not name the
unit of its RMSE; the public code's is metres. Evaluation is at the stored resolution (the
paper's 1024×2048), whatever size the model takes its input at.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline import fsio
from data_pipeline.cityscapes3d.decode import iter_cityscapes_frames
from data_pipeline.errors import VTDInputError

from ..segmentation import SemanticIoU
from .box_json import write_frame
from .mds import MDSParams, official_mds

#: Depths scored (m): TaskPrompter's evaluation range.
DEPTH_RANGE: Final = (0.0, 80.0)
#: The metrics of a Cityscapes-3D evaluation, in report order.
METRIC_KEYS: Final = ("mds", "miou", "rmse_depth")
#: Ye & Xu, "Joint 2D-3D multi-task learning on Cityscapes-3D" (TaskPrompter report), Table 1.
PAPER_ROWS: Final = {
    "TaskPrompter (paper, Swin-B)": {"mds": 32.94, "miou": 77.72, "rmse_depth": 6.78},
    "Multi-task baseline (paper, Swin-B)": {"mds": 29.69, "miou": 76.90, "rmse_depth": 7.00},
}
METRIC_LABELS: Final = {"mds": "3D det mDS ↑", "miou": "Semseg mIoU ↑", "rmse_depth": "Depth RMSE ↓"}
#: Metrics where lower is better (the others: higher).
LOWER_IS_BETTER: Final = frozenset({"rmse_depth"})


class DepthRMSE:
    """Squared depth errors pooled over every valid pixel (``lo < gt < hi``) of the split."""

    def __init__(self, lo: float = DEPTH_RANGE[0], hi: float = DEPTH_RANGE[1]):
        self.lo, self.hi = lo, hi
        self.sq, self.n = 0.0, 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = (gt > self.lo) & (gt < self.hi)
        d = pred[valid].astype(np.float64) - gt[valid]
        self.sq += float((d * d).sum())
        self.n += int(valid.sum())

    def compute(self) -> float | None:
        return math.sqrt(self.sq / self.n) if self.n else None


@torch.no_grad()
def evaluate_taskprompter(checkpoint: str | None = None, data: str | None = None, *, model: Any = None, split: str = "val",
                          out_dir: str | Path | None = None, batch_size: int = 2, params: MDSParams = MDSParams(),
                          max_frames: int | None = None) -> dict[str, Any]:
    """Score a TaskPrompter (``checkpoint`` URI or a built ``model``, left in the mode it came in)
    on the ``split`` frames of the Cityscapes-3D shards ``data``. Returns ``{"metrics": {miou,
    rmse_depth, mds} (the tasks the model and the labels have), "missing": {key: reason}, "mds":
    the official evaluation's summary, "info": run facts}``; with ``out_dir`` also writes
    ``metrics.json``, ``report.md``, ``eval_info.json`` and ``det3d/`` (the prediction and ground
    truth files, ``results.json``)."""
    from vtd_train.taskprompter.batch import collate

    t_start = time.perf_counter()
    if model is None:
        if checkpoint is None:
            raise VTDInputError("give a checkpoint or a model")
        from vtd_train.checkpoint import load_model

        model, _, _ = load_model(checkpoint, family="taskprompter")
        model.eval()
    if data is None:
        raise VTDInputError("data: the Cityscapes-3D shard root (`vtd data convert --format cityscapes3d` output)")
    cfg = model.cfg
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sem_iou, rmse = SemanticIoU(), DepthRMSE()
    counts = {"frames": 0, "sem": 0, "depth": 0, "det3d": 0}
    own_tmp = tempfile.TemporaryDirectory(prefix="cs3d-eval-") if out_dir is None else None
    det_root = Path(own_tmp.name if own_tmp else out_dir) / "det3d"
    try:
        frames_iter = iter_cityscapes_frames(data, split)
        if max_frames is not None:
            frames_iter = itertools.islice(frames_iter, max_frames)
        for frames in _batched(frames_iter, batch_size):
            images = torch.cat([collate([f], (), tuple(cfg.image_size))[0] for f in frames]).to(device)
            out = model(images)
            dets = model.detect(out) if out.det3d is not None else None
            h_in, w_in = cfg.image_size
            for k, f in enumerate(frames):
                counts["frames"] += 1
                h, w = f.image.shape[:2]
                if out.sem is not None and f.sem is not None:
                    logits = F.interpolate(out.sem[k:k + 1].float(), (h, w), mode="bilinear", align_corners=False)
                    sem_iou.update(logits.argmax(1)[0].cpu().numpy().astype(np.uint8), f.sem)
                    counts["sem"] += 1
                if out.depth is not None and f.depth is not None:
                    d = F.interpolate(out.depth[k:k + 1, None].float(), (h, w), mode="bilinear", align_corners=False)
                    rmse.update(d[0, 0].cpu().numpy(), f.depth)
                    counts["depth"] += 1
                if dets is not None and "det3d" in f.record["tasks"]:
                    write_frame(det_root / "gt", det_root / "pred", f.record, dets[k], pixel_scale=(w / w_in, h / h_in))
                    counts["det3d"] += 1
        t_infer = time.perf_counter() - t_start
        metrics, missing, mds = {}, {}, None
        if counts["sem"]:
            metrics["miou"] = round(float(sem_iou.compute()), 4)
        else:
            missing["miou"] = "no semantic labels" if out_has(model, "sem") else "the model has no sem head"
        r = rmse.compute()
        if r is not None:
            metrics["rmse_depth"] = round(r, 4)
        else:
            missing["rmse_depth"] = "no valid depth pixels" if out_has(model, "depth") else "the model has no depth head"
        if counts["det3d"]:
            mds = official_mds(det_root / "gt", det_root / "pred", params)
            if mds["mds"] is not None:
                metrics["mds"] = mds["mds"]
            else:
                missing["mds"] = "no ground-truth box of an evaluated class"
            if out_dir is not None:
                (det_root / "results.json").write_text(json.dumps(mds["results"], indent=2))
        else:
            missing["mds"] = "no 3D box labels" if out_has(model, "det3d") else "the model has no det3d head"
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
        model.train(was_training)
    if counts["frames"] == 0:
        raise VTDInputError(f"{data} ({split}): no frames to evaluate")
    info = {"checkpoint": str(checkpoint) if checkpoint else f"<in-memory {type(model).__name__}>", "data": str(data),
            "split": split, "model_tasks": list(cfg.tasks), "input_size": list(cfg.image_size), "labelled": counts,
            "depth_range_m": list(DEPTH_RANGE), "mds_params": {"min_iou": params.min_iou, "matching": params.matching,
                                                                "max_depth": params.max_depth, "step_size": params.step_size},
            "seconds": {"inference": round(t_infer, 3), "total": round(time.perf_counter() - t_start, 3)}}
    result = {"metrics": metrics, "missing": missing, "mds": None if mds is None else {k: mds[k] for k in ("summary", "per_class", "gt_counts")},
              "info": info}
    if out_dir is not None:
        out = Path(out_dir)
        fsio.write_json_atomic(str(out / "metrics.json"), {**metrics, "missing": missing})
        fsio.write_json_atomic(str(out / "eval_info.json"), {**info, "mds_detail": result["mds"]})
        (out / "report.md").write_text(report_markdown(metrics, missing, info, result["mds"]))
    return result


def _batched(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while batch := list(itertools.islice(it, n)):
        yield batch


def out_has(model: Any, task: str) -> bool:
    return task in model.cfg.tasks


def report_markdown(metrics: dict[str, float], missing: dict[str, str], info: dict[str, Any], mds: dict | None) -> str:
    """The report: this run's metrics next to the paper's Table 1 rows."""
    def cell(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    lines = [f"# Cityscapes-3D evaluation: {info['checkpoint']} on {info['split']}", "",
             f"{info['labelled']['frames']} frames of {info['data']}; model input {info['input_size'][0]}×{info['input_size'][1]}, "
             "scored at the stored resolution.", "",
             "| model | " + " | ".join(METRIC_LABELS[k] for k in METRIC_KEYS) + " |",
             "|---|" + "---:|" * len(METRIC_KEYS)]
    lines.append("| **this run** | " + " | ".join(cell(metrics.get(k)) for k in METRIC_KEYS) + " |")
    for name, row in PAPER_ROWS.items():
        lines.append(f"| {name} | " + " | ".join(cell(row[k]) for k in METRIC_KEYS) + " |")
    lines += ["", "Notes:", "",
              f"- mDS: cityscapesscripts' `evalObjectDetection3d` ({info['mds_params']['matching']} 2D matching at IoU "
              f"{info['mds_params']['min_iou']}, {info['mds_params']['step_size']} m bins to {info['mds_params']['max_depth']} m); "
              "the paper used the official script with its code's modal matching.",
              f"- Depth RMSE in metres over pixels with {DEPTH_RANGE[0]:g} < depth < {DEPTH_RANGE[1]:g} m, pooled over the split "
              "(TaskPrompter's evaluation code). The paper's table does not state the unit; its code regresses and scores metres "
              "(depth = baseline·fx / disparity), so the comparison assumes metres — a disparity RMSE would not be comparable.",
              "- The paper's rows are a Swin-B model trained 40K iterations on the 2,975 real training images; a tiny model "
              "on synthetic scenes is not comparable in value, only in form."]
    if mds:
        s = mds["summary"]
        lines += ["", "mDS components (%): " + ", ".join(f"{k} {cell(v)}" for k, v in s.items()),
                  "Per class DS (%): " + ", ".join(f"{k} {cell(v)}" for k, v in mds["per_class"].items())]
    if missing:
        lines += ["", "Missing: " + "; ".join(f"{k}: {v}" for k, v in missing.items())]
    return "\n".join(lines) + "\n"


def evaluate_command(args: Any) -> int:
    """``vtd evaluate`` of a TaskPrompter checkpoint: metrics.json and report.md under ``--out``."""
    r = evaluate_taskprompter(args.checkpoint, args.data, split=args.split, out_dir=args.out)
    info = r["info"]
    print(f"evaluated {info['checkpoint']} on {info['data']} ({info['split']}): {info['labelled']['frames']} frames, "
          f"{info['seconds']['total']:.1f} s")
    paper = PAPER_ROWS["TaskPrompter (paper, Swin-B)"]
    for k in METRIC_KEYS:
        v = r["metrics"].get(k)
        shown = f"{v:6.2f}" if v is not None else f"     — ({r['missing'].get(k)})"
        print(f"  {METRIC_LABELS[k]:<15} {shown}   (paper TaskPrompter {paper[k]:.2f})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
