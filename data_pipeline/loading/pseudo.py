"""Pseudo-label shard families (CPF pseudo-labelling, paper appendix H.2): format, manifest, join.

``vtd pseudo-label`` (:mod:`vtd_train.pseudo_label`) writes, for an image shard family written
by ``vtd data convert``, a family of shards that hold only the pseudo-labels and are joined to
the image shards by sample key::

    {out}/{set}/{split}/{set}-{split}-{n:06d}.tar   one per image shard of the same path: the
                                                   same samples, under the same keys, in the
                                                   same order
    {out}/manifest.json                            kind "pseudo", written last

Members of a sample with key ``K``:

=====================  =========================================================================
member                 content
=====================  =========================================================================
``K.pseudo.json``      ``{"set", "split", "frames": [PseudoFrame, ...]}``, one entry per frame of
                       the image sample's clip, in the same order (UTF-8 JSON)
``K.{i}.sem.rle``      frame ``i``'s pseudo semantic map: uint8 train ids, 255 = ignore (pixels
                       the model was not confident about), the shard format's run-length
                       encoding (:func:`data_pipeline.shards.format.encode_label_map`), at the
                       frame's stored resolution
=====================  =========================================================================

PseudoFrame (JSON object)::

    name    str                     the image frame's name (checked by the join)
    tasks   {task: "pseudo"}        the frame's pseudo-labelled tasks (``PSEUDO_TASKS``; absent =
                                    none for that task)
    pose    [{"box": [x1,y1,x2,y2], "keypoints": [[x, y, v] * 18], "score"}]   with "pose" only:
            the person box, joints (v 2 = kept, 0 = dropped: below the confidence threshold) and
            the person's detection score

The manifest (``kind: "pseudo"``) records the image manifest the labels were made from (its URI
and SHA-256: the join refuses another dataset's labels), the checkpoints (URI, content SHA-256,
inference height), the thresholds, the required tasks and, per set and shard, the frames and
instances of each pseudo task and each sample's byte offset (so that a loader worker whose part
of a set begins inside a shard seeks there in both shards).

The join (:func:`join_pseudo`): a frame takes a pseudo task only where it lacks the real label;
its record then says ``tasks[task] = "pseudo"`` and carries the pseudo map / pose instances as
its targets (:class:`~data_pipeline.loading.structures.LabelSource.PSEUDO` in the batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from data_pipeline import fsio
from data_pipeline.bdd100k.format import POSE_JOINTS
from data_pipeline.errors import DataError
from data_pipeline.shards.format import LABEL_MEMBER, MANIFEST_NAME
from data_pipeline.shards.tar_reader import iter_samples

if TYPE_CHECKING:
    from data_pipeline.loading.loader import ShardFamily

PSEUDO_KIND: Final = "pseudo"
PSEUDO_FORMAT_VERSION: Final = 1
PSEUDO_MEMBER: Final = "pseudo.json"
#: The tasks pseudo-labelled (paper H.2: the two with the fewest labels).
PSEUDO_TASKS: Final = ("sem", "pose")
SEM_MEMBER: Final = LABEL_MEMBER["sem"]
PSEUDO = "pseudo"


@dataclass(frozen=True)
class PseudoShards:
    """The pseudo shards of one image set, index for index with the family's ``urls``, and
    the byte where each of their samples begins. ``manifest``: the pseudo manifest's URI."""

    manifest: str
    urls: tuple[str, ...]
    sample_offsets: tuple[tuple[int, ...], ...]


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def manifest_sha256(root: str) -> str:
    """SHA-256 of the bytes of ``{root}/manifest.json`` (an image or pseudo family's)."""
    path = fsio.join(root, MANIFEST_NAME)
    if not fsio.exists(path):
        raise FileNotFoundError(f"{path}: no manifest (check the URI)")
    return hashlib.sha256(fsio.read_bytes(path)).hexdigest()


def is_pseudo_family(root: str) -> bool:
    """Whether ``root`` holds a pseudo-label family (its manifest says kind "pseudo")."""
    path = fsio.join(root, MANIFEST_NAME)
    try:
        doc = json.loads(fsio.read_bytes(path))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("kind") == PSEUDO_KIND


