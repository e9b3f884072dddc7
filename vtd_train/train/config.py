"""The training run's configuration: frozen dataclasses, loaded from YAML with errors that name
the file, the key and the value.

A run config (``configs/tiny.yaml`` is the annotated example) composes:

=====================  ========================================================================
key                    what
=====================  ========================================================================
name, stage            run name (``RunConfig.name``: reuse it to resume; letters, digits, ``.``,
                       ``_``, ``-``, not ``.`` or ``..``: it names a directory) and stage label
storage_path           where Ray Train persists checkpoints: a local path or any pyarrow/fsspec
                       URI (``s3://bucket/runs``; every URI's scheme is checked at load time)
seed, precision        seed of model init, per-rank RNGs and the loader; ``fp16`` (paper, with a
                       GradScaler), ``bf16`` (autocast, no scaler) or ``fp32``
epochs, global_batch_size, max_steps
                       the schedule length; the global batch is split evenly over the workers
resources              ``num_workers``, ``use_gpu``, ``cpus_per_worker``
data                   shard root URI (``vtd data convert`` output), split, image sets, loader
                       settings (sampling mode, scales, flips, ``require_tasks``, workers), the
                       tasks whose labels are used and a pseudo-label family to join
model                  ``family``: ``vtdnet`` (default; BDD100K shards) or ``taskprompter``
                       (Cityscapes-3D shards); ``preset`` (VTDNet: ``tiny``, ``vtdnet``, ``mt``,
                       ``single:<task>``, ``tiny:<variant>``; TaskPrompter: ``tiny``, ``paper``)
                       + any field of that family's config as an override
optimizer              AdamW: lr 1e-4, betas (0.9, 0.999), weight decay 0.05 (paper §5 / I);
                       ``implementation`` auto | torch | apex_adam | apex_lamb; ``grad_clip``
grad_sync              the gradient all-reduce across workers: ``bucket_mb`` (25, DDP's),
                       ``comm_dtype`` (auto: the precision's fp16/bf16, else fp32 | fp32 |
                       fp16 | bf16), ``overlap`` (buckets sent during the backward)
lr_schedule            ``policy: step``: ``milestones`` in epochs (×``gamma`` at each; paper: 8
                       and 11 of 12); ``policy: poly``: ``(1 − step / total)^power`` (TaskPrompter);
                       optional linear warm-up in steps
checkpoint             ``every_steps`` (0: epoch ends only), ``at_epoch_end``, ``num_to_keep``,
                       ``upload`` (``async`` | ``sync``: the copy to storage in Ray Train's
                       background thread or in the report call)
failures               ``max_failures`` (Ray FailureConfig) and ``max_consecutive_nonfinite``
report_every_steps     the reporting interval (a ``ray.train.report`` and a progress line)
validation             ``every_epochs`` (0: never), ``split``, ``height``: the model scored on
                       validation during training (``val/vtda`` etc. in that epoch's report;
                       Ray Tune's objective)
freeze                 module-name prefixes whose parameters are frozen (fine-tuning stage)
init_checkpoint        weights to start from when the run has no checkpoint of its own
faults                 fault injection for drills and tests (NaN loss term, killed worker)
=====================  ========================================================================

Loading: :func:`load_train_config` (YAML file or URI) → :func:`train_config_from_dict`, which goes
through :func:`vtd_train.model.config.config_from_dict` (unknown keys, wrong types) and the
``__post_init__`` range checks below; every error is a :class:`VTDInputError` prefixed with the
file and the key path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.errors import VTDInputError
from data_pipeline.loading.sampler import SAMPLING_MODES
from data_pipeline.loading.config import PAPER_SCALES, AugmentConfig, LoaderConfig
from vtd_train.model.config import config_from_dict, read_yaml_mapping
from vtd_train.model.schema import VTDNetConfig
from vtd_train.taskprompter.config import VARIANTS as TASKPROMPTER_VARIANTS
from vtd_train.taskprompter.config import TaskPrompterConfig

PRECISIONS = ("fp16", "bf16", "fp32")
OPTIMIZER_IMPLEMENTATIONS = ("auto", "torch", "apex_adam", "apex_lamb")
MODEL_PRESETS = ("tiny", "vtdnet", "mt", "single:<task>", "tiny:<variant>")
MODEL_FAMILIES = ("vtdnet", "taskprompter")
LR_POLICIES = ("step", "poly")
IMAGE_SETS = ("det", "seg", "track")


#: A run name: it becomes a directory under ``storage_path`` (and Ray Train's run name).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


CHECKPOINT_UPLOADS = ("async", "sync")
COMM_DTYPES = ("auto", "fp32", "fp16", "bf16")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise VTDInputError(message)


def check_uri(key: str, uri: str) -> None:
    """A local path, or a URI whose scheme fsspec can open here (chained ``a::b://`` URIs: each
    part); :class:`VTDInputError` naming ``key`` and the value otherwise."""
    import fsspec

    for part in str(uri).split("::"):
        m = _SCHEME.match(part)
        if m is None:
            continue
        scheme = m.group(1).lower()
        try:
            fsspec.get_filesystem_class(scheme)
        except ValueError:
            raise VTDInputError(f"{key} {uri!r}: unknown URI scheme {scheme!r} (a local path, or a scheme fsspec knows: "
                                f"s3, gs, abfs, hdfs, file, memory, ...)") from None
        except ImportError as e:
            raise VTDInputError(f"{key} {uri!r}: scheme {scheme!r} needs a package that is not installed "
                                f"({str(e).strip().splitlines()[0]})") from None


@dataclass(frozen=True, kw_only=True)
class ResourcesConfig:
    """Ray Train workers: one rank per worker (one GPU each with ``use_gpu``)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"num_workers must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the shards are and how the loader reads them (see :class:`LoaderConfig`).

    ``sets``: image sets to train on, in round-robin order (default: every set of the split).
    ``require_tasks``: ``{set: [task, ...]}`` keeps only key frames labelled for those tasks.
    ``loader_workers``: DataLoader worker processes per rank; ``handoff_batches``: consecutive
    batches a worker hands over at once; ``prefetch_factor``: hand-offs each worker keeps ready.
    ``tasks``: the tasks whose labels the run uses (default: all); the others are read as
    unlabelled, so their decoders get no loss. ``pseudo``: a pseudo-label family (``vtd
    pseudo-label`` output) joined to the shards: frames lacking a real sem / pose label take the
    pseudo one (``tasks`` applies to them too).
    """

    uri: str
    split: str = "train"
    sets: tuple[str, ...] | None = None
    sampling: str = "round_robin"
    scales: tuple[int, ...] = PAPER_SCALES
    flip_prob: float = 0.5
    require_tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    loader_workers: int = 2
    shuffle_buffer: int = 32
    ref_range: int = 3
    size_divisor: int = 32
    augment_in_loader: bool = False
    prefetch_factor: int = 2
    handoff_batches: int = 8
    tasks: tuple[str, ...] | None = None
    pseudo: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.uri), "uri must name the shard root written by `vtd data convert`")
        _check(self.sampling in SAMPLING_MODES, f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.sets is not None:
            bad = [s for s in self.sets if s not in IMAGE_SETS]
            _check(not bad and len(self.sets) > 0, f"sets must be a non-empty list of {IMAGE_SETS}, got {list(self.sets)}")
        _check(self.loader_workers >= 0, f"loader_workers must be >= 0, got {self.loader_workers}")
        _check(self.prefetch_factor >= 1, f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        _check(self.handoff_batches >= 1, f"handoff_batches must be >= 1, got {self.handoff_batches}")
        _check(self.size_divisor >= 1, f"size_divisor must be >= 1, got {self.size_divisor}")
        if not isinstance(self.require_tasks, dict):
            raise VTDInputError(f"require_tasks must be a mapping set -> [task, ...], got {self.require_tasks!r}")
        from data_pipeline.bdd100k.format import TASKS

        norm: dict[str, tuple[str, ...]] = {}
        for s, tasks in self.require_tasks.items():
            _check(s in IMAGE_SETS, f"require_tasks: unknown image set {s!r}; sets are {IMAGE_SETS}")
            if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)):
                raise VTDInputError(f"require_tasks.{s} must be a list of tasks, got {tasks!r}")
            bad = [t for t in tasks if t not in TASKS]
            _check(not bad, f"require_tasks.{s}: unknown task(s) {bad}; tasks are {TASKS}")
            norm[s] = tuple(tasks)
        object.__setattr__(self, "require_tasks", norm)
        if self.tasks is not None:
            bad = [t for t in self.tasks if t not in TASKS]
            _check(not bad and len(self.tasks) > 0, f"tasks: unknown or empty {bad or list(self.tasks)}; tasks are {TASKS}")
        _check(self.pseudo is None or bool(self.pseudo), "pseudo must name the `vtd pseudo-label` output, or be null")
        # scales / flip_prob are range-checked by AugmentConfig
        AugmentConfig(scales=self.scales, flip_prob=self.flip_prob)

    def loader_config(self, *, batch_size: int, seed: int, pin_memory: bool = False) -> LoaderConfig:
        """The per-rank :class:`LoaderConfig` (``batch_size`` is the per-rank batch)."""
        return LoaderConfig(
            batch_size=batch_size,
            num_workers=self.loader_workers,
            sampling=self.sampling,  # type: ignore[arg-type]
            seed=seed,
            shuffle_buffer=self.shuffle_buffer,
            ref_range=self.ref_range,
            size_divisor=self.size_divisor,
            augment=AugmentConfig(scales=self.scales, flip_prob=self.flip_prob),
            augment_in_loader=self.augment_in_loader,
            require_tasks=dict(self.require_tasks),
            pin_memory=pin_memory,
            prefetch_factor=self.prefetch_factor,
            handoff_batches=self.handoff_batches,
            tasks=self.tasks,
            pseudo=self.pseudo,
        )


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW (paper §5 and appendix I: lr 1e-4, β 0.9/0.999, weight decay 0.05).

    ``implementation``: ``auto`` = apex ``FusedAdam`` (AdamW mode) when apex is importable and the
    workers use GPUs, else ``torch.optim.AdamW`` (``fused=True`` where the device supports it);
    ``torch``, ``apex_adam`` and ``apex_lamb`` (``FusedLAMB``) force one. ``grad_clip``: max L2
    norm of all gradients (after unscaling), ``null`` for none.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    implementation: str = "auto"
    fused: bool = True
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"betas must be in [0, 1), got {list(self.betas)}")
        _check(self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.implementation in OPTIMIZER_IMPLEMENTATIONS,
            f"implementation must be one of {OPTIMIZER_IMPLEMENTATIONS}, got {self.implementation!r}",
        )
        _check(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True, kw_only=True)
class GradSyncConfig:
    """How gradients are averaged across workers (:class:`vtd_train.train.grad_sync.GradSync`).

    ``bucket_mb``: parameters travel in buckets of this many MiB (DDP's 25 by default; the first
    bucket 1 MiB), each all-reduced during the backward as soon as its gradients are in when
    ``overlap`` is on, or all after the backward when it is off. ``comm_dtype``: the dtype
    gradients are all-reduced in — ``auto``: the training precision's (fp16 or bf16: half the
    bytes, DDP's compression hooks), fp32 with ``precision: fp32`` — or ``fp32``, ``fp16``,
    ``bf16`` whatever the precision.
    """

    bucket_mb: float = 25.0
    comm_dtype: str = "auto"
    overlap: bool = True

    def __post_init__(self) -> None:
        _check(self.bucket_mb > 0, f"bucket_mb must be > 0, got {self.bucket_mb}")
        _check(self.comm_dtype in COMM_DTYPES, f"comm_dtype must be one of {COMM_DTYPES}, got {self.comm_dtype!r}")


@dataclass(frozen=True, kw_only=True)
class LRScheduleConfig:
    """``policy: step``: lr × ``gamma`` at the start of each milestone epoch (0-based epoch index
    ``m`` = after ``m`` full epochs; the paper's 8 and 11 of 12); ``policy: poly``: lr ×
    ``(1 − step / total_steps)^power`` (TaskPrompter's schedule, power 0.9); either after an
    optional linear warm-up over ``warmup_steps`` steps starting at ``warmup_ratio`` × lr."""

    policy: str = "step"
    power: float = 0.9
    milestones: tuple[int, ...] = (8, 11)
    gamma: float = 0.1
    warmup_steps: int = 0
    warmup_ratio: float = 0.001

    def __post_init__(self) -> None:
        _check(self.policy in LR_POLICIES, f"policy must be one of {LR_POLICIES}, got {self.policy!r}")
        _check(self.power > 0, f"power must be > 0, got {self.power}")
        _check(
            all(b > a for a, b in zip(self.milestones, self.milestones[1:])),
            f"milestones must be strictly increasing, got {list(self.milestones)}",
        )
        _check(all(m >= 1 for m in self.milestones), f"milestones must be >= 1, got {list(self.milestones)}")
        _check(0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 < self.warmup_ratio <= 1, f"warmup_ratio must be in (0, 1], got {self.warmup_ratio}")


@dataclass(frozen=True, kw_only=True)
class CheckpointPolicy:
    """When to checkpoint: every ``every_steps`` steps (0: never mid-epoch), at each epoch end
    (``at_epoch_end``) and always at the end of the run. ``num_to_keep``: Ray's
    ``CheckpointConfig(num_to_keep)`` (``null``: keep all). ``upload``: ``async`` — Ray Train
    copies the checkpoint to storage and verifies it there in a background thread while
    training goes on (its ``checkpoint_upload_mode``; a third to a quarter of the step-time spike
    of ``sync`` even on 2 CPU cores, benchmarks/RESULTS.md) — or ``sync``: the report call
    waits for the copy. Either way a checkpoint is registered only once verified where it is
    stored."""

    every_steps: int = 0
    at_epoch_end: bool = True
    num_to_keep: int | None = 3
    upload: str = "async"

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"every_steps must be >= 0, got {self.every_steps}")
        _check(self.num_to_keep is None or self.num_to_keep >= 1, f"num_to_keep must be >= 1 or null, got {self.num_to_keep}")
        _check(self.upload in CHECKPOINT_UPLOADS, f"upload must be one of {CHECKPOINT_UPLOADS}, got {self.upload!r}")


@dataclass(frozen=True, kw_only=True)
class FailurePolicy:
    """``max_failures``: worker-group restarts from the last checkpoint (Ray ``FailureConfig``;
    -1 = unlimited). ``max_consecutive_nonfinite``: steps in a row with a non-finite loss (or,
    without a GradScaler, non-finite gradients) before the run stops with an error naming the
    loss terms; single ones are skipped on every rank together."""

    max_failures: int = 3
    max_consecutive_nonfinite: int = 5

    def __post_init__(self) -> None:
        _check(self.max_failures >= -1, f"max_failures must be >= -1, got {self.max_failures}")
        _check(self.max_consecutive_nonfinite >= 1, f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Validation during training: at the end of every ``every_epochs``-th epoch (and of the
    last; 0: never) rank 0 scores the model on the ``split`` shards of the run's data with the
    evaluation code (:func:`vtd_train.evaluation.evaluate.evaluate`: the VTD metrics and VTDA,
    in the worker's process, no overlays) at test height ``height`` (null: the largest training
    scale, as ``vtd evaluate`` tests a checkpoint). That epoch's report carries ``val/vtda``,
    ``val/vtda_<group>`` and ``val/<metric>``: Ray Tune's objective (``vtd tune``) and the
    progress line. Other ranks wait at the report's barrier meanwhile."""

    every_epochs: int = 0
    split: str = "val"
    height: int | None = None

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 0, f"every_epochs must be >= 0, got {self.every_epochs}")
        _check(bool(self.split), "split must name a split of the shards (val)")
        _check(self.height is None or self.height >= 1, f"height must be >= 1 or null, got {self.height}")

    def due(self, epochs_done: int, epochs: int) -> bool:
        """Whether validation runs after ``epochs_done`` epochs of ``epochs``."""
        return self.every_epochs > 0 and (epochs_done % self.every_epochs == 0 or epochs_done == epochs)


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Fault injection, for failure drills and the tests; everything off by default.

    ``nan_loss_term`` × NaN on rank ``nan_rank`` at the global steps ``nan_steps`` (0-based).
    ``kill_rank`` SIGKILLs its own worker process just before global step ``kill_step`` (after Ray
    has committed every checkpoint reported so far), once:
    the file ``kill_marker`` is created first and its existence disarms the kill (so the
    restarted run goes through).
    """

    nan_loss_term: str | None = None
    nan_rank: int = 0
    nan_steps: tuple[int, ...] = ()
    kill_rank: int | None = None
    kill_step: int = 0
    kill_marker: str | None = None

    def __post_init__(self) -> None:
        if self.nan_loss_term is not None:
            _check(self.nan_loss_term.startswith("loss/"), f"nan_loss_term must be a loss key loss/<task>/<term>, got {self.nan_loss_term!r}")
            _check(bool(self.nan_steps), "nan_steps must list the steps at which nan_loss_term is poisoned")
        if self.kill_rank is not None:
            _check(bool(self.kill_marker), "kill_marker (a file path) is required with kill_rank: it makes the kill happen once")
            _check(self.kill_step >= 0, f"kill_step must be >= 0, got {self.kill_step}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run (one stage). See the module docstring for the keys."""

    data: DataConfig
    name: str = "vtd"
    stage: str = "joint"
    storage_path: str = "runs/train"
    seed: int = 0
    precision: str = "fp16"
    epochs: int = 12
    global_batch_size: int = 16
    max_steps: int | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    model: VTDNetConfig | TaskPrompterConfig = field(default_factory=VTDNetConfig.vtdnet)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_sync: GradSyncConfig = field(default_factory=GradSyncConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    checkpoint: CheckpointPolicy = field(default_factory=CheckpointPolicy)
    failures: FailurePolicy = field(default_factory=FailurePolicy)
    report_every_steps: int = 50
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    freeze: tuple[str, ...] = ()
    init_checkpoint: str | None = None
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and RUN_NAME.fullmatch(self.name) is not None,
            f"name must be a run name of letters, digits, '.', '_', '-' starting with a letter or digit "
            f"(no '.', '..', blanks or separators: it names a directory under storage_path), got {self.name!r}",
        )
        _check(bool(self.stage), f"stage must be non-empty, got {self.stage!r}")
        _check(bool(self.storage_path), "storage_path must be a path or URI")
        check_uri("storage_path", self.storage_path)
        check_uri("data.uri", self.data.uri)
        if self.init_checkpoint is not None:
            check_uri("init_checkpoint", self.init_checkpoint)
        if self.data.pseudo is not None:
            check_uri("data.pseudo", self.data.pseudo)
        if isinstance(self.model, TaskPrompterConfig):
            # the Cityscapes-3D loader reads the frames of the split; the BDD set / task / pseudo
            # selection has no meaning there
            for key in ("sets", "tasks", "pseudo"):
                _check(getattr(self.data, key) is None, f"data.{key} is for VTDNet's BDD100K shards; a taskprompter "
                       f"model trains on every frame of the Cityscapes-3D split (its tasks: model.tasks), got {getattr(self.data, key)!r}")
            _check(not self.data.require_tasks, "data.require_tasks is for VTDNet's BDD100K shards, not a taskprompter model")
        elif self.model.backbone.pretrained is not None:
            check_uri("model.backbone.pretrained", self.model.backbone.pretrained)
        _check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size}")
        n = self.resources.num_workers
        _check(
            self.global_batch_size % n == 0,
            f"global_batch_size {self.global_batch_size} is not divisible by resources.num_workers {n}: "
            f"every worker takes global_batch_size / num_workers images per step",
        )
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null, got {self.max_steps}")
        _check(self.report_every_steps >= 1, f"report_every_steps must be >= 1, got {self.report_every_steps}")
        late = [m for m in self.lr_schedule.milestones if m > self.epochs] if self.lr_schedule.policy == "step" else []
        _check(not late, f"lr_schedule.milestones {list(late)} lie beyond epochs {self.epochs}")
        _check(all(isinstance(p, str) and p for p in self.freeze), f"freeze must list module-name prefixes, got {list(self.freeze)}")
        if self.faults.kill_rank is not None or self.faults.nan_loss_term is not None:
            for what, r in (("kill_rank", self.faults.kill_rank), ("nan_rank", self.faults.nan_rank)):
                _check(r is None or 0 <= r < n, f"faults.{what} {r} is not a rank of {n} workers")

    @property
    def family(self) -> str:
        """``taskprompter`` or ``vtdnet``: which model, data path and evaluation the run uses."""
        return "taskprompter" if isinstance(self.model, TaskPrompterConfig) else "vtdnet"

    @property
    def per_worker_batch_size(self) -> int:
        return self.global_batch_size // self.resources.num_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for logs, ``train_state.json`` and the configs a pipeline stage writes:
        :func:`train_config_from_dict` reads it back, the model's ``family`` included)."""
        d = dataclasses.asdict(self)
        d["model"] = {"family": self.family, **d["model"]}
        return d


