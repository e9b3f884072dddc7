"""Stateful QDTrack tracker (inference-time association for MOT and MOTS).

Follows QDTrack's ``QuasiDenseEmbedTracker`` (mmtracking ``QuasiDenseTracker``, vis4d
``QDTrackAssociation``/``QDTrackMemory``) with the BDD100K settings of REFERENCE §8. It is plain
Python state outside ``nn.Module``: one tracker per video, ``reset()`` between videos, frames
fed in increasing ``frame_index`` order. The MOTS "decoder" has no parameters: pass the
instance masks of the detections to :meth:`QDTracker.update` and they come back with the
track ids.

Per frame (``update``):

1. Sort detections by score (descending, stable, so ties keep input order).
2. Duplicate removal (QDTrack's, class-agnostic "for potential backdrops and cross classes"):
   a detection is dropped when its IoU with *any* higher-scored detection exceeds
   ``nms_class_iou`` (0.7) or, if its score is below ``obj_score_thr``, ``nms_backdrop_iou``
   (0.3). Same-class duplicates are expected to be gone already (the detector's NMS).
3. Matching: bi-softmax ``(softmax(S, dim=1) + softmax(S, dim=0)) / 2`` over raw dot products
   ``S`` between detection embeddings and the memory (live tracks + last frame's backdrops),
   zeroed across categories when ``with_cats``. Greedily in score order, a detection takes its
   best memory entry if the score exceeds ``match_score_thr`` and the entry is a track: a
   detection above ``obj_score_thr`` inherits the id (the track is then unavailable to the
   others); a weaker one that still matches above ``nms_conf_thr`` is suppressed (id −2).
   Backdrops only take part in the softmax normalisation: they absorb false matches.
4. Unmatched detections above ``init_score_thr`` start new tracks (ids 0, 1, 2, ...).
5. Memory: matched tracks take the detection's box, score and class and the embedding
   ``(1 − momentum) · old + momentum · new`` (QDTrack's convention: ``momentum`` = 0.8 weights
   the *new* observation); tracks unseen for ``memo_frames`` frames are dropped
   (``frame − last_seen >= memo_frames``, after matching, so a track can be recovered after a
   gap of up to ``memo_frames`` frames); unmatched, unstarted detections (id −1) that do not
   overlap a higher-scored detection by more than ``nms_backdrop_iou`` become the backdrops of
   the next ``memo_backdrop_frames`` frames.

Only detections with an id ≥ 0 are returned. Everything is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["QDTracker", "TrackResult", "TrackerConfig"]


@dataclass(kw_only=True, frozen=True)
class TrackerConfig:
    """QDTrack tracker thresholds (BDD100K values of QDTrack / vis4d, REFERENCE §8)."""

    init_score_thr: float = 0.7
    obj_score_thr: float = 0.3
    match_score_thr: float = 0.5
    memo_frames: int = 10
    memo_backdrop_frames: int = 1
    momentum: float = 0.8
    nms_backdrop_iou: float = 0.3
    nms_class_iou: float = 0.7
    nms_conf_thr: float = 0.5
    with_cats: bool = True

    def __post_init__(self) -> None:
        for name in (
            "init_score_thr", "obj_score_thr", "match_score_thr", "momentum",
            "nms_backdrop_iou", "nms_class_iou", "nms_conf_thr",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TrackerConfig.{name} must be in [0, 1], got {v}")
        if self.memo_frames < 1:
            raise ValueError(f"TrackerConfig.memo_frames must be >= 1, got {self.memo_frames}")
        if self.memo_backdrop_frames < 0:
            raise ValueError(f"TrackerConfig.memo_backdrop_frames must be >= 0, got {self.memo_backdrop_frames}")


@dataclass
class TrackResult:
    """Tracked objects of one frame, in descending score order.

    ``boxes [K, 4]`` xyxy, ``scores [K]``, ``classes [K]`` int64, ``track_ids [K]`` int64 (≥ 0),
    ``masks [K, H, W]`` or ``None`` (the masks given to ``update``), ``indices [K]`` int64:
    position of each object in the ``update`` inputs.
    """

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    track_ids: Tensor
    masks: Tensor | None
    indices: Tensor

    def __len__(self) -> int:
        return int(self.track_ids.shape[0])


@dataclass
class _Track:
    box: Tensor
    score: float
    cls: int
    embed: Tensor
    last_frame: int


@dataclass
class _Backdrops:
    boxes: Tensor
    classes: Tensor
    embeds: Tensor


class QDTracker:
    """QDTrack association across the frames of one video (see the module docstring)."""

    def __init__(self, cfg: TrackerConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else TrackerConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all tracks and backdrops; ids restart at 0 (call between videos)."""
        self._tracks: dict[int, _Track] = {}
        self._backdrops: list[_Backdrops] = []
        self._next_id = 0
        self._last_frame: int | None = None

    @property
    def num_tracks(self) -> int:
        """Tracks currently held in memory."""
        return len(self._tracks)

    def _memory(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(embeds [M, D], classes [M], ids [M])`` of tracks then backdrops (id −1)."""
        embeds, classes, ids = [], [], []
        for tid, t in self._tracks.items():
            embeds.append(t.embed[None])
            classes.append(t.cls)
            ids.append(tid)
        if not embeds and all(b.embeds.shape[0] == 0 for b in self._backdrops):
            return None
        device = next(iter(self._tracks.values())).embed.device if self._tracks else self._backdrops[0].embeds.device
        emb = torch.cat(embeds) if embeds else None
        cls = torch.tensor(classes, dtype=torch.long, device=device)
        tid = torch.tensor(ids, dtype=torch.long, device=device)
        for b in self._backdrops:
            emb = b.embeds if emb is None else torch.cat([emb, b.embeds])
            cls = torch.cat([cls, b.classes])
            tid = torch.cat([tid, torch.full((b.embeds.shape[0],), -1, dtype=torch.long, device=device)])
        return emb, cls, tid

    @torch.no_grad()
    def update(
        self,
        frame_index: int,
        boxes: Tensor,
        scores: Tensor,
        classes: Tensor,
        embeddings: Tensor,
        masks: Tensor | None = None,
    ) -> TrackResult:
        """Associate one frame's detections with the memory and update it.

        Args:
            frame_index: frame number in the video, strictly increasing across calls.
            boxes: ``[N, 4]`` xyxy; scores ``[N]``; classes ``[N]`` int; embeddings ``[N, D]``
                (raw ``QDTrackHead`` output); masks: optional ``[N, H, W]`` instance masks.
        """
        cfg = self.cfg
        n = boxes.shape[0]
        shapes_ok = boxes.shape == (n, 4) and scores.shape == (n,) and classes.shape == (n,)
        if not (shapes_ok and embeddings.dim() == 2 and embeddings.shape[0] == n):
            raise ValueError(
                f"QDTracker.update: inconsistent shapes boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)}, "
                f"classes {tuple(classes.shape)}, embeddings {tuple(embeddings.shape)}"
            )
        if masks is not None and masks.shape[0] != n:
            raise ValueError(f"QDTracker.update: {masks.shape[0]} masks for {n} detections")
        if self._last_frame is not None and frame_index <= self._last_frame:
            raise ValueError(
                f"QDTracker.update: frame_index {frame_index} after {self._last_frame}; call reset() between videos"
            )
        self._last_frame = frame_index

        boxes, scores, embeddings = boxes.float(), scores.float(), embeddings.float()
        classes = classes.long()
        order = torch.sort(scores, descending=True, stable=True).indices
        boxes, scores, classes, embeddings = boxes[order], scores[order], classes[order], embeddings[order]

        # Duplicate removal: compare with every higher-scored detection (kept or not), as QDTrack.
        ious = box_iou(boxes, boxes).tril(diagonal=-1)
        thr = torch.where(scores < cfg.obj_score_thr, cfg.nms_backdrop_iou, cfg.nms_class_iou)
        keep = ~(ious > thr[:, None]).any(dim=1)
        order, boxes, scores = order[keep], boxes[keep], scores[keep]
        classes, embeddings = classes[keep], embeddings[keep]
        n = boxes.shape[0]

        ids = [-1] * n
        memory = self._memory() if n > 0 else None
        if memory is not None:
            mem_emb, mem_cls, mem_ids = memory
            sim = embeddings @ mem_emb.t()
            match = (sim.softmax(dim=1) + sim.softmax(dim=0)) / 2
            if cfg.with_cats:
                match = match * (classes[:, None] == mem_cls[None, :]).float()
            match_np = match.cpu().numpy()  # one host copy; the greedy loop is sequential
            mem_ids_l = mem_ids.tolist()
            scores_l = scores.tolist()
            for i in range(n):
                j = int(match_np[i].argmax())  # first maximum on ties: deterministic
                conf = float(match_np[i, j])
                if conf > cfg.match_score_thr and mem_ids_l[j] > -1:
                    if scores_l[i] > cfg.obj_score_thr:
                        ids[i] = mem_ids_l[j]
                        match_np[i + 1 :, j] = 0.0  # a track takes at most one detection
                    elif conf > cfg.nms_conf_thr:
                        ids[i] = -2  # weak duplicate of a tracked object: neither track nor backdrop
        scores_l = scores.tolist()
        for i in range(n):
            if ids[i] == -1 and scores_l[i] > cfg.init_score_thr:
                ids[i] = self._next_id
                self._next_id += 1
        id_t = torch.tensor(ids, dtype=torch.long, device=boxes.device)

        self._update_memory(frame_index, id_t, boxes, scores, classes, embeddings, ious[keep][:, keep])

        out = id_t >= 0
        idx = order[out]
        return TrackResult(
            boxes=boxes[out],
            scores=scores[out],
            classes=classes[out],
            track_ids=id_t[out],
            masks=None if masks is None else masks[idx.to(masks.device)],
            indices=idx,
        )

    def _update_memory(
        self, frame: int, ids: Tensor, boxes: Tensor, scores: Tensor, classes: Tensor, embeds: Tensor, ious: Tensor
    ) -> None:
        """``ious``: lower-triangular ``[n, n]`` IoU of the kept detections (score order)."""
        m = self.cfg.momentum
        for i, tid in enumerate(ids.tolist()):
            if tid < 0:
                continue
            t = self._tracks.get(tid)
            if t is None:
                self._tracks[tid] = _Track(boxes[i], float(scores[i]), int(classes[i]), embeds[i], frame)
            else:
                t.box, t.score, t.cls, t.last_frame = boxes[i], float(scores[i]), int(classes[i]), frame
                t.embed = (1.0 - m) * t.embed + m * embeds[i]
        # Backdrops: unmatched, unstarted detections not overlapping a higher-scored detection.
        cand = ids == -1
        backdrop = cand & ~(ious > self.cfg.nms_backdrop_iou).any(dim=1)
        self._backdrops.insert(0, _Backdrops(boxes[backdrop], classes[backdrop], embeds[backdrop]))
        del self._backdrops[self.cfg.memo_backdrop_frames :]
        for tid in [k for k, t in self._tracks.items() if frame - t.last_frame >= self.cfg.memo_frames]:
            del self._tracks[tid]
