"""The synthetic BDD100K generator: layout, Scalabel keys, mask encodings, geometry, determinism,
and video motion that the flow metric can see.

One tiny dataset (seed 0) is generated once per module; determinism and overwrite use two
more tiny runs (about a second each); the flow-proxy test reads the session's ``tiny_shards``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.bdd100k import format as B
from data_pipeline.bdd100k import synth
from data_pipeline.bdd100k.format import Layout
from data_pipeline.loading.loader import iter_frames
from data_pipeline.shards.manifest import families_from_manifest
from vtd_train.evaluation.flow import FlowProxyIoU
from vtd_train.evaluation.inference import gt_instances

SEED = 0
SPEC = synth.SIZES["tiny"]
W, H = SPEC.width, SPEC.height


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bdd") / "root"
    summary = synth.generate(out, seed=SEED, size="tiny")
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _track_files(root: Path, split: str) -> list[Path]:
    return sorted((root / Layout.box_track_dir(split)).glob("*.json"))


def _center(box: dict) -> np.ndarray:
    return np.array([(box["x1"] + box["x2"]) / 2, (box["y1"] + box["y2"]) / 2])


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ---------------------------------------------------------------------------------------------
# Layout, counts, Scalabel keys
# ---------------------------------------------------------------------------------------------


def test_summary_matches_size_table_and_files(root: Path, summary: dict) -> None:
    assert summary["image_size"] == {"width": W, "height": H}
    for si, split in enumerate(B.SPLITS):
        s = summary["sets"]
        assert s["det"][split]["images"] == SPEC.det[si] == len(list((root / Layout.images_100k(split)).glob("*.jpg")))
        assert s["seg"][split]["images"] == SPEC.seg[si] == len(list((root / Layout.images_10k(split)).glob("*.jpg")))
        assert s["track"][split]["videos"] == SPEC.track_videos[si] == len(_track_files(root, split))
        assert s["track"][split]["images"] == SPEC.track_videos[si] * SPEC.frames_per_video
        mots_videos = sorted(p for p in (root / Layout.images_seg_track(split)).iterdir())
        assert s["mots"][split]["videos"] == SPEC.mots_videos[si] == len(mots_videos)
        det = _load(root, Layout.det_json(split))
        assert s["det"][split]["objects"] == sum(len(f["labels"]) for f in det) > 0
        pose = _load(root, Layout.pose_json(split))
        assert s["det"][split]["pose_persons"] == sum(len(f["labels"]) for f in pose) > 0
        n_track = sum(len(f["labels"]) for p in _track_files(root, split) for f in json.loads(p.read_text()))
        assert s["track"][split]["objects"] == n_track > 0
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "summary.json"]
    assert summary["files"] == len(files)
    assert not [p for p in files if ".tmp" in p.name], "temporary files left behind"


def test_demo_size_adds_det_validation_frames_and_changes_nothing_else(root: Path, tmp_path: Path) -> None:
    """``vtd demo``'s size: 32 det validation frames, with tags in the split's proportions;
    every file outside the det validation set is byte-identical to tiny's (the demo's seg and
    track metrics are the tiny data's)."""
    demo = tmp_path / "demo"
    synth.generate(demo, seed=SEED, size="demo")
    val = sorted(p.name for p in (demo / Layout.images_100k("val")).glob("*.jpg"))
    frames = _load(demo, Layout.det_json("val"))
    assert len(val) == 32 and sorted(f["name"] for f in frames) == val
    scenes = Counter(f["attributes"]["scene"] for f in frames)
    assert scenes.most_common(1)[0] == ("city street", 12) and len(scenes) == 7, scenes

    det_val = (Layout.images_100k("val"), Layout.det_json("val"), Layout.pose_json("val"),
               Layout.drivable_masks("val"), Layout.lane_masks("val"))

    def files(r: Path) -> dict[str, bytes]:
        rels = (str(p.relative_to(r)) for p in r.rglob("*") if p.is_file())
        return {rel: (r / rel).read_bytes() for rel in rels if rel != "summary.json" and not rel.startswith(det_val)}

    mine, tiny = files(demo), files(root)
    assert mine.keys() == tiny.keys()
    assert [k for k in mine if mine[k] != tiny[k]] == []


