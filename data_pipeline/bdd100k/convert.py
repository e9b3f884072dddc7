"""``vtd data convert``: a BDD100K root (the dataset's own layout) → WebDataset shards.

Data flow::

    plan (this process)                      write (one task per shard, any worker)
    ───────────────────                      ──────────────────────────────────────
    list image/mask folders, parse label     read + verify each JPEG (size), validate every
    JSON, check images exist, group track →  label against it, read + check masks, build the
    frames into clips, cut clips into           FrameRecords, write K.clip.json / K.i.jpg /
    shards (deterministic, hashed)           K.i.<mask>.png to <shard>.tmp-*, rename, sidecar

then the manifest is assembled from the per-shard sidecars and written last. The shard format
is :mod:`data_pipeline.shards.format`; BDD100K facts come from :mod:`data_pipeline.bdd100k.format`.

Guarantees:

* **Deterministic.** The plan (which frames go into which shard under which key) is fixed before
  any worker starts and tar members carry a fixed mtime, so shards and manifest are
  byte-identical for any ``workers``.
* **Atomic and resumable.** A shard appears under its final name only when complete; its
  sidecar ``<shard>.json`` (counts + a hash of the shard's plan) is written after it. A rerun
  over an interrupted output (no manifest yet) skips every shard whose sidecar matches the
  current plan and whose size matches the sidecar. The manifest is written last.
* **Strict.** Every bad input is a :class:`~data_pipeline.errors.DataError` naming file, frame
  and field. ``on_error="raise"`` stops the conversion with it (also from worker processes);
  ``on_error="skip"`` leaves the offending frame out (a tracking frame drops out of its clip)
  and lists it under ``skipped`` in the manifest. No label is altered or dropped silently.
* **Safe.** Only JSON, JPEG and PNG are parsed; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from webdataset.writer import TarWriter

from data_pipeline.bdd100k import format as B
from data_pipeline import fsio
from data_pipeline.shards import format as SF
from data_pipeline.shards.writing import Skips, clean_family
from data_pipeline.shards.format import INSTANCE_MEMBER, LABEL_MEMBER, encode_label_map
from data_pipeline.errors import DataError, VTDInputError
from data_pipeline.png import decode_png
from data_pipeline.shards.inspect import add_frame_counts, empty_task_counts, label_set_key, merge_task_counts, sort_task_counts

REAL = "real"
#: Labelled-source paths are relative to the BDD100K root; FrameSpec/ShardJob are plain
#: JSON-able dicts so that they hash stably and cross process boundaries cheaply.
FrameSpec = dict[str, Any]
ShardJob = dict[str, Any]

_WEATHER_ID = {w: i for i, w in enumerate(B.WEATHERS)}
_SCENE_ID = {s: i for i, s in enumerate(B.SCENES)}
_JOINT_ID = {j: i for i, j in enumerate(B.POSE_JOINTS)}
_VISIBILITY = {B.POSE_VISIBLE: 2, B.POSE_NOT_VISIBLE: 1}
_ATTR_FLAGS = ("occluded", "truncated", "crowd", "ignored")


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Options of one conversion (``vtd data convert``).

    ``bdd_root`` is a BDD100K root (``images/`` + ``labels/``; local path or fsspec URI) and
    ``out`` the output root URI. ``shard_size`` counts samples (clips) per shard; ``clip_len`` is
    the most frames per tracking clip. ``workers`` only changes speed, never the output.
    """

    bdd_root: str
    out: str
    sets: tuple[str, ...] = B.SETS
    splits: tuple[str, ...] = B.SPLITS
    shard_size: int = 1000
    clip_len: int = 8
    workers: int = 1
    on_error: Literal["raise", "skip"] = "raise"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("sets", "splits"):  # "det,seg" is accepted as well as ("det", "seg")
            v = getattr(self, name)
            object.__setattr__(self, name, tuple(s for s in v.split(",") if s) if isinstance(v, str) else tuple(v))
        bad = [s for s in self.sets if s not in B.SETS]
        if bad or not self.sets:
            raise VTDInputError(f"sets: unknown or empty {bad or list(self.sets)}; choose from {list(B.SETS)}")
        bad = [s for s in self.splits if s not in B.SPLITS]
        if bad or not self.splits:
            raise VTDInputError(f"splits: unknown or empty {bad or list(self.splits)}; choose from {list(B.SPLITS)}")
        for name in ("shard_size", "clip_len", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VTDInputError(f"{name} must be a positive integer, got {v!r}")
        if self.on_error not in ("raise", "skip"):
            raise VTDInputError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def families(self) -> list[tuple[str, str]]:
        """(set, split) pairs to convert, in the canonical ``SETS`` × ``SPLITS`` order."""
        return [(s, sp) for s in B.SETS if s in self.sets for sp in B.SPLITS if sp in self.splits]

    def manifest_options(self) -> dict[str, Any]:
        """The options that determine the output (not workers / overwrite / progress)."""
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k])
                for k in ("bdd_root", "sets", "splits", "shard_size", "clip_len", "on_error")}


# =============================================================================================
# Entry point
# =============================================================================================


