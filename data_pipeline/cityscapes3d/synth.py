"""A deterministic synthetic Cityscapes-3D root (``vtd data synth --format cityscapes3d``).

Writes the published layout (:mod:`.format`): 8-bit RGB ``leftImg8bit`` PNGs, ``gtFine``
label-id (and instance-id) PNGs, 16-bit ``disparity`` PNGs, ``camera`` JSON and ``gtBbox3d``
JSON, so the converter, model and the official 3D evaluation run on it unchanged.

Every frame is ray-cast from a calibrated camera (Cityscapes' focal length relative to the image
width, its stereo baseline, a camera 1.1-1.3 m above the ground with a small random pitch and
yaw), so all labels come from one geometry and agree with each other and with the camera:

* a straight street along V's x axis: road (with a dashed centre line and a world-space checker
  texture), sidewalks, building facades of random height on both sides (windows on a world grid),
  sky above; the ego vehicle's hood covers the bottom rows (label ``ego vehicle``, no disparity),
  as in the real images;
* 2-5 vehicles (car, truck, bus: class-specific sizes and colours) standing on the road from
  6 m + their length to 45 m ahead, heading along or against the street (yaw noise ±0.15 rad),
  never overlapping, their projected 3D centre inside the image; a vehicle left with fewer than
  12 visible pixels is removed from the scene and the frame drawn again without it;
* depth is the ray's S-frame z; disparity ``baseline·fx/depth`` (sky, hood and anything beyond
  120 m invalid); colours fade into a haze with depth (``exp(-depth / 60 m)``), so depth is
  visible in the pixels as well as in the perspective.

The ``gtBbox3d`` boxes are the rendered boxes: centre in V, ``(length, width, height)``, the yaw
quaternion, the amodal 2D box from the projected corners (clipped to the image) and the modal box
from the visible pixels. Sizes: ``tiny`` 128×256 (8 train, 4 val frames) for tests, ``small``
256×512 (48 / 16).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from data_pipeline.errors import VTDInputError

from . import geometry as G
from .format import CITIES, LABEL_ID, Layout, disparity_to_png

#: Cityscapes' stereo baseline (m) and focal length as a fraction of the image width (2262.52 / 2048).
BASELINE: Final = 0.209313
FX_PER_WIDTH: Final = 2262.52 / 2048
MAX_DEPTH: Final = 120.0
HAZE: Final = np.array([185.0, 195.0, 205.0])
_MIN_VISIBLE: Final = 12

#: Vehicle classes drawn: (class, probability, length, width, height ranges in m, colours).
_VEHICLES: Final = (
    ("car", 0.7, (3.9, 4.7), (1.7, 1.9), (1.4, 1.6), ((30, 60, 170), (150, 30, 30), (40, 120, 60), (200, 200, 210))),
    ("truck", 0.15, (6.0, 8.0), (2.3, 2.5), (2.8, 3.2), ((220, 130, 40),)),
    ("bus", 0.15, (10.0, 12.0), (2.5, 2.55), (3.0, 3.2), ((230, 200, 40),)),
)


@dataclass(frozen=True)
class SynthSize:
    height: int
    width: int
    frames: dict[str, int]


SIZES: Final = {
    "tiny": SynthSize(128, 256, {"train": 8, "val": 4}),
    "small": SynthSize(256, 512, {"train": 48, "val": 16}),
}


@dataclass
class _Vehicle:
    label: str
    center: np.ndarray  # V, m
    dims: tuple[float, float, float]  # length, width, height
    yaw: float
    color: np.ndarray


def _scene(rng: np.random.Generator, size: SynthSize) -> dict[str, Any]:
    w, h = size.width, size.height
    cam = {"x": 1.7, "y": 0.1, "z": float(rng.uniform(1.1, 1.3)), "yaw": float(rng.uniform(-0.02, 0.02)),
           "pitch": float(rng.uniform(0.0, 0.04)), "roll": 0.0}
    intr = {"fx": FX_PER_WIDTH * w, "fy": FX_PER_WIDTH * w * 1.0012, "u0": w * 0.535, "v0": h * 0.5}
    road_half = float(rng.uniform(4.0, 6.0))
    side = float(rng.uniform(2.0, 3.5))
    return {
        "camera": cam, "intrinsic": intr, "road_center": float(rng.uniform(-0.8, 0.8)), "road_half": road_half,
        "facade": (road_half + side, road_half + side + float(rng.uniform(0.0, 1.5))),
        "facade_height": (float(rng.uniform(8, 20)), float(rng.uniform(8, 20))),
        "facade_color": (rng.uniform(90, 200, 3), rng.uniform(90, 200, 3)),
    }


def _place_vehicles(rng: np.random.Generator, sc: dict, sensor_t: np.ndarray, size: SynthSize) -> list[_Vehicle]:
    intr = sc["intrinsic"]
    out: list[_Vehicle] = []
    probs = np.array([v[1] for v in _VEHICLES])
    want = int(rng.integers(2, 6))
    for _ in range(60):  # attempts
        if len(out) == want:
            break
        label, _, lr, wr, hr, colors = _VEHICLES[int(rng.choice(len(_VEHICLES), p=probs))]
        dims = (float(rng.uniform(*lr)), float(rng.uniform(*wr)), float(rng.uniform(*hr)))
        lateral = sc["road_half"] - dims[1] / 2 - 0.2
        x = float(rng.uniform(6.0 + dims[0], 45.0))  # big vehicles start farther away
        y = sc["road_center"] + float(rng.uniform(-lateral, lateral))
        yaw = float((0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0.0, 0.15))
        center = np.array([x, y, dims[2] / 2])
        if any(abs(v.center[0] - x) < (v.dims[0] + dims[0]) / 2 + 1.0 and abs(v.center[1] - y) < (v.dims[1] + dims[1]) / 2 + 0.4
               for v in out):
            continue
        c_s = G.v_to_s(center[None], sensor_t)[0]
        u, v = G.project(c_s[None], intr["fx"], intr["fy"], intr["u0"], intr["v0"])[0]
        if not (2 <= u < size.width - 2 and 2 <= v < size.height - 2):
            continue
        if G.amodal_box(center, dims, G.yaw_quat(yaw), sensor_t, **_intr_size(intr, size)) is None:
            continue
        color = np.array(colors[int(rng.integers(len(colors)))], dtype=np.float64) + rng.normal(0, 8, 3)
        out.append(_Vehicle(label, center, dims, yaw, color))
    return out


def _intr_size(intr: dict, size: SynthSize) -> dict:
    return {"fx": intr["fx"], "fy": intr["fy"], "u0": intr["u0"], "v0": intr["v0"], "width": size.width, "height": size.height}


def _rays(sc: dict, sensor_t: np.ndarray, size: SynthSize) -> tuple[np.ndarray, np.ndarray]:
    """Camera origin in V ``[3]`` and per-pixel ray directions in V ``[H, W, 3]`` scaled so that
    the ray parameter equals the S-frame depth."""
    intr = sc["intrinsic"]
    vv, uu = np.mgrid[0:size.height, 0:size.width].astype(np.float64) + 0.5
    d_s = np.stack([(uu - intr["u0"]) / intr["fx"], (vv - intr["v0"]) / intr["fy"], np.ones_like(uu)], axis=-1)
    r = sensor_t[:, :3]
    d_v = d_s @ G.K_MULT @ r  # S → C (Kᵀ), C → V (Rᵀ), as row vectors
    origin = -r.T @ sensor_t[:, 3]
    return origin, d_v


def _render(sc: dict, vehicles: list[_Vehicle], sensor_t: np.ndarray, size: SynthSize):
    """(rgb uint8 [H,W,3], label ids uint8, instance ids uint16, depth float [H,W] (0 = none),
    per-vehicle visible masks, per-vehicle silhouettes)."""
    o, d = _rays(sc, sensor_t, size)
    H, W = size.height, size.width
    depth = np.full((H, W), np.inf)
    label = np.full((H, W), LABEL_ID["sky"], dtype=np.uint8)
    color = np.zeros((H, W, 3))
    inst = np.full((H, W), -1, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # ground plane z = 0
        t = np.where(d[..., 2] < -1e-9, -o[2] / d[..., 2], np.inf)
        p = o + d * t[..., None]
        lat = p[..., 1] - sc["road_center"]
        on_road = np.abs(lat) <= sc["road_half"]
        checker = ((np.floor(p[..., 0] / 2.0) + np.floor(p[..., 1] / 1.0)) % 2) * 14 - 7
        road = np.array([88.0, 88.0, 96.0]) + checker[..., None]
        dash = (np.abs(lat) < 0.08) & ((p[..., 0] % 6.0) < 3.0)
        road[dash] = (235, 235, 235)
        walk = np.array([175.0, 150.0, 165.0]) + (((np.floor(p[..., 0] / 1.5) + np.floor(p[..., 1] / 1.5)) % 2) * 16 - 8)[..., None]
        hit = np.isfinite(t) & (t > 0)
        _take(hit, t, depth, label, color, inst, np.where(on_road, LABEL_ID["road"], LABEL_ID["sidewalk"]),
              np.where(on_road[..., None], road, walk))
        # facades: y = +left (d_y > 0) and y = -right (d_y < 0)
        for k, (y_f, sign) in enumerate(((sc["facade"][0], 1.0), (-sc["facade"][1], -1.0))):
            t = np.where(sign * d[..., 1] > 1e-9, (y_f - o[1]) / d[..., 1], np.inf)
            p = o + d * t[..., None]
            ok = np.isfinite(t) & (p[..., 2] >= 0) & (p[..., 2] <= sc["facade_height"][k]) & (p[..., 0] > 0)
            win = ((p[..., 0] % 3.0) > 1.0) & ((p[..., 2] % 3.0) > 1.2) & (p[..., 2] > 1.5)
            fc = np.broadcast_to(sc["facade_color"][k], (H, W, 3)) * np.where(win, 0.55, 1.0)[..., None]
            _take(ok, t, depth, label, color, inst, LABEL_ID["building"], fc)
        silhouettes = []
        for k, veh in enumerate(vehicles):
            rot = G.quat_to_matrix(G.yaw_quat(veh.yaw))
            lo, ld = (o - veh.center) @ rot, d @ rot  # into the box frame
            half = np.array(veh.dims) / 2
            t1, t2 = (-half - lo) / ld, (half - lo) / ld
            tn, tf = np.minimum(t1, t2).max(axis=-1), np.maximum(t1, t2).min(axis=-1)
            ok = (tn <= tf) & (tf > 0)
            tn = np.where(ok, np.maximum(tn, 1e-6), np.inf)
            silhouettes.append(ok)
            q = lo + ld * tn[..., None]  # hit point in the box frame
            rel_h = (q[..., 2] + half[2]) / veh.dims[2]
            shade = np.where(rel_h < 0.25, 0.35, np.where(rel_h > 0.62, 0.6, 1.0))
            vc = np.broadcast_to(veh.color, (H, W, 3)) * shade[..., None]
            _take(ok, tn, depth, label, color, inst, LABEL_ID[veh.label], vc, instance=k)
    # sky (no hit) gradient, then haze by depth
    sky = depth == np.inf
    vv = np.linspace(0, 1, H)[:, None, None]
    color[sky] = np.broadcast_to(np.array([90.0, 140.0, 200.0]) + vv * 60, (H, W, 3))[sky]
    fade = np.exp(-np.where(sky, 0.0, depth) / 60.0)[..., None]
    color = np.where(sky[..., None], color, color * fade + HAZE * (1 - fade))
    # the ego vehicle's hood: a dark arc over the bottom rows
    uu = (np.arange(W) - W / 2) / (W / 2)
    hood_top = H - 1 - (0.09 * H) * (1 - 0.5 * uu**2)
    hood = np.arange(H)[:, None] >= hood_top[None, :]
    label[hood] = LABEL_ID["ego vehicle"]
    color[hood] = (25, 25, 30)
    inst[hood] = -1
    depth = np.where(sky | hood | (depth > MAX_DEPTH), 0.0, depth)
    visible = [inst == k for k in range(len(vehicles))]
    return color, label, inst, depth, visible, silhouettes


def _take(hit, t, depth, label, color, inst, lab, col, instance: int = -1) -> None:
    """Z-buffer: where ``hit`` and nearer than what is there, write this surface."""
    nearer = hit & (t < depth)
    depth[nearer] = t[nearer]
    label[nearer] = lab[nearer] if isinstance(lab, np.ndarray) else lab
    color[nearer] = col[nearer]
    inst[nearer] = instance


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_frame(seed: int, split: str, index: int, size: SynthSize) -> dict[str, bytes]:
    """One frame's files ``{kind: bytes}`` (kinds of :class:`.format.Layout`), deterministic in
    ``(seed, split, index)``."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), index])
    sc = _scene(rng, size)
    cam, intr = sc["camera"], sc["intrinsic"]
    sensor_t = G.sensor_T_iso8855(cam["x"], cam["y"], cam["z"], cam["yaw"], cam["pitch"], cam["roll"])
    vehicles = _place_vehicles(rng, sc, sensor_t, size)
    while True:
        color, label, inst, depth, visible, silhouettes = _render(sc, vehicles, sensor_t, size)
        hidden = [k for k, m in enumerate(visible) if m.sum() < _MIN_VISIBLE]
        if not hidden:
            break
        vehicles = [v for k, v in enumerate(vehicles) if k not in hidden]
    color = np.clip(color + rng.normal(0, 3.0, color.shape), 0, 255).astype(np.uint8)
    inst_ids = label.astype(np.uint16)
    objects = []
    for k, veh in enumerate(vehicles):
        iid = LABEL_ID[veh.label] * 1000 + k
        inst_ids[visible[k]] = iid
        ys, xs = np.nonzero(visible[k])
        modal = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        q = G.yaw_quat(veh.yaw)
        am = G.amodal_box(veh.center, veh.dims, q, sensor_t, **_intr_size(intr, size))
        objects.append({
            "2d": {"modal": modal, "amodal": [round(am[0], 2), round(am[1], 2), round(am[2] - am[0], 2), round(am[3] - am[1], 2)]},
            "3d": {"center": [round(float(c), 4) for c in veh.center], "dimensions": [round(x, 4) for x in veh.dims],
                   "rotation": [round(x, 8) for x in q], "type": {"car": "Mid Size Car"}.get(veh.label, veh.label.title()),
                   "format": "CRS_ISO8855"},
            "occlusion": round(1.0 - float(visible[k].sum()) / max(1.0, float(silhouettes[k].sum())), 3),
            "truncation": 0.0, "instanceId": iid, "label": veh.label, "score": 1.0,
        })
    with np.errstate(divide="ignore"):
        disparity = np.where(depth > 0, BASELINE * intr["fx"] / np.where(depth > 0, depth, 1.0), 0.0)
    camera_json = {"extrinsic": {"baseline": BASELINE, **{k: cam[k] for k in ("pitch", "roll", "x", "y", "yaw", "z")}},
                   "intrinsic": {k: intr[k] for k in ("fx", "fy", "u0", "v0")}}
    bbox_json = {"imgWidth": size.width, "imgHeight": size.height,
                 "sensor": {"sensor_T_ISO_8855": sensor_t.tolist(), **intr, "baseline": BASELINE},
                 "objects": objects, "ignore": []}
    return {
        "image": _png(color), "label_ids": _png(label), "instance_ids": _png(inst_ids.astype(np.uint16)),
        "disparity": _png(disparity_to_png(disparity)),
        "camera": json.dumps(camera_json, indent=4).encode(), "bbox3d": json.dumps(bbox_json, indent=4).encode(),
    }


