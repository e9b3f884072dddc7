"""How a :class:`~data_pipeline.loading.structures.Batch` crosses a process boundary: one buffer.

``DataLoader`` workers hand batches to the training process through shared memory, by default
one segment and one file-descriptor round trip per tensor storage. A batch holds dozens of
tensors (images, label-map runs, boxes, classes...), and those round trips cost a worker more
than decoding its JPEGs (benchmarks/RESULTS.md). :func:`pack_batch` instead writes every tensor
of a batch into one buffer, at 64-byte aligned offsets, keeping each tensor's memory layout
(its strides; a decoded JPEG is a ``[3, H, W]`` view of ``[H, W, 3]`` memory), and frames
still encoded (:class:`~data_pipeline.loading.structures.EncodedImage`, as the loader makes them) are
decoded straight into it, so no frame is copied after decoding. The rest of the batch (names,
sizes, the augmentation plan, which tensor goes where) travels as a small tuple of plain values.

Inside a DataLoader worker the buffer is shared memory: a segment the worker reuses, which the
training process maps once (:mod:`data_pipeline.loading.shm_pool`), so a batch then travels as a
reference of a few dozen bytes. Elsewhere (``pickle.dumps(batch)``) it is a private buffer,
pickled by value. The receiving side rebuilds the batch as views of that buffer: one storage per
batch, which keeps the whole buffer alive while any tensor of the batch is.

A batch has dozens of small tensors (targets, label-map runs), so per-tensor calls cost more
than their bytes: they are packed after the frames as one block, joined and written with a
single copy, and rebuilt as numpy-backed views (a numpy call costs about a microsecond, a torch
one several on the project's VM).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_pipeline.loading import shm_pool
from data_pipeline.loading.structures import _MAP_FIELDS, AugmentPlan, Batch, EncodedImage, FrameTargets, RunLengthMap

_ALIGN = 64  # byte alignment of every packed tensor (any dtype's, and a cache line)
_PADS = tuple(bytes(-n % _ALIGN) for n in range(_ALIGN))  # zeros after n bytes, by n % _ALIGN
_SMALL = 1 << 16  # dense tensors up to this size are packed as one joined block
_SCALAR_FIELDS = ("weather", "scene")
_TENSOR_FIELDS = ("boxes", "classes", "ignore", "track_ids", "mask_valid", "keypoints", "pose_boxes")
if {f.name for f in fields(FrameTargets)} != set(_SCALAR_FIELDS + _TENSOR_FIELDS + _MAP_FIELDS):
    raise AssertionError("data_pipeline.loading.transfer does not know every FrameTargets field: update it")
_NUMPY_DTYPES = frozenset((  # torch dtypes numpy has (Tensor.numpy() works)
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
    torch.bool,
))


@dataclass(frozen=True)
class PackedBatch:
    """A batch packed by :func:`pack_batch`. It pickles without further copying and unpickles
    (or :meth:`unpack`\\ s) as a :class:`Batch`.

    ``buf`` is the buffer (a numpy array, or a shared-memory tensor the first time a pooled
    segment travels), or ``None`` for a pooled segment the receiver already holds; ``layout[i]``
    is ``(byte offset, torch dtype, shape, strides)`` of tensor ``i``; ``ref`` the pool slot.
    """

    state: tuple
    buf: np.ndarray | Tensor | None
    layout: tuple
    ref: shm_pool.SegmentRef | None

    def __reduce__(self):
        return (_rebuild_batch, (self.state, self.buf, self.layout, self.ref))

    def unpack(self) -> Batch:
        """The batch in this process (not for pooled segments, which only the process they are
        sent to unpacks)."""
        if self.ref is not None:
            raise RuntimeError("a batch packed into a worker's pooled segment is unpacked by the process it is sent to")
        return _rebuild_batch(self.state, self.buf, self.layout)


@dataclass(frozen=True)
class PackedBatches:
    """Batches packed together by :func:`pack_batches` (a DataLoader worker's hand-off). It
    pickles as its batches and unpickles (or :meth:`unpack`\\ s) as a ``list[Batch]``. A frame
    that several of them use lies once, in the buffer of the first: the layout of a later one
    gives ``(batch, tensor)`` instead of a place of its own, and its tensor is a view of that
    batch's (keeping that batch's buffer, and pooled slot, in use as long as it lives)."""

    batches: tuple[PackedBatch, ...]

    def __reduce__(self):
        return (_rebuild_batches, (self._fields(),))

    def __len__(self) -> int:
        return len(self.batches)

    def unpack(self) -> list[Batch]:
        """The batches in this process (not for pooled segments, see :meth:`PackedBatch.unpack`)."""
        if any(b.ref is not None for b in self.batches):
            raise RuntimeError("a batch packed into a worker's pooled segment is unpacked by the process it is sent to")
        return _rebuild_batches(self._fields())

    def _fields(self) -> tuple[tuple, ...]:
        # each batch's fields, not the PackedBatch objects (which would unpickle as batches on their own)
        return tuple((b.state, b.buf, b.layout, b.ref) for b in self.batches)


class _Packer:
    """Collects a batch's tensors and encoded images (each object once) and encodes the rest."""

    def __init__(self) -> None:
        self.items: list[Tensor | EncodedImage] = []
        self.uses: list[int] = []  # how often each item occurs in the batch
        self._index: dict[int, int] = {}

    def put(self, x: Tensor | EncodedImage) -> int:
        i = self._index.get(id(x))
        if i is None:
            i = self._index[id(x)] = len(self.items)
            self.items.append(x)
            self.uses.append(0)
        self.uses[i] += 1
        return i

    def images(self, images: Tensor | list | None) -> int | list[int] | None:
        if images is None:
            return None
        return self.put(images) if isinstance(images, Tensor) else [self.put(x) for x in images]

    def label_map(self, m: Tensor | RunLengthMap | None) -> int | tuple | None:
        if m is None or isinstance(m, Tensor):
            return None if m is None else self.put(m)
        return (self.put(m.values), self.put(m.lengths), m.shape)

    def targets(self, ts: list[FrameTargets] | None) -> list[tuple] | None:
        if ts is None:
            return None
        return [
            (t.weather, t.scene)
            + tuple(None if (v := getattr(t, f)) is None else self.put(v) for f in _TENSOR_FIELDS)
            + tuple(self.label_map(getattr(t, f)) for f in _MAP_FIELDS)
            for t in ts
        ]