def convert(opts: ConvertOptions) -> dict[str, Any]:
    """Convert ``opts.bdd_root`` to shards under ``opts.out``; returns the manifest dict.

    Raises ``FileExistsError`` if ``{out}/manifest.json`` exists and ``overwrite`` is False,
    ``FileNotFoundError`` if the root, or every label source of a requested set/split, is
    missing, and :class:`DataError` for bad input when ``on_error="raise"``.
    """
    if not fsio.exists(opts.bdd_root):
        raise FileNotFoundError(f"BDD100K root {opts.bdd_root} does not exist")
    manifest_uri = fsio.join(opts.out, SF.MANIFEST_NAME)
    if fsio.exists(manifest_uri) and not opts.overwrite:
        raise FileExistsError(f"{manifest_uri} already exists; pass overwrite=True (--overwrite) to replace the output")

    # 1. Plan everything before touching the output: a bad label file fails here, output intact.
    families = {}
    for set_name, split in opts.families():
        skips = Skips(opts.on_error)
        clips = _PLANNERS[set_name](opts.bdd_root, split, opts.clip_len, skips)
        families[(set_name, split)] = {"jobs": _shard_jobs(set_name, split, clips, opts), "skipped": skips.items}

    # 2. Prepare the output: overwrite clears the families; a resume clears only debris.
    if opts.overwrite:
        fsio.remove(manifest_uri)
    for f in fsio.list_files(opts.out):
        if f.startswith(SF.MANIFEST_NAME + fsio.TMP_MARKER):  # debris of an interrupted manifest write
            fsio.remove(fsio.join(opts.out, f))
    for (set_name, split), fam in families.items():
        clean_family(opts.out, set_name, split, n_planned=len(fam["jobs"]), everything=opts.overwrite)

    # 3. Write the shards that are not already complete.
    jobs = [j for fam in families.values() for j in fam["jobs"]]
    done = {} if opts.overwrite else {j["path"]: s for j in jobs if (s := _complete_sidecar(j, opts)) is not None}
    todo = [j for j in jobs if j["path"] not in done]
    done.update(_run_jobs(todo, opts, total=sum(j["n_clips"] for j in jobs),
                          initial=sum(j["n_clips"] for j in jobs if j["path"] in done)))

    # 4. The manifest, last and atomically.
    manifest = _manifest(opts, families, done)
    fsio.write_json_atomic(manifest_uri, manifest)
    return manifest


# =============================================================================================
# Errors: raise or count
# =============================================================================================


# =============================================================================================
# Planning (parent process): listings, label JSON, existence checks, clips, shards
# =============================================================================================


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _png_by_stem(root: str, rel_dir: str) -> dict[str, str]:
    """``{stem: rel path}`` of the PNG files directly in ``rel_dir``."""
    return {_stem(n): f"{rel_dir}/{n}" for n in fsio.list_files(fsio.join(root, rel_dir)) if n.endswith(".png")}


def _jpg_by_stem(names: list[str]) -> dict[str, str]:
    return {_stem(n): n for n in names if n.lower().endswith((".jpg", ".jpeg"))}


def _load_frames(root: str, rel: str, skips: Skips) -> list[tuple[int, dict]] | None:
    """The frames of a Scalabel/BDD100K label file as ``(position, frame)``; ``None`` if absent.

    Accepts a list of frames or ``{"frames": [...]}``. A malformed file is one DataError (then
    ``[]`` under skip); a malformed frame entry is one DataError per entry.
    """
    uri = fsio.join(root, rel)
    try:
        raw = fsio.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        skips.handle(DataError(uri, f"malformed JSON: {e}"))
        return []
    frames = doc.get("frames") if isinstance(doc, dict) else doc
    if not isinstance(frames, list):
        skips.handle(DataError(uri, f"expected a list of frames (or {{'frames': [...]}}), got {type(doc).__name__}"))
        return []
    out = []
    for k, fr in enumerate(frames):
        if not isinstance(fr, dict):
            skips.handle(DataError(uri, f"frame entry must be an object, got {type(fr).__name__}", frame=f"#{k}"))
        elif not isinstance(fr.get("name"), str) or not fr["name"]:
            skips.handle(DataError(uri, f"missing or invalid name {fr.get('name')!r}", frame=f"#{k}", field="name"))
        elif not isinstance(fr.get("labels", []), (list, type(None))):
            skips.handle(DataError(uri, f"labels must be a list, got {type(fr['labels']).__name__}",
                                   frame=fr["name"], field="labels"))
        else:
            out.append((k, fr))
    return out


def _missing_image(root: str, rel_image: str, name: str, sources: list[str]) -> DataError:
    return DataError(fsio.join(root, rel_image), f"missing image (labelled in {', '.join(sources)})",
                     frame=name, field="image")


def _no_sources(set_name: str, split: str, root: str, rels: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"no BDD100K {set_name}/{split} labels under {root} (looked for {', '.join(rels)}); "
        f"choose the sets/splits you have with --sets/--splits"
    )


def _frame_spec(name: str, image: str, **kw: Any) -> FrameSpec:
    spec: FrameSpec = {"name": name, "image": image, "video": None, "frame_index": None, "det": None, "pose": None,
                       "track": None, "masks": {}, "bitmask_tasks": [], "flow": False}
    spec.update(kw)
    return spec


