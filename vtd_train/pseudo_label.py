"""``vtd pseudo-label``: pseudo-labels from single-task baselines for CPF joint training (paper H.2).

The paper gives joint training more labels for its two label-poor tasks: a single-task
semantic-segmentation model and a single-task pose model label the frames that lack those
labels; pixels below 0.3 confidence are ignored (255) and joints below 0.2 confidence dropped.
The training loss of a pseudo label is the task's own loss.

Data flow::

    image manifest (split, sets) → one work unit per image shard
      → on Ray actors (PseudoLabelWorker: one EvalWorker per checkpoint, each model loaded once,
        one GPU per actor where the cluster has GPUs; in this process for a memory:// output):
          image shard, sample by sample → the frames that lack the task's real label (and carry
            every required task, e.g. the MOTS frames of the tracking set)
          → EvalWorker.predict_frames: batches at the checkpoint's training height, predictions
            at the stored resolution
          → sem: the predicted class where its probability ≥ 0.3, else 255 (sem_pseudo_map)
            pose: persons scoring ≥ the person threshold, joints below 0.2 dropped (v = 0),
            persons without a joint left dropped (pose_pseudo_instances)
          → the pseudo shard (same keys, same order; data_pipeline/loading/pseudo.py) written
            atomically, then its sidecar ``<shard>.json`` (counts + the plan's hash)
      → manifest.json (kind "pseudo"), last and atomically

A frame is pseudo-labelled for a task only where something survives the thresholds (a map with
a confident pixel, a person with a joint): an all-ignored map or an empty pose list would train
nothing. A rerun without ``overwrite`` keeps every shard whose sidecar matches the current plan
(same image manifest, checkpoints, heights, thresholds and required tasks), so a retried job
resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor
from webdataset.writer import TarWriter

from data_pipeline import fsio
from data_pipeline.bdd100k.format import IGNORE_INDEX, POSE_JOINTS, SETS, TASKS
from data_pipeline.loading.decode import DecodedFrame, decode_frame, split_members
from data_pipeline.errors import VTDInputError
from data_pipeline.loading.loader import iter_shard
from data_pipeline.shards.manifest import families_from_manifest, read_manifest
from data_pipeline.loading.pseudo import (
    PSEUDO,
    PSEUDO_FORMAT_VERSION,
    PSEUDO_KIND,
    PSEUDO_MEMBER,
    PSEUDO_TASKS,
    SEM_MEMBER,
    manifest_sha256,
)
from data_pipeline.shards.format import MANIFEST_NAME, encode_label_map, frame_member
from data_pipeline.loading.structures import FrameTargets
from vtd_train.evaluation.evaluate import (
    DEFAULT_BATCH_SIZE,
    MAX_DEFAULT_WORKERS,
    EvalWorker,
    LocalRunner,
    RayRunner,
    chunks,
    torch_threads,
    trained_height,
)
from vtd_train.model.outputs import FramePrediction

__all__ = [
    "PseudoLabelOptions",
    "PseudoLabelWorker",
    "generate_pseudo_labels",
    "pose_pseudo_instances",
    "pseudo_label_command",
    "sem_pseudo_map",
]

#: Paper H.2: semantic pixels below this softmax probability are ignored.
SEM_THRESHOLD: Final = 0.3
#: Paper H.2: joints below this confidence (the heatmap's peak) are removed.
POSE_THRESHOLD: Final = 0.2
#: Persons (pedestrian / rider detections) below this score are not pose-labelled. The paper's
#: "standard inference procedure" leaves the value open; 0.3 is mmpose's top-down bbox threshold.
PERSON_THRESHOLD: Final = 0.3
#: v of a kept joint (the shard format's "labelled and visible").
VISIBLE: Final = 2


# ---------------------------------------------------------------------------------------------
# Thresholds: predictions → pseudo-labels
# ---------------------------------------------------------------------------------------------


def sem_pseudo_map(sem: Tensor, score: Tensor, threshold: float = SEM_THRESHOLD) -> np.ndarray:
    """``sem`` ``[H, W]`` predicted train ids and ``score`` ``[H, W]`` their softmax
    probabilities → the pseudo map, uint8 ``[H, W]``: the train id where ``score >= threshold``,
    255 (ignore) where it is below."""
    if sem.shape != score.shape or sem.dim() != 2:
        raise ValueError(f"sem {list(sem.shape)} and its scores {list(score.shape)} must be the same [H, W]")
    out = sem.detach().to("cpu", torch.uint8).numpy().copy()
    out[score.detach().float().cpu().numpy() < threshold] = IGNORE_INDEX
    return out


def pose_pseudo_instances(keypoints: Tensor, person_scores: Tensor, boxes: Tensor, *,
                          joint_threshold: float = POSE_THRESHOLD,
                          person_threshold: float = PERSON_THRESHOLD) -> list[dict[str, Any]]:
    """Predicted poses → pseudo pose instances (the FrameRecord's ``pose`` entries).

    ``keypoints`` ``[P, 18, 3]`` (x, y, joint confidence), ``person_scores`` ``[P]`` and person
    ``boxes`` ``[P, 4]``. A person scoring below ``person_threshold`` is left out; a joint whose
    confidence is below ``joint_threshold`` is dropped (``[0, 0, 0]``), the others kept as
    visible (``[x, y, 2]``); a person with no joint left is left out. Returns
    ``[{"box", "keypoints", "score"}]`` (coordinates rounded to 0.01 px).
    """
    p = len(keypoints)
    if keypoints.shape[1:] != (len(POSE_JOINTS), 3) or person_scores.shape != (p,) or boxes.shape != (p, 4):
        raise ValueError(f"expected keypoints [P, {len(POSE_JOINTS)}, 3], scores [P], boxes [P, 4]; got "
                         f"{list(keypoints.shape)}, {list(person_scores.shape)}, {list(boxes.shape)}")
    kps = keypoints.detach().float().cpu().numpy()
    scores = person_scores.detach().float().cpu().numpy()
    bxs = boxes.detach().float().cpu().numpy()
    out = []
    for kp, score, box in zip(kps, scores, bxs):
        keep = kp[:, 2] >= joint_threshold
        if score < person_threshold or not keep.any():
            continue
        joints = [[round(float(x), 2), round(float(y), 2), VISIBLE] if k else [0.0, 0.0, 0] for (x, y, _), k in zip(kp, keep)]
        out.append({"box": [round(float(v), 2) for v in box], "keypoints": joints, "score": round(float(score), 4)})
    return out


# ---------------------------------------------------------------------------------------------
# Options, checkpoints, work units
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PseudoLabelOptions:
    """One pseudo-labelling run (``vtd pseudo-label``).

    ``checkpoints``: ``{task: checkpoint URI}`` for tasks of ``PSEUDO_TASKS`` (``sem``, ``pose``;
    a ``single:sem`` / ``single:pose`` model from ``vtd train``). ``data``: the image shard root;
    ``out``: the pseudo family's root (any fsspec URI). ``sets``: image sets to label (default:
    every set of the split). ``require``: ``{set: tasks}``, only frames labelled for those tasks
    are labelled (``{"track": ("mots",)}``: the MOTS frames, which joint training reads).
    ``height``: inference height (``None``: each checkpoint's largest training scale, else the
    stored resolution; ``"native"``: the stored resolution). ``threads``: torch threads (and
    Ray CPUs) per worker.
    """

    checkpoints: Mapping[str, str]
    data: str
    out: str
    split: str = "train"
    sets: tuple[str, ...] | None = None
    require: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sem_threshold: float = SEM_THRESHOLD
    pose_threshold: float = POSE_THRESHOLD
    person_threshold: float = PERSON_THRESHOLD
    height: int | str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        bad = sorted(set(self.checkpoints) - set(PSEUDO_TASKS))
        if bad or not self.checkpoints:
            raise VTDInputError(f"checkpoint: tasks {bad or '(none)'}; pseudo-labels are made for {list(PSEUDO_TASKS)} "
                                "(--checkpoint sem=URI --checkpoint pose=URI)")
        if self.sets is not None and (not self.sets or any(s not in SETS for s in self.sets)):
            raise VTDInputError(f"sets: {list(self.sets)}; choose from {list(SETS)}")
        for s, tasks in self.require.items():
            if s not in SETS or not tasks or any(t not in TASKS for t in tasks):
                raise VTDInputError(f"require: {s}={','.join(tasks)}; sets are {list(SETS)}, tasks {list(TASKS)}")
        for name in ("sem_threshold", "pose_threshold", "person_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise VTDInputError(f"{name} must be in [0, 1], got {v!r}")
        if self.height is not None and self.height != "native" and (not isinstance(self.height, int) or self.height < 1):
            raise VTDInputError(f"height must be a positive number of pixels or 'native', got {self.height!r}")
        if self.batch_size < 1 or self.threads < 1:
            raise VTDInputError(f"batch_size and threads must be >= 1, got {self.batch_size}, {self.threads}")

    @property
    def thresholds(self) -> dict[str, float]:
        return {"sem": self.sem_threshold, "pose_joint": self.pose_threshold, "pose_person": self.person_threshold}

    def absolute(self) -> PseudoLabelOptions:
        """These options with local paths made absolute (Ray workers need not share this
        process's working directory)."""
        def norm(uri: str) -> str:
            return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))

        return replace(self, data=norm(self.data), out=norm(self.out),
                       checkpoints={t: norm(u) for t, u in self.checkpoints.items()})


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint used for ``task``: URI, content hash (model.json + model.pt) and the
    inference height (``None``: the stored resolution)."""

    task: str
    uri: str
    sha256: str
    height: int | None


def checkpoint_info(task: str, uri: str, height: int | str | None = None) -> CheckpointInfo:
    """Read a checkpoint's ``model.json`` (it must build a model that predicts ``task``) and hash
    its content; the inference height is ``height``, else the checkpoint's training height."""
    from vtd_train.checkpoint import FORMAT_VERSION, MODEL_JSON, MODEL_WEIGHTS, CheckpointError, read_versioned_json
    from vtd_train.model.config import config_from_dict
    from vtd_train.model.vtdnet import VTDNetConfig

    jpath, wpath = fsio.join(uri, MODEL_JSON), fsio.join(uri, MODEL_WEIGHTS)
    for path in (jpath, wpath):
        if not fsio.exists(path):
            raise CheckpointError(f"--checkpoint {task}={uri}: not a complete checkpoint (no {path.rsplit('/', 1)[-1]})")
    doc = read_versioned_json(jpath, FORMAT_VERSION)
    cfg = config_from_dict(VTDNetConfig, doc["model"], source=jpath)
    if task not in cfg.tasks:
        raise CheckpointError(f"--checkpoint {task}={uri}: the model predicts {list(cfg.tasks)}, not {task!r}")
    digest = hashlib.sha256()
    for name, path in ((MODEL_JSON, jpath), (MODEL_WEIGHTS, wpath)):
        digest.update(name.encode() + b"\0")
        with fsio.open_read(path) as f:
            while block := f.read(1 << 24):
                digest.update(block)
    h = trained_height(doc.get("meta") or {}) if height is None else (None if height == "native" else int(height))
    return CheckpointInfo(task=task, uri=uri, sha256=digest.hexdigest(), height=h)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs: the checkpoints (in ``PSEUDO_TASKS`` order) and the thresholds."""

    checkpoints: tuple[CheckpointInfo, ...]
    thresholds: dict[str, float]


@dataclass(frozen=True)
class ShardUnit:
    """One image shard to label: its set, shard path (relative, the same in both families),
    image and pseudo shard URIs, the tasks its frames must carry and the plan's hash."""

    set_name: str
    split: str
    path: str
    image_url: str
    out_url: str
    require: tuple[str, ...]
    plan: str
    overwrite: bool = False


