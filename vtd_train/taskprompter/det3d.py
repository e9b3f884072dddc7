"""FCOS3D targets, losses and decoding (Wang et al. 2021, as TaskPrompter's public code sets them).

Coordinates are pixels of the model's input image (``image_size``); level ``l`` has stride
``strides[l] / input_scale`` there and points at the centres of its cells.

* **Assignment.** A point is a candidate for a ground-truth box when it lies inside the box's
  2D (modal) box, within ``center_sample_radius × stride`` of its projected 3D centre (centre
  sampling) and its largest distance to the 2D box's sides is within the level's regress range;
  among candidates the box whose projected centre is nearest wins (FCOS3D's rule; FCOS uses the
  smallest area).
* **Targets** per positive point: offset to the projected centre / stride, depth (S-frame z, m),
  size (l, w, h, m), the S-frame Euler angles (yaw, pitch, roll), 2D box side distances / stride,
  direction bin per angle (``floor(angle mod 2π / π)``), centerness ``exp(−α·‖offset‖ / (√2·stride))``.
* **Losses** (named ``loss/det3d/*``): sigmoid focal loss (α 0.25, γ 2; torchvision) over all
  points / (positives + images) × ``cls_loss_weight``; smooth L1 (β 1/9) of offset, depth, size,
  rotation (on ``sin(a − b)``, via ``sin a cos b`` vs ``cos a sin b``) and 2D box, weighted by
  ``code_weight`` and averaged over positives; cross entropy of the direction bins; binary cross
  entropy of centerness.
* **Decoding**: score = σ(class) · σ(centerness), the ``nms_pre`` best above ``score_thr``, angles
  ``(a mod π) + π · bin``, class-wise NMS (torchvision ``batched_nms``) at ``nms_thr`` on the
  predicted 2D boxes (the public code uses a rotated bird's-eye-view NMS, which torchvision does
  not have), at most ``max_per_img``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, sigmoid_focal_loss

from .heads import REG_DIM, Det3DLevel


@dataclass
class Det3DTargets:
    """Ground truth of one image (``N`` boxes): ``classes [N]`` int64, ``boxes2d [N, 4]`` modal
    ``x1, y1, x2, y2``, ``centers2d [N, 2]`` projected 3D centres, ``depths [N]`` (m),
    ``dims [N, 3]`` (l, w, h), ``euler [N, 3]`` S-frame (yaw, pitch, roll)."""

    classes: Tensor
    boxes2d: Tensor
    centers2d: Tensor
    depths: Tensor
    dims: Tensor
    euler: Tensor


@dataclass
class Det3DPrediction:
    """Detections of one image (``M`` boxes), in input-image pixels: ``boxes2d [M, 4]``,
    ``scores [M]``, ``classes [M]``, ``centers2d [M, 2]``, ``depths [M]``, ``dims [M, 3]``,
    ``euler [M, 3]``."""

    boxes2d: Tensor
    scores: Tensor
    classes: Tensor
    centers2d: Tensor
    depths: Tensor
    dims: Tensor
    euler: Tensor


def limit_period(x: Tensor, offset: float, period: float) -> Tensor:
    return x - torch.floor(x / period + offset) * period


def level_points(levels: list[Det3DLevel], strides: list[float]) -> list[Tensor]:
    """``[h·w, 2]`` cell-centre points (x, y) of each level, row-major."""
    out = []
    for lv, s in zip(levels, strides):
        h, w = lv.cls.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        out.append(torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], dim=1).to(lv.cls.device))
    return out


def assign(points: list[Tensor], strides: list[float], gt: Det3DTargets, cfg, num_classes: int):
    """One image → (labels ``[P]`` (``num_classes`` = background), reg targets ``[P, 13]``,
    centerness targets ``[P]``) over all levels' points."""
    pts = torch.cat(points)
    stride = torch.cat([torch.full((len(p),), s, device=pts.device) for p, s in zip(points, strides)])
    lo = torch.cat([torch.full((len(p),), float(r[0]), device=pts.device) for p, r in zip(points, cfg.regress_ranges)])
    hi = torch.cat([torch.full((len(p),), float(r[1]), device=pts.device) for p, r in zip(points, cfg.regress_ranges)])
    n_pts, n_gt = len(pts), len(gt.classes)
    labels = torch.full((n_pts,), num_classes, dtype=torch.long, device=pts.device)
    reg = torch.zeros(n_pts, REG_DIM, device=pts.device)
    ctr = torch.zeros(n_pts, device=pts.device)
    if n_gt == 0:
        return labels, reg, ctr
    px, py = pts[:, :1], pts[:, 1:]
    x1, y1, x2, y2 = gt.boxes2d.T
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=-1)  # [P, N, 4]
    cx, cy = gt.centers2d[:, 0], gt.centers2d[:, 1]
    rad = cfg.center_sample_radius * stride[:, None]
    in_center = (px > torch.maximum(cx - rad, x1)) & (px < torch.minimum(cx + rad, x2)) & \
                (py > torch.maximum(cy - rad, y1)) & (py < torch.minimum(cy + rad, y2))
    reach = ltrb.max(dim=-1).values
    in_range = (reach >= lo[:, None]) & (reach <= hi[:, None])
    offset = torch.stack([cx - px, cy - py], dim=-1)  # [P, N, 2]
    dist = offset.norm(dim=-1)
    dist = torch.where(in_center & in_range, dist, torch.full_like(dist, math.inf))
    best, idx = dist.min(dim=1)
    pos = torch.isfinite(best)
    j = idx[pos]
    s = stride[pos][:, None]
    labels[pos] = gt.classes[j]
    reg[pos] = torch.cat([offset[pos, j] / s, gt.depths[j, None], gt.dims[j], gt.euler[j], ltrb[pos, j] / s], dim=1)
    ctr[pos] = torch.exp(-cfg.centerness_alpha * best[pos] / (math.sqrt(2) * stride[pos]))
    return labels, reg, ctr