def _plan_det(root: str, split: str, clip_len: int, skips: Skips) -> list[list[FrameSpec]]:
    """det set: frames of det_20 ∪ pose_21 ∪ drivable/lane masks, one frame per clip.

    Order: det_20 order, then pose-only frames in pose_21 order, then mask-only images by stem.
    """
    img_dir, det_rel, pose_rel = B.Layout.images_100k(split), B.Layout.det_json(split), B.Layout.pose_json(split)
    drv_dir, lane_dir = B.Layout.drivable_masks(split), B.Layout.lane_masks(split)
    images = set(fsio.list_files(fsio.join(root, img_dir)))
    by_stem = _jpg_by_stem(sorted(images))
    drivable, lane = _png_by_stem(root, drv_dir), _png_by_stem(root, lane_dir)
    det_frames = _load_frames(root, det_rel, skips)
    pose_frames = _load_frames(root, pose_rel, skips)
    if det_frames is None and pose_frames is None and not drivable and not lane:
        raise _no_sources("det", split, root, [det_rel, pose_rel, drv_dir, lane_dir])

    order: dict[str, None] = {}  # insertion-ordered set of frame names
    det_by_name: dict[str, dict] = {}
    pose_by_name: dict[str, dict] = {}
    for rel, frames, table in ((det_rel, det_frames, det_by_name), (pose_rel, pose_frames, pose_by_name)):
        for k, fr in frames or ():
            name = fr["name"]
            if name in table:
                skips.handle(DataError(fsio.join(root, rel), f"duplicate frame (entry #{k})", frame=name, field="name"))
                continue
            table[name] = fr
            order.setdefault(name)
    for stem in sorted(set(drivable) | set(lane)):
        order.setdefault(by_stem.get(stem, f"{stem}.jpg"))

    clips = []
    for name in order:
        stem = _stem(name)
        masks = {k: v for k, v in (("drivable", drivable.get(stem)), ("lane", lane.get(stem))) if v}
        if name not in images:
            sources = ([det_rel] if name in det_by_name else []) + ([pose_rel] if name in pose_by_name else [])
            skips.handle(_missing_image(root, f"{img_dir}/{name}", name, sources + sorted(masks.values())))
            continue
        clips.append([_frame_spec(
            name, f"{img_dir}/{name}",
            det={"file": det_rel, "frame": det_by_name[name]} if name in det_by_name else None,
            pose={"file": pose_rel, "frame": pose_by_name[name]} if name in pose_by_name else None,
            masks=masks,
        )])
    return clips


def _plan_seg(root: str, split: str, clip_len: int, skips: Skips) -> list[list[FrameSpec]]:
    """seg set (10K images): every image with a sem_seg mask or an ins_seg bitmask, by stem."""
    img_dir, sem_dir, ins_dir = B.Layout.images_10k(split), B.Layout.sem_masks(split), B.Layout.ins_bitmasks(split)
    by_stem = _jpg_by_stem(fsio.list_files(fsio.join(root, img_dir)))
    sem, ins = _png_by_stem(root, sem_dir), _png_by_stem(root, ins_dir)
    if not sem and not ins:
        raise _no_sources("seg", split, root, [sem_dir, ins_dir])
    clips = []
    for stem in sorted(set(sem) | set(ins)):
        masks = {k: v for k, v in (("sem", sem.get(stem)), ("bitmask", ins.get(stem))) if v}
        name = by_stem.get(stem)
        if name is None:
            skips.handle(_missing_image(root, f"{img_dir}/{stem}.jpg", f"{stem}.jpg", sorted(masks.values())))
            continue
        clips.append([_frame_spec(name, f"{img_dir}/{name}", masks=masks, bitmask_tasks=["ins"] if ins.get(stem) else [])])
    return clips


def _track_ids(frames: list[dict]) -> dict[str, int]:
    """``{label id: track id}`` for one video: the ids themselves when all are non-negative
    integers (and distinct as integers), else consecutive ints in first-appearance order."""
    ids: list[str] = []
    seen: set[str] = set()
    for fr in frames:
        for lab in fr.get("labels") or ():
            s = str(lab["id"])
            if s not in seen:
                seen.add(s)
                ids.append(s)
    if all(re.fullmatch(r"\d+", s) for s in ids) and len({int(s) for s in ids}) == len(ids):
        return {s: int(s) for s in ids}
    return {s: i for i, s in enumerate(ids)}


def _plan_track(root: str, split: str, clip_len: int, skips: Skips) -> list[list[FrameSpec]]:
    """track set: box_track_20 videos (mot, flow), then seg_track_20 bitmask videos (mots, mot,
    flow); each video's frames, ordered by frame index, cut into clips of consecutive frames."""
    bt_dir, st_dir = B.Layout.box_track_dir(split), B.Layout.seg_track_bitmasks(split)
    img_dir, st_img_dir = B.Layout.images_track(split), B.Layout.images_seg_track(split)
    bt_files = [f for f in fsio.list_files(fsio.join(root, bt_dir)) if f.endswith(".json")]
    st_files = [f for f in fsio.list_files(fsio.join(root, st_dir), recursive=True) if f.endswith(".png") and f.count("/") == 1]
    if not bt_files and not st_files:
        raise _no_sources("track", split, root, [bt_dir, st_dir])

    videos: list[list[FrameSpec]] = []
    track_images = set(fsio.list_files(fsio.join(root, img_dir), recursive=True)) if bt_files else set()
    for fname in bt_files:
        rel = f"{bt_dir}/{fname}"
        uri = fsio.join(root, rel)
        by_video: dict[str, dict[int, dict]] = {}
        for k, fr in _load_frames(root, rel, skips) or ():
            name, idx = fr["name"], fr.get("frameIndex")
            video = fr.get("videoName") or _stem(fname)
            labels = fr.get("labels") or []
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                skips.handle(DataError(uri, f"frameIndex must be a non-negative integer, got {idx!r}", frame=name, field="frameIndex"))
                continue
            if not isinstance(video, str):
                skips.handle(DataError(uri, f"videoName must be a string, got {video!r}", frame=name, field="videoName"))
                continue
            if idx in by_video.get(video, {}):
                skips.handle(DataError(uri, f"duplicate frameIndex {idx} (also frame {by_video[video][idx]['name']})",
                                       frame=name, field="frameIndex"))
                continue
            bad = next((j for j, lab in enumerate(labels)
                        if not isinstance(lab, dict) or isinstance(lab.get("id"), bool)
                        or not isinstance(lab.get("id"), (str, int)) or lab.get("id") == ""), None)
            if bad is not None:
                lab = labels[bad]
                skips.handle(DataError(uri, f"tracking label needs an id, got {lab.get('id') if isinstance(lab, dict) else lab!r}",
                                       frame=name, field=f"labels[{bad}].id"))
                continue
            if f"{video}/{name}" not in track_images:
                skips.handle(_missing_image(root, f"{img_dir}/{video}/{name}", name, [rel]))
                continue
            by_video.setdefault(video, {})[idx] = fr
        for video in sorted(by_video):
            frames = [by_video[video][i] for i in sorted(by_video[video])]
            tid = _track_ids(frames)
            videos.append([_frame_spec(
                fr["name"], f"{img_dir}/{video}/{fr['name']}", video=video, frame_index=fr["frameIndex"],
                track={"file": rel, "labels": fr.get("labels") or [],
                       "track_ids": [tid[str(lab["id"])] for lab in fr.get("labels") or ()]},
                flow=True,
            ) for fr in frames])

    st_by_video: dict[str, list[str]] = {}
    for f in st_files:
        video, png = f.split("/")
        st_by_video.setdefault(video, []).append(png)
    for video in sorted(st_by_video):
        names = sorted(n for n in fsio.list_files(fsio.join(root, st_img_dir, video)) if n.lower().endswith((".jpg", ".jpeg")))
        position = {_stem(n): (i, n) for i, n in enumerate(names)}
        frames = []
        for png in sorted(st_by_video[video]):
            mask_rel = f"{st_dir}/{video}/{png}"
            if _stem(png) not in position:
                skips.handle(_missing_image(root, f"{st_img_dir}/{video}/{_stem(png)}.jpg", f"{_stem(png)}.jpg", [mask_rel]))
                continue
            i, name = position[_stem(png)]
            frames.append(_frame_spec(name, f"{st_img_dir}/{video}/{name}", video=video, frame_index=i,
                                      masks={"bitmask": mask_rel}, bitmask_tasks=["mots", "mot"], flow=True))
        if frames:
            videos.append(frames)

    clips: list[list[FrameSpec]] = []
    for frames in videos:
        clip: list[FrameSpec] = []
        for fr in frames:
            if clip and (len(clip) == clip_len or fr["frame_index"] != clip[-1]["frame_index"] + 1):
                clips.append(clip)
                clip = []
            clip.append(fr)
        if clip:
            clips.append(clip)
    return clips


