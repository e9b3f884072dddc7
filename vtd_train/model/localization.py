"""Localization group: RPN, RoI features, box / mask / keypoint decoders and their losses.

Mask R-CNN style (paper §4.1, G.1), built from torchvision's trusted pieces (``RPNHead``,
``AnchorGenerator``, ``Matcher``, ``BalancedPositiveNegativeSampler``, ``BoxCoder``,
``MultiScaleRoIAlign``, ``TwoMLPHead``, ``MaskRCNNHeads``, ``fastrcnn_loss``, ``maskrcnn_loss``,
``heatmaps_to_keypoints``, ``paste_masks_in_image``) with what VTD needs on top:

* crowd / ignored boxes (``FrameTargets.ignore``) are not matched as ground truth, and anchors
  or proposals overlapping them (IoU ≥ ``ignore_iou``) that would otherwise be background are
  not sampled (mmdetection's ``gt_bboxes_ignore``);
* losses run on the labelled samples of a batch only (the caller passes the sample indices);
* keypoints are trained on Gaussian heatmaps with an MSE loss (SimpleBaseline [65]) instead of
  Mask R-CNN's one-hot cross entropy.

Shapes: boxes are ``x1 y1 x2 y2`` in pixels of the (padded) input; ``K = 8`` thing classes, the
box/mask classifiers have ``K + 1`` outputs with 0 = background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    fastrcnn_loss,
    heatmaps_to_keypoints,
    maskrcnn_loss,
)
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, box_iou, boxes as box_ops
from vtd_train.model.schema import NUM_THINGS, BoxHeadConfig, KeypointHeadConfig, MaskHeadConfig, RPNConfig

ROI_LEVELS = ("p2", "p3", "p4", "p5")

# ---------------------------------------------------------------------------------------------
# Typed outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class RPNOutput:
    """``proposals[i] [P_i, 4]`` (detached, sorted by ``scores[i]``), and for the loss the raw
    ``objectness [B, A]``, ``deltas [B, A, 4]`` and ``anchors[i] [A, 4]``."""

    proposals: list[Tensor]
    scores: list[Tensor]
    objectness: Tensor
    deltas: Tensor
    anchors: list[Tensor]


@dataclass
class SampledRoIs:
    """Training RoIs of each image: ``boxes [R, 4]``, ``labels [R]`` (class + 1, 0 = background),
    ``matched [R]`` index of the matched GT box, ``regression [R, 4]`` box-coder targets."""

    boxes: list[Tensor]
    labels: list[Tensor]
    matched: list[Tensor]
    regression: list[Tensor]


@dataclass
class BoxOutput:
    class_logits: Tensor  # [R, K + 1]
    box_deltas: Tensor  # [R, 4 (K + 1)]


@dataclass
class Detections:
    """Per image: ``boxes [N, 4]``, ``scores [N]``, ``classes [N]`` (0..K−1)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor


@dataclass
class BoxTargets:
    """Ground truth of one image for the RPN / box decoder (ignore regions split off)."""

    boxes: Tensor  # [G, 4] non-ignored
    classes: Tensor  # [G]
    ignore_boxes: Tensor  # [I, 4]
    index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [G] into FrameTargets


# ---------------------------------------------------------------------------------------------
# RPN
# ---------------------------------------------------------------------------------------------


class RPN(RegionProposalNetwork):
    """torchvision's RPN split into proposal generation (``forward``) and :class:`RPNLoss`.

    ``forward(images [B, 3, H, W], image_sizes, features {p2..p6}) -> RPNOutput``.
    """

    def __init__(self, cfg: RPNConfig, in_channels: int) -> None:
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (cfg.aspect_ratios,) * len(cfg.anchor_sizes))
        super().__init__(
            anchors,
            RPNHead(in_channels, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=cfg.fg_iou,
            bg_iou_thresh=cfg.bg_iou,
            batch_size_per_image=cfg.batch_size_per_image,
            positive_fraction=cfg.positive_fraction,
            pre_nms_top_n={"training": cfg.pre_nms_top_n_train, "testing": cfg.pre_nms_top_n_test},
            post_nms_top_n={"training": cfg.post_nms_top_n_train, "testing": cfg.post_nms_top_n_test},
            nms_thresh=cfg.nms_thresh,
        )
        self.num_levels = len(cfg.anchor_sizes)

    def forward(  # type: ignore[override]
        self, images: Tensor, image_sizes: list[tuple[int, int]], features: dict[str, Tensor]
    ) -> RPNOutput:
        feats = list(features.values())[: self.num_levels]
        objectness, deltas = self.head(feats)
        anchors = self.anchor_generator(ImageList(images, image_sizes), feats)
        num_images = len(anchors)
        num_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, image_sizes, num_per_level)
        return RPNOutput(
            proposals=boxes,
            scores=scores,
            objectness=objectness.view(num_images, -1),
            deltas=deltas.view(num_images, -1, 4),
            anchors=anchors,
        )


