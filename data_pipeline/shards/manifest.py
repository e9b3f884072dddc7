"""Reading ``manifest.json`` (written by :mod:`data_pipeline.bdd100k.convert`) into loader inputs."""

from __future__ import annotations

import json

from data_pipeline import fsio
from data_pipeline.bdd100k.format import TASKS
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import ShardFamily
from data_pipeline.shards.format import FORMAT_VERSION, MANIFEST_NAME


def read_manifest(uri: str) -> dict:
    """The manifest at ``uri`` (the converter's output root), checked for its format version."""
    path = fsio.join(uri, MANIFEST_NAME)
    if not fsio.exists(path):
        raise FileNotFoundError(f"{path}: no manifest; run `vtd data convert` first (or check the URI)")
    try:
        manifest = json.loads(fsio.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed JSON: {e}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(path, f"format_version {version!r}, this build reads {FORMAT_VERSION}: convert the dataset "
                              "again with this build (vtd data convert ... --overwrite)", field="format_version")
    return manifest


def families_from_manifest(uri: str, split: str, sets: tuple[str, ...] | None = None) -> list[ShardFamily]:
    """One :class:`ShardFamily` per image set of ``split`` listed in the manifest at ``uri``.

    ``sets`` selects and orders the image sets (the order is the round-robin order); by default
    every set of the split that has frames, in the order det, seg, track (BDD100K) or the one
    ``cityscapes`` set (Cityscapes-3D).
    """
    manifest = read_manifest(uri)
    tasks = benchmark_tasks(manifest, fsio.join(uri, MANIFEST_NAME))
    entries = {k: v for k, v in manifest["sets"].items() if v["split"] == split}
    order = sets if sets is not None else tuple(s for s in ("det", "seg", "track", "cityscapes") if f"{s}/{split}" in entries)
    out = []
    for s in order:
        entry = entries.get(f"{s}/{split}")
        if entry is None:
            raise DataError(fsio.join(uri, MANIFEST_NAME), f"no image set {s!r} for split {split!r}", field="sets")
        for sh in entry["shards"]:
            check_shard_entry(sh, fsio.join(uri, MANIFEST_NAME), f"sets.{s}/{split}.shards", tasks=tasks)
        shards = [sh for sh in entry["shards"] if sh["samples"] > 0]
        if not shards:
            continue
        out.append(
            ShardFamily(
                set_name=s,
                split=split,
                urls=tuple(fsio.join(uri, sh["path"]) for sh in shards),
                shard_frames=tuple(int(sh["samples"]) for sh in shards),
                shard_label_sets=tuple({frozenset(k.split(",")) if k else frozenset(): n for k, n in sh["label_sets"].items()}
                                       for sh in shards),
                shard_clip_frames=tuple(tuple(sh["clip_frames"]) for sh in shards),
                shard_sample_offsets=tuple(tuple(sh["sample_offsets"]) for sh in shards),
                root=str(uri),
            )
        )
    return out


def benchmark_tasks(manifest: dict, path: str) -> tuple[str, ...]:
    """The task names of the manifest's benchmark: ``bdd100k`` (no ``benchmark`` key: every
    manifest written before Cityscapes-3D) or ``cityscapes3d``."""
    benchmark = manifest.get("benchmark", "bdd100k")
    if benchmark == "bdd100k":
        return TASKS
    if benchmark == "cityscapes3d":
        from data_pipeline.cityscapes3d.format import TASKS as CS_TASKS

        return CS_TASKS
    raise DataError(path, f"unknown benchmark {benchmark!r} (bdd100k or cityscapes3d)", field="benchmark")


def check_shard_entry(sh: object, path: str, where: str, *, tasks: tuple[str, ...] = TASKS) -> None:
    """A manifest's shard entry has the fields the loader reads, consistent with each other;
    ``label_sets`` name only ``tasks`` (the benchmark's, :func:`benchmark_tasks`)."""
    keys = ("path", "samples", "tasks", "label_sets", "clip_frames", "sample_offsets")
    if not isinstance(sh, dict) or not all(k in sh for k in keys):
        shown = repr(sh.get("path")) if isinstance(sh, dict) else repr(sh)[:80]
        raise DataError(path, f"shard entry {shown} lacks one of {', '.join(keys)} (written by an older build? "
                              "convert the dataset again: vtd data convert ... --overwrite)", field=where)
    frames = sh["clip_frames"]
    if not (isinstance(frames, list) and all(isinstance(n, int) and n > 0 for n in frames) and sum(frames) == sh["samples"]):
        raise DataError(path, f"shard {sh['path']!r}: clip_frames do not add up to its {sh['samples']} frames",
                        field=f"{where}.clip_frames")
    sets = sh["label_sets"]
    if not (isinstance(sets, dict) and all(isinstance(n, int) and n > 0 for n in sets.values())
            and sum(sets.values()) == sh["samples"]):
        raise DataError(path, f"shard {sh['path']!r}: label_sets do not count its {sh['samples']} frames",
                        field=f"{where}.label_sets")
    unknown = sorted({t for k in sets for t in k.split(",") if k} - set(tasks))
    if unknown:
        raise DataError(path, f"shard {sh['path']!r}: label_sets name unknown tasks {unknown}", field=f"{where}.label_sets")
    offsets = sh["sample_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == len(frames) and all(isinstance(o, int) for o in offsets)
            and offsets[:1] in ([], [0]) and all(a < b for a, b in zip(offsets, offsets[1:]))):
        raise DataError(path, f"shard {sh['path']!r}: sample_offsets are not one increasing offset per sample from 0",
                        field=f"{where}.sample_offsets")
