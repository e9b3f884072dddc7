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
``K.{i}.drivable.npz``   drivable map, uint8 ``[H, W]`` with the BDD100K values (det set)
``K.{i}.lane.npz``       lane map, uint8 ``[H, W]``, the BDD100K lane byte encoding (det set)
``K.{i}.sem.npz``        semantic map, uint8 ``[H, W]`` train ids / 255 (seg set)
``K.{i}.instances.npz``  instance-id map, uint16 ``[H, W]``: the bitmask's ``(B << 8) + A``
                         (ins_seg, or seg_track for MOTS); category and attribute bits are in
                         the record's instances (checked constant per instance)
=======================  =====================================================================

Label maps are the dataset's PNG masks decoded once at conversion time and stored as
compressed NumPy archives (one array ``m``): decoding a 720p label PNG costs about as much as
decoding the JPEG itself, an RGBA bitmask twice that, while inflating the same values is
several times cheaper (benchmarks/RESULTS.md). Values are exactly the PNG's; nothing is
resampled. Nothing is pickled: the loader reads JSON, JPEG and ``.npz`` with
``allow_pickle=False`` only.

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

import io
from typing import Final

import numpy as np

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 2

CLIP_MEMBER: Final = "clip.json"
INSTANCE_MEMBER: Final = "instances.npz"
#: Per-frame label-map members (suffix after ``{i}.``).
MASK_MEMBERS: Final = ("drivable.npz", "lane.npz", "sem.npz", INSTANCE_MEMBER)
_LABEL_DTYPES: Final = (np.dtype(np.uint8), np.dtype(np.uint16))


def encode_label_map(arr: np.ndarray) -> bytes:
    """A 2-D uint8/uint16 label map → compressed ``.npz`` bytes holding it as array ``m``."""
    if arr.ndim != 2 or arr.dtype not in _LABEL_DTYPES:
        raise ValueError(f"label maps are 2-D uint8/uint16, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, m=np.ascontiguousarray(arr))
    return buf.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_label_map`; never unpickles (``allow_pickle=False``).

    Raises ``ValueError`` for anything that is not such an archive.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if list(z.keys()) != ["m"]:
                raise ValueError(f"expected one array 'm', found {list(z.keys())}")
            arr = z["m"]
    except (OSError, EOFError, KeyError, ValueError) as e:
        raise ValueError(f"not a label map archive: {e}") from None
    if arr.ndim != 2 or arr.dtype not in _LABEL_DTYPES:
        raise ValueError(f"label maps are 2-D uint8/uint16, got {arr.dtype} {arr.shape}")
    return arr


def frame_member(i: int, kind: str) -> str:
    """Member suffix of frame ``i``'s ``kind`` (``jpg`` or one of :data:`MASK_MEMBERS`)."""
    return f"{i}.{kind}"


def shard_dir(set_name: str, split: str) -> str:
    return f"{set_name}/{split}"


def shard_name(set_name: str, split: str, index: int) -> str:
    return f"{set_name}-{split}-{index:06d}.tar"
