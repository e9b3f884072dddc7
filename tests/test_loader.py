"""Generated dataset → shards → loader: labels come back exactly; batches are balanced across ranks.

The expected labels are read straight from the BDD100K files with json/PIL here, independently
of the converter and the decoder.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.bdd100k import format as bdd100k
from data_pipeline.bdd100k.format import Layout
from data_pipeline.loading.decode import decode_clip
from data_pipeline.errors import DataError
from data_pipeline.loading.loader import (
    LoaderConfig,
    MultiSetDataset,
    ShardFamily,
    build_train_loader,
    handoff_steps,
    iter_frames,
    iter_shard,
)
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.loading.structures import AugmentPlan, Batch, LabelSource
from data_pipeline.loading.config import AugmentConfig
from data_pipeline.loading.transforms import prepare_batch

NO_AUG = AugmentConfig(scales=(), flip_prob=0.0)


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _box(label) -> list[float]:
    """Scalabel box2d is inclusive (x2 = last pixel); targets use continuous coordinates."""
    b = label["box2d"]
    return [b["x1"], b["y1"], b["x2"] + 1, b["y2"] + 1]


def _instances_from_json(labels) -> list[tuple]:
    out = []
    for lab in labels:
        cat = lab["category"]
        if cat in bdd100k.STUFF_DET_CATEGORIES:
            continue
        attrs = lab.get("attributes", {})
        cls = bdd100k.THING_TO_ID[bdd100k.IGNORE_MAP.get(cat, cat)]
        ignore = cat in bdd100k.IGNORE_MAP or bool(attrs.get("crowd")) or bool(attrs.get("ignored"))
        out.append((cls, tuple(np.float32(_box(lab)).tolist()), ignore))
    return out


def _instances_from_bitmask(rgba: np.ndarray) -> dict[int, tuple]:
    f = bdd100k.decode_bitmask(rgba)
    out = {}
    for iid in np.unique(f["instance"][f["category"] > 0]):
        m = f["instance"] == iid
        ys, xs = np.nonzero(m)
        cls = int(f["category"][m][0]) - 1
        ignore = bool(f["crowd"][m].any() or f["ignore"][m].any())
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out[int(iid)] = (cls, box, ignore, m.astype(np.uint8))
    return out


def expected_frames(root: str, split: str = "train") -> dict[str, dict]:
    """name → expected labels, from the BDD100K files of ``root``."""
    r = Path(root)
    exp: dict[str, dict] = {}
    for fr in json.loads((r / Layout.det_json(split)).read_text()):
        stem = fr["name"][:-4]
        a = fr["attributes"]
        exp[fr["name"]] = {
            "weather": bdd100k.WEATHERS.index(a["weather"]),
            "scene": bdd100k.SCENES.index(a["scene"]),
            "instances": sorted(_instances_from_json(fr["labels"])),
            "drivable": _png(r / Layout.drivable_masks(split) / f"{stem}.png"),
            "lane": _png(r / Layout.lane_masks(split) / f"{stem}.png"),
            "pose": None,
        }
    joints = {j: k for k, j in enumerate(bdd100k.POSE_JOINTS)}
    for fr in json.loads((r / Layout.pose_json(split)).read_text()):
        kps = []
        for lab in fr["labels"]:
            k = np.zeros((18, 3), np.float32)
            for n in lab["graph"]["nodes"]:
                k[joints[n["category"]]] = [*n["location"], 2 if n["visibility"] == "V" else 1]
            kps.append(k)
        exp[fr["name"]]["pose"] = np.stack(kps) if kps else np.zeros((0, 18, 3), np.float32)
    for p in sorted((r / Layout.sem_masks(split)).glob("*.png")):
        inst = _instances_from_bitmask(_png(r / Layout.ins_bitmasks(split) / p.name))
        exp[p.stem + ".jpg"] = {
            "sem": _png(p),
            "instances": sorted((c, b, i) for c, b, i, _ in inst.values()),
            "masks": {(c, b): m for c, b, _, m in inst.values()},
        }
    for vid in sorted((r / Layout.box_track_dir(split)).glob("*.json")):
        for fr in json.loads(vid.read_text()):
            exp[fr["name"]] = {
                "tracks": sorted(
                    (int(lab["id"]), bdd100k.THING_TO_ID[bdd100k.IGNORE_MAP.get(lab["category"], lab["category"])],
                     tuple(np.float32(_box(lab)).tolist()))
                    for lab in fr["labels"] if lab["category"] not in bdd100k.STUFF_DET_CATEGORIES
                )
            }
    for vdir in sorted((r / Layout.seg_track_bitmasks(split)).iterdir()):
        for p in sorted(vdir.glob("*.png")):
            inst = _instances_from_bitmask(_png(p))
            exp[p.stem + ".jpg"] = {
                "tracks": sorted((iid, c, b) for iid, (c, b, _, _) in inst.items()),
                "track_masks": {iid: m for iid, (_, _, _, m) in inst.items()},
            }
    return exp


def _same(got: list[tuple], want: list[tuple], box_at: int) -> bool:
    """Equal lists of label tuples; the box (float32 after a flip) compared to 1e-4 px."""
    return len(got) == len(want) and all(
        g[:box_at] + g[box_at + 1:] == w[:box_at] + w[box_at + 1:] and np.allclose(g[box_at], w[box_at], atol=1e-4, rtol=0)
        for g, w in zip(got, want)
    )


def check_targets(name: str, t, e: dict, width: int, flip: bool) -> None:
    """Assert that decoded targets ``t`` equal the expected labels ``e`` (flipped if ``flip``)."""

    def fb(b):  # expected box after an optional flip
        x1, y1, x2, y2 = b
        return (width - x2, y1, width - x1, y2) if flip else (x1, y1, x2, y2)

    def fm(m):
        return np.ascontiguousarray(m[..., ::-1]) if flip else m

    if "weather" in e:
        assert (t.weather, t.scene) == (e["weather"], e["scene"]), name
        assert np.array_equal(t.drivable.numpy(), fm(e["drivable"])), name
        assert np.array_equal(t.lane.numpy(), fm(e["lane"])), name
    if "instances" in e:
        got = sorted(zip(t.classes.tolist(), map(tuple, t.boxes.tolist()), t.ignore.tolist()))
        want = sorted((c, tuple(np.float32(fb(b)).tolist()), i) for c, b, i in e["instances"])
        assert _same(got, want, box_at=1), name
    if "masks" in e:
        assert np.array_equal(t.sem.numpy(), fm(e["sem"])), name
        masks = t.instance_masks()
        for k in range(t.num_instances):
            key = (int(t.classes[k]), tuple(np.float32(fb(t.boxes[k].tolist())).tolist()))
            assert np.array_equal(masks[k].numpy(), fm(e["masks"][key]).astype(bool)), name
    if e.get("pose") is not None:
        k = e["pose"].copy()
        if flip:
            names = list(bdd100k.POSE_JOINTS)
            swap = [names.index(n.replace("left_", "R_").replace("right_", "left_").replace("R_", "right_")) for n in names]
            k = k[:, swap]
            k[..., 0] = np.where(k[..., 2] > 0, width - k[..., 0], 0)
        assert np.allclose(t.keypoints.numpy(), k, atol=1e-4), name
    if "tracks" in e:
        got = sorted(zip(t.track_ids.tolist(), t.classes.tolist(), map(tuple, t.boxes.tolist())))
        want = sorted((i, c, tuple(np.float32(fb(b)).tolist())) for i, c, b in e["tracks"])
        assert _same(got, want, box_at=2), name
    if "track_masks" in e:
        masks = t.instance_masks()
        for k, tid in enumerate(t.track_ids.tolist()):
            assert np.array_equal(masks[k].numpy(), fm(e["track_masks"][tid]).astype(bool)), name


def test_every_frame_round_trips_through_the_shards(tiny_root, tiny_shards):
    exp = expected_frames(tiny_root)
    seen = set()
    for fam in families_from_manifest(tiny_shards, "train"):
        for f in iter_frames(fam.urls):
            name = f.record["name"]
            check_targets(name, f.targets, exp[name], f.image.shape[-1], flip=False)
            image = np.asarray(Image.open(_image_path(tiny_root, f.record, fam.set_name)).convert("RGB"))
            assert np.array_equal(f.image.permute(1, 2, 0).numpy(), image), name
            seen.add(name)
    assert seen == set(exp), "every labelled frame of the train split is in the shards"


def _image_path(root: str, rec: dict, set_name: str) -> Path:
    r = Path(root)
    if set_name == "det":
        return r / Layout.images_100k("train") / rec["name"]
    if set_name == "seg":
        return r / Layout.images_10k("train") / rec["name"]
    for base in (Layout.images_track("train"), Layout.images_seg_track("train")):
        p = r / base / rec["video"] / rec["name"]
        if p.exists():
            return p
    raise FileNotFoundError(rec["name"])


@pytest.mark.parametrize("flip", [False, True])
def test_training_batches_carry_the_original_labels(tiny_root, tiny_shards, flip):
    exp = expected_frames(tiny_root)
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(), flip_prob=float(flip)))
    ds = MultiSetDataset(families_from_manifest(tiny_shards, "train"), cfg, rank=0, world_size=1)
    checked = Counter()
    for batch in ds:
        assert batch.augment is not None and batch.augment.flips == (flip,) * len(batch)
        batch = prepare_batch(batch)
        for i, t in enumerate(batch.targets):
            name = batch.meta[i]["name"]
            check_targets(name, t, exp[name], batch.image_sizes[i][1], flip=flip)
            # label presence comes through per task
            assert batch.labels[i].tolist().count(int(LabelSource.REAL)) >= 1
            checked[batch.set_name] += 1
        if batch.set_name == "track":
            assert batch.ref_images is not None and len(batch.ref_targets) == len(batch)
            for m in batch.meta:
                assert 0 < abs(m["ref_frame_index"] - m["frame_index"]) <= cfg.ref_range
    assert set(checked) == {"det", "seg", "track"}


def test_flip_twice_is_identity(tiny_shards):
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(), flip_prob=1.0))
    ds = MultiSetDataset(families_from_manifest(tiny_shards, "train"), cfg, rank=0, world_size=1)
    for batch in ds:
        plain = prepare_batch(replace(batch, augment=None))  # padded, not augmented
        once = prepare_batch(batch)
        twice = prepare_batch(replace(once, augment=AugmentPlan(height=None, flips=(True,) * len(batch))))
        assert torch.equal(twice.images, plain.images)
        assert not torch.equal(once.images, plain.images)
        for a, b in zip(batch.targets + (batch.ref_targets or []), twice.targets + (twice.ref_targets or [])):
            a = a.expanded()  # the loader's run-length maps
            for field in ("boxes", "keypoints", "pose_boxes"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.allclose(x, y, atol=1e-4)
            for field in ("instance_map", "sem", "drivable", "lane", "classes", "track_ids", "ignore", "mask_valid"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None and y is None) or torch.equal(x, y)


def test_multiscale_resizes_images_and_labels_consistently(tiny_shards):
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=AugmentConfig(scales=(48,), flip_prob=0.0))
    ds = MultiSetDataset(families_from_manifest(tiny_shards, "train"), cfg, rank=0, world_size=1)
    batch = next(iter(ds))
    (h0, w0) = batch.image_sizes[0]
    out = prepare_batch(batch)
    h, w = out.image_sizes[0]
    assert h == 48 and w == round(w0 * 48 / h0)
    assert out.images.shape[-2] % 32 == 0 and out.images.shape[-1] % 32 == 0
    t0, t1 = batch.targets[0].expanded(), out.targets[0]
    if t0.boxes is not None and t0.num_instances:
        assert torch.allclose(t1.boxes, t0.boxes * torch.tensor([w / w0, h / h0, w / w0, h / h0]))
    for field in ("drivable", "sem", "lane", "instance_map"):
        m = getattr(t1, field)
        if m is not None:
            assert tuple(m.shape) == (h, w)
            assert set(m.unique().tolist()) <= set(getattr(t0, field).unique().tolist())  # nearest: no new values


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_gets_the_same_number_of_batches(tiny_shards, world_size):
    fams = families_from_manifest(tiny_shards, "train")
    shard_counts = {f.set_name: len(f.urls) for f in fams}
    assert len(set(shard_counts.values())) > 1, f"fixture should have unequal shard counts: {shard_counts}"
    cfg = LoaderConfig(batch_size=2, num_workers=2, augment=NO_AUG)
    per_rank_sets, per_rank_names = [], []
    for rank in range(world_size):
        ds = MultiSetDataset(fams, cfg, rank=rank, world_size=world_size)
        ds.set_epoch(1)
        batches = list(build_train_loader(ds))
        assert len(batches) == len(ds) > 0
        per_rank_sets.append([b.set_name for b in batches])
        per_rank_names.append([m["name"] for b in batches for m in b.meta])
    assert all(s == per_rank_sets[0] for s in per_rank_sets), "ranks step through the same sets in the same order"
    assert per_rank_names[0] != per_rank_names[1], "ranks see different data"


@pytest.mark.parametrize(("world_size", "workers"), [(1, 1), (2, 2), (3, 2)])
def test_an_epoch_takes_every_frame_at_most_once_across_ranks_and_workers(tiny_shards, world_size, workers):
    # unequal shard counts and sizes (track: a shard of 8 clips' frames next to one of 2): no
    # worker runs out of its shards and repeats frames while another leaves frames out
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=workers, augment=NO_AUG, handoff_batches=2)
    taken = Counter()
    for rank in range(world_size):
        ds = MultiSetDataset(fams, cfg, rank=rank, world_size=world_size)
        ds.set_epoch(2)
        taken.update((b.set_name, m["name"]) for b in build_train_loader(ds) for m in b.meta)
    assert max(taken.values()) == 1, [k for k, n in taken.items() if n > 1]
    for f in fams:
        got = sum(1 for s, _ in taken if s == f.set_name)
        assert got == ds.batches_per_set()[f.set_name] * world_size * cfg.batch_size
        assert f.frames - got < world_size * cfg.batch_size, "only the last partial global batch is left out"


def test_a_part_beginning_inside_a_shard_starts_reading_at_its_first_sample(tiny_shards, monkeypatch):
    from data_pipeline.loading import loader

    fams = families_from_manifest(tiny_shards, "train")
    offsets = []
    real = loader.iter_shard
    monkeypatch.setattr(loader, "iter_shard", lambda url, offset=0: (offsets.append(offset), real(url, offset))[1])
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG)

    def epoch(families):
        return [[m["name"] for b in MultiSetDataset(families, cfg, rank=r, world_size=3) for m in b.meta] for r in range(3)]

    with_sizes = epoch(fams)
    assert any(offsets), "some part begins inside a shard"
    offsets.clear()
    assert epoch([replace(f, shard_clip_frames=(), shard_sample_offsets=()) for f in fams]) == with_sizes  # read over
    assert not any(offsets)


def test_the_workers_of_an_epoch_read_each_sample_of_a_set_once(tiny_shards, monkeypatch):
    # a shuffle buffer larger than any part: each worker reads all of its range, and no more
    from data_pipeline.loading import loader

    (det,) = families_from_manifest(tiny_shards, "train", sets=("det",))
    read = Counter()
    real = loader.iter_shard

    def counting(url, offset=0):
        for sample in real(url, offset):
            read[(url, sample["__key__"])] += 1
            yield sample

    monkeypatch.setattr(loader, "iter_shard", counting)
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, shuffle_buffer=64)
    for rank in range(3):
        list(MultiSetDataset([det], cfg, rank=rank, world_size=3))
    assert len(read) == det.frames and set(read.values()) == {1}


def test_required_tasks_split_the_labelled_frames_over_the_workers(tiny_shards):
    fams = [f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "track"]
    mots = fams[0].task_frames["mots"]
    assert 0 < mots < fams[0].frames and 0 in fams[0].shard_eligible(("mots",))
    cfg = LoaderConfig(batch_size=1, num_workers=2, augment=NO_AUG, require_tasks={"track": ("mots",)})
    taken = Counter()
    for rank in range(2):
        ds = MultiSetDataset(fams, cfg, rank=rank, world_size=2)
        for b in build_train_loader(ds):
            assert bool(b.has("mots").all())
            taken.update(m["name"] for m in b.meta)
    assert max(taken.values()) == 1 and sum(taken.values()) == mots // 2 * 2


def test_eligible_frames_count_frames_labelled_for_every_required_task():
    fam = ShardFamily(set_name="det", split="train", urls=("a", "b"), shard_frames=(5, 4), shard_label_sets=(
        {frozenset({"det", "pose"}): 1, frozenset({"det", "lane"}): 2, frozenset({"pose"}): 2},
        {frozenset({"det", "lane", "pose"}): 3, frozenset(): 1},
    ))
    assert fam.shard_eligible(("pose", "lane")) == (0, 3)  # not min(3, 2) = 2 in the first shard
    assert fam.shard_eligible(("det",)) == (3, 3) and fam.shard_eligible(()) == (5, 4)
    assert fam.task_frames == {"det": 6, "pose": 6, "lane": 5}
    with pytest.raises(ValueError, match="do not add up"):
        replace(fam, shard_frames=(5, 5))


def test_several_required_tasks_take_each_frame_labelled_for_all_of_them_once(tiny_root, tmp_path):
    """Frames labelled for pose but not for lanes, and the other way round, in the same shards:
    the key frames of an epoch are exactly those labelled for both, each taken once."""
    import shutil

    from data_pipeline.bdd100k.convert import ConvertOptions, convert

    root = tmp_path / "bdd100k"
    shutil.copytree(tiny_root, root)
    lanes = sorted((root / Layout.lane_masks("train")).glob("*.png"))
    for mask in lanes[::2]:
        mask.unlink()
    out = tmp_path / "shards"
    convert(ConvertOptions(bdd_root=str(root), out=str(out), sets=("det",), splits=("train",), shard_size=3,
                           workers=1, progress=False))
    (det,) = families_from_manifest(str(out), "train")
    both = set()
    for url in det.urls:
        for sample in iter_shard(url):
            for rec in json.loads(sample["clip.json"])["frames"]:
                if {"pose", "lane"} <= set(rec["tasks"]):
                    both.add(rec["name"])
    assert det.eligible_frames(("pose", "lane")) == len(both) > 0
    per_task = det.task_frames
    assert min(per_task["pose"], per_task["lane"]) > len(both)  # the case where counting per task overcounts

    cfg = LoaderConfig(batch_size=1, num_workers=2, augment=NO_AUG, require_tasks={"det": ("pose", "lane")})
    taken = Counter()
    for rank in range(2):
        for b in build_train_loader(MultiSetDataset([det], cfg, rank=rank, world_size=2)):
            taken.update(m["name"] for m in b.meta)
    assert set(taken) <= both and max(taken.values()) == 1
    assert sum(taken.values()) == len(both) // 2 * 2


@pytest.mark.parametrize("bad", [{"clip_frames": [1, 1]}, {"clip_frames": None}, {"tasks": None}, {"label_sets": None},
                                 {"label_sets": {"sem,ins": 1}},
                                 {"sample_offsets": [0, 2048]}, {"sample_offsets": [0, 4096, 2048]}])
def test_a_shard_entry_the_loader_cannot_use_names_the_manifest_and_field(tiny_shards, tmp_path, bad):
    manifest = json.loads((Path(tiny_shards) / "manifest.json").read_text())
    entry = manifest["sets"]["seg/train"]["shards"][1]
    for k, v in bad.items():
        if v is None:
            del entry[k]
        else:
            entry[k] = v
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as e:
        families_from_manifest(str(tmp_path), "train")
    assert e.value.file == str(tmp_path / "manifest.json") and e.value.field.startswith("sets.seg/train.shards")


def test_label_sets_naming_an_unknown_task_are_an_error(tiny_shards, tmp_path):
    manifest = json.loads((Path(tiny_shards) / "manifest.json").read_text())
    entry = manifest["sets"]["seg/train"]["shards"][1]
    entry["label_sets"] = {"ins,sem,warp": entry["samples"]}  # counts right, one task unknown
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"unknown tasks \['warp'\]") as e:
        families_from_manifest(str(tmp_path), "train")
    assert e.value.field == "sets.seg/train.shards.label_sets"


def test_a_shard_with_fewer_frames_than_the_manifest_counts_is_an_error(tiny_shards):
    (det,) = families_from_manifest(tiny_shards, "train", sets=("det",))
    lying = replace(det, urls=det.urls[:1], shard_frames=(det.shard_frames[0] + 2,), shard_label_sets=(), shard_clip_frames=(),
                    shard_sample_offsets=())
    ds = MultiSetDataset([lying], LoaderConfig(batch_size=1, num_workers=0, augment=NO_AUG), rank=0, world_size=1)
    with pytest.raises(DataError, match=r"truncated: 3 of 5 frames \(the shard ends after a complete sample") as e:
        list(ds)
    assert e.value.file == det.urls[0]


@pytest.mark.parametrize("steps", [0, 1, 7, 24])
@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 3, 4])
def test_handoffs_taken_from_the_workers_in_turn_are_the_steps_in_order(steps, workers, size):
    # the DataLoader's order: one item from each worker still running, in turn
    queues = [list(handoff_steps(steps, w, workers, size)) for w in range(workers)]
    taken = []
    while any(queues):
        for q in queues:
            if q:
                taken.extend(q.pop(0))
    assert taken == list(range(steps))
    counts = [sum(len(r) for r in handoff_steps(steps, w, workers, size)) for w in range(workers)]
    assert max(counts) - min(counts) <= size, "the work is spread evenly over the workers"
    for w in range(min(workers, steps)):  # a worker's first hand-off is one step: the epoch starts at once
        assert next(handoff_steps(steps, w, workers, size)) == range(w, w + 1)
    assert all(len(r) == size for w in range(workers) for r in list(handoff_steps(steps, w, workers, size))[1:-1])


@pytest.mark.parametrize(("workers", "handoff"), [(2, 3), (3, 1)])
def test_workers_hand_over_the_batches_in_step_order(tiny_shards, workers, handoff):
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=workers, handoff_batches=handoff, augment=NO_AUG)
    ds = MultiSetDataset(fams, cfg, rank=0, world_size=1)
    assert len(ds) > workers * handoff, "every worker hands over at least once"
    it = iter(build_train_loader(ds))
    assert len(it) == len(ds)
    batches = list(it)
    assert [b.meta[0]["step"] for b in batches] == list(range(len(ds)))
    assert [b.set_name for b in batches] == ds.schedule()


def test_a_plain_dataloader_gets_the_same_batches_one_per_item(tiny_shards):
    # e.g. a framework that rebuilds the DataLoader around the dataset: no hand-offs, no pool
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=2, augment=NO_AUG)
    ds = MultiSetDataset(fams, cfg, rank=0, world_size=1)
    list(build_train_loader(ds))  # leaves no pool behind for the next loader
    plain = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    # a worker's data depends on which steps it makes: the same as with hand-offs of one batch
    fast = list(build_train_loader(MultiSetDataset(fams, replace(cfg, handoff_batches=1), rank=0, world_size=1)))
    assert all(isinstance(b, Batch) for b in plain)
    assert [b.meta[0]["step"] for b in plain] == list(range(len(ds)))
    assert [[m["name"] for m in b.meta] for b in plain] == [[m["name"] for m in b.meta] for b in fast]
    for a, b in zip(plain, fast):
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))


def test_a_spawned_worker_makes_the_same_batches(tiny_shards):
    # spawn (or forkserver): the worker gets the dataset pickled, not a forked copy
    fams = families_from_manifest(tiny_shards, "train")
    cfg = LoaderConfig(batch_size=2, num_workers=1, augment=NO_AUG, handoff_batches=1)
    ds = MultiSetDataset(fams, cfg, rank=0, world_size=1)
    spawned = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    forked = list(build_train_loader(ds))
    assert len(spawned) == len(forked) == len(ds)
    for a, b in zip(spawned, forked):
        assert [m["name"] for m in a.meta] == [m["name"] for m in b.meta]
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
        assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(a.targets, b.targets))


def test_batches_are_deterministic_by_seed_and_epoch(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")

    def names(epoch, seed=0):
        ds = MultiSetDataset(fams, LoaderConfig(batch_size=2, num_workers=2, seed=seed, augment=AugmentConfig(scales=(64, 96))), rank=0, world_size=1)
        ds.set_epoch(epoch)
        return [(b.set_name, tuple(m["name"] for m in b.meta), b.augment) for b in build_train_loader(ds)]

    assert names(0) == names(0)
    assert names(0) != names(1)
    assert names(0) != names(0, seed=1)


def test_augmentation_draws_depend_on_the_step_not_on_the_worker_split(tiny_shards):
    fams = families_from_manifest(tiny_shards, "train")
    aug = AugmentConfig(scales=(64, 96, 128), flip_prob=0.5)

    def plans(workers, rank=0):
        ds = MultiSetDataset(fams, LoaderConfig(batch_size=2, num_workers=workers, augment=aug), rank=rank, world_size=2)
        return [b.augment for b in build_train_loader(ds)]

    one = plans(0)
    assert one == plans(2) == plans(3)
    assert {p.height for p in one} <= set(aug.scales) and len({p.height for p in one}) > 1
    assert {f for p in one for f in p.flips} == {True, False}
    assert plans(0, rank=1) != one, "ranks draw their own augmentation"


def test_require_tasks_restricts_track_set_to_the_mots_subset(tiny_shards):
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, require_tasks={"track": ("mots",)})
    fams = [f for f in families_from_manifest(tiny_shards, "train") if f.set_name == "track"]
    ds = MultiSetDataset(fams, cfg, rank=0, world_size=1)
    assert len(ds) == fams[0].task_frames["mots"] // 2
    for batch in ds:
        assert bool(batch.has("mots").all())


def test_loader_reads_from_an_fsspec_uri(tiny_root):
    from data_pipeline.bdd100k.convert import ConvertOptions, convert

    convert(ConvertOptions(bdd_root=tiny_root, out="memory://vtd-test/shards", sets=("seg",), splits=("train",),
                           shard_size=4, progress=False, overwrite=True))
    fams = families_from_manifest("memory://vtd-test/shards", "train")
    assert fams[0].urls[0].startswith("memory://") and len(fams[0].shard_frames) > 1
    names = []
    for rank in range(2):  # rank 1's part begins inside a shard: it seeks in the fsspec file
        ds = MultiSetDataset(fams, LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG), rank=rank, world_size=2)
        names += [m["name"] for b in ds for m in b.meta]
    assert len(set(names)) == len(names) == fams[0].frames // 4 * 4 > 0


def test_decoder_refuses_pickles_and_unknown_members(tiny_shards, tmp_path):
    fam = families_from_manifest(tiny_shards, "train")[0]
    sample = next(iter_shard(fam.urls[0]))
    evil = dict(sample, **{"0.pyd": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."})
    with pytest.raises(DataError, match=r"unexpected member '0\.pyd'"):
        decode_clip(evil)
    broken = dict(sample, **{"clip.json": b"{not json"})
    with pytest.raises(DataError, match="malformed JSON"):
        decode_clip(broken)
    for not_a_clip in (b"[]", b'{"frames": {}}', b'{"frames": [1]}'):
        with pytest.raises(DataError, match="not a clip") as e:
            decode_clip(dict(sample, **{"clip.json": not_a_clip}))
        assert e.value.field == "clip.json"
    corrupt = dict(sample, **{"0.jpg": b"\xff\xd8\xff\xe0garbage"})
    with pytest.raises(DataError, match="corrupt JPEG") as e:
        decode_clip(corrupt)
    assert fam.urls[0] in str(e.value)