_PLANNERS = {"det": _plan_det, "seg": _plan_seg, "track": _plan_track}


def _shard_jobs(set_name: str, split: str, clips: list[list[FrameSpec]], opts: ConvertOptions) -> list[ShardJob]:
    """Cut a family's clips into shards of ``shard_size``; keys are ``{set}-{split}-{clip:08d}``."""
    jobs = []
    for n in range(math.ceil(len(clips) / opts.shard_size)):
        chunk = clips[n * opts.shard_size:(n + 1) * opts.shard_size]
        job_clips = [{"key": f"{set_name}-{split}-{n * opts.shard_size + c:08d}", "frames": frames}
                     for c, frames in enumerate(chunk)]
        plan = {"format_version": SF.FORMAT_VERSION, "set": set_name, "split": split, "clips": job_clips}
        jobs.append({
            "set": set_name, "split": split, "index": n,
            "path": f"{SF.shard_dir(set_name, split)}/{SF.shard_name(set_name, split, n)}",
            "bdd_root": opts.bdd_root, "out": opts.out, "on_error": opts.on_error,
            "clips": job_clips, "n_clips": len(job_clips),
            "plan": hashlib.sha256(json.dumps(plan, sort_keys=True).encode("utf-8")).hexdigest(),
        })
    return jobs


# =============================================================================================
# Output directory: cleaning, resume
# =============================================================================================


def _complete_sidecar(job: ShardJob, opts: ConvertOptions) -> dict | None:
    """The sidecar of ``job`` if its shard is complete for the current plan, else None."""
    shard_uri = fsio.join(opts.out, job["path"])
    try:
        side = json.loads(fsio.read_bytes(shard_uri + ".json").decode("utf-8"))
        nbytes = fsio.size(shard_uri)
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(side, dict) or side.get("plan") != job["plan"] or side.get("bytes") != nbytes:
        return None
    if not all(k in side for k in ("samples", "clips", "clip_frames", "sample_offsets", "tasks", "label_sets", "skipped")):
        return None  # an older build's sidecar: the shard is written again
    if opts.on_error == "raise" and side.get("skipped"):
        return None  # written under skip; a strict run must see (and raise) those errors
    return side


def _run_jobs(jobs: list[ShardJob], opts: ConvertOptions, *, total: int, initial: int) -> dict[str, dict]:
    """Write ``jobs``' shards; returns ``{shard path: sidecar}``. Same code in- and out-of-process."""
    results: dict[str, dict] = {}
    n_workers = min(opts.workers, len(jobs))
    # memory:// lives in this process only; worker processes would write into their own copy.
    in_process = n_workers <= 1 or fsio.is_process_local(opts.out) or fsio.is_process_local(opts.bdd_root)
    if in_process:
        with tqdm(total=total, initial=initial, unit="clip", desc="convert", disable=not opts.progress) as bar:
            for job in jobs:
                results[job["path"]] = _write_shard(job)
                bar.update(job["n_clips"])
        return results
    # fork on Linux: workers inherit the imported modules (webdataset pulls in torch: seconds
    # per spawned process). Processes start at the first submit, before tqdm's monitor thread.
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx)
    try:
        futures = {pool.submit(_write_shard, job): job for job in jobs}
        with tqdm(total=total, initial=initial, unit="clip", desc="convert", disable=not opts.progress) as bar:
            for fut in as_completed(futures):
                job = futures[fut]
                results[job["path"]] = fut.result()  # a worker's DataError re-raises here, message intact
                bar.update(job["n_clips"])
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


