"""Every ``ray.train.report`` of a run goes through :meth:`Reporter.report`.

``ray.train.report`` is a barrier: every rank must call it the same number of times. The loop
decides *when* from the global step only (every ``report_every_steps``, at checkpoints, at the
end), which is the same on every rank. Each report:

1. gathers every rank's interval statistics (loss terms, images, times) — one small
   ``all_gather_object`` — so rank 0's metrics (the only ones Ray keeps) describe all ranks;
2. carries the replicas' agreement check (:func:`~vtd_train.train.grad_sync.replica_divergence`,
   computed by the caller: 0.0 when every rank holds the same weights);
3. prints one progress line on rank 0 (images/s, losses per task, lr, skips);
4. calls ``ray.train.report(metrics, checkpoint=...)`` (rank 0 passes the checkpoint, which
   :func:`upload_checkpoint` copies into the run's storage and verifies there before Ray
   registers it; in Ray Train's background thread unless ``checkpoint.upload: sync``).

Metric keys: ``epoch``, ``step``, ``batch``, ``steps_per_epoch``, ``total_steps``,
``images_seen``, ``loss`` (interval mean of the total), ``loss/<task>/<term>`` (interval means),
``lr``, ``loss_scale``, ``grad_norm``, ``images_per_s``, ``skipped_steps``, ``nonfinite_steps``,
``overflow_steps``, ``epoch_losses``, ``replica_divergence``, ``optimizer``, ``precision``,
``world_size``, ``resumed_from_step``, ``checkpoint`` (bool) and rank 0's cumulative times
``time/{step,data_wait,agree,allreduce,monitor,report,checkpoint}_s`` since the (re)start of the workers
(the overhead benchmark reads these; ``agree`` and ``allreduce`` are the waits after the backward
for the gradient sync's agreement and then its buckets, :class:`~vtd_train.train.step.StepOutput`), and ``time/wall_s``, rank 0's wall time from then to this
report's start (the checkpoint benchmark reads these).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from vtd_train.train.checkpointing import Progress
from vtd_train.train.grad_sync import all_gather_objects
from vtd_train.train.step import StepOutput

log = logging.getLogger("vtd_train.train.progress")

TIME_KEYS = ("step", "data_wait", "agree", "allreduce", "monitor", "report", "checkpoint")


class Reporter:
    """Interval statistics of one rank and the run's one reporting function."""

    def __init__(
        self,
        *,
        run: str,
        stage: str,
        rank: int,
        world_size: int,
        epochs: int,
        steps_per_epoch: int,
        total_steps: int,
        static: dict[str, Any],
        report_fn: Callable[..., None] | None = None,
        printer: Callable[[str], None] | None = None,
        upload_fn: Callable[[Any, str], Any] | None = None,
        upload_mode: str = "async",
    ):
        self.run, self.stage, self.rank, self.world = run, stage, rank, world_size
        self.epochs, self.steps_per_epoch, self.total_steps = epochs, steps_per_epoch, total_steps
        self.static = dict(static)
        # Ray Train workers route print() to the root logger *and* stdout (printed twice);
        # a logger line appears once in the driver's terminal.
        self.printer = printer or log.info
        if report_fn is None:
            import ray.train

            report_fn = ray.train.report
        self._report_fn = report_fn
        self._upload_fn, self._upload_mode = upload_fn, upload_mode
        self.times = dict.fromkeys(TIME_KEYS, 0.0)  # cumulative, this rank
        self._started = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.perf_counter()
        self._images = 0
        self._steps = 0
        self._loss_sum = 0.0
        self._loss_n = 0
        self._terms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._norm_sum = 0.0
        self._norm_n = 0
        self._wait = 0.0
        self._last: StepOutput | None = None

    def observe(self, out: StepOutput, *, images: int, data_wait_s: float, step_s: float, monitor_s: float) -> None:
        """Account one step of this rank (no communication)."""
        self._steps += 1
        self._images += images
        self._wait += data_wait_s
        self.times["step"] += step_s
        self.times["data_wait"] += data_wait_s
        self.times["agree"] += out.agree_s
        self.times["allreduce"] += out.allreduce_s
        self.times["monitor"] += monitor_s
        if not out.skipped:
            self._loss_sum += out.total
            self._loss_n += 1
            for k, v in out.losses.items():
                acc = self._terms[k]
                acc[0] += v
                acc[1] += 1
        if out.grad_norm is not None and math.isfinite(out.grad_norm):
            self._norm_sum += out.grad_norm
            self._norm_n += 1
        self._last = out

    def report(self, progress: Progress, *, divergence: float, checkpoint_dir: str | None = None,
               checkpoint_write_s: float = 0.0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The one call site of ``ray.train.report``; every rank calls it at the same steps.

        ``divergence``: :func:`replica_divergence` of this report (the caller computes it, so the
        checkpoint records it too). ``checkpoint_dir``: a finished local checkpoint directory
        (rank 0) — uploaded by Ray through the reporter's ``upload_fn``, which then owns it
        (removes it once copied). Returns the metrics as this rank sent them (rank 0's are kept).
        """
        t_start = time.perf_counter()
        self.times["checkpoint"] += checkpoint_write_s
        elapsed = t_start - self._t0
        local = {
            "elapsed": elapsed, "images": self._images, "loss": [self._loss_sum, self._loss_n],
            "terms": dict(self._terms), "norm": [self._norm_sum, self._norm_n], "wait": self._wait,
        }
        ranks = all_gather_objects(local)
        wall = max(r["elapsed"] for r in ranks) or 1e-9
        images = sum(r["images"] for r in ranks)
        loss_n = sum(r["loss"][1] for r in ranks)
        terms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for r in ranks:
            for k, (s, n) in r["terms"].items():
                terms[k][0] += s
                terms[k][1] += n
        norm_n = sum(r["norm"][1] for r in ranks)
        last = self._last
        step = progress.global_step
        metrics: dict[str, Any] = {
            **self.static,
            "epoch": progress.epoch,
            "batch": progress.batch_index,
            "step": step,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "images_seen": progress.images_seen,
            "loss": sum(r["loss"][0] for r in ranks) / loss_n if loss_n else float("nan"),
            **{k: s / n for k, (s, n) in sorted(terms.items()) if n},
            "lr": last.lr if last else float("nan"),
            "loss_scale": last.loss_scale if last else float("nan"),
            "grad_norm": sum(r["norm"][0] for r in ranks) / norm_n if norm_n else float("nan"),
            "images_per_s": images / wall,
            "data_wait_frac": sum(r["wait"] for r in ranks) / (wall * len(ranks)),
            "skipped_steps": progress.skipped_steps,
            "nonfinite_steps": progress.nonfinite_steps,
            "overflow_steps": progress.overflow_steps,
            "epoch_losses": list(progress.epoch_losses),
            "replica_divergence": divergence,
            "checkpoint": checkpoint_dir is not None,
            **{f"time/{k}_s": v for k, v in self.times.items()},  # rank 0's own, cumulative
            "time/wall_s": t_start - self._started,
            **(extra or {}),
        }
        if self.rank == 0:
            self.printer(self.progress_line(metrics))
        kw: dict[str, Any] = {}
        if checkpoint_dir is not None and self.rank == 0:
            from ray.train import Checkpoint

            kw = dict(checkpoint=Checkpoint.from_directory(checkpoint_dir),
                      checkpoint_dir_name=f"checkpoint_step{step:08d}_{uuid.uuid4().hex[:6]}")
            if self._upload_fn is not None:
                from ray.train import CheckpointUploadMode

                kw.update(checkpoint_upload_fn=self._upload_fn, delete_local_checkpoint_after_upload=False,
                          checkpoint_upload_mode=CheckpointUploadMode[self._upload_mode.upper()])
        t_call = time.perf_counter()
        self._report_fn(metrics, **kw)
        t_end = time.perf_counter()
        # the upload (inside the report call unless asynchronous) is checkpoint time; the rest is reporting time
        if checkpoint_dir is not None:
            self.times["checkpoint"] += t_end - t_call
            self.times["report"] += t_call - t_start
        else:
            self.times["report"] += t_end - t_start
        self._reset()
        return metrics

    def progress_line(self, m: dict[str, Any]) -> str:
        """``[run/stage] epoch e/E step s/S | x img/s | loss L | <task> l ... | lr | skipped``."""
        step = m["step"]
        epoch = min(self.epochs, (max(step, 1) - 1) // max(1, self.steps_per_epoch) + 1)
        per_task: dict[str, float] = defaultdict(float)
        for k, v in m.items():
            if k.startswith("loss/"):
                per_task[k.split("/")[1]] += v
        tasks = " ".join(f"{t} {v:.3f}" for t, v in per_task.items())
        skipped = f" | skipped {m['skipped_steps']}" if m["skipped_steps"] else ""
        ckpt = " | checkpoint" if m["checkpoint"] else ""
        if "val/vtda" in m:
            ckpt += f" | val VTDA {m['val/vtda']:.1f} ({m['val/time_s']:.0f} s)"
        return (
            f"[{self.run}/{self.stage}] epoch {epoch}/{self.epochs} step {step}/{self.total_steps} | "
            f"{m['images_per_s']:.1f} img/s | loss {m['loss']:.4f} | {tasks} | lr {m['lr']:.2e} | "
            f"wait {m['data_wait_frac']:.0%}{skipped}{ckpt}"
        )


def upload_checkpoint(run: str) -> Callable[[Any, str], Any]:
    """Ray Train's ``checkpoint_upload_fn`` for run directory ``run`` (its storage URI): copy the
    local checkpoint into ``<run>/<checkpoint_dir_name>`` and verify it there
    (:func:`~vtd_train.train.checkpointing.persist_checkpoint`), then remove the local copy; Ray
    registers the checkpoint only once this returns. A failure (no space, a denied write, bytes
    that do not read back) has removed the partial directory and raises one error naming the
    file; a deterministic one is not logged with Ray's traceback (``vtd train`` prints it as one
    line)."""

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import shutil

        import ray.train

        from data_pipeline import fsio
        from vtd_train.train.checkpointing import persist_checkpoint
        from vtd_train.train.failures import deterministic_cause

        storage = ray.train.get_context().get_storage()
        check = getattr(storage, "_check_validation_file", None)  # Ray's "is the storage reachable from this node"
        if check is not None:
            check()
        try:
            persist_checkpoint(checkpoint.path, fsio.join(run, dir_name))
        except Exception as e:
            if deterministic_cause(e) is not None:
                _quiet_ray_error_logs()
            raise
        finally:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
        return ray.train.Checkpoint(filesystem=storage.storage_filesystem, path=storage.build_checkpoint_path_from_name(dir_name))

    return upload


def _quiet_ray_error_logs() -> None:
    """Ray logs a failed upload (and every error of a training function) with its traceback on
    the worker; a deterministic error is said once, in one line, by the CLI."""
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    try:
        from ray.train.v2._internal.execution import context as ray_ctx
    except ImportError:  # pragma: no cover - other Ray versions
        return
    logging.getLogger(ray_ctx.__file__).setLevel(logging.CRITICAL)