def test_det_layout_and_scalabel_keys(root: Path) -> None:
    allowed = set(B.DET_CATEGORIES) | set(B.IGNORE_MAP)
    for split in B.SPLITS:
        frames = _load(root, Layout.det_json(split))
        ids = [lab["id"] for f in frames for lab in f["labels"]]
        assert len(ids) == len(set(ids)), "label ids must be unique within det_20"
        for f in frames:
            assert set(f) >= {"name", "attributes", "labels"}
            stem = f["name"].removesuffix(".jpg")
            assert (root / Layout.images_100k(split) / f["name"]).is_file()
            assert (root / Layout.drivable_masks(split) / f"{stem}.png").is_file()
            assert (root / Layout.lane_masks(split) / f"{stem}.png").is_file()
            a = f["attributes"]
            assert a["weather"] in B.WEATHERS and a["scene"] in B.SCENES and a["timeofday"] in B.TIMES_OF_DAY
            for lab in f["labels"]:
                assert isinstance(lab["id"], str) and lab["category"] in allowed
                assert set(lab["attributes"]) == {"occluded", "truncated", "crowd"}
                assert all(isinstance(v, bool) for v in lab["attributes"].values())
                assert set(lab["box2d"]) == {"x1", "y1", "x2", "y2"}
    cats = {lab["category"] for s in B.SPLITS for f in _load(root, Layout.det_json(s)) for lab in f["labels"]}
    assert {"car", "pedestrian", "traffic sign"} <= cats
    scenes = {f["attributes"]["scene"] for s in B.SPLITS for f in _load(root, Layout.det_json(s))}
    assert len(scenes) >= 3, scenes


def test_seg_and_mots_layout(root: Path) -> None:
    for split in B.SPLITS:
        stems = sorted(p.stem for p in (root / Layout.images_10k(split)).glob("*.jpg"))
        assert stems == sorted(p.stem for p in (root / Layout.sem_masks(split)).glob("*.png"))
        assert stems == sorted(p.stem for p in (root / Layout.ins_bitmasks(split)).glob("*.png"))
        for vdir in (root / Layout.images_seg_track(split)).iterdir():
            frames = sorted(p.stem for p in vdir.glob("*.jpg"))
            assert frames == [f"{vdir.name}-{i:07d}" for i in range(SPEC.frames_per_video)]
            masks = sorted(p.stem for p in (root / Layout.seg_track_bitmasks(split) / vdir.name).glob("*.png"))
            assert masks == frames


def test_track_json_layout(root: Path) -> None:
    for split in B.SPLITS:
        for p in _track_files(root, split):
            frames = json.loads(p.read_text())
            assert [f["frameIndex"] for f in frames] == list(range(SPEC.frames_per_video))
            for f in frames:
                assert f["videoName"] == p.stem
                assert f["name"] == f"{p.stem}-{f['frameIndex']:07d}.jpg"
                assert (root / Layout.images_track(split) / p.stem / f["name"]).is_file()
                assert f["attributes"]["weather"] in B.WEATHERS
                for lab in f["labels"]:
                    assert lab["category"] in set(B.THING_CATEGORIES) | set(B.IGNORE_MAP)
                    assert set(lab) >= {"id", "category", "attributes", "box2d"}


def test_every_file_has_the_table_size_and_mode(root: Path) -> None:
    modes = {".jpg": "RGB"}
    n = 0
    for p in root.rglob("*"):
        if p.suffix not in (".jpg", ".png"):
            continue
        with Image.open(p) as im:
            assert im.size == (W, H), p
            if p.suffix == ".jpg":
                assert im.mode == modes[".jpg"] and im.format == "JPEG"
            elif "bitmasks" in p.parts:
                assert im.mode == "RGBA", p
            else:
                assert im.mode == "L", p
        n += 1
    assert n > 200


