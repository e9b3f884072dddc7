"""The inference worker of ``vtd evaluate`` and ``vtd predict``: loads a model once and runs work
units with it, in this process or as a Ray actor (:mod:`.runners`).

One inference path, two consumers: :meth:`EvalWorker.outputs` yields every frame of a unit with
its prediction at the stored resolution (and, on tracking frames, the tracker's output);
:meth:`EvalWorker.run` turns them into metric inputs (``vtd evaluate``), :meth:`EvalWorker.export`
into BDD100K-format files (``vtd predict``), so both see the same predictions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import torch

from data_pipeline.bdd100k.format import TASKS
from data_pipeline.loading.decode import DecodedFrame
from data_pipeline.errors import VTDInputError
from data_pipeline.loading.loader import iter_frames
from data_pipeline.loading.structures import TASK_INDEX, AugmentPlan, Batch
from data_pipeline.loading.transforms import prepare_batch
from vtd_train.model.outputs import FramePrediction
from vtd_train.tracker import QDTracker, TrackerConfig, TrackResult

from .inference import EvalState, check_prediction, labelled
from .overlays import make_overlay
from .report import OverlayFrame
from .units import WorkUnit, chunks, scan_track_shard, video_clips, video_frames, with_next

__all__ = ["DEFAULT_BATCH_SIZE", "SIZE_DIVISOR", "EvalWorker", "FrameOutput", "ModelSpec", "UnitResult", "torch_threads"]

#: Frames per ``predict`` call.
DEFAULT_BATCH_SIZE: Final = 4
#: Images are padded to a multiple of this (the loader's default; the FPN's coarsest stride).
SIZE_DIVISOR: Final = 32


@dataclass
class UnitResult:
    """What :meth:`EvalWorker.run` returns for a unit: metric inputs and overlay frames."""

    state: EvalState
    overlays: list[OverlayFrame] = field(default_factory=list)


@dataclass
class FrameOutput:
    """One frame of a unit with what the model (and tracker) made of it.

    ``pred``: at the frame's stored resolution. Tracking frames (``video`` set): ``tracked`` is
    the tracker's output (``None`` for a model without ``mot``); ``flow_pair`` says that
    ``pred.flow`` was computed with the next frame of the video as reference and both frames
    carry MOTS labels (a pair the flow proxy scores). ``last``: the video's last frame.
    """

    set_name: str
    frame: DecodedFrame
    pred: FramePrediction
    tracked: TrackResult | None = None
    video: str | None = None
    flow_pair: bool = False
    last: bool = False

    @property
    def name(self) -> str:
        return self.frame.record["name"]


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
    """Loads the model once and runs work units with it.

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
        """Metric inputs of a unit (``vtd evaluate``)."""
        with torch_threads(self.threads):
            if unit.set_name == "track":
                return self._score_track(unit)
            return self._score_images(unit)

    def export(self, unit: WorkUnit) -> Any:
        """A unit's predictions as BDD100K-format files (``vtd predict``): a
        :class:`.bdd100k_format.UnitExport`."""
        from .bdd100k_format import UnitExporter

        exporter = UnitExporter(self.tasks)
        with torch_threads(self.threads):
            for out in self.outputs(unit):
                exporter.add(out)
        return exporter.result()

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

    def outputs(self, unit: WorkUnit) -> Iterator[FrameOutput]:
        """Every frame of ``unit`` with its prediction: det / seg shards in shard order; tracking
        videos one after the other (sorted), each in frame order with a tracker of its own."""
        if unit.set_name != "track":
            for chunk in chunks(iter_frames(unit.urls), self.batch_size):
                for f, p in zip(chunk, self.predict_frames(unit.set_name, chunk)):
                    yield FrameOutput(unit.set_name, f, p)
            return
        for video, clips in video_clips(unit):
            yield from self._video_outputs(video, video_frames(video, clips))

    def _video_outputs(self, video: str, frames: Iterator[DecodedFrame]) -> Iterator[FrameOutput]:
        """One video, frames in frame order: one tracker; flow with key t−1 and reference t."""
        tracker = QDTracker(self.tracker_cfg) if "mot" in self.tasks else None
        predict_flow = "flow" in self.tasks
        for chunk in chunks(with_next(frames), self.batch_size):
            # a flow pair: two consecutive frames that both carry MOTS masks (the flow proxy's GT)
            pair = [n is not None and labelled(f.sources, "mots") and labelled(n.sources, "mots") for f, n in chunk]
            refs = [n if n is not None else f for f, n in chunk] if predict_flow and any(pair) else None
            preds = self.predict_frames("track", [f for f, _ in chunk], refs)
            for (f, n), p, is_pair in zip(chunk, preds, pair):
                name, index = f.record["name"], f.record["frame_index"]
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
                yield FrameOutput("track", f, p, result, video, is_pair, last=n is None)

    # -- scoring (``vtd evaluate``) -----------------------------------------------------------------

    def _score_images(self, unit: WorkUnit) -> UnitResult:
        out = UnitResult(EvalState())
        for o in self.outputs(unit):
            out.state.add_frame(o.name, o.frame.targets, o.frame.sources, o.pred, self.tasks)
            if len(out.overlays) < unit.overlays:
                out.overlays.append(make_overlay(unit.set_name, o.frame, o.pred))
        return out

    def _score_track(self, unit: WorkUnit) -> UnitResult:
        state = EvalState()
        predict_flow = "flow" in self.tasks
        with_flow: list[OverlayFrame] = []
        others: list[OverlayFrame] = []
        prev: tuple[FramePrediction, Any] | None = None  # (prediction of t−1 with flow to t, MOTS GT of t−1)
        for o in self.outputs(unit):
            f, p = o.frame, o.pred
            state.add_frame(o.name, f.targets, f.sources, p, self.tasks)
            gt = state.add_tracked(o.name, f.targets, f.sources, o.tracked, self.tasks, video=o.video,
                                   frame_index=f.record["frame_index"])
            if prev is not None:
                state.add_flow_pair(prev[0] if predict_flow else None, prev[1], gt, self.tasks)
            prev = (p, gt) if o.flow_pair else None  # a video's last frame is never a pair
            if o.last:
                state.end_video()
            if o.flow_pair and predict_flow and len(with_flow) < unit.overlays:
                with_flow.append(make_overlay("track", f, p, o.tracked))
            elif len(others) < unit.overlays:
                others.append(make_overlay("track", f, p, o.tracked, show_flow=False))
        return UnitResult(state, (with_flow + others)[: unit.overlays])


def _need_tensor(x: Any, frame: str, name: str) -> torch.Tensor:
    if x is None:
        raise VTDInputError(f"frame {frame!r}: the model tracks objects but its prediction has no {name!r}")
    return x
