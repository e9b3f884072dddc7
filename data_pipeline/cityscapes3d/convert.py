"""``vtd data convert --format cityscapes3d``: a Cityscapes-3D root → the project's WebDataset
shards and manifest (:mod:`data_pipeline.shards.format`, :mod:`data_pipeline.shards.manifest`).

One shard family per split, ``cityscapes/{split}/cityscapes-{split}-NNNNNN.tar``; every sample is
a one-frame clip with members

=========================  ======================================================================
``K.clip.json``            ``{"set": "cityscapes", "split", "frames": [record]}`` (record below)
``K.0.png``                the ``leftImg8bit`` PNG's bytes, never re-encoded (the source is PNG)
``K.0.sem.rle``            train ids 0..18 / 255 from ``gtFine_labelIds`` (run-length, as BDD's)
``K.0.disparity.png``      the 16-bit disparity PNG's bytes (depth = baseline·fx / ((p - 1) / 256))
=========================  ======================================================================

Record: ``name`` (the ``{city}_{seq}_{frame}`` base the official evaluation keys frames by),
``city``, ``height``, ``width``, ``tasks`` (``{"sem"|"depth"|"det3d": "real"}``), ``camera``
(``fx, fy, u0, v0, baseline`` and the 3×4 ``sensor_T_ISO_8855``: the gtBbox3d file's when there is
one, else computed from the camera JSON's extrinsic), ``boxes3d`` (the objects of the six
evaluated classes: ``label``, ``class`` (index in ``DET3D_CLASSES``), ``center`` (V, m),
``dimensions`` (l, w, h), ``rotation`` (``[w, x, y, z]``), ``amodal`` / ``modal`` as
``[x1, y1, x2, y2]``, ``instance_id``, ``occlusion``, ``truncation``, ``score``), ``ignore``
(``[x1, y1, x2, y2]`` ignore regions) and ``other_objects`` (boxes of other labels, counted).

The manifest is the BDD one's structure plus ``"benchmark": "cityscapes3d"``; its task counts and
``label_sets`` use :data:`.format.TASKS`. Strict as the BDD converter: every bad input is a
:class:`~data_pipeline.errors.DataError` naming the file, the frame and the key with the bad
value; ``on_error="skip"`` leaves the frame out and lists it in the manifest. Shards and the
manifest are written atomically (temp file, then rename), the manifest last; a rerun over an
interrupted output writes every shard again. Only PNG and JSON are parsed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from webdataset.writer import TarWriter

from data_pipeline import fsio
from data_pipeline.shards import format as SF
from data_pipeline.shards.writing import Skips, clean_family
from data_pipeline.errors import DataError, VTDInputError
from data_pipeline.png import decode_png
from data_pipeline.shards.inspect import add_frame_counts, label_set_key

from . import geometry as G
from .format import BENCHMARK, DET3D_CLASS_ID, LABEL_ID, LABEL_TO_TRAIN, MAX_LABEL_ID, SET_NAME, SPLITS, TASKS, Layout

REAL = "real"
_OPTIONAL = ("label_ids", "disparity", "camera", "bbox3d")


@dataclass(frozen=True, kw_only=True)
class Cityscapes3DConvertOptions:
    """``root``: a Cityscapes root (``leftImg8bit/`` ...; local path or fsspec URI); ``out``: the
    output root URI; ``shard_size`` frames per shard; ``workers`` only changes speed."""

    root: str
    out: str
    splits: tuple[str, ...] = ("train", "val")
    shard_size: int = 1000
    workers: int = 1
    on_error: Literal["raise", "skip"] = "raise"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        v = self.splits
        object.__setattr__(self, "splits", tuple(s for s in v.split(",") if s) if isinstance(v, str) else tuple(v))
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise VTDInputError(f"splits: unknown or empty {bad or list(self.splits)}; choose from {list(SPLITS)}")
        for name in ("shard_size", "workers"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise VTDInputError(f"{name} must be a positive integer, got {n!r}")
        if self.on_error not in ("raise", "skip"):
            raise VTDInputError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")


def convert_cityscapes3d(opts: Cityscapes3DConvertOptions) -> dict[str, Any]:
    """Convert ``opts.root`` to shards under ``opts.out``; returns the manifest dict.

    Raises ``FileNotFoundError`` for a missing root or a split without images,
    ``FileExistsError`` when the output has a manifest and ``overwrite`` is false, and
    :class:`DataError` for bad input under ``on_error="raise"``.
    """
    if not fsio.exists(opts.root):
        raise FileNotFoundError(f"Cityscapes root {opts.root} does not exist")
    manifest_uri = fsio.join(opts.out, SF.MANIFEST_NAME)
    if fsio.exists(manifest_uri) and not opts.overwrite:
        raise FileExistsError(f"{manifest_uri} already exists; pass overwrite=True (--overwrite) to replace the output")
    plans = {}
    for split in opts.splits:  # plan everything first: a bad listing fails before any write
        skips = Skips(opts.on_error)
        frames = _plan_split(opts.root, split, skips)
        plans[split] = {"jobs": _jobs(split, frames, opts), "skipped": skips.items}
    if opts.overwrite:
        fsio.remove(manifest_uri)
    for split, plan in plans.items():
        clean_family(opts.out, SET_NAME, split, n_planned=len(plan["jobs"]), everything=True)
    jobs = [j for plan in plans.values() for j in plan["jobs"]]
    sidecars = _run(jobs, opts)
    manifest = _manifest(opts, plans, sidecars)
    fsio.write_json_atomic(manifest_uri, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _plan_split(root: str, split: str, skips: Skips) -> list[dict[str, Any]]:
    """Frames of ``split``: every ``leftImg8bit`` image with its label files (by city and base),
    sorted by city and name. A label file without its image is a DataError."""
    found: dict[str, dict[tuple[str, str], str]] = {}
    for kind in Layout.KINDS:
        folder = Layout.folder(kind, split)
        table: dict[tuple[str, str], str] = {}
        for rel in fsio.list_files(fsio.join(root, folder), recursive=True):
            parts = rel.split("/")
            base = Layout.base_of(parts[-1], kind)
            if len(parts) == 2 and base is not None:
                table[(parts[0], base)] = f"{folder}/{rel}"
        found[kind] = table
    images = found["image"]
    if not images:
        raise FileNotFoundError(f"no Cityscapes images under {fsio.join(root, Layout.folder('image', split))} "
                                f"(expected {Layout.path('image', split, 'CITY', 'CITY_SEQ_FRAME')}); choose the splits you have with --splits")
    orphans: dict[tuple[str, str], list[str]] = {}
    for kind in _OPTIONAL:
        for key, rel in found[kind].items():
            if key not in images:
                orphans.setdefault(key, []).append(rel)
    for (city, base), rels in sorted(orphans.items()):
        skips.handle(DataError(fsio.join(root, Layout.path("image", split, city, base)),
                               f"missing image (labelled in {', '.join(rels)})", frame=base, field="image"))
    frames = []
    for city, base in sorted(images):
        spec = {"name": base, "city": city, "split": split, "image": images[(city, base)]}
        spec.update({k: found[k].get((city, base)) for k in _OPTIONAL})
        if spec["disparity"] and not spec["camera"] and not spec["bbox3d"]:
            skips.handle(DataError(fsio.join(root, Layout.path("camera", split, city, base)),
                                   f"missing camera JSON: depth from {spec['disparity']} needs the baseline and fx",
                                   frame=base, field="camera"))
            continue
        frames.append(spec)
    return frames


def _jobs(split: str, frames: list[dict], opts: Cityscapes3DConvertOptions) -> list[dict[str, Any]]:
    jobs = []
    for n in range(math.ceil(len(frames) / opts.shard_size)):
        chunk = frames[n * opts.shard_size:(n + 1) * opts.shard_size]
        jobs.append({"split": split, "index": n, "root": opts.root, "out": opts.out, "on_error": opts.on_error,
                     "path": f"{SF.shard_dir(SET_NAME, split)}/{SF.shard_name(SET_NAME, split, n)}",
                     "frames": [dict(f, key=f"{SET_NAME}-{split}-{n * opts.shard_size + c:08d}") for c, f in enumerate(chunk)]})
    return jobs


def _run(jobs: list[dict], opts: Cityscapes3DConvertOptions) -> dict[str, dict]:
    n = min(opts.workers, len(jobs))
    if n <= 1 or fsio.is_process_local(opts.out) or fsio.is_process_local(opts.root):
        return {j["path"]: _write_shard(j) for j in jobs}
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        return dict(zip((j["path"] for j in jobs), pool.map(_write_shard, jobs)))


# ---------------------------------------------------------------------------------------------
# Writing one shard
# ---------------------------------------------------------------------------------------------


def _write_shard(job: dict[str, Any]) -> dict[str, Any]:
    uri = fsio.join(job["out"], job["path"])
    skips = Skips(job["on_error"])
    tasks = {t: {"samples": 0, "instances": 0} for t in TASKS}
    label_sets: dict[str, int] = {}
    offsets: list[int] = []
    with fsio.atomic_open(uri, "wb") as f:
        writer = TarWriter(f, encoder=False, mtime=0)
        try:
            for spec in job["frames"]:
                try:
                    record, members = build_frame(job["root"], spec)
                except DataError as e:
                    skips.handle(e)
                    continue
                sample = {"__key__": spec["key"], SF.CLIP_MEMBER: json.dumps(
                    {"set": SET_NAME, "split": job["split"], "frames": [record]}, separators=(",", ":")).encode("utf-8")}
                sample.update({SF.frame_member(0, k): v for k, v in members.items()})
                offsets.append(writer.tarstream.offset)
                writer.write(sample)
                add_frame_counts(tasks, record)  # the counting rule `vtd data inspect` checks against
                key = label_set_key(record, TASKS)
                label_sets[key] = label_sets.get(key, 0) + 1
        finally:
            writer.close()
    return {"path": job["path"], "samples": len(offsets), "clips": len(offsets), "clip_frames": [1] * len(offsets),
            "sample_offsets": offsets, "bytes": fsio.size(uri), "tasks": tasks,
            "label_sets": dict(sorted(label_sets.items())), "skipped": skips.items}


def build_frame(root: str, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One frame → (record, ``{member suffix: bytes}``); raises DataError on any bad input."""
    name = spec["name"]
    img_uri = fsio.join(root, spec["image"])
    png = _read(img_uri, name, "image")
    width, height = _check_png(png, img_uri, name, "image", modes=("RGB",))[:2]
    members: dict[str, bytes] = {"png": png}
    record: dict[str, Any] = {"name": name, "city": spec["city"], "height": height, "width": width, "tasks": {},
                              "camera": None, "boxes3d": [], "ignore": [], "other_objects": 0}
    if spec["label_ids"]:
        uri = fsio.join(root, spec["label_ids"])
        data = _read(uri, name, "label_ids")
        arr = _check_png(data, uri, name, "label_ids", modes=("L", "P"), size=(width, height))[2]
        present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
        bad = present[present > MAX_LABEL_ID]
        if bad.size:
            raise DataError(uri, f"label ids {bad[:8].tolist()} outside Cityscapes' 0..{MAX_LABEL_ID}", frame=name, field="label_ids")
        members[SF.LABEL_MEMBER["sem"]] = SF.encode_label_map(LABEL_TO_TRAIN[arr])
        record["tasks"]["sem"] = REAL
    camera = None
    if spec["camera"]:
        uri = fsio.join(root, spec["camera"])
        camera = _camera_json(_json(_read(uri, name, "camera"), uri, name), uri, name)
    if spec["bbox3d"]:
        uri = fsio.join(root, spec["bbox3d"])
        doc = _json(_read(uri, name, "bbox3d"), uri, name)
        camera = _bbox_sensor(doc, camera, uri, name, (width, height))
        record["boxes3d"], record["ignore"], record["other_objects"] = _objects(doc, uri, name)
        record["tasks"]["det3d"] = REAL
    if spec["disparity"]:
        uri = fsio.join(root, spec["disparity"])
        data = _read(uri, name, "disparity")
        _check_png(data, uri, name, "disparity", modes=("I;16", "I"), size=(width, height), max_value=65535)
        if camera is None or camera.get("baseline") is None:
            raise DataError(uri, "no baseline for this frame (camera JSON, or sensor.baseline of gtBbox3d)", frame=name, field="camera")
        members["disparity.png"] = data
        record["tasks"]["depth"] = REAL
    record["camera"] = camera
    record["tasks"] = {t: REAL for t in TASKS if t in record["tasks"]}
    return record, members


