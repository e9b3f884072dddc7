"""What the training shell needs from a model family, in one place: the model, the rank's data,
the forward that yields the loss dict, and validation.

=================  ==========================================  =====================================
                   ``vtdnet``                                  ``taskprompter``
=================  ==========================================  =====================================
model              :class:`~vtd_train.model.vtdnet.VTDNet`     :class:`~vtd_train.taskprompter.model.TaskPrompter`
data               BDD100K shards: ``MultiSetDataset``,        Cityscapes-3D shards:
                   ``build_train_loader``, ``prepare_batch``    ``Cityscapes3DDataset`` (frames at the
                   on the device (scale, flip, pad)             model's input size; no augmentation)
losses             ``model(batch)``                            ``model.losses(model(images), targets)``
validation         VTD metrics + VTDA (``val/vtda`` ...)       mIoU, depth RMSE, mDS (``val/miou`` ...)
=================  ==========================================  =====================================

Everything else (ranks, AMP, gradient averaging, checkpoints, reports, monitoring) is the shell's
and the same for both (:mod:`.loop`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vtd_train.train.config import TrainConfig


@dataclass
class RankData:
    """A rank's data: ``dataset`` (``len()`` = steps per epoch, ``set_epoch``), ``batches(dataset)``
    an epoch's batches in step order, ``prepare(batch, device)`` the batch on the device as the
    model takes it."""

    dataset: Any
    batches: Callable[[Any], Iterable[Any]]
    prepare: Callable[[Any, torch.device], Any]


def build_model(cfg: TrainConfig) -> nn.Module:
    if cfg.family == "taskprompter":
        from vtd_train.taskprompter.model import TaskPrompter

        return TaskPrompter(cfg.model)
    from vtd_train.model.vtdnet import VTDNet

    return VTDNet(cfg.model)


def loss_forward(model: nn.Module, cfg: TrainConfig) -> Callable[[Any], dict[str, Tensor]]:
    """``batch → {loss/...: tensor}`` (each term already weighted; the step sums them)."""
    if cfg.family == "taskprompter":
        return lambda batch: model.losses(model(batch.images), batch.targets)
    return model


def build_rank_data(cfg: TrainConfig, *, rank: int, world: int, pin_memory: bool) -> RankData:
    if cfg.family == "taskprompter":
        from data_pipeline.cityscapes3d.loader import Cityscapes3DDataset, build_loader
        from vtd_train.taskprompter.batch import collate_batch

        collate = functools.partial(collate_batch, tasks=cfg.model.tasks, size=tuple(cfg.model.image_size))
        ds = Cityscapes3DDataset(cfg.data.uri, cfg.data.split, batch_size=cfg.per_worker_batch_size, rank=rank,
                                 world_size=world, seed=cfg.seed, collate=collate)
        return RankData(dataset=ds, batches=lambda d: build_loader(d, cfg.data.loader_workers, pin_memory),
                        prepare=lambda b, device: b.to(device, non_blocking=True))
    from data_pipeline.loading.loader import MultiSetDataset, build_train_loader
    from data_pipeline.shards.manifest import families_from_manifest
    from data_pipeline.loading.transforms import prepare_batch

    families = families_from_manifest(cfg.data.uri, cfg.data.split, cfg.data.sets)
    loader_cfg = cfg.data.loader_config(batch_size=cfg.per_worker_batch_size, seed=cfg.seed, pin_memory=pin_memory)
    ds = MultiSetDataset(families, loader_cfg, rank=rank, world_size=world)
    return RankData(dataset=ds, batches=build_train_loader, prepare=lambda b, device: prepare_batch(b.to(device, non_blocking=True)))


def empty_data_message(cfg: TrainConfig, dataset: Any) -> str:
    what = (f"{len(dataset.index)} frames" if cfg.family == "taskprompter"
            else f"{dataset.batches_per_set()} batches per set and rank")
    return (f"{cfg.data.uri}: split {cfg.data.split!r} has no full batch for global_batch_size {cfg.global_batch_size} "
            f"({what})")


def evaluate_model(model: nn.Module, cfg: TrainConfig, *, height: int | str) -> dict[str, Any]:
    """The family's validation metrics of ``model`` on ``cfg.validation.split`` (in this process)."""
    threads = max(1, int(cfg.resources.cpus_per_worker))
    if cfg.family == "taskprompter":
        from vtd_train.evaluation.cityscapes3d.evaluate import evaluate_taskprompter

        return evaluate_taskprompter(model=model, data=cfg.data.uri, split=cfg.validation.split)["metrics"]
    from vtd_train.evaluation.evaluate import evaluate

    return evaluate(model=model, data=cfg.data.uri, split=cfg.validation.split, overlays=0, distributed=False,
                    height=height, threads=threads)