def _ignore_mask(candidates: Tensor, ignore_boxes: Tensor, thresh: float) -> Tensor:
    """``[A]`` bool: candidates whose IoU with any ignore box is ≥ ``thresh``."""
    if ignore_boxes.numel() == 0 or candidates.numel() == 0:
        return torch.zeros(candidates.shape[0], dtype=torch.bool, device=candidates.device)
    return box_iou(candidates, ignore_boxes).max(dim=1).values >= thresh


class RPNLoss(nn.Module):
    """Objectness BCE + box smooth-L1 (β = 1/9) over sampled anchors (torchvision's RPN loss).

    ``forward(out, samples, targets) -> {"cls", "box"}`` over the images ``samples`` (indices
    into the batch) with their :class:`BoxTargets`.
    """

    def __init__(self, cfg: RPNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.matcher = det_utils.Matcher(cfg.fg_iou, cfg.bg_iou, allow_low_quality_matches=True)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def forward(self, out: RPNOutput, samples: list[int], targets: list[BoxTargets]) -> dict[str, Tensor]:
        labels, reg_targets = [], []
        for i, tgt in zip(samples, targets):
            anchors = out.anchors[i]
            if tgt.boxes.numel() == 0:
                lab = torch.zeros(anchors.shape[0], device=anchors.device)
                matched = torch.zeros_like(anchors)
            else:
                idx = self.matcher(box_iou(tgt.boxes, anchors))
                matched = tgt.boxes[idx.clamp(min=0)]
                lab = (idx >= 0).float()
                lab[idx == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1.0
            lab[(lab == 0) & _ignore_mask(anchors, tgt.ignore_boxes, self.cfg.ignore_iou)] = -1.0
            labels.append(lab)
            reg_targets.append(self.coder.encode_single(matched, anchors))
        pos, neg = self.sampler(labels)
        pos_idx = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos_idx, torch.where(torch.cat(neg))[0]])
        objectness = out.objectness[samples].flatten()
        deltas = out.deltas[samples].reshape(-1, 4)
        lab_all = torch.cat(labels)
        box = F.smooth_l1_loss(
            deltas[pos_idx], torch.cat(reg_targets)[pos_idx], beta=1 / 9, reduction="sum"
        ) / max(sampled.numel(), 1)
        cls = F.binary_cross_entropy_with_logits(objectness[sampled], lab_all[sampled])
        return {"cls": cls, "box": box}


# ---------------------------------------------------------------------------------------------
# RoI features and box decoder
# ---------------------------------------------------------------------------------------------


def roi_pooler(size: int) -> MultiScaleRoIAlign:
    """RoIAlign on P2–P5 with the FPN level rule of Mask R-CNN (canonical 224 px at P4)."""
    return MultiScaleRoIAlign(list(ROI_LEVELS), output_size=size, sampling_ratio=2)


def roi_image_index(boxes: list[Tensor]) -> Tensor:
    """``[R]`` image index of each RoI of ``boxes`` (concatenated in order)."""
    if not boxes:
        return torch.zeros(0, dtype=torch.int64)
    device = boxes[0].device
    return torch.cat([torch.full((len(b),), i, dtype=torch.int64, device=device) for i, b in enumerate(boxes)])