def _read(uri: str, frame: str, field: str) -> bytes:
    try:
        return fsio.read_bytes(uri)
    except FileNotFoundError:
        raise DataError(uri, "file vanished after listing", frame=frame, field=field) from None


def _check_png(data: bytes, uri: str, frame: str, field: str, *, modes: tuple[str, ...], size=None, max_value=None):
    """Decode a PNG fully (truncation and corruption are caught); check mode and size."""
    mode, wh, arr = decode_png(data, uri, frame=frame, field=field)
    if mode not in modes:
        raise DataError(uri, f"PNG mode {mode}, expected {' or '.join(modes)}", frame=frame, field=field)
    if size is not None and wh != size:
        raise DataError(uri, f"size {wh[0]}x{wh[1]} differs from the image's {size[0]}x{size[1]}", frame=frame, field=field)
    if max_value is not None and arr.size and (arr.min() < 0 or arr.max() > max_value):
        raise DataError(uri, f"values {int(arr.min())}..{int(arr.max())} outside 0..{max_value}", frame=frame, field=field)
    return wh[0], wh[1], arr


def _json(data: bytes, uri: str, frame: str) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(uri, f"malformed JSON: {e}", frame=frame) from None
    if not isinstance(doc, dict):
        raise DataError(uri, f"expected a JSON object, got {type(doc).__name__}", frame=frame)
    return doc


