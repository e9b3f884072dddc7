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
map is a few thousand runs (3 bytes each), which ``numpy.repeat`` expands in a tenth of a
millisecond, 10-100× faster than decoding the PNG (benchmarks/RESULTS.md); decoding a label
PNG costs about as much as decoding the JPEG itself. The runs are stored uncompressed: zlib
would halve a det frame's 10 KB of runs (next to a 170 KB JPEG) but inflating them would cost
the loader more than expanding them. The training loader does not even expand them: the runs
travel to the device, which does (:class:`data_pipeline.loading.structures.RunLengthMap`). Values are
exactly the PNG's; nothing is resampled. Nothing is pickled: the loader reads JSON, JPEG and
these run-length members only.

Run-length member layout (little-endian)::

    magic  b"VRLE"         4 bytes
    dtype  b"B" | b"H"     uint8 | uint16 values, then 3 zero bytes
    height, width, runs    3 × uint32
    lengths[runs]          uint16, each 1..65535 (longer runs are split)
    values[runs]           dtype

Runs follow the map in row-major order (a run may continue onto the next row); the lengths sum
to ``height × width``.

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
from typing import Final

import numpy as np

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 5

CLIP_MEMBER: Final = "clip.json"
INSTANCE_MEMBER: Final = "instances.rle"
#: Per-frame label-map members (suffix after ``{i}.``).
MASK_MEMBERS: Final = ("drivable.rle", "lane.rle", "sem.rle", INSTANCE_MEMBER)
#: Label-map member of each kind (``instances`` is the instance map).
LABEL_MEMBER: Final = {"drivable": "drivable.rle", "lane": "lane.rle", "sem": "sem.rle", "instances": INSTANCE_MEMBER}

_MAGIC: Final = b"VRLE"
_HEADER: Final = struct.Struct("<4sc3x3I")
_DTYPES: Final = {b"B": np.dtype("<u1"), b"H": np.dtype("<u2")}
_LENGTH: Final = np.dtype("<u2")
_MAX_RUN: Final = (1 << 16) - 1
_MAX_PIXELS: Final = 1 << 28  # 16k x 16k: anything larger is a corrupt header, not an image


def encode_label_map(arr: np.ndarray) -> bytes:
    """A 2-D uint8/uint16 label map → run-length member bytes (layout in the module docstring)."""
    code = next((c for c, d in _DTYPES.items() if arr.dtype == d), None)
    if arr.ndim != 2 or code is None or arr.size == 0:
        raise ValueError(f"label maps are non-empty 2-D uint8/uint16, got {arr.dtype} {arr.shape}")
    flat = np.ascontiguousarray(arr).reshape(-1)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], starts, [flat.size]))
    values, lengths = flat[bounds[:-1]], np.diff(bounds)
    if lengths.max() > _MAX_RUN:  # split long runs into pieces of at most _MAX_RUN
        pieces = -(-lengths // _MAX_RUN)
        values = np.repeat(values, pieces)
        first = np.cumsum(pieces) - pieces  # index of each run's first piece
        split = np.full(int(pieces.sum()), _MAX_RUN, dtype=np.int64)
        split[first + pieces - 1] = lengths - (pieces - 1) * _MAX_RUN
        lengths = split
    header = _HEADER.pack(_MAGIC, code, arr.shape[0], arr.shape[1], len(values))
    return header + lengths.astype(_LENGTH).tobytes() + values.astype(_DTYPES[code]).tobytes()


def decode_label_runs(data: bytes) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A run-length member → ``(values, lengths, (height, width))``, validated: read-only
    uint8/uint16 values and positive uint16 lengths that cover the map exactly.

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
    need = _HEADER.size + runs * (dtype.itemsize + _LENGTH.itemsize)
    if len(data) != need:
        raise ValueError(f"label map holds {len(data)} bytes, a header and {runs} runs need {need}")
    lengths = np.frombuffer(data, dtype=_LENGTH, count=runs, offset=_HEADER.size)
    values = np.frombuffer(data, dtype=dtype, count=runs, offset=_HEADER.size + runs * _LENGTH.itemsize)
    if int(lengths.sum(dtype=np.uint64)) != h * w or not lengths.all():
        raise ValueError(f"label map runs cover {int(lengths.sum(dtype=np.uint64))} pixels "
                         f"(zero-length runs: {int((lengths == 0).sum())}), the header says {h}x{w}")
    return values, lengths, (h, w)


def decode_label_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label_map`: a fresh ``[H, W]`` uint8/uint16 array.

    Raises ``ValueError`` naming what is wrong for anything that is not such a member.
    """
    values, lengths, shape = decode_label_runs(data)
    return np.repeat(values, lengths).reshape(shape)


def frame_member(i: int, kind: str) -> str:
    """Member suffix of frame ``i``'s ``kind`` (``jpg`` or one of :data:`MASK_MEMBERS`)."""
    return f"{i}.{kind}"


def shard_dir(set_name: str, split: str) -> str:
    return f"{set_name}/{split}"


def shard_name(set_name: str, split: str, index: int) -> str:
    return f"{set_name}-{split}-{index:06d}.tar"
