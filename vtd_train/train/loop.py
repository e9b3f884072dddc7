"""The per-worker training function that Ray Train runs on every rank (the training shell).

``train_loop_per_worker({"train_config": TrainConfig})`` — what one rank does:

1. set the device (``ray.train.torch.get_device``; NCCL/gloo process group set up by Ray),
   seed, build the model identically on every rank, freeze the configured prefixes, build the
   optimizer (:mod:`~vtd_train.train.optim`), precision (:mod:`~vtd_train.train.amp`) and the
   presence-aware gradient averaging (:mod:`~vtd_train.train.grad_sync`, the DDP replacement:
   bucketed all-reduces overlapped with the backward, ``grad_sync`` in the config);
2. restore from ``ray.train.get_checkpoint()`` (weights, optimizer, scaler, position, this rank's
   RNG; every file verified against the checkpoint's ``checksums.json``: one that fails is
   skipped with a warning for the newest intact checkpoint Ray registered for the run, the same
   one on every rank) or start from ``init_checkpoint`` (verified too); broadcast rank 0's weights;
3. for each epoch: ``dataset.set_epoch(e)``, skip the batches a resumed epoch already consumed,
   then per batch ``batch.to(device)`` and the family's preparation (on the device) →
   :class:`~vtd_train.train.step.TrainStep` → monitor (every rank, every step) → at the steps
   fixed by the config (same on every rank): epoch bookkeeping, checkpoint, and the one
   :meth:`~vtd_train.train.reporting.Reporter.report`;
4. stop with :class:`~vtd_train.train.step.NonFiniteLossError` after
   ``failures.max_consecutive_nonfinite`` non-finite steps in a row (agreed across ranks, so every
   rank raises at the same step; Ray then retries from the last checkpoint up to
   ``failures.max_failures`` times — a transient fault recovers, a deterministic one fails again).

Nothing here is model-specific: the model, the rank's data, the loss forward and validation
come from the run's model family (:mod:`~vtd_train.train.families`: VTDNet on BDD100K shards,
TaskPrompter on Cityscapes-3D shards).
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.errors import VTDInputError
from vtd_train.checkpoint import CheckpointError
from vtd_train.train.amp import Precision
from vtd_train.train.checkpointing import (
    Progress,
    capture_rng,
    load_checkpoint,
    load_weights,
    local_checkpoint_dir,
    restore_rng,
    sweep_local_checkpoints,
    write_checkpoint,
)
from vtd_train.train.config import TrainConfig
from vtd_train.train.families import build_model, build_rank_data, empty_data_message, evaluate_model, loss_forward
from vtd_train.train.faults import FaultInjector
from vtd_train.train.grad_sync import (
    GradSync,
    all_gather_objects,
    broadcast_state,
    comm_dtype_for,
    mutable_buffers,
    replica_divergence,
)
from vtd_train.train.optim import build_optimizer, freeze, lr_at
from vtd_train.train.recovery import run_uri
from vtd_train.train.reporting import Reporter, upload_checkpoint
from vtd_train.train.step import NonFiniteGuard, StepOutput, TrainStep

log = logging.getLogger(__name__)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _allreduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _quiet_ray_report_log() -> None:
    """Ray Train 2.60 logs every report's full metrics dict at INFO on every rank, from a logger
    named by its file path (so ``LoggingConfig(log_level)`` does not reach it); our progress
    line is the summary."""
    try:
        from ray.train.v2._internal.execution import context as ray_ctx
    except ImportError:  # pragma: no cover - other Ray versions
        return
    logging.getLogger(ray_ctx.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The training function Ray Train runs on every rank (see the module docstring)."""
    try:
        _train_loop(config)
    except Exception as e:
        from vtd_train.train.failures import deterministic_cause

        if deterministic_cause(e) is not None:
            # Ray logs every error of a training function with its traceback, on every rank; a
            # deterministic error is said once, in one line, by the controller and the CLI
            # (vtd_train.train.failures) and its trace stays in the error Ray hands back.
            logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
        raise


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_ray_report_log()

    from vtd_train.train.monitoring import TrainMonitor

    cfg: TrainConfig = config["train_config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if ctx.get_local_rank() == 0:
        for d in sweep_local_checkpoints():  # what killed workers on this node left behind
            log.info(f"[{cfg.name}] removed a local checkpoint copy a dead process left: {d}")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))

    # -- model, optimizer, precision, gradient averaging --------------------------------------
    _seed_all(cfg.seed)  # identical initialisation on every rank (and broadcast below)
    model = build_model(cfg).to(device)
    params = freeze(model, cfg.freeze)
    optimizer, optimizer_name = build_optimizer(params, cfg.optimizer, device)
    precision = Precision(cfg.precision, device)
    sync = GradSync(params, buffers=mutable_buffers(model), bucket_mb=cfg.grad_sync.bucket_mb,
                    comm_dtype=comm_dtype_for(cfg.grad_sync.comm_dtype, cfg.precision), overlap=cfg.grad_sync.overlap)
    _seed_all(cfg.seed + 1000 * (rank + 1))  # per-rank streams (RoI sampling, ...)

    # -- data -----------------------------------------------------------------------------------
    data = build_rank_data(cfg, rank=rank, world=world, pin_memory=device.type == "cuda")
    dataset = data.dataset
    steps_per_epoch = len(dataset)
    if steps_per_epoch == 0:
        raise VTDInputError(empty_data_message(cfg, dataset))
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    # -- resume ---------------------------------------------------------------------------------
    progress, rng_state, resumed_from = Progress(), None, None
    epoch_acc = [0.0, 0.0]  # this rank's (sum, count) of the total loss of updated steps this epoch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        tc = _load_resume_checkpoint(checkpoint, rank=rank, run=cfg.name)
        try:
            model.load_state_dict(tc.model_state, strict=True)
            optimizer.load_state_dict(tc.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{tc.uri}: does not fit this run's model/optimizer (changed config?): {e}") from None
        if tc.scaler and precision.scaler.is_enabled():
            precision.scaler.load_state_dict(tc.scaler)
        progress, resumed_from = tc.progress, tc.progress.global_step
        if len(tc.rank_states) == world:
            rng_state = tc.rank_states[rank]["rng"]
            epoch_acc = list(tc.rank_states[rank]["epoch_acc"])
        elif rank == 0:
            log.warning("resuming %d ranks from a checkpoint of %d: RNG streams restart, the continuation is not bit-exact",
                        world, len(tc.rank_states))
        progress.batch_index = min(progress.batch_index, steps_per_epoch)
    elif cfg.init_checkpoint is not None:
        load_weights(model, cfg.init_checkpoint)
    broadcast_state(model)

    monitor = TrainMonitor(run=cfg.name, stage=cfg.stage, rank=rank)
    faults = FaultInjector(cfg.faults, rank)
    step_fn = TrainStep(model, optimizer, precision, sync, grad_clip=cfg.optimizer.grad_clip, loss_hook=faults.loss_hook, rank=rank,
                        forward=loss_forward(model, cfg))
    static = {"optimizer": optimizer_name, "precision": cfg.precision, "world_size": world, "stage": cfg.stage}
    reporter = Reporter(run=cfg.name, stage=cfg.stage, rank=rank, world_size=world, epochs=cfg.epochs,
                        steps_per_epoch=steps_per_epoch, total_steps=total_steps, static=static,
                        upload_fn=upload_checkpoint(run_uri(cfg.storage_path, cfg.name)), upload_mode=cfg.checkpoint.upload)
    meta = {"run": cfg.name, "stage": cfg.stage, "world_size": world, "optimizer": optimizer_name,
            "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict()}
    if rank == 0:
        log.info(
            f"[{cfg.name}/{cfg.stage}] {world} worker(s) on {device.type}, {precision.mode}, optimizer {optimizer_name}; "
            f"{steps_per_epoch} steps/epoch × {cfg.epochs} epochs (total {total_steps}), batch {cfg.per_worker_batch_size}/rank "
            f"({cfg.global_batch_size} global); {len(params)} trainable tensors"
            + (f", frozen {list(cfg.freeze)}" if cfg.freeze else "")
            + (f"; resumed at step {resumed_from} (epoch {progress.epoch}, batch {progress.batch_index})" if resumed_from is not None else "")
        )

    def emit(*, with_checkpoint: bool, validation: dict[str, float] | None = None) -> None:
        """Checkpoint (optional) + the report (with validation metrics, when given). Called at
        the same steps on every rank."""
        ckpt_dir, write_s = None, 0.0
        divergence = replica_divergence(model)
        if with_checkpoint:
            t = time.perf_counter()
            states = all_gather_objects({"rng": capture_rng(device), "epoch_acc": list(epoch_acc)})
            if rank == 0:
                ckpt_dir = write_checkpoint(
                    local_checkpoint_dir(), model=model, model_cfg=cfg.model,
                    optimizer=optimizer, scaler=precision.scaler, progress=progress, rank_states=states,
                    meta={**meta, "replica_divergence": divergence},
                )
            write_s = time.perf_counter() - t
        try:  # the upload removes the local directory once it has copied it (in the background if async)
            reporter.report(progress, divergence=divergence, checkpoint_dir=ckpt_dir, checkpoint_write_s=write_s,
                            extra={"resumed_from_step": resumed_from, **(validation or {})})
        except BaseException:
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            raise

    guard = NonFiniteGuard(cfg.failures.max_consecutive_nonfinite, streak=progress.nonfinite_streak)
    model.train()
    try:
        while progress.epoch < cfg.epochs and progress.global_step < total_steps:
            epoch = progress.epoch
            dataset.set_epoch(epoch)
            if rng_state is not None and progress.batch_index == 0:
                restore_rng(rng_state, device)  # before the loader iterator draws its base seed
                rng_state = None
            batches = iter(data.batches(dataset))
            for _ in range(progress.batch_index):  # resume mid-epoch: drop consumed batches
                next(batches)
            if rng_state is not None:
                restore_rng(rng_state, device)
                rng_state = None
            while progress.batch_index < steps_per_epoch and progress.global_step < total_steps:
                step = progress.global_step
                faults.before_step(step)
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                batch = data.prepare(batch, device)
                lr = lr_at(step, base_lr=cfg.optimizer.lr, steps_per_epoch=steps_per_epoch, cfg=cfg.lr_schedule, total_steps=total_steps)
                out = step_fn(batch, step=step, lr=lr)
                t2 = time.perf_counter()
                n = len(batch)
                _advance(progress, out, images=n * world)
                # when this attempt's first step finished (a pipeline measures the gap since its inputs)
                meta.setdefault("first_step_at", time.time())
                if not out.skipped:
                    epoch_acc[0] += out.total
                    epoch_acc[1] += 1
                if out.local_nonfinite:
                    monitor.record_bad_samples(n)
                monitor.record_step(losses=out.losses, total_loss=out.total, lr=out.lr, loss_scale=out.loss_scale,
                                    step_time_s=t2 - t0, data_wait_s=t1 - t0, images=n, set_name=batch.set_name,
                                    skipped=out.skipped)
                reporter.observe(out, images=n, data_wait_s=t1 - t0, step_s=t2 - t0, monitor_s=time.perf_counter() - t2)
                if out.counts_as_nonfinite and rank == 0:
                    log.warning(f"[{cfg.name}/{cfg.stage}] step {step}: skipped on all ranks ({out.reason}): "
                                + "; ".join(out.nonfinite))
                guard.update(out, step=step, epoch=epoch)
                progress.nonfinite_streak = guard.streak
                epoch_end = progress.batch_index == steps_per_epoch
                if epoch_end:
                    s, c = _allreduce_sum(epoch_acc, device)
                    progress.epoch_losses.append(s / c if c else float("nan"))
                    progress.epoch, progress.batch_index = epoch + 1, 0
                    epoch_acc = [0.0, 0.0]
                final = progress.global_step >= total_steps
                every = cfg.checkpoint.every_steps
                with_ckpt = final or (every > 0 and progress.global_step % every == 0) or (epoch_end and cfg.checkpoint.at_epoch_end)
                val = None
                if cfg.validation.every_epochs > 0 and (final or (epoch_end and cfg.validation.due(progress.epoch, cfg.epochs))):
                    val = validate(model, cfg, rank=rank, device=device)
                if with_ckpt or val is not None or progress.global_step % cfg.report_every_steps == 0:
                    emit(with_checkpoint=with_ckpt, validation=val)
                if epoch_end:
                    break
    finally:
        monitor.close()


def validate(model: torch.nn.Module, cfg: TrainConfig, *, rank: int, device: torch.device) -> dict[str, float]:
    """Rank 0 scores ``model`` on the validation split (:class:`ValidationConfig`); every rank
    returns the same ``{"val/<key>": value}`` (VTDNet: VTDA, its groups and each metric scored;
    TaskPrompter: mIoU, depth RMSE, mDS)."""
    out: dict[str, float] | None = None
    if rank == 0:
        v = cfg.validation
        height = v.height if v.height is not None else (max(cfg.data.scales) if cfg.data.scales else "native")
        t, rng = time.perf_counter(), capture_rng(device)  # training's random streams stay as they were
        try:
            metrics = evaluate_model(model, cfg, height=height)
        finally:
            restore_rng(rng, device)
        out = {f"val/{k}": float(x) for k, x in metrics.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        out["val/time_s"] = time.perf_counter() - t
    return all_gather_objects(out)[0]


def _resume_candidates(latest: Any) -> Iterator[Any]:
    """Ray's latest checkpoint, then (asked only if it fails) the others Ray registered for the
    run, newest first."""
    import ray.train

    yield latest
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                                      timeout_s=60)
    for r in reversed(reported):
        if r.checkpoint.path != latest.path:
            yield r.checkpoint


def _load_resume_checkpoint(latest: Any, *, rank: int, run: str) -> Any:
    """The newest intact registered checkpoint, loaded (and verified) on every rank; one warning
    on rank 0 naming each one skipped. Every rank must have picked the same checkpoint."""
    skipped: list[str] = []
    for ckpt in _resume_candidates(latest):
        d = None
        try:
            with ckpt.as_directory() as d:
                tc = load_checkpoint(d)
            break
        except CheckpointError as e:  # named by its stored path, not a download directory
            skipped.append(str(e).replace(d, ckpt.path) if d else str(e))
    else:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(skipped))
    picked = all_gather_objects(ckpt.path)
    if len(set(picked)) != 1:  # a read failed on some ranks only: let Ray restart the workers
        raise RuntimeError(f"ranks picked different checkpoints to resume from: {picked}")
    if skipped and rank == 0:
        log.warning(f"[{run}] resume: skipped {len(skipped)} checkpoint(s) that failed verification: "
                    + "; ".join(skipped) + f"; resuming from {ckpt.path}")
    return tc


def _advance(p: Progress, out: StepOutput, *, images: int) -> None:
    p.batch_index += 1
    p.global_step += 1
    p.images_seen += images
    if out.skipped and out.reason != "no_grad":
        p.skipped_steps += 1
    if out.reason == "overflow":
        p.overflow_steps += 1
    if out.counts_as_nonfinite:
        p.nonfinite_steps += 1
