"""``vtd data inspect``: count frames, clips and labels by reading the shards themselves.

The manifest says what the converter meant to write; this module reads what is there. Shards
are opened as plain tar streams over fsspec and only ``clip.json`` members are decoded (as JSON):
nothing is unpickled and no image is decoded. The per-task counting rule lives here and the
converter uses the same functions for its manifest, so the two reports are comparable:

* ``samples`` of a task: frames whose ``tasks`` include it;
* ``instances``: ``len(instances)`` for det / ins / mot / mots, ``len(pose)`` for pose, and 0 for
  the pixel and image-level tasks (tag, sem, drivable, lane, flow).

Pseudo-labels (:mod:`data_pipeline.pseudo`) are counted by the same rule: a pseudo family's root
on its own (its shards read, per set and task the frames and instances labelled), or joined to
the image shards (``pseudo=``: the real counts as above, and per set the pseudo labels the
training loader's join gives, read from both families in lockstep).
"""

from __future__ import annotations

import json
import re
import tarfile
from typing import Any

from data_pipeline import fsio
from data_pipeline import shard_format as SF
from data_pipeline.bdd100k import SET_TASKS, TASKS
from data_pipeline.errors import DataError
from data_pipeline.pseudo import (
    check_source,
    is_pseudo_family,
    iter_pseudo_frames,
    iter_pseudo_shard,
    join_pseudo,
    pseudo_frame_instances,
    read_pseudo_manifest,
)

#: Tasks whose instance count is the number of ``instances`` of the frame.
INSTANCE_TASKS = ("det", "ins", "mot", "mots")
#: ``{set}/{split}/{set}-{split}-NNNNNN.tar`` relative to the output root.
SHARD_PATH_RE = re.compile(r"(?P<set>[a-z]+)/(?P<split>[a-z]+)/(?P=set)-(?P=split)-(?P<index>\d{6})\.tar")
#: Which mask member a labelled task requires in the shard.
_TASK_MEMBER = {**{k: SF.LABEL_MEMBER[k] for k in ("drivable", "lane", "sem")}, "ins": SF.INSTANCE_MEMBER, "mots": SF.INSTANCE_MEMBER}


def frame_task_instances(frame: dict[str, Any]) -> dict[str, int]:
    """``{task: instance count}`` for every task labelled in ``frame`` (a FrameRecord)."""
    out = {}
    for task in frame.get("tasks", {}):
        if task in INSTANCE_TASKS:
            out[task] = len(frame.get("instances") or ())
        elif task == "pose":
            out[task] = len(frame.get("pose") or ())
        else:
            out[task] = 0
    return out


def empty_task_counts(set_name: str) -> dict[str, dict[str, int]]:
    """Zero counts for the tasks of ``set_name``, in ``TASKS`` order."""
    return {t: {"samples": 0, "instances": 0} for t in TASKS if t in SET_TASKS.get(set_name, ())}


def add_frame_counts(counts: dict[str, dict[str, int]], frame: dict[str, Any]) -> None:
    """Add one frame's labelled tasks to ``counts`` (in place)."""
    for task, n in frame_task_instances(frame).items():
        c = counts.setdefault(task, {"samples": 0, "instances": 0})
        c["samples"] += 1
        c["instances"] += n


def label_set_key(frame: dict[str, Any]) -> str:
    """The tasks ``frame`` (a FrameRecord, whose tasks are among ``TASKS``) is labelled for, in
    ``TASKS`` order, comma-joined (``""``: none): its key in a shard's ``label_sets`` counts."""
    tasks = frame.get("tasks", {})
    return ",".join(t for t in TASKS if t in tasks)


def merge_task_counts(into: dict[str, dict[str, int]], other: dict[str, dict[str, int]]) -> None:
    for task, c in other.items():
        d = into.setdefault(task, {"samples": 0, "instances": 0})
        d["samples"] += c["samples"]
        d["instances"] += c["instances"]


