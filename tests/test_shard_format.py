"""The shard format's run-length label maps and the compact targets built from them."""

from __future__ import annotations

import pickle
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from data_pipeline.bdd100k import format as bdd100k
from data_pipeline.loading.decode import decode_clip
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset, build_train_loader, iter_frames, iter_shard
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.shards.format import decode_label_map, encode_label_map
from data_pipeline.loading.structures import AugmentPlan, Batch, FrameTargets, RunLengthMap
from data_pipeline.loading.config import AugmentConfig
from data_pipeline.loading.transforms import prepare_batch


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (13, 1), (37, 64), (720, 1280)])
def test_label_maps_round_trip_exactly(dtype, shape):
    rng = np.random.default_rng(hash((shape, np.dtype(dtype).str)) % 2**32)
    hi = np.iinfo(dtype).max
    noisy = rng.integers(0, hi, shape, endpoint=True).astype(dtype)
    blocky = np.repeat(rng.integers(0, hi, (shape[0], max(1, shape[1] // 8)), endpoint=True), 8, axis=1)[:, : shape[1]]
    blocky = np.pad(blocky, ((0, 0), (0, shape[1] - blocky.shape[1])), mode="edge").astype(dtype)
    for a in (noisy, blocky, np.full(shape, hi, dtype), np.zeros(shape, dtype)):
        b = decode_label_map(encode_label_map(a))
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


def test_a_constant_map_is_a_handful_of_bytes():
    data = encode_label_map(np.full((720, 1280), 255, np.uint8))
    runs = struct.unpack_from("<4sc3x3I", data)[4]
    assert runs == -(-720 * 1280 // 65535) and len(data) == 20 + 3 * runs  # one run, split at 65535


def test_encoder_refuses_what_it_cannot_store():
    for bad in (np.zeros((2, 2), np.int32), np.zeros((2, 2, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="label maps are"):
            encode_label_map(bad)


def _member(magic=b"VRLE", code=b"B", h=2, w=3, values=(7, 9), lengths=(4, 2), tail=b""):
    vals = np.array(values, np.uint8 if code == b"B" else np.uint16).tobytes()
    return struct.pack("<4sc3x3I", magic, code, h, w, len(values)) + np.array(lengths, "<u2").tobytes() + vals + tail


def test_decoder_names_what_is_wrong_with_a_corrupt_member():
    assert np.array_equal(decode_label_map(_member()), [[7, 7, 7], [7, 9, 9]])
    cases = {
        "shorter than": b"VRLE",
        "magic": _member(magic=b"\x89PNG"),
        "dtype code": _member(code=b"Q"),
        "inconsistent": _member(h=0),
        "holds 27 bytes": _member(tail=b"x"),
        "holds 25 bytes": _member()[:-1],
        "cover 5 pixels": _member(lengths=(4, 1)),
        "zero-length": _member(values=(7, 8, 9), lengths=(4, 0, 2)),
    }
    for what, data in cases.items():
        with pytest.raises(ValueError, match=what):
            decode_label_map(data)


def test_a_corrupt_label_map_in_a_shard_is_a_data_error_naming_the_member(tiny_shards):
    fam = next(f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "det")
    sample = next(s for s in iter_shard(fam.urls[0]) if "0.lane.rle" in s)
    with pytest.raises(DataError, match="lane.rle") as e:
        decode_clip(dict(sample, **{"0.lane.rle": sample["0.lane.rle"][:-5]}))
    assert fam.urls[0] in str(e.value)
    wrong_size = encode_label_map(np.zeros((3, 5), np.uint8))
    with pytest.raises(DataError, match="label map is 5x3"):
        decode_clip(dict(sample, **{"0.lane.rle": wrong_size}))


def test_instance_map_values_beyond_the_record_are_refused(tiny_shards):
    fam = next(f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "seg")
    sample = next(iter_shard(fam.urls[0]))
    frame = decode_clip(sample)[0]
    h, w = frame.image.shape[-2:]
    bad = np.zeros((h, w), np.uint8)
    bad[0, 0] = frame.targets.num_instances + 1
    with pytest.raises(DataError, match="instance map holds value"):
        decode_clip(dict(sample, **{"0.instances.rle": encode_label_map(bad)}))


def test_instance_masks_expand_the_map():
    m = torch.tensor([[0, 1, 1], [2, 2, 0], [0, 0, 3]], dtype=torch.uint8)
    t = FrameTargets(boxes=torch.zeros(4, 4), instance_map=m)  # instance 3 has no pixels
    masks = t.instance_masks()
    assert masks.dtype == torch.bool and masks.shape == (4, 3, 3)
    for k in range(4):
        assert torch.equal(masks[k], m == k + 1)
    assert torch.equal(t.instance_masks(torch.tensor([2, 0])), masks[[2, 0]])
    with pytest.raises(IndexError):
        t.instance_masks(torch.tensor([4]))
    wide = FrameTargets(boxes=torch.zeros(300, 4), instance_map=torch.full((2, 2), 300, dtype=torch.int32))
    assert wide.instance_masks(torch.tensor([299, 0])).tolist() == [[[True, True], [True, True]], [[False, False], [False, False]]]


def test_lane_maps_expand_identically_in_numpy_and_torch():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(bdd100k.decode_lane_mask(torch.from_numpy(codes)).numpy(), bdd100k.decode_lane_mask(codes))


def test_augmenting_the_compact_maps_equals_augmenting_each_expanded_mask(tiny_shards):
    """Resizing / flipping the instance map and the lane bytes, then expanding them, gives what
    expanding first and augmenting every full-size mask (the costly way) gives."""
    fams = [f for f in families_from_manifest(tiny_shards, "train") if f.set_name in ("seg", "det")]
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(44,), flip_prob=0.5))
    checked = 0
    for batch in MultiSetDataset(fams, cfg, rank=0, world_size=1):
        batch = replace(batch, augment=AugmentPlan(height=44, flips=(True, False)))
        out = prepare_batch(batch)
        for i, (src, dst) in enumerate(zip(batch.targets, out.targets)):
            src = src.expanded()
            size = list(out.image_sizes[i])
            flip = out.augment.flips[i]

            def expect(m: torch.Tensor) -> torch.Tensor:
                r = TF.resize(m.to(torch.uint8), size, interpolation=TF.InterpolationMode.NEAREST_EXACT, antialias=False)
                return r.flip(-1) if flip else r

            if src.instance_map is not None and src.num_instances:
                assert torch.equal(dst.instance_masks(), expect(src.instance_masks()).bool())
                checked += 1
            if src.lane is not None:
                assert torch.equal(bdd100k.decode_lane_mask(dst.lane), expect(bdd100k.decode_lane_mask(src.lane)))
                checked += 1
    assert checked > 0


def test_loader_batches_are_unpadded_until_prepared(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(), flip_prob=0.0))
    batch = next(iter(MultiSetDataset(fams, cfg, rank=0, world_size=1)))
    assert not batch.padded and len(batch.images) == len(batch) == 2
    assert [tuple(x.shape[-2:]) for x in batch.images] == batch.image_sizes
    out = prepare_batch(batch)
    assert out.padded and out.images.shape[-2] % 32 == 0 and out.images.shape[-1] % 32 == 0
    for i, (h, w) in enumerate(batch.image_sizes):
        assert torch.equal(out.images[i, :, :h, :w], batch.images[i])
        assert not out.images[i, :, h:].any() and not out.images[i, :, :, w:].any()
    assert prepare_batch(out) is out


def test_training_batches_carry_runs_that_expand_to_the_decoded_maps(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    dense = {f.record["name"]: f.targets for fam in fams for f in iter_frames(fam.urls)}
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(), flip_prob=0.0))
    seen = set()
    for batch in MultiSetDataset(fams, cfg, rank=0, world_size=1):
        for m, t in zip(batch.meta, batch.targets):
            want = dense[m["name"]]
            for field in ("instance_map", "sem", "drivable", "lane"):
                got = getattr(t, field)
                assert (got is None) == (getattr(want, field) is None), (m["name"], field)
                if got is not None:
                    assert isinstance(got, RunLengthMap) and got.lengths.numel() < got.shape[0] * got.shape[1] // 8
                    assert torch.equal(got.expand(), getattr(want, field)), (m["name"], field)
                    seen.add(field)
    assert seen == {"instance_map", "sem", "drivable", "lane"}


def _flatten(b: Batch) -> list:
    """Every value of a batch, tensors compared by content (runs expanded)."""
    out = [b.set_name, b.image_sizes, b.meta, b.augment, b.labels]
    out += list(b.images) + list(b.ref_images or [])
    for t in b.targets + (b.ref_targets or []):
        t = t.expanded()
        out += [t.weather, t.scene] + [getattr(t, f) for f in ("boxes", "classes", "ignore", "track_ids", "instance_map",
                                                              "mask_valid", "keypoints", "pose_boxes", "sem", "drivable", "lane")]
    return out


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (torch.equal(x, y) and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_batches_pickle_as_one_buffer_and_come_back_equal(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(64,)))
    for batch in MultiSetDataset(fams, cfg, rank=0, world_size=1):
        state = batch.__reduce__()[1]
        assert state[1] is not None and len(state[2]) > 10, "all tensors travel in one packed buffer"
        back = pickle.loads(pickle.dumps(batch))
        assert _same(_flatten(back), _flatten(batch))
        # memory layouts travel too: a decoded JPEG stays a [3, H, W] view of [H, W, 3] memory
        assert [x.stride() for x in back.images] == [x.stride() for x in batch.images]
        # views of one buffer, yet independent: writing one tensor leaves the others alone
        before = [x.clone() for x in back.images]
        back.labels.fill_(7)
        assert all(torch.equal(x, y) for x, y in zip(back.images, before))


def test_worker_processes_deliver_the_batches_the_loader_makes_in_process(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(64,)))
    in_process = [_flatten(b) for b in MultiSetDataset(fams, cfg, rank=0, world_size=1)]
    ds = MultiSetDataset(fams, replace(cfg, num_workers=1, pin_memory=False), rank=0, world_size=1)
    through_worker = [_flatten(b) for b in build_train_loader(ds)]
    assert len(in_process) == len(through_worker) > 0
    assert all(_same(a, b) for a, b in zip(in_process, through_worker))


def test_workers_reuse_segments_yet_never_overwrite_a_batch_still_held(tiny_shards, monkeypatch):
    from data_pipeline.loading import shm_pool
    from data_pipeline.loading.loader import ShardFamily

    fams = [ShardFamily(set_name=f.set_name, split=f.split, urls=f.urls * 3, shard_frames=f.shard_frames * 3,
                        shard_label_sets=f.shard_label_sets * 3, shard_clip_frames=f.shard_clip_frames * 3,
                        shard_sample_offsets=f.shard_sample_offsets * 3)
            for f in families_from_manifest(tiny_shards, "train")]
    # 2 workers x 15 slots, so that this epoch of about a hundred batches reuses each slot
    cfg = LoaderConfig(batch_size=2, num_workers=2, prefetch_factor=2, handoff_batches=4, augment=AugmentConfig(scales=(64,)))
    ds = MultiSetDataset(fams, cfg, rank=0, world_size=1)
    # reference: the same (deterministic) epoch, every batch copied the moment it arrives
    want = [[x.clone() if isinstance(x, torch.Tensor) else x for x in _flatten(b)] for b in build_train_loader(ds)]

    slots = []
    real_receive = shm_pool.receive
    monkeypatch.setattr(shm_pool, "receive", lambda ref, seg: (slots.append(ref.slot), real_receive(ref, seg))[1])
    held = {}
    it = iter(build_train_loader(ds))
    for i, b in enumerate(it):
        if i % 4 == 0:
            held[i] = b  # kept to the end: its segment must not be reused meanwhile
        else:
            assert _same(_flatten(b), want[i]), f"batch {i} arrived intact"
        del b
    assert len(want) > 20 and 0 < len(slots) <= len(want)  # batches that found no free slot travel unpooled
    assert len(set(slots)) < len(slots), "segments were reused"
    # each segment crossed once (with the first batch in it; later ones refer to it) or when it grew
    received = it.buffer_pool.segments_received
    assert 0 < received <= 2 * len(set(slots)) < len(slots), (received, len(set(slots)), len(slots))
    for i, b in held.items():
        assert _same(_flatten(b), want[i]), f"held batch {i} was overwritten"
