"""QDTrack quasi-dense similarity head and its contrastive loss (MOT decoder; MOTS reuses it).

Paper (§4, appendix G "Association Decoders") and REFERENCE §8: a lightweight embedding head
pools each RoI (RoIAlign 7×7 on strides 4–32), applies 4 conv3×3 (256 ch, GroupNorm 32),
flattens, FC 1024 + ReLU and a linear embedding of 256. Training samples RoIs densely on a key
and a reference frame of the same video and contrasts them: multi-positive cross entropy on
dot products (λ_embed = 0.25) and an L2 loss on cosine similarity (λ_aux = 1.0).
Inference-time association lives in :mod:`vtd_train.tracker` (stateful, outside nn.Module).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from data_pipeline.loading.structures import FrameTargets
from vtd_train.model.schema import QDTrackConfig, QDTrackLossConfig

__all__ = ["QDTrackConfig", "QDTrackHead", "QDTrackLoss", "QDTrackLossConfig"]


class QDTrackHead(nn.Module):
    """Per-RoI appearance embedding.

    ``forward(features, boxes, image_sizes)``:
        features: one map per stride of ``strides`` (e.g. FPN P2..P5 for ``(4, 8, 16, 32)``),
            ``[B, in_channels, H/s, W/s]``.
        boxes: ``B`` tensors ``[N_i, 4]`` ``x1 y1 x2 y2`` in image pixels (extra columns, e.g.
            scores, are ignored); clipped to ``image_sizes[i] = (h, w)``.

    Returns ``B`` tensors ``[N_i, embed_channels]`` (``[0, embed_channels]`` for no boxes),
    unnormalised: training and tracking use raw dot products (and cosine for the aux loss).
    """

    def __init__(self, cfg: QDTrackConfig, in_channels: int, strides: tuple[int, ...]) -> None:
        super().__init__()
        if not strides:
            raise ValueError("QDTrackHead needs at least one feature stride")
        log2s = [math.log2(s) for s in strides]
        if any(v != int(v) for v in log2s) or any(b - a != 1 for a, b in zip(log2s, log2s[1:])):
            raise ValueError(f"QDTrackHead strides must be consecutive powers of two, got {strides}")
        self.cfg = cfg
        self.strides = tuple(int(s) for s in strides)
        self._min_level = int(log2s[0])
        convs: list[nn.Module] = []
        cin = in_channels
        for _ in range(cfg.num_convs):
            conv = nn.Conv2d(cin, cfg.conv_channels, 3, padding=1, bias=cfg.conv_bias)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            convs += [conv, nn.GroupNorm(cfg.num_groups, cfg.conv_channels), nn.ReLU(inplace=True)]
            cin = cfg.conv_channels
        self.convs = nn.Sequential(*convs)
        self.fc = nn.Linear(cin * cfg.roi_size**2, cfg.fc_channels)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.embed = nn.Linear(cfg.fc_channels, cfg.embed_channels)
        nn.init.normal_(self.embed.weight, 0.0, 0.01)
        nn.init.zeros_(self.embed.bias)

    def _levels(self, boxes: Tensor) -> Tensor:
        """``[N]`` index into ``self.strides`` for each ``[N, 4]`` box."""
        cfg = self.cfg
        scale = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
        k = torch.floor(cfg.canonical_level + torch.log2(scale / cfg.canonical_size + 1e-6))
        return (k - self._min_level).clamp(0, len(self.strides) - 1).long()

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        if len(features) != len(self.strides):
            raise ValueError(
                f"QDTrackHead expects {len(self.strides)} feature maps (strides {self.strides}), got {len(features)}"
            )
        if len(boxes) != len(image_sizes):
            raise ValueError(f"QDTrackHead: {len(boxes)} box sets for {len(image_sizes)} images")
        rois = []
        for i, (b, (h, w)) in enumerate(zip(boxes, image_sizes)):
            b = b[:, :4].detach().float()
            b = torch.stack(
                (b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)), dim=1
            )
            rois.append(torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1))
        all_rois = torch.cat(rois) if rois else features[0].new_zeros((0, 5), dtype=torch.float32)
        levels = self._levels(all_rois[:, 1:])
        pooled, order = [], []
        for lvl, (feat, stride) in enumerate(zip(features, self.strides)):
            idx = torch.nonzero(levels == lvl).squeeze(1)
            pooled.append(
                roi_align(  # fp32 like torchvision's autocast wrapper: fp16 box coords lose pixels
                    feat.float(),
                    all_rois[idx],
                    output_size=self.cfg.roi_size,
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.cfg.sampling_ratio,
                    aligned=self.cfg.aligned,
                )
            )
            order.append(idx)
        x = torch.cat(pooled)[torch.argsort(torch.cat(order))]  # back to input box order
        x = self.convs(x).flatten(1)
        x = self.embed(F.relu(self.fc(x)))
        return list(x.split([r.shape[0] for r in rois]))


_NEG_INF = -1e30  # finite "minus infinity": logsumexp over a fully masked row stays NaN-free


class QDTrackLoss(nn.Module):
    """Quasi-dense contrastive loss on a key/reference frame pair.

    ``forward(head, key_feats, ref_feats, key_proposals, ref_proposals, key_targets,
    ref_targets, image_sizes, *, generator=None) -> {"embed", "aux"}``

    * ``key_feats``/``ref_feats``: the head's feature maps of each frame (see
      :class:`QDTrackHead`); ``*_proposals``: per image ``[N_i, 4(+)]`` RPN boxes (detached);
      ``*_targets``: :class:`FrameTargets` with ``boxes``, ``ignore``, ``track_ids``
      (``None`` fields = no gt); ``image_sizes``: ``(h, w)`` valid region, shared by the pair.
    * Assignment (per frame, gt boxes appended to the proposals): each RoI takes its max-IoU
      gt (``torchvision.ops.box_iou``); positive if IoU ≥ ``pos_iou_thr`` and that gt is
      neither ignored (``FrameTargets.ignore``) nor without a track id (< 0); negative if the
      max IoU < ``neg_iou_thr`` (for all gt, ignored ones included); other RoIs are not used.
    * Sampling: ``num_samples`` RoIs per image, at most ``pos_fraction`` of them positive,
      uniformly at random (QDTrack uses instance-balanced positives / IoU-balanced negatives;
      uniform is mmdet's RandomSampler). Randomness comes from ``generator`` (a
      ``torch.Generator``; ``randperm`` runs on its device) or, when ``None``, the global torch
      RNG on the CPU — seed it for reproducible sampling.
    * Key frame: sampled positives only; reference frame: all sampled RoIs, negatives get id
      −1. Key RoI i and ref RoI j are a positive pair when their gt track ids are equal.
    * ``embed`` = ``embed_weight`` · mean over images of the multi-positive cross entropy
      ``log(1 + Σ_{k+} Σ_{k−} exp(v·k− − v·k+))`` (dot products), averaged over key RoIs with
      at least one positive; computed as ``softplus(LSE_neg(v·k) + LSE_pos(−v·k))``, which is
      the same sum without QDTrack's ``P × R × R`` expansion.
    * ``aux`` = ``aux_weight`` · mean over images of the L2 loss on cosine similarity (target 1
      for positive pairs, 0 otherwise; ``cos − margin`` clamped to [0, 1]; at most
      ``aux_neg_pos_ub`` negatives per positive, hardest first). As in QDTrack, it also
      pushes key positives away from reference negatives when there is no positive pair.
    * A batch without key positives (no gt, only ignored gt, no proposals) gives exact zeros
      connected to every head parameter (``Σ p.sum() · 0``), so DDP sees a gradient; no
      term can be NaN.
    """

    def __init__(self, cfg: QDTrackLossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else QDTrackLossConfig()

    # -- sampling ------------------------------------------------------------------------------

    @staticmethod
    def _gt(targets: FrameTargets, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``([G, 4] boxes, [G] track ids, [G] bool usable-as-positive)``."""
        if targets.boxes is None or targets.track_ids is None or targets.boxes.shape[0] == 0:
            return (
                torch.zeros((0, 4), device=device),
                torch.zeros((0,), dtype=torch.long, device=device),
                torch.zeros((0,), dtype=torch.bool, device=device),
            )
        boxes = targets.boxes.to(device).float()
        ids = targets.track_ids.to(device).long()
        ok = ids >= 0
        if targets.ignore is not None:
            ok = ok & ~targets.ignore.to(device).bool()
        return boxes, ids, ok

    @staticmethod
    def _choice(idx: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        if idx.numel() <= k:
            return idx
        dev = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(idx.numel(), generator=generator, device=dev)[:k]
        return idx[perm.to(idx.device)]

    @torch.no_grad()
    def _sample(
        self, proposals: Tensor, targets: FrameTargets, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(pos boxes [P, 4], pos track ids [P], neg boxes [M, 4], neg ids [M] = -1)``."""
        cfg = self.cfg
        device = proposals.device
        gt_boxes, gt_ids, gt_ok = self._gt(targets, device)
        boxes = proposals[:, :4].detach().float()
        if cfg.add_gt_as_proposals:
            boxes = torch.cat([boxes, gt_boxes[gt_ok]])
        if gt_boxes.shape[0] == 0:
            max_iou = boxes.new_zeros(boxes.shape[0])
            assigned = torch.zeros(boxes.shape[0], dtype=torch.long, device=device)
            pos = torch.zeros(boxes.shape[0], dtype=torch.bool, device=device)
        else:
            max_iou, assigned = box_iou(boxes, gt_boxes).max(dim=1)
            pos = (max_iou >= cfg.pos_iou_thr) & gt_ok[assigned]
        neg = max_iou < cfg.neg_iou_thr
        pos_idx = self._choice(torch.nonzero(pos).squeeze(1), int(cfg.num_samples * cfg.pos_fraction), generator)
        neg_idx = self._choice(torch.nonzero(neg).squeeze(1), cfg.num_samples - pos_idx.numel(), generator)
        return (
            boxes[pos_idx],
            gt_ids[assigned[pos_idx]],
            boxes[neg_idx],
            torch.full((neg_idx.numel(),), -1, dtype=torch.long, device=device),
        )

    # -- losses --------------------------------------------------------------------------------

    @staticmethod
    def _multi_pos_ce(dots: Tensor, pos: Tensor) -> Tensor:
        """Mean over rows with a positive of ``log(1 + Σ+ Σ- exp(d- − d+))``; ``[P, R]`` inputs."""
        rows = pos.any(dim=1)
        # fp32: the masking value does not fit fp16 (autocast hands us half dots), and loss
        # reductions stay in fp32 anyway.
        d, p = dots[rows].float(), pos[rows]
        lse_neg = torch.logsumexp(d.masked_fill(p, _NEG_INF), dim=1)
        lse_pos = torch.logsumexp((-d).masked_fill(~p, _NEG_INF), dim=1)
        return F.softplus(lse_neg + lse_pos).sum() / (rows.sum() + 1e-5)

    def _l2_aux(self, cos: Tensor, pos: Tensor) -> Tensor:
        """L2 on cosine similarity with margins and hard negative mining; ``[P, R]`` inputs."""
        cfg = self.cfg
        target = pos.float()
        pred = torch.where(pos, cos - cfg.aux_pos_margin, cos - cfg.aux_neg_margin).clamp(0.0, 1.0)
        cost = (pred - target) ** 2
        weight = torch.ones_like(cost)
        num_pos = max(1, int(pos.sum()))
        neg = ~pos
        num_neg = int(neg.sum())
        if cfg.aux_neg_pos_ub > 0 and num_neg / num_pos > cfg.aux_neg_pos_ub:
            keep = int(num_pos * cfg.aux_neg_pos_ub)
            neg_idx = torch.nonzero(neg.flatten()).squeeze(1)
            if cfg.aux_hard_mining:
                chosen = neg_idx[cost.detach().flatten()[neg_idx].topk(keep).indices]
            else:
                chosen = self._choice(neg_idx, keep, None)
            neg_weight = torch.zeros_like(weight).flatten()
            neg_weight[chosen] = 1.0
            weight = torch.where(neg, neg_weight.view_as(weight), weight)
        return (cost * weight).sum() / (weight > 0).sum().clamp(min=1)

    def forward(
        self,
        head: QDTrackHead,
        key_feats: list[Tensor],
        ref_feats: list[Tensor],
        key_proposals: list[Tensor],
        ref_proposals: list[Tensor],
        key_targets: list[FrameTargets],
        ref_targets: list[FrameTargets],
        image_sizes: list[tuple[int, int]],
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        n = len(image_sizes)
        if not (len(key_proposals) == len(ref_proposals) == len(key_targets) == len(ref_targets) == n):
            raise ValueError(
                "QDTrackLoss: per-image lists differ in length: "
                f"{len(key_proposals)} key / {len(ref_proposals)} ref proposals, "
                f"{len(key_targets)} key / {len(ref_targets)} ref targets, {n} image sizes"
            )
        key_boxes, key_ids, ref_boxes, ref_ids = [], [], [], []
        for i in range(n):
            kb, kid, _, _ = self._sample(key_proposals[i], key_targets[i], generator)
            rpb, rpid, rnb, rnid = self._sample(ref_proposals[i], ref_targets[i], generator)
            key_boxes.append(kb)
            key_ids.append(kid)
            ref_boxes.append(torch.cat([rpb, rnb]))
            ref_ids.append(torch.cat([rpid, rnid]))

        key_emb = head(key_feats, key_boxes, image_sizes)
        ref_emb = head(ref_feats, ref_boxes, image_sizes)

        embed_sum = key_feats[0].new_zeros((), dtype=torch.float32)
        aux_sum = key_feats[0].new_zeros((), dtype=torch.float32)
        used = 0
        for k, r, kid, rid in zip(key_emb, ref_emb, key_ids, ref_ids):
            if k.shape[0] == 0 or r.shape[0] == 0:
                continue
            k, r = k.float(), r.float()
            pos = kid.view(-1, 1) == rid.view(1, -1)  # key ids are >= 0, ref negatives are -1
            embed_sum = embed_sum + self._multi_pos_ce(k @ r.t(), pos)
            aux_sum = aux_sum + self._l2_aux(F.normalize(k, dim=1) @ F.normalize(r, dim=1).t(), pos)
            used += 1
        if used == 0:
            anchor = sum(p.sum() for p in head.parameters()) * 0.0
            embed_sum = embed_sum + anchor
            aux_sum = aux_sum + anchor
        return {
            "embed": self.cfg.embed_weight * embed_sum / max(n, 1),
            "aux": self.cfg.aux_weight * aux_sum / max(n, 1),
        }