def needs_label(record: dict[str, Any], task: str, require: tuple[str, ...]) -> bool:
    """A frame is labelled for ``task`` when it lacks the real label and carries every required task."""
    tasks = record.get("tasks") or {}
    return task not in tasks and all(t in tasks for t in require)


# ---------------------------------------------------------------------------------------------
# The worker (a Ray actor, or in this process)
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    """A sample being labelled: its frames' PseudoFrames and sem members, and per task the
    frames still to run ``(frame index, decoded frame)``."""

    key: str
    frames: list[dict[str, Any]]
    todo: dict[str, list[tuple[int, DecodedFrame]]]
    sem: dict[int, bytes] = field(default_factory=dict)


class PseudoLabelWorker:
    """Loads each checkpoint once (an :class:`EvalWorker` per task, on CUDA when this process
    sees a GPU and ``cuda``) and writes pseudo shards (:meth:`run`)."""

    def __init__(self, spec: WorkerSpec, *, threads: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, cuda: bool = True) -> None:
        self.models = {c.task: EvalWorker(c.uri, threads=threads, batch_size=batch_size, cuda=cuda, height=c.height)
                       for c in spec.checkpoints}
        self.uris = {c.task: c.uri for c in spec.checkpoints}
        for task, worker in self.models.items():
            if task not in worker.tasks:
                raise VTDInputError(f"--checkpoint {task}={self.uris[task]}: the model predicts {list(worker.tasks)}, not {task!r}")
        self.thresholds = dict(spec.thresholds)
        self.threads, self.batch_size = int(threads), int(batch_size)

    def run(self, unit: ShardUnit) -> dict[str, Any]:
        """Write ``unit``'s pseudo shard and sidecar (or keep a complete one); returns the sidecar."""
        if not unit.overwrite and (done := _complete_sidecar(unit)) is not None:
            return done
        counts = {t: {"samples": 0, "instances": 0} for t in self.models}
        inferred = {t: 0 for t in self.models}
        clips = frames = 0
        offsets: list[int] = []
        with torch_threads(self.threads), fsio.atomic_open(unit.out_url, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=0)  # fixed mtime: reproducible bytes (convert.py)
            try:
                for chunk in self._chunks(unit, inferred):
                    self._label(unit.set_name, chunk)
                    for s in chunk:
                        doc = {"set": unit.set_name, "split": unit.split, "frames": s.frames}
                        sample = {"__key__": s.key, PSEUDO_MEMBER: json.dumps(doc, separators=(",", ":")).encode("utf-8")}
                        sample |= {frame_member(i, SEM_MEMBER): data for i, data in sorted(s.sem.items())}
                        offsets.append(writer.tarstream.offset)
                        writer.write(sample)
                        clips += 1
                        frames += len(s.frames)
                        for pf in s.frames:
                            for task in pf["tasks"]:
                                counts[task]["samples"] += 1
                                counts[task]["instances"] += len(pf.get("pose") or ()) if task == "pose" else 0
            finally:
                writer.close()
        sidecar = {"format_version": PSEUDO_FORMAT_VERSION, "path": unit.path, "plan": unit.plan, "samples": frames,
                   "clips": clips, "bytes": fsio.size(unit.out_url), "sample_offsets": offsets,
                   "inferred": inferred, "tasks": counts}
        fsio.write_json_atomic(unit.out_url + ".json", sidecar)
        return sidecar

    def _chunks(self, unit: ShardUnit, inferred: dict[str, int]) -> Iterator[list[_Sample]]:
        """The shard's samples in order, in groups holding at least ``batch_size`` frames to run
        (images decoded only for the frames that need a label)."""
        chunk: list[_Sample] = []
        pending = 0
        for raw in iter_shard(unit.image_url):
            clip, members = split_members(raw)
            where = f"{unit.image_url}:{raw['__key__']}"
            s = _Sample(raw["__key__"], [{"name": r.get("name"), "tasks": {}} for r in clip["frames"]], {t: [] for t in self.models})
            for i, rec in enumerate(clip["frames"]):
                need = [t for t in self.models if needs_label(rec, t, unit.require)]
                if not need:
                    continue
                f = decode_frame(members.get(i, {}), rec, where, compact=True)  # checks the JPEG and the record
                frame = DecodedFrame(image=f.image.decode(), targets=FrameTargets(), sources={}, record=rec)
                for t in need:
                    s.todo[t].append((i, frame))
                    inferred[t] += 1
                pending += 1
            chunk.append(s)
            if pending >= self.batch_size:
                yield chunk
                chunk, pending = [], 0
        if chunk:
            yield chunk

    def _label(self, set_name: str, chunk: list[_Sample]) -> None:
        """Run each model over the chunk's frames that need its task, in batches, and record
        what passes the thresholds."""
        th = self.thresholds
        for task, model in self.models.items():
            items = [(s, i, f) for s in chunk for i, f in s.todo[task]]
            for batch in chunks(items, self.batch_size):
                preds = model.predict_frames(set_name, [f for _, _, f in batch])
                for (s, i, _), p in zip(batch, preds):
                    if task == "sem":
                        m = sem_pseudo_map(_need(p, "sem", self.uris[task]), _need(p, "sem_score", self.uris[task]), th["sem"])
                        if (m != IGNORE_INDEX).any():
                            s.frames[i]["tasks"]["sem"] = PSEUDO
                            s.sem[i] = encode_label_map(m)
                    else:
                        uri = self.uris[task]
                        poses = pose_pseudo_instances(
                            _need(p, "keypoints", uri), _need(p, "keypoint_scores", uri),
                            _need(p, "boxes", uri)[_need(p, "keypoint_index", uri)],
                            joint_threshold=th["pose_joint"], person_threshold=th["pose_person"])
                        if poses:
                            s.frames[i]["tasks"]["pose"] = PSEUDO
                            s.frames[i]["pose"] = poses
            for s in chunk:
                s.todo[task] = []  # the decoded images are no longer needed


