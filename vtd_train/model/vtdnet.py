"""VTDNet: one network for the ten VTD tasks (paper §4, Fig. 3) and its baselines.

``VTDNet.forward(batch)`` is the training step: it returns the flat dict of *weighted* loss
terms ``{"loss/<task>/<term>": λ · L}`` (see :mod:`vtd_train.model.losses`; sum them with
:func:`~vtd_train.model.losses.total_loss`). ``VTDNet.predict(batch)`` is inference: one typed
:class:`~vtd_train.model.outputs.FramePrediction` per frame. The stateful tracker (MOT/MOTS
association) lives outside the module in :mod:`vtd_train.tracker`.

Data flow (``forward`` reads in this order):

1. normalise the uint8 images (ImageNet mean/std) → base network ``{c2..c5}`` → FPN ``{p2..p6}``;
2. classification: tagging decoder on C5;
3. segmentation and localization groups: RPN proposals; pixel aggregation; with interaction
   blocks the two Intra-IBs, then the Cross-IBs in both directions (the localization → segmentation
   direction uses the top ``num_context_objects`` RPN proposals of each image as its objects);
   the seg decoders; the box decoder on sampled RoIs, the mask decoder on positive RoIs, the
   keypoint decoder on RoIs matched to the pose boxes;
4. association (key + reference frame of the tracking set): flow decoder on P2/P3, QDTrack
   embedding head on P2–P5 with the RPN proposals of both frames.

A decoder runs only when its task is labelled for at least one sample of the batch, and its loss
covers only the labelled samples; so decoders of absent tasks receive no gradient (``grad is
None``; use DDP with ``find_unused_parameters=True``). The box decoder (and RPN) learn from every
frame that carries boxes (det, ins, mot, mots labels) — that is how Mask R-CNN / QDTrack train.
Pseudo labels are used exactly like real ones.

Variants, from the same code (:meth:`VTDNetConfig.variant`): ``vtdnet`` (interaction blocks,
lightened decoders), ``mt`` (the multi-task baseline: no interaction blocks, full decoders, each
segmentation decoder with its own pixel aggregation) and ``single:TASK`` (one decoder, plus the
decoders it builds on, and the shared extractor). The task set is data: a model is built for any
subset of ``TASKS`` and only those decoders exist.

Choices where the paper leaves room (see also the docstrings of the building blocks):

* Pixel aggregation sums *every* FPN level (P2–P6, Semantic-FPN upsampling stages); baselines give
  each segmentation decoder its own aggregator (a classifier on top), VTDNet shares one per group
  and gives each decoder one DCN block instead — that is the "lightening" of the segmentation
  decoders. The localization decoders are lightened by one conv each (mask and keypoint heads
  3 instead of 4 convs); the box decoder keeps its two FC layers.
* Intra-IB token widths: C' = 32 per task (T·C' = 96, Swin-T's stage-1 width, at stride 4) for
  segmentation and C' = 32 per task for the localization group's RoI cells; each decoder reads its
  own C' slice, projected back to the input width and added to the input (residual), so the
  decoders have the same input in every variant. Cross-IB width C'' = 128, 4 heads.
* Cross-IB localization → segmentation needs objects for frames that have no box labels (and at
  test time before detection): the top ``num_context_objects`` RPN proposals of each image.
  Cross-IB segmentation → localization is applied to every RoI set a localization decoder sees.
* Keypoints: 4 (VTDNet 3) 3×3 convs + a 4×4 stride-2 deconvolution (SimpleBaseline) on 14×14 RoI
  features → 28×28 Gaussian heatmaps (σ = 1.5), trained on RoIs matched to the pose boxes;
  predicted for pedestrian and rider detections.
* Loss names follow the labels that produced them (box terms on tracking frames are
  ``loss/mot/{cls,box}`` weighted by Table 11's localization-MOT weight; MOTS masks use λ_I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from data_pipeline.bdd100k.format import decode_lane_mask
from data_pipeline.loading.structures import Batch, FrameTargets
from vtd_train.model.backbone import ImageNormalizer, build_backbone
from vtd_train.model.classification import TaggingDecoder, TaggingLoss, tag_targets
from vtd_train.model.flow import FlowDecoder, FlowLoss, upsample_flow
from vtd_train.model.fpn import FPN
from vtd_train.model.interaction import (
    IntraIB,
    ObjectsFromPixels,
    PixelsFromObjects,
)
from vtd_train.model.localization import (
    ROI_LEVELS,
    BoxHead,
    BoxLoss,
    BoxOutput,
    BoxTargets,
    Detections,
    KeypointHead,
    KeypointLoss,
    KeypointSampler,
    MaskHead,
    MaskLoss,
    RoISampler,
    RPN,
    RPNLoss,
    RPNOutput,
    gaussian_heatmaps,
    roi_image_index,
    roi_pooler,
)
from vtd_train.model.outputs import FramePrediction
from vtd_train.model.segmentation import (
    SEG_OUTPUTS,
    SEG_TERMS,
    PixelAggregator,
    SegDecoder,
    SegLogits,
    SegLoss,
    stack_label_maps,
)
from vtd_train.model.track_head import QDTrackHead, QDTrackLoss
from vtd_train.model.schema import VTDNetConfig

SEG_TASKS = ("sem", "drivable", "lane")
#: Decoders on RoI features: the localization group of the Intra-IB.
LOC_TASKS = ("det", "ins", "pose")
#: Tasks whose labels carry boxes: they train the RPN and the box decoder. The box-decoder terms
#: of a frame are named after the first of these it is labelled for (``mots`` frames → ``mot``).
BOX_TASKS = ("det", "ins", "mot", "mots")
# ---------------------------------------------------------------------------------------------
# Internal containers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Groups:
    """Shared features of the segmentation and localization groups for one image batch."""

    image_shapes: list[tuple[int, int]]  # padded size, once per image (RoI level mapping)
    rpn: RPNOutput | None = None
    pixels: Tensor | None = None  # shared aggregated pixel features A (with interaction)
    seg_hat: Tensor | None = None  # F̂_seg after Intra-IB and Cross-IB
    pixel_tokens: Tensor | None = None  # pooled Intra-IB pixel features, keys of objects → pixels


def _check_prepared(batch: Batch) -> None:
    if not batch.padded or (batch.augment is not None and not batch.augment.applied):
        raise ValueError("batch is not prepared (augmentation plan applied, images padded): "
                         "call data_pipeline.loading.transforms.prepare_batch(batch) on the device first")


def _box_targets(t: FrameTargets, device: torch.device) -> BoxTargets:
    """Split a frame's boxes into matchable ground truth and ignore regions."""
    if t.boxes is None or t.boxes.shape[0] == 0:
        z = torch.zeros(0, 4, device=device)
        return BoxTargets(z, torch.zeros(0, dtype=torch.int64, device=device), z, torch.zeros(0, dtype=torch.int64, device=device))
    boxes = t.boxes.to(device).float()
    ignore = t.ignore.to(device).bool() if t.ignore is not None else torch.zeros(len(boxes), dtype=torch.bool, device=device)
    keep = torch.where(~ignore)[0]
    classes = t.classes.to(device).long() if t.classes is not None else torch.zeros(len(boxes), dtype=torch.int64, device=device)
    return BoxTargets(boxes[keep], classes[keep], boxes[ignore], keep)


