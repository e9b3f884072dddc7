"""BDD100K root → WebDataset shards (data_pipeline.bdd100k.convert) and the shard reader (inspect).

The fixture is a hand-written miniature BDD100K root (real layout, real encodings) whose
contents are spelled out below, so every expected count here can be checked by reading it.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.bdd100k import format as B
from data_pipeline.bdd100k import convert as convert_mod
from data_pipeline import fsio
from data_pipeline.bdd100k.convert import ConvertOptions, convert
from data_pipeline.shards.format import decode_label_map
from data_pipeline.errors import DataError
from data_pipeline.shards.inspect import inspect_shards

W, H = 32, 24  # every image of the fixture


# ---------------------------------------------------------------------------------------------
# Fixture: a miniature BDD100K root
# ---------------------------------------------------------------------------------------------


def _jpeg(path: Path, seed: int, size=(W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=90)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _box(x1, y1, x2, y2):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}


def _bitmask(instances: list[tuple[int, int, tuple[int, int, int, int], int]]) -> np.ndarray:
    """[(category id 1..8, instance id, (x1, y1, x2, y2) inclusive pixels, crowd)] → RGBA."""
    cat = np.zeros((H, W), np.int32)
    inst = np.zeros((H, W), np.int32)
    crowd = np.zeros((H, W), np.int32)
    for c, i, (x1, y1, x2, y2), cr in instances:
        cat[y1:y2 + 1, x1:x2 + 1] = c
        inst[y1:y2 + 1, x1:x2 + 1] = i
        crowd[y1:y2 + 1, x1:x2 + 1] = cr
    return B.encode_bitmask(cat, inst, crowd=crowd)


SEG_S1_INSTANCES = [(3, 1, (3, 2, 8, 5), 0), (1, 2, (20, 10, 25, 12), 1)]  # car; crowd pedestrian
SEG_TRACK_INSTANCES = [(3, 5, (1, 1, 6, 6), 0), (2, 300, (10, 3, 14, 9), 0)]  # car id 5; rider id 300


def make_bdd(root: Path) -> Path:
    """det/train: frames a, b, c (det_20), p (pose only), m (drivable only); u is unlabelled.
    seg/train: s1 (sem + ins), s2 (sem); s3 unlabelled.
    track/train: vid1 (frameIndex 0 1 2 3 5, ids "7"/"9"), vid2 (0 1 2, ids "abc"/"xyz"),
    seg_track vid3 (3 frames, bitmask ids 5 and 300)."""
    img = root / "images"
    for seed, n in enumerate("abcpmu"):
        _jpeg(img / "100k/train" / f"{n}.jpg", seed)
    _json(root / B.Layout.det_json("train"), [
        {"name": "a.jpg", "attributes": {"weather": "clear", "scene": "city street", "timeofday": "daytime"},
         "labels": [
             {"id": "1", "category": "car", "box2d": _box(1, 2, 10, 12)},
             {"id": "2", "category": "other vehicle", "box2d": _box(12, 2, 20, 10)},
             {"id": "3", "category": "traffic light", "box2d": _box(25, 0, 28, 6)},
             {"id": "4", "category": "pedestrian", "attributes": {"crowd": True, "occluded": True},
              "box2d": _box(2, 14, 8, 23)},
         ]},
        {"name": "b.jpg", "labels": [
            {"id": "5", "category": "trailer", "box2d": _box(4, 4, 30, 20),
             "poly2d": [{"vertices": [[1, 1], [5, 5]], "types": "LL", "closed": False}]},
        ]},
        {"name": "c.jpg", "attributes": {"weather": "rainy", "scene": "highway", "timeofday": "night"}},
    ])
    _json(root / B.Layout.pose_json("train"), [
        {"name": "a.jpg", "labels": [{"id": "40", "category": "pedestrian", "graph": {"type": B.POSE_GRAPH_TYPE, "nodes": [
            {"location": [5, 3], "category": "head", "visibility": "V"},
            {"location": [6, 9], "category": "neck", "visibility": "N"},
            {"location": [4, 20], "category": "left_foot", "visibility": "V"},
        ], "edges": []}}]},
        {"name": "p.jpg", "labels": [{"id": "41", "category": "pedestrian", "box2d": _box(1, 1, 9, 20),
                                      "graph": {"nodes": [{"location": [3, 3], "category": "head", "visibility": "V"}]}}]},
    ])
    drivable = np.full((H, W), 2, np.uint8)
    drivable[12:, :] = 0
    drivable[12:, 20:] = 1
    for n in "abm":
        _png(root / B.Layout.drivable_masks("train") / f"{n}.png", drivable)
    lane = np.full((H, W), B.LANE_BACKGROUND, np.uint8)
    lane[:, 10] = B.encode_lane(6, 0, 1)
    _png(root / B.Layout.lane_masks("train") / "a.png", lane)

    for seed, n in enumerate(("s1", "s2", "s3")):
        _jpeg(img / "10k/train" / f"{n}.jpg", 100 + seed)
    sem = np.zeros((H, W), np.uint8)
    sem[:8] = 10
    sem[20:, :4] = 255
    for n in ("s1", "s2"):
        _png(root / B.Layout.sem_masks("train") / f"{n}.png", sem)
    _png(root / B.Layout.ins_bitmasks("train") / "s1.png", _bitmask(SEG_S1_INSTANCES))

    vid1 = []
    for idx in (0, 1, 2, 3, 5):
        name = f"vid1-{idx + 1:07d}.jpg"
        _jpeg(img / "track/train/vid1" / name, 200 + idx)
        labels = [{"id": "7", "category": "car", "box2d": _box(1 + idx, 1, 10 + idx, 9)}]
        if idx >= 2:
            labels.append({"id": "9", "category": "pedestrian", "box2d": _box(20, 5, 25, 20)})
        vid1.append({"name": name, "videoName": "vid1", "frameIndex": idx, "labels": labels})
    _json(root / B.Layout.box_track_dir("train") / "vid1.json", vid1)
    vid2 = []
    for idx, ids in ((2, ["xyz"]), (0, ["abc"]), (1, ["xyz", "abc"])):  # file order != frame order
        name = f"vid2-{idx + 1:07d}.jpg"
        _jpeg(img / "track/train/vid2" / name, 300 + idx)
        vid2.append({"name": name, "videoName": "vid2", "frameIndex": idx,
                     "labels": [{"id": i, "category": "other person", "box2d": _box(2, 2, 6, 6)} for i in ids]})
    _json(root / B.Layout.box_track_dir("train") / "vid2.json", vid2)
    for idx in range(3):
        name = f"vid3-{idx + 1:07d}"
        _jpeg(img / "seg_track_20/train/vid3" / f"{name}.jpg", 400 + idx)
        _png(root / B.Layout.seg_track_bitmasks("train") / "vid3" / f"{name}.png", _bitmask(SEG_TRACK_INSTANCES))
    return root


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    return make_bdd(tmp_path_factory.mktemp("bdd") / "bdd100k")


@pytest.fixture
def bdd(pristine, tmp_path) -> Path:
    """A private copy of the fixture root that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bdd100k"))