def generate(out: str | Path, seed: int = 0, size: str = "tiny", overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic Cityscapes-3D root to ``out``; returns ``{"root", "seed", "size",
    "image_size", "splits": {split: {"images", "objects": {class: n}}}, "files"}``. The same seed
    gives byte-identical files. Raises ``FileExistsError`` when ``out`` holds any of the dataset's
    folders and ``overwrite`` is false (with it, those folders are deleted first)."""
    if size not in SIZES:
        raise VTDInputError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise VTDInputError(f"seed must be a non-negative integer, got {seed!r}")
    spec, root = SIZES[size], Path(out)
    folders = [root / f for f, _ in Layout.KINDS.values()]
    if any(f.exists() for f in folders):
        if not overwrite:
            raise FileExistsError(f"{root} already holds a Cityscapes layout; pass overwrite=True (--overwrite) to replace it")
        for f in folders:
            shutil.rmtree(f, ignore_errors=True)
    summary: dict[str, Any] = {"root": str(root), "seed": seed, "size": size,
                               "image_size": {"width": spec.width, "height": spec.height}, "splits": {}, "files": 0}
    for split, n in spec.frames.items():
        objects: dict[str, int] = {}
        for i in range(n):
            city = CITIES[split][i % len(CITIES[split])]
            base = f"{city}_{i // len(CITIES[split]):06d}_{19 + i:06d}"
            files = render_frame(seed, split, i, spec)
            for kind, data in files.items():
                rel = (Layout.path(kind, split, city, base) if kind != "instance_ids"
                       else f"gtFine/{split}/{city}/{base}_gtFine_instanceIds.png")
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                summary["files"] += 1
            for obj in json.loads(files["bbox3d"])["objects"]:
                objects[obj["label"]] = objects.get(obj["label"], 0) + 1
        summary["splits"][split] = {"images": n, "objects": dict(sorted(objects.items()))}
    return summary