# =============================================================================================
# Writing one shard (any process)
# =============================================================================================


def _write_shard(job: ShardJob) -> dict[str, Any]:
    """Validate and write one shard atomically, then its sidecar; returns the sidecar."""
    shard_uri = fsio.join(job["out"], job["path"])
    skips = Skips(job["on_error"])
    counts = empty_task_counts(job["set"])
    label_sets: dict[str, int] = {}
    with fsio.atomic_open(shard_uri, "wb") as f:
        # Fixed mtime: reproducible bytes. An int, not 0.0: tarfile stores a float mtime in an
        # extra PAX header block per member, which doubles the header parsing every reader does.
        writer = TarWriter(f, encoder=False, mtime=0)
        try:
            clip_frames, offsets = _write_clips(writer, job, skips, counts, label_sets)
        finally:
            writer.close()  # also on error: flush into the temp file (then discarded), not at GC time
    sidecar = {
        "format_version": SF.FORMAT_VERSION, "path": job["path"], "plan": job["plan"],
        "samples": sum(clip_frames), "clips": len(clip_frames), "clip_frames": clip_frames, "sample_offsets": offsets,
        "bytes": fsio.size(shard_uri),
        "tasks": sort_task_counts(counts), "label_sets": dict(sorted(label_sets.items())), "skipped": skips.items,
    }
    fsio.write_json_atomic(shard_uri + ".json", sidecar)
    return sidecar


def _write_clips(writer: TarWriter, job: ShardJob, skips: Skips, counts: dict,
                 label_sets: dict[str, int]) -> tuple[list[int], list[int]]:
    """Validate and write ``job``'s clips, counting their frames per task (``counts``) and per
    set of labelled tasks (``label_sets``); returns the frames of each clip written and the
    byte offset in the tar where each begins."""
    set_name, split, root = job["set"], job["split"], job["bdd_root"]
    clip_frames, offsets = [], []
    for clip in job["clips"]:
        sample: dict[str, Any] = {"__key__": clip["key"]}
        records = []
        for spec in clip["frames"]:
            try:
                record, members = _build_frame(root, spec)
            except DataError as e:
                skips.handle(e)  # raise, or drop this frame (from its clip) and count it
                continue
            for kind, data in members.items():
                sample[SF.frame_member(len(records), kind)] = data
            records.append(record)
        if not records:
            continue
        clip_doc = {"set": set_name, "split": split, "frames": records}
        sample[SF.CLIP_MEMBER] = json.dumps(clip_doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        offsets.append(writer.tarstream.offset)  # the archive's offset (written or still buffered)
        writer.write(sample)
        for r in records:
            add_frame_counts(counts, r)
            key = label_set_key(r)
            label_sets[key] = label_sets.get(key, 0) + 1
        clip_frames.append(len(records))
    return clip_frames, offsets


def _build_frame(root: str, spec: FrameSpec) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One frame → (FrameRecord, ``{member kind: bytes}``). Raises DataError on any bad input."""
    name = spec["name"]
    img_uri = fsio.join(root, spec["image"])
    try:
        jpg = fsio.read_bytes(img_uri)
    except FileNotFoundError:
        raise DataError(img_uri, "missing image", frame=name, field="image") from None
    width, height = _verify_jpeg(jpg, img_uri, name)
    members = {"jpg": jpg}
    tasks: set[str] = set()
    record: dict[str, Any] = {
        "name": name, "video": spec["video"], "frame_index": spec["frame_index"], "height": height, "width": width,
        "tasks": {}, "weather": None, "scene": None, "timeofday": None, "instances": [], "stuff": [], "pose": [],
    }
    size = (width, height)

    if spec["det"] is not None:
        file, fr = fsio.join(root, spec["det"]["file"]), spec["det"]["frame"]
        record["weather"], record["scene"], record["timeofday"] = _tags(fr, file, name)
        if record["weather"] is not None or record["scene"] is not None:
            tasks.add("tag")
        instances, stuff = _box_labels(fr.get("labels") or [], file, name, size, track_ids=None)
        record["instances"] += instances
        record["stuff"] += stuff
        tasks.add("det")
    if spec["pose"] is not None:
        file, fr = fsio.join(root, spec["pose"]["file"]), spec["pose"]["frame"]
        record["pose"] = _pose_labels(fr.get("labels") or [], file, name, size)
        tasks.add("pose")
    if spec["track"] is not None:
        tr = spec["track"]
        instances, stuff = _box_labels(tr["labels"], fsio.join(root, tr["file"]), name, size, track_ids=tr["track_ids"])
        record["instances"] += instances
        record["stuff"] += stuff
        tasks.add("mot")

    for kind in ("drivable", "lane", "sem", "bitmask"):
        rel = spec["masks"].get(kind)
        if rel is None:
            continue
        mask_uri = fsio.join(root, rel)
        try:
            png = fsio.read_bytes(mask_uri)
        except FileNotFoundError:
            raise DataError(mask_uri, "missing mask", frame=name, field=kind) from None
        arr = _read_mask(png, kind, mask_uri, name, size)
        if kind == "bitmask":
            tracking = "mots" in spec["bitmask_tasks"]
            found = _bitmask_instances(arr, mask_uri, name, tracking=tracking)
            members[INSTANCE_MEMBER] = encode_label_map(_instance_map(arr, found, offset=len(record["instances"])))
            record["instances"] += found
            tasks.update(spec["bitmask_tasks"])
        else:
            members[LABEL_MEMBER[kind]] = encode_label_map(arr)
            tasks.add(kind)
    if spec["flow"]:
        tasks.add("flow")
    record["tasks"] = {t: REAL for t in B.TASKS if t in tasks}
    return record, members


# ---------------------------------------------------------------------------------------------
# Validation helpers (all raise DataError naming file, frame and field)
# ---------------------------------------------------------------------------------------------


def _verify_jpeg(data: bytes, uri: str, frame: str) -> tuple[int, int]:
    """(width, height) of a JPEG after decoding it (at 1/8 scale: cheap, yet every entropy-coded
    block is read, so truncation and corruption are caught)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise DataError(uri, f"not a JPEG image (format {im.format})", frame=frame, field="image")
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except DataError:
        raise
    except UnidentifiedImageError:  # its message holds an object address: keep output deterministic
        raise DataError(uri, "corrupt image: not a recognisable image file", frame=frame, field="image") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise DataError(uri, f"corrupt image: {type(e).__name__}: {e}", frame=frame, field="image") from None
    return size


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_box(b: Any, size: tuple[int, int], file: str, frame: str, field: str) -> list[float]:
    """A BDD100K ``box2d`` → continuous ``[x1, y1, x2, y2]``; strict: inside the image, non-degenerate.

    Scalabel's ``box2d`` is inclusive (``x2``/``y2`` is the last pixel of the box, so a
    one-pixel box has ``x2 == x1``); the shards hold continuous pixel coordinates, the same as
    boxes taken from a mask's extent, so ``x2``/``y2`` gain one pixel here.
    """
    if not isinstance(b, dict) or not all(_number(b.get(k)) for k in ("x1", "y1", "x2", "y2")):
        raise DataError(file, f"box2d must hold numeric x1, y1, x2, y2, got {b!r}", frame=frame, field=field)
    x1, y1, x2, y2 = (float(b[k]) for k in ("x1", "y1", "x2", "y2"))
    if x2 < x1 or y2 < y1:
        raise DataError(file, f"degenerate box2d {[x1, y1, x2, y2]} (needs x2 >= x1 and y2 >= y1)", frame=frame, field=field)
    w, h = size
    if x1 < 0 or y1 < 0 or x2 > w - 1 or y2 > h - 1:
        raise DataError(file, f"box2d {[x1, y1, x2, y2]} outside the image ({w}x{h}: x in [0, {w - 1}], y in [0, {h - 1}])", frame=frame, field=field)
    return [x1, y1, x2 + 1.0, y2 + 1.0]


def _check_poly2d(polys: Any, file: str, frame: str, field: str) -> None:
    """``poly2d``: a list of ``{vertices, types, closed}``; ≥ 2 vertices open, ≥ 3 closed."""
    if not isinstance(polys, list):
        raise DataError(file, f"poly2d must be a list, got {type(polys).__name__}", frame=frame, field=field)
    for k, p in enumerate(polys):
        f = f"{field}[{k}]"
        if not isinstance(p, dict) or not isinstance(p.get("vertices"), list):
            raise DataError(file, "polygon must be an object with a vertices list", frame=frame, field=f)
        verts, closed = p["vertices"], bool(p.get("closed", False))
        if not all(isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(c) for c in v) for v in verts):
            raise DataError(file, "vertices must be [x, y] number pairs", frame=frame, field=f"{f}.vertices")
        need = 3 if closed else 2
        if len(verts) < need:
            raise DataError(file, f"{'closed' if closed else 'open'} polygon with {len(verts)} vertices (needs >= {need})",
                            frame=frame, field=f"{f}.vertices")
        types = p.get("types")
        if types is not None and (not isinstance(types, str) or len(types) != len(verts) or set(types) - {"L", "C"}):
            raise DataError(file, f"types {types!r} must be one 'L'/'C' per vertex", frame=frame, field=f"{f}.types")


