"""``vtd predict``: a model's predictions on a split, in the formats BDD100K's toolkit and
evaluation server take (layout and conventions: :mod:`.bdd100k_format`).

Data flow: the units of ``vtd evaluate`` (:mod:`.units`) on the same workers (:mod:`.runners`,
:mod:`.worker`: same model loading, test height, tracker), each returning its frames' files
(:meth:`.worker.EvalWorker.export`) instead of metric inputs; the driver writes each unit's files
as it comes in (PNGs and per-video JSON atomically, one by one) and streams the frame lists that
span units (``det.json``, ``pose.json``, ``ins_seg/scores.json``) into temporary files that
replace the final names only once the whole split is written. So the driver holds one unit's
output at a time, and a run that fails leaves no half-written JSON under a final name.
``predict_info.json`` records the run (checkpoint, data, split, height, frames per output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from vtd_train.tracker import TrackerConfig

from .bdd100k_format import OUTPUTS
from .runners import open_inference
from .worker import DEFAULT_BATCH_SIZE

__all__ = ["predict_command", "run_prediction"]


class _JsonLists:
    """JSON arrays written one entry at a time, each into ``<file>.tmp-…`` (fsio.atomic_open),
    moved onto its name when the ``with`` block ends cleanly; removed on an error."""

    def __init__(self, out: str, stack: contextlib.ExitStack) -> None:
        self.out, self.stack = out, stack
        self.files: dict[str, IO[bytes]] = {}
        self.counts: Counter = Counter()

    def extend(self, key: str, entries: list[dict[str, Any]]) -> None:
        fh = self.files.get(key)
        if fh is None:
            fh = self.files[key] = self.stack.enter_context(fsio.atomic_open(fsio.join(self.out, key), "wb"))
            fh.write(b"[")
            self.stack.callback(lambda f=fh: f.write(b"\n]\n"))  # runs before the move (LIFO)
        for e in entries:
            fh.write((b",\n" if self.counts[key] else b"\n") + json.dumps(e, ensure_ascii=False).encode("utf-8"))
            self.counts[key] += 1


def _existing_outputs(out: str, overwrite: bool) -> list[str]:
    """The ``vtd predict`` outputs already in ``out``; an error if there are any and not
    ``overwrite`` (checked before the model loads; they are removed once it has)."""
    present = [name for name in OUTPUTS if fsio.exists(fsio.join(out, name))]
    if present and not overwrite:
        raise VTDInputError(f"{out}: already holds predictions ({', '.join(present)}); pass --overwrite to replace them")
    return present


def _remove_outputs(out: str, names: list[str]) -> None:
    """Remove exactly these outputs (stale PNGs of frames no longer predicted must not survive)."""
    for name in names:
        fs, path = fsio.resolve(fsio.join(out, name))
        with fsio.naming(fsio.join(out, name)):
            fs.rm(path, recursive=True)


def run_prediction(
    checkpoint: str | None = None,
    data: str | None = None,
    *,
    out_dir: str | Path,
    model: Any = None,
    split: str = "val",
    address: str | None = None,
    workers: int | None = None,
    distributed: bool | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int = 1,
    gpus_per_worker: float = 0.0,
    tracker: TrackerConfig | None = None,
    height: int | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the predictions of ``checkpoint`` (a URI) or ``model`` on the ``split`` shards of
    ``data`` to ``out_dir`` (local path or fsspec URI) in BDD100K's formats. Options as
    :func:`.evaluate.run_evaluation` (the same workers, test height and tracker). Returns the
    content of ``predict_info.json``: ``outputs`` (frames written per output, e.g. ``det``,
    ``sem_seg``, ``box_track``), ``files`` (what each output is), run facts and timings."""
    t_start = time.perf_counter()
    if not out_dir:
        raise VTDInputError("predict: no output directory given (--out)")
    out = str(out_dir)
    stale = _existing_outputs(out, overwrite)
    counts: Counter = Counter()
    with open_inference(checkpoint, data, what="predict", model=model, split=split, address=address, workers=workers,
                        distributed=distributed, batch_size=batch_size, threads=threads, gpus_per_worker=gpus_per_worker,
                        tracker=tracker, height=height) as run, contextlib.ExitStack() as stack:
        _remove_outputs(out, stale)  # the model loaded and the units are planned: replace what was there
        lists = _JsonLists(out, stack)
        t0 = time.perf_counter()
        frames = 0
        for unit_export in run.runner.imap("export", run.units):
            for rel, payload in unit_export.files:
                fsio.write_bytes_atomic(fsio.join(out, rel), payload)
            for key, entries in unit_export.records.items():
                lists.extend(key, entries)
            counts.update(unit_export.counts)
            frames += unit_export.frames
        t_infer = time.perf_counter() - t0
    info: dict[str, Any] = {
        "checkpoint": str(checkpoint) if model is None else f"<in-memory {type(model).__name__}>",
        "data": str(data), "split": split, "runner": run.mode, "workers": run.runner.workers, "units": len(run.units),
        "model_tasks": list(run.tasks), "frames": frames,
        "height": run.height if run.height is not None else "stored resolution",
        "outputs": dict(sorted(counts.items())),
        "files": {k: v for k, v in _FILES.items() if counts.get(k)},
        "seconds": {"plan": round(run.plan_seconds, 3), "inference": round(t_infer, 3),
                    "total": round(time.perf_counter() - t_start, 3)},
    }
    fsio.write_json_atomic(fsio.join(out, "predict_info.json"), info)
    return info


#: What each output holds (``predict_info.json``), keyed by output.
_FILES = {
    "det": "det.json: Scalabel frames, labels with box2d + score (toolkit: -t det); attributes weather/scene (tagging)",
    "pose": "pose.json: Scalabel frames, labels with an 18-joint graph + score (toolkit: -t pose)",
    "drivable": "drivable/masks/<name>.png: 0 direct, 1 alternative, 2 background (toolkit: -t drivable)",
    "lane": "lane/masks/<name>.png: BDD100K lane bytes (toolkit: -t lane_mark)",
    "sem_seg": "sem_seg/masks/<name>.png: train ids 0..18 (toolkit: -t sem_seg)",
    "ins_seg": "ins_seg/bitmasks/<name>.png + ins_seg/scores.json (toolkit: -t ins_seg --score-file)",
    "box_track": "box_track/<video>.json: Scalabel frames with track ids (toolkit: -t box_track)",
    "seg_track": "seg_track/bitmasks/<video>/<name>.png: bitmasks, instance id = track id + 1 (toolkit: -t seg_track)",
}


def predict_command(args: argparse.Namespace) -> int:
    """``vtd predict``: run :func:`run_prediction` and print what was written where."""
    info = run_prediction(
        args.checkpoint, args.data, out_dir=args.out, split=args.split, address=args.address, workers=args.workers,
        height=args.height, overwrite=args.overwrite,
        distributed=args.address is not None,  # the CLI runs in this process unless given a cluster
    )
    print(f"predicted {info['checkpoint']} on {info['data']} ({info['split']}): {info['frames']} frames, "
          f"{info['units']} units, {info['runner']}, {info['workers']} worker(s), height {info['height']}, "
          f"{info['seconds']['total']:.1f} s")
    for key, n in info["outputs"].items():
        print(f"  {key:<10} {n:6d} frames  {_FILES[key]}")
    if not info["outputs"]:
        print("  nothing written: the model predicts no task that has a BDD100K format on these image sets")
    print(f"out: {args.out}")
    return 0