# ---------------------------------------------------------------------------------------------
# Mask encodings
# ---------------------------------------------------------------------------------------------


def test_drivable_and_lane_masks_decode(root: Path) -> None:
    valid_lane = {B.encode_lane(c, d, s) for c in range(8) for d in (0, 1) for s in (0, 1)} | {B.LANE_BACKGROUND}
    seen_drv, seen_cat = set(), set()
    direct_x = []
    for split in B.SPLITS:
        for p in (root / Layout.drivable_masks(split)).glob("*.png"):
            drv = np.array(Image.open(p))
            seen_drv |= set(np.unique(drv).tolist())
            ys, xs = np.nonzero(drv == 0)
            if len(xs):
                assert ys.mean() > H / 2, f"direct drivable area must lie in the lower half: {p.name}"
                direct_x.append(xs.mean())
            lane = np.array(Image.open(root / Layout.lane_masks(split) / p.name))
            assert set(np.unique(lane).tolist()) <= valid_lane, p
            dec = B.decode_lane_mask(lane)
            fg = lane != B.LANE_BACKGROUND
            assert fg.any(), f"every road image has lane markings: {p.name}"
            assert (dec[:, fg] > 0).all() and (dec[:, ~fg] == 0).all()
            assert dec[0].max() <= 2 and dec[1].max() <= 2 and dec[2].max() <= 8
            seen_cat |= set(np.unique(dec[2][fg]).tolist())
    assert seen_drv <= {0, 1, 2} and {0, 1, 2} <= seen_drv
    assert abs(np.mean(direct_x) - W / 2) < W / 6, "the ego lane is in front of the camera"
    assert len(seen_cat) >= 3, seen_cat


def test_semantic_masks(root: Path) -> None:
    sky_rows, road_rows, ids = [], [], set()
    for split in B.SPLITS:
        for p in (root / Layout.sem_masks(split)).glob("*.png"):
            sem = np.array(Image.open(p))
            u = set(np.unique(sem).tolist())
            assert u <= set(range(19)) | {B.IGNORE_INDEX}, p
            ids |= u
            for cls, rows in ((10, sky_rows), (0, road_rows)):
                ys = np.nonzero(sem == cls)[0]
                if len(ys):
                    rows.append(ys.mean())
    assert B.IGNORE_INDEX in ids, "some pixels are ignore"
    assert {0, 1, 2, 8, 10, 11, 13} <= ids, ids
    assert np.mean(sky_rows) < H * 0.35 < H * 0.6 < np.mean(road_rows), "sky on top, road at the bottom"


def _bitmask_files(root: Path):
    for split in B.SPLITS:
        for p in sorted((root / Layout.ins_bitmasks(split)).glob("*.png")):
            yield p
        for p in sorted((root / Layout.seg_track_bitmasks(split)).glob("*/*.png")):
            yield p


def test_bitmasks_decode_to_valid_instances(root: Path) -> None:
    n_inst = 0
    for p in _bitmask_files(root):
        d = B.decode_bitmask(np.array(Image.open(p)))
        cat, inst = d["category"], d["instance"]
        assert cat.min() >= 0 and cat.max() <= len(B.BITMASK_CATEGORIES), p
        assert ((cat == 0) == (inst == 0)).all(), "background iff category 0"
        for plane in ("truncated", "occluded", "crowd", "ignore"):
            assert not d[plane][inst == 0].any()
        for iid in np.unique(inst[inst > 0]):
            m = inst == iid
            assert len(np.unique(cat[m])) == 1, "one category per instance"
            for plane in ("truncated", "occluded", "crowd", "ignore"):
                assert len(np.unique(d[plane][m])) == 1, "attribute bits are per instance"
            x1, y1, x2, y2 = _extent(m)
            assert 0 <= x1 <= x2 <= W - 1 and 0 <= y1 <= y2 <= H - 1
            assert m.sum() >= 6, "hidden instances are removed, not labelled"
            n_inst += 1
    assert n_inst > 30