def _flat(levels: list[Det3DLevel], name: str) -> Tensor:
    """``[B, P, C]`` of one output over all levels."""
    return torch.cat([getattr(lv, name).flatten(2).transpose(1, 2) for lv in levels], dim=1)


def det3d_losses(levels: list[Det3DLevel], targets: list[Det3DTargets], strides: list[float], cfg) -> dict[str, Tensor]:
    """The FCOS3D losses of a batch as ``{"loss/det3d/cls": ..., ...}`` (unweighted by the task
    weight; every term present even without positives, as a zero that keeps the graph)."""
    points = level_points(levels, strides)
    k = levels[0].cls.shape[1]
    assigned = [assign(points, strides, t, cfg, k) for t in targets]
    labels = torch.stack([a[0] for a in assigned]).reshape(-1)
    reg_t = torch.stack([a[1] for a in assigned]).reshape(-1, REG_DIM)
    ctr_t = torch.stack([a[2] for a in assigned]).reshape(-1)
    cls, reg, dirs, ctr = (_flat(levels, n) for n in ("cls", "reg", "dir", "ctr"))
    cls, reg, dirs, ctr = cls.reshape(-1, k), reg.reshape(-1, REG_DIM), dirs.reshape(-1, 6), ctr.reshape(-1)
    pos = labels < k
    n_pos = int(pos.sum())
    onehot = F.one_hot(labels, k + 1)[:, :k].to(cls.dtype)
    out = {"loss/det3d/cls": cfg.cls_loss_weight * sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="sum")
           / (n_pos + len(targets))}
    zero = reg.sum() * 0 + dirs.sum() * 0 + ctr.sum() * 0
    names = (("offset", 0, 2), ("depth", 2, 3), ("size", 3, 6), ("rot", 6, 9), ("box2d", 9, 13))
    if n_pos == 0:
        out.update({f"loss/det3d/{n}": zero for n, _, _ in names} | {"loss/det3d/dir": zero, "loss/det3d/ctr": zero})
        return out
    p, t = reg[pos], reg_t[pos]
    p = torch.cat([p[:, :6], torch.sin(p[:, 6:9]) * torch.cos(t[:, 6:9]), p[:, 9:]], dim=1)
    t = torch.cat([t[:, :6], torch.cos(reg[pos][:, 6:9]) * torch.sin(t[:, 6:9]), t[:, 9:]], dim=1)
    w = torch.tensor(cfg.code_weight, device=reg.device)
    l1 = F.smooth_l1_loss(p, t, beta=cfg.smooth_l1_beta, reduction="none") * w
    for n, a, b in names:
        out[f"loss/det3d/{n}"] = l1[:, a:b].sum() / n_pos
    bins = torch.floor(limit_period(reg_t[pos][:, 6:9], 0.0, 2 * math.pi) / math.pi).clamp(0, 1).long()
    out["loss/det3d/dir"] = sum(F.cross_entropy(dirs[pos][:, 2 * i:2 * i + 2], bins[:, i]) for i in range(3))
    out["loss/det3d/ctr"] = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t[pos])
    return out


@torch.no_grad()
def decode(levels: list[Det3DLevel], strides: list[float], cfg) -> list[Det3DPrediction]:
    points = torch.cat(level_points(levels, strides))
    stride = torch.cat([torch.full((lv.cls.shape[-2] * lv.cls.shape[-1],), s, device=points.device)
                        for lv, s in zip(levels, strides)])
    cls, reg, dirs, ctr = (_flat(levels, n) for n in ("cls", "reg", "dir", "ctr"))
    k = cls.shape[-1]
    out = []
    for b in range(cls.shape[0]):
        scores = (cls[b].sigmoid() * ctr[b].sigmoid()).reshape(-1)  # [P·K]
        keep = torch.nonzero(scores > cfg.score_thr).squeeze(1)
        keep = keep[scores[keep].topk(min(cfg.nms_pre, len(keep))).indices]
        pt, c = keep // k, keep % k
        r, s, p = reg[b][pt], stride[pt][:, None], points[pt]
        angles = limit_period(r[:, 6:9], 0.0, math.pi) + math.pi * dirs[b][pt].view(-1, 3, 2).argmax(-1)
        boxes = torch.cat([p - r[:, 9:11] * s, p + r[:, 11:13] * s], dim=1)
        nms = batched_nms(boxes, scores[keep], c, cfg.nms_thr)[: cfg.max_per_img]
        out.append(Det3DPrediction(boxes2d=boxes[nms], scores=scores[keep][nms], classes=c[nms],
                                   centers2d=(p + r[:, 0:2] * s)[nms], depths=r[nms, 2], dims=r[nms, 3:6], euler=angles[nms]))
    return out
