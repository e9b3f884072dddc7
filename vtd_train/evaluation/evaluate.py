"""``vtd evaluate``: the VTD metrics and VTDA of a model on the validation shards, with a report.

Data flow::

    manifest → shard families of the split (det, seg, track)
      → work units (units.py): one per det / seg shard; tracking videos grouped by the shard
        they start in (a unit reads on into the next shards for a video that continues there)
      → per unit, in this process or on a Ray actor that loaded the checkpoint itself
        (runners.py, worker.py):
          frames → Batch (resized to the test height, unflipped) → model.predict → FramePrediction
            at the stored resolution
          det / seg frames: tag, sem, drivable, lane, det, ins, pose          (inference.EvalState)
          each tracking video, frames in frame order: one QDTracker per video → MOT / MOTS;
            model run with key = frame t−1, reference = frame t → flow proxy on MOTS frame pairs
      → unit results merged in unit order as they come in → metrics (+ reasons for the missing
        ones) → vtda.score
      → out_dir: metrics.json, report (table, chart, overlays.py), eval_info.json

``vtd predict`` (predict.py) runs the same units on the same workers and writes the predictions
in BDD100K's formats instead of scoring them.

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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline import fsio
from data_pipeline.bdd100k.format import TASKS
from data_pipeline.errors import VTDInputError
from vtd_train.tracker import TrackerConfig

from .inference import EvalState
from .overlays import pick_overlays, prefer_flow
from .report import OverlayFrame, write_report
from .runners import MAX_DEFAULT_WORKERS, LocalRunner, RayRunner, open_inference, trained_height
from .units import WorkUnit, chunks
from .vtda import METRIC_KEYS, score
from .worker import DEFAULT_BATCH_SIZE, EvalWorker, ModelSpec, torch_threads

__all__ = [
    "DEFAULT_BATCH_SIZE", "MAX_DEFAULT_WORKERS", "EvalResult", "EvalWorker", "LocalRunner", "ModelSpec", "RayRunner",
    "chunks", "evaluate", "evaluate_command", "open_inference", "run_evaluation", "torch_threads", "trained_height",
]


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
    ref_map, ref_name = _reference(reference)
    state = EvalState()
    unit_overlays: list[tuple[WorkUnit, list[OverlayFrame]]] = []
    with open_inference(checkpoint, data, what="evaluate", model=model, split=split, address=address, workers=workers,
                        distributed=distributed, batch_size=batch_size, threads=threads, gpus_per_worker=gpus_per_worker,
                        tracker=tracker, height=height, overlays=overlays) as run:
        t0 = time.perf_counter()
        # units come back in unit order; each is merged as it comes (the driver holds one at a time)
        track: tuple[WorkUnit, list[OverlayFrame]] | None = None
        for unit, r in zip(run.units, run.runner.imap("run", run.units)):
            state.merge(r.state)
            if unit.set_name == "track":  # the first frames with flow, else the first: ``overlays`` at most held
                frames = (track[1] if track else []) + r.overlays
                track = (track[0] if track else unit, prefer_flow(frames)[:overlays])
            else:
                unit_overlays.append((unit, r.overlays))
        if track is not None:
            unit_overlays.append(track)
        t_infer = time.perf_counter() - t0
    tasks, height, units = run.tasks, run.height, run.units

    t0 = time.perf_counter()
    metrics, missing = state.compute(tasks)
    if not metrics:
        raise VTDInputError(
            f"{data} ({split}): nothing could be scored: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    scores = score(metrics)
    t_metrics = time.perf_counter() - t0
    overlay_frames = pick_overlays(unit_overlays, overlays)

    info_doc: dict[str, Any] = {
        "checkpoint": str(checkpoint) if model is None else f"<in-memory {type(model).__name__}>",
        "data": str(data), "split": split, "runner": run.mode, "workers": run.runner.workers, "units": len(units),
        "model_tasks": list(tasks), "frames": state.frames,
        "height": height if height is not None else "stored resolution",
        "labelled": {t: state.labelled[t] for t in TASKS if state.labelled[t]},
        "missing": missing,
        "seconds": {"plan": round(run.plan_seconds, 3), "inference": round(t_infer, 3), "metrics": round(t_metrics, 3)},
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


def _reference(reference: str | Path | Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    from .reference import PAPER_VTDNET_R50_NAME, load_reference

    if reference is None:
        return None, PAPER_VTDNET_R50_NAME
    if isinstance(reference, Mapping):
        return reference, "reference"
    return load_reference(reference), Path(reference).name


def evaluate_command(args: argparse.Namespace) -> int:
    """``vtd evaluate``: run :func:`run_evaluation` and print the metrics, VTDA and report path
    (a TaskPrompter checkpoint: :func:`.cityscapes3d.evaluate.evaluate_command`)."""
    from vtd_train.checkpoint import model_family

    if model_family(args.checkpoint) == "taskprompter":
        from .cityscapes3d.evaluate import evaluate_command as cityscapes3d_command

        return cityscapes3d_command(args)
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
