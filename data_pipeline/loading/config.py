"""The loader's settings (:class:`LoaderConfig`, :class:`AugmentConfig`), importable without
torch: the training config, the orchestrator and the CLI validate them without loading it
(:mod:`~data_pipeline.loading.loader` and :mod:`~data_pipeline.loading.transforms` use them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.bdd100k import format as bdd100k
from data_pipeline.loading.sampler import SAMPLING_MODES, SamplingMode

#: The paper's multi-scale training heights (appendix I): 600..720 in steps of 24.
PAPER_SCALES: tuple[int, ...] = (600, 624, 648, 672, 696, 720)


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """``scales``: candidate image heights (aspect kept); empty = keep the original size."""

    scales: tuple[int, ...] = PAPER_SCALES
    flip_prob: float = 0.5

    def __post_init__(self):
        if any(int(h) <= 0 for h in self.scales):
            raise ValueError(f"AugmentConfig.scales must be positive heights, got {self.scales}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"AugmentConfig.flip_prob must be in [0, 1], got {self.flip_prob}")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """Training loader settings.

    ``batch_size`` is per rank. ``require_tasks`` restricts a set's key frames to those labelled
    for all the given tasks, e.g. ``{"track": ("mots",)}`` trains on the MOTS subset of the
    tracking set (paper H.1, joint training). ``ref_range`` bounds the key→reference frame
    distance (QDTrack: ±3). ``augment_in_loader`` applies the augmentation in the workers
    instead of leaving it to the training step (see :mod:`data_pipeline.loading.transforms`).

    ``handoff_batches``: consecutive batches a DataLoader worker makes and hands over together,
    as one DataLoader item; the training process still receives them one by one, in step order.
    The DataLoader's per-item costs (its index and result queues, the result queue's feeder
    thread waking up and taking the worker's GIL, the training process's wake-up) are then paid
    once per hand-off instead of once per batch, and a tracking frame that two batches of one
    hand-off use travels once (benchmarks/RESULTS.md: 8 rather than 4 batches per hand-off made
    one worker 2–12% faster over the three sets taken round-robin). ``prefetch_factor``
    counts hand-offs per worker. Each worker's first hand-off of an epoch is a single batch, so
    the epoch starts as soon as its first batch is made.

    ``tasks``: the tasks whose labels the run uses (``None``: all); every other task is dropped
    from the frame records as if unlabelled, with the label maps only it uses, so its decoder
    gets no loss and no gradient (e.g. a curriculum stage training det + mot on the det and
    track sets). ``pseudo``: a pseudo-label family (``vtd pseudo-label`` output) joined to every
    sample read (:mod:`data_pipeline.loading.pseudo`): a frame takes a pseudo task where it lacks the
    real label, marked :attr:`~data_pipeline.loading.structures.LabelSource.PSEUDO`. ``require_tasks``
    selects key frames by their real labels; ``tasks`` applies to pseudo tasks too.
    """

    batch_size: int = 2
    num_workers: int = 2
    sampling: SamplingMode = "round_robin"
    seed: int = 0
    shuffle_buffer: int = 32
    ref_range: int = 3
    size_divisor: int = 32
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    augment_in_loader: bool = False
    require_tasks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pin_memory: bool = False
    prefetch_factor: int = 2
    handoff_batches: int = 8
    tasks: tuple[str, ...] | None = None
    pseudo: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"LoaderConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.handoff_batches < 1:
            raise ValueError(f"LoaderConfig.handoff_batches must be >= 1, got {self.handoff_batches}")
        if self.prefetch_factor < 1:
            raise ValueError(f"LoaderConfig.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.ref_range < 1:
            raise ValueError(f"LoaderConfig.ref_range must be >= 1, got {self.ref_range}")
        if self.tasks is not None:
            bad = [t for t in self.tasks if t not in bdd100k.TASKS]
            if bad or not self.tasks:
                raise ValueError(f"LoaderConfig.tasks must be a non-empty list of {bdd100k.TASKS}, got {list(self.tasks)}")
