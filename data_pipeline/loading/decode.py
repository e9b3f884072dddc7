"""Safe decoding of shard samples into frames with typed targets.

Only JSON, JPEG (:mod:`data_pipeline.loading.jpeg`) and the shard format's run-length label maps are ever
decoded; nothing is unpickled or ``torch.load``-ed, whatever a shard contains
(shared/REFERENCE.md §4). A member this module does not know is an error, not something
silently passed through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data_pipeline.bdd100k import format as bdd100k

from data_pipeline.loading import jpeg
from data_pipeline.errors import DataError
from data_pipeline.shards.format import CLIP_MEMBER, INSTANCE_MEMBER, LABEL_MEMBER, MASK_MEMBERS, decode_label_runs
from data_pipeline.loading.structures import EncodedImage, FrameTargets, LabelSource, RunLengthMap

_SOURCES = {"real": LabelSource.REAL, "pseudo": LabelSource.PSEUDO}
_KNOWN_SUFFIXES = frozenset(("jpg",) + MASK_MEMBERS)


@dataclass
class DecodedFrame:
    """One decoded frame: uint8 image ``[3, H, W]``, its targets, label sources and record.
    (Decoded with ``compact``: the image still encoded, the label maps as runs.)"""

    image: Tensor | EncodedImage
    targets: FrameTargets
    sources: dict[str, LabelSource]
    record: dict[str, Any]


def _small(values: list, dtype: type, shape: tuple[int, ...] | None = None) -> Tensor:
    """A small tensor from a list, through numpy (several times cheaper than ``torch.tensor``)."""
    a = np.array(values, dtype=dtype)
    return torch.from_numpy(a if shape is None else a.reshape(shape))


def _instances(record: dict, ids: RunLengthMap | None, where: str) -> dict[str, Any]:
    inst = record.get("instances") or []
    n = len(inst)
    classes = [i["class"] for i in inst]
    if n and (min(classes) < 0 or max(classes) >= len(bdd100k.THING_CATEGORIES)):
        raise DataError(where, f"class id out of range: {classes}", frame=record.get("name"), field="instances.class")
    out = {
        "boxes": _small([i["box"] for i in inst], np.float32, (n, 4)),
        "classes": _small(classes, np.int64),
        "ignore": _small([bool(i["ignore"]) for i in inst], np.bool_),
        "track_ids": _small([int(i.get("track_id", -1)) for i in inst], np.int64),
    }
    if ids is not None:
        # The map's pixel value k + 1 is instance k; the masks are expanded where they are used.
        if ids.max() > n:
            raise DataError(where, f"instance map holds value {ids.max()}, the record lists {n} instances",
                            frame=record.get("name"), field=INSTANCE_MEMBER)
        out["instance_map"] = ids
        out["mask_valid"] = _small([i.get("bitmask_id") is not None for i in inst], np.bool_)
    return out


def _pose(record: dict) -> tuple[Tensor, Tensor]:
    pose = record.get("pose") or []
    p = len(pose)
    kps = _small([q["keypoints"] for q in pose], np.float32, (p, len(bdd100k.POSE_JOINTS), 3))
    boxes = _small([q["box"] for q in pose], np.float32, (p, 4))
    return kps, boxes


def decode_frame(members: dict[str, bytes], record: dict, where: str, *, compact: bool = False) -> DecodedFrame:
    """Decode one frame of a clip. ``members`` maps suffixes (``jpg``, ``lane.rle``...) to bytes.

    With ``compact`` (the training loader) the image stays encoded, an :class:`EncodedImage`
    whose header has been checked (:func:`data_pipeline.loading.transfer.pack_batch` decodes it into
    the batch's memory), and label maps come as :class:`RunLengthMap` runs (the training device
    expands them); otherwise as tensors."""
    name = record.get("name")
    if "jpg" not in members:
        raise DataError(where, "missing JPEG member", frame=name, field="jpg")
    encoded = members["jpg"]
    try:
        h, w = jpeg.read_size(encoded)
    except ValueError as e:
        raise DataError(where, f"corrupt JPEG: {e}", frame=name, field="jpg") from None
    image = EncodedImage(encoded, h, w, where, name)
    if (h, w) != (record["height"], record["width"]):
        raise DataError(where, f"image is {w}x{h}, record says {record['width']}x{record['height']}", frame=name, field="jpg")

    tasks = record.get("tasks", {})
    try:
        sources = {t: _SOURCES[v] for t, v in tasks.items()}
    except KeyError as e:
        raise DataError(where, f"unknown label source {e}", frame=name, field="tasks") from None
    unknown = set(sources) - set(bdd100k.TASKS)
    if unknown:
        raise DataError(where, f"unknown tasks {sorted(unknown)}", frame=name, field="tasks")

    def label_map(kind: str) -> RunLengthMap | None:
        if kind not in members:
            return None
        try:
            values, lengths, shape = decode_label_runs(members[kind])
        except ValueError as e:
            raise DataError(where, str(e), frame=name, field=kind) from None
        if shape != (h, w):
            raise DataError(where, f"label map is {shape[1]}x{shape[0]}, image is {w}x{h}", frame=name, field=kind)
        if values.dtype != np.uint8:
            values = values.astype(np.int32)  # uint16 instance ids: torch's indexing dtype
        elif not values.flags.writeable:  # bytes rather than the shard reader's bytearray
            values = values.copy()
        return RunLengthMap(torch.from_numpy(values), torch.from_numpy(lengths.astype(np.int64)), shape)

    t = FrameTargets()
    t.weather = -1 if record.get("weather") is None else int(record["weather"])
    t.scene = -1 if record.get("scene") is None else int(record["scene"])
    ids = label_map(INSTANCE_MEMBER)
    if record.get("instances") is not None and any(k in sources for k in ("det", "ins", "mot", "mots")):
        for k, v in _instances(record, ids, where).items():
            setattr(t, k, v)
    if "pose" in sources:
        t.keypoints, t.pose_boxes = _pose(record)
    for kind in ("sem", "drivable", "lane"):
        m = label_map(LABEL_MEMBER[kind])
        if m is not None:
            setattr(t, kind, m)
    if compact:
        return DecodedFrame(image=image, targets=t, sources=sources, record=record)
    return DecodedFrame(image=image.decode(), targets=t.expanded(), sources=sources, record=record)


def split_members(sample: dict[str, Any]) -> tuple[dict, dict[int, dict[str, bytes]]]:
    """A grouped WebDataset sample → (clip header, ``{frame index: {suffix: bytes}}``)."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if CLIP_MEMBER not in sample:
        raise DataError(where, f"sample has no {CLIP_MEMBER}", field=CLIP_MEMBER)
    try:
        clip = json.loads(sample[CLIP_MEMBER])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(where, f"malformed JSON: {e}", field=CLIP_MEMBER) from None
    if not (isinstance(clip, dict) and isinstance(clip.get("frames"), list) and all(isinstance(r, dict) for r in clip["frames"])):
        raise DataError(where, 'not a clip: expected an object whose "frames" is a list of frame records', field=CLIP_MEMBER)
    frames: dict[int, dict[str, bytes]] = {}
    for key, value in sample.items():
        if key.startswith("__") or key == CLIP_MEMBER:
            continue
        idx, _, suffix = key.partition(".")
        if not idx.isdigit() or suffix not in _KNOWN_SUFFIXES:
            raise DataError(where, f"unexpected member {key!r} (decoders only read JSON, JPEG and run-length label maps)", field=key)
        frames.setdefault(int(idx), {})[suffix] = value
    return clip, frames


def decode_clip(sample: dict[str, Any], *, compact: bool = False) -> list[DecodedFrame]:
    """Decode every frame of a grouped shard sample (see :mod:`data_pipeline.shards.format`);
    ``compact``: images left encoded and label maps as runs (see :func:`decode_frame`)."""
    clip, members = split_members(sample)
    return decode_frames(clip, members, f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}", compact=compact)


def decode_frames(clip: dict, members: dict[int, dict[str, bytes]], where: str, *, compact: bool = False) -> list[DecodedFrame]:
    """Every frame of a clip already split by :func:`split_members`."""
    return [decode_frame(members.get(i, {}), rec, where, compact=compact) for i, rec in enumerate(clip["frames"])]