def _opts(root, out, **kw) -> ConvertOptions:
    kw.setdefault("splits", ("train",))
    kw.setdefault("progress", False)
    return ConvertOptions(bdd_root=str(root), out=str(out), **kw)


def _read_samples(out: str) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard under ``out``: ``{key: {suffix: bytes}}``."""
    samples: dict[str, dict[str, bytes]] = {}
    for rel in fsio.list_files(out, recursive=True):
        if not rel.endswith(".tar"):
            continue
        with fsio.open_read(fsio.join(out, rel)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return samples


def _frames(out: str) -> dict[str, tuple[str, int, dict, dict[str, bytes]]]:
    """``{frame name: (key, index in clip, FrameRecord, sample members)}``."""
    found = {}
    for key, members in _read_samples(out).items():
        for i, fr in enumerate(json.loads(members["clip.json"])["frames"]):
            found[fr["name"]] = (key, i, fr, members)
    return found


@pytest.fixture(scope="session")
def converted(pristine, tmp_path_factory) -> tuple[Path, dict]:
    """The whole fixture converted once (shard_size 2, clip_len 2) for the read-only tests."""
    out = tmp_path_factory.mktemp("shards") / "out"
    return out, convert(_opts(pristine, out, shard_size=2, clip_len=2))


# ---------------------------------------------------------------------------------------------
# Output layout, counts, bytes, label mapping
# ---------------------------------------------------------------------------------------------


def test_layout_and_manifest_counts(converted):
    out, manifest = converted
    files = set(fsio.list_files(str(out), recursive=True))
    # det: 5 frames → 3 shards of ≤ 2; seg: 2 → 1; track: 7 clips → 4.
    expected_tars = {f"det/train/det-train-{i:06d}.tar" for i in range(3)} | {"seg/train/seg-train-000000.tar"} \
        | {f"track/train/track-train-{i:06d}.tar" for i in range(4)}
    assert {f for f in files if f.endswith(".tar")} == expected_tars
    assert {f for f in files if f.endswith(".tar.json")} == {t + ".json" for t in expected_tars}
    assert "manifest.json" in files and not any(".tmp-" in f for f in files)
    assert json.loads((out / "manifest.json").read_text()) == manifest

    det, seg, track = (manifest["sets"][k] for k in ("det/train", "seg/train", "track/train"))
    assert (det["samples"], det["clips"], seg["samples"], track["samples"], track["clips"]) == (5, 5, 2, 11, 7)
    assert det["tasks"] == {
        "tag": {"samples": 2, "instances": 0},  # a, c
        "drivable": {"samples": 3, "instances": 0},  # a, b, m
        "lane": {"samples": 1, "instances": 0},
        "det": {"samples": 3, "instances": 4},  # a: car, other vehicle, crowd pedestrian; b: trailer
        "pose": {"samples": 2, "instances": 2},
    }
    assert seg["tasks"] == {"sem": {"samples": 2, "instances": 0}, "ins": {"samples": 1, "instances": 2}}
    assert track["tasks"] == {
        "flow": {"samples": 11, "instances": 0},
        "mot": {"samples": 11, "instances": (1 + 1 + 2 + 2 + 2) + (1 + 2 + 1) + 3 * 2},  # vid1, vid2, vid3
        "mots": {"samples": 3, "instances": 6},
    }
    assert [s["path"] for s in det["shards"]] == [f"det/train/det-train-{i:06d}.tar" for i in range(3)]
    assert [s["samples"] for s in track["shards"]] == [4, 3, 3, 1]  # vid1 [0,1][2,3] | [5] vid2 [0,1] | [2] vid3 [0,1] | [2]
    assert [s["tasks"]["flow"]["samples"] for s in track["shards"]] == [4, 3, 3, 1]  # every tracking frame
    assert [s["clip_frames"] for s in track["shards"]] == [[2, 2], [1, 2], [1, 2], [1]]
    for entry in (det, seg, track):  # the shards' task counts (the loader's per-worker parts) add up to the set's
        for task, counts in entry["tasks"].items():
            assert sum(s["tasks"].get(task, {}).get("samples", 0) for s in entry["shards"]) == counts["samples"]
    assert all(s["bytes"] == (out / s["path"]).stat().st_size for s in det["shards"] + track["shards"])
    assert manifest["totals"]["samples"] == 18 and manifest["totals"]["shards"] == 8
    assert manifest["totals"]["skipped"] == 0 and det["skipped"] == {"count": 0, "items": []}
    assert manifest["options"] == {"bdd_root": manifest["options"]["bdd_root"], "sets": ["det", "seg", "track"],
                                   "splits": ["train"], "shard_size": 2, "clip_len": 2, "on_error": "raise"}


def test_inspect_counts_equal_manifest(converted):
    out, manifest = converted
    report = inspect_shards(str(out))
    assert set(report["sets"]) == set(manifest["sets"])
    for k, m in manifest["sets"].items():
        r = report["sets"][k]
        assert (r["samples"], r["clips"], r["shards"], r["bytes"]) == (m["samples"], m["clips"], len(m["shards"]), m["bytes"])
        assert r["tasks"] == m["tasks"]
    assert report["totals"]["tasks"] == manifest["totals"]["tasks"]


def test_images_copied_unmodified_and_label_maps_decode_to_the_png_values(converted, pristine):
    out, _ = converted
    frames = _frames(str(out))
    assert set(frames) == {"a.jpg", "b.jpg", "c.jpg", "p.jpg", "m.jpg", "s1.jpg", "s2.jpg"} | {
        f"vid1-{i + 1:07d}.jpg" for i in (0, 1, 2, 3, 5)} | {f"vid2-{i + 1:07d}.jpg" for i in range(3)} | {
        f"vid3-{i + 1:07d}.jpg" for i in range(3)}
    for name, src in [("a.jpg", "images/100k/train/a.jpg"), ("s1.jpg", "images/10k/train/s1.jpg"),
                      ("vid1-0000006.jpg", "images/track/train/vid1/vid1-0000006.jpg")]:
        _, i, _, members = frames[name]
        assert members[f"{i}.jpg"] == (pristine / src).read_bytes(), name
    for name, kind, src in [
        ("a.jpg", "drivable.rle", "labels/drivable/masks/train/a.png"),
        ("a.jpg", "lane.rle", "labels/lane/masks/train/a.png"),
        ("m.jpg", "drivable.rle", "labels/drivable/masks/train/m.png"),
        ("s1.jpg", "sem.rle", "labels/sem_seg/masks/train/s1.png"),
    ]:
        _, i, _, members = frames[name]
        got = decode_label_map(members[f"{i}.{kind}"])
        want = np.asarray(Image.open(pristine / src))
        assert got.dtype == np.uint8 and np.array_equal(got, want), (name, kind)
    for name, src in [("s1.jpg", "labels/ins_seg/bitmasks/train/s1.png"),
                      ("vid3-0000002.jpg", "labels/seg_track_20/bitmasks/train/vid3/vid3-0000002.png")]:
        _, i, rec, members = frames[name]
        rgba = np.asarray(Image.open(pristine / src)).astype(np.int32)
        ids = (rgba[..., 2] << 8) + rgba[..., 3]
        # the instance map says, per pixel, which of the record's instances the bitmask shows there
        want = np.zeros(ids.shape, np.uint8)
        for k, inst in enumerate(rec["instances"]):
            if inst["bitmask_id"] is not None:
                want[ids == inst["bitmask_id"]] = k + 1
        got = decode_label_map(members[f"{i}.instances.rle"])
        assert got.dtype == np.uint8 and np.array_equal(got, want), name
        assert np.array_equal(got > 0, ids > 0), f"{name}: every bitmask pixel belongs to a recorded instance"
        assert {inst["bitmask_id"] for inst in rec["instances"]} - {None} == set(np.unique(ids[ids > 0]).tolist())


def test_category_mapping_ignore_and_stuff(converted):
    frames = _frames(str(converted[0]))
    a = frames["a.jpg"][2]
    assert (a["height"], a["width"]) == (H, W)
    assert a["tasks"] == {"tag": "real", "drivable": "real", "lane": "real", "det": "real", "pose": "real"}
    assert (a["weather"], a["scene"], a["timeofday"]) == (B.WEATHERS.index("clear"), B.SCENES.index("city street"), "daytime")
    got = [(i["label_id"], i["category"], i["class"], i["ignore"], i["crowd"], i["occluded"]) for i in a["instances"]]
    assert got == [
        ("1", "car", B.THING_TO_ID["car"], False, False, False),
        ("2", "other vehicle", B.THING_TO_ID["car"], True, False, False),  # mapped → car, ignored
        ("4", "pedestrian", B.THING_TO_ID["pedestrian"], True, True, True),  # crowd → ignored
    ]
    # Scalabel box2d is inclusive; shards hold continuous coordinates (x2, y2 one pixel further)
    assert a["instances"][0]["box"] == [1.0, 2.0, 11.0, 13.0] and a["instances"][0]["track_id"] == -1
    assert a["stuff"] == [{"category": "traffic light", "box": [25.0, 0.0, 29.0, 7.0], "label_id": "3"}]
    b = frames["b.jpg"][2]
    assert [(i["category"], i["class"], i["ignore"]) for i in b["instances"]] == [("trailer", B.THING_TO_ID["truck"], True)]
    assert "tag" not in b["tasks"] and b["weather"] is None
    c = frames["c.jpg"][2]  # labelled with zero objects: det is real, instances empty
    assert c["tasks"] == {"tag": "real", "det": "real"} and c["instances"] == []
    assert frames["p.jpg"][2]["tasks"] == {"pose": "real"} and frames["m.jpg"][2]["tasks"] == {"drivable": "real"}


def test_pose_keypoints(converted):
    frames = _frames(str(converted[0]))
    (person,) = frames["a.jpg"][2]["pose"]
    kps = person["keypoints"]
    assert len(kps) == len(B.POSE_JOINTS) == 18
    assert kps[B.POSE_JOINTS.index("head")] == [5.0, 3.0, 2]
    assert kps[B.POSE_JOINTS.index("neck")] == [6.0, 9.0, 1]
    assert kps[B.POSE_JOINTS.index("left_foot")] == [4.0, 20.0, 2]
    assert kps[B.POSE_JOINTS.index("right_knee")] == [0.0, 0.0, 0]
    assert person["box"] == [4.0, 3.0, 6.0, 20.0] and person["label_id"] == "40"  # extent of labelled joints
    assert frames["p.jpg"][2]["pose"][0]["box"] == [1.0, 1.0, 10.0, 21.0]  # box2d wins (inclusive → continuous)


def test_instances_from_bitmasks(converted):
    frames = _frames(str(converted[0]))
    s1 = frames["s1.jpg"][2]
    assert s1["tasks"] == {"sem": "real", "ins": "real"}
    assert [(i["bitmask_id"], i["class"], i["category"], i["box"], i["ignore"], i["crowd"], i["label_id"], i["track_id"])
            for i in s1["instances"]] == [
        (1, 2, "car", [3.0, 2.0, 9.0, 6.0], False, False, "", -1),
        (2, 0, "pedestrian", [20.0, 10.0, 26.0, 13.0], True, True, "", -1),
    ]
    v3 = frames["vid3-0000001.jpg"][2]
    assert v3["tasks"] == {"flow": "real", "mot": "real", "mots": "real"}
    assert [(i["track_id"], i["bitmask_id"], i["category"]) for i in v3["instances"]] == [(5, 5, "car"), (300, 300, "rider")]


def test_track_ids_and_clips(converted):
    samples = _read_samples(str(converted[0]))
    clips = {}
    for key, members in samples.items():
        doc = json.loads(members["clip.json"])
        if doc["set"] == "track":
            clips[key] = doc["frames"]
            assert sorted(k for k in members if k.endswith(".jpg")) == [f"{i}.jpg" for i in range(len(doc["frames"]))]
    got = [(k, fr[0]["video"], [f["frame_index"] for f in fr]) for k, fr in sorted(clips.items())]
    assert got == [  # clip_len 2; vid1 breaks at the gap 3 → 5
        ("track-train-00000000", "vid1", [0, 1]), ("track-train-00000001", "vid1", [2, 3]),
        ("track-train-00000002", "vid1", [5]), ("track-train-00000003", "vid2", [0, 1]),
        ("track-train-00000004", "vid2", [2]), ("track-train-00000005", "vid3", [0, 1]),
        ("track-train-00000006", "vid3", [2]),
    ]
    vid1 = [f for k in sorted(clips) for f in clips[k] if f["video"] == "vid1"]
    assert {(i["label_id"], i["track_id"]) for f in vid1 for i in f["instances"]} == {("7", 7), ("9", 9)}
    vid2 = [f for k in sorted(clips) for f in clips[k] if f["video"] == "vid2"]
    # non-numeric ids: consecutive ints in order of first appearance by frameIndex (abc in frame 0)
    assert [[(i["label_id"], i["track_id"]) for i in f["instances"]] for f in vid2] == [
        [("abc", 0)], [("xyz", 1), ("abc", 0)], [("xyz", 1)]]
    assert all(i["ignore"] and i["class"] == B.THING_TO_ID["pedestrian"] for f in vid2 for i in f["instances"])
    assert all(f["tasks"] == {"flow": "real", "mot": "real"} for f in vid1 + vid2)


# ---------------------------------------------------------------------------------------------
# Parallelism, resume, overwrite, fsspec outputs, CLI
# ---------------------------------------------------------------------------------------------


def test_two_workers_give_identical_output(pristine, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        convert(_opts(pristine, out, shard_size=1, clip_len=3, workers=workers, sets=("det", "track")))
        outs.append(out)
    files = fsio.list_files(str(outs[0]), recursive=True)
    assert files == fsio.list_files(str(outs[1]), recursive=True) and len(files) > 10
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_resume_rewrites_only_incomplete_shards(pristine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = convert(_opts(pristine, out, sets=("det",), shard_size=1))
    shards = sorted(out.glob("det/train/*.tar"))
    assert len(shards) == 5
    victim = shards[2]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in shards}
    # An interrupted run: no manifest, one shard and its sidecar missing, a temp file left over.
    (out / "manifest.json").unlink()
    victim.unlink()
    Path(str(victim) + ".json").unlink()
    (victim.parent / (victim.name + ".tmp-deadbeef")).write_bytes(b"half a shard")
    written = []
    real = convert_mod._write_shard
    monkeypatch.setattr(convert_mod, "_write_shard", lambda job: written.append(job["path"]) or real(job))
    second = convert(_opts(pristine, out, sets=("det",), shard_size=1))
    assert written == [f"det/train/{victim.name}"]
    assert second == first
    for p, (mtime, ino, data) in before.items():
        assert p.read_bytes() == data
        if p != victim:
            assert (p.stat().st_mtime_ns, p.stat().st_ino) == (mtime, ino)
    assert not list(out.glob("det/train/*.tmp-*"))


def test_resume_rewrites_a_shard_whose_sidecar_lacks_a_field(pristine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = convert(_opts(pristine, out, sets=("det",), shard_size=2))
    (out / "manifest.json").unlink()
    side_path = out / "det/train/det-train-000001.tar.json"
    side = json.loads(side_path.read_text())
    del side["clip_frames"]  # as an older build wrote it, under the same plan
    side_path.write_text(json.dumps(side))
    written = []
    real = convert_mod._write_shard
    monkeypatch.setattr(convert_mod, "_write_shard", lambda job: written.append(job["path"]) or real(job))
    assert convert(_opts(pristine, out, sets=("det",), shard_size=2)) == first
    assert written == ["det/train/det-train-000001.tar"]


def test_resume_rewrites_shards_whose_plan_changed(pristine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(_opts(pristine, out, sets=("track",), shard_size=2, clip_len=2))
    (out / "manifest.json").unlink()
    written = []
    real = convert_mod._write_shard
    monkeypatch.setattr(convert_mod, "_write_shard", lambda job: written.append(job["path"]) or real(job))
    manifest = convert(_opts(pristine, out, sets=("track",), shard_size=2, clip_len=3))  # different clips
    assert len(written) == len(manifest["sets"]["track/train"]["shards"]) == 3
    assert sorted(p.name for p in out.glob("track/train/*.tar")) == [f"track-train-{i:06d}.tar" for i in range(3)]
    assert inspect_shards(str(out))["sets"]["track/train"]["clips"] == manifest["sets"]["track/train"]["clips"] == 5


def test_refuses_to_overwrite_without_flag(pristine, tmp_path):
    out = tmp_path / "out"
    convert(_opts(pristine, out, sets=("det",), shard_size=1))
    with pytest.raises(FileExistsError, match=str(out / "manifest.json")):
        convert(_opts(pristine, out, sets=("det",), shard_size=10))
    assert len(list(out.glob("det/train/*.tar"))) == 5  # untouched
    manifest = convert(_opts(pristine, out, sets=("det",), shard_size=10, overwrite=True))
    assert sorted(p.name for p in out.glob("det/train/*")) == ["det-train-000000.tar", "det-train-000000.tar.json"]
    assert manifest["sets"]["det/train"]["samples"] == 5


def test_memory_uri_output(pristine):
    out = "memory://vtd-test-convert/out"
    try:
        manifest = convert(_opts(pristine, out, sets=("seg", "track"), shard_size=3, workers=2))
        assert fsio.exists(out + "/manifest.json")
        assert json.loads(fsio.read_bytes(out + "/manifest.json")) == manifest
        report = inspect_shards(out)
        assert {k: v["samples"] for k, v in report["sets"].items()} == {"seg/train": 2, "track/train": 11}
        assert _frames(out)["s1.jpg"][3]["0.jpg"] == (pristine / "images/10k/train/s1.jpg").read_bytes()
    finally:
        fs, path = fsio.resolve(out)
        fs.rm(path, recursive=True)


def test_missing_set_sources_is_an_error(pristine, tmp_path):
    with pytest.raises(FileNotFoundError, match="det/val"):
        convert(_opts(pristine, tmp_path / "out", sets=("det",), splits=("train", "val")))
    with pytest.raises(ValueError, match="unknown"):
        _opts(pristine, tmp_path / "out", sets=("lidar",))


def test_cli_convert_and_inspect(pristine, tmp_path, capsys):
    from vtd_train.cli import main

    out = tmp_path / "out"
    argv = ["data", "convert", "--bdd-root", str(pristine), "--out", str(out), "--sets", "seg", "--splits", "train", "--quiet"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sets"]["seg/train"]["tasks"]["ins"] == {"samples": 1, "instances": 2}


# ---------------------------------------------------------------------------------------------
# Bad input: raise names file / frame / field; skip leaves the frame out and counts it
# ---------------------------------------------------------------------------------------------


def _edit_det(root: Path, frame: str, fn) -> None:
    path = root / B.Layout.det_json("train")
    frames = json.loads(path.read_text())
    fn(next(f for f in frames if f["name"] == frame))
    path.write_text(json.dumps(frames))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    # case: (damage, file suffix, frame, field, message fragment)
    "missing_image": (lambda r: (r / "images/100k/train/b.jpg").unlink(),
                      "images/100k/train/b.jpg", "b.jpg", "image", "missing image"),
    "corrupt_image": (lambda r: _truncate(r / "images/100k/train/b.jpg"),
                      "images/100k/train/b.jpg", "b.jpg", "image", "corrupt image"),
    "unknown_category": (lambda r: _edit_det(r, "b.jpg", lambda f: f["labels"].append(
                         {"id": "9", "category": "spaceship", "box2d": _box(1, 1, 5, 5)})),
                         "det_train.json", "b.jpg", "labels[1].category", "unknown category 'spaceship'"),
    "box_outside_image": (lambda r: _edit_det(r, "b.jpg", lambda f: f["labels"][0]["box2d"].update(x2=W + 0.5)),
                          "det_train.json", "b.jpg", "labels[0].box2d", "outside the image (32x24"),
    "degenerate_box": (lambda r: _edit_det(r, "b.jpg", lambda f: f["labels"][0]["box2d"].update(y2=3)),
                       "det_train.json", "b.jpg", "labels[0].box2d", "degenerate box"),
    "polygon_too_few_vertices": (lambda r: _edit_det(r, "b.jpg", lambda f: f["labels"][0]["poly2d"][0].update(closed=True)),
                                 "det_train.json", "b.jpg", "labels[0].poly2d[0].vertices", "closed polygon with 2 vertices"),
    "mask_size_mismatch": (lambda r: _png(r / "labels/drivable/masks/train/b.png", np.zeros((H, W + 1), np.uint8)),
                           "labels/drivable/masks/train/b.png", "b.jpg", "drivable", "mask size 33x24 differs"),
    "lane_value_outside_encoding": (lambda r: _png(r / "labels/lane/masks/train/b.png", np.full((H, W), 8, np.uint8)),
                                    "labels/lane/masks/train/b.png", "b.jpg", "lane", "values [8] outside the lane"),
    "bad_joint_visibility": (lambda r: (r / B.Layout.pose_json("train")).write_text(
                             (r / B.Layout.pose_json("train")).read_text().replace('"N"', '"X"')),
                             "pose_train.json", "a.jpg", "labels[0].graph.nodes[1].visibility", "'V' or 'N'"),
}


def test_bitmask_attributes_must_be_constant_per_instance(bdd, tmp_path):
    """The shards keep one instance-id map plus per-instance attributes, so attribute bits that
    vary inside an instance cannot be represented: an error, never a silent merge."""
    path = bdd / "labels/ins_seg/bitmasks/train/s1.png"
    rgba = np.asarray(Image.open(path)).copy()
    ys, xs = np.nonzero(rgba[..., 0] > 0)
    rgba[ys[0], xs[0], 1] ^= 0b100  # the occluded bit of one pixel only
    _png(path, rgba)
    with pytest.raises(DataError) as info:
        convert(_opts(bdd, tmp_path / "raise", sets=("seg",)))
    assert info.value.file.endswith("s1.png") and info.value.frame == "s1.jpg" and info.value.field == "bitmask"
    assert "several attribute values" in info.value.message


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raise_and_skip(bdd, tmp_path, case):
    damage, file_suffix, frame, field, fragment = BAD_INPUTS[case]
    damage(bdd)
    with pytest.raises(DataError) as info:
        convert(_opts(bdd, tmp_path / "raise", sets=("det",)))
    err = info.value
    assert err.file.endswith(file_suffix) and (err.frame, err.field) == (frame, field)
    assert fragment in err.message and file_suffix in str(err) and f"frame {frame}" in str(err) and field in str(err)
    assert not (tmp_path / "raise" / "manifest.json").exists()

    manifest = convert(_opts(bdd, tmp_path / "skip", sets=("det",), on_error="skip"))
    frames = _frames(str(tmp_path / "skip"))
    assert frame not in frames and len(frames) == 4
    assert manifest["sets"]["det/train"]["samples"] == 4 and manifest["totals"]["skipped"] == 1
    (item,) = manifest["sets"]["det/train"]["skipped"]["items"]
    assert item["file"].endswith(file_suffix) and (item["frame"], item["field"]) == (frame, field)
    assert fragment in item["error"]


def test_malformed_json(bdd, tmp_path):
    path = bdd / B.Layout.det_json("train")
    path.write_text(path.read_text()[:-5])
    with pytest.raises(DataError, match=r"det_train\.json: malformed JSON: .*line 1 column"):
        convert(_opts(bdd, tmp_path / "raise", sets=("det",)))
    manifest = convert(_opts(bdd, tmp_path / "skip", sets=("det",), on_error="skip"))
    skipped = manifest["sets"]["det/train"]["skipped"]
    assert skipped["count"] == 1 and skipped["items"][0]["file"] == str(path)
    assert skipped["items"][0]["error"].startswith("malformed JSON")
    # The file's labels are gone (and counted); the frames labelled by other files remain.
    frames = _frames(str(tmp_path / "skip"))
    assert not any("det" in f[2]["tasks"] for f in frames.values())
    assert set(frames) == {"a.jpg", "b.jpg", "p.jpg", "m.jpg"}


def test_seg_mask_size_mismatch_and_bitmask_category(bdd, tmp_path):
    _png(bdd / "labels/sem_seg/masks/train/s2.png", np.zeros((H - 1, W), np.uint8))
    bad = _bitmask(SEG_S1_INSTANCES)
    bad[0, 0] = (12, 0, 0, 9)  # R = 12: no such category
    _png(bdd / "labels/ins_seg/bitmasks/train/s1.png", bad)
    manifest = convert(_opts(bdd, tmp_path / "out", sets=("seg",), on_error="skip"))
    items = manifest["sets"]["seg/train"]["skipped"]["items"]
    assert [(Path(i["file"]).name, i["frame"], i["field"]) for i in items] == [
        ("s1.png", "s1.jpg", "bitmask"), ("s2.png", "s2.jpg", "sem")]
    assert "unknown category ids [12]" in items[0]["error"] and "32x23 differs from image size 32x24" in items[1]["error"]
    assert manifest["sets"]["seg/train"]["samples"] == 0 and manifest["sets"]["seg/train"]["shards"][0]["clips"] == 0
    report = inspect_shards(str(tmp_path / "out"))["sets"]["seg/train"]  # an empty shard is still a valid tar
    assert (report["shards"], report["samples"], report["tasks"]["ins"]["samples"]) == (1, 0, 0)


def test_bad_tracking_frame_drops_out_of_its_clip(bdd, tmp_path):
    _truncate(bdd / "images/track/train/vid1/vid1-0000003.jpg")  # frameIndex 2
    manifest = convert(_opts(bdd, tmp_path / "out", sets=("track",), clip_len=2, on_error="skip"))
    clips = {k: [f["frame_index"] for f in json.loads(m["clip.json"])["frames"]]
             for k, m in _read_samples(str(tmp_path / "out")).items()}
    assert clips["track-train-00000001"] == [3]  # was [2, 3]
    assert clips["track-train-00000000"] == [0, 1] and clips["track-train-00000002"] == [5]
    assert "1.jpg" not in _read_samples(str(tmp_path / "out"))["track-train-00000001"]
    assert manifest["sets"]["track/train"]["samples"] == 10
    assert [i["frame"] for i in manifest["sets"]["track/train"]["skipped"]["items"]] == ["vid1-0000003.jpg"]


def test_worker_process_error_keeps_its_message(bdd, tmp_path):
    _truncate(bdd / "images/100k/train/c.jpg")
    messages = []
    for workers in (1, 2):
        with pytest.raises(DataError) as info:
            convert(_opts(bdd, tmp_path / f"w{workers}", sets=("det",), shard_size=1, workers=workers))
        messages.append((str(info.value), info.value.frame, info.value.field))
        assert not [p for p in (tmp_path / f"w{workers}").rglob("*") if ".tmp-" in p.name]
    assert messages[0] == messages[1] and messages[0][1:] == ("c.jpg", "image")


def test_skip_run_is_not_trusted_by_a_strict_resume(bdd, tmp_path):
    _truncate(bdd / "images/100k/train/c.jpg")
    out = tmp_path / "out"
    convert(_opts(bdd, out, sets=("det",), shard_size=1, on_error="skip"))
    os.remove(out / "manifest.json")
    with pytest.raises(DataError, match="c.jpg"):
        convert(_opts(bdd, out, sets=("det",), shard_size=1))
