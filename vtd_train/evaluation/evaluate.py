"""``vtd evaluate``: the VTD metrics and VTDA of a model on the validation shards, with a report.

Data flow::

    manifest → shard families of the split (det, seg, track)
      → work units: one per det / seg shard; tracking videos grouped by the shard they start in
        (a unit reads on into the next shards for a video that continues there)
      → per unit, in this process or on a Ray actor that loaded the checkpoint itself:
          frames → Batch (resized to the test height, unflipped) → model.predict → FramePrediction
            at the stored resolution
          det / seg frames: tag, sem, drivable, lane, det, ins, pose          (inference.EvalState)
          each tracking video, frames in frame order: one QDTracker per video → MOT / MOTS;
            model run with key = frame t−1, reference = frame t → flow proxy on MOTS frame pairs
      → unit results merged in unit order → metrics (+ reasons for the missing ones) → vtda.score
      → out_dir: metrics.json, report (table, chart, overlays), eval_info.json

Determinism: units, their order, the frames of each batch and the order of merging depend only
on the data, and every unit runs with the same number of torch threads (``threads``), so the
in-process and the Ray run give identical metrics. (oneDNN's reductions differ in the last
bits between thread counts; that is why the thread count is fixed rather than "all cores".)

Runner: with ``address`` (or in a driver process where Ray is already initialised) the units run
on ``workers`` Ray actors of ``threads`` CPUs (and ``gpus_per_worker`` GPUs), each loading
the checkpoint itself (a model object is shipped through the object store); otherwise they run
in this process. Inside a Ray worker (e.g. the training loop) evaluation always runs in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from PIL import Image

from data_pipeline import fsio
from data_pipeline.bdd100k import SCENES, TASKS, WEATHERS
from data_pipeline.decode import DecodedFrame, decode_clip
from data_pipeline.errors import DataError, VTDInputError
from data_pipeline.loader import ShardFamily, iter_frames, iter_shard
from data_pipeline.manifest import families_from_manifest
from data_pipeline.shard_format import CLIP_MEMBER
from data_pipeline.structures import TASK_INDEX, AugmentPlan, Batch
from data_pipeline.transforms import prepare_batch
from vtd_train.model.outputs import FramePrediction
from vtd_train.tracker import QDTracker, TrackerConfig, TrackResult

from .inference import EvalState, check_prediction, labelled, metric_flow
from .report import OverlayFrame, write_report
from .vtda import METRIC_KEYS, score

__all__ = ["EvalResult", "evaluate", "evaluate_command", "run_evaluation"]

#: Frames per ``predict`` call.
DEFAULT_BATCH_SIZE: Final = 4
#: Images are padded to a multiple of this (the loader's default; the FPN's coarsest stride).
SIZE_DIVISOR: Final = 32
#: Detections (and poses) below this score are left out of the overlays (metrics use them all).
OVERLAY_SCORE: Final = 0.3
#: Overlays of frames whose shorter side is below this are enlarged (an integer factor), so
#: that labels and skeletons stay readable on the mini dataset's 96×160 frames.
OVERLAY_MIN_SIDE: Final = 360
#: Default cap on the number of Ray workers.
MAX_DEFAULT_WORKERS: Final = 8
#: Order of the image sets in unit planning and in overlay selection.
SET_ORDER: Final = ("det", "seg", "track")


# ---------------------------------------------------------------------------------------------
# Work units
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """A piece of the split that one worker evaluates.

    ``urls``: the shards to read, in order. ``videos`` (tracking set only): ``(video, clips)``
    of the videos this unit owns and how many clips each has; clips of other videos in these
    shards are skipped. ``overlays``: how many overlay frames this unit renders.
    """

    set_name: str
    index: int
    urls: tuple[str, ...]
    videos: tuple[tuple[str, int], ...] = ()
    overlays: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return SET_ORDER.index(self.set_name), self.index


@dataclass
class UnitResult:
    state: EvalState
    overlays: list[OverlayFrame] = field(default_factory=list)


def _clip_header(sample: dict, url: str) -> tuple[str, int]:
    """``(video, first frame_index)`` of a tracking clip, from its ``clip.json`` (no decoding)."""
    where = f"{url}:{sample.get('__key__', '?')}"
    try:
        frames = json.loads(sample[CLIP_MEMBER])["frames"]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(where, f"unreadable clip header: {e!r}", field=CLIP_MEMBER) from None
    videos = {f.get("video") for f in frames}
    if len(videos) != 1 or not isinstance(next(iter(videos)), str) or not frames:
        raise DataError(where, f"a tracking clip must hold frames of exactly one video, got {sorted(map(str, videos))}", field="video")
    index = frames[0].get("frame_index")
    if not isinstance(index, int):
        raise DataError(where, f"frame_index must be an integer, got {index!r}", frame=frames[0].get("name"), field="frame_index")
    return next(iter(videos)), index


def scan_track_shard(url: str) -> list[str]:
    """The video of every clip of a tracking shard, in shard order (reads the headers only)."""
    return [_clip_header(s, url)[0] for s in iter_shard(url)]


def plan_units(families: list[ShardFamily], track_videos: list[list[str]] | None, overlays: int) -> list[WorkUnit]:
    """Units in a fixed order: one per det / seg shard; tracking videos grouped by the shard
    they start in (``track_videos[i]``: the clip videos of track shard ``i``, from
    :func:`scan_track_shard`). Overlay frames are shared out over the sets round-robin
    (track, det, seg) and given to each set's first unit."""
    units: list[WorkUnit] = []
    by_set = {f.set_name: f for f in families}
    for s in SET_ORDER:
        fam = by_set.get(s)
        if fam is None:
            continue
        if s != "track":
            units += [WorkUnit(s, i, (u,)) for i, u in enumerate(fam.urls)]
            continue
        assert track_videos is not None and len(track_videos) == len(fam.urls)
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        clips: Counter = Counter()
        for i, vids in enumerate(track_videos):
            for v in vids:
                first.setdefault(v, i)
                last[v] = i
                clips[v] += 1
        starts: dict[int, list[str]] = defaultdict(list)
        for v, i in first.items():
            starts[i].append(v)
        for i in sorted(starts):
            vids = sorted(starts[i])
            end = max(last[v] for v in vids)
            units.append(WorkUnit("track", i, tuple(fam.urls[i : end + 1]), tuple((v, clips[v]) for v in vids)))
    # overlays: round-robin over the sets present, track first (it shows tracks and flow)
    present = [s for s in ("track", "det", "seg") if any(u.set_name == s for u in units)]
    quota: Counter = Counter()
    for k in range(max(0, overlays)):
        if present:
            quota[present[k % len(present)]] += 1
    out = []
    for u in units:
        q = quota.pop(u.set_name, 0)
        out.append(WorkUnit(u.set_name, u.index, u.urls, u.videos, q) if q else u)
    return out