def _num(doc: Any, key: str, uri: str, frame: str, where: str, *, positive: bool = False) -> float:
    v = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise DataError(uri, f"{'a positive' if positive else 'a finite'} number expected, got {v!r}", frame=frame, field=f"{where}{key}")
    return float(v)


def _vec(v: Any, n: int, uri: str, frame: str, field: str, *, positive: bool = False) -> list[float]:
    ok = isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (not positive or x > 0) for x in v)
    if not ok:
        raise DataError(uri, f"{n} {'positive' if positive else 'finite'} numbers expected, got {v!r}", frame=frame, field=field)
    return [float(x) for x in v]


def _camera_json(doc: dict, uri: str, frame: str) -> dict[str, Any]:
    ext, intr = doc.get("extrinsic"), doc.get("intrinsic")
    for key, part in (("extrinsic", ext), ("intrinsic", intr)):
        if not isinstance(part, dict):
            raise DataError(uri, f"missing or not an object: {part!r}", frame=frame, field=key)
    e = {k: _num(ext, k, uri, frame, "extrinsic.") for k in ("x", "y", "z", "yaw", "pitch", "roll")}
    cam = {k: _num(intr, k, uri, frame, "intrinsic.", positive=k in ("fx", "fy")) for k in ("fx", "fy", "u0", "v0")}
    cam["baseline"] = _num(ext, "baseline", uri, frame, "extrinsic.", positive=True)
    cam["sensor_T_ISO_8855"] = G.sensor_T_iso8855(**e).tolist()
    return cam