def _full(per_sample: dict[int, Tensor], n: int, like: Tensor) -> list[Tensor]:
    """Per-image list of length ``n`` with empty ``[0, 4]`` boxes where a sample has none."""
    return [per_sample.get(i, like.new_zeros(0, 4)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VTDNet(nn.Module):
    """The network (see the module docstring). ``forward(batch) -> losses``, ``predict(batch)``."""

    def __init__(self, cfg: VTDNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tasks = cfg.tasks
        has = set(cfg.tasks).__contains__
        self.normalizer = ImageNormalizer()
        self.backbone = build_backbone(cfg.backbone)
        # Tagging reads C5 only: a tagging-only model has no FPN (Table 13: 23.5 M).
        self.fpn = FPN(cfg.fpn, self.backbone.output_shape()) if set(cfg.tasks) - {"tag"} else None
        c5 = self.backbone.output_shape()["c5"][0]
        pyr = FPN.shape_of(cfg.fpn, self.backbone.output_shape())
        c_fpn = cfg.fpn.out_channels
        seg_tasks = tuple(t for t in SEG_TASKS if has(t))
        loc_tasks = tuple(t for t in LOC_TASKS if has(t))
        interact = cfg.use_interaction

        # classification
        self.tagging = TaggingDecoder(cfg.tagging, c5) if has("tag") else None
        self.tag_loss = TaggingLoss()

        # segmentation group: shared aggregation with interaction, one per decoder without
        self.seg_aggregator = PixelAggregator(cfg.aggregator, pyr) if (interact and seg_tasks) else None
        self.seg_decoders = nn.ModuleDict(
            {
                t: SegDecoder(
                    cfg.seg_decoder,
                    cfg.aggregator.channels,
                    SEG_OUTPUTS[t],
                    aggregator=None if interact else PixelAggregator(cfg.aggregator, pyr),
                )
                for t in seg_tasks
            }
        )
        self.seg_losses = nn.ModuleDict(
            {t: SegLoss(SEG_TERMS[t], cfg.seg_decoder.lane_foreground_weight if t == "lane" else 1.0) for t in seg_tasks}
        )

        # localization group
        self.rpn = RPN(cfg.rpn, c_fpn) if loc_tasks else None
        self.rpn_loss = RPNLoss(cfg.rpn)
        self.box_pool = roi_pooler(cfg.box.roi_size)
        self.roi_sampler = RoISampler(cfg.box)
        self.box_head = BoxHead(cfg.box, c_fpn) if has("det") else None
        self.box_loss = BoxLoss()
        self.mask_pool = roi_pooler(cfg.mask.roi_size)
        self.mask_head = MaskHead(cfg.mask, c_fpn) if has("ins") else None
        self.mask_loss = MaskLoss()
        self.kp_pool = roi_pooler(cfg.keypoint.roi_size)
        self.kp_sampler = KeypointSampler(cfg.keypoint)
        self.kp_head = KeypointHead(cfg.keypoint, c_fpn) if has("pose") else None
        self.kp_loss = KeypointLoss()

        # interaction blocks
        self.seg_intra = IntraIB(cfg.seg_intra, cfg.aggregator.channels, seg_tasks, windowed=True) if (interact and seg_tasks) else None
        self.loc_intra = IntraIB(cfg.loc_intra, c_fpn, loc_tasks, windowed=False) if (interact and loc_tasks) else None
        cross = self.seg_intra is not None and self.loc_intra is not None
        self.pixels_from_objects = (
            PixelsFromObjects(cfg.cross, self.seg_intra.out_channels, self.loc_intra.out_channels) if cross else None
        )
        self.objects_from_pixels = (
            ObjectsFromPixels(cfg.cross, self.loc_intra.out_channels, self.seg_intra.out_channels) if cross else None
        )

        # association group
        self.flow = FlowDecoder(cfg.flow, c_fpn) if has("flow") else None
        self.flow_loss = FlowLoss(cfg.flow_loss) if has("flow") else None
        self.track_head = QDTrackHead(cfg.track, c_fpn, tuple(pyr[p][1] for p in ROI_LEVELS)) if has("mot") else None
        self.track_loss = QDTrackLoss(cfg.track_loss)
        # MOTS: tracker ids (track_head) + instance masks (mask_head); no parameters of its own.

        self.loss_weights = cfg.loss_weights

    # -- introspection -----------------------------------------------------------------------

    def decoder(self, task: str) -> list[nn.Module]:
        """The modules that make up ``task``'s decoder (empty for MOTS, which has none)."""
        if task not in self.tasks:
            raise KeyError(f"the model has no {task!r} decoder (tasks: {self.tasks})")
        return {
            "tag": [self.tagging],
            "det": [self.box_head],
            "ins": [self.mask_head],
            "pose": [self.kp_head],
            "flow": [self.flow],
            "mot": [self.track_head],
            "mots": [],
        }.get(task, [self.seg_decoders[task]] if task in SEG_TASKS else [])

    def extract(self, images: Tensor) -> dict[str, Tensor]:
        """Normalised images ``[B, 3, H, W]`` → pixel features ``{p2..p6}`` (backbone + FPN)."""
        assert self.fpn is not None
        return self.fpn(self.backbone(images))

    # -- training ----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Training step on ``batch`` → ``{"loss/<task>/<term>": weighted scalar}``."""
        _check_prepared(batch)
        present = {t for t in self.tasks if bool(batch.has(t).any())}
        if batch.ref_images is None and present & {"flow", "mot"}:
            raise ValueError(f"batch labels {sorted(present & {'flow', 'mot'})} but has no reference frames (ref_images)")
        images = self.normalizer(batch.images)
        feats = self.backbone(images)
        pyramid = self.fpn(feats) if self.fpn is not None else {}
        losses: dict[str, Tensor] = {}

        if "tag" in present:
            losses |= self._tagging_losses(feats["c5"], batch)

        seg_present = [t for t in SEG_TASKS if t in present]
        loc_present = any(t in present for t in (*BOX_TASKS, "pose"))
        groups = None
        if seg_present or loc_present:
            groups = self._groups(batch.images, pyramid, seg=bool(seg_present), loc=loc_present)
            if seg_present:
                losses |= self._segmentation_losses(groups, pyramid, batch, seg_present)
            if loc_present:
                losses |= self._localization_losses(groups, pyramid, batch, present)

        if batch.ref_images is not None and ({"flow", "mot", "mots"} & present):
            losses |= self._association_losses(images, pyramid, groups, batch, present)

        return self.loss_weights.apply(losses)

    def _tagging_losses(self, c5: Tensor, batch: Batch) -> dict[str, Tensor]:
        keep = batch.has("tag")
        weather, scene = tag_targets(batch.targets, c5.device)
        weather = torch.where(keep.to(c5.device), weather, -1)
        scene = torch.where(keep.to(c5.device), scene, -1)
        out = self.tag_loss(self.tagging(c5), weather, scene)
        return {f"loss/tag/{k}": v for k, v in out.items()}

    def _groups(self, images: Tensor, pyramid: dict[str, Tensor], *, seg: bool, loc: bool) -> _Groups:
        """RPN, shared pixel aggregation and the interaction blocks, as far as they are needed."""
        b, _, h, w = images.shape
        g = _Groups(image_shapes=[(h, w)] * b)
        cross = self.pixels_from_objects is not None
        if self.rpn is not None and (loc or (cross and seg)):
            g.rpn = self.rpn(images, g.image_shapes, pyramid)
        if self.seg_aggregator is not None and (seg or (cross and loc)):
            g.pixels = self.seg_aggregator(pyramid)
            assert self.seg_intra is not None
            seg_hat = self.seg_intra(g.pixels)  # Intra-IB (segmentation)
            if cross:
                assert self.objects_from_pixels is not None and g.rpn is not None
                g.pixel_tokens = self.objects_from_pixels.pixel_tokens(seg_hat)
                if seg:
                    # Cross-IB localization → segmentation, objects = top RPN proposals
                    ctx_rois = [p[: self.cfg.num_context_objects] for p in g.rpn.proposals]
                    ctx = self.loc_intra(self.box_pool(pyramid, ctx_rois, g.image_shapes))
                    seg_hat = self.pixels_from_objects(seg_hat, ctx, roi_image_index(ctx_rois))
            g.seg_hat = seg_hat
        return g

    def _seg_logits(self, g: _Groups, pyramid: dict[str, Tensor], task: str, rows: Tensor | None = None) -> SegLogits:
        """``task``'s logits for the images ``rows`` (all when ``None``)."""
        decoder = self.seg_decoders[task]
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])  # noqa: E731
        if self.seg_intra is None:
            # baseline: the decoder aggregates the pyramid itself
            return decoder({k: pick(v) for k, v in pyramid.items()})
        assert g.pixels is not None and g.seg_hat is not None
        return decoder(self.seg_intra.task_features(pick(g.pixels), pick(g.seg_hat), task))

    def _object_features(self, g: _Groups, pyramid: dict[str, Tensor], rois: list[Tensor], task: str) -> Tensor:
        """RoIAlign features of ``rois`` (one box list per image) for ``task``'s decoder,
        through the localization Intra-IB and the segmentation → localization Cross-IB."""
        pool = {"det": self.box_pool, "ins": self.mask_pool, "pose": self.kp_pool}[task]
        x = pool(pyramid, rois, g.image_shapes)  # [R, C, s, s]
        if self.loc_intra is None or x.shape[0] == 0:
            return x
        f_hat = self.loc_intra(x)  # Intra-IB (localization)
        if self.objects_from_pixels is not None:
            assert g.pixel_tokens is not None
            f_hat = self.objects_from_pixels(f_hat, roi_image_index(rois), g.pixel_tokens)
        return self.loc_intra.task_features(x, f_hat, task)

    def _segmentation_losses(self, g: _Groups, pyramid: dict[str, Tensor], batch: Batch, tasks: list[str]) -> dict[str, Tensor]:
        losses = {}
        size = tuple(batch.images.shape[-2:])
        for t in tasks:
            idx = torch.where(batch.has(t))[0].tolist()
            logits = self._seg_logits(g, pyramid, t, torch.tensor(idx, device=batch.images.device))
            maps = [getattr(batch.targets[i], t) for i in idx]
            if t == "lane":  # compact lane bytes → the decoder's direction / style / category maps
                maps = [decode_lane_mask(m) for m in maps]
            target = stack_label_maps(maps, size).to(batch.images.device)
            for k, v in self.seg_losses[t](logits, target).items():
                losses[f"loss/{t}/{k}"] = v
        return losses

    def _localization_losses(self, g: _Groups, pyramid: dict[str, Tensor], batch: Batch, present: set[str]) -> dict[str, Tensor]:
        """RPN and box decoder on box-labelled frames, mask decoder on their positive RoIs,
        keypoint decoder on RoIs matched to the pose boxes."""
        assert g.rpn is not None
        n = len(batch)
        # per-sample label presence, for the tasks this model has
        has = {t: (batch.has(t).tolist() if t in self.tasks else [False] * n) for t in (*BOX_TASKS, "pose")}
        losses: dict[str, Tensor] = {}
        # box-decoder terms are named after the first box task a frame is labelled for
        owner = {}
        for i in range(n):
            t = next((t for t in BOX_TASKS if has[t][i]), None)
            if t is not None:
                owner[i] = "mot" if t == "mots" else t
        if owner:
            targets = {i: _box_targets(batch.targets[i], batch.images.device) for i in owner}
            rois = self._box_losses(g, pyramid, owner, targets, losses)
            if self.mask_head is not None:
                mask_owner = {i: "ins" if has["ins"][i] else "mots" for i in owner if has["ins"][i] or has["mots"][i]}
                if mask_owner:
                    self._mask_losses(g, pyramid, batch, mask_owner, targets, rois, losses)
        if self.kp_head is not None and "pose" in present:
            self._pose_losses(g, pyramid, batch, [i for i in range(n) if has["pose"][i]], losses)
        return losses

    def _box_losses(
        self, g: _Groups, pyramid: dict[str, Tensor], owner: dict[int, str], targets: dict[int, BoxTargets], losses: dict
    ) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        """Adds ``loss/rpn/*`` and ``loss/<owner>/{cls,box}``; returns each frame's sampled RoIs
        ``(boxes, labels, matched)`` for the mask decoder."""
        assert g.rpn is not None and self.box_head is not None
        samples = sorted(owner)
        tgts = [targets[i] for i in samples]
        for k, v in self.rpn_loss(g.rpn, samples, tgts).items():
            losses[f"loss/rpn/{k}"] = v
        rois = self.roi_sampler([g.rpn.proposals[i] for i in samples], tgts)
        boxes = dict(zip(samples, rois.boxes))
        out = self.box_head(self._object_features(g, pyramid, _full(boxes, len(g.image_shapes), rois.boxes[0]), "det"))
        row_owner = [owner[i] for i in samples for _ in range(len(boxes[i]))]
        labels, regression = torch.cat(rois.labels), torch.cat(rois.regression)
        for name in sorted(set(owner.values())):
            rows = torch.tensor([o == name for o in row_owner], device=labels.device)
            sub = BoxOutput(out.class_logits[rows], out.box_deltas[rows])
            for k, v in self.box_loss(sub, labels[rows], regression[rows]).items():
                losses[f"loss/{name}/{k}"] = v
        return {i: (b, lab, m) for i, b, lab, m in zip(samples, rois.boxes, rois.labels, rois.matched)}

    def _mask_losses(
        self,
        g: _Groups,
        pyramid: dict[str, Tensor],
        batch: Batch,
        owner: dict[int, str],
        targets: dict[int, BoxTargets],
        rois: dict[int, tuple[Tensor, Tensor, Tensor]],
        losses: dict,
    ) -> None:
        """Adds ``loss/ins/mask`` / ``loss/mots/mask`` on the positive sampled RoIs whose
        ground truth has a mask."""
        assert self.mask_head is not None
        mask_rois, gt_masks, gt_labels, matched = {}, {}, {}, {}
        for i in owner:
            t, tgt = batch.targets[i], targets[i]
            if t.instance_map is None:
                continue
            boxes, labels, m = rois[i]
            valid = t.mask_valid.bool() if t.mask_valid is not None else torch.ones(t.num_instances, dtype=torch.bool)
            valid = valid.to(labels.device)[tgt.index]  # per matchable GT box
            pos = labels > 0
            if len(valid):
                pos &= valid[m]
            mask_rois[i], matched[i] = boxes[pos], m[pos]
            gt_masks[i] = t.instance_masks(tgt.index).to(labels.device)
            gt_labels[i] = tgt.classes + 1
        if not mask_rois:
            return
        n = len(g.image_shapes)
        logits = self.mask_head(self._object_features(g, pyramid, _full(mask_rois, n, next(iter(mask_rois.values()))), "ins"))
        per_image = dict(zip(range(n), logits.split([len(mask_rois.get(i, ())) for i in range(n)])))
        for name in sorted(set(owner[i] for i in mask_rois)):
            ids = [i for i in sorted(mask_rois) if owner[i] == name]
            out = self.mask_loss(
                torch.cat([per_image[i] for i in ids]),
                [mask_rois[i] for i in ids],
                [gt_masks[i] for i in ids],
                [gt_labels[i] for i in ids],
                [matched[i] for i in ids],
            )
            losses[f"loss/{name}/mask"] = out["mask"]

    def _pose_losses(self, g: _Groups, pyramid: dict[str, Tensor], batch: Batch, samples: list[int], losses: dict) -> None:
        """Adds ``loss/pose/heatmap`` on RoIs matched to the pose boxes (Gaussian targets)."""
        assert g.rpn is not None and self.kp_head is not None
        cfg = self.cfg.keypoint
        kp_rois, kp_targets, kp_weights = {}, [], []
        for i in samples:
            t = batch.targets[i]
            if t.pose_boxes is None or t.keypoints is None:
                continue
            device = g.rpn.proposals[i].device
            r, m = self.kp_sampler(g.rpn.proposals[i], t.pose_boxes.to(device).float())
            kp_rois[i] = r
            tg, wt = gaussian_heatmaps(t.keypoints.to(device).float()[m], r, 2 * cfg.roi_size, cfg.sigma)
            kp_targets.append(tg)
            kp_weights.append(wt)
        if not kp_rois:
            return
        rois = _full(kp_rois, len(g.image_shapes), next(iter(kp_rois.values())))
        heatmaps = self.kp_head(self._object_features(g, pyramid, rois, "pose"))
        losses["loss/pose/heatmap"] = self.kp_loss(heatmaps, torch.cat(kp_targets), torch.cat(kp_weights))["heatmap"]

    def _association_losses(
        self, images: Tensor, pyramid: dict[str, Tensor], g: _Groups | None, batch: Batch, present: set[str]
    ) -> dict[str, Tensor]:
        assert batch.ref_images is not None
        flow_idx = torch.where(batch.has("flow"))[0].tolist() if "flow" in present else []
        track_idx = []
        if self.track_head is not None and batch.ref_targets is not None:
            tracked = batch.has("mot") | (batch.has("mots") if "mots" in self.tasks else False)
            track_idx = torch.where(tracked)[0].tolist()
        idx = sorted(set(flow_idx) | set(track_idx))
        if not idx:
            return {}
        # the reference frame goes through the same extractor (paper §4.1)
        ref_images = self.normalizer(batch.ref_images[idx])
        ref_pyr = self.extract(ref_images)
        pos = {i: k for k, i in enumerate(idx)}
        losses: dict[str, Tensor] = {}

        if flow_idx:
            assert self.flow is not None and self.flow_loss is not None
            k_rows = torch.tensor(flow_idx, device=images.device)
            r_rows = torch.tensor([pos[i] for i in flow_idx], device=images.device)
            key = [pyramid["p2"][k_rows], pyramid["p3"][k_rows]]
            ref = [ref_pyr["p2"][r_rows], ref_pyr["p3"][r_rows]]
            flows = self.flow(key, ref)
            backward = self.flow(ref, key) if self.cfg.flow_bidirectional else None
            h, w = images.shape[-2:]
            valid = torch.zeros(len(flow_idx), h, w, dtype=torch.bool, device=images.device)
            for k, i in enumerate(flow_idx):
                vh, vw = batch.image_sizes[i]
                valid[k, :vh, :vw] = True
            out = self.flow_loss(flows, images[k_rows], ref_images[r_rows], valid=valid, backward_flows=backward)
            losses |= {f"loss/flow/{k}": v for k, v in out.items()}

        if track_idx:
            assert self.rpn is not None and self.track_head is not None and batch.ref_targets is not None
            assert g is not None and g.rpn is not None  # mot/mots frames carry boxes: the RPN ran
            k_rows = torch.tensor(track_idx, device=images.device)
            r_rows = torch.tensor([pos[i] for i in track_idx], device=images.device)
            sizes = [batch.image_sizes[i] for i in track_idx]
            key_feats = [pyramid[p][k_rows] for p in ROI_LEVELS]
            ref_feats = [ref_pyr[p][r_rows] for p in ROI_LEVELS]
            shape = list(images.shape[-2:])
            key_props = [g.rpn.proposals[i] for i in track_idx]
            with torch.no_grad():  # reference proposals only feed RoI sampling
                ref_props = self.rpn(ref_images[r_rows], [tuple(shape)] * len(track_idx), {p: v[r_rows] for p, v in ref_pyr.items()}).proposals
            out = self.track_loss(
                self.track_head,
                key_feats,
                ref_feats,
                key_props,
                ref_props,
                [batch.targets[i] for i in track_idx],
                [batch.ref_targets[i] for i in track_idx],
                sizes,
            )
            losses |= {f"loss/mot/{k}": v for k, v in out.items()}
        return losses

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: Batch, output_sizes: list[tuple[int, int]] | None = None) -> list[FramePrediction]:
        """Every built task's prediction for each frame of ``batch`` (see :class:`FramePrediction`).

        Predictions are cropped to the valid region ``batch.image_sizes[i]`` and, if
        ``output_sizes`` is given, resized to ``output_sizes[i]`` (boxes, keypoints and flow
        vectors scaled accordingly). Flow needs ``batch.ref_images``.
        """
        _check_prepared(batch)
        n = len(batch)
        sizes = list(batch.image_sizes)
        out_sizes = list(output_sizes) if output_sizes is not None else sizes
        if len(out_sizes) != n:
            raise ValueError(f"{len(out_sizes)} output sizes for a batch of {n}")
        images = self.normalizer(batch.images)
        feats = self.backbone(images)
        pyramid = self.fpn(feats) if self.fpn is not None else {}
        preds = [FramePrediction(size=tuple(s)) for s in out_sizes]
        # scale factors valid region → output (x, y)
        scales = [(ow / w, oh / h) for (h, w), (oh, ow) in zip(sizes, out_sizes)]

        if self.tagging is not None:
            tags = self.tagging(feats["c5"])
            for p, wp, sp in zip(preds, tags.weather.float().softmax(-1), tags.scene.float().softmax(-1)):
                p.weather, p.scene = wp, sp

        seg = any(t in self.tasks for t in SEG_TASKS)
        loc = self.rpn is not None
        if seg or loc:
            g = self._groups(batch.images, pyramid, seg=seg, loc=loc)
            for t in (t for t in SEG_TASKS if t in self.tasks):
                logits = self._seg_logits(g, pyramid, t).logits
                for i, p in enumerate(preds):
                    resized = [self._resize_map(lg[i : i + 1], tuple(batch.images.shape[-2:]), sizes[i], out_sizes[i]) for lg in logits]
                    maps = [x.argmax(1)[0] for x in resized]
                    value = torch.stack(maps) if t == "lane" else maps[0]
                    setattr(p, t, value.to(torch.uint8))
                    if t == "sem":  # the class's probability: pseudo-labels keep only confident pixels
                        p.sem_score = resized[0][0].softmax(0).amax(0)
            if loc:
                self._predict_objects(g, pyramid, preds, sizes, scales)

        if self.flow is not None and batch.ref_images is not None:
            ref_pyr = self.extract(self.normalizer(batch.ref_images))
            flows = self.flow([pyramid["p2"], pyramid["p3"]], [ref_pyr["p2"], ref_pyr["p3"]])[0]
            full = upsample_flow(flows, tuple(batch.images.shape[-2:]))
            for i, p in enumerate(preds):
                (h, w), (oh, ow), (sx, sy) = sizes[i], out_sizes[i], scales[i]
                f = full[i : i + 1, :, :h, :w]
                if (oh, ow) != (h, w):
                    f = F.interpolate(f, size=(oh, ow), mode="bilinear", align_corners=False)
                    f = f * torch.tensor([sx, sy], device=f.device).view(1, 2, 1, 1)
                p.flow = f[0]
        return preds

    @staticmethod
    def _resize_map(logits: Tensor, padded: tuple[int, int], valid: tuple[int, int], out: tuple[int, int]) -> Tensor:
        """Stride-4 logits ``[1, K, h, w]`` → ``[1, K, *out]`` over the valid region."""
        x = F.interpolate(logits.float(), size=padded, mode="bilinear", align_corners=False)
        x = x[..., : valid[0], : valid[1]]
        if tuple(out) != tuple(valid):
            x = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
        return x

    def _predict_objects(
        self,
        g: _Groups,
        pyramid: dict[str, Tensor],
        preds: list[FramePrediction],
        sizes: list[tuple[int, int]],
        scales: list[tuple[float, float]],
    ) -> None:
        assert g.rpn is not None and self.box_head is not None
        proposals = g.rpn.proposals
        out = self.box_head(self._object_features(g, pyramid, proposals, "det"))
        dets: list[Detections] = self.box_head.postprocess(out, proposals, sizes)
        boxes = [d.boxes for d in dets]
        counts = [len(b) for b in boxes]
        emb = self.track_head([pyramid[p] for p in ROI_LEVELS], boxes, sizes) if self.track_head is not None else None
        mask_probs = None
        if self.mask_head is not None:
            logits = self.mask_head(self._object_features(g, pyramid, boxes, "ins"))
            classes = torch.cat([d.classes for d in dets]) + 1
            mask_probs = logits[torch.arange(len(classes), device=logits.device), classes].sigmoid().split(counts)
        kp = None
        if self.kp_head is not None:
            cls_ok = torch.tensor(self.cfg.keypoint.classes, device=boxes[0].device) if boxes else None
            person = [torch.where(torch.isin(d.classes, cls_ok))[0] for d in dets]
            kp_rois = [b[k] for b, k in zip(boxes, person)]
            heat = self.kp_head(self._object_features(g, pyramid, kp_rois, "pose"))
            kp = (person, kp_rois, heat.split([len(r) for r in kp_rois]))
        for i, (p, d) in enumerate(zip(preds, dets)):
            sx, sy = scales[i]
            factor = torch.tensor([sx, sy, sx, sy], device=d.boxes.device)
            p.boxes, p.scores, p.classes = d.boxes * factor, d.scores, d.classes
            if emb is not None:
                p.embeddings = emb[i].float()
            if mask_probs is not None:
                oh, ow = p.size
                pasted = paste_masks_in_image(mask_probs[i][:, None].float(), p.boxes, (oh, ow))
                p.masks = pasted[:, 0] >= self.cfg.mask.mask_thresh
            if kp is not None:
                person, kp_rois, heat = kp
                xy, _ = KeypointHead.decode(heat[i], kp_rois[i])
                xy[..., 0] *= sx
                xy[..., 1] *= sy
                p.keypoints, p.keypoint_index, p.keypoint_scores = xy, person[i], d.scores[person[i]]


def build_model(cfg: VTDNetConfig) -> VTDNet:
    return VTDNet(cfg)