def sort_task_counts(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {t: counts[t] for t in TASKS if t in counts} | {t: c for t, c in counts.items() if t not in TASKS}


def list_shards(uri: str) -> list[tuple[str, str, str]]:
    """``(set, split, relative path)`` of every shard under output root ``uri``, sorted."""
    out = []
    for rel in fsio.list_files(uri, recursive=True):
        m = SHARD_PATH_RE.fullmatch(rel)
        if m:
            out.append((m["set"], m["split"], rel))
    return out


def _read_shard(uri: str, set_name: str, split: str, pseudo_url: str | None = None) -> dict[str, Any]:
    """Counts of one shard (with ``pseudo_url``, also of the pseudo-labels joined from that
    pseudo shard, under ``pseudo``); raises DataError on a corrupt or inconsistent shard."""
    counts: dict[str, dict[str, int]] = {}
    frames = clips = 0
    clip_json: dict[str, dict] = {}
    members: dict[str, set[str]] = {}
    try:
        with fsio.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    raise DataError(uri, f"unexpected tar entry {m.name!r} (not a regular file)")
                key, dot, suffix = m.name.partition(".")
                if not dot or "/" in key:
                    raise DataError(uri, f"member {m.name!r} is not KEY.suffix")
                members.setdefault(key, set()).add(suffix)
                if suffix == SF.CLIP_MEMBER:
                    raw = tar.extractfile(m).read()
                    try:
                        clip_json[key] = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise DataError(uri, f"malformed JSON: {e}", frame=key, field=SF.CLIP_MEMBER) from None
    except tarfile.TarError as e:
        raise DataError(uri, f"corrupt tar: {e}") from None
    for key, suffixes in members.items():
        clip = clip_json.get(key)
        if clip is None:
            raise DataError(uri, f"sample has no {SF.CLIP_MEMBER}", frame=key)
        if clip.get("set") != set_name or clip.get("split") != split:
            raise DataError(uri, f"clip is {clip.get('set')}/{clip.get('split')}, shard is {set_name}/{split}", frame=key)
        for i, frame in enumerate(clip.get("frames") or ()):
            need = {SF.frame_member(i, "jpg")} | {
                SF.frame_member(i, _TASK_MEMBER[t]) for t in frame.get("tasks", {}) if t in _TASK_MEMBER
            }
            missing = sorted(need - suffixes)
            if missing:
                raise DataError(uri, f"missing members {missing}", frame=f"{key}[{i}] {frame.get('name')}")
            add_frame_counts(counts, frame)
            frames += 1
        clips += 1
    out = {"samples": frames, "clips": clips, "tasks": counts}
    if pseudo_url is not None:
        out["pseudo"] = _joined_pseudo(uri, clip_json, pseudo_url)
    return out


def _joined_pseudo(uri: str, clips: dict[str, dict], pseudo_url: str) -> dict[str, dict[str, int]]:
    """The pseudo-labels the loader's join gives the clips of image shard ``uri`` (``{key: clip}``
    in shard order), read from ``pseudo_url`` in lockstep: ``{task: {"samples", "instances"}}``."""
    counts: dict[str, dict[str, int]] = {}
    pseudo = iter_pseudo_shard(pseudo_url)
    try:
        for key, clip in clips.items():
            psample = next(pseudo, None)
            if psample is None:
                raise DataError(pseudo_url, f"pseudo shard ends before sample {key!r} of image shard {uri}")
            real = [dict(r.get("tasks") or {}) for r in clip.get("frames") or ()]
            join_pseudo(clip, {}, psample, image_key=key, image_url=uri)
            for before, frame in zip(real, clip["frames"]):
                for task, n in frame_task_instances(frame).items():
                    if task not in before:
                        c = counts.setdefault(task, {"samples": 0, "instances": 0})
                        c["samples"] += 1
                        c["instances"] += n
        if next(pseudo, None) is not None:
            raise DataError(pseudo_url, f"pseudo shard holds more samples than image shard {uri} ({len(clips)})")
    finally:
        pseudo.close()
    return sort_task_counts(counts)


def inspect_shards(uri: str, pseudo: str | None = None) -> dict[str, Any]:
    """Read every shard under ``uri`` (a converter output root) and count what is inside.

    Returns ``{"uri", "sets": {"<set>/<split>": {"shards", "bytes", "samples" (frames), "clips",
    "tasks": {task: {"samples", "instances"}}}}, "totals": {same keys, summed}}``.
    With ``pseudo`` (a pseudo family made from these shards), the sets it covers also get
    ``"pseudo": {task: {"samples", "instances"}}``, the pseudo-labels joined (frames lacking the
    real label), and the totals too; ``"pseudo_uri"`` names it. A pseudo family's own root is
    counted by :func:`inspect_pseudo`.
    Raises ``FileNotFoundError`` when ``uri`` holds no shards and :class:`DataError` naming the
    shard when one is corrupt (or, with ``pseudo``, when the pseudo family does not match).
    """
    if pseudo is None and is_pseudo_family(uri):
        return inspect_pseudo(uri)
    shards = list_shards(uri)
    if not shards:
        raise FileNotFoundError(f"no shards ({{set}}/{{split}}/{{set}}-{{split}}-NNNNNN.tar) under {uri}")
    pseudo_paths: dict[str, set[str]] = {}
    if pseudo is not None:
        doc = read_pseudo_manifest(pseudo)
        check_source(pseudo, doc, uri)
        pseudo_paths = {key: {sh["path"] for sh in entry["shards"]} for key, entry in doc["sets"].items()}
    sets: dict[str, dict[str, Any]] = {}
    for set_name, split, rel in shards:
        shard_uri = fsio.join(uri, rel)
        key = f"{set_name}/{split}"
        entry = sets.setdefault(
            key,
            {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": empty_task_counts(set_name)},
        )
        pseudo_url = None
        if key in pseudo_paths:
            if rel not in pseudo_paths[key]:
                raise DataError(fsio.join(pseudo, SF.MANIFEST_NAME), f"lists no pseudo shard for image shard {shard_uri}",
                                field=f"sets.{key}")
            pseudo_url = fsio.join(pseudo, rel)
            entry.setdefault("pseudo", {})
        got = _read_shard(shard_uri, set_name, split, pseudo_url)
        entry["shards"] += 1
        entry["bytes"] += fsio.size(shard_uri)
        entry["samples"] += got["samples"]
        entry["clips"] += got["clips"]
        merge_task_counts(entry["tasks"], got["tasks"])
        if pseudo_url is not None:
            merge_task_counts(entry["pseudo"], got["pseudo"])
    totals: dict[str, Any] = {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": {}}
    if pseudo is not None:
        totals["pseudo"] = {}
    for entry in sets.values():
        entry["tasks"] = sort_task_counts(entry["tasks"])
        for k in ("shards", "bytes", "samples", "clips"):
            totals[k] += entry[k]
        merge_task_counts(totals["tasks"], entry["tasks"])
        if "pseudo" in entry:
            entry["pseudo"] = sort_task_counts(entry["pseudo"])
            merge_task_counts(totals["pseudo"], entry["pseudo"])
    totals["tasks"] = sort_task_counts(totals["tasks"])
    out = {"uri": uri, "sets": sets, "totals": totals}
    if pseudo is not None:
        totals["pseudo"] = sort_task_counts(totals["pseudo"])
        out["pseudo_uri"] = pseudo
    return out


def inspect_pseudo(uri: str) -> dict[str, Any]:
    """Read every shard of the pseudo family at ``uri`` (``vtd pseudo-label`` output) and count,
    per set and task, the frames and instances that carry pseudo-labels.

    Returns ``{"uri", "kind": "pseudo", "source", "sets": {"<set>/<split>": {"shards", "bytes",
    "samples" (frames), "clips", "tasks": {task: {"samples", "instances"}}}}, "totals"}``; raises
    :class:`DataError` naming the shard when one is missing, corrupt or not what the manifest says.
    """
    doc = read_pseudo_manifest(uri)
    sets: dict[str, dict[str, Any]] = {}
    totals: dict[str, Any] = {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": {}}
    for key, fam in doc["sets"].items():
        entry: dict[str, Any] = {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": {}}
        for sh in fam["shards"]:
            url = fsio.join(uri, sh["path"])
            clips = 0
            for _, frames in iter_pseudo_frames(url):
                clips += 1
                entry["samples"] += len(frames)
                for frame in frames:
                    for task, n in pseudo_frame_instances(frame).items():
                        c = entry["tasks"].setdefault(task, {"samples": 0, "instances": 0})
                        c["samples"] += 1
                        c["instances"] += n
            if clips != sh["clips"]:
                raise DataError(url, f"holds {clips} samples, the pseudo manifest says {sh['clips']}")
            entry["shards"] += 1
            entry["clips"] += clips
            entry["bytes"] += fsio.size(url)
        entry["tasks"] = sort_task_counts(entry["tasks"])
        sets[key] = entry
        for k in ("shards", "bytes", "samples", "clips"):
            totals[k] += entry[k]
        merge_task_counts(totals["tasks"], entry["tasks"])
    totals["tasks"] = sort_task_counts(totals["tasks"])
    return {"uri": uri, "kind": "pseudo", "source": doc["source"], "sets": sets, "totals": totals}
