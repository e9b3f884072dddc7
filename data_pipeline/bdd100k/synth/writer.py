"""Writing a synthetic BDD100K root (:func:`generate`)."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline.bdd100k import format as B
from data_pipeline.bdd100k.format import Layout

from .actors import _Inst
from .render import _Frame, _Object
from .samples import _is_pose_image, _is_thing, _name, _still, _video
from .scene import JPEG_QUALITY, SIZES


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    """Atomic write: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png(a: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    if im.mode != mode:
        raise ValueError(f"mask has PIL mode {im.mode}, expected {mode}")
    im.save(buf, format="PNG")
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


def _box2d(o: _Object) -> dict[str, float]:
    return {"x1": o.box[0], "y1": o.box[1], "x2": o.box[2], "y2": o.box[3]}


def _attrs(o: _Object) -> dict[str, bool]:
    return {"occluded": o.occluded, "truncated": o.truncated, "crowd": o.crowd}


def _bitmask(fr: _Frame) -> np.ndarray:
    """RGBA bitmask of a frame's thing instances (mapped categories carry the ignore bit)."""
    n = int(fr.inst.max()) + 1
    cat, trunc, occ, crowd, ign = (np.zeros(n, np.int32) for _ in range(5))
    for o in fr.objects:
        if not _is_thing(_Inst(o.category)):
            continue
        mapped = B.IGNORE_MAP.get(o.category, o.category)
        cat[o.iid] = B.BITMASK_CATEGORIES.index(mapped) + 1
        trunc[o.iid], occ[o.iid], crowd[o.iid] = o.truncated, o.occluded, o.crowd
        ign[o.iid] = o.category in B.IGNORE_MAP
    keep = cat[fr.inst] > 0
    inst = np.where(keep, fr.inst, 0)
    return B.encode_bitmask(cat[inst], inst, truncated=trunc[inst], occluded=occ[inst], crowd=crowd[inst],
                            ignore=ign[inst])


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    existing = [root / d for d in ("images", "labels") if (root / d).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{root}: already holds a BDD100K layout ({', '.join(p.name + '/' for p in existing)}); "
                              "pass overwrite=True to replace it")
    for p in existing:  # overwrite: drop the old layout so no stale file survives
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate(out: str | os.PathLike[str], seed: int = 0, size: str = "tiny", overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic BDD100K root to ``out`` and return a JSON-able summary.

    ``size`` is a key of :data:`SIZES`. The same ``seed`` gives byte-identical files. Raises
    ``FileExistsError`` if ``out`` already holds ``images/`` or ``labels/`` and ``overwrite`` is
    false (with ``overwrite`` those two trees are deleted first).

    Summary: ``{"root", "seed", "size", "image_size": {"width", "height"}, "files",
    "sets": {set: {split: counts}}}`` with sets ``det`` (images, objects, pose_images,
    pose_persons), ``seg`` (images, objects), ``track`` and ``mots`` (videos, images, objects,
    tracks); ``objects`` counts labels (det, track) or bitmask instances (seg, mots).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    spec = SIZES[size]
    root = Path(out)
    _prepare_root(root, overwrite)
    sets: dict[str, dict[str, dict[str, int]]] = {"det": {}, "seg": {}, "track": {}, "mots": {}}
    n_files = 0

    def put(rel: str, data: bytes) -> None:
        nonlocal n_files
        _write(root / rel, data)
        n_files += 1

    for si, split in enumerate(B.SPLITS):
        # det set: det_20 + pose_21 + drivable + lane
        det_frames, pose_frames, label_id, n_obj, n_pose = [], [], 0, 0, 0
        for i in range(spec.det[si]):
            name = _name(seed, "det", split, i)
            pose = _is_pose_image(i)
            sc, fr = _still(seed, spec, "det", split, i, pose=pose)
            put(f"{Layout.images_100k(split)}/{name}.jpg", _jpeg(fr.image))
            put(f"{Layout.drivable_masks(split)}/{name}.png", _png(fr.drivable, "L"))
            put(f"{Layout.lane_masks(split)}/{name}.png", _png(fr.lane, "L"))
            labels, persons = [], []
            for o in fr.objects:
                label_id += 1
                labels.append({"id": str(label_id), "category": o.category, "attributes": _attrs(o),
                               "box2d": _box2d(o)})
                if pose and o.keypoints is not None and o.category == "pedestrian":
                    # node ids: Scalabel's schema requires one (the toolkit refuses a node without)
                    nodes = [{"location": [round(x, 2), round(y, 2)], "category": j, "id": f"{label_id}-{k}",
                              "visibility": B.POSE_VISIBLE if v else B.POSE_NOT_VISIBLE}
                             for k, ((x, y, v), j) in enumerate(zip(o.keypoints, B.POSE_JOINTS))]
                    graph = {"nodes": nodes, "edges": [], "type": B.POSE_GRAPH_TYPE}
                    persons.append({"id": str(label_id), "category": "pedestrian", "attributes": _attrs(o),
                                    "box2d": _box2d(o), "graph": graph})
            det_frames.append({"name": f"{name}.jpg", "attributes": sc.attributes(), "timestamp": 10000,
                               "labels": labels})
            if pose:
                pose_frames.append({"name": f"{name}.jpg", "attributes": sc.attributes(), "labels": persons})
            n_obj, n_pose = n_obj + len(labels), n_pose + len(persons)
        put(Layout.det_json(split), _json(det_frames))
        put(Layout.pose_json(split), _json(pose_frames))
        sets["det"][split] = {"images": len(det_frames), "objects": n_obj, "pose_images": len(pose_frames),
                              "pose_persons": n_pose}

        # seg set: sem_seg masks + ins_seg bitmasks
        n_obj = 0
        for i in range(spec.seg[si]):
            name = _name(seed, "seg", split, i)
            _, fr = _still(seed, spec, "seg", split, i, pose=False)
            put(f"{Layout.images_10k(split)}/{name}.jpg", _jpeg(fr.image))
            put(f"{Layout.sem_masks(split)}/{name}.png", _png(fr.sem, "L"))
            put(f"{Layout.ins_bitmasks(split)}/{name}.png", _png(_bitmask(fr), "RGBA"))
            n_obj += len(fr.objects)
        sets["seg"][split] = {"images": spec.seg[si], "objects": n_obj}

        # MOT videos: box_track_20
        n_obj, n_img, n_tracks = 0, 0, 0
        for v in range(spec.track_videos[si]):
            video = _name(seed, "track", split, v)
            sc, frames = _video(seed, spec, "track", split, v)
            out_frames, tracks = [], set()
            for t, fr in enumerate(frames):
                fname = f"{video}-{t:07d}.jpg"
                put(f"{Layout.images_track(split)}/{video}/{fname}", _jpeg(fr.image))
                labels = [{"id": str(o.iid), "category": o.category, "attributes": _attrs(o), "box2d": _box2d(o)}
                          for o in fr.objects]
                tracks.update(o.iid for o in fr.objects)
                out_frames.append({"name": fname, "videoName": video, "frameIndex": t, "attributes": sc.attributes(),
                                   "labels": labels})
                n_obj += len(labels)
            put(f"{Layout.box_track_dir(split)}/{video}.json", _json(out_frames))
            n_img += len(frames)
            n_tracks += len(tracks)
        sets["track"][split] = {"videos": spec.track_videos[si], "images": n_img, "objects": n_obj, "tracks": n_tracks}

        # MOTS videos: seg_track_20 bitmasks (instance id = track id)
        n_obj, n_img, n_tracks = 0, 0, 0
        for v in range(spec.mots_videos[si]):
            video = _name(seed, "mots", split, v)
            _, frames = _video(seed, spec, "mots", split, v)
            tracks = set()
            for t, fr in enumerate(frames):
                stem = f"{video}-{t:07d}"
                put(f"{Layout.images_seg_track(split)}/{video}/{stem}.jpg", _jpeg(fr.image))
                put(f"{Layout.seg_track_bitmasks(split)}/{video}/{stem}.png", _png(_bitmask(fr), "RGBA"))
                tracks.update(o.iid for o in fr.objects)
                n_obj += len(fr.objects)
            n_img += len(frames)
            n_tracks += len(tracks)
        sets["mots"][split] = {"videos": spec.mots_videos[si], "images": n_img, "objects": n_obj, "tracks": n_tracks}

    return {"root": str(root), "seed": seed, "size": size, "image_size": {"width": spec.width, "height": spec.height},
            "files": n_files, "sets": sets}
