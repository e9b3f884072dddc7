"""Reading Cityscapes-3D shards (written by :mod:`.convert`) back into frames.

Only JSON, PNG and the run-length label maps are decoded; a member this module does not know is
an error (as :mod:`data_pipeline.loading.decode` does for BDD100K shards). This is the reader the tests
and the model's target code use; the training loader's Cityscapes path is a later slice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline import fsio
from data_pipeline.shards import format as SF
from data_pipeline.errors import DataError
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.png import decode_png
from data_pipeline.shards.tar_reader import iter_samples

from .format import BENCHMARK, SET_NAME, TASKS, png_to_depth

_MEMBERS = frozenset(("png", SF.LABEL_MEMBER["sem"], "disparity.png"))


@dataclass
class CityscapesFrame:
    """One frame: ``image`` uint8 ``[H, W, 3]``; ``sem`` uint8 train ids ``[H, W]`` (255 ignore)
    or None; ``depth`` float32 metres ``[H, W]`` (0 = invalid) or None; ``record`` the shard's
    frame record (boxes3d, camera, tasks ...)."""

    image: np.ndarray
    sem: np.ndarray | None
    depth: np.ndarray | None
    record: dict[str, Any]


def _png(data: bytes, where: str, field: str) -> np.ndarray:
    return decode_png(data, where, field=field)[2]


def decode_sample(sample: dict[str, Any]) -> CityscapesFrame:
    """A grouped shard sample → :class:`CityscapesFrame`; DataError on anything unexpected."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if SF.CLIP_MEMBER not in sample:
        raise DataError(where, f"sample has no {SF.CLIP_MEMBER}", field=SF.CLIP_MEMBER)
    try:
        clip = json.loads(bytes(sample[SF.CLIP_MEMBER]).decode("utf-8"))
        record = clip["frames"][0]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise DataError(where, f"malformed clip header: {e}", field=SF.CLIP_MEMBER) from None
    if clip.get("set") != SET_NAME or len(clip["frames"]) != 1:
        raise DataError(where, f"not a one-frame {SET_NAME} clip (set {clip.get('set')!r})", field=SF.CLIP_MEMBER)
    members = {}
    for k, v in sample.items():
        if k.startswith("__") or k == SF.CLIP_MEMBER:
            continue
        idx, _, suffix = k.partition(".")
        if idx != "0" or suffix not in _MEMBERS:
            raise DataError(where, f"unknown member {k!r}", field=k)
        members[suffix] = v
    unknown = set(record.get("tasks", {})) - set(TASKS)
    if unknown:
        raise DataError(where, f"unknown tasks {sorted(unknown)}", frame=record.get("name"), field="tasks")
    if "png" not in members:
        raise DataError(where, "missing image member", frame=record.get("name"), field="0.png")
    image = _png(members["png"], where, "0.png")
    shape = (record["height"], record["width"])
    if image.shape != shape + (3,):
        raise DataError(where, f"image is {image.shape}, record says {shape}", frame=record["name"], field="0.png")
    sem = depth = None
    if "sem" in record["tasks"]:
        try:
            sem = SF.decode_label_map(bytes(members[SF.LABEL_MEMBER["sem"]]))
        except (KeyError, ValueError) as e:
            raise DataError(where, f"semantic map: {e}", frame=record["name"], field=SF.LABEL_MEMBER["sem"]) from None
    if "depth" in record["tasks"]:
        if "disparity.png" not in members:
            raise DataError(where, "missing disparity member", frame=record["name"], field="0.disparity.png")
        cam = record["camera"]
        depth = png_to_depth(_png(members["disparity.png"], where, "0.disparity.png"), cam["baseline"], cam["fx"])
    for name, arr in (("sem", sem), ("depth", depth)):
        if arr is not None and arr.shape != shape:
            raise DataError(where, f"{name} map is {arr.shape}, image is {shape}", frame=record["name"], field=name)
    return CityscapesFrame(image=image, sem=sem, depth=depth, record=record)


def iter_cityscapes_frames(uri: str, split: str) -> Iterator[CityscapesFrame]:
    """Every frame of ``split`` under the shard root ``uri``, in manifest order."""
    manifest = read_manifest(uri)
    if manifest.get("benchmark") != BENCHMARK:
        raise DataError(fsio.join(uri, SF.MANIFEST_NAME), f"benchmark {manifest.get('benchmark')!r}, expected {BENCHMARK!r}",
                        field="benchmark")
    entry = manifest["sets"].get(f"{SET_NAME}/{split}")
    if entry is None:
        raise DataError(fsio.join(uri, SF.MANIFEST_NAME), f"no split {split!r}", field="sets")
    for sh in entry["shards"]:
        url = fsio.join(uri, sh["path"])
        with fsio.open_read(url) as f:
            for sample in iter_samples(f, url):
                yield decode_sample(sample)
