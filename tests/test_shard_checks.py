"""Shards checked against their manifest: ``vtd data inspect`` and the training loader say a
truncated shard is truncated, naming it, with the frames left of the manifest's.

Faults on a copy of the session's shards (``tiny_shards``: 3 samples per shard; the first
tracking shard holds 12 frames in 3 clips of 4): cut exactly where a sample begins, cut inside a
member, a size that differs while every frame is intact, a sample moved, a member training would
reject, a shard the manifest does not list.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.shards.inspect import check_shard, inspect_shards
from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset
from data_pipeline.shards.manifest import families_from_manifest

SHARD = "track/train/track-train-000000.tar"


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    """A private copy of the session's shards (tests damage it)."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def _entry(root: Path, rel: str = SHARD) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    return next(sh for fam in manifest["sets"].values() for sh in fam["shards"] if sh["path"] == rel)


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def _one_line_error(root: Path, capsys) -> str:
    from vtd_train.cli import main

    assert main(["data", "inspect", str(root)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtd: error: ") and not captured.out, captured
    return lines[0]


def _read_epoch(root: Path) -> None:
    """One epoch of the tracking set through the training loader (one rank, in this process)."""
    ds = MultiSetDataset(families_from_manifest(str(root), "train", ("track",)),
                         LoaderConfig(batch_size=2, num_workers=0), rank=0, world_size=1)
    for _ in ds:
        pass


def test_the_intact_shards_pass(shards):
    report = inspect_shards(str(shards))
    assert report["sets"]["track/train"]["samples"] == json.loads((shards / "manifest.json").read_text())[
        "sets"]["track/train"]["samples"]


def test_a_shard_cut_where_a_sample_begins_is_truncated_n_of_m_frames(shards, capsys):
    """A tar that ends cleanly after its second sample (no end-of-archive blocks) read as 8
    frames where the manifest says 12: inspect and the loader both say truncated, 8 of 12."""
    entry = _entry(shards)
    assert entry["clip_frames"] == [4, 4, 4]
    _cut(shards / SHARD, entry["sample_offsets"][2])
    line = _one_line_error(shards, capsys)
    assert f"{shards / SHARD}: truncated: 8 of 12 frames ({entry['sample_offsets'][2]} of {entry['bytes']} bytes; " \
           "the data ends after a complete sample, without the end-of-archive blocks)" in line, line
    with pytest.raises(DataError, match=rf"{shards / SHARD}: truncated: 8 of 12 frames"):
        _read_epoch(shards)


def test_a_shard_cut_inside_a_member_is_truncated_not_a_missing_member(shards, capsys):
    """Cut 700 bytes into the third sample (its first member's data): not 'sample has no
    clip.json' but truncated, 8 of 12 frames, said by inspect and by the loader; the loader's
    error is deterministic for the run's failure policy (no retries) and one line."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from vtd_train.train.failures import FailFastPolicy, describe_failure

    entry = _entry(shards)
    at = entry["sample_offsets"][2] + 700
    _cut(shards / SHARD, at)
    line = _one_line_error(shards, capsys)
    assert f"{shards / SHARD}: truncated: 8 of 12 frames ({at} of {entry['bytes']} bytes; the data ends inside a member " \
           f"at byte {at})" in line, line
    with pytest.raises(DataError) as e:
        _read_epoch(shards)
    assert str(e.value) == f"{shards / SHARD}: truncated: 8 of 12 frames (the data ends inside a member at byte {at})"
    failed = WorkerGroupError("failed", {1: e.value})
    assert FailFastPolicy(DefaultFailurePolicy(FailureConfig(max_failures=3))).make_decision(failed) == FailureDecision.RAISE
    assert describe_failure("r", failed) == f"run 'r': {e.value}"
    # cut inside the last member of the second sample (its clip.json): that sample is cut, not counted
    rel = "track/train/track-train-000001.tar"
    with tarfile.open(shards / rel) as tf:
        clip_json = [m for m in tf.getmembers() if m.name.endswith(".clip.json")][1]
    _cut(shards / rel, clip_json.offset_data + 10)
    with pytest.raises(DataError, match=r"track-train-000001\.tar: truncated: 4 of 12 frames"):
        check_shard(str(shards / rel), "track", "train", _entry(shards, rel))


def test_a_size_the_manifest_does_not_record_with_every_frame_intact(shards, capsys):
    """The record padding after the end-of-archive blocks cut (two zero blocks remain): a valid
    tar with all 12 frames, but not the bytes the manifest records."""
    entry = _entry(shards)
    data = (shards / SHARD).read_bytes()
    end = len(data.rstrip(b"\0"))
    end += -end % 512  # the last member's padding ends here
    _cut(shards / SHARD, end + 1024)
    assert end + 1024 < entry["bytes"]
    line = _one_line_error(shards, capsys)
    assert line.endswith(f"{shards / SHARD}: {end + 1024} bytes, the manifest records {entry['bytes']} "
                         "(all 12 frames intact)"), line
    _cut(shards / SHARD, end + 700)  # into the end-of-archive blocks: cut short
    assert "truncated: 12 of 12 frames" in _one_line_error(shards, capsys)
    (shards / SHARD).write_bytes(data + b"junk")  # bytes after the end-of-archive blocks
    assert f"non-zero bytes at byte {len(data)}, after the last sample (byte {end})" in _one_line_error(shards, capsys)


def test_another_shard_under_its_name_and_a_missing_shard(shards, capsys):
    """Another shard's bytes under this name (sample offsets and counts differ); a shard gone."""
    shutil.copy(shards / "track/train/track-train-000001.tar", shards / SHARD)
    line = _one_line_error(shards, capsys)
    assert f"{shards / SHARD}: " in line and "not the shard the manifest describes" in line, line
    (shards / SHARD).unlink()
    assert f"{shards / SHARD}: missing: the manifest lists this shard" in _one_line_error(shards, capsys)


def test_a_member_training_would_reject_and_an_unlisted_shard(shards, tiny_shards, capsys):
    """A pickle member (the loader refuses anything but JSON, JPEG and run-length maps), then a
    shard the manifest does not list."""
    import io

    root, path = shards, shards / SHARD
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
            if m.name.endswith("00000000.clip.json"):
                evil = tarfile.TarInfo(m.name.replace("clip.json", "0.pyd"))
                evil.size = 4
                dst.addfile(evil, io.BytesIO(b"\x80\x04N."))
    path.write_bytes(buf.getvalue())
    line = _one_line_error(root, capsys)
    assert "unexpected member '0.pyd'" in line and SHARD in line, line
    shutil.copy(Path(tiny_shards) / SHARD, path)
    shutil.copy(path, root / "track/train/track-train-000099.tar")
    assert "track-train-000099.tar: not listed in" in _one_line_error(root, capsys)