def pack_batch(batch: Batch, *, shared: bool | None = None) -> PackedBatch:
    """``batch`` as one buffer plus a small tuple (see the module docstring).

    ``shared``: pack into shared memory (default: when called inside a DataLoader worker). A
    batch with tensors on an accelerator, or of a dtype numpy lacks, is left as it is (pickled
    field by field).
    """
    return pack_batches([batch], shared=shared).batches[0]


def pack_batches(batches: list[Batch], *, shared: bool | None = None) -> PackedBatches:
    """:func:`pack_batch` of each batch, packed together: the frames of all of them are decoded
    last, and a frame that a later batch uses again is not stored (or decoded, or copied) twice.

    A DataLoader worker packs a hand-off of several batches at once: their Python work (layouts,
    small tensors) runs back to back and then their JPEGs are decoded. Each decode streams
    megabytes through the core's caches; interleaved with it, the Python work of the next batch
    ran cold, about a fifth slower. A tracking frame is often one batch's key frame and a nearby
    batch's reference frame; the later batch gets a view of the earlier one's pixels instead of
    a copy of them (benchmarks/RESULTS.md).
    """
    frames: list[tuple[EncodedImage, np.ndarray, int, Any]] = []
    placed: dict[int, tuple[int, int]] = {}
    packed = tuple(_pack(b, shared, frames, placed, j) for j, b in enumerate(batches))
    for image, out, uses, intact in frames:  # in order: a frame's later use may copy its first
        image.decode_into(out, uses, intact)
    return PackedBatches(packed)