def read_pseudo_manifest(root: str) -> dict[str, Any]:
    """The pseudo family's manifest at ``root``, checked for its kind, version and fields."""
    path = fsio.join(root, MANIFEST_NAME)
    if not fsio.exists(path):
        raise FileNotFoundError(f"{path}: no pseudo-label manifest; run `vtd pseudo-label` first (or check the URI)")
    try:
        doc = json.loads(fsio.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != PSEUDO_KIND:
        kind = doc.get("kind", "image shards") if isinstance(doc, dict) else None
        raise DataError(path, f"not a pseudo-label family (kind {kind!r}): give the output of `vtd pseudo-label`", field="kind")
    if doc.get("format_version") != PSEUDO_FORMAT_VERSION:
        raise DataError(path, f"format_version {doc.get('format_version')!r}, this build reads {PSEUDO_FORMAT_VERSION}: "
                              "generate the pseudo-labels again with this build", field="format_version")
    source = doc.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("manifest_sha256"), str):
        raise DataError(path, "lacks source.manifest_sha256 (the image manifest it was made from)", field="source")
    sets = doc.get("sets")
    if not isinstance(sets, dict):
        raise DataError(path, "lacks the sets of shards", field="sets")
    for key, entry in sets.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        ok = isinstance(shards, list) and all(
            isinstance(sh, dict) and isinstance(sh.get("path"), str) and isinstance(sh.get("clips"), int)
            and isinstance(sh.get("sample_offsets"), list) and len(sh["sample_offsets"]) == sh["clips"]
            for sh in shards)
        if not ok:
            raise DataError(path, f"set {key!r}: shard entries need path, clips and one sample offset per clip",
                            field=f"sets.{key}.shards")
    return doc


def check_source(pseudo_root: str, doc: dict[str, Any], image_root: str) -> None:
    """Raise :class:`DataError` naming both manifests unless the pseudo family ``doc`` (at
    ``pseudo_root``) was made from the image manifest at ``image_root``."""
    want, got = doc["source"]["manifest_sha256"], manifest_sha256(image_root)
    if want != got:
        raise DataError(
            fsio.join(pseudo_root, MANIFEST_NAME),
            f"made from an image manifest with sha256 {want[:16]}… ({doc['source'].get('uri')}), but "
            f"{fsio.join(image_root, MANIFEST_NAME)} has sha256 {got[:16]}…: these pseudo-labels belong to other "
            "shards; generate them for this dataset (vtd pseudo-label --data ...)", field="source.manifest_sha256")


def attach_pseudo(families: Sequence[ShardFamily], pseudo_root: str) -> list[ShardFamily]:
    """``families`` (from :func:`data_pipeline.shards.manifest.families_from_manifest`) with their
    pseudo shards attached (``ShardFamily.pseudo``) from the pseudo family at ``pseudo_root``.

    A set the pseudo family does not cover keeps no pseudo shards; a covered set must have a
    pseudo shard for each of its shards, with the same number of samples. Raises
    :class:`DataError` naming the files when the pseudo family was made from another image
    manifest, lacks a shard, or covers none of the families.
    """
    doc = read_pseudo_manifest(pseudo_root)
    mpath = fsio.join(pseudo_root, MANIFEST_NAME)
    checked: set[str] = set()
    out = []
    for fam in families:
        if fam.root is None:
            raise ValueError(f"image set {fam.set_name!r}: joining pseudo-labels needs the family's shard root "
                             "(families_from_manifest sets it)")
        if fam.root not in checked:
            check_source(pseudo_root, doc, fam.root)
            checked.add(fam.root)
        entry = doc["sets"].get(f"{fam.set_name}/{fam.split}")
        if entry is None:
            out.append(fam)
            continue
        by_path = {sh["path"]: sh for sh in entry["shards"]}
        urls, offsets = [], []
        for i, url in enumerate(fam.urls):
            rel = url[len(fam.root.rstrip("/")) + 1:]
            sh = by_path.get(rel)
            if sh is None:
                raise DataError(mpath, f"lists no pseudo shard for image shard {url}", field=f"sets.{fam.set_name}/{fam.split}")
            clips = len(fam.shard_clip_frames[i]) if fam.shard_clip_frames else sh["clips"]
            if sh["clips"] != clips:
                raise DataError(mpath, f"pseudo shard {sh['path']!r} holds {sh['clips']} samples, image shard {url} {clips}",
                                field=f"sets.{fam.set_name}/{fam.split}")
            urls.append(fsio.join(pseudo_root, rel))
            offsets.append(tuple(int(o) for o in sh["sample_offsets"]))
        out.append(dataclasses.replace(fam, pseudo=PseudoShards(mpath, tuple(urls), tuple(offsets))))
    if families and all(f.pseudo is None for f in out):
        covered = sorted(doc["sets"])
        raise DataError(mpath, f"covers {covered}, none of the image sets "
                               f"{[f'{f.set_name}/{f.split}' for f in families]} being read", field="sets")
    return out


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def iter_pseudo_shard(url: str, offset: int = 0) -> Iterator[dict]:
    """Raw grouped samples of a pseudo shard from byte ``offset`` on; a missing shard is a
    :class:`DataError` naming it."""
    try:
        f = fsio.open_read(url)
    except FileNotFoundError:
        raise DataError(url, "pseudo shard is missing (its manifest lists it): generate the pseudo-labels again") from None
    with f:
        if offset:
            f.seek(offset)
        yield from iter_samples(f, url, offset)