def _bbox_sensor(doc: dict, camera: dict | None, uri: str, frame: str, size: tuple[int, int]) -> dict[str, Any]:
    """The gtBbox3d ``sensor`` (checked against the camera JSON) and image size."""
    for key, want in (("imgWidth", size[0]), ("imgHeight", size[1])):
        if doc.get(key) != want:
            raise DataError(uri, f"{doc.get(key)!r} differs from the image's {want}", frame=frame, field=key)
    sensor = doc.get("sensor")
    if not isinstance(sensor, dict):
        raise DataError(uri, f"missing or not an object: {sensor!r}", frame=frame, field="sensor")
    cam = {k: _num(sensor, k, uri, frame, "sensor.", positive=k in ("fx", "fy")) for k in ("fx", "fy", "u0", "v0")}
    t = sensor.get("sensor_T_ISO_8855")
    if not (isinstance(t, list) and len(t) == 3):
        raise DataError(uri, f"a 3x4 matrix expected, got {t!r}", frame=frame, field="sensor.sensor_T_ISO_8855")
    m = np.array([_vec(r, 4, uri, frame, "sensor.sensor_T_ISO_8855") for r in t])
    if np.abs(m[:, :3] @ m[:, :3].T - np.eye(3)).max() > 1e-3:
        raise DataError(uri, f"rotation part is not orthonormal: {m[:, :3].tolist()}", frame=frame, field="sensor.sensor_T_ISO_8855")
    cam["sensor_T_ISO_8855"] = m.tolist()
    cam["baseline"] = _num(sensor, "baseline", uri, frame, "sensor.", positive=True) if "baseline" in sensor else None
    if camera is not None:
        for k in ("fx", "fy", "u0", "v0", "baseline"):
            if cam[k] is not None and not math.isclose(cam[k], camera[k], rel_tol=1e-4, abs_tol=1e-6):
                raise DataError(uri, f"{cam[k]!r} differs from the camera JSON's {camera[k]!r}", frame=frame, field=f"sensor.{k}")
        cam["baseline"] = camera["baseline"]
    return cam


def _xywh(v: Any, uri: str, frame: str, field: str) -> list[float]:
    x, y, w, h = _vec(v, 4, uri, frame, field)
    if w < 0 or h < 0:
        raise DataError(uri, f"negative width or height in {v!r}", frame=frame, field=field)
    return [x, y, x + w, y + h]


