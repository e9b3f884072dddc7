"""Typed containers that travel from the loader to the model, losses and metrics.

Schema (all coordinates in pixels of the *augmented* image, ``x`` right, ``y`` down):

``FrameTargets`` — the labels of one frame. A field is ``None`` when the frame carries no
label of that kind; whether a task is labelled (and real or pseudo) is recorded separately in
``Batch.labels`` so that "no objects" (an empty tensor) and "not labelled" (``None``/ABSENT)
never get confused.

=============  ===================  ===========================================================
field          shape / dtype        meaning
=============  ===================  ===========================================================
weather        int                  index into ``bdd100k.WEATHERS`` (−1 if not labelled)
scene          int                  index into ``bdd100k.SCENES`` (−1 if not labelled)
boxes          [N, 4] float32       instance boxes ``x1 y1 x2 y2`` (det / ins / mot / mots)
classes        [N] int64            thing class 0..7 (``bdd100k.THING_CATEGORIES``)
ignore         [N] bool             crowd, ``ignored`` or mapped category: an ignore region
track_ids      [N] int64            track id within the video (−1 outside tracking)
masks          [N, H, W] uint8      instance masks aligned with ``boxes`` (ins / mots)
mask_valid     [N] bool             False where an instance has a box but no mask
keypoints      [P, 18, 3] float32   ``x, y, v`` per joint; v: 0 unlabelled, 1 occluded, 2 visible
pose_boxes     [P, 4] float32       box of each pose instance
sem            [H, W] uint8         semantic train id 0..18, 255 ignore
drivable       [H, W] uint8         0 direct, 1 alternative, 2 background, 255 ignore
lane           [3, H, W] uint8      direction / style / category maps, 0 background, 255 ignore
=============  ===================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

from data_pipeline.bdd100k import TASKS

TASK_INDEX = {t: i for i, t in enumerate(TASKS)}


@dataclass(frozen=True)
class AugmentPlan:
    """The geometric augmentation drawn for a batch by the loader (seeded by seed/epoch/step).

    ``height`` is the target image height (aspect kept) or ``None`` for no resize; ``flips[i]``
    says whether sample ``i`` (and its reference frame) is flipped horizontally. ``applied``
    turns True once :func:`data_pipeline.transforms.apply_augment` has run, so a batch is never
    augmented twice whether augmentation runs in the loader or on the training device.
    """

    height: int | None
    flips: tuple[bool, ...]
    applied: bool = False


class LabelSource(IntEnum):
    """Where a task's label for a sample comes from."""

    ABSENT = 0
    REAL = 1
    PSEUDO = 2


@dataclass
class FrameTargets:
    """Labels of one frame (see the module docstring for the schema)."""

    weather: int = -1
    scene: int = -1
    boxes: Tensor | None = None
    classes: Tensor | None = None
    ignore: Tensor | None = None
    track_ids: Tensor | None = None
    masks: Tensor | None = None
    mask_valid: Tensor | None = None
    keypoints: Tensor | None = None
    pose_boxes: Tensor | None = None
    sem: Tensor | None = None
    drivable: Tensor | None = None
    lane: Tensor | None = None

    @property
    def num_instances(self) -> int:
        return 0 if self.boxes is None else int(self.boxes.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FrameTargets:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                kw[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **kw)


@dataclass
class Batch:
    """One training/eval batch; every sample comes from the same image set.

    ``images`` are uint8 ``[B, 3, H, W]``, zero-padded at the bottom/right to a common size that
    is a multiple of ``size_divisor``; ``image_sizes[i] = (h, w)`` is the valid region.
    ``ref_images``/``ref_targets`` hold the reference frame of each key frame (tracking set
    only: MOT contrastive pairs and flow pairs). ``labels[i, TASK_INDEX[t]]`` is a
    :class:`LabelSource` for task ``t`` of sample ``i``. ``meta[i]`` records ``name``,
    ``video``, ``frame_index``, ``ref_frame_index``, ``flip`` and ``scale`` of sample ``i``.
    """

    set_name: str
    images: Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[FrameTargets]
    labels: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    ref_images: Tensor | None = None
    ref_targets: list[FrameTargets] | None = None
    augment: AugmentPlan | None = None
    size_divisor: int = 32

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def has(self, task: str) -> Tensor:
        """``[B]`` bool: which samples carry a (real or pseudo) label for ``task``."""
        return self.labels[:, TASK_INDEX[task]] != LabelSource.ABSENT

    def is_pseudo(self, task: str) -> Tensor:
        return self.labels[:, TASK_INDEX[task]] == LabelSource.PSEUDO

    def tasks_present(self) -> tuple[str, ...]:
        """Tasks labelled for at least one sample of the batch, in ``TASKS`` order."""
        return tuple(t for t in TASKS if bool(self.has(t).any()))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            targets=[t.to(device, non_blocking) for t in self.targets],
            ref_images=None if self.ref_images is None else self.ref_images.to(device, non_blocking=non_blocking),
            ref_targets=None if self.ref_targets is None else [t.to(device, non_blocking) for t in self.ref_targets],
        )

    def pin_memory(self) -> Batch:
        """Called by ``torch.utils.data.DataLoader(pin_memory=True)``."""
        return replace(
            self,
            images=self.images.pin_memory(),
            ref_images=None if self.ref_images is None else self.ref_images.pin_memory(),
        )
