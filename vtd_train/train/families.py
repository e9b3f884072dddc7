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
