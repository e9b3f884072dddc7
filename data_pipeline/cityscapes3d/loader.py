"""The training loader of Cityscapes-3D shards: deterministic, balanced, random access by frame.

Each epoch the split's frames are permuted by ``(seed, epoch)``; global step ``s`` takes the
frames ``perm[(s·world + rank)·B : … + B]`` on rank ``rank`` (``B`` the per-rank batch), so every
rank takes ``frames // (world · B)`` batches of distinct frames (the last partial global batch is
left out, as the BDD loader does). A frame is read by seeking to its sample in its shard (the
manifest's ``sample_offsets``) and decoded by :func:`.decode.decode_sample`; only PNG, JSON and
the run-length maps are parsed. DataLoader workers take a rank's steps round-robin (step ``s``
to worker ``s mod W``), the order ``DataLoader`` returns items in, so the batch sequence does not
depend on the worker count. ``collate`` turns a step's frames into the batch the model takes
(the model family's business: :func:`vtd_train.taskprompter.batch.collate_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import fsio
from data_pipeline.shards import format as SF
from data_pipeline.errors import DataError
from data_pipeline.shards.manifest import read_manifest
from data_pipeline.loading.sampler import batches_per_rank, rng_for
from data_pipeline.shards.tar_reader import iter_samples

from .decode import CityscapesFrame, decode_sample
from .format import BENCHMARK, SET_NAME


def frame_index(uri: str, split: str) -> list[tuple[str, int]]:
    """``(shard URL, byte offset)`` of every frame of ``split``, in manifest order; DataError
    naming the manifest for another benchmark, a missing split or a shard without offsets."""
    manifest = read_manifest(uri)
    where = fsio.join(uri, SF.MANIFEST_NAME)
    if manifest.get("benchmark") != BENCHMARK:
        raise DataError(where, f"benchmark {manifest.get('benchmark')!r}, expected {BENCHMARK!r} "
                        "(`vtd data convert --format cityscapes3d` output)", field="benchmark")
    entry = manifest["sets"].get(f"{SET_NAME}/{split}")
    if entry is None:
        raise DataError(where, f"no split {split!r} (has {sorted(manifest['sets'])})", field="sets")
    out = []
    for sh in entry["shards"]:
        offsets = sh.get("sample_offsets")
        if not isinstance(offsets, list) or len(offsets) != sh.get("samples"):
            raise DataError(where, f"shard {sh.get('path')!r}: sample_offsets missing or not one per sample", field="sample_offsets")
        out.extend((fsio.join(uri, sh["path"]), int(o)) for o in offsets)
    return out


def read_frame(url: str, offset: int) -> CityscapesFrame:
    with fsio.open_read(url) as f:
        if offset:
            f.seek(offset)
        sample = next(iter_samples(f, url, offset), None)
    if sample is None:
        raise DataError(url, f"no sample at byte {offset} (the shard is shorter than its manifest says)", field="sample_offsets")
    return decode_sample(sample)


class Cityscapes3DDataset(IterableDataset):
    """One rank's batches of one epoch (``len()`` of them); ``set_epoch`` before iterating."""

    def __init__(self, uri: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 collate: Callable[[list[CityscapesFrame]], Any] = list):
        self.index = frame_index(uri, split)
        self.uri, self.split, self.batch_size = uri, split, batch_size
        self.rank, self.world_size, self.seed, self.collate = rank, world_size, seed, collate
        self.steps = batches_per_rank(len(self.index), world_size, batch_size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def step_frames(self, step: int) -> list[int]:
        """Frame indices (manifest order) of this rank's batch at ``step`` of the current epoch."""
        perm = rng_for(self.seed, "cityscapes3d", self.epoch).permutation(len(self.index))
        start = (step * self.world_size + self.rank) * self.batch_size
        return [int(i) for i in perm[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(worker, self.steps, workers):
            yield self.collate([read_frame(*self.index[i]) for i in self.step_frames(step)])


def build_loader(dataset: Cityscapes3DDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """The epoch's batches in step order (``batch_size=None``: the dataset yields whole batches)."""
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