# ---------------------------------------------------------------------------------------------
# Model presets
# ---------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config_from_dict(data: dict | None, *, source: str) -> VTDNetConfig | TaskPrompterConfig:
    """``{"family": ..., "preset": "tiny", **overrides}`` → :class:`VTDNetConfig` or, with
    ``family: taskprompter``, :class:`TaskPrompterConfig` (presets ``tiny``, ``paper``; default
    ``paper``).

    ``preset``: ``vtdnet`` (default), ``mt``, ``single:<task>`` (paper variants, ResNet-50 unless
    ``backbone.name`` says otherwise), ``tiny`` or ``tiny:<variant>`` (the CPU-sized model of
    :meth:`VTDNetConfig.tiny`). Every other key overrides that field of the preset (nested
    mappings merge), validated by :func:`config_from_dict`.
    """
    data = dict(data or {})
    family = data.pop("family", "vtdnet")
    if family not in MODEL_FAMILIES:
        raise VTDInputError(f"{source}: family must be one of {MODEL_FAMILIES}, got {family!r}")
    if family == "taskprompter":
        preset = data.pop("preset", "paper")
        if preset not in TASKPROMPTER_VARIANTS:
            raise VTDInputError(f"{source}: preset {preset!r}: not a TaskPrompter preset (presets: {sorted(TASKPROMPTER_VARIANTS)})")
        merged = _merge(dataclasses.asdict(TASKPROMPTER_VARIANTS[preset]()), data)
        return config_from_dict(TaskPrompterConfig, merged, source=source)
    preset = data.pop("preset", "vtdnet")
    if not isinstance(preset, str):
        raise VTDInputError(f"{source}: preset must be a string, got {preset!r}")
    try:
        if preset == "tiny" or preset.startswith("tiny:"):
            base = VTDNetConfig.tiny(preset.split(":", 1)[1] if ":" in preset else "vtdnet")
        else:
            base = VTDNetConfig.variant(preset)
    except VTDInputError as e:
        raise VTDInputError(f"{source}: preset {preset!r}: {e} (presets: {MODEL_PRESETS})") from None
    merged = _merge(dataclasses.asdict(base), data)
    return config_from_dict(VTDNetConfig, merged, source=source)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def train_config_from_dict(data: Any, *, source: str = "<config>") -> TrainConfig:
    """Validate a parsed YAML mapping into a :class:`TrainConfig` (errors name source and key)."""
    if not isinstance(data, dict):
        raise VTDInputError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if "data" not in data:
        raise VTDInputError(f"{source}: missing key 'data' (data.uri: the shard root written by `vtd data convert`)")
    if "model" in data:
        model = data["model"]
        if model is not None and not isinstance(model, dict):
            raise VTDInputError(f"{source}: model: expected a mapping, got {model!r}")
        data["model"] = model_config_from_dict(model, source=f"{source}: model")
    return config_from_dict(TrainConfig, data, source=source)


def load_train_config(path: str, **overrides: Any) -> TrainConfig:
    """Read a YAML run config (local path or fsspec URI); ``overrides`` replace top-level keys
    (``None`` values are ignored), e.g. the CLI's ``--storage`` and ``--name``."""
    data = read_yaml_mapping(path, what="config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return train_config_from_dict(data, source=path)


def _absolute(uri: str) -> str:
    """Local paths become absolute (workers need not share the driver's working directory)."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with local ``storage_path``, ``data.uri``, ``data.pseudo``, ``init_checkpoint`` made absolute."""
    return dataclasses.replace(
        cfg,
        storage_path=_absolute(cfg.storage_path),
        data=dataclasses.replace(cfg.data, uri=_absolute(cfg.data.uri),
                                 pseudo=None if cfg.data.pseudo is None else _absolute(cfg.data.pseudo)),
        init_checkpoint=None if cfg.init_checkpoint is None else _absolute(cfg.init_checkpoint),
    )