def _objects(doc: dict, uri: str, frame: str) -> tuple[list[dict], list[list[float]], int]:
    objects, ignores = doc.get("objects"), doc.get("ignore", [])
    if not isinstance(objects, list):
        raise DataError(uri, f"a list expected, got {type(objects).__name__}", frame=frame, field="objects")
    if not isinstance(ignores, list):
        raise DataError(uri, f"a list expected, got {type(ignores).__name__}", frame=frame, field="ignore")
    boxes, other = [], 0
    for j, obj in enumerate(objects):
        f = f"objects[{j}]"
        if not isinstance(obj, dict):
            raise DataError(uri, f"an object expected, got {obj!r}", frame=frame, field=f)
        label = obj.get("label")
        if label not in LABEL_ID:
            raise DataError(uri, f"unknown label {label!r}", frame=frame, field=f"{f}.label")
        if label not in DET3D_CLASS_ID:
            other += 1
            continue
        d2, d3 = obj.get("2d"), obj.get("3d")
        if not isinstance(d2, dict) or not isinstance(d3, dict):
            raise DataError(uri, "needs '2d' and '3d' objects", frame=frame, field=f)
        amodal = _xywh(d2.get("amodal"), uri, frame, f"{f}.2d.amodal")
        modal = _xywh(d2["modal"], uri, frame, f"{f}.2d.modal") if "modal" in d2 else amodal
        rot = _vec(d3.get("rotation"), 4, uri, frame, f"{f}.3d.rotation")
        if abs(math.sqrt(sum(q * q for q in rot)) - 1.0) > 1e-3:
            raise DataError(uri, f"not a unit quaternion: {rot!r}", frame=frame, field=f"{f}.3d.rotation")
        iid = obj.get("instanceId", -1)
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise DataError(uri, f"an integer expected, got {iid!r}", frame=frame, field=f"{f}.instanceId")
        boxes.append({
            "label": label, "class": DET3D_CLASS_ID[label],
            "center": _vec(d3.get("center"), 3, uri, frame, f"{f}.3d.center"),
            "dimensions": _vec(d3.get("dimensions"), 3, uri, frame, f"{f}.3d.dimensions", positive=True),
            "rotation": rot, "amodal": amodal, "modal": modal, "instance_id": iid,
            "occlusion": _num(obj, "occlusion", uri, frame, f"{f}.") if "occlusion" in obj else 0.0,
            "truncation": _num(obj, "truncation", uri, frame, f"{f}.") if "truncation" in obj else 0.0,
            "score": _num(obj, "score", uri, frame, f"{f}.") if "score" in obj else 1.0,
        })
    regions = []
    for j, ign in enumerate(ignores):
        if not isinstance(ign, dict):
            raise DataError(uri, f"an object expected, got {ign!r}", frame=frame, field=f"ignore[{j}]")
        regions.append(_xywh(ign.get("2d"), uri, frame, f"ignore[{j}].2d"))
    return boxes, regions, other


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _manifest(opts: Cityscapes3DConvertOptions, plans: dict, sidecars: dict[str, dict]) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    totals: dict[str, Any] = {"samples": 0, "clips": 0, "shards": 0, "bytes": 0, "skipped": 0,
                              "tasks": {t: {"samples": 0, "instances": 0} for t in TASKS}}
    for split, plan in plans.items():
        shards = [{k: v for k, v in sidecars[j["path"]].items() if k != "skipped"} for j in plan["jobs"]]
        skipped = list(plan["skipped"]) + [s for j in plan["jobs"] for s in sidecars[j["path"]]["skipped"]]
        tasks = {t: {k: sum(sh["tasks"][t][k] for sh in shards) for k in ("samples", "instances")} for t in TASKS}
        entry = {"set": SET_NAME, "split": split, "shards": shards,
                 **{k: sum(sh[k] for sh in shards) for k in ("samples", "clips", "bytes")},
                 "tasks": tasks, "skipped": {"count": len(skipped), "items": skipped}}
        sets[f"{SET_NAME}/{split}"] = entry
        for k in ("samples", "clips", "bytes"):
            totals[k] += entry[k]
        totals["shards"] += len(shards)
        totals["skipped"] += len(skipped)
        for t in TASKS:
            for k in ("samples", "instances"):
                totals["tasks"][t][k] += tasks[t][k]
    options = {"root": opts.root, "splits": list(opts.splits), "shard_size": opts.shard_size, "on_error": opts.on_error}
    return {"format_version": SF.FORMAT_VERSION, "benchmark": BENCHMARK, "options": options, "sets": sets, "totals": totals}