def test_seg_instances_agree_with_semantic_mask(root: Path) -> None:
    """Instance pixels carry their class's semantic id (or ignore for mapped categories)."""
    sem_of = {i + 1: B.SEM_CLASSES.index(c) if c != "pedestrian" else 11 for i, c in enumerate(B.BITMASK_CATEGORIES)}
    for split in B.SPLITS:
        for p in (root / Layout.ins_bitmasks(split)).glob("*.png"):
            d = B.decode_bitmask(np.array(Image.open(p)))
            sem = np.array(Image.open(root / Layout.sem_masks(split) / p.name))
            for c, s in sem_of.items():
                m = (d["category"] == c) & (d["ignore"] == 0)
                assert (sem[m] == s).all(), (p.name, c)
            assert (sem[d["ignore"] == 1] == B.IGNORE_INDEX).all()
            for s in sem_of.values():  # every thing pixel of the semantic mask has an instance
                assert (d["category"][sem == s] > 0).all(), (p.name, s)


# ---------------------------------------------------------------------------------------------
# Geometry: boxes, tracks, pose
# ---------------------------------------------------------------------------------------------


def test_boxes_inside_image(root: Path) -> None:
    boxes = [lab["box2d"] for s in B.SPLITS for f in _load(root, Layout.det_json(s)) for lab in f["labels"]]
    boxes += [lab["box2d"] for s in B.SPLITS for p in _track_files(root, s) for f in json.loads(p.read_text())
              for lab in f["labels"]]
    b = np.array([[x["x1"], x["y1"], x["x2"], x["y2"]] for x in boxes])
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= W - 1).all() and (b[:, 3] <= H - 1).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()