def split_pseudo_members(sample: dict[str, Any]) -> tuple[dict, dict[int, bytes]]:
    """A grouped pseudo sample → (its ``pseudo.json`` document, ``{frame index: sem map bytes}``),
    checked: only the known members, frames with names and pseudo tasks, well-formed poses."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if PSEUDO_MEMBER not in sample:
        raise DataError(where, f"sample has no {PSEUDO_MEMBER} (not a pseudo-label shard?)", field=PSEUDO_MEMBER)
    try:
        doc = json.loads(sample[PSEUDO_MEMBER])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(where, f"malformed JSON: {e}", field=PSEUDO_MEMBER) from None
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in frames):
        raise DataError(where, 'expected an object whose "frames" is a list of {"name", "tasks"}', field=PSEUDO_MEMBER)
    sem: dict[int, bytes] = {}
    for key, value in sample.items():
        if key.startswith("__") or key == PSEUDO_MEMBER:
            continue
        idx, _, suffix = key.partition(".")
        if not idx.isdigit() or suffix != SEM_MEMBER or int(idx) >= len(frames):
            raise DataError(where, f"unexpected member {key!r} (pseudo shards hold {PSEUDO_MEMBER} and i.{SEM_MEMBER})", field=key)
        sem[int(idx)] = value
    for i, f in enumerate(frames):
        tasks = f.get("tasks")
        if not isinstance(tasks, dict) or any(t not in PSEUDO_TASKS or v != PSEUDO for t, v in tasks.items()):
            raise DataError(where, f"tasks must map {PSEUDO_TASKS} to {PSEUDO!r}, got {tasks!r}", frame=f["name"], field="tasks")
        if ("sem" in tasks) != (i in sem):
            has = "sem" in tasks
            raise DataError(where, f"tasks say sem is {'' if has else 'not '}pseudo-labelled but member "
                                   f"{i}.{SEM_MEMBER} is {'missing' if has else 'there'}", frame=f["name"], field="tasks")
        if "pose" in tasks:
            _check_pose(f.get("pose"), where, f["name"])
    return doc, sem


def _check_pose(pose: Any, where: str, frame: str) -> None:
    joints = len(POSE_JOINTS)
    ok = isinstance(pose, list) and all(
        isinstance(q, dict) and isinstance(q.get("box"), list) and len(q["box"]) == 4
        and isinstance(q.get("keypoints"), list) and len(q["keypoints"]) == joints
        and all(isinstance(k, list) and len(k) == 3 for k in q["keypoints"])
        for q in pose)
    if not ok:
        raise DataError(where, f"pose must be a list of {{box: [4], keypoints: [{joints} × [x, y, v]]}}", frame=frame, field="pose")


def check_key(pseudo_sample: dict[str, Any], image_key: str, image_url: str) -> None:
    """A pseudo sample must have the key of the image sample it is read alongside."""
    key = pseudo_sample.get("__key__")
    if key != image_key:
        raise DataError(pseudo_sample.get("__url__", "?"), f"sample {key!r} faces sample {image_key!r} of image shard "
                                                           f"{image_url}: the pseudo shard does not follow the image shard")


def join_pseudo(clip: dict, members: dict[int, dict[str, bytes]], pseudo_sample: dict[str, Any], *,
                image_key: str, image_url: str) -> None:
    """Join one image sample (key ``image_key`` of ``image_url``; ``clip`` and ``members`` from
    :func:`data_pipeline.loading.decode.split_members`) with its pseudo sample, in place: each frame
    takes the pseudo tasks it lacks a real label for (``tasks[task] = "pseudo"``, the
    ``sem.rle`` member or the ``pose`` instances). Real labels are left as they are.

    Raises :class:`DataError` naming both shards when the keys or the frames disagree.
    """
    check_key(pseudo_sample, image_key, image_url)
    key, purl = pseudo_sample["__key__"], pseudo_sample.get("__url__", "?")
    doc, sem = split_pseudo_members(pseudo_sample)
    frames, pframes = clip["frames"], doc["frames"]
    names, pnames = [r.get("name") for r in frames], [f["name"] for f in pframes]
    if names != pnames:
        raise DataError(purl, f"sample {key!r}: pseudo frames {pnames} do not match the frames {names} of image shard {image_url}")
    for i, (rec, pf) in enumerate(zip(frames, pframes)):
        real = rec.setdefault("tasks", {})
        for task in pf["tasks"]:
            if task in real:
                continue  # a real label wins (the generator never labels such frames anyway)
            real[task] = PSEUDO
            if task == "sem":
                members.setdefault(i, {})[SEM_MEMBER] = sem[i]
            elif task == "pose":
                rec["pose"] = pf["pose"]


def pseudo_frame_instances(frame: dict[str, Any]) -> dict[str, int]:
    """``{task: instance count}`` of a PseudoFrame's tasks (pose: its instances; sem: 0), the
    counting rule of :mod:`data_pipeline.shards.inspect`."""
    return {t: (len(frame.get("pose") or ()) if t == "pose" else 0) for t in frame.get("tasks", {})}


def iter_pseudo_frames(url: str) -> Iterator[tuple[str, list[dict]]]:
    """``(key, PseudoFrames)`` of every sample of a pseudo shard, checked, in order."""
    for sample in iter_pseudo_shard(url):
        doc, _ = split_pseudo_members(sample)
        yield sample["__key__"], doc["frames"]