def _pack(batch: Batch, shared: bool | None, frames: list, placed: dict[int, tuple[int, int]],
          index: int) -> PackedBatch:
    """Batch ``index`` of a group packed, all but its frames: ``(image, target, uses, intact)``
    of each frame to decode is appended to ``frames``. ``placed`` maps the ``id`` of each frame
    an earlier batch of the group holds to ``(batch, tensor)``: such a frame is laid out as a
    reference to it; the frames placed here are added."""
    p = _Packer()
    aug = batch.augment
    state = (
        batch.set_name, p.images(batch.images), batch.image_sizes, p.targets(batch.targets), p.put(batch.labels),
        batch.meta, p.images(batch.ref_images), p.targets(batch.ref_targets),
        None if aug is None else (aug.height, aug.flips, aug.applied), batch.size_divisor,
    )
    if any(isinstance(t, Tensor) and (not t.is_cpu or t.dtype not in _NUMPY_DTYPES) for t in p.items):
        return PackedBatch(({f.name: getattr(batch, f.name) for f in fields(batch)},), None, (), None)
    # Layout: frames (decoded in place later), then tensors copied one by one (large or strided:
    # an already decoded frame, a padded image batch), then the small dense ones as one block,
    # joined and written with one copy (per-tensor numpy calls cost more than their bytes).
    layout: list = [None] * len(p.items)
    total, direct, small, mine = 0, [], [], []
    for i, t in enumerate(p.items):
        if isinstance(t, EncodedImage):
            where = placed.get(id(t))
            if where is not None:  # in an earlier batch's buffer: this batch gets a view of it
                layout[i] = where
                t.reuse(p.uses[i])
                continue
            placed[id(t)] = (index, i)
            layout[i] = (total, torch.uint8, t.shape, (1, 3 * t.width, 3))
            mine.append(i)
            total += _aligned(3 * t.height * t.width)
        else:
            a = (t.detach() if t.requires_grad else t).numpy()
            (small if a.flags.c_contiguous and a.nbytes <= _SMALL else direct).append((i, t, a))
    for i, t, a in direct:
        layout[i] = (total, t.dtype, a.shape, _dense_strides(t))
        total += _aligned(a.nbytes)
    small_start, block = total, []
    for i, t, a in small:
        layout[i] = (total, t.dtype, a.shape, t.stride())
        n = a.nbytes
        if n:  # (memoryview cannot cast a 0-d or empty array)
            block.append(a.data.cast("B") if a.ndim else a.tobytes())
        block.append(_PADS[n % _ALIGN])
        total += n + len(_PADS[n % _ALIGN])
    info = torch.utils.data.get_worker_info()
    ref = intact = None
    if not (info is not None if shared is None else shared):
        buf = send = np.empty(total, dtype=np.uint8)
    else:  # e.g. inside a DataLoader worker: write straight into shared memory (no second copy)
        pool = None if info is None else getattr(info.dataset, "buffer_pool", None)
        if pool is None:
            send = shm_pool.new_segment(total)
            buf = send.numpy()
        else:
            buf, ref, send = pool.acquire(info.id, total)
            if ref is not None:  # pixels kept here for a frame's next use: until the slot is reclaimed
                intact = functools.partial(pool.holds, ref.slot, ref.token)
    for i in mine:
        t = p.items[i]
        out = np.ndarray((t.height, t.width, 3), np.uint8, buffer=buf, offset=layout[i][0])
        frames.append((t, out, p.uses[i], intact))
    for i, _, a in direct:
        off, dtype, shape, strides = layout[i]
        item = dtype.itemsize
        np.copyto(np.ndarray(shape, a.dtype, buffer=buf, offset=off, strides=tuple(s * item for s in strides)), a)
    if total > small_start:
        buf[small_start:total] = np.frombuffer(b"".join(block), np.uint8)
    return PackedBatch(state, send, tuple(layout), ref)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides if its elements tile a block of ``numel`` without gaps in some dimension
    order (a decoded JPEG is a ``[3, H, W]`` view of ``[H, W, 3]`` memory), else contiguous ones."""
    if t.is_contiguous():
        return t.stride()
    expected, ok = 1, True
    for d in sorted(range(t.dim()), key=lambda d: t.stride(d)):  # innermost first
        if t.shape[d] != 1 and t.stride(d) != expected:
            ok = False
            break
        expected *= t.shape[d]
    if ok:
        return tuple(t.stride())
    out, step = [], 1
    for n in reversed(t.shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _rebuild_batch(state: tuple, buf: np.ndarray | Tensor | None, layout: tuple,
                   ref: shm_pool.SegmentRef | None = None) -> Batch:
    if not layout:  # not packed: the fields themselves
        return Batch(**state[0])
    return _assemble(state, _tensors(buf, layout, ref, ()))


def _rebuild_batches(batches: tuple[tuple, ...]) -> list[Batch]:
    """The batches of a :class:`PackedBatches`, from each one's ``(state, buf, layout, ref)``."""
    out, tensors = [], []
    for state, buf, layout, ref in batches:
        if not layout:
            tensors.append([])
            out.append(Batch(**state[0]))
            continue
        tensors.append(_tensors(buf, layout, ref, tensors))
        out.append(_assemble(state, tensors[-1]))
    return out


