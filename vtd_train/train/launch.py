"""Launching a training run: config checks, the ``TorchTrainer``, and ``vtd train``.

``vtd train --config FILE [--address ADDR] [--storage URI] [--name RUN]``:

* without ``--address`` the run starts an embedded local Ray cluster in this process
  (:func:`cluster.local.connect`), with ``--address`` (``auto``, ``host:port``, ``ray://...``) it
  joins that cluster;
* checkpoints go to ``<storage>/<name>/checkpoint_step*``; relaunching with the same storage and
  name resumes from the run's newest intact checkpoint (Ray Train restores the run's snapshot;
  :mod:`~vtd_train.train.recovery` first sets aside what a crash left), and a worker failure
  restarts all workers from it, up to ``failures.max_failures`` times — but a deterministic error
  (bad data, checkpoint or config, storage full) ends the run at once
  (:mod:`~vtd_train.train.failures`), printed as one ``vtd: error:`` line;
* one process owns a run: a second ``vtd train`` of it stops at once naming the holder
  (:mod:`~vtd_train.train.lease`; ``--takeover`` takes the lease);
* progress lines (rank 0, one per reporting interval) show up in the terminal through Ray's log
  forwarding; the command ends with a summary line and exits 0, or 1 when the run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Any

import cluster.local  # noqa: F401  (sets the worker-environment variables before Ray is imported)
from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from data_pipeline.shards.manifest import families_from_manifest
from vtd_train.train.checkpointing import TRAIN_STATE_JSON, Progress
from vtd_train.train.config import TrainConfig, load_train_config, resolve_paths
from vtd_train.train.recovery import owned_run


def check_config(cfg: TrainConfig) -> None:
    """Checks that need more than the YAML, done before any worker starts: the manifest is
    readable, the requested sets exist, a pseudo-label family matches them, the freeze prefixes
    match parameters of the model (built on the meta device, no memory), the storage is shared.
    Without freeze prefixes the model is not built here: a driver that does not build it does not
    import torchvision (with torch._dynamo and sympy, 1.8 s on 2 cores); the workers build it."""
    if cfg.family == "taskprompter":
        from data_pipeline.cityscapes3d.loader import frame_index

        frame_index(cfg.data.uri, cfg.data.split)  # a Cityscapes-3D manifest with that split
    else:
        families = families_from_manifest(cfg.data.uri, cfg.data.split, cfg.data.sets)
        if cfg.data.pseudo is not None:
            from data_pipeline.loading.pseudo import attach_pseudo

            attach_pseudo(families, cfg.data.pseudo)  # the pseudo family matches these shards
    if cfg.freeze:
        from vtd_train.train.families import meta_model
        from vtd_train.train.optim import check_freeze_prefixes

        check_freeze_prefixes(meta_model(cfg), cfg.freeze)
    if "://" in cfg.storage_path and fsio.is_process_local(cfg.storage_path):
        raise VTDInputError(f"storage_path {cfg.storage_path!r} lives in one process only; workers need shared storage")


#: URI schemes pyarrow opens itself (Ray passes them to ``pyarrow.fs.FileSystem.from_uri``).
PYARROW_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file"})


def _storage(uri: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray: local paths and pyarrow URIs (s3://,
    gs://, hdfs://, ...) as they are; any other fsspec URI through pyarrow's fsspec handler."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if not scheme or scheme in PYARROW_SCHEMES:
        return uri, None
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def build_trainer(cfg: TrainConfig, *, callbacks: tuple = ()):
    """The ``TorchTrainer`` of a run (Ray Train V2): gloo on CPU, NCCL on GPUs. ``callbacks``:
    ``ray.train.UserCallback`` s run on Ray Train's controller (a benchmark's recorder).

    The config travels bound to the training function, not as ``train_loop_config``: Ray puts
    the function in the object store, which only the workers read, while ``train_loop_config``
    is unpickled by the controller too, and the config's classes import the model (torch,
    torchvision, and through them torch._dynamo and sympy: 6-8 s of every run's start on a
    2-core node, on the path to the first step; benchmarks/RESULTS.md)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from vtd_train.train.failures import TorchTrainer  # deterministic errors are not retried
    from vtd_train.train.loop import train_loop_per_worker
    from vtd_train.train.rendezvous import torch_config  # on loopback on the embedded cluster

    res = cfg.resources
    path, filesystem = _storage(cfg.storage_path)
    return TorchTrainer(
        functools.partial(train_loop_per_worker, {"train_config": cfg}),
        torch_config=torch_config("nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker={"CPU": res.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.failures.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=list(callbacks) or None,
            # Ray Train's own INFO lines repeat every metric of every report; ours are the progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_training(cfg: TrainConfig, *, takeover: bool = False, callbacks: tuple = ()):
    """Check, take the run's lease and clean its directory up (:func:`~vtd_train.train.recovery.owned_run`),
    build and fit; returns Ray's ``Result`` (raises ``TrainingFailedError``)."""
    cfg = resolve_paths(cfg)
    check_config(cfg)
    with owned_run(cfg, takeover=takeover):
        return build_trainer(cfg, callbacks=callbacks).fit()


def _check_resources(cfg: TrainConfig, info) -> None:
    res = cfg.resources
    need_cpu = res.num_workers * res.cpus_per_worker
    need_gpu = res.num_workers if res.use_gpu else 0
    if info.embedded and (info.num_cpus < need_cpu or info.num_gpus < need_gpu):
        raise VTDInputError(
            f"resources: {res.num_workers} workers × {res.cpus_per_worker} CPU{' + 1 GPU' if res.use_gpu else ''} "
            f"do not fit the local cluster ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs); lower resources.num_workers "
            f"/ cpus_per_worker or pass --address of a larger cluster"
        )


def train_command(args: argparse.Namespace) -> int:
    """``vtd train``: load + validate the config, take the run's lease, clean its directory up,
    connect, fit, print a summary."""
    cfg = load_train_config(args.config, storage_path=args.storage, name=args.name)
    cfg = resolve_paths(cfg)
    check_config(cfg)
    with owned_run(cfg, takeover=getattr(args, "takeover", False)) as run:
        rc = _fit_command(cfg, args)
    if run.lease.lost:
        print(f"vtd: error: run {cfg.name!r} stopped: another process took its lease", file=sys.stderr)
        return 1
    return rc


def _fit_command(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from cluster.local import connect
    from vtd_train.train.failures import describe_failure

    info = connect(args.address)
    _check_resources(cfg, info)
    where = "embedded local Ray cluster" if info.embedded else f"Ray cluster {info.address}"
    print(
        f"vtd train: run {cfg.name!r} (stage {cfg.stage}) on the {where}: {cfg.resources.num_workers} worker(s), "
        f"{'GPU' if cfg.resources.use_gpu else 'CPU'}, checkpoints in {cfg.storage_path}/{cfg.name}",
        flush=True,
    )
    try:
        result = build_trainer(cfg).fit()
    except TrainingFailedError as e:
        print(f"vtd: error: {describe_failure(cfg.name, e)}", file=sys.stderr)
        if getattr(args, "verbose", False):
            print(str(e), file=sys.stderr)
        return 1
    if result.checkpoint is None:
        print(f"vtd train: run {cfg.name!r} finished without a checkpoint", flush=True)
        return 0
    p = checkpoint_progress(result.checkpoint)
    if getattr(args, "result_json", None):
        write_result(args.result_json, cfg, result.checkpoint, p)
    losses = ", ".join(f"{x:.4f}" for x in p.epoch_losses)
    print(
        f"vtd train: run {cfg.name!r} done at step {p.global_step} (epoch losses [{losses}], "
        f"skipped steps {p.skipped_steps}); latest checkpoint: {result.checkpoint.path}",
        flush=True,
    )
    return 0


def checkpoint_uri(cfg: TrainConfig, checkpoint) -> str:
    """The URI of a Ray ``Checkpoint`` of run ``cfg`` in the config's own spelling (Ray's
    ``checkpoint.path`` drops the URI scheme of object stores)."""
    import posixpath

    return fsio.join(cfg.storage_path, cfg.name, posixpath.basename(checkpoint.path.rstrip("/")))


def write_result(uri: str, cfg: TrainConfig, checkpoint, progress: Progress) -> None:
    """``--result-json``: where a finished run's final checkpoint is, for whoever launched it (a
    pipeline stage reads its output from here); written atomically."""
    import json

    state = json.loads(fsio.read_bytes(fsio.join(checkpoint_uri(cfg, checkpoint), TRAIN_STATE_JSON)))
    fsio.write_json_atomic(uri, {
        "run": cfg.name, "stage": cfg.stage, "checkpoint": checkpoint_uri(cfg, checkpoint),
        "global_step": progress.global_step, "epoch_losses": list(progress.epoch_losses),
        "skipped_steps": progress.skipped_steps, "first_step_at": state.get("first_step_at"),
    })


def checkpoint_progress(checkpoint) -> Progress:
    """The :class:`Progress` recorded in a Ray ``Checkpoint`` (reads one small file, also on
    remote storage)."""
    import json

    path = checkpoint.path.rstrip("/") + "/" + TRAIN_STATE_JSON
    with checkpoint.filesystem.open_input_stream(path) as f:
        return Progress.from_dict(json.loads(f.read())["progress"])


def config_with(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """``cfg`` with top-level fields replaced (``data=dict(...)`` etc. replace nested fields)."""
    def norm(v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    out = {}
    for k, v in changes.items():
        cur = getattr(cfg, k)
        if isinstance(v, dict) and dataclasses.is_dataclass(cur):
            out[k] = dataclasses.replace(cur, **{kk: norm(vv) for kk, vv in v.items()})
        else:
            out[k] = norm(v)
    return dataclasses.replace(cfg, **out)
