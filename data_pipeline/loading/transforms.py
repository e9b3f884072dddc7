"""Batch preparation on the device: multi-scale resize, horizontal flip and padding.

One implementation, in torch, that runs wherever the batch is. The loader *draws* the
augmentation (:class:`AugmentPlan`, seeded by seed/epoch/step) and yields unpadded frames with
compact label maps; by default the training step *applies* the plan and pads the batch on the
accelerator right after ``batch.to(device)`` (:func:`prepare_batch`). CPU workers then only
decode, which keeps the loader near the JPEG-decode floor (benchmarks/RESULTS.md). For CPU-only
training the loader can prepare batches in its workers instead (``LoaderConfig.augment_in_loader``).

Coordinates are continuous pixel coordinates (pixel ``i`` spans ``[i, i + 1)``), so a
horizontal flip maps ``x → W − x`` and boxes ``[x1, x2] → [W − x2, W − x1]``; keypoints swap
left/right joints (``bdd100k.POSE_FLIP_PERM``); unlabelled keypoints (v = 0) stay all-zero.
Key and reference frames of a tracking pair share the same scale and flip.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from data_pipeline.bdd100k import format as bdd100k
from data_pipeline.loading.structures import Batch, FrameTargets

#: Per-pixel target fields, all ``[H, W]`` (resized with nearest-neighbour, flipped with the image).
_MAP_FIELDS = ("instance_map", "sem", "drivable", "lane")
_FLIP_PERM = torch.tensor(bdd100k.POSE_FLIP_PERM)


def pad_images(images: list[Tensor], size_divisor: int) -> Tensor:
    """Stack ``[3, h_i, w_i]`` uint8 images into ``[B, 3, H, W]``, zero-padded bottom/right."""
    h = max(int(i.shape[-2]) for i in images)
    w = max(int(i.shape[-1]) for i in images)
    h = -(-h // size_divisor) * size_divisor
    w = -(-w // size_divisor) * size_divisor
    out = images[0].new_empty((len(images), images[0].shape[0], h, w))
    for k, im in enumerate(images):
        ih, iw = int(im.shape[-2]), int(im.shape[-1])
        out[k, :, :ih, :iw] = im
        out[k, :, ih:, :] = 0  # zero only the padding, not the whole batch
        out[k, :, :ih, iw:] = 0
    return out


def _tv():
    """torchvision's v2 functional ops, imported where first used: importing torchvision loads
    its models and ``torch._dynamo`` (7 s on the project's VM), which every DataLoader worker
    started with ``spawn`` would pay at each epoch's start just to unpickle the dataset, whose
    workers do not resize anything unless ``augment_in_loader``."""
    from torchvision.transforms.v2 import functional

    return functional


def _resize_targets(t: FrameTargets, sy: float, sx: float, size: tuple[int, int]) -> FrameTargets:
    kw: dict = {}
    TF = _tv()
    nearest = TF.InterpolationMode.NEAREST_EXACT
    for name in _MAP_FIELDS:
        m = getattr(t, name)
        if m is not None:
            kw[name] = TF.resize(m[None], list(size), interpolation=nearest, antialias=False)[0]
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    if t.boxes is not None:
        kw["boxes"] = t.boxes * scale.to(t.boxes.device)
    if t.pose_boxes is not None:
        kw["pose_boxes"] = t.pose_boxes * scale.to(t.pose_boxes.device)
    if t.keypoints is not None:
        k = t.keypoints.clone()
        k[..., 0] *= sx
        k[..., 1] *= sy
        kw["keypoints"] = k
    return replace(t, **kw)


def _flip_boxes(b: Tensor, width: int) -> Tensor:
    return torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)


def _flip_targets(t: FrameTargets, width: int) -> FrameTargets:
    kw: dict = {}
    for name in _MAP_FIELDS:
        m = getattr(t, name)
        if m is not None:
            kw[name] = m.flip(-1)
    if t.boxes is not None:
        kw["boxes"] = _flip_boxes(t.boxes, width)
    if t.pose_boxes is not None:
        kw["pose_boxes"] = _flip_boxes(t.pose_boxes, width)
    if t.keypoints is not None:
        k = t.keypoints[:, _FLIP_PERM.to(t.keypoints.device)].clone()
        labelled = k[..., 2] > 0
        k[..., 0] = torch.where(labelled, width - k[..., 0], k[..., 0])
        kw["keypoints"] = k
    return replace(t, **kw)


def _augment_one(image: Tensor, t: FrameTargets, height: int | None, flip: bool) -> tuple[Tensor, FrameTargets]:
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if height is not None and height != h:
        nw = max(1, round(w * height / h))
        image = _tv().resize(image, [height, nw], antialias=True)
        t = _resize_targets(t, height / h, nw / w, (height, nw))
        w = nw
    if flip:
        image = image.flip(-1)
        t = _flip_targets(t, w)
    return image, t


def _frames(images: Tensor | list[Tensor], sizes: list[tuple[int, int]]) -> list[Tensor]:
    """Each sample's ``[3, h, w]`` frame, from a list or a padded batch tensor."""
    if isinstance(images, Tensor):
        return [images[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
    return list(images)


def _expand_maps(batch: Batch) -> Batch:
    """Expand the loader's run-length label maps (where the batch is: on the device)."""
    targets = [t.expanded() for t in batch.targets]
    refs = None if batch.ref_targets is None else [t.expanded() for t in batch.ref_targets]
    if all(a is b for a, b in zip(targets + (refs or []), batch.targets + (batch.ref_targets or []))):
        return batch
    return replace(batch, targets=targets, ref_targets=refs)


def prepare_batch(batch: Batch) -> Batch:
    """Expand the loader's run-length label maps, apply ``batch.augment`` (scale + flip) to
    images, reference frames and every target, and pad the images into one ``[B, 3, H, W]``
    tensor (:attr:`Batch.padded`).

    Runs on the batch's device. The plan is applied once: a batch whose plan was already
    applied, or that has none, is only padded (and returned as it is if it already was).
    """
    batch = _expand_maps(batch)
    plan = batch.augment
    if plan is None or plan.applied:
        if batch.padded:
            return batch
        return replace(
            batch,
            images=pad_images(_frames(batch.images, batch.image_sizes), batch.size_divisor),
            ref_images=None if batch.ref_images is None else pad_images(_frames(batch.ref_images, batch.image_sizes), batch.size_divisor),
        )
    if len(plan.flips) != len(batch):
        raise ValueError(f"augment plan has {len(plan.flips)} flips for a batch of {len(batch)}")
    frames = _frames(batch.images, batch.image_sizes)
    ref_frames = None if batch.ref_images is None else _frames(batch.ref_images, batch.image_sizes)
    images, targets, sizes = [], [], []
    ref_images, ref_targets = [], []
    for i in range(len(batch)):
        im, t = _augment_one(frames[i], batch.targets[i], plan.height, plan.flips[i])
        images.append(im)
        targets.append(t)
        sizes.append((int(im.shape[-2]), int(im.shape[-1])))
        if ref_frames is not None:
            assert batch.ref_targets is not None
            rim, rt = _augment_one(ref_frames[i], batch.ref_targets[i], plan.height, plan.flips[i])
            ref_images.append(rim)
            ref_targets.append(rt)
    meta = [dict(m, flip=plan.flips[i], height=sizes[i][0]) for i, m in enumerate(batch.meta)]
    return replace(
        batch,
        images=pad_images(images, batch.size_divisor),
        image_sizes=sizes,
        targets=targets,
        ref_images=pad_images(ref_images, batch.size_divisor) if ref_images else None,
        ref_targets=ref_targets if ref_targets else None,
        meta=meta,
        augment=replace(plan, applied=True),
    )