def _attributes(lab: dict, file: str, frame: str, field: str) -> dict[str, bool]:
    attrs = lab.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise DataError(file, f"attributes must be an object, got {type(attrs).__name__}", frame=frame, field=f"{field}.attributes")
    out = {}
    for k in _ATTR_FLAGS:
        v = attrs.get(k, False)
        if not isinstance(v, bool):
            raise DataError(file, f"{k} must be true/false, got {v!r}", frame=frame, field=f"{field}.attributes.{k}")
        out[k] = v
    return out


def _tags(fr: dict, file: str, frame: str) -> tuple[int | None, int | None, str | None]:
    """(weather index, scene index, timeofday) from the frame attributes; None where absent."""
    attrs = fr.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise DataError(file, f"attributes must be an object, got {type(attrs).__name__}", frame=frame, field="attributes")
    out = []
    for key, table in (("weather", _WEATHER_ID), ("scene", _SCENE_ID), ("timeofday", None)):
        v = attrs.get(key)
        if v is None:
            out.append(None)
        elif table is not None and v in table:
            out.append(table[v])
        elif table is None and v in B.TIMES_OF_DAY:
            out.append(v)
        else:
            raise DataError(file, f"unknown {key} {v!r}", frame=frame, field=f"attributes.{key}")
    return out[0], out[1], out[2]


