"""JPEG decoding (data_pipeline/loading/jpeg.py), frames decoded straight into a batch's buffer and
batches crossing processes as one buffer (data_pipeline/loading/transfer.py)."""

from __future__ import annotations

import io
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipeline.loading import jpeg
from data_pipeline.loading.decode import decode_clip
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset, iter_shard
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.loading.structures import AugmentPlan, Batch, EncodedImage, FrameTargets, RunLengthMap
from data_pipeline.loading.transfer import pack_batch, pack_batches
from data_pipeline.loading.config import AugmentConfig


def _jpeg(mode: str, h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def _torchvision(data: bytes) -> np.ndarray:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_matches_torchvision_pixel_for_pixel(mode):
    data = _jpeg(mode)
    img = jpeg.decode(data)
    assert img.shape == (3, 48, 64) and img.dtype == torch.uint8
    assert img.stride() == (1, 64 * 3, 3), "a [3, H, W] view of [H, W, 3] memory, as torchvision returns it"
    assert np.array_equal(img.permute(1, 2, 0).numpy(), _torchvision(data))


def test_cmyk_jpegs_come_out_rgb():
    data = _jpeg("CMYK")
    img = jpeg.decode(data).permute(1, 2, 0).numpy()
    # libjpeg-turbo's CMYK->RGB and torchvision's differ in rounding only
    assert img.shape == (48, 64, 3) and np.abs(img.astype(int) - _torchvision(data)).max() <= 1


def test_decode_into_refuses_wrong_targets_and_corrupt_streams():
    data = _jpeg("RGB")
    with pytest.raises(ValueError, match="64x48, the decode target 64x56"):
        jpeg.decode_into(data, np.empty((56, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        jpeg.decode_into(data, np.empty((48, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        jpeg.decode_into(data, np.empty((48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="Premature end"):
        jpeg.decode_into(data[: len(data) // 2], np.empty((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        jpeg.read_size(b"")


def test_a_truncated_frame_is_an_error_naming_shard_and_frame(tiny_shards):
    """The loader reads only the JPEG header when it decodes a sample; the pixels come when the
    batch is packed, and a stream that breaks off there is reported just the same."""
    fam = families_from_manifest(tiny_shards, "train")[0]
    sample = next(iter_shard(fam.urls[0]))
    good = bytes(sample["0.jpg"])
    frame = decode_clip(dict(sample, **{"0.jpg": good[: len(good) * 2 // 3]}), compact=True)[0]
    assert isinstance(frame.image, EncodedImage)  # the header is intact
    with pytest.raises(DataError, match="corrupt JPEG") as e:
        frame.image.decode()
    assert fam.urls[0] in str(e.value) and frame.record["name"] in str(e.value) and "jpg" in str(e.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_frame_met_in_a_worker_is_the_same_error_in_the_training_process(tiny_shards, tmp_path, workers):
    from webdataset.writer import TarWriter

    from data_pipeline.loading.loader import ShardFamily, build_train_loader

    det = next(f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "det")
    samples = [s for u in det.urls for s in iter_shard(u)]
    url = str(tmp_path / "det-truncated.tar")
    with open(url, "wb") as f, TarWriter(f, encoder=False, mtime=0) as w:
        for i, s in enumerate(samples):
            s = {k: (v if k == "__key__" else bytes(v)) for k, v in s.items() if k != "__url__"}
            if i == 1:  # the header intact (the sample assembles), the pixels cut off
                s["0.jpg"] = s["0.jpg"][: len(s["0.jpg"]) // 2]
            w.write(s)
    fam = ShardFamily(set_name="det", split="train", urls=(url,), shard_frames=(len(samples),))
    cfg = LoaderConfig(batch_size=2, num_workers=workers, shuffle_buffer=1, augment=AugmentConfig(scales=(64,)))
    with pytest.raises(DataError, match="corrupt JPEG") as e:
        list(build_train_loader(MultiSetDataset([fam], cfg, rank=0, world_size=1)))
    assert e.value.file == f"{url}:{samples[1]['__key__']}" and e.value.field == "jpg"
    assert e.value.frame == decode_clip(samples[1])[0].record["name"]


def test_a_frame_used_twice_is_decoded_once_and_copied_for_the_second_use(monkeypatch):
    calls = []
    real = jpeg.decode_into
    monkeypatch.setattr(jpeg, "decode_into", lambda data, out: (calls.append(len(data)), real(data, out)))
    data = _jpeg("RGB")
    want = _torchvision(data)
    img = EncodedImage(data, 48, 64, "shard.tar:key", "frame-a")
    img.uses = 2
    a = np.empty((48, 64, 3), np.uint8)
    b = np.zeros((48, 64, 3), np.uint8)
    img.decode_into(a)
    assert img._pixels is not None  # kept for the second use
    img.decode_into(b)
    assert len(calls) == 1 and np.array_equal(a, want) and np.array_equal(b, want)
    assert img._pixels is None and img.uses == 0  # released after the last use
    # a wrong count never gives wrong pixels: a further use decodes again
    c = img.decode()
    assert len(calls) == 2 and np.array_equal(c.permute(1, 2, 0).numpy(), want)


def _targets(seed: int, h: int, w: int) -> FrameTargets:
    g = torch.Generator().manual_seed(seed)
    n = 3
    sem = torch.randint(0, 19, (h, w), generator=g, dtype=torch.uint8)
    return FrameTargets(
        weather=seed, scene=-1,
        boxes=torch.rand(n, 4, generator=g) * 40, classes=torch.randint(0, 8, (n,), generator=g),
        ignore=torch.tensor([True, False, False]), track_ids=torch.tensor([4, -1, 9]),
        instance_map=torch.randint(0, n + 1, (h, w), generator=g, dtype=torch.uint8).t().contiguous().t(),
        mask_valid=torch.ones(n, dtype=torch.bool),
        keypoints=torch.rand(2, 18, 3, generator=g), pose_boxes=torch.rand(2, 4, generator=g),
        sem=RunLengthMap(sem.flatten()[:5].clone(), torch.tensor([h * w - 4, 1, 1, 1, 1]), (h, w)),
        drivable=None, lane=torch.zeros(h, w, dtype=torch.uint8),
    )


def _same_batch(a: Batch, b: Batch) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.stride() == y.stride() and torch.equal(x, y)
        if isinstance(x, RunLengthMap):
            return isinstance(y, RunLengthMap) and x.shape == y.shape and eq(x.values, y.values) and eq(x.lengths, y.lengths)
        if isinstance(x, FrameTargets):
            return all(eq(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return all(eq(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


def test_pack_round_trips_every_field_and_memory_layout():
    data = [_jpeg("RGB", 40, 56, seed=s) for s in range(2)]
    encoded = [EncodedImage(d, 40, 56, "s.tar:k", f"f{i}") for i, d in enumerate(data)]
    # the first key frame is also the second sample's reference frame: packed (and decoded) once
    encoded[0].uses = 2
    batch = Batch(
        set_name="track", images=encoded, image_sizes=[(40, 56)] * 2,
        targets=[_targets(0, 40, 56), _targets(1, 40, 56)], labels=torch.tensor([[1, 0], [2, 1]], dtype=torch.int8),
        meta=[{"name": "a", "frame_index": 3}, {"name": "b", "frame_index": None}],
        ref_images=[encoded[1], encoded[0]], ref_targets=[_targets(2, 40, 56), _targets(3, 40, 56)],
        augment=AugmentPlan(height=600, flips=(True, False)), size_divisor=16,
    )
    packed = pack_batch(batch, shared=False)
    # four frame slots, two frames: the shared frame is in the buffer once
    assert [shape for _, _, shape, _ in packed.layout].count((3, 40, 56)) == 2 and len(packed.layout) > 20
    back = pickle.loads(pickle.dumps(packed))
    assert back.images[0].data_ptr() == back.ref_images[1].data_ptr()
    want = replace(batch, images=[jpeg.decode(d) for d in data], ref_images=[jpeg.decode(data[1]), jpeg.decode(data[0])])
    assert _same_batch(back, want)
    # one storage for the whole batch, yet tensors are independent views
    assert len({t.untyped_storage().data_ptr() for t in (back.labels, back.images[0], back.targets[1].boxes)}) == 1
    back.targets[0].boxes.fill_(-1)
    assert torch.equal(back.targets[1].boxes, want.targets[1].boxes)


def test_batches_packed_together_share_a_frame_across_them_decoded_once(monkeypatch):
    """A hand-off's batches are packed together, their frames decoded after all of them are laid
    out: a frame the first batch uses and the second uses again is decoded once and stored once,
    and each batch arrives as it would packed on its own."""
    calls = []
    real = jpeg.decode_into
    monkeypatch.setattr(jpeg, "decode_into", lambda data, out: (calls.append(bytes(data)), real(data, out)))
    data = [_jpeg("RGB", 40, 56, seed=s) for s in range(3)]
    enc = [EncodedImage(d, 40, 56, "s.tar:k", f"f{i}") for i, d in enumerate(data)]
    enc[1].uses = 2  # the first batch's reference frame is the second batch's key frame

    def batch(key: int, ref: int, seed: int) -> Batch:
        return Batch(set_name="track", images=[enc[key]], image_sizes=[(40, 56)], targets=[_targets(seed, 40, 56)],
                     labels=torch.tensor([[1, 0]], dtype=torch.int8), meta=[{"name": f"f{key}"}],
                     ref_images=[enc[ref]], ref_targets=[_targets(seed + 1, 40, 56)])

    batches = [batch(0, 1, 0), batch(1, 2, 5)]
    packed = pack_batches(batches, shared=False)
    assert sorted(calls) == sorted(data), "each frame decoded once"
    # the frame lies once, in the first batch's buffer: the second batch's layout refers to it
    assert sum(len(e) == 4 and e[2] == (3, 40, 56) for p in packed.batches for e in p.layout) == 3
    back = pickle.loads(pickle.dumps(packed))
    assert isinstance(back, list) and len(back) == 2
    for b, got in zip(batches, back):
        dec = [jpeg.decode(data[int(x.frame[1:])]) for x in b.images + b.ref_images]
        assert _same_batch(got, replace(b, images=dec[:1], ref_images=dec[1:]))
    # ... and the second batch's key frame is a view of the first batch's memory (no copy)
    assert back[1].images[0].data_ptr() == back[0].ref_images[0].data_ptr()
    assert enc[1].uses == 0 and enc[1]._pixels is None  # both uses counted, nothing kept
    assert all(_same_batch(u, v) for u, v in zip(packed.unpack(), back))


def test_empty_and_gappy_tensors_round_trip():
    """A frame without people (empty pose tensors) and a tensor whose elements do not tile a
    block (a strided view): the first packs to nothing, the second arrives contiguous."""
    t = _targets(0, 8, 8)
    gappy = torch.arange(24, dtype=torch.float32).reshape(3, 8)[:, ::2]
    t.boxes, t.keypoints, t.pose_boxes = gappy, torch.zeros(0, 18, 3), torch.zeros(0, 4)
    # a decoded frame: a [3, H, W] view of [H, W, 3] memory, large enough to be copied on its own
    frame = torch.randint(0, 256, (128, 256, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).permute(2, 0, 1)
    batch = Batch(set_name="det", images=[frame], image_sizes=[(128, 256)],
                  targets=[t], labels=torch.zeros(1, 10, dtype=torch.int8))
    back = pickle.loads(pickle.dumps(pack_batch(batch, shared=False)))
    assert back.images[0].stride() == frame.stride() and torch.equal(back.images[0], frame)
    got = back.targets[0]
    assert got.boxes.is_contiguous() and torch.equal(got.boxes, gappy)
    assert got.keypoints.shape == (0, 18, 3) and got.pose_boxes.shape == (0, 4)
    assert _same_batch(back, replace(batch, targets=[replace(t, boxes=gappy.contiguous())]))


def test_padded_batches_and_dtypes_numpy_lacks_round_trip():
    # a padded image batch, larger than the block the small tensors are joined into
    batch = Batch(set_name="det", images=torch.arange(2 * 3 * 96 * 128, dtype=torch.uint8).reshape(2, 3, 96, 128),
                  image_sizes=[(96, 128)] * 2, targets=[_targets(0, 96, 128), FrameTargets()],
                  labels=torch.zeros(2, 10, dtype=torch.int8))
    assert _same_batch(pickle.loads(pickle.dumps(batch)), batch)
    bf = replace(batch, images=batch.images.to(torch.bfloat16))  # no numpy dtype: pickled field by field
    assert pack_batch(bf).layout == () and _same_batch(pickle.loads(pickle.dumps(bf)), bf)


def test_in_process_batches_hold_the_shards_frames_decoded(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(64,)))
    track = [f for f in fams if f.set_name == "track"]
    frames = {}  # (video, frame index) -> the frame as torchvision decodes the shard's JPEG
    for url in track[0].urls:
        for sample in iter_shard(url):
            for i, f in enumerate(decode_clip(sample)):
                tv = torch.from_numpy(_torchvision(bytes(sample[f"{i}.jpg"]))).permute(2, 0, 1)
                assert torch.equal(f.image, tv)
                frames[f.record["video"], f.record["frame_index"]] = tv
    n = 0
    for b in MultiSetDataset(track, cfg, rank=0, world_size=1):
        for img, ref, m in zip(b.images, b.ref_images, b.meta):
            assert isinstance(img, torch.Tensor) and torch.equal(img, frames[m["video"], m["frame_index"]])
            assert torch.equal(ref, frames[m["video"], m["ref_frame_index"]])
            n += 1
    assert n > 4


def test_track_frames_are_decoded_once_however_often_they_are_used(tiny_shards, monkeypatch):
    """A tracking frame is one sample's key frame and often another's reference frame: the
    loader decodes each frame it uses once (not once per use)."""
    calls = []
    real = jpeg.decode_into
    monkeypatch.setattr(jpeg, "decode_into", lambda data, out: (calls.append(bytes(data)), real(data, out)))
    track = [f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "track"]
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(64,)))
    uses = 0
    for b in MultiSetDataset(track, cfg, rank=0, world_size=1):
        uses += len(b.images) + len(b.ref_images)
    assert len(calls) == len(set(calls)), "no frame decoded twice"
    assert uses > len(calls), "some frames served twice from one decode"


def test_through_a_worker_track_frames_are_decoded_once_and_arrive_intact(tiny_shards, monkeypatch, tmp_path):
    """Through a DataLoader worker a frame's second use is copied from the shared-memory
    segment its first batch went out in, while the worker has not reclaimed that segment; the
    batches equal those the loader makes in process, and no frame is decoded twice."""
    from data_pipeline.loading.loader import build_train_loader

    log = tmp_path / "decodes.txt"
    real = jpeg.decode_into

    def logged(data, out):  # the worker is forked: it runs this and appends to the file
        with open(log, "a") as f:
            f.write(f"{hash(bytes(data))}\n")
        real(data, out)

    track = [f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "track"]
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(64,)))
    want = [(b.meta, [x.clone() for x in b.images + b.ref_images]) for b in MultiSetDataset(track, cfg, rank=0, world_size=1)]
    monkeypatch.setattr(jpeg, "decode_into", logged)
    ds = MultiSetDataset(track, replace(cfg, num_workers=1, prefetch_factor=2), rank=0, world_size=1)
    got = [(b.meta, list(b.images + b.ref_images)) for b in build_train_loader(ds)]
    assert len(got) == len(want) > 3
    for (m1, x1), (m2, x2) in zip(want, got):
        assert m1 == m2 and all(torch.equal(a, b) for a, b in zip(x1, x2))
    decodes = log.read_text().split()
    assert len(decodes) == len(set(decodes)) and len(decodes) < sum(len(x) for _, x in got)


def test_a_key_frame_without_neighbours_is_its_own_reference_decoded_once(tiny_shards, tmp_path, monkeypatch):
    import json

    from webdataset.writer import TarWriter

    from data_pipeline.loading.loader import ShardFamily

    track = next(f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "track")
    sample = next(iter_shard(track.urls[0]))
    clip = json.loads(sample["clip.json"])
    single = {"__key__": sample["__key__"], "clip.json": json.dumps(dict(clip, frames=clip["frames"][:1])).encode()}
    single.update({k: bytes(v) for k, v in sample.items() if k.startswith("0.")})
    url = str(tmp_path / "single.tar")
    with open(url, "wb") as f, TarWriter(f, encoder=False, mtime=0) as w:
        w.write(single)
    calls = []
    real = jpeg.decode_into
    monkeypatch.setattr(jpeg, "decode_into", lambda data, out: (calls.append(1), real(data, out)))
    fam = ShardFamily(set_name="track", split="train", urls=(url,), shard_frames=(1,))
    cfg = LoaderConfig(batch_size=1, num_workers=0, augment=AugmentConfig(scales=(64,)))
    (b,) = list(MultiSetDataset([fam], cfg, rank=0, world_size=1))
    assert b.meta[0]["ref_frame_index"] == b.meta[0]["frame_index"]
    assert torch.equal(b.images[0], b.ref_images[0]) and len(calls) == 1
