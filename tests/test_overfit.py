"""Every decoder can fit a handful of frames ("can it overfit one batch", detectron2 / mmdet).

Each test trains a tiny ``single:TASK`` model on a few synthetic frames with the production
training step (:class:`~vtd_train.train.step.TrainStep`: the same forward,
loss sum, gradient averaging and AdamW as ``vtd train``, on one CPU rank) fed by the production
loader, then scores those same frames with the real metric code (``evaluate``: pycocotools,
trackeval, the IoUs). A decoder that cannot fit a few frames has a bug in its target encoding,
loss, box coder, RoI sampling, post-processing or the tracker; each bound sits below what the
decoder measured here and says why that is not 100. Not covered yet: the flow decoder (its
census loss barely moves in a few hundred steps on these flat synthetic surfaces: 3.476 at
zero flow, 3.44 after 125 steps) and the joint VTDNet (benchmarks/RESULTS.md).

The frames are the first shard(s) of each set of the session's tiny dataset, copied with a
manifest of their own (:func:`subset_shards`), so training and evaluation see exactly them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from data_pipeline.loader import LoaderConfig, MultiSetDataset, build_train_loader
from data_pipeline.manifest import families_from_manifest
from data_pipeline.transforms import AugmentConfig, prepare_batch
from vtd_train.evaluation.evaluate import evaluate
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig
from vtd_train.train.amp import Precision
from vtd_train.train.config import OptimizerConfig
from vtd_train.train.grad_sync import GradSync, mutable_buffers
from vtd_train.train.optim import build_optimizer, freeze
from vtd_train.train.step import TrainStep

CPU = torch.device("cpu")


def subset_shards(src: str, dst: Path, shards: dict[str, list[int]], split: str = "train") -> str:
    """Copy the shards ``shards[set]`` (indices) of each set of ``split`` from the shard root
    ``src`` to ``dst`` with a manifest listing only them (set totals recomputed from them)."""
    manifest = json.loads((Path(src) / "manifest.json").read_text())
    out = copy.deepcopy(manifest)
    out["sets"] = {}
    for set_name, n in shards.items():
        entry = copy.deepcopy(manifest["sets"][f"{set_name}/{split}"])
        entry["shards"] = [entry["shards"][i] for i in n]
        for key in ("samples", "clips", "bytes"):
            entry[key] = sum(sh[key] for sh in entry["shards"])
        tasks: dict[str, dict[str, int]] = {}
        for sh in entry["shards"]:
            for t, c in sh["tasks"].items():
                acc = tasks.setdefault(t, {"samples": 0, "instances": 0})
                acc["samples"] += c["samples"]
                acc["instances"] += c["instances"]
        entry["tasks"] = tasks
        entry["skipped"] = {"count": 0, "items": []}
        for sh in entry["shards"]:
            (dst / sh["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src) / sh["path"], dst / sh["path"])
        out["sets"][f"{set_name}/{split}"] = entry
    (dst / "manifest.json").write_text(json.dumps(out))
    return str(dst)


def overfit(model: VTDNet, data: str, sets: tuple[str, ...], *, steps: int, lr: float, batch_size: int,
            require: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` steps on the ``train`` frames of ``data`` (no augmentation:
    the frames are fitted as they are scored); returns each step's loss terms."""
    torch.manual_seed(0)
    params = freeze(model, ())
    optimizer, _ = build_optimizer(params, OptimizerConfig(lr=lr, weight_decay=1e-4), CPU)
    step_fn = TrainStep(model, optimizer, Precision("fp32", CPU), GradSync(params, buffers=mutable_buffers(model)))
    cfg = LoaderConfig(batch_size=batch_size, num_workers=0, augment=AugmentConfig(scales=(), flip_prob=0.0),
                       require_tasks=require or {})
    dataset = MultiSetDataset(families_from_manifest(data, "train", sets), cfg, rank=0, world_size=1)
    history: list[dict[str, float]] = []
    model.train()
    epoch = 0
    while len(history) < steps:
        dataset.set_epoch(epoch)
        for batch in build_train_loader(dataset):
            out = step_fn(prepare_batch(batch), step=len(history), lr=lr)
            assert out.reason is None, f"step {len(history)} skipped: {out.reason} {out.nonfinite}"
            history.append(out.losses)
            if len(history) == steps:
                break
        epoch += 1
    return history