def _box_labels(labels: list, file: str, frame: str, size: tuple[int, int], *,
                track_ids: list[int] | None) -> tuple[list[dict], list[dict]]:
    """det_20 / box_track_20 labels → (Instances, stuff) with BDD100K's category mapping."""
    instances, stuff = [], []
    for j, lab in enumerate(labels):
        field = f"labels[{j}]"
        if not isinstance(lab, dict):
            raise DataError(file, f"label must be an object, got {type(lab).__name__}", frame=frame, field=field)
        cat = lab.get("category")
        if cat in B.THING_TO_ID:
            cls, mapped = B.THING_TO_ID[cat], False
        elif cat in B.IGNORE_MAP:
            cls, mapped = B.THING_TO_ID[B.IGNORE_MAP[cat]], True
        elif cat in B.STUFF_DET_CATEGORIES:
            cls, mapped = None, False
        else:
            raise DataError(file, f"unknown category {cat!r}", frame=frame, field=f"{field}.category")
        if "poly2d" in lab and lab["poly2d"] is not None:
            _check_poly2d(lab["poly2d"], file, frame, f"{field}.poly2d")
        if lab.get("box2d") is None:
            raise DataError(file, f"{cat} label without box2d", frame=frame, field=f"{field}.box2d")
        box = _check_box(lab["box2d"], size, file, frame, f"{field}.box2d")
        attrs = _attributes(lab, file, frame, field)
        label_id = "" if lab.get("id") is None else str(lab["id"])
        if cls is None:
            stuff.append({"category": cat, "box": box, "label_id": label_id})
            continue
        instances.append({
            "label_id": label_id, "category": cat, "class": cls, "box": box,
            "ignore": mapped or attrs["crowd"] or attrs["ignored"],
            "crowd": attrs["crowd"], "occluded": attrs["occluded"], "truncated": attrs["truncated"],
            "track_id": -1 if track_ids is None else track_ids[j], "bitmask_id": None,
        })
    return instances, stuff


def _pose_labels(labels: list, file: str, frame: str, size: tuple[int, int]) -> list[dict]:
    """pose_21 labels → ``[{"box", "keypoints": [[x, y, v]] * 18, "label_id"}]``."""
    w, h = size
    out = []
    for j, lab in enumerate(labels):
        field = f"labels[{j}]"
        if not isinstance(lab, dict):
            raise DataError(file, f"label must be an object, got {type(lab).__name__}", frame=frame, field=field)
        if "poly2d" in lab and lab["poly2d"] is not None:
            _check_poly2d(lab["poly2d"], file, frame, f"{field}.poly2d")
        graph = lab.get("graph")
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes", []), list):
            raise DataError(file, "pose label needs a graph with a nodes list", frame=frame, field=f"{field}.graph")
        kps = [[0.0, 0.0, 0] for _ in B.POSE_JOINTS]
        for k, node in enumerate(graph.get("nodes", [])):
            nf = f"{field}.graph.nodes[{k}]"
            if not isinstance(node, dict):
                raise DataError(file, "node must be an object", frame=frame, field=nf)
            joint = node.get("category")
            if joint not in _JOINT_ID:
                raise DataError(file, f"unknown joint {joint!r}", frame=frame, field=f"{nf}.category")
            if kps[_JOINT_ID[joint]][2]:
                raise DataError(file, f"joint {joint!r} labelled twice", frame=frame, field=f"{nf}.category")
            loc = node.get("location")
            if not (isinstance(loc, (list, tuple)) and len(loc) == 2 and all(_number(c) for c in loc)):
                raise DataError(file, f"location must be [x, y], got {loc!r}", frame=frame, field=f"{nf}.location")
            x, y = float(loc[0]), float(loc[1])
            if not (0 <= x <= w and 0 <= y <= h):
                raise DataError(file, f"joint {joint!r} at ({x}, {y}) outside the image ({w}x{h})", frame=frame,
                                field=f"{nf}.location")
            vis = node.get("visibility")
            if vis not in _VISIBILITY:
                raise DataError(file, f"visibility must be 'V' or 'N', got {vis!r}", frame=frame, field=f"{nf}.visibility")
            kps[_JOINT_ID[joint]] = [x, y, _VISIBILITY[vis]]
        if lab.get("box2d") is not None:
            box = _check_box(lab["box2d"], size, file, frame, f"{field}.box2d")
        else:
            pts = [(x, y) for x, y, v in kps if v]
            if not pts:
                raise DataError(file, "pose label has neither box2d nor labelled joints", frame=frame, field=f"{field}.graph")
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [min(xs), min(ys), max(xs), max(ys)]
        out.append({"box": box, "keypoints": kps, "label_id": "" if lab.get("id") is None else str(lab["id"])})
    return out


_DRIVABLE_OK = np.zeros(256, dtype=bool)
_DRIVABLE_OK[[0, 1, 2, B.IGNORE_INDEX]] = True
_SEM_OK = np.zeros(256, dtype=bool)
_SEM_OK[list(range(len(B.SEM_CLASSES))) + [B.IGNORE_INDEX]] = True
_LANE_OK = np.zeros(256, dtype=bool)
_LANE_OK[[B.encode_lane(c, d, s) for c in range(8) for d in (0, 1) for s in (0, 1)] + [B.LANE_BACKGROUND]] = True
_VALUE_TABLES = {"drivable": (_DRIVABLE_OK, "0 direct, 1 alternative, 2 background, 255 ignore"),
                 "sem": (_SEM_OK, "train ids 0..18 or 255"),
                 "lane": (_LANE_OK, "category + (direction << 5) + (style << 4), or 255 background")}


def _read_mask(png: bytes, kind: str, uri: str, frame: str, size: tuple[int, int]) -> np.ndarray:
    """Decode a mask PNG, check its size against the image and its values against the encoding."""
    mode, msize, arr = decode_png(png, uri, frame=frame, field=kind, what="mask")
    if msize != size:
        raise DataError(uri, f"mask size {msize[0]}x{msize[1]} differs from image size {size[0]}x{size[1]}",
                        frame=frame, field=kind)
    if kind == "bitmask":
        if mode != "RGBA":
            raise DataError(uri, f"bitmask must be an RGBA PNG, got mode {mode}", frame=frame, field=kind)
        return arr
    if mode not in ("L", "P"):
        raise DataError(uri, f"{kind} mask must be an 8-bit single-channel PNG, got mode {mode}", frame=frame, field=kind)
    ok, desc = _VALUE_TABLES[kind]
    present = np.bincount(arr.ravel(), minlength=256) > 0  # a histogram is cheaper than a per-pixel lookup
    if (present & ~ok).any():
        vals = np.flatnonzero(present & ~ok)[:8].tolist()
        raise DataError(uri, f"values {vals} outside the {kind} encoding ({desc})", frame=frame, field=kind)
    return arr