def _need(pred: FramePrediction, name: str, uri: str) -> Tensor:
    value = getattr(pred, name)
    if value is None:
        raise VTDInputError(f"checkpoint {uri}: its prediction has no {name!r}")
    return value


def _complete_sidecar(unit: ShardUnit) -> dict[str, Any] | None:
    """The sidecar of a complete pseudo shard written for the same plan, else ``None``."""
    try:
        side = json.loads(fsio.read_bytes(unit.out_url + ".json"))
        nbytes = fsio.size(unit.out_url)
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(side, dict) or side.get("plan") != unit.plan or side.get("bytes") != nbytes:
        return None
    return side if all(k in side for k in ("samples", "clips", "sample_offsets", "inferred", "tasks")) else None


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def generate_pseudo_labels(opts: PseudoLabelOptions, *, address: str | None = None, workers: int | None = None,
                           distributed: bool = True, gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Label the frames of ``opts.data`` that lack sem / pose labels with the checkpoints' models
    and write the pseudo family under ``opts.out``; returns its manifest, plus ``info`` (runner,
    seconds) that the file leaves out so that the same inputs give the same bytes.

    Runs on ``workers`` Ray actors (default: one per shard, at most 8 and at most the cluster's
    GPUs, or CPUs / ``opts.threads`` without GPUs) of the cluster at ``address`` (``None``: the
    cluster named by ``RAY_ADDRESS`` inside a Ray job, else an embedded local one), each with
    ``gpus_per_worker`` GPUs (default: 1 where the cluster has GPUs); in this process with
    ``distributed=False`` or a process-local (``memory://``) output. Raises ``FileExistsError``
    when ``opts.out`` holds a manifest and ``opts.overwrite`` is False.
    """
    t_start = time.perf_counter()
    opts = opts.absolute()
    read_manifest(opts.data)  # the image family, checked for its format version
    source_sha = manifest_sha256(opts.data)
    families = families_from_manifest(opts.data, opts.split, opts.sets)
    if not families:
        raise VTDInputError(f"{opts.data}: the manifest lists no frames for split {opts.split!r}")
    ckpts = tuple(checkpoint_info(t, opts.checkpoints[t], opts.height) for t in PSEUDO_TASKS if t in opts.checkpoints)
    manifest_uri = fsio.join(opts.out, MANIFEST_NAME)
    if fsio.exists(manifest_uri):
        if not opts.overwrite:
            raise FileExistsError(f"{manifest_uri} already exists; pass --overwrite to replace the pseudo-labels")
        fsio.remove(manifest_uri)
    plan_base = {"source": source_sha, "checkpoints": [[c.task, c.sha256, c.height] for c in ckpts],
                 "thresholds": opts.thresholds, "format_version": PSEUDO_FORMAT_VERSION}
    units = []
    for fam in families:
        require = tuple(opts.require.get(fam.set_name, ()))
        for url in fam.urls:
            path = url[len(opts.data.rstrip("/")) + 1:]
            plan = hashlib.sha256(json.dumps(plan_base | {"path": path, "require": require}, sort_keys=True).encode()).hexdigest()
            units.append(ShardUnit(fam.set_name, opts.split, path, url, fsio.join(opts.out, path), require, plan, opts.overwrite))
    for d in sorted({u.path.rsplit("/", 1)[0] for u in units}):  # debris of interrupted writes
        for name in fsio.list_files(fsio.join(opts.out, d)):
            if fsio.TMP_MARKER in name:
                fsio.remove(fsio.join(opts.out, d, name))

    spec = WorkerSpec(ckpts, opts.thresholds)
    runner: LocalRunner | RayRunner
    use_ray = distributed and not (fsio.is_process_local(opts.out) or fsio.is_process_local(opts.data))
    if use_ray:
        from cluster.local import connect

        info = connect(address)
        gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if info.num_gpus >= 1 else 0.0)
        slots = int(info.num_gpus // gpus) if gpus else int(info.num_cpus // opts.threads)
        n = workers if workers is not None else max(1, min(MAX_DEFAULT_WORKERS, len(units), slots))
        runner = RayRunner(spec, workers=n, threads=opts.threads, gpus=gpus, actor_cls=PseudoLabelWorker, batch_size=opts.batch_size)
        mode = f"ray ({info.address}), {n} worker(s), {gpus:g} GPU(s) each"
    else:
        runner = LocalRunner(PseudoLabelWorker(spec, threads=opts.threads, batch_size=opts.batch_size))  # type: ignore[arg-type]
        mode = "in-process"
    try:
        sidecars = runner.map("run", units)
    finally:
        runner.close()

    manifest = _manifest(opts, source_sha, ckpts, units, sidecars)
    fsio.write_json_atomic(manifest_uri, manifest)  # the same bytes for the same inputs (pipelines hash it)
    return manifest | {"info": {"runner": mode, "seconds": round(time.perf_counter() - t_start, 3)}}


def _manifest(opts: PseudoLabelOptions, source_sha: str, ckpts: tuple[CheckpointInfo, ...], units: list[ShardUnit],
              sidecars: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = [c.task for c in ckpts]
    sets: dict[str, Any] = {}
    totals: dict[str, Any] = {"samples": 0, "clips": 0, "shards": 0, "bytes": 0,
                              "inferred": {t: 0 for t in tasks}, "tasks": {t: {"samples": 0, "instances": 0} for t in tasks}}
    for unit, side in zip(units, sidecars):
        key = f"{unit.set_name}/{unit.split}"
        entry = sets.setdefault(key, {"set": unit.set_name, "split": unit.split, "require": list(unit.require), "shards": [],
                                      "samples": 0, "clips": 0, "bytes": 0, "inferred": {t: 0 for t in tasks},
                                      "tasks": {t: {"samples": 0, "instances": 0} for t in tasks}})
        entry["shards"].append({k: side[k] for k in ("path", "samples", "clips", "bytes", "sample_offsets", "inferred", "tasks")})
        for target in (entry, totals):
            for k in ("samples", "clips", "bytes"):
                target[k] += side[k]
            for t in tasks:
                target["inferred"][t] += side["inferred"][t]
                for k in ("samples", "instances"):
                    target["tasks"][t][k] += side["tasks"][t][k]
        totals["shards"] += 1
    return {
        "format_version": PSEUDO_FORMAT_VERSION,
        "kind": PSEUDO_KIND,
        "source": {"uri": opts.data, "manifest_sha256": source_sha, "split": opts.split},
        "checkpoints": {c.task: {"uri": c.uri, "sha256": c.sha256, "height": c.height} for c in ckpts},
        "thresholds": opts.thresholds,
        "sets": sets,
        "totals": totals,
    }


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value or key in out:
            raise VTDInputError(f"--{what} {item!r}: expected KEY=VALUE, each key once")
        out[key] = value
    return out


def pseudo_label_command(args: argparse.Namespace) -> int:
    """``vtd pseudo-label``: :func:`generate_pseudo_labels` from the command line, then a summary."""
    opts = PseudoLabelOptions(
        checkpoints=_pairs(args.checkpoint or [], "checkpoint"),
        data=args.data, out=args.out, split=args.split,
        sets=None if args.sets is None else tuple(s for s in args.sets.split(",") if s),
        require={s: tuple(t for t in ts.split(",") if t) for s, ts in _pairs(args.require or [], "require").items()},
        sem_threshold=args.sem_threshold, pose_threshold=args.pose_threshold, person_threshold=args.person_threshold,
        height=args.height, batch_size=args.batch_size, overwrite=args.overwrite,
    )
    m = generate_pseudo_labels(opts, address=args.address, workers=args.workers)
    print(f"pseudo-labels of {opts.data} ({opts.split}) → {opts.out}: {m['info']['runner']}, {m['info']['seconds']:.1f} s")
    for key, s in m["sets"].items():
        tasks = ", ".join(f"{t}: {c['samples']} of {s['inferred'][t]} frames run / {c['instances']} inst"
                          for t, c in s["tasks"].items())
        print(f"  {key}: {s['samples']} frames ({s['clips']} clips) — {tasks}")
    return 0
