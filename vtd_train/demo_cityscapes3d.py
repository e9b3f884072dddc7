"""``vtd demo --benchmark cityscapes3d``: the second model family, TaskPrompter, end to end on a
synthetic Cityscapes-3D set, through the same commands a user runs.

1. generate the synthetic Cityscapes-3D root (the published layout: ``leftImg8bit``, ``gtFine``,
   ``disparity``, ``camera``, ``gtBbox3d``; :mod:`data_pipeline.cityscapes3d.synth`);
2. convert it to WebDataset shards and read the counts back from the shards (``vtd data inspect``'s
   reader);
3. evaluate the untrained tiny TaskPrompter: ``vtd model init`` of the run's config, the weights
   the training run starts from;
4. train it with ``vtd train`` on the embedded local Ray cluster: ``configs/taskprompter-tiny.yaml``
   (its model, schedule and resources) with data, storage and run name pointed into the workdir;
5. evaluate the trained checkpoint as ``vtd evaluate`` does (mIoU, depth RMSE, mDS from
   cityscapesscripts) and print trained against untrained with the change of each, flagging any
   metric that did not improve; ``report.md`` in the workdir.

Every run starts afresh: the workdir's dataset, shards and training run are replaced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

#: The training config the demo runs (the tiny TaskPrompter's CPU schedule).
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "taskprompter-tiny.yaml"
RUN_NAME = "taskprompter-demo"


def run_cityscapes3d_demo(workdir: str, seed: int = 0, size: str = "small") -> int:
    from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d
    from data_pipeline.cityscapes3d.synth import generate
    from data_pipeline.shards.inspect import inspect_shards

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root, shards = work / "cityscapes3d", work / "shards"
    t_start = t0 = time.perf_counter()
    summary = generate(root, seed=seed, size=size, overwrite=True)
    h, w = summary["image_size"]["height"], summary["image_size"]["width"]
    print(f"[1/5] generated a synthetic Cityscapes-3D {size} set ({h}×{w}) in {root} ({time.perf_counter() - t0:.1f} s)", flush=True)

    t0 = time.perf_counter()
    convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(root), out=str(shards), shard_size=8, workers=2,
                                                    overwrite=True, progress=False))
    report = inspect_shards(str(shards))
    print(f"[2/5] converted to WebDataset shards in {shards} ({time.perf_counter() - t0:.1f} s); read back from the shards:")
    for key, s in sorted(report["sets"].items()):
        tasks = ", ".join(f"{t} {v['samples']}" + (f" ({v['instances']} boxes)" if v["instances"] else "")
                          for t, v in s["tasks"].items())
        print(f"      {key:<17} {s['samples']:>4} frames in {s['shards']} shards; labelled frames: {tasks}", flush=True)

    cfg_path = write_config(work, shards)
    cfg = _load(cfg_path)
    _threads(cfg)
    t0 = time.perf_counter()
    from vtd_train.checkpoint_ops import init_checkpoint

    untrained_ck = init_checkpoint(str(cfg_path), str(work / "untrained"))
    untrained = _evaluate(untrained_ck, shards, work / "eval-untrained")
    print(f"[3/5] evaluated the untrained tiny TaskPrompter ({_params(untrained_ck)} parameters) on the validation "
          f"split ({time.perf_counter() - t0:.1f} s): {_brief(untrained['metrics'])}", flush=True)

    print(f"[4/5] `vtd train --config {cfg_path}`: {cfg.epochs} epochs, global batch {cfg.global_batch_size}, "
          f"lr {cfg.optimizer.lr:g} ({cfg.lr_schedule.policy}), {cfg.resources.num_workers} worker(s) × "
          f"{cfg.resources.cpus_per_worker:g} CPU", flush=True)
    t0 = time.perf_counter()
    from vtd_train.train.launch import train_command

    shutil.rmtree(work / "runs" / RUN_NAME, ignore_errors=True)  # a fresh run, not a resume of the last demo's
    result_json = work / "train-result.json"
    result_json.unlink(missing_ok=True)
    rc = train_command(argparse.Namespace(config=str(cfg_path), address=None, storage=None, name=None,
                                          result_json=str(result_json)))
    if rc != 0:
        print(f"vtd demo: training stopped (exit {rc})", file=sys.stderr)
        return rc
    trained_ck = json.loads(result_json.read_text())["checkpoint"]
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained = _evaluate(trained_ck, shards, work / "eval-trained")
    print(f"[5/5] trained in {t_train / 60:.1f} min, evaluated ({time.perf_counter() - t0:.1f} s); on the validation split:")
    lines, _ = compare_metrics(untrained["metrics"], trained["metrics"])
    for line in lines:
        print("      " + line)
    report_path = write_report(work, lines, untrained_ck, trained_ck)
    print(f"      the demo took {(time.perf_counter() - t_start) / 60:.1f} min; report: {report_path} "
          f"(per-model reports: {work / 'eval-untrained' / 'report.md'}, {work / 'eval-trained' / 'report.md'})")
    return 0


def write_config(work: Path, shards: Path) -> Path:
    """The demo's training config: :data:`CONFIG` with data, storage and run name in ``work``."""
    doc = yaml.safe_load(CONFIG.read_text())
    doc["data"]["uri"] = str(shards)
    doc.update(storage_path=str(work / "runs"), name=RUN_NAME)
    path = work / "taskprompter-tiny.yaml"
    path.write_text(f"# {CONFIG.name} with data, storage and run name in the demo's workdir\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def compare_metrics(untrained: dict[str, float], trained: dict[str, float]) -> tuple[list[str], list[str]]:
    """The comparison table (lines) and the metrics that did not improve: a higher mIoU / mDS, a
    lower depth RMSE; a metric missing from either side did not."""
    from vtd_train.evaluation.cityscapes3d.evaluate import LOWER_IS_BETTER, METRIC_KEYS, METRIC_LABELS

    lines = [f"{'metric':<16} {'untrained':>9} {'trained':>9} {'change':>8}"]
    not_improved = []
    for k in METRIC_KEYS:
        a, b = untrained.get(k), trained.get(k)
        change = None if a is None or b is None else b - a
        improved = change is not None and (change < 0 if k in LOWER_IS_BETTER else change > 0)
        if not improved:
            not_improved.append(k)
        lines.append(f"{METRIC_LABELS[k]:<16} {_fmt(a):>9} {_fmt(b):>9} {_fmt(change, sign=True):>8}"
                     + ("" if improved else "  <- did not improve"))
    n = len(METRIC_KEYS)
    lines.append(f"{n - len(not_improved)} of {n} metrics improved over the untrained model (↑ higher is better, "
                 "↓ lower is better)" + (f"; did not improve: {', '.join(not_improved)}" if not_improved else ""))
    return lines, not_improved


def write_report(work: Path, lines: list[str], untrained: str, trained: str) -> Path:
    path = work / "report.md"
    path.write_text("\n".join([
        "# vtd demo --benchmark cityscapes3d", "",
        f"Tiny TaskPrompter ({CONFIG.name}) on the synthetic Cityscapes-3D set, validation split.", "",
        "```", *lines, "```", "",
        f"- untrained: `{untrained}`, report `{work / 'eval-untrained' / 'report.md'}`",
        f"- trained: `{trained}`, report `{work / 'eval-trained' / 'report.md'}` (against the paper's Table 1)", ""]))
    return path


def _load(cfg_path: Path):
    from vtd_train.train.config import load_train_config

    return load_train_config(str(cfg_path))


def _threads(cfg) -> None:
    """Intra-op threads of this process's evaluations: the run's per-worker CPUs (two threads on
    two busy cores spin against each other; see the config's note)."""
    import torch

    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))


def _evaluate(checkpoint: str, shards: Path, out: Path) -> dict[str, Any]:
    from vtd_train.evaluation.cityscapes3d.evaluate import evaluate_taskprompter

    return evaluate_taskprompter(checkpoint, str(shards), split="val", out_dir=out)


def _params(checkpoint: str) -> str:
    from vtd_train.checkpoint import load_model

    model, _, _ = load_model(checkpoint, family="taskprompter")
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def _brief(metrics: dict[str, float]) -> str:
    from vtd_train.evaluation.cityscapes3d.evaluate import METRIC_KEYS, METRIC_LABELS

    return ", ".join(f"{METRIC_LABELS[k]} {_fmt(metrics.get(k))}" for k in METRIC_KEYS)


def _fmt(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")