# ---------------------------------------------------------------------------------------------
# What a pipeline (orchestrator/) reads of a family: its tasks, its stage kinds, its evaluation
# ---------------------------------------------------------------------------------------------

#: Pipeline stage kinds a family's pipeline may use: the sweep scores VTDA, the pseudo-labels and
#: the decoder merge are VTDNet's CPF protocol.
STAGE_KINDS: dict[str, tuple[str, ...]] = {
    "vtdnet": ("init", "train", "tune", "pseudo_label", "merge"),
    "taskprompter": ("init", "train"),
}


def meta_model(cfg: TrainConfig) -> nn.Module:
    """The run's model on the meta device (no memory): for checks of module names and tasks."""
    with torch.device("meta"):
        return build_model(cfg)


def evaluation_summary(family: str, doc: dict[str, Any], source: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, scores)`` of a ``vtd evaluate`` metrics.json ``doc``: vtdnet: the VTD metrics,
    and VTDA with its four group scores; taskprompter: mDS, mIoU and depth RMSE, no scores."""
    if family == "taskprompter":
        from vtd_train.evaluation.cityscapes3d.evaluate import METRIC_KEYS as CS_KEYS

        return {k: doc[k] for k in CS_KEYS if doc.get(k) is not None}, {}
    from vtd_train.evaluation.vtda import METRIC_KEYS, score

    scores = score(doc, source=source)
    return {k: doc[k] for k in METRIC_KEYS if k in doc}, {k: v for k, v in scores.items() if k.startswith("vtda")}


@dataclass(frozen=True)
class ReportColumn:
    key: str  #: a key of the evaluation's metrics or scores
    header: str
    digits: int = 1


def report_columns(family: str) -> tuple[ReportColumn, ...]:
    """The pipeline report's columns per evaluated stage: vtdnet: VTDA and its groups (the paper's
    Table 5); taskprompter: the Cityscapes-3D report's Table 1 (mDS, mIoU, depth RMSE)."""
    if family == "taskprompter":
        return (ReportColumn("mds", "mDS ↑", 2), ReportColumn("miou", "mIoU ↑", 2), ReportColumn("rmse_depth", "RMSE ↓", 2))
    return (ReportColumn("vtda", "VTDA"), *(ReportColumn(f"vtda_{g}", g) for g in ("cls", "seg", "loc", "ass")))


def reference_rows(family: str) -> dict[str, dict[str, float]]:
    """Published rows the pipeline report prints under the run's (keys as :func:`report_columns`)."""
    if family == "taskprompter":
        from vtd_train.evaluation.cityscapes3d.evaluate import PAPER_ROWS

        return PAPER_ROWS
    return {}


def headline(family: str, outputs: dict[str, Any]) -> str:
    """An evaluation stage's result in a few words (progress and status lines); "" without one."""
    values = {**outputs.get("metrics", {}), **outputs.get("scores", {})}
    cols = report_columns(family)[:1] if family == "vtdnet" else report_columns(family)
    return ", ".join(f"{c.header.rstrip(' ↑↓')} {values[c.key]:.{c.digits}f}" for c in cols if values.get(c.key) is not None)
