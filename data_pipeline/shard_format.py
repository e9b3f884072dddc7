"""The WebDataset shard format written by ``vtd data convert`` and read by the loader.

One shard family per BDD100K image set and split: ``{out}/{set}/{split}/{set}-{split}-{n:06d}.tar``
plus ``{out}/manifest.json``. Every sample of a shard is a *clip* of one or more consecutive
frames (det and seg clips have exactly one frame; tracking clips hold up to ``clip_len``
consecutive frames of one video, so that a key frame finds its reference frames inside its own
sample and no frame is stored twice).

Members of a sample with key ``K`` (WebDataset groups by the part before the first dot):

=======================  =====================================================================
member                   content
=======================  =====================================================================
``K.clip.json``          ``{"set", "split", "frames": [FrameRecord, ...]}`` (UTF-8 JSON)
``K.{i}.jpg``            frame ``i``'s original JPEG bytes, never re-encoded
``K.{i}.drivable.rle``   drivable map, uint8 ``[H, W]`` with the BDD100K values (det set)
``K.{i}.lane.rle``       lane map, uint8 ``[H, W]``, the BDD100K lane byte encoding (det set)
``K.{i}.sem.rle``        semantic map, uint8 ``[H, W]`` train ids / 255 (seg set)
``K.{i}.instances.rle``  instance map ``[H, W]`` (ins_seg, or seg_track for MOTS): pixel value
                         ``k + 1`` belongs to ``instances[k]`` of the frame record, 0 to none.
                         uint8 when the frame has at most 255 instances, else uint16. The
                         bitmask's own id ``(B << 8) + A`` is the instance's ``bitmask_id``;
                         category and attribute bits are in the record (checked constant per
                         instance at conversion)
=======================  =====================================================================

Label maps are the dataset's PNG masks decoded once at conversion time and stored run-length
encoded (:func:`encode_label_map`): label maps are piecewise constant along rows, so a 720p
map is a few thousand runs, which ``numpy.repeat`` expands in well under a millisecond, about
30× faster than inflating the same pixels from the PNG or from zlib (benchmarks/RESULTS.md);
decoding a label PNG costs about as much as decoding the JPEG itself. Values are exactly the
PNG's; nothing is resampled. Nothing is pickled: the loader reads JSON, JPEG and these
run-length members only.

Run-length member layout (little-endian)::

    magic  b"VRLE"   4 bytes
    dtype  b"B" | b"H"   uint8 | uint16 values
    height, width, runs   3 × uint32
    zlib( values[runs] (dtype) ‖ lengths[runs] (uint32) )

Runs follow the map in row-major order (a run may continue onto the next row); every length is
positive and the lengths sum to ``height × width``.

FrameRecord (JSON object)::

    name         str            image file name, e.g. "b1c66a42-6f7d68ca.jpg"
    video        str | null     video name (tracking set)
    frame_index  int | null     frame index within the video (tracking set)
    height,width int            image size in pixels
    tasks        {task: "real" | "pseudo"}   labelled tasks of this frame (absent = not labelled)
    weather, scene   int | null  indices into bdd100k.WEATHERS / SCENES
    timeofday    str | null
    instances    [Instance]     thing objects (det / ins / mot / mots)
    stuff        [{"category", "box", "label_id"}]   traffic lights and signs from det_20, kept
                                but not VTD detection targets
    pose         [{"box": [x1,y1,x2,y2], "keypoints": [[x, y, v] * 18], "label_id"}]
                                v: 0 unlabelled, 1 labelled but not visible, 2 visible

Instance::

    label_id     str            the label's ``id`` in the source JSON ("" for bitmask-only)
    category     str            the source category string, as written in the dataset
    class        int            thing class 0..7 after BDD100K's mapping
    box          [x1, y1, x2, y2]  float pixels (from box2d, or the mask's extent)
    ignore       bool           crowd, ``ignored``, or a mapped category (other person, ...)
    crowd, occluded, truncated  bool
    track_id     int            track id (−1 outside tracking)
    bitmask_id   int | null     instance id in the frame's ``bitmask.png`` ((B << 8) + A)
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import numpy as np

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 3

CLIP_MEMBER: Final = "clip.json"
INSTANCE_MEMBER: Final = "instances.rle"
#: Per-frame label-map members (suffix after ``{i}.``).
MASK_MEMBERS: Final = ("drivable.rle", "lane.rle", "sem.rle", INSTANCE_MEMBER)
#: Label-map member of each kind (``instances`` is the instance map).
LABEL_MEMBER: Final = {"drivable": "drivable.rle", "lane": "lane.rle", "sem": "sem.rle", "instances": INSTANCE_MEMBER}

_MAGIC: Final = b"VRLE"
_HEADER: Final = struct.Struct("<4sc3I")
_DTYPES: Final = {b"B": np.dtype("<u1"), b"H": np.dtype("<u2")}
_LENGTH: Final = np.dtype("<u4")
_MAX_PIXELS: Final = 1 << 28  # 16k x 16k: anything larger is a corrupt header, not an image


def encode_label_map(arr: np.ndarray) -> bytes:
    """A 2-D uint8/uint16 label map → run-length member bytes (layout in the module docstring)."""
    code = next((c for c, d in _DTYPES.items() if arr.dtype == d), None)
    if arr.ndim != 2 or code is None or arr.size == 0:
        raise ValueError(f"label maps are non-empty 2-D uint8/uint16, got {arr.dtype} {arr.shape}")
    flat = np.ascontiguousarray(arr).reshape(-1)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], starts, [flat.size]))
    values = flat[bounds[:-1]].astype(_DTYPES[code], copy=False)
    lengths = np.diff(bounds).astype(_LENGTH)
    header = _HEADER.pack(_MAGIC, code, arr.shape[0], arr.shape[1], len(values))
    return header + zlib.compress(values.tobytes() + lengths.tobytes(), 6)


def decode_label_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label_map`: a fresh ``[H, W]`` uint8/uint16 array.

    Raises ``ValueError`` naming what is wrong for anything that is not such a member.
    """
    if len(data) < _HEADER.size:
        raise ValueError(f"not a label map: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, code, h, w, runs = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"not a label map: magic {magic!r}, expected {_MAGIC!r}")
    if code not in _DTYPES:
        raise ValueError(f"label map dtype code {code!r} is not one of {sorted(_DTYPES)}")
    if not (0 < h * w <= _MAX_PIXELS) or not (0 < runs <= h * w):
        raise ValueError(f"label map header is inconsistent: {h}x{w} pixels in {runs} runs")
    dtype = _DTYPES[code]
    try:
        payload = zlib.decompress(data[_HEADER.size :], bufsize=runs * (dtype.itemsize + _LENGTH.itemsize))
    except zlib.error as e:
        raise ValueError(f"label map payload is corrupt: {e}") from None
    if len(payload) != runs * (dtype.itemsize + _LENGTH.itemsize):
        raise ValueError(f"label map payload holds {len(payload)} bytes, {runs} runs need "
                         f"{runs * (dtype.itemsize + _LENGTH.itemsize)}")
    values = np.frombuffer(payload, dtype=dtype, count=runs)
    lengths = np.frombuffer(payload, dtype=_LENGTH, offset=runs * dtype.itemsize)
    if int(lengths.sum(dtype=np.uint64)) != h * w or not lengths.all():
        raise ValueError(f"label map runs cover {int(lengths.sum(dtype=np.uint64))} pixels "
                         f"(zero-length runs: {int((lengths == 0).sum())}), the header says {h}x{w}")
    return np.repeat(values, lengths).reshape(h, w)


def frame_member(i: int, kind: str) -> str:
    """Member suffix of frame ``i``'s ``kind`` (``jpg`` or one of :data:`MASK_MEMBERS`)."""
    return f"{i}.{kind}"


def shard_dir(set_name: str, split: str) -> str:
    return f"{set_name}/{split}"


def shard_name(set_name: str, split: str, index: int) -> str:
    return f"{set_name}-{split}-{index:06d}.tar"