def _tensors(buf: np.ndarray | Tensor | None, layout: tuple, ref: shm_pool.SegmentRef | None,
             earlier: list[list[Tensor]] | tuple) -> list[Tensor]:
    """The tensors of a packed batch, views of its buffer (or, for a ``(batch, tensor)`` entry,
    the tensor of an earlier batch of its group, ``earlier``)."""
    if ref is not None:
        base = shm_pool.receive(ref, buf)
    else:
        base = buf if isinstance(buf, Tensor) else torch.from_numpy(buf)
    # one storage for the whole batch (it keeps the buffer, and a pooled slot, in use); a typed
    # view of it per dtype, and every tensor a strided view of that
    typed: dict[torch.dtype, Tensor] = {}
    tensors = []
    for entry in layout:
        if len(entry) == 2:
            tensors.append(earlier[entry[0]][entry[1]])
            continue
        off, dtype, shape, strides = entry
        tv = typed.get(dtype)
        if tv is None:
            size = dtype.itemsize
            tv = typed[dtype] = base[: len(base) - len(base) % size].view(dtype)
        tensors.append(torch.as_strided(tv, shape, strides, off // dtype.itemsize))
    return tensors


def _assemble(state: tuple, tensors: list[Tensor]) -> Batch:
    def images(enc):
        return None if enc is None else tensors[enc] if isinstance(enc, int) else [tensors[i] for i in enc]

    def label_map(enc):
        if enc is None or isinstance(enc, int):
            return None if enc is None else tensors[enc]
        return RunLengthMap(tensors[enc[0]], tensors[enc[1]], enc[2])

    def targets(enc):
        if enc is None:
            return None
        n = len(_TENSOR_FIELDS)
        return [
            FrameTargets(
                e[0], e[1],
                **{f: None if i is None else tensors[i] for f, i in zip(_TENSOR_FIELDS, e[2 : 2 + n])},
                **{f: label_map(m) for f, m in zip(_MAP_FIELDS, e[2 + n :])},
            )
            for e in enc
        ]

    set_name, imgs, sizes, tgts, labels, meta, ref_imgs, ref_tgts, aug, divisor = state
    return Batch(
        set_name=set_name, images=images(imgs), image_sizes=sizes, targets=targets(tgts), labels=tensors[labels],
        meta=meta, ref_images=images(ref_imgs), ref_targets=targets(ref_tgts),
        augment=None if aug is None else AugmentPlan(*aug), size_divisor=divisor,
    )


def decode_images(batch: Batch) -> Batch:
    """``batch`` with its encoded frames decoded, each into a tensor of its own (the loader in
    the training process itself, ``num_workers=0``: nothing to pack)."""
    def dec(images):
        if images is None or isinstance(images, Tensor):
            return images
        return [x.decode() if isinstance(x, EncodedImage) else x for x in images]

    return replace(batch, images=dec(batch.images), ref_images=dec(batch.ref_images))