# ---------------------------------------------------------------------------------------------
# The worker: runs units with one model (in this process, or as a Ray actor)
# ---------------------------------------------------------------------------------------------


def chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class ModelSpec:
    """A model to rebuild in another process: a VTDNet config and CPU weights (a model living on
    a GPU must not be pickled as is)."""

    def __init__(self, model: Any) -> None:
        self.cfg = model.cfg
        self.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def build(self) -> Any:
        from vtd_train.model.vtdnet import VTDNet

        model = VTDNet(self.cfg)
        model.load_state_dict(self.state)
        return model


class EvalWorker:
    """Loads the model once and evaluates work units with it.

    ``source``: a checkpoint URI (loaded here, with :func:`vtd_train.checkpoint.load_model`), a
    :class:`ModelSpec`, or a model object (anything with ``tasks`` and ``predict(batch)``).
    A loaded checkpoint goes to CUDA when this process sees a GPU (and ``cuda``); a given model
    stays where it is.
    """

    def __init__(self, source: Any, *, threads: int = 1, batch_size: int = DEFAULT_BATCH_SIZE,
                 tracker: TrackerConfig | None = None, cuda: bool = True, height: int | None = None) -> None:
        self.meta: dict[str, Any] = {}  # a checkpoint's model.json meta (training config, ...)
        if isinstance(source, str):
            from vtd_train.checkpoint import load_model

            model, _, meta = load_model(source)
            self.meta = meta
        elif isinstance(source, ModelSpec):
            model = source.build()
        else:
            model = source
        if cuda and isinstance(source, (str, ModelSpec)) and torch.cuda.is_available():
            model = model.to("cuda")
        if hasattr(model, "eval"):
            model.eval()
        self.model = model
        self.tasks: tuple[str, ...] = tuple(model.tasks)
        self.device = _model_device(model)
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        self.tracker_cfg = tracker or TrackerConfig()
        self.height = None if height is None else int(height)

    # -- entry points (also the Ray actor's methods) ---------------------------------------------

    def scan(self, url: str) -> list[str]:
        return scan_track_shard(url)

    def run(self, unit: WorkUnit) -> UnitResult:
        with torch_threads(self.threads):
            if unit.set_name == "track":
                return self._run_track(unit)
            return self._run_images(unit)

    # -- inference -------------------------------------------------------------------------------

    def predict_frames(self, set_name: str, frames: list[DecodedFrame], refs: list[DecodedFrame] | None = None) -> list[FramePrediction]:
        """The model's predictions for ``frames`` (decoded images ``[3, H, W]``; ``refs``: their
        reference frames, for flow), run at :attr:`height` and returned at each frame's stored
        resolution, checked (:func:`check_prediction`)."""
        labels = torch.zeros((len(frames), len(TASKS)), dtype=torch.int8)
        for i, f in enumerate(frames):
            for t, src in f.sources.items():
                labels[i, TASK_INDEX[t]] = int(src)
        batch = Batch(
            set_name=set_name,
            images=[f.image for f in frames],
            image_sizes=[(int(f.image.shape[1]), int(f.image.shape[2])) for f in frames],
            targets=[f.targets for f in frames],
            labels=labels,
            meta=[{"name": f.record.get("name"), "video": f.record.get("video"), "frame_index": f.record.get("frame_index"),
                   "ref_frame_index": None if refs is None else r.record.get("frame_index")}
                  for f, r in zip(frames, refs or frames)],
            ref_images=None if refs is None else [r.image for r in refs],
            ref_targets=None if refs is None else [r.targets for r in refs],
            # unflipped, at the test height (aspect kept) or the stored resolution
            augment=None if self.height is None else AugmentPlan(height=self.height, flips=(False,) * len(frames)),
            size_divisor=SIZE_DIVISOR,
        )
        # only the images go to the device: predict reads nothing else (the targets stay on the
        # CPU for the metrics; a model may read them, e.g. the tests' ground-truth oracle)
        batch = prepare_batch(replace(batch, images=[x.to(self.device) for x in batch.images],
                                      ref_images=None if refs is None else [x.to(self.device) for x in batch.ref_images]))
        # predictions come back at each frame's stored resolution, where its labels are
        preds = self.model.predict(batch, output_sizes=[(int(f.image.shape[1]), int(f.image.shape[2])) for f in frames])
        if len(preds) != len(frames):
            raise VTDInputError(f"the model returned {len(preds)} predictions for {len(frames)} frames")
        for f, p in zip(frames, preds):
            check_prediction(p, f.record.get("name"), (int(f.image.shape[1]), int(f.image.shape[2])))
        return preds

    def _run_images(self, unit: WorkUnit) -> UnitResult:
        out = UnitResult(EvalState())
        for chunk in chunks(iter_frames(unit.urls), self.batch_size):
            for f, p in zip(chunk, self.predict_frames(unit.set_name, chunk)):
                out.state.add_frame(f.record["name"], f.targets, f.sources, p, self.tasks)
                if len(out.overlays) < unit.overlays:
                    out.overlays.append(make_overlay(unit.set_name, f, p))
        return out

    def _run_track(self, unit: WorkUnit) -> UnitResult:
        out = UnitResult(EvalState())
        with_flow: list[OverlayFrame] = []
        others: list[OverlayFrame] = []
        for video, clips in _video_clips(unit):
            self._run_video(video, _video_frames(video, clips), out.state, unit.overlays, with_flow, others)
        out.overlays = (with_flow + others)[: unit.overlays]
        return out

    def _run_video(self, video: str, frames: Iterator[DecodedFrame], state: EvalState, n_overlays: int,
                   with_flow: list[OverlayFrame], others: list[OverlayFrame]) -> None:
        """One video, frames in frame order: one tracker; flow with key t−1 and reference t."""
        tracker = QDTracker(self.tracker_cfg) if "mot" in self.tasks else None
        predict_flow = "flow" in self.tasks
        prev: tuple[FramePrediction, Any] | None = None  # (prediction of t−1 with flow to t, MOTS GT of t−1)
        for chunk in chunks(_with_next(frames), self.batch_size):
            # a flow pair: two consecutive frames that both carry MOTS masks (the flow proxy's GT)
            pair = [n is not None and labelled(f.sources, "mots") and labelled(n.sources, "mots") for f, n in chunk]
            refs = [n if n is not None else f for f, n in chunk] if predict_flow and any(pair) else None
            preds = self.predict_frames("track", [f for f, _ in chunk], refs)
            for (f, _), p, is_pair in zip(chunk, preds, pair):
                name, index = f.record["name"], f.record["frame_index"]
                state.add_frame(name, f.targets, f.sources, p, self.tasks)
                result = None
                if tracker is not None:
                    try:
                        result = tracker.update(
                            index, _need_tensor(p.boxes, name, "boxes"), _need_tensor(p.scores, name, "scores"),
                            _need_tensor(p.classes, name, "classes"), _need_tensor(p.embeddings, name, "embeddings"),
                            masks=p.masks if "mots" in self.tasks else None,
                        )
                    except ValueError as e:  # inconsistent prediction shapes
                        raise VTDInputError(f"frame {name!r}: {e}") from None
                gt = state.add_tracked(name, f.targets, f.sources, result, self.tasks, video=video, frame_index=index)
                if prev is not None:
                    state.add_flow_pair(prev[0] if predict_flow else None, prev[1], gt, self.tasks)
                prev = (p, gt) if is_pair else None
                if is_pair and predict_flow and len(with_flow) < n_overlays:
                    with_flow.append(make_overlay("track", f, p, result))
                elif len(others) < n_overlays:
                    others.append(make_overlay("track", f, p, result, show_flow=False))