class RoISampler:
    """Training RoIs for the box decoder: proposals + GT boxes, IoU matching, 512 per image at
    25 % positives; proposals overlapping ignore regions are not sampled as background."""

    def __init__(self, cfg: BoxHeadConfig) -> None:
        self.cfg = cfg
        self.matcher = det_utils.Matcher(cfg.fg_iou, cfg.bg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(cfg.batch_size_per_image, cfg.positive_fraction)
        self.coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def __call__(self, proposals: list[Tensor], targets: list[BoxTargets]) -> SampledRoIs:
        boxes, labels, matched = [], [], []
        for props, tgt in zip(proposals, targets):
            props = torch.cat([props.detach(), tgt.boxes.to(props.dtype)])
            if tgt.boxes.numel() == 0:
                idx = torch.zeros(len(props), dtype=torch.int64, device=props.device)
                lab = torch.zeros(len(props), dtype=torch.int64, device=props.device)
            else:
                m = self.matcher(box_iou(tgt.boxes, props))
                idx = m.clamp(min=0)
                lab = tgt.classes[idx] + 1
                lab[m == det_utils.Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[m == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
            lab[(lab == 0) & _ignore_mask(props, tgt.ignore_boxes, self.cfg.ignore_iou)] = -1
            boxes.append(props)
            labels.append(lab)
            matched.append(idx)
        pos, neg = self.sampler(labels)
        out = SampledRoIs([], [], [], [])
        for b, lab, idx, p, n, tgt in zip(boxes, labels, matched, pos, neg, targets):
            keep = torch.where(p | n)[0]
            b, lab, idx = b[keep], lab[keep], idx[keep]
            gt = tgt.boxes if tgt.boxes.numel() else b.new_zeros(1, 4)
            out.boxes.append(b)
            out.labels.append(lab)
            out.matched.append(idx)
            out.regression.append(self.coder.encode_single(gt[idx], b))
        return out


class BoxHead(nn.Module):
    """``forward(roi_feats [R, C, 7, 7]) -> BoxOutput`` (two FC layers + class / box predictors)."""

    def __init__(self, cfg: BoxHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = TwoMLPHead(in_channels * cfg.roi_size**2, cfg.representation)
        self.predictor = FastRCNNPredictor(cfg.representation, cfg.num_classes + 1)
        # detectron2's FastRCNNOutputLayers init: near-uniform class scores, near-zero deltas
        # (torchvision's default Linear init starts the classifier confidently wrong: a first
        # loss of 6.2 instead of ln 9 · λ = 4.4 on the tiny model)
        nn.init.normal_(self.predictor.cls_score.weight, std=0.01)
        nn.init.normal_(self.predictor.bbox_pred.weight, std=0.001)
        for layer in (self.predictor.cls_score, self.predictor.bbox_pred):
            nn.init.zeros_(layer.bias)
        self.coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def forward(self, roi_feats: Tensor) -> BoxOutput:
        logits, deltas = self.predictor(self.fc(roi_feats))
        return BoxOutput(class_logits=logits, box_deltas=deltas)

    def postprocess(self, out: BoxOutput, rois: list[Tensor], image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Decode, drop background, score threshold, per-class NMS, keep the top detections."""
        cfg = self.cfg
        counts = [len(r) for r in rois]
        boxes_all = self.coder.decode(out.box_deltas.float(), rois)  # [R, K + 1, 4]
        scores_all = F.softmax(out.class_logits.float(), -1)
        dets = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = box_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
            k = scores.shape[1] - 1
            classes = torch.arange(k, device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > cfg.score_thresh)[0]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            keep = box_ops.remove_small_boxes(boxes, 1e-2)
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            keep = box_ops.batched_nms(boxes, scores, classes, cfg.nms_thresh)[: cfg.detections_per_img]
            dets.append(Detections(boxes=boxes[keep], scores=scores[keep], classes=classes[keep]))
        return dets


class BoxLoss(nn.Module):
    """Cross entropy over ``K + 1`` classes + smooth-L1 (β = 1/9) box regression on positives
    (torchvision's ``fastrcnn_loss``). ``forward(out, labels [R], regression [R, 4]) -> {"cls", "box"}``."""

    def forward(self, out: BoxOutput, labels: Tensor, regression: Tensor) -> dict[str, Tensor]:
        cls, box = fastrcnn_loss(out.class_logits.float(), out.box_deltas.float(), [labels], [regression])
        return {"cls": cls, "box": box}


# ---------------------------------------------------------------------------------------------
# Mask decoder
# ---------------------------------------------------------------------------------------------


class MaskHead(nn.Module):
    """``forward(roi_feats [R, C, 14, 14]) -> [R, K + 1, 28, 28]`` mask logits (Mask R-CNN)."""

    def __init__(self, cfg: MaskHeadConfig, in_channels: int, num_classes: int = NUM_THINGS) -> None:
        super().__init__()
        self.cfg = cfg
        self.convs = MaskRCNNHeads(in_channels, [cfg.channels] * cfg.num_convs, dilation=1)
        c = cfg.channels if cfg.num_convs else in_channels
        self.predictor = MaskRCNNPredictor(c, cfg.channels, num_classes + 1)

    def forward(self, roi_feats: Tensor) -> Tensor:
        return self.predictor(self.convs(roi_feats))


class MaskLoss(nn.Module):
    """Per-pixel BCE of the GT class's mask on positive RoIs (torchvision's ``maskrcnn_loss``).

    ``forward(logits [R, K+1, M, M], rois: list[[R_i, 4]], gt_masks: list[[G_i, H, W]],
    gt_labels: list[[G_i]] (class + 1), matched: list[[R_i]]) -> {"mask"}``.
    """

    def forward(
        self, logits: Tensor, rois: list[Tensor], gt_masks: list[Tensor], gt_labels: list[Tensor], matched: list[Tensor]
    ) -> dict[str, Tensor]:
        masks = [m.to(logits.dtype if logits.is_floating_point() else torch.float32) for m in gt_masks]
        return {"mask": maskrcnn_loss(logits.float(), rois, masks, gt_labels, matched)}


# ---------------------------------------------------------------------------------------------
# Keypoint decoder
# ---------------------------------------------------------------------------------------------


class KeypointHead(nn.Module):
    """``forward(roi_feats [R, C, 14, 14]) -> heatmaps [R, J, 28, 28]``."""

    def __init__(self, cfg: KeypointHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(cfg.num_convs):
            layers += [nn.Conv2d(c, cfg.channels, 3, padding=1), nn.ReLU(inplace=True)]
            c = cfg.channels
        layers += [nn.ConvTranspose2d(c, cfg.channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(cfg.channels, cfg.num_joints, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.out.weight, std=0.001)

    def forward(self, roi_feats: Tensor) -> Tensor:
        return self.out(self.body(roi_feats))

    @staticmethod
    def decode(heatmaps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """``→ keypoints [R, J, 3]`` (x, y, score) in image pixels and ``scores [R, J]``."""
        if rois.numel() == 0:
            j = heatmaps.shape[1]
            return heatmaps.new_zeros(0, j, 3), heatmaps.new_zeros(0, j)
        xy, scores = heatmaps_to_keypoints(heatmaps.float(), rois.float())
        xy = xy.clone()
        xy[..., 2] = scores
        return xy, scores


def gaussian_heatmaps(keypoints: Tensor, rois: Tensor, size: int, sigma: float) -> tuple[Tensor, Tensor]:
    """Gaussian heatmap targets of ``keypoints [R, J, 3]`` (x, y, v) inside ``rois [R, 4]``.

    Heatmap pixel (i, j) has its centre at ``(j + 0.5, i + 0.5)`` in heatmap units, and a
    keypoint maps to ``u = (x − x1) / (x2 − x1) · size``. Returns ``targets [R, J, size, size]``
    and ``weights [R, J]`` (1 for a labelled joint, ``v > 0``, inside its RoI, else 0).
    """
    x1, y1, x2, y2 = rois.unbind(-1)
    w = (x2 - x1).clamp(min=1e-3)[:, None]
    h = (y2 - y1).clamp(min=1e-3)[:, None]
    u = (keypoints[..., 0] - x1[:, None]) / w * size
    v = (keypoints[..., 1] - y1[:, None]) / h * size
    valid = (keypoints[..., 2] > 0) & (u >= 0) & (u < size) & (v >= 0) & (v < size)
    grid = torch.arange(size, device=rois.device, dtype=torch.float32) + 0.5
    gx = (grid[None, None, :] - u[..., None]) ** 2  # [R, J, size]
    gy = (grid[None, None, :] - v[..., None]) ** 2
    targets = torch.exp(-(gy[..., :, None] + gx[..., None, :]) / (2 * sigma**2))
    weights = valid.to(torch.float32)
    return targets * weights[..., None, None], weights


class KeypointLoss(nn.Module):
    """Heatmap MSE: ``mean over RoIs, joints and pixels of w_j · (pred − target)²``.

    Unlabelled joints (``w_j = 0``) contribute zero but stay in the mean (mmpose's
    ``KeypointMSELoss(use_target_weight=True)``), which is why the paper weighs pose by 800.
    ``forward(heatmaps [R, J, S, S], targets [R, J, S, S], weights [R, J]) -> {"heatmap"}``.
    """

    def forward(self, heatmaps: Tensor, targets: Tensor, weights: Tensor) -> dict[str, Tensor]:
        if heatmaps.numel() == 0:
            return {"heatmap": heatmaps.sum() * 0.0}
        err = (heatmaps.float() - targets) ** 2 * weights[..., None, None]
        return {"heatmap": err.mean()}


class KeypointSampler:
    """Training RoIs of the pose decoder: proposals + GT pose boxes matched to the pose boxes at
    IoU ≥ ``fg_iou``; positives only, at most ``rois_per_image`` per image."""

    def __init__(self, cfg: KeypointHeadConfig) -> None:
        self.cfg = cfg
        self.matcher = det_utils.Matcher(cfg.fg_iou, cfg.fg_iou, allow_low_quality_matches=False)

    def __call__(self, proposals: Tensor, pose_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """``→ rois [R, 4]``, ``matched [R]`` (index into the pose instances)."""
        if pose_boxes.numel() == 0:
            return proposals.new_zeros(0, 4), torch.zeros(0, dtype=torch.int64, device=proposals.device)
        cand = torch.cat([proposals.detach(), pose_boxes.to(proposals.dtype)])
        m = self.matcher(box_iou(pose_boxes.to(cand.dtype), cand))
        pos = torch.where(m >= 0)[0]
        if len(pos) > self.cfg.rois_per_image:
            pos = pos[torch.randperm(len(pos), device=pos.device)[: self.cfg.rois_per_image]]
        return cand[pos], m[pos]
