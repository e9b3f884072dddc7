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
``K.{i}.drivable.png``   BDD100K drivable mask (det set)
``K.{i}.lane.png``       BDD100K lane mask (det set)
``K.{i}.sem.png``        BDD100K semantic mask (seg set)
``K.{i}.bitmask.png``    BDD100K RGBA instance bitmask (ins_seg, or seg_track for MOTS)
=======================  =====================================================================

Masks are the dataset's own PNG files, copied byte for byte. Nothing is pickled: the loader
decodes JSON, JPEG and PNG only.

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

from typing import Final

MANIFEST_NAME: Final = "manifest.json"
FORMAT_VERSION: Final = 1

CLIP_MEMBER: Final = "clip.json"
#: Per-frame mask members (suffix after ``{i}.``).
MASK_MEMBERS: Final = ("drivable.png", "lane.png", "sem.png", "bitmask.png")


def frame_member(i: int, kind: str) -> str:
    """Member suffix of frame ``i``'s ``kind`` (``jpg`` or one of :data:`MASK_MEMBERS`)."""
    return f"{i}.{kind}"


def shard_dir(set_name: str, split: str) -> str:
    return f"{set_name}/{split}"


def shard_name(set_name: str, split: str, index: int) -> str:
    return f"{set_name}-{split}-{index:06d}.tar"