def _need_tensor(x: Any, frame: str, name: str) -> torch.Tensor:
    if x is None:
        raise VTDInputError(f"frame {frame!r}: the model tracks objects but its prediction has no {name!r}")
    return x


def _with_next(frames: Iterator[DecodedFrame]) -> Iterator[tuple[DecodedFrame, DecodedFrame | None]]:
    prev = None
    for f in frames:
        if prev is not None:
            yield prev, f
        prev = f
    if prev is not None:
        yield prev, None


def _video_clips(unit: WorkUnit) -> Iterator[tuple[str, list[dict]]]:
    """The raw clips of each video of a track unit, videos sorted, clips in frame order."""
    want = dict(unit.videos)
    got: dict[str, list[tuple[int, dict]]] = {v: [] for v in want}
    remaining = sum(want.values())
    for url in unit.urls:
        with contextlib.closing(iter_shard(url)) as samples:
            for sample in samples:
                video, first = _clip_header(sample, url)
                if video in got:
                    got[video].append((first, sample))
                    remaining -= 1
                    if remaining == 0:
                        break
        if remaining == 0:
            break
    for video in sorted(want):
        if len(got[video]) != want[video]:
            raise DataError(", ".join(unit.urls), f"video {video!r}: expected {want[video]} clips, found {len(got[video])} "
                            "(the shards changed since they were scanned?)")
        yield video, [s for _, s in sorted(got[video], key=lambda fs: fs[0])]


