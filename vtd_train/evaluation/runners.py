"""Where inference units run: in this process, or on Ray actors (``vtd evaluate``,
``vtd predict``, ``vtd pseudo-label``)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from data_pipeline.errors import VTDInputError
from data_pipeline.shards.manifest import families_from_manifest
from vtd_train.tracker import TrackerConfig

from .units import WorkUnit, plan_units
from .worker import DEFAULT_BATCH_SIZE, EvalWorker, ModelSpec

__all__ = ["MAX_DEFAULT_WORKERS", "InferenceRun", "LocalRunner", "RayRunner", "open_inference", "trained_height", "use_ray"]

#: Default cap on the number of Ray workers.
MAX_DEFAULT_WORKERS: Final = 8


class LocalRunner:
    """Runs every item on one worker in this process."""

    def __init__(self, worker: EvalWorker) -> None:
        self.worker = worker
        self.workers = 1

    def imap(self, method: str, items: list[Any]) -> Iterator[Any]:
        """``worker.<method>(item)`` of each item, in input order, one at a time."""
        return (getattr(self.worker, method)(it) for it in items)

    def map(self, method: str, items: list[Any]) -> list[Any]:
        return list(self.imap(method, items))

    def close(self) -> None:
        pass


class RayRunner:
    """``workers`` actors of :class:`EvalWorker` (or ``actor_cls``, built as
    ``actor_cls(source, threads=threads, **kw)``); :meth:`imap` yields results in input order as
    they come in (the caller holds one at a time), :meth:`map` returns them all."""

    def __init__(self, source: Any, *, workers: int, threads: int, gpus: float, actor_cls: type = EvalWorker, **kw: Any) -> None:
        import ray
        from ray.util import ActorPool

        if not isinstance(source, str):
            source = ray.put(ModelSpec(source) if _is_vtdnet(source) else source)
        actor = ray.remote(num_cpus=threads, num_gpus=gpus)(actor_cls)
        self.actors = [actor.remote(source, threads=threads, **kw) for _ in range(workers)]
        self.pool = ActorPool(self.actors)
        self.workers = workers

    def imap(self, method: str, items: list[Any]) -> Iterator[Any]:
        from ray.exceptions import RayTaskError

        try:
            yield from self.pool.map(lambda a, it: getattr(a, method).remote(it), items)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, (VTDInputError, FileNotFoundError)):
                raise cause from None  # the worker's own message, not Ray's wrapped traceback
            raise

    def map(self, method: str, items: list[Any]) -> list[Any]:
        return list(self.imap(method, items))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def _is_vtdnet(model: Any) -> bool:
    from vtd_train.model.vtdnet import VTDNet

    return isinstance(model, VTDNet)


def use_ray(address: str | None, distributed: bool | None) -> bool:
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



@dataclass
class InferenceRun:
    """An open inference pass (:func:`open_inference`): the runner with its workers, the driver's
    own worker (its model's ``tasks``, the checkpoint's ``meta``), the planned ``units``, the test
    ``height`` (``None``: stored resolution) and how it runs (``mode``, ``plan_seconds``)."""

    runner: LocalRunner | RayRunner
    local: EvalWorker
    units: list[WorkUnit]
    height: int | None
    mode: str
    plan_seconds: float

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.local.tasks


@contextlib.contextmanager
def open_inference(
    checkpoint: str | None,
    data: str | None,
    *,
    what: str,
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
    overlays: int = 0,
) -> Iterator[InferenceRun]:
    """Check the arguments, load the model here (a bad checkpoint fails before any worker
    starts), start the workers (Ray or this process, :func:`use_ray`) and plan the units of the
    ``split`` shards of ``data``; on exit stop the workers and put a given ``model`` back in the
    train/eval mode it came in. ``what`` names the command in error messages. ``height``: see
    :func:`vtd_train.evaluation.evaluate.evaluate`."""
    if (checkpoint is None) == (model is None):
        raise VTDInputError(f"{what}: give either a checkpoint URI or a model object (exactly one)")
    if data is None:
        raise VTDInputError(f"{what}: no data URI given (the shard root written by `vtd data convert`)")
    if height is not None and height != "native" and (isinstance(height, bool) or not isinstance(height, int) or height < 1):
        raise VTDInputError(f"{what}: the test height must be a positive number of pixels or 'native', got {height!r}")
    native = height == "native"
    height = None if native else height
    if batch_size < 1 or threads < 1 or (workers is not None and workers < 1) or overlays < 0:
        raise VTDInputError(f"{what}: batch_size, threads and workers must be >= 1 and overlays >= 0, "
                            f"got {batch_size}, {threads}, {workers}, {overlays}")
    families = families_from_manifest(str(data), split)
    if not families:
        raise VTDInputError(f"{data}: the manifest lists no frames for split {split!r}")

    # The driver loads the checkpoint too: a bad checkpoint fails here, with its own message,
    # and the model's task set is known before any worker starts.
    ray_run = use_ray(address, distributed)
    was_training = None
    if model is None:  # on a GPU only if it runs here; with Ray the workers load their own copies
        local = EvalWorker(str(checkpoint), threads=threads, batch_size=batch_size, tracker=tracker, cuda=not ray_run)
    else:
        was_training = getattr(model, "training", None)
        local = EvalWorker(model, threads=threads, batch_size=batch_size, tracker=tracker)
    if height is None and not native:
        height = trained_height(local.meta)
    local.height = height
    runner: LocalRunner | RayRunner = LocalRunner(local)
    mode = "in-process"
    try:
        fam_by_set = {f.set_name: f for f in families}
        if ray_run:
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
        yield InferenceRun(runner, local, units, height, mode, time.perf_counter() - t0)
    finally:
        runner.close()
        if was_training is not None:
            model.train(was_training)


def trained_height(meta: Mapping[str, Any]) -> int | None:
    """The test height of a checkpoint written by ``vtd train``: its largest training scale
    (``data.scales`` of the run's config, as the paper tests at 720, the top of its 600–720
    training scales); ``None`` (the stored resolution) for a checkpoint without that record."""
    scales = ((meta.get("config") or {}).get("data") or {}).get("scales")
    return int(max(scales)) if scales else None
