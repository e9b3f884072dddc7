"""``vtd data inspect``: count frames, clips and labels by reading the shards themselves, and
check them against the manifest.

The manifest says what the converter meant to write, and it is what training plans its epochs
from; this module reads what is there, with the training loader's own reader and decoders
(:mod:`data_pipeline.shards.tar_reader`, :mod:`data_pipeline.loading.decode`: JSON, JPEG headers and run-length
label maps; nothing is unpickled and no JPEG body is decoded), and stops at the first shard that
is not what the manifest says (:func:`check_shard`: a missing or unlisted shard; a truncated one,
said as ``truncated: N of M frames``; a corrupt tar; a member training would reject; other
frame, sample, offset, label or byte counts; bytes after the end-of-archive blocks). The per-task
counting rule lives here and the converter uses the same functions for its manifest, so the two
reports are comparable:

* ``samples`` of a task: frames whose ``tasks`` include it;
* ``instances``: ``len(instances)`` for det / ins / mot / mots, ``len(pose)`` for pose,
  ``len(boxes3d)`` for det3d (Cityscapes-3D), and 0 for the pixel and image-level tasks (tag, sem,
  drivable, lane, flow, depth).

Cityscapes-3D shards (manifest ``benchmark: cityscapes3d``) are read with that benchmark's own
decoder (:func:`data_pipeline.cityscapes3d.decode.decode_sample`: JSON, PNGs, run-length maps),
their tasks (sem, depth, det3d) named and ordered as its converter names them.

Pseudo-labels (:mod:`data_pipeline.loading.pseudo`) are counted by the same rule: a pseudo family's root
on its own (its shards read, per set and task the frames and instances labelled), or joined to
the image shards (``pseudo=``: the real counts as above, and per set the pseudo labels the
training loader's join gives, read from both families in lockstep).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from data_pipeline import fsio
from data_pipeline.shards import format as SF
from data_pipeline.bdd100k.format import SET_TASKS, TASKS
from data_pipeline.errors import DataError, VTDInputError
from data_pipeline.loading.pseudo import (
    check_source,
    is_pseudo_family,
    iter_pseudo_frames,
    iter_pseudo_shard,
    join_pseudo,
    pseudo_frame_instances,
    read_pseudo_manifest,
)
from data_pipeline.shards.tar_reader import BLOCK, TarEntry, TruncatedTarError, group_samples, iter_members

#: Tasks whose instance count is the number of ``instances`` of the frame.
INSTANCE_TASKS = ("det", "ins", "mot", "mots")
#: ``{set}/{split}/{set}-{split}-NNNNNN.tar`` relative to the output root.
SHARD_PATH_RE = re.compile(r"(?P<set>[a-z]+)/(?P<split>[a-z]+)/(?P=set)-(?P=split)-(?P<index>\d{6})\.tar")
#: Which mask member a labelled task requires in the shard.
_TASK_MEMBER = {**{k: SF.LABEL_MEMBER[k] for k in ("drivable", "lane", "sem")}, "ins": SF.INSTANCE_MEMBER, "mots": SF.INSTANCE_MEMBER}


def frame_task_instances(frame: dict[str, Any]) -> dict[str, int]:
    """``{task: instance count}`` for every task labelled in ``frame`` (a FrameRecord, or a
    Cityscapes-3D frame record)."""
    out = {}
    for task in frame.get("tasks", {}):
        if task in INSTANCE_TASKS:
            out[task] = len(frame.get("instances") or ())
        elif task == "pose":
            out[task] = len(frame.get("pose") or ())
        elif task == "det3d":
            out[task] = len(frame.get("boxes3d") or ())
        else:
            out[task] = 0
    return out


def empty_task_counts(set_name: str, tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, int]]:
    """Zero counts for the tasks of ``set_name``, in ``tasks`` order (a Cityscapes-3D set: all of
    its benchmark's ``tasks``)."""
    of_set = SET_TASKS.get(set_name, tasks)
    return {t: {"samples": 0, "instances": 0} for t in tasks if t in of_set}


def add_frame_counts(counts: dict[str, dict[str, int]], frame: dict[str, Any]) -> None:
    """Add one frame's labelled tasks to ``counts`` (in place)."""
    for task, n in frame_task_instances(frame).items():
        c = counts.setdefault(task, {"samples": 0, "instances": 0})
        c["samples"] += 1
        c["instances"] += n


def label_set_key(frame: dict[str, Any], order: tuple[str, ...] = TASKS) -> str:
    """The tasks ``frame`` (a frame record whose tasks are among ``order``, its benchmark's tasks)
    is labelled for, in that order, comma-joined (``""``: none): its key in a shard's
    ``label_sets`` counts."""
    tasks = frame.get("tasks", {})
    return ",".join(t for t in order if t in tasks)


def merge_task_counts(into: dict[str, dict[str, int]], other: dict[str, dict[str, int]]) -> None:
    for task, c in other.items():
        d = into.setdefault(task, {"samples": 0, "instances": 0})
        d["samples"] += c["samples"]
        d["instances"] += c["instances"]


def sort_task_counts(counts: dict[str, dict[str, int]], order: tuple[str, ...] = TASKS) -> dict[str, dict[str, int]]:
    return {t: counts[t] for t in order if t in counts} | {t: c for t, c in counts.items() if t not in order}


def list_shards(uri: str) -> list[tuple[str, str, str]]:
    """``(set, split, relative path)`` of every shard under output root ``uri``, sorted."""
    out = []
    for rel in fsio.list_files(uri, recursive=True):
        m = SHARD_PATH_RE.fullmatch(rel)
        if m:
            out.append((m["set"], m["split"], rel))
    return out


#: Zero bytes that end a tar archive: two zero blocks (writers pad them to a 10 KiB record).
END_OF_ARCHIVE = 2 * BLOCK


class _Cut:
    """Ends a member stream where the data runs out (:class:`TruncatedTarError`), keeping the
    error, so that the samples read before are still grouped and checked."""

    def __init__(self, entries: Iterator[TarEntry]):
        self.entries, self.error = entries, None

    def __iter__(self) -> Iterator[TarEntry]:
        try:
            yield from self.entries
        except TruncatedTarError as e:
            self.error = e


def _check_sample(uri: str, sample: dict[str, Any], set_name: str, split: str) -> dict[str, Any]:
    """What the training loader does with a sample, short of decoding its JPEGs: its members
    split and decoded (:mod:`data_pipeline.loading.decode`: JSON, JPEG headers, run-length maps), plus
    the label maps its records' tasks need present. Returns the clip; raises :class:`DataError`."""
    from data_pipeline.loading.decode import decode_frames, split_members

    key = sample["__key__"]
    clip, members = split_members(sample)
    if clip.get("set") != set_name or clip.get("split") != split:
        raise DataError(uri, f"clip is {clip.get('set')}/{clip.get('split')}, shard is {set_name}/{split}", frame=key)
    for i, frame in enumerate(clip["frames"]):
        need = {"jpg"} | {_TASK_MEMBER[t] for t in frame.get("tasks", {}) if t in _TASK_MEMBER}
        missing = sorted(SF.frame_member(i, m) for m in need - set(members.get(i, {})))
        if missing:
            raise DataError(uri, f"missing members {missing}", frame=f"{key}[{i}] {frame.get('name')}")
    decode_frames(clip, members, f"{uri}:{key}", compact=True)
    return clip


def _check_cityscapes_sample(uri: str, sample: dict[str, Any], set_name: str, split: str) -> dict[str, Any]:
    """A Cityscapes-3D sample decoded as the training loader decodes it (its image, label and
    disparity PNGs included); returns the clip (its one frame record); raises :class:`DataError`."""
    from data_pipeline.cityscapes3d.decode import decode_sample

    frame = decode_sample({**sample, "__url__": uri})
    header = json.loads(bytes(sample[SF.CLIP_MEMBER]))
    if header.get("split") != split:
        raise DataError(uri, f"clip is {header.get('set')}/{header.get('split')}, shard is {set_name}/{split}",
                        frame=sample["__key__"])
    return {"set": set_name, "split": split, "frames": [frame.record]}


#: Per benchmark: the sample check and the task order of ``label_sets`` keys.
def _benchmark_reader(benchmark: str) -> tuple[Any, tuple[str, ...]]:
    if benchmark == "cityscapes3d":
        from data_pipeline.cityscapes3d.format import TASKS as CS_TASKS

        return _check_cityscapes_sample, CS_TASKS
    return _check_sample, TASKS


def _read_shard(uri: str, set_name: str, split: str, pseudo_url: str | None = None, benchmark: str = "bdd100k") -> dict[str, Any]:
    """Read one shard as the training loader would and count what it holds: ``{"samples"
    (frames), "clips", "clip_frames", "sample_offsets", "label_sets", "tasks", "end", "cut"}``
    (``end``: the byte after the last complete sample; ``cut``: the :class:`TruncatedTarError`
    when the data ends inside a member — the sample it cut is not counted). With
    ``pseudo_url``, also the pseudo-labels joined from that pseudo shard, under ``pseudo``.
    Raises :class:`DataError` on a corrupt sample or a member training would reject."""
    check_sample, order = _benchmark_reader(benchmark)
    counts: dict[str, dict[str, int]] = {}
    clip_frames: list[int] = []
    offsets: list[int] = []
    label_sets: dict[str, int] = {}
    clips: dict[str, dict] = {}
    end = 0
    with fsio.open_read(uri) as f:
        entries = _Cut(iter_members(f, uri))
        for start, stop, sample in group_samples(entries, uri):
            try:
                clip = check_sample(uri, sample, set_name, split)
            except DataError:
                if entries.error is not None:  # the last sample, cut short by the truncation
                    break
                raise
            clips[sample["__key__"]] = clip
            for frame in clip["frames"]:
                add_frame_counts(counts, frame)
                k = label_set_key(frame, order)
                label_sets[k] = label_sets.get(k, 0) + 1
            clip_frames.append(len(clip["frames"]))
            offsets.append(start)
            end = stop
    out = {"samples": sum(clip_frames), "clips": len(clip_frames), "clip_frames": clip_frames, "sample_offsets": offsets,
           "label_sets": dict(sorted(label_sets.items())), "tasks": counts, "end": end, "cut": entries.error}
    if pseudo_url is not None and entries.error is None:
        out["pseudo"] = _joined_pseudo(uri, clips, pseudo_url)
    return out


def _trailer(uri: str, end: int, size: int) -> tuple[bool, str | None]:
    """The bytes of shard ``uri`` after its last sample (byte ``end`` of ``size``): ``(cut, problem)``
    — ``cut``: the data stops before the end-of-archive blocks are complete (a truncated shard);
    ``problem``: anything else than zero bytes there."""
    n = size - end
    if n > (1 << 20):
        return False, f"{n} bytes after the last sample (byte {end}) are not the tar's end-of-archive blocks"
    with fsio.open_read(uri) as f:
        f.seek(end)
        rest = f.read(n)
    if rest.strip(b"\0"):
        at = end + next(i for i, b in enumerate(rest) if b)
        return False, f"non-zero bytes at byte {at}, after the last sample (byte {end}): not the tar's end-of-archive blocks"
    return len(rest) < END_OF_ARCHIVE, None


def check_shard(uri: str, set_name: str, split: str, entry: dict[str, Any], pseudo_url: str | None = None,
                benchmark: str = "bdd100k") -> dict[str, Any]:
    """Read shard ``uri`` (:func:`_read_shard`) and check it against its manifest ``entry``: size,
    frames, clips, each sample's frames and byte offset, the per-task and per-label-set counts and
    the tar's end-of-archive blocks. Returns :func:`_read_shard`'s counts; raises
    :class:`DataError` naming the shard, in one line — a truncated shard as ``truncated: N of M
    frames`` (frames of the samples intact before the cut, of the manifest's)."""
    try:
        size = fsio.size(uri)
    except FileNotFoundError:
        raise DataError(uri, "missing: the manifest lists this shard") from None
    got = _read_shard(uri, set_name, split, pseudo_url, benchmark)
    frames, want = got["samples"], entry["samples"]
    cut, problem = (True, None) if got["cut"] is not None else _trailer(uri, got["end"], size)
    if cut:
        how = (f"the data ends inside a member at byte {got['cut'].at}" if got["cut"] is not None
               else "the data ends after a complete sample, without the end-of-archive blocks"
               if size == got["end"] else "the end-of-archive blocks are cut short")
        of = f" of {entry['bytes']}" if "bytes" in entry else ""
        raise DataError(uri, f"truncated: {frames} of {want} frames ({size}{of} bytes; {how})")
    if got["clip_frames"] != entry["clip_frames"]:
        raise DataError(uri, f"holds {frames} frames in {got['clips']} samples, the manifest records {want} in "
                             f"{len(entry['clip_frames'])}: not the shard the manifest describes (convert again)")
    bad = [k for k, (a, b) in enumerate(zip(got["sample_offsets"], entry["sample_offsets"])) if a != b]
    if bad:
        k = bad[0]
        raise DataError(uri, f"sample {k} begins at byte {got['sample_offsets'][k]}, the manifest records "
                             f"{entry['sample_offsets'][k]}: not the shard the manifest describes (convert again)")
    def labelled(tasks: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        return {t: c for t, c in tasks.items() if c["samples"]}

    if got["label_sets"] != entry["label_sets"] or labelled(got["tasks"]) != labelled(entry["tasks"]):
        raise DataError(uri, "the frames' labels differ from the manifest's counts: not the shard the manifest "
                             "describes (convert again)")
    if problem is not None:
        raise DataError(uri, problem)
    if size != entry.get("bytes", size):
        raise DataError(uri, f"{size} bytes, the manifest records {entry['bytes']} (all {frames} frames intact)")
    return got


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
    """Read every shard the manifest at ``uri`` (a converter output root) lists, count what is
    inside and check it against the manifest (:func:`check_shard`).

    Returns ``{"uri", "benchmark" (bdd100k | cityscapes3d), "sets": {"<set>/<split>": {"shards", "bytes", "samples" (frames), "clips",
    "tasks": {task: {"samples", "instances"}}}}, "totals": {same keys, summed}}``.
    With ``pseudo`` (a pseudo family made from these shards), the sets it covers also get
    ``"pseudo": {task: {"samples", "instances"}}``, the pseudo-labels joined (frames lacking the
    real label), and the totals too; ``"pseudo_uri"`` names it. A pseudo family's own root is
    counted by :func:`inspect_pseudo`.
    Raises ``FileNotFoundError`` when ``uri`` holds no manifest and :class:`DataError` naming the
    shard when one is missing, truncated, corrupt, holds a member training would reject or is
    not what the manifest says, or names a shard the manifest does not list (or, with
    ``pseudo``, when the pseudo family does not match).
    """
    from data_pipeline.shards.manifest import benchmark_tasks, check_shard_entry, read_manifest

    if pseudo is None and is_pseudo_family(uri):
        return inspect_pseudo(uri)
    manifest = read_manifest(uri)
    mpath = fsio.join(uri, SF.MANIFEST_NAME)
    tasks = benchmark_tasks(manifest, mpath)
    benchmark = manifest.get("benchmark", "bdd100k")
    if pseudo is not None and benchmark != "bdd100k":
        raise VTDInputError(f"--pseudo: pseudo-labels are made for BDD100K shards; {uri} holds {benchmark}")
    listed: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for key, fam in manifest["sets"].items():
        for sh in fam["shards"]:
            check_shard_entry(sh, mpath, f"sets.{key}.shards", tasks=tasks)
            listed[sh["path"]] = (fam["set"], fam["split"], sh)
    unlisted = [rel for _, _, rel in list_shards(uri) if rel not in listed]
    if unlisted:
        raise DataError(fsio.join(uri, unlisted[0]), f"not listed in {mpath} (left by another conversion? training "
                                                     f"reads only the shards the manifest lists)")
    pseudo_paths: dict[str, set[str]] = {}
    if pseudo is not None:
        doc = read_pseudo_manifest(pseudo)
        check_source(pseudo, doc, uri)
        pseudo_paths = {key: {sh["path"] for sh in entry["shards"]} for key, entry in doc["sets"].items()}
    sets: dict[str, dict[str, Any]] = {}
    for rel, (set_name, split, sh) in sorted(listed.items()):
        shard_uri = fsio.join(uri, rel)
        key = f"{set_name}/{split}"
        entry = sets.setdefault(
            key,
            {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": empty_task_counts(set_name, tasks)},
        )
        pseudo_url = None
        if key in pseudo_paths:
            if rel not in pseudo_paths[key]:
                raise DataError(fsio.join(pseudo, SF.MANIFEST_NAME), f"lists no pseudo shard for image shard {shard_uri}",
                                field=f"sets.{key}")
            pseudo_url = fsio.join(pseudo, rel)
            entry.setdefault("pseudo", {})
        got = check_shard(shard_uri, set_name, split, sh, pseudo_url, benchmark)
        entry["shards"] += 1
        entry["bytes"] += sh.get("bytes", 0)
        entry["samples"] += got["samples"]
        entry["clips"] += got["clips"]
        merge_task_counts(entry["tasks"], got["tasks"])
        if pseudo_url is not None:
            merge_task_counts(entry["pseudo"], got["pseudo"])
    totals: dict[str, Any] = {"shards": 0, "bytes": 0, "samples": 0, "clips": 0, "tasks": {}}
    if pseudo is not None:
        totals["pseudo"] = {}
    for entry in sets.values():
        entry["tasks"] = sort_task_counts(entry["tasks"], tasks)
        for k in ("shards", "bytes", "samples", "clips"):
            totals[k] += entry[k]
        merge_task_counts(totals["tasks"], entry["tasks"])
        if "pseudo" in entry:
            entry["pseudo"] = sort_task_counts(entry["pseudo"])
            merge_task_counts(totals["pseudo"], entry["pseudo"])
    totals["tasks"] = sort_task_counts(totals["tasks"], tasks)
    out = {"uri": uri, "benchmark": benchmark, "sets": sets, "totals": totals}
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