def test_det_json_boxes_are_extents_of_drawn_pixels(root: Path) -> None:
    """Re-render det frames with the generator's own renderer: every written box equals the
    (inclusive) extent of its instance's drawn pixels, and the written masks are the rendered ones."""
    frames = _load(root, Layout.det_json("train"))
    for i in (0, 1, 2, 5):
        _, fr = synth._still(SEED, SPEC, "det", "train", i, pose=i % 2 == 0)
        labels = frames[i]["labels"]
        assert len(labels) == len(fr.objects)
        for lab, obj in zip(labels, fr.objects):
            x1, y1, x2, y2 = _extent(fr.inst == obj.iid)
            assert lab["box2d"] == {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
            assert lab["category"] == obj.category
        stem = frames[i]["name"].removesuffix(".jpg")
        assert (np.array(Image.open(root / Layout.drivable_masks("train") / f"{stem}.png")) == fr.drivable).all()
        assert (np.array(Image.open(root / Layout.lane_masks("train") / f"{stem}.png")) == fr.lane).all()
        # drivable area and lane markings are hidden where objects cover the road
        assert (fr.drivable[fr.inst > 0] == 2).all() and (fr.lane[fr.inst > 0] == B.LANE_BACKGROUND).all()


def test_track_ids_stable_and_motion_smooth(root: Path) -> None:
    disp, long_tracks = [], 0
    for split in B.SPLITS:
        for p in _track_files(root, split):
            frames = json.loads(p.read_text())
            cat_of: dict[str, str] = {}
            seen = defaultdict(int)
            for f in frames:
                ids = [lab["id"] for lab in f["labels"]]
                assert len(ids) == len(set(ids)), "track ids unique within a frame"
                for lab in f["labels"]:
                    assert cat_of.setdefault(lab["id"], lab["category"]) == lab["category"], "id keeps its category"
                    seen[lab["id"]] += 1
            long_tracks += sum(n == len(frames) for n in seen.values())
            for a, b in zip(frames, frames[1:]):
                prev = {lab["id"]: lab["box2d"] for lab in a["labels"]}
                for lab in b["labels"]:
                    if lab["id"] in prev:
                        disp.append(np.linalg.norm(_center(lab["box2d"]) - _center(prev[lab["id"]])) / W)
    disp = np.array(disp)
    assert long_tracks >= 4, "objects keep their id over the whole video"
    assert disp.max() < 0.15, f"largest per-frame jump {disp.max():.3f} of the image width"
    assert disp.mean() < 0.04
    assert (disp > 0.005).mean() > 0.2, "objects do move"


def test_mots_track_ids_stable_and_smooth(root: Path) -> None:
    for split in B.SPLITS:
        for vdir in sorted((root / Layout.seg_track_bitmasks(split)).iterdir()):
            cat_of, prev = {}, {}
            for p in sorted(vdir.glob("*.png")):
                d = B.decode_bitmask(np.array(Image.open(p)))
                cur = {}
                for iid in np.unique(d["instance"][d["instance"] > 0]):
                    m = d["instance"] == iid
                    assert cat_of.setdefault(int(iid), int(d["category"][m][0])) == int(d["category"][m][0])
                    x1, y1, x2, y2 = _extent(m)
                    cur[int(iid)] = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
                for iid, c in cur.items():
                    if iid in prev:
                        assert np.linalg.norm(c - prev[iid]) / W < 0.15, (p, iid)
                prev = cur
            assert cat_of, f"{vdir.name} has instances"


def test_video_motion_is_visible_to_the_flow_proxy(tiny_shards: str) -> None:
    """The camera drives (forward, with a heading sway) and objects move, so a flow of zero
    (an untrained flow head's answer) scores clearly less than a real flow on the flow proxy
    (``FlowProxyIoU``: frame t's MOTS masks warped back to t-1, IoU per shared track id),
    while tracks still span most of a video (MOT association stays learnable).

    Bounds (seed 0 measures about 48 train / 48 val, vehicles 62 / 48; the static-camera
    videos measured 48 / 88, vehicles 81 / 88): 60 per split keeps a margin over seed 0 and
    fails for videos like the static ones, where the flow metric could show no gain; vehicles
    alone (pedestrians score low even with little motion: thin limbs) must move too."""
    vehicles = [B.THING_CATEGORIES.index(c) for c in ("car", "truck", "bus")]
    veh = FlowProxyIoU()
    for split in B.SPLITS:
        track = next(f for f in families_from_manifest(tiny_shards, split) if f.set_name == "track")
        frames = sorted(iter_frames(track.urls), key=lambda f: (f.record["video"], f.record["frame_index"]))
        mots = [f for f in frames if f.sources.get("mots")]
        zero = FlowProxyIoU()
        for a, b in zip(mots, mots[1:]):
            if a.record["video"] != b.record["video"]:
                continue
            assert b.record["frame_index"] == a.record["frame_index"] + 1
            prev, cur = (gt_instances(f.record["name"], f.targets, masks=True, video=f.record["video"],
                                      frame_index=f.record["frame_index"]) for f in (a, b))
            flow = np.zeros((*a.image.shape[1:], 2))
            zero.update(flow, prev, cur)
            veh.update(flow, *(replace(g, ignore=g.ignore_mask | ~np.isin(g.classes, vehicles)) for g in (prev, cur)))
        assert zero.count >= 10, f"{split}: too few MOTS instances in consecutive frames"
        assert zero.compute() < 60.0, f"{split}: a zero flow scores {zero.compute():.1f} on the flow proxy"
        # tracks persist: frames per (video, track id) over the MOT and MOTS videos of the split
        lengths = np.array(list(Counter((f.record["video"], int(t)) for f in frames
                                        for t in f.targets.track_ids.tolist()).values()))
        assert np.median(lengths) >= 6, f"{split}: track lengths {sorted(lengths)}"
        assert (lengths <= 2).mean() <= 0.25, f"{split}: track lengths {sorted(lengths)}"
    assert veh.count >= 10 and veh.compute() < 70.0, f"vehicles: a zero flow scores {veh.compute():.1f}"


def test_pose_labels(root: Path) -> None:
    green_left, green_right = [], []
    for split in B.SPLITS:
        det = {f["name"]: f for f in _load(root, Layout.det_json(split))}
        pose = _load(root, Layout.pose_json(split))
        assert 0.4 * len(det) <= len(pose) <= 0.6 * len(det), "about half the det images carry pose"
        assert sum(bool(f["labels"]) for f in pose) >= len(pose) * 0.75
        for f in pose:
            det_boxes = {lab["id"]: lab for lab in det[f["name"]]["labels"]}
            img = np.asarray(Image.open(root / Layout.images_100k(split) / f["name"]), dtype=np.float32)
            attrs = det[f["name"]]["attributes"]
            # colours as drawn: daylight without the weathers that grey or tint the image
            day = attrs["timeofday"] == "daytime" and attrs["weather"] in ("clear", "partly cloudy")
            for lab in f["labels"]:
                assert lab["category"] == "pedestrian" and lab["id"] in det_boxes
                assert lab["box2d"] == det_boxes[lab["id"]]["box2d"]
                g = lab["graph"]
                assert g["type"] == B.POSE_GRAPH_TYPE and g["edges"] == []
                assert [n["category"] for n in g["nodes"]] == list(B.POSE_JOINTS)
                xy = np.array([n["location"] for n in g["nodes"]])
                assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= W - 1).all()
                assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= H - 1).all()
                vis = [n["visibility"] for n in g["nodes"]]
                assert set(vis) <= {B.POSE_VISIBLE, B.POSE_NOT_VISIBLE}
                b = lab["box2d"]
                for n in g["nodes"]:
                    if n["visibility"] == B.POSE_VISIBLE:  # a visible joint lies on the person
                        x, y = n["location"]
                        assert b["x1"] - 1.5 <= x <= b["x2"] + 1.5 and b["y1"] - 1.5 <= y <= b["y2"] + 1.5
                head, ankles = xy[0], xy[[10, 13]]
                assert (head[1] < ankles[:, 1]).all(), "people stand upright"
                if day:  # left limbs are orange, right limbs red: compare green at knees and elbows
                    for joint, out in (("left_knee", green_left), ("left_elbow", green_left),
                                       ("right_knee", green_right), ("right_elbow", green_right)):
                        n = g["nodes"][B.POSE_JOINTS.index(joint)]
                        if n["visibility"] == B.POSE_VISIBLE:
                            x, y = (int(round(v)) for v in n["location"])
                            out.append(img[y, x, 1] - img[y, x, 0])
    vis_rate = np.mean([n["visibility"] == "V" for s in B.SPLITS for f in _load(root, Layout.pose_json(s))
                        for lab in f["labels"] for n in lab["graph"]["nodes"]])
    assert vis_rate > 0.7
    assert len(green_left) >= 5 and len(green_right) >= 5
    assert np.mean(green_left) > np.mean(green_right) + 40, "left and right limbs are told apart by colour"


