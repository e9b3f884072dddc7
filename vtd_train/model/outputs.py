"""Typed inference output of :meth:`VTDNet.predict`: one :class:`FramePrediction` per frame."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FramePrediction:
    """Every task's prediction for one frame, in pixels of ``size = (H, W)``.

    ``size`` is the frame's valid region ``Batch.image_sizes[i]`` (the padding is cropped), or
    the ``output_sizes[i]`` given to ``predict`` (e.g. the original size of a resized input).
    A field is ``None`` when the model has no decoder for its task (``flow`` also when the batch
    has no reference frames).

    ============== ================== =================================================================
    field          shape / dtype      meaning
    ============== ================== =================================================================
    weather        [7] float32        weather probabilities (``bdd100k.WEATHERS`` order)
    scene          [7] float32        scene probabilities (``bdd100k.SCENES`` order)
    sem            [H, W] uint8       semantic train id 0..18
    sem_score      [H, W] float32     softmax probability of ``sem``'s class (its confidence;
                                      pseudo-labels ignore pixels below a threshold)
    drivable       [H, W] uint8       0 direct, 1 alternative, 2 background
    lane           [3, H, W] uint8    direction / style / category maps, 0 = background, else 1 + value
                                      (the layout of ``bdd100k.decode_lane_mask``)
    boxes          [N, 4] float32     detections ``x1 y1 x2 y2``
    scores         [N] float32        detection confidence
    classes        [N] int64          thing class 0..7
    masks          [N, H, W] bool     instance mask of each detection
    keypoints      [P, 18, 3] float32 ``x, y, score`` per joint for the person detections
    keypoint_index [P] int64          index into ``boxes`` of each pose
    keypoint_scores [P] float32       person confidence (the detection score)
    embeddings     [N, E] float32     QDTrack embedding of each detection (input of ``QDTracker``;
                                      MOTS = tracker ids + ``masks``)
    flow           [2, H, W] float32  ``(dx, dy)`` with key(x, y) ≈ ref(x + dx, y + dy)
    ============== ================== =================================================================
    """

    size: tuple[int, int]
    weather: Tensor | None = None
    scene: Tensor | None = None
    sem: Tensor | None = None
    sem_score: Tensor | None = None
    drivable: Tensor | None = None
    lane: Tensor | None = None
    boxes: Tensor | None = None
    scores: Tensor | None = None
    classes: Tensor | None = None
    masks: Tensor | None = None
    keypoints: Tensor | None = None
    keypoint_index: Tensor | None = None
    keypoint_scores: Tensor | None = None
    embeddings: Tensor | None = None
    flow: Tensor | None = None

    @property
    def weather_label(self) -> int | None:
        return None if self.weather is None else int(self.weather.argmax())

    @property
    def scene_label(self) -> int | None:
        return None if self.scene is None else int(self.scene.argmax())
