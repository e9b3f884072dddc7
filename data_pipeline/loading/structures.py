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
instance_map   [H, W] uint8/int32   instance masks (ins / mots): pixel value ``k + 1`` belongs to
                                    instance ``k`` of ``boxes``, 0 to none. One map instead of
                                    ``N`` full-frame masks; :meth:`FrameTargets.instance_masks`
                                    expands it where the masks are needed (on the device)
mask_valid     [N] bool             False where an instance has a box but no mask
keypoints      [P, 18, 3] float32   ``x, y, v`` per joint; v: 0 unlabelled, 1 occluded, 2 visible
pose_boxes     [P, 4] float32       box of each pose instance
sem            [H, W] uint8         semantic train id 0..18, 255 ignore
drivable       [H, W] uint8         0 direct, 1 alternative, 2 background, 255 ignore
lane           [H, W] uint8         the BDD100K lane byte per pixel (``bdd100k.encode_lane``,
                                    255 background); ``bdd100k.decode_lane_mask`` turns it into
                                    the decoder's direction / style / category maps
=============  ===================  ===========================================================

Label maps travel in these compact forms from the loader to the device and are expanded there
(by the losses and the metrics), which keeps the loader's per-frame work at the JPEG decode.
In training batches straight from the loader the four per-pixel fields are even more compact,
:class:`RunLengthMap` runs (a few kilobytes instead of ``H × W`` bytes each), and
:func:`data_pipeline.loading.transforms.prepare_batch` expands them on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_pipeline.loading import jpeg
from data_pipeline.bdd100k.format import TASKS
from data_pipeline.errors import DataError

TASK_INDEX = {t: i for i, t in enumerate(TASKS)}