def test_tags_are_visible(root: Path) -> None:
    """Night frames are darker than daytime frames (the tag is learnable from the pixels)."""
    bright = defaultdict(list)
    for split in B.SPLITS:
        for f in _load(root, Layout.det_json(split)):
            im = np.asarray(Image.open(root / Layout.images_100k(split) / f["name"]), dtype=np.float32)
            bright[f["attributes"]["timeofday"]].append(im.mean())
    assert bright["night"] and bright["daytime"]
    assert max(bright["night"]) < min(bright["daytime"])


def test_det_tags_share_one_distribution_across_splits(root: Path) -> None:
    """Tagging is learnt on det train and scored on det val: each split holds every tag value in
    proportion to its BDD100K-like frequency (within one image), so the splits agree however few
    images they have (seed 0 once drew 6 of 8 val images "city street", the train split mostly
    "highway", and a trained tagger scored 0 on val scenes)."""
    tables = {"weather": synth.scene._WEATHER_P, "scene": synth.scene._SCENE_P, "timeofday": synth.scene._TIME_P}
    for split in B.SPLITS:
        frames = _load(root, Layout.det_json(split))
        for key, table in tables.items():
            counts = Counter(f["attributes"][key] for f in frames)
            total = sum(table.values())
            for value, p in table.items():
                expected = len(frames) * p / total
                assert abs(counts[value] - expected) < 1.0, (split, key, value, counts[value], expected)
    train_scenes = Counter(f["attributes"]["scene"] for f in _load(root, Layout.det_json("train")))
    val_scenes = Counter(f["attributes"]["scene"] for f in _load(root, Layout.det_json("val")))
    assert set(val_scenes) <= set(train_scenes)
    assert train_scenes.most_common(1)[0][0] == val_scenes.most_common(1)[0][0] == "city street"