@pytest.fixture(scope="module")
def few_frames(tiny_shards, tmp_path_factory) -> str:
    """3 det frames (2 with pose), 3 seg frames, 3 clips of 4 frames of one MOTS video."""
    return subset_shards(tiny_shards, tmp_path_factory.mktemp("few"), {"det": [0], "seg": [0], "track": [2]})


def _fit_single(task: str, data: str, sets: tuple[str, ...], steps: int, lr: float = 2e-3, batch_size: int = 2,
                require: dict[str, tuple[str, ...]] | None = None) -> dict:
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny(f"single:{task}"))
    history = overfit(model, data, sets, steps=steps, lr=lr, batch_size=batch_size, require=require)
    metrics = evaluate(model=model, data=data, split="train", overlays=0, distributed=False)
    print(task, {k: round(v, 1) for k, v in metrics.items() if isinstance(v, float)}, history[-1])
    return metrics


# (task, image sets, steps, batch size, required tasks, {metric: bound}). Steps: what it takes
# at lr 2e-3 from scratch (ResNet-18 with GroupNorm) to get near the bound's measured value,
# given in the comments (2026-12-05, benchmarks/RESULTS.md); the bound leaves room for float
# noise across machines. Why a measured value is short of 100 is said beside it.
CASES = {
    # 3 frames: tagging is memorised outright (100 / 100 after 60 steps)
    "tag": (("det",), 60, 3, None, {"acc_weather": 100.0, "acc_scene": 100.0}),
    # mIoU over the classes present in the frames; measured 93.9 (drivable, 150 steps) and
    # 79.7 (semantic, 300 steps): thin poles, signs and far road edges at 96×160 are a few
    # pixels of stride-4 logits
    "drivable": (("det",), 150, 3, None, {"iou_drivable": 85.0}),
    "sem": (("seg",), 300, 3, None, {"iou_sem": 70.0}),
    # lanes are 1-2 px wide at 96×160 against stride-4 logits: 44.6 after 300 steps
    "lane": (("det",), 300, 3, None, {"iou_lane": 35.0}),
    # AP@[.5:.95] of objects 3-40 px wide: a one-pixel error costs a small box the strict IoU
    # thresholds; 64.8 after 500 steps
    "det": (("det",), 500, 3, None, {"ap_det": 50.0}),
    # mask AP 19.4 after 500 steps while box AP on the same frames is 77.6: cars' masks fit
    # (mask IoU 0.8-0.95) but the synthetic stick-figure pedestrians and bicycles are 1-2 px
    # lines (50-80 px in a 10×22 box) that a 28×28 mask pasted at 96×160 misses (mask IoU
    # 0.0-0.4); the same head reaches 46 on the car-heavy MOTS frames
    "ins": (("seg",), 500, 3, None, {"ap_ins": 12.0}),
    # Gaussian-heatmap MSE (the paper's pose loss) learns slowly from scratch: OKS AP 36.9
    # after 800 steps on these 2 pose frames (89.2 on 3 others); OKS at 96×160 tolerates about
    # 2 px per joint on a 25 px person
    "pose": (("det",), 800, 2, {"det": ("pose",)}, {"ap_pose": 25.0}),
    # one MOTS video, 12 frames: box AP 53.5 / AssA 70.6 after 400 steps (MOT), mask AP 46.2 /
    # AssA 72.6 after 500 (MOTS); association is scored on what the detector finds
    "mot": (("track",), 400, 2, None, {"ap_mot": 40.0, "assa_mot": 55.0}),
    "mots": (("track",), 500, 2, None, {"ap_mots": 35.0, "assa_mots": 55.0}),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_single_task_model_fits_a_few_frames(task, few_frames):
    sets, steps, batch_size, require, bounds = CASES[task]
    metrics = _fit_single(task, few_frames, sets, steps, batch_size=batch_size, require=require)
    for key, bound in bounds.items():
        assert metrics[key] >= bound, f"{task}: {key} {metrics[key]:.1f} < {bound} after {steps} steps"
