"""Cityscapes-3D data: the synthetic generator (layout, determinism, geometry that agrees with the
camera), the converter into the project's shards and manifest (round trip, strictness on bad
input, atomic output) and ``vtd data convert --format cityscapes3d SRC OUT``."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cityscapes3d import geometry as G
from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d
from data_pipeline.cityscapes3d.decode import iter_cityscapes_frames
from data_pipeline.cityscapes3d.format import LABEL_TO_TRAIN, Layout, disparity_to_png, png_to_depth
from data_pipeline.cityscapes3d.synth import generate
from data_pipeline.errors import DataError
from data_pipeline.shards.manifest import families_from_manifest


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cs3d") / "root"
    generate(root, seed=3, size="tiny")
    return root


@pytest.fixture(scope="module")
def cs_shards(cs_root, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cs3d") / "shards")
    convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(cs_root), out=out, shard_size=3, progress=False))
    return out


def _copy(cs_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(cs_root, dst)
    return dst


def _first(root: Path, kind: str) -> Path:
    return sorted((root / Layout.folder(kind, "train")).rglob(f"*_{Layout.KINDS[kind][1]}"))[0]


# ------------------------------------------------------------------------------ generator


def test_layout_and_determinism(cs_root, tmp_path):
    bases = {p.name[: -len("_leftImg8bit.png")] for p in (cs_root / "leftImg8bit/train").rglob("*.png")}
    assert len(bases) == 8
    for kind in Layout.KINDS:
        found = {Layout.base_of(p.name, kind) for p in (cs_root / Layout.folder(kind, "train")).rglob(f"*_{Layout.KINDS[kind][1]}")}
        assert found == bases, kind
    im = Image.open(_first(cs_root, "image"))
    assert (im.mode, im.size) == ("RGB", (256, 128))
    assert Image.open(_first(cs_root, "disparity")).mode == "I;16"
    again = tmp_path / "again"
    generate(again, seed=3, size="tiny")
    for p in sorted(cs_root.rglob("*"))[:40]:
        if p.is_file():
            assert (again / p.relative_to(cs_root)).read_bytes() == p.read_bytes(), p
    other = tmp_path / "other"
    generate(other, seed=4, size="tiny")
    assert (other / _first(cs_root, "image").relative_to(cs_root)).read_bytes() != _first(cs_root, "image").read_bytes()


def test_sensor_transform_matches_a_published_file():
    # gtBbox3d sensor of a real frame (camera x 1.7, y 0.1, z 1.22, pitch 0.038, yaw -0.0195)
    published = [[0.9990881051503779, -0.01948468779721943, -0.03799085532693703, -1.6501524664770573],
                 [0.019498764210995674, 0.9998098810245096, 0.0, -0.1331288872611436],
                 [0.03798363254444427, -0.0007407747301939942, 0.9992780868764849, -1.2836173638418473]]
    np.testing.assert_allclose(G.sensor_T_iso8855(1.7, 0.1, 1.22, -0.0195, 0.038, 0.0), published, atol=2e-4)
    t = np.array(published)
    center, quat = [13.44, 4.96, 0.43], [0.025170217294186586, -0.005345692810268406, -0.039964886777854036, -0.9988697069961501]
    c_s, euler = G.box_v_to_s(center, quat, t)
    c_v, q_v = G.box_s_to_v(c_s, euler, t)
    np.testing.assert_allclose(c_v, center, atol=1e-9)
    assert abs(abs(np.dot(q_v, quat)) - 1.0) < 1e-9  # the same rotation (q and -q)


def test_boxes_agree_with_camera_depth_and_labels(cs_root):
    for path in sorted((cs_root / "gtBbox3d/train").rglob("*.json")):
        doc = json.loads(path.read_text())
        s = doc["sensor"]
        base = Layout.base_of(path.name, "bbox3d")
        city = path.parent.name
        cam = json.loads((cs_root / Layout.path("camera", "train", city, base)).read_text())
        assert cam["intrinsic"]["fx"] == s["fx"] and cam["extrinsic"]["baseline"] == s["baseline"]
        np.testing.assert_allclose(G.sensor_T_iso8855(**{k: cam["extrinsic"][k] for k in ("x", "y", "z", "yaw", "pitch", "roll")}),
                                   s["sensor_T_ISO_8855"], atol=1e-9)
        depth = png_to_depth(np.asarray(Image.open(cs_root / Layout.path("disparity", "train", city, base))), s["baseline"], s["fx"])
        inst = np.asarray(Image.open(cs_root / f"gtFine/train/{city}/{base}_gtFine_instanceIds.png"))
        assert doc["objects"]
        for obj in doc["objects"]:
            c_s, _ = G.box_v_to_s(obj["3d"]["center"], obj["3d"]["rotation"], s["sensor_T_ISO_8855"])
            u, v = G.project(c_s[None], s["fx"], s["fy"], s["u0"], s["v0"])[0]
            x, y, w, h = obj["2d"]["amodal"]
            assert x <= u <= x + w and y <= v <= y + h
            mx, my, mw, mh = obj["2d"]["modal"]
            assert x - 1 <= mx and mx + mw <= x + w + 2 and y - 1 <= my and my + mh <= y + h + 2  # modal inside amodal
            # the visible pixels' depth lies within the box's depth extent (disparity quantisation: 1 %)
            corners = G.v_to_s(G.box_corners(obj["3d"]["center"], obj["3d"]["dimensions"], G.quat_to_matrix(obj["3d"]["rotation"])),
                               s["sensor_T_ISO_8855"])
            d = depth[inst == obj["instanceId"]]
            assert d.size >= 12
            assert corners[:, 2].min() * 0.99 <= d.min() and d.max() <= corners[:, 2].max() * 1.01


def test_disparity_encoding_round_trip():
    d = np.array([[0.0, 1.0, 37.25, 255.9]])
    p = disparity_to_png(d)
    assert p.tolist() == [[0, 257, 9537, 65511]]
    np.testing.assert_allclose(png_to_depth(p, 0.2, 100.0), [[0.0, 20.0, 20.0 / 37.25, 20.0 / (65510 / 256)]], rtol=1e-6)


# ------------------------------------------------------------------------------ converter


def test_convert_round_trip(cs_root, cs_shards):
    manifest = json.loads((Path(cs_shards) / "manifest.json").read_text())
    assert manifest["benchmark"] == "cityscapes3d"
    train = manifest["sets"]["cityscapes/train"]
    assert [sh["samples"] for sh in train["shards"]] == [3, 3, 2]
    assert train["tasks"]["det3d"]["samples"] == 8 and train["tasks"]["sem"]["samples"] == 8
    assert {k for sh in train["shards"] for k in sh["label_sets"]} == {"sem,depth,det3d"}
    fams = families_from_manifest(cs_shards, "train")
    assert [f.set_name for f in fams] == ["cityscapes"] and sum(f.shard_frames[0] for f in fams) == 3
    n_boxes = 0
    for fr in iter_cityscapes_frames(cs_shards, "train"):
        rec, city = fr.record, fr.record["city"]
        img = cs_root / Layout.path("image", "train", city, rec["name"])
        np.testing.assert_array_equal(fr.image, np.asarray(Image.open(img)))
        ids = np.asarray(Image.open(cs_root / Layout.path("label_ids", "train", city, rec["name"])))
        np.testing.assert_array_equal(fr.sem, LABEL_TO_TRAIN[ids])
        doc = json.loads((cs_root / Layout.path("bbox3d", "train", city, rec["name"])).read_text())
        p = np.asarray(Image.open(cs_root / Layout.path("disparity", "train", city, rec["name"])))
        np.testing.assert_allclose(fr.depth, png_to_depth(p, doc["sensor"]["baseline"], doc["sensor"]["fx"]))
        assert rec["camera"]["sensor_T_ISO_8855"] == doc["sensor"]["sensor_T_ISO_8855"]
        assert [b["center"] for b in rec["boxes3d"]] == [o["3d"]["center"] for o in doc["objects"]]
        x, y, w, h = doc["objects"][0]["2d"]["amodal"]
        assert rec["boxes3d"][0]["amodal"] == [x, y, x + w, y + h]
        n_boxes += len(rec["boxes3d"])
    assert n_boxes == train["tasks"]["det3d"]["instances"] > 8


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _put_png(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _corrupt_label(root: Path) -> Path:
    p = _first(root, "label_ids")
    a = np.asarray(Image.open(p)).copy()
    a[0, 0] = 40
    _put_png(p, a)
    return p


CASES = {
    "label id": (_corrupt_label, "label_ids", "[40]"),
    "unknown label": (lambda r: _edit_json(p := _first(r, "bbox3d"), lambda d: d["objects"][0].update(label="spaceship")) or p,
                      "objects[0].label", "'spaceship'"),
    "not a unit quaternion": (lambda r: _edit_json(p := _first(r, "bbox3d"), lambda d: d["objects"][0]["3d"].update(rotation=[1, 1, 0, 0]))
                              or p, "objects[0].3d.rotation", "[1.0, 1.0, 0.0, 0.0]"),
    "negative size": (lambda r: _edit_json(p := _first(r, "bbox3d"), lambda d: d["objects"][0]["3d"].update(dimensions=[4, -1, 1.5]))
                      or p, "objects[0].3d.dimensions", "[4, -1, 1.5]"),
    "image size": (lambda r: _edit_json(p := _first(r, "bbox3d"), lambda d: d.update(imgWidth=2048)) or p, "imgWidth", "2048"),
    "camera fx": (lambda r: _edit_json(p := _first(r, "camera"), lambda d: d["intrinsic"].update(fx="wide")) or p,
                  "intrinsic.fx", "'wide'"),
    "sensor vs camera": (lambda r: _edit_json(p := _first(r, "bbox3d"), lambda d: d["sensor"].update(fx=d["sensor"]["fx"] * 1.01)) or p,
                         "sensor.fx", "differs from the camera JSON"),
    "8-bit disparity": (lambda r: _put_png(p := _first(r, "disparity"), np.zeros((128, 256), np.uint8)) or p, "disparity", "mode L"),
    "truncated image": (lambda r: _truncate(_first(r, "image")), "image", "corrupt PNG"),
    "orphan label": (lambda r: _remove(_first(r, "image")), "image", "missing image (labelled in"),
}


def _truncate(p: Path) -> Path:
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _remove(p: Path) -> Path:
    p.unlink()
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named_and_nothing_is_left(case, cs_root, tmp_path):
    corrupt, field, value = CASES[case]
    root = _copy(cs_root, tmp_path)
    bad_file = corrupt(root)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(root), out=str(out), shard_size=3, progress=False))
    msg = str(err.value)
    assert str(bad_file) in msg and field in msg and value in msg, msg
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # atomic writes: no debris
    # skip mode: the frame is left out and listed, everything else converted
    m = convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(root), out=str(out), shard_size=3, on_error="skip", progress=False))
    items = m["sets"]["cityscapes/train"]["skipped"]["items"]
    assert len(items) == 1 and items[0]["file"] == str(bad_file) and field in items[0]["field"]
    assert m["sets"]["cityscapes/train"]["samples"] == 7


def test_cli_convert_positional(cs_root, tmp_path, capsys):
    from vtd_train.cli import main

    out = tmp_path / "cli"
    assert main(["data", "convert", "--format", "cityscapes3d", str(cs_root), str(out), "--quiet", "--splits", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"]["det3d"]["samples"] == 4
    assert main(["data", "convert", "--format", "cityscapes3d", str(cs_root), str(out), "--quiet", "--sets", "det"]) == 2
    assert "--sets" in capsys.readouterr().err


def test_inspect_reads_cityscapes3d_shards(cs_shards, tmp_path, capsys):
    """``vtd data inspect`` decodes every sample with the Cityscapes-3D reader and counts what the
    converter's manifest counts; a damaged shard is named."""
    from data_pipeline.shards.inspect import inspect_shards
    from vtd_train.cli import main

    report = inspect_shards(cs_shards)
    manifest = json.loads((Path(cs_shards) / "manifest.json").read_text())
    assert report["benchmark"] == "cityscapes3d"
    for key in ("cityscapes/train", "cityscapes/val"):
        got, want = report["sets"][key], manifest["sets"][key]
        assert list(got["tasks"]) == ["sem", "depth", "det3d"] and got["tasks"] == want["tasks"]
        assert (got["samples"], got["shards"]) == (want["samples"], len(want["shards"]))
    assert report["totals"]["tasks"]["det3d"]["instances"] > 0
    assert main(["data", "inspect", cs_shards]) == 0
    assert "cityscapes/val: 4 frames" in capsys.readouterr().out

    bad = tmp_path / "shards"
    shutil.copytree(cs_shards, bad)
    shard = bad / manifest["sets"]["cityscapes/val"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cityscapes-val-000000\.tar.*truncated"):
        inspect_shards(str(bad))