def _video_frames(video: str, clips: list[dict]) -> Iterator[DecodedFrame]:
    """Decoded frames of one video in increasing ``frame_index`` (one clip decoded at a time)."""
    last = None
    for sample in clips:
        for f in decode_clip(sample):
            index = f.record.get("frame_index")
            if not isinstance(index, int) or (last is not None and index <= last):
                raise DataError(str(sample.get("__url__", "?")), f"video {video!r}: frame_index {index!r} after {last!r} "
                                "(tracking frames must be unique and ordered)", frame=f.record.get("name"), field="frame_index")
            last = index
            yield f


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray | None:
    return None if x is None else x.detach().cpu().numpy()


def make_overlay(set_name: str, frame: DecodedFrame, pred: FramePrediction, tracked: TrackResult | None = None,
                 *, show_flow: bool = True, threshold: float = OVERLAY_SCORE) -> OverlayFrame:
    """All of a frame's predictions as an :class:`OverlayFrame`: drivable, lanes and the
    semantic and flow panels as predicted (flow only with ``show_flow``: a frame whose flow was
    computed against a real next frame); objects from the tracker (coloured by track id) on
    tracking frames, otherwise the detections scoring at least ``threshold``; poses likewise."""
    name = frame.record["name"]
    h, w = int(frame.image.shape[1]), int(frame.image.shape[2])
    k = max(1, -(-OVERLAY_MIN_SIDE // min(h, w)))  # small frames are shown enlarged, k× per side

    def grid(a: np.ndarray | None, axes: tuple[int, int]) -> np.ndarray | None:  # nearest-neighbour k×
        return None if a is None or k == 1 else np.repeat(np.repeat(a, k, axis=axes[0]), k, axis=axes[1])

    kw: dict[str, Any] = {t: _np(getattr(pred, t)) for t in ("drivable", "lane", "sem")}
    notes = []
    if tracked is not None:
        kw |= dict(boxes=_np(tracked.boxes), classes=_np(tracked.classes), scores=_np(tracked.scores),
                   track_ids=_np(tracked.track_ids), masks=_np(tracked.masks))
        notes.append(f"frame {frame.record['frame_index']} of video {frame.record['video']}, tracker output")
    elif pred.boxes is not None:
        keep = pred.scores >= threshold
        kw |= dict(boxes=_np(pred.boxes[keep]), classes=_np(pred.classes[keep]), scores=_np(pred.scores[keep]),
                   masks=None if pred.masks is None else _np(pred.masks[keep]))
        notes.append(f"detections scoring >= {threshold}")
    if pred.keypoints is not None and pred.keypoint_scores is not None:
        kw["keypoints"] = _np(pred.keypoints[pred.keypoint_scores >= threshold])
    if show_flow and pred.flow is not None:
        kw["flow"] = metric_flow(pred, name)
        notes.append("flow to the next frame")
    image = frame.image.permute(1, 2, 0).cpu().numpy()
    if k > 1:
        image = np.asarray(Image.fromarray(image).resize((w * k, h * k), Image.Resampling.BILINEAR))
        for t in ("drivable", "lane", "sem", "masks"):
            kw[t] = grid(kw.get(t), (-2, -1))
        if kw.get("boxes") is not None:
            kw["boxes"] = kw["boxes"] * k
        if kw.get("keypoints") is not None:
            kw["keypoints"] = kw["keypoints"] * np.array([k, k, 1], np.float32)
        if kw.get("flow") is not None:
            kw["flow"] = grid(kw["flow"], (0, 1)) * k  # displacements in display pixels
        notes.append(f"{w}x{h} shown at {k}x")
    caption = f"{set_name} set: {name}" + (f" ({'; '.join(notes)})" if notes else "")
    tags = {}
    if pred.weather is not None:
        tags["weather"] = (WEATHERS[int(pred.weather.argmax())], float(pred.weather.max()))
    if pred.scene is not None:
        tags["scene"] = (SCENES[int(pred.scene.argmax())], float(pred.scene.max()))
    return OverlayFrame(name=caption, image=image, tags=tags or None, **kw)


# ---------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------


class LocalRunner:
    def __init__(self, worker: EvalWorker) -> None:
        self.worker = worker
        self.workers = 1

    def map(self, method: str, items: list[Any]) -> list[Any]:
        return [getattr(self.worker, method)(it) for it in items]

    def close(self) -> None:
        pass


class RayRunner:
    """``workers`` actors of :class:`EvalWorker` (or ``actor_cls``, built as
    ``actor_cls(source, threads=threads, **kw)``); :meth:`map` returns results in input order."""

    def __init__(self, source: Any, *, workers: int, threads: int, gpus: float, actor_cls: type = EvalWorker, **kw: Any) -> None:
        import ray
        from ray.util import ActorPool

        if not isinstance(source, str):
            source = ray.put(ModelSpec(source) if _is_vtdnet(source) else source)
        actor = ray.remote(num_cpus=threads, num_gpus=gpus)(actor_cls)
        self.actors = [actor.remote(source, threads=threads, **kw) for _ in range(workers)]
        self.pool = ActorPool(self.actors)
        self.workers = workers

    def map(self, method: str, items: list[Any]) -> list[Any]:
        from ray.exceptions import RayTaskError

        try:
            return list(self.pool.map(lambda a, it: getattr(a, method).remote(it), items))
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (VTDInputError, FileNotFoundError)):
                raise cause from None  # the worker's own message, not Ray's wrapped traceback
            raise

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _is_vtdnet(model: Any) -> bool:
    from vtd_train.model.vtdnet import VTDNet

    return isinstance(model, VTDNet)


def _use_ray(address: str | None, distributed: bool | None) -> bool:
    """``distributed`` if given; else Ray with an address, or in a driver process where Ray is
    initialised; never inside a Ray worker (the training loop evaluates in its own process)."""
    if distributed is not None:
        return distributed
    if address is not None:
        return True
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode != ray.WORKER_MODE


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything an evaluation produced.

    ``metrics``: canonical metric values; ``scores``: :func:`vtda.score` of them (``vtda_*``,
    ``missing``, maybe ``note``); ``missing``: a reason for every canonical key left out;
    ``info``: run facts (frames, labelled frames per task, runner, timings).
    """

    metrics: dict[str, float]
    scores: dict[str, Any]
    missing: dict[str, str]
    info: dict[str, Any]
    overlays: list[OverlayFrame]
    report: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        """The content of ``metrics.json``: canonical keys present + the VTDA fields."""
        return {k: self.metrics[k] for k in METRIC_KEYS if k in self.metrics} | self.scores


def run_evaluation(
    checkpoint: str | None = None,
    data: str | None = None,
    *,
    model: Any = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    reference: str | Path | Mapping[str, Any] | None = None,
    overlays: int = 4,
    distributed: bool | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = 1,
    gpus_per_worker: float = 0.0,
    tracker: TrackerConfig | None = None,
    run_name: str | None = None,
    height: int | str | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` (a URI) or ``model`` (an object with ``tasks`` and ``predict``,
    e.g. the VTDNet being trained) on the ``split`` shards of ``data``; see :func:`evaluate`."""
    t_start = time.perf_counter()
    if (checkpoint is None) == (model is None):
        raise VTDInputError("evaluate: give either a checkpoint URI or a model object (exactly one)")
    if data is None:
        raise VTDInputError("evaluate: no data URI given (the shard root written by `vtd data convert`)")
    if height is not None and height != "native" and (not isinstance(height, int) or height < 1):
        raise VTDInputError(f"evaluate: the test height must be a positive number of pixels or 'native', got {height!r}")
    native = height == "native"
    height = None if native else height
    if batch_size < 1 or threads < 1 or (workers is not None and workers < 1) or overlays < 0:
        raise VTDInputError(f"evaluate: batch_size, threads and workers must be >= 1 and overlays >= 0, "
                            f"got {batch_size}, {threads}, {workers}, {overlays}")
    ref_map, ref_name = _reference(reference)
    families = families_from_manifest(str(data), split)
    if not families:
        raise VTDInputError(f"{data}: the manifest lists no frames for split {split!r}")

    # The driver loads the checkpoint too: a bad checkpoint fails here, with its own message,
    # and the model's task set is known before any worker starts.
    use_ray = _use_ray(address, distributed)
    was_training = None
    if model is None:  # on a GPU only if it runs here; with Ray the workers load their own copies
        local = EvalWorker(str(checkpoint), threads=threads, batch_size=batch_size, tracker=tracker, cuda=not use_ray)
    else:
        was_training = getattr(model, "training", None)
        local = EvalWorker(model, threads=threads, batch_size=batch_size, tracker=tracker)
    if height is None and not native:
        height = trained_height(local.meta)
    local.height = height
    tasks = local.tasks
    runner: LocalRunner | RayRunner = LocalRunner(local)
    mode = "in-process"
    try:
        fam_by_set = {f.set_name: f for f in families}
        if use_ray:
            from cluster.local import connect

            info = connect(address)
            n_units_max = sum(len(f.urls) for f in families)
            free = int(info.num_cpus // threads) or 1
            n = workers if workers is not None else max(1, min(MAX_DEFAULT_WORKERS, n_units_max, free))
            runner = RayRunner(checkpoint if model is None else model, workers=n, threads=threads,
                               gpus=gpus_per_worker, batch_size=batch_size, tracker=tracker, height=height)
            mode = f"ray ({info.address})"
        t0 = time.perf_counter()
        track_videos = runner.map("scan", list(fam_by_set["track"].urls)) if "track" in fam_by_set else None
        units = plan_units(families, track_videos, overlays)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        results: list[UnitResult] = runner.map("run", units)
        t_infer = time.perf_counter() - t0
    finally:
        runner.close()
        if was_training is not None:
            model.train(was_training)

    t0 = time.perf_counter()
    state = EvalState()
    for unit, r in sorted(zip(units, results), key=lambda ur: ur[0].key):
        state.merge(r.state)
    metrics, missing = state.compute(tasks)
    if not metrics:
        raise VTDInputError(
            f"{data} ({split}): nothing could be scored: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    scores = score(metrics)
    t_metrics = time.perf_counter() - t0
    overlay_frames = _pick_overlays([(u, r) for u, r in zip(units, results)], overlays)

    info_doc: dict[str, Any] = {
        "checkpoint": str(checkpoint) if model is None else f"<in-memory {type(model).__name__}>",
        "data": str(data), "split": split, "runner": mode, "workers": runner.workers, "units": len(units),
        "model_tasks": list(tasks), "frames": state.frames,
        "height": height if height is not None else "stored resolution",
        "labelled": {t: state.labelled[t] for t in TASKS if state.labelled[t]},
        "missing": missing,
        "seconds": {"plan": round(t_plan, 3), "inference": round(t_infer, 3), "metrics": round(t_metrics, 3)},
    }
    result = EvalResult(metrics=metrics, scores=scores, missing=missing, info=info_doc, overlays=overlay_frames)
    if out_dir is not None:
        t0 = time.perf_counter()
        name = run_name or (Path(str(checkpoint).rstrip("/")).name if model is None else "model")
        result.report = write_report(
            out_dir, result.as_dict(), reference=ref_map, reference_name=ref_name, overlays=overlay_frames,
            title=f"VTD evaluation: {name} on {split}", run_name=name,
        )
        info_doc["seconds"]["report"] = round(time.perf_counter() - t0, 3)
    info_doc["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    if out_dir is not None:
        fsio.write_json_atomic(str(Path(out_dir) / "eval_info.json"), info_doc)
    return result


def evaluate(
    checkpoint: str | None = None,
    data: str | None = None,
    *,
    model: Any = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    address: str | None = None,
    workers: int | None = None,
    reference: str | Path | Mapping[str, Any] | None = None,
    overlays: int = 4,
    **kw: Any,
) -> dict[str, Any]:
    """The VTD metrics + VTDA of a model on the ``split`` shards of ``data``.

    Give a checkpoint URI (``vtd_train.checkpoint`` format) or an already-built ``model``
    (``tasks`` + ``predict(batch)``; left in the train/eval mode it came in). ``address``: a Ray
    cluster to run on (``workers`` actors, default one per unit up to 8 and the cluster's CPUs);
    without it, in this process unless Ray is initialised in this (driver) process. With
    ``out_dir``: ``metrics.json``, the report (``report.html``/``.md``, ``chart.png``,
    ``overlay_<k>.png`` for ``overlays`` frames) compared with ``reference`` (``None``: the
    paper's VTDNet-R50; a metrics JSON path; a mapping; ``{}`` for none) and ``eval_info.json``.
    ``distributed=True/False`` forces the choice (``True`` without an address joins the Ray of
    this process or starts a local cluster). ``height``: the test image height (frames resized
    with their aspect kept, predictions mapped back to the stored resolution where the labels
    are); ``None`` takes the largest training scale a ``vtd train`` checkpoint records (a model
    is tested at the scale it learnt, as the paper tests at 720), else the stored resolution;
    ``"native"`` forces the stored resolution. More options (``batch_size``, ``threads`` — torch
    threads per worker, also the CPUs each Ray actor reserves —, ``gpus_per_worker``,
    ``tracker``, ``run_name``): :func:`run_evaluation`.

    Returns the ``metrics.json`` content: the canonical metric keys that could be scored, and
    ``vtda_cls``, ``vtda_seg``, ``vtda_loc``, ``vtda_ass``, ``vtda``, ``missing`` (and ``note``
    for a partial VTDA). A task the model or the data lacks is missing, never scored 0.
    """
    return run_evaluation(
        checkpoint, data, model=model, split=split, out_dir=out_dir, address=address, workers=workers,
        reference=reference, overlays=overlays, **kw,
    ).as_dict()


def trained_height(meta: Mapping[str, Any]) -> int | None:
    """The test height of a checkpoint written by ``vtd train``: its largest training scale
    (``data.scales`` of the run's config, as the paper tests at 720, the top of its 600–720
    training scales); ``None`` (the stored resolution) for a checkpoint without that record."""
    scales = ((meta.get("config") or {}).get("data") or {}).get("scales")
    return int(max(scales)) if scales else None


def _reference(reference: str | Path | Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    from .reference import PAPER_VTDNET_R50_NAME, load_reference

    if reference is None:
        return None, PAPER_VTDNET_R50_NAME
    if isinstance(reference, Mapping):
        return reference, "reference"
    return load_reference(reference), Path(reference).name


def _pick_overlays(results: list[tuple[WorkUnit, UnitResult]], n: int) -> list[OverlayFrame]:
    """Round-robin over the sets (track, det, seg), each set's frames in unit order."""
    per_set: dict[str, list[OverlayFrame]] = defaultdict(list)
    for u, r in sorted(results, key=lambda ur: ur[0].key):
        per_set[u.set_name] += r.overlays
    queues = [per_set[s] for s in ("track", "det", "seg") if per_set[s]]
    out: list[OverlayFrame] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def evaluate_command(args: argparse.Namespace) -> int:
    """``vtd evaluate``: run :func:`run_evaluation` and print the metrics, VTDA and report path."""
    t0 = time.perf_counter()
    r = run_evaluation(
        args.checkpoint, args.data, split=args.split, out_dir=args.out, address=args.address,
        workers=args.workers, reference=args.reference, overlays=args.overlays, height=args.height,
        distributed=args.address is not None,  # the CLI runs in this process unless given a cluster
    )
    wall = time.perf_counter() - t0
    info = r.info
    print(f"evaluated {info['checkpoint']} on {info['data']} ({info['split']}): {info['frames']} frames, "
          f"{info['units']} units, {info['runner']}, {info['workers']} worker(s), height {info['height']}, {wall:.1f} s")
    for k in METRIC_KEYS:
        if k in r.metrics:
            print(f"  {k:<13} {r.metrics[k]:6.1f}")
        else:
            print(f"  {k:<13}      — ({r.missing.get(k, 'missing')})")
    groups = "  ".join(f"{k[5:]} {'—' if r.scores[k] is None else format(r.scores[k], '.1f')}"
                       for k in ("vtda_cls", "vtda_seg", "vtda_loc", "vtda_ass"))
    vtda = r.scores["vtda"]
    print(f"  VTDA {'—' if vtda is None else format(vtda, '.1f')}  ({groups})")
    if "note" in r.scores:
        print(f"  note: {r.scores['note']}")
    if r.report is not None:
        print(f"report: {r.report}")
    return 0