@dataclass(frozen=True)
class AugmentPlan:
    """The geometric augmentation drawn for a batch by the loader (seeded by seed/epoch/step).

    ``height`` is the target image height (aspect kept) or ``None`` for no resize; ``flips[i]``
    says whether sample ``i`` (and its reference frame) is flipped horizontally. ``applied``
    turns True once :func:`data_pipeline.loading.transforms.prepare_batch` has run, so a batch is never
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


class EncodedImage:
    """A frame's JPEG, its header read but not decoded yet.

    The loader decodes it only where the batch's memory is (:func:`data_pipeline.loading.transfer.pack_batch`:
    inside a DataLoader worker, the shared-memory segment the batch travels in), so a frame used once is
    never copied after decoding. ``shape`` is the decoded tensor's, ``[3, H, W]``; ``where``
    and ``frame`` name it in errors.

    ``uses`` is how many times the loader will pack it (a tracking frame is often one sample's
    key frame and another's reference frame). While uses remain after a decode, the image
    remembers where its pixels are and copies them from there for the next use instead of
    decoding again; a worker's pooled segment counts only while the worker has not claimed that
    segment again (``intact``). So a frame used by two batches has the same pixels in both:
    shared (in the training process, and through workers between batches of one hand-off) or
    copied from the first (through workers, between hand-offs): batches are read-only data. The
    count only steers the reuse: a wrong one costs a second decode, or memory kept until the
    image is dropped, never wrong pixels.
    """

    __slots__ = ("data", "height", "width", "where", "frame", "uses", "_pixels", "_intact")

    def __init__(self, data: bytes | bytearray, height: int, width: int, where: str, frame: str | None = None):
        self.data, self.height, self.width, self.where, self.frame = data, height, width, where, frame
        self.uses = 1
        self._pixels: np.ndarray | None = None
        self._intact: Callable[[], bool] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.height, self.width)

    def decode_into(self, out: np.ndarray, uses: int = 1, intact: Callable[[], bool] | None = None) -> None:
        """Decode into ``out``, a C-contiguous uint8 ``[H, W, 3]`` array, for ``uses`` uses.
        ``intact`` says, later, whether ``out`` still holds these pixels (default: always)."""
        if self._pixels is not None and (self._intact is None or self._intact()):
            np.copyto(out, self._pixels)
        else:
            self._decode(out)
        if self.uses > uses:
            self._pixels, self._intact = out, intact
        self._used(uses)

    def decode(self) -> Tensor:
        """The uint8 ``[3, H, W]`` frame (a view of ``[H, W, 3]`` memory), for one use."""
        pixels = self._pixels
        if pixels is None or (self._intact is not None and not self._intact()):
            pixels = np.empty((self.height, self.width, 3), np.uint8)
            self._decode(pixels)
            if self.uses > 1:
                self._pixels, self._intact = pixels, None
        self._used(1)
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def reuse(self, uses: int = 1) -> None:
        """Count ``uses`` uses served without decoding or copying: views of the pixels another
        use decodes (:func:`data_pipeline.loading.transfer.pack_batches`)."""
        self._used(uses)

    def _decode(self, out: np.ndarray) -> None:
        try:
            jpeg.decode_into(self.data, out)
        except ValueError as e:
            raise DataError(self.where, f"corrupt JPEG: {e}", frame=self.frame, field="jpg") from None

    def _used(self, uses: int) -> None:
        self.uses -= uses
        if self.uses <= 0:
            self._pixels = self._intact = None

    def __repr__(self) -> str:
        return f"EncodedImage({self.where}, frame={self.frame!r}, {self.width}x{self.height}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class RunLengthMap:
    """A per-pixel label map ``[H, W]`` as runs in row-major order, the shard's own encoding
    (:mod:`data_pipeline.shards.format`): ``values[r]`` repeated ``lengths[r]`` times.

    ``values`` are uint8 (int32 for instance maps of more than 255 instances), ``lengths``
    positive int64 summing to ``H × W`` (the decoder checks both). :meth:`expand` runs where the
    tensors are: ``numpy.repeat`` on the CPU (about 30× faster there than torch's
    ``repeat_interleave``), ``torch.repeat_interleave`` with a known output size on an
    accelerator (no host synchronisation).
    """

    values: Tensor
    lengths: Tensor
    shape: tuple[int, int]

    def expand(self) -> Tensor:
        h, w = self.shape
        if self.values.device.type == "cpu":
            return torch.from_numpy(np.repeat(self.values.numpy(), self.lengths.numpy())).view(h, w)
        return torch.repeat_interleave(self.values, self.lengths, output_size=h * w).view(h, w)

    def max(self) -> int:
        v = self.values
        return int(v.numpy().max() if v.device.type == "cpu" else v.max())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RunLengthMap:
        return replace(self, values=self.values.to(device, non_blocking=non_blocking),
                       lengths=self.lengths.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> RunLengthMap:
        return replace(self, values=self.values.pin_memory(), lengths=self.lengths.pin_memory())


def dense(m: Tensor | RunLengthMap | None) -> Tensor | None:
    """A label map as a tensor, expanding :class:`RunLengthMap` runs."""
    return m.expand() if isinstance(m, RunLengthMap) else m


@dataclass
class FrameTargets:
    """Labels of one frame (see the module docstring for the schema)."""

    weather: int = -1
    scene: int = -1
    boxes: Tensor | None = None
    classes: Tensor | None = None
    ignore: Tensor | None = None
    track_ids: Tensor | None = None
    instance_map: Tensor | RunLengthMap | None = None
    mask_valid: Tensor | None = None
    keypoints: Tensor | None = None
    pose_boxes: Tensor | None = None
    sem: Tensor | RunLengthMap | None = None
    drivable: Tensor | RunLengthMap | None = None
    lane: Tensor | RunLengthMap | None = None

    @property
    def num_instances(self) -> int:
        return 0 if self.boxes is None else int(self.boxes.shape[0])

    def instance_masks(self, index: Tensor | None = None) -> Tensor:
        """``[n, H, W]`` bool masks of the instances ``index`` (all ``N`` by default), from
        :attr:`instance_map`, on its device. An instance without a mask gets an empty one.
        ``index`` is checked against the instance count on the CPU only (on an accelerator the
        check would synchronise the host)."""
        if self.instance_map is None:
            raise ValueError("these targets carry no instance map")
        m = dense(self.instance_map)
        n = self.num_instances
        if index is None:
            index = torch.arange(n, device=m.device)
        index = index.to(m.device)
        m = m.to(torch.int32) if m.dtype != torch.uint8 else m
        if index.device.type == "cpu" and len(index) and int(index.max()) >= n:
            raise IndexError(f"instance index {int(index.max())} out of range for {n} instances")
        return m[None] == (index + 1).to(m.dtype)[:, None, None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FrameTargets:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (Tensor, RunLengthMap)):
                kw[f.name] = v.to(device, non_blocking=non_blocking)
        return replace(self, **kw)

    def expanded(self) -> FrameTargets:
        """These targets with every :class:`RunLengthMap` expanded into a tensor."""
        kw = {n: dense(getattr(self, n)) for n in _MAP_FIELDS if isinstance(getattr(self, n), RunLengthMap)}
        return replace(self, **kw) if kw else self

    def to_pinned(self) -> FrameTargets:
        """A copy whose label maps live in pinned memory (small tensors are left as they are)."""
        kw = {n: getattr(self, n).pin_memory() for n in _MAP_FIELDS if getattr(self, n) is not None}
        return replace(self, **kw)


#: Per-pixel fields of :class:`FrameTargets`.
_MAP_FIELDS = ("instance_map", "sem", "drivable", "lane")


@dataclass
class Batch:
    """One training/eval batch; every sample comes from the same image set.

    ``images`` are, as the loader yields them, a list of uint8 ``[3, h_i, w_i]`` frames; after
    :func:`data_pipeline.loading.transforms.prepare_batch` (on the training device) a uint8
    ``[B, 3, H, W]`` tensor zero-padded at the bottom/right to a common size that is a multiple
    of ``size_divisor`` (:attr:`padded`). ``image_sizes[i] = (h, w)`` is each valid region.
    The loader does not pad: the device resizes every frame anyway, and a padded copy on the CPU
    would cost a loader worker as much time as a quarter of a JPEG decode.
    ``ref_images``/``ref_targets`` hold the reference frame of each key frame (tracking set
    only: MOT contrastive pairs and flow pairs). ``labels[i, TASK_INDEX[t]]`` is a
    :class:`LabelSource` for task ``t`` of sample ``i``. ``meta[i]`` records ``name``,
    ``video``, ``frame_index``, ``ref_frame_index``, ``flip`` and ``scale`` of sample ``i``.
    """

    set_name: str
    images: Tensor | list[Tensor]
    image_sizes: list[tuple[int, int]]
    targets: list[FrameTargets]
    labels: Tensor
    meta: list[dict[str, Any]] = field(default_factory=list)
    ref_images: Tensor | list[Tensor] | None = None
    ref_targets: list[FrameTargets] | None = None
    augment: AugmentPlan | None = None
    size_divisor: int = 32

    def __len__(self) -> int:
        return len(self.images)

    @property
    def padded(self) -> bool:
        """True once images (and reference frames) are one padded ``[B, 3, H, W]`` tensor."""
        return isinstance(self.images, Tensor)

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
            images=_map_images(self.images, lambda x: x.to(device, non_blocking=non_blocking)),
            labels=self.labels.to(device, non_blocking=non_blocking),
            targets=[t.to(device, non_blocking) for t in self.targets],
            ref_images=_map_images(self.ref_images, lambda x: x.to(device, non_blocking=non_blocking)),
            ref_targets=None if self.ref_targets is None else [t.to(device, non_blocking) for t in self.ref_targets],
        )

    def __reduce__(self):
        """Pickle as :func:`data_pipeline.loading.transfer.pack_batch` packs: one buffer for every tensor."""
        from data_pipeline.loading.transfer import pack_batch

        return pack_batch(self).__reduce__()

    def pin_memory(self) -> Batch:
        """Called by ``torch.utils.data.DataLoader(pin_memory=True)``: images and label maps."""
        return replace(
            self,
            images=_map_images(self.images, Tensor.pin_memory),
            targets=[t.to_pinned() for t in self.targets],
            ref_images=_map_images(self.ref_images, Tensor.pin_memory),
            ref_targets=None if self.ref_targets is None else [t.to_pinned() for t in self.ref_targets],
        )


def _map_images(images, fn):
    if images is None:
        return None
    return fn(images) if isinstance(images, Tensor) else [fn(x) for x in images]