def test_scene_tag_changes_what_is_drawn() -> None:
    """The scene tag is learnable from the pixels: city streets are lined with facades, highways
    with verges and tree lines under open sky, residential streets with houses, lawns and trees
    behind sidewalks, tunnels with walls instead of sky (semantic class shares of the re-rendered
    det frames, averaged per scene)."""
    share: dict[str, list[dict[str, float]]] = defaultdict(list)
    for split in B.SPLITS:
        for i in range(SPEC.det[B.SPLITS.index(split)]):
            sc, fr = synth._still(SEED, SPEC, "det", split, i, pose=i % 2 == 0)
            share[sc.scene].append({c: float((fr.sem == B.SEM_CLASSES.index(c)).mean())
                                    for c in ("sidewalk", "building", "wall", "vegetation", "terrain", "sky")})
    mean = {scene: {c: float(np.mean([x[c] for x in v])) for c in v[0]} for scene, v in share.items()}
    city, highway, residential = mean["city street"], mean["highway"], mean["residential"]
    assert city["building"] > 0.25 and city["sidewalk"] > 0.05 and city["terrain"] == 0
    assert highway["building"] == 0 and highway["sidewalk"] == 0
    assert highway["vegetation"] + highway["terrain"] > 0.2 and highway["sky"] > 2 * city["sky"]
    assert residential["sidewalk"] > 0.05 and residential["vegetation"] > 0.05
    assert city["building"] > 2 * residential["building"] > 0
    if "tunnel" in mean:
        assert mean["tunnel"]["wall"] > 0.3 and mean["tunnel"]["sky"] == 0


# ---------------------------------------------------------------------------------------------
# Determinism, overwrite, argument checks
# ---------------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "summary.json"}


def test_same_seed_is_byte_identical_and_overwrite_replaces(root: Path, summary: dict, tmp_path: Path) -> None:
    again = tmp_path / "again"
    stale = again / Layout.images_100k("train") / "stale.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=str(again)):
        synth.generate(again, seed=SEED, size="tiny")
    s2 = synth.generate(again, seed=SEED, size="tiny", overwrite=True)
    assert not stale.exists(), "overwrite removes the previous layout"
    assert s2["sets"] == summary["sets"]
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_refuses_existing_layout_without_overwrite(root: Path) -> None:
    with pytest.raises(FileExistsError, match=str(root)):
        synth.generate(root, seed=SEED, size="tiny")


def test_different_seed_differs(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1"
    synth.generate(other, seed=1, size="tiny")
    det0 = _load(root, Layout.det_json("train"))
    det1 = _load(other, Layout.det_json("train"))
    assert {f["name"] for f in det0}.isdisjoint(f["name"] for f in det1)
    img0 = (root / Layout.images_100k("train") / det0[0]["name"]).read_bytes()
    img1 = (other / Layout.images_100k("train") / det1[0]["name"]).read_bytes()
    assert img0 != img1
    assert [len(f["labels"]) for f in det0] != [len(f["labels"]) for f in det1]


@pytest.mark.parametrize("kw", [{"size": "huge"}, {"seed": -1}, {"seed": 1.5}])
def test_bad_arguments(tmp_path: Path, kw: dict) -> None:
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "x", **kw)