def _instance_map(rgba: np.ndarray, instances: list[dict], offset: int) -> np.ndarray:
    """The shard's instance map: ``offset + k + 1`` where the bitmask shows ``instances[k]``
    (its ``bitmask_id``), 0 elsewhere; uint8 when that fits, else uint16. The category and
    attribute bits live in the record, so the map only says which instance a pixel is."""
    ids = (rgba[..., 2].astype(np.int32) << 8) | rgba[..., 3].astype(np.int32)
    lut = np.zeros(1 << 16, dtype=np.int32)
    for k, inst in enumerate(instances):
        lut[inst["bitmask_id"]] = offset + k + 1
    dense = lut[ids]
    return dense.astype(np.uint8 if offset + len(instances) <= 255 else np.uint16)


def _bitmask_instances(rgba: np.ndarray, uri: str, frame: str, *, tracking: bool) -> list[dict]:
    """Instances of an RGBA bitmask: class = R − 1, id = (B << 8) + A, box = pixel extent
    ``[x1, y1, x2 + 1, y2 + 1]``, flags from the G bits. Sorted by instance id."""
    fields = B.decode_bitmask(rgba)
    cat, inst = fields["category"], fields["instance"]
    fg = cat > 0
    if not fg.any():
        return []
    if int(cat.max()) > len(B.BITMASK_CATEGORIES):
        bad = sorted(int(v) for v in np.unique(cat[cat > len(B.BITMASK_CATEGORIES)]))[:8]
        raise DataError(uri, f"unknown category ids {bad} (R must be 0..{len(B.BITMASK_CATEGORIES)})", frame=frame, field="bitmask")
    ys, xs = np.nonzero(fg)
    ids = inst[ys, xs]
    if (ids == 0).any():
        raise DataError(uri, "foreground pixels with instance id 0", frame=frame, field="bitmask")
    order = np.argsort(ids, kind="stable")
    ids, ys, xs = ids[order], ys[order], xs[order]
    uniq, starts = np.unique(ids, return_index=True)
    cats = cat[fg][order]
    cmin, cmax = np.minimum.reduceat(cats, starts), np.maximum.reduceat(cats, starts)
    flags = {k: np.maximum.reduceat(fields[k][fg][order], starts) for k in ("truncated", "occluded", "crowd", "ignore")}
    x1, x2 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y1, y2 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    gbits = fields["truncated"] * 8 + fields["occluded"] * 4 + fields["crowd"] * 2 + fields["ignore"]
    g = gbits[fg][order]
    gmin, gmax = np.minimum.reduceat(g, starts), np.maximum.reduceat(g, starts)
    out = []
    for n, iid in enumerate(uniq.tolist()):
        if cmin[n] != cmax[n]:
            raise DataError(uri, f"instance {iid} has several category ids ({int(cmin[n])}..{int(cmax[n])})",
                            frame=frame, field="bitmask")
        if gmin[n] != gmax[n]:
            raise DataError(uri, f"instance {iid} has several attribute values in G ({int(gmin[n])}..{int(gmax[n])})",
                            frame=frame, field="bitmask")
        crowd, ignore = bool(flags["crowd"][n]), bool(flags["ignore"][n])
        out.append({
            "label_id": "", "category": B.BITMASK_CATEGORIES[int(cmin[n]) - 1], "class": int(cmin[n]) - 1,
            "box": [float(x1[n]), float(y1[n]), float(x2[n] + 1), float(y2[n] + 1)],
            "ignore": crowd or ignore, "crowd": crowd,
            "occluded": bool(flags["occluded"][n]), "truncated": bool(flags["truncated"][n]),
            "track_id": int(iid) if tracking else -1, "bitmask_id": int(iid),
        })
    return out


# =============================================================================================
# Manifest
# =============================================================================================


def _manifest(opts: ConvertOptions, families: dict, sidecars: dict[str, dict]) -> dict[str, Any]:
    sets: dict[str, Any] = {}
    totals: dict[str, Any] = {"samples": 0, "clips": 0, "shards": 0, "bytes": 0, "skipped": 0, "tasks": {}}
    for (set_name, split), fam in families.items():
        tasks = empty_task_counts(set_name)
        skipped = list(fam["skipped"])
        shards = []
        for job in fam["jobs"]:
            side = sidecars[job["path"]]
            shards.append({"path": job["path"], "samples": side["samples"], "clips": side["clips"], "bytes": side["bytes"],
                           "tasks": side["tasks"], "label_sets": side["label_sets"], "clip_frames": side["clip_frames"],
                           "sample_offsets": side["sample_offsets"]})
            merge_task_counts(tasks, side["tasks"])
            skipped += side["skipped"]
        entry = {
            "set": set_name, "split": split, "shards": shards,
            "samples": sum(s["samples"] for s in shards), "clips": sum(s["clips"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards), "tasks": sort_task_counts(tasks),
            "skipped": {"count": len(skipped), "items": skipped},
        }
        sets[f"{set_name}/{split}"] = entry
        for k in ("samples", "clips", "bytes"):
            totals[k] += entry[k]
        totals["shards"] += len(shards)
        totals["skipped"] += len(skipped)
        merge_task_counts(totals["tasks"], entry["tasks"])
    totals["tasks"] = sort_task_counts(totals["tasks"])
    return {"format_version": SF.FORMAT_VERSION, "options": opts.manifest_options(), "sets": sets, "totals": totals}
