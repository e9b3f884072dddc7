"""Deterministic BDD100K-format mini dataset (``vtd data synth``).

:func:`generate` writes a small but *real-format* BDD100K root: JPEG frames and Scalabel JSON /
PNG labels at exactly the paths of the extracted dataset (:class:`bdd100k.Layout`), so that the
converter, loader, model and metrics run on it unchanged. The scenes are drawn so that a tiny
CNN can learn every task in a few CPU minutes:

* a straight road in perspective (vanishing point near the image centre) split into lanes; the
  ego lane is ``direct`` drivable area, lanes of the ego's direction are ``alternative``,
  oncoming lanes (beyond a double/single yellow centre line) and everything else background;
* lane markings painted with one colour per category (white, yellow, light-grey curb) and
  labelled as open polylines of constant width in the lane mask;
* sky at the top; the *scene* tag fixes the background structure (city street: tall facades
  with windows; residential: houses, lawns and trees; highway: terrain, guard rails, tree
  lines; tunnel: walls and ceiling lamps; parking lot: stall lines, parked cars; gas stations:
  a canopy with pumps; undefined: bare terrain); the *weather* tag changes the global tint,
  contrast, fog, rain streaks or snow, and the *time of day* the brightness (night keeps only
  lamps, tail lights and lit windows bright);
* objects are simple shapes with one look per class: car = blue box with a dark cabin and
  red tail lights, truck = tall orange box, bus = yellow box with a dark rear window, train =
  silver side-view carriage, pedestrian = stick figure (red right limbs, orange left limbs,
  dark-red torso, skin head) whose joints are the pose keypoints, rider = magenta seated
  figure on a teal bicycle or purple motorcycle, traffic light = black box with one lit lamp on
  a grey pole, traffic sign = yellow diamond / red disc / blue plate on a pole.

Every shape is drawn at once into the image, the semantic map and the instance map
(:class:`_Canvas`), so masks are exactly the drawn pixels; boxes are the extent of an object's
visible pixels in Scalabel's convention (``x2``/``y2`` inclusive, like
``scalabel.label.transforms.mask_to_box2d``). Objects are painted far to near; an object left
with too few visible pixels is removed and the frame redrawn without it, so no drawn pixel is
unlabelled.

Videos are filmed from a driving camera (:class:`_Ego`): it moves forward along its lane at a
per-scene speed (about 0.2-0.6 m per frame in parking lots up to 1.8-2.4 on highways; frames
stand for BDD100K's 5 fps) with a slow heading sway (yaw) that shifts the vanishing point by a
few pixels per frame (amplitude 5-10 px at tiny) and drifts the camera sideways. Actors and scenery have fixed world
positions; each frame is drawn from the camera's pose, background included (the straight road
and its solid lines stay put, while lane dashes, crosswalks, facades, houses, tree lines and
lamps come closer), so consecutive frames differ by a consistent motion field. Static things
(parked cars, bins, poles, trees) come closer and move outwards; vehicles of the ego's
direction drive at about its speed (relative speed up to +-1.2 m per frame, some change lane),
oncoming ones pass at about twice it; people walk, riders cross, and one actor often heads
out sideways. Objects keep their track id; near ones leave the frame. At tiny's resolution
objects move several pixels per frame: a zero flow scores about 48 on the flow proxy
(``vtd_train.evaluation.flow``) of seed 0's MOTS videos. Still images (det, seg) are drawn
from a camera at rest and are unaffected by the video motion.

Conventions of the written files (relative to the output root, ``{s}`` = train | val):

=================================================  ==============================================
``images/100k/{s}/<name>.jpg``                      det set frames (det, tag, pose, drivable, lane)
``labels/det_20/det_{s}.json``                      Scalabel frames: name, attributes, labels
``labels/pose_21/pose_{s}.json``                    about half of the det frames: pedestrian graphs
``labels/drivable/masks/{s}/<stem>.png``            L: 0 direct, 1 alternative, 2 background
``labels/lane/masks/{s}/<stem>.png``                L: bdd100k.encode_lane bytes, 255 background
``images/10k/{s}/<name>.jpg``                       seg set frames
``labels/sem_seg/masks/{s}/<stem>.png``             L: train ids 0..18, 255 ignore
``labels/ins_seg/bitmasks/{s}/<stem>.png``          RGBA: bdd100k.encode_bitmask
``images/track/{s}/<video>/<video>-<i:07d>.jpg``    MOT videos, frameIndex ``i`` from 0
``labels/box_track_20/{s}/<video>.json``            Scalabel frames with videoName, frameIndex
``images/seg_track_20/{s}/<video>/<frame>.jpg``     MOTS videos (other videos than MOT)
``labels/seg_track_20/bitmasks/{s}/<video>/<frame>.png``  RGBA, instance id = track id
=================================================  ==============================================

Determinism: every image and video draws from its own ``numpy`` generator seeded with
``(seed, stream, split, index)`` and names come from BLAKE2 of the same tuple, so one seed
gives byte-identical files (PIL's JPEG and PNG encoders are deterministic) and the order of
generation does not matter.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipeline import bdd100k as B
from data_pipeline.bdd100k import Layout

__all__ = ["SIZES", "SynthSize", "generate"]


# ---------------------------------------------------------------------------------------------
# Size table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SynthSize:
    """Image size and per-split counts of one ``--size`` preset; pairs are ``(train, val)``."""

    width: int
    height: int
    det: tuple[int, int]  # det-set images (100k); about half of them also carry pose labels
    seg: tuple[int, int]  # seg-set images (10k)
    track_videos: tuple[int, int]  # MOT videos (box_track_20)
    mots_videos: tuple[int, int]  # MOTS videos (seg_track_20)
    frames_per_video: int = 8


SIZES: Final[dict[str, SynthSize]] = {
    "tiny": SynthSize(width=160, height=96, det=(24, 8), seg=(12, 4), track_videos=(3, 1), mots_videos=(2, 1)),
    "small": SynthSize(width=320, height=192, det=(72, 24), seg=(36, 12), track_videos=(9, 3), mots_videos=(6, 3)),
    # Loader benchmark: real BDD100K resolution, tiny's counts.
    "full": SynthSize(width=1280, height=720, det=(24, 8), seg=(12, 4), track_videos=(3, 1), mots_videos=(2, 1)),
}

JPEG_QUALITY: Final = 90

# Semantic train id of each drawn category (BDD100K / Cityscapes ids); mapped-and-ignored
# categories and street clutter (bins, pumps) are 255 like Cityscapes' "dynamic"/"static".
_SEM: Final[dict[str, int]] = {
    **{c: B.SEM_CLASSES.index(c) for c in ("traffic light", "traffic sign")},
    "pedestrian": 11, "rider": 12, "car": 13, "truck": 14, "bus": 15, "train": 16,
    "motorcycle": 17, "bicycle": 18,
    "other person": 255, "other vehicle": 255, "trailer": 255,
}
_ROAD, _SIDEWALK, _BUILDING, _WALL, _FENCE, _POLE = 0, 1, 2, 3, 4, 5
_VEGETATION, _TERRAIN, _SKY = 8, 9, 10

#: Instance-map value of drawn pixels that belong to no labelled instance (poles, trees, bins,
#: and lights/signs in sets that do not label them).
_OCC: Final = 1 << 20

_STREAMS: Final = {"det": 1, "seg": 2, "track": 3, "mots": 4}

_WEATHER_P: Final = {"clear": 0.42, "overcast": 0.13, "partly cloudy": 0.12, "rainy": 0.11,
                     "snowy": 0.09, "foggy": 0.06, "undefined": 0.07}
_SCENE_P: Final = {"city street": 0.36, "highway": 0.2, "residential": 0.2, "parking lot": 0.06,
                   "tunnel": 0.06, "gas stations": 0.06, "undefined": 0.06}
_TIME_P: Final = {"daytime": 0.58, "night": 0.27, "dawn/dusk": 0.12, "undefined": 0.03}

_WHITE, _YELLOW, _CURB = (238, 238, 232), (236, 190, 40), (196, 196, 190)
_SKIN = (232, 188, 150)
_PED = {"torso": (150, 25, 30), "right": (215, 30, 30), "left": (255, 150, 40)}
_OTHER_PERSON = {"torso": (110, 110, 110), "right": (140, 140, 140), "left": (170, 170, 170)}


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    keys = list(table)
    p = np.array([table[k] for k in keys])
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _jit(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + d, 0, 255))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Scene geometry: a flat ground plane seen by a level camera. A ground point at lateral offset X
# (metres, + right) and depth Z (metres) has depth scale s = z0 / Z and lands at
# x = vx + X * ppm * s, y = horizon + s * (H - horizon); a height z above it rises z * ppm * s.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    width: int
    height: int
    weather: str
    scene: str
    timeofday: str
    horizon: float  # image row of the horizon
    vx: float  # image column of the vanishing point
    ppm: float  # pixels per metre at s = 1 (the bottom image row)
    bounds: list[float]  # lane boundary offsets X, left to right (metres)
    ego: int  # ego lane = (bounds[ego], bounds[ego + 1])
    divider: int | None  # boundary index of a two-way road's centre line; lanes left of it oncoming
    sidewalk: float  # sidewalk width (metres, 0 = none)
    z0: float = 6.0  # depth of the ground seen at the bottom row
    # Camera pose of one video frame (all 0 for still images): the camera has travelled cam_z
    # metres along the road and sits cam_x metres right of where it started; pan is the shift
    # (pixels) of the vanishing point by its heading (yaw). reach: cam_z of the video's last
    # frame, so that what the background draws (and what it draws from the rng) is the same in
    # every frame of a video. World X, Z of actors and scenery never depend on the camera.
    cam_x: float = 0.0
    cam_z: float = 0.0
    pan: float = 0.0
    reach: float = 0.0
    motion: _Ego | None = None  # the video's camera motion (None: a still image)

    @property
    def u(self) -> float:
        """Pixel unit: 1 at tiny's 96-row height."""
        return self.height / 96.0

    def s(self, Z: float) -> float:
        """Depth scale of world depth ``Z`` from the current camera. Points closer than
        ``_NEAR`` (or behind the camera) are put on the near plane: exact clipping for the
        depth-aligned rectangles of the scenery (faces, bands, dashes), which are then far
        outside the image."""
        return self.z0 / max(Z - self.cam_z, _NEAR)

    def s_last(self, Z: float) -> float:
        """Depth scale of world depth ``Z`` from the video's last camera (== ``s`` for a still)."""
        return self.z0 / max(Z - self.reach, _NEAR)

    def pt(self, X: float, s: float, z: float = 0.0) -> tuple[float, float]:
        return (self.vx + self.pan + (X - self.cam_x) * self.ppm * s,
                self.horizon + s * (self.height - self.horizon) - z * self.ppm * s)

    def attributes(self) -> dict[str, str]:
        return {"weather": self.weather, "scene": self.scene, "timeofday": self.timeofday}

    def own_lanes(self) -> range:
        return range(self.divider or 0, len(self.bounds) - 1)

    def lane_center(self, i: int) -> float:
        return 0.5 * (self.bounds[i] + self.bounds[i + 1])


_NEAR: Final = 0.5  # near clipping depth (metres): actors closer to the camera are not drawn
_S_NEAR: Final = 1.5  # depth scale below the bottom row, where road polygons start
_S_FAR: Final = 0.035  # depth scale near the horizon, where road polygons stop


def _make_scene(rng: np.random.Generator, W: int, H: int) -> _Scene:
    weather, scene, tod = _pick(rng, _WEATHER_P), _pick(rng, _SCENE_P), _pick(rng, _TIME_P)
    lane_w = float(rng.uniform(3.3, 3.8))
    divider: int | None = None
    sidewalk = 0.0
    if scene == "city street":
        n = int(rng.integers(2, 5))
        divider = n // 2 if rng.random() < 0.7 else None
        sidewalk = float(rng.uniform(2.5, 4.0))
    elif scene == "highway":
        n = int(rng.integers(3, 5))
    elif scene == "residential":
        n = 2
        divider = 1 if rng.random() < 0.6 else None
        sidewalk = float(rng.uniform(1.8, 2.6))
    elif scene == "gas stations":
        n = 2
        divider = 1 if rng.random() < 0.5 else None
        sidewalk = 2.0
    elif scene == "parking lot":
        n = 1
        lane_w = 6.0
    else:  # tunnel, undefined
        n = 2
    own = list(range(divider or 0, n))
    ego = int(rng.choice(own))
    offset = float(rng.uniform(-0.35, 0.35))
    bounds = [(k - ego - 0.5) * lane_w - offset for k in range(n + 1)]
    return _Scene(
        width=W, height=H, weather=weather, scene=scene, timeofday=tod,
        horizon=H * float(rng.uniform(0.38, 0.46)), vx=W * float(rng.uniform(0.45, 0.55)),
        ppm=0.3 * H, bounds=bounds, ego=ego, divider=divider, sidewalk=sidewalk,
    )


# ---------------------------------------------------------------------------------------------
# Canvas: one draw call paints the image, the semantic map, the instance map and the glow map
# (pixels that stay bright at night), so every mask is exactly the drawn pixels.
# ---------------------------------------------------------------------------------------------


class _Canvas:
    """``sem=None`` in a draw call is surface paint (windows, lane paint, clouds): it changes the
    image and glow only and keeps the semantic class underneath. The background canvas has no
    instance layer (``with_inst=False``)."""

    def __init__(self, rgb: Image.Image, sem: Image.Image, glow: Image.Image, skip: frozenset[int] = frozenset(),
                 *, with_inst: bool = True):
        self.rgb, self.sem, self.glow = rgb, sem, glow
        self.inst = Image.new("I", rgb.size, 0)
        self._rgb, self._sem, self._glow = (ImageDraw.Draw(im) for im in (self.rgb, self.sem, self.glow))
        self._inst = ImageDraw.Draw(self.inst) if with_inst else None
        self.skip = skip
        #: unclipped float extent [x1, y1, x2, y2] of everything drawn per labelled instance id
        self.extent: dict[int, list[float]] = {}
        #: pose keypoints per instance id: [18, 2] pixel coordinates
        self.keypoints: dict[int, np.ndarray] = {}

    def _paint(self, method: str, xy: Any, bounds: tuple[float, float, float, float], rgb, sem: int | None, iid: int,
               glow: bool, **kw: Any) -> None:
        if iid in self.skip:
            return
        if iid and iid != _OCC:
            e = self.extent.setdefault(iid, [math.inf, math.inf, -math.inf, -math.inf])
            e[0], e[1] = min(e[0], bounds[0]), min(e[1], bounds[1])
            e[2], e[3] = max(e[2], bounds[2]), max(e[3], bounds[3])
        layers: list[tuple[ImageDraw.ImageDraw, Any]] = [(self._rgb, tuple(rgb)), (self._glow, 255 if glow else 0)]
        if sem is not None:
            layers.append((self._sem, sem))
            if self._inst is not None:
                layers.append((self._inst, iid))
        for d, fill in layers:
            if method == "ring":
                d.ellipse(xy, outline=fill, width=kw["width"])
            elif method == "line":
                d.line(xy, fill=fill, width=kw["width"], joint="curve")
            else:
                getattr(d, method)(xy, fill=fill)

    def poly(self, pts, rgb, sem: int | None, iid: int = 0, glow: bool = False) -> None:
        if not pts:  # clipped away (behind the camera)
            return
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        self._paint("polygon", [tuple(p) for p in pts], (min(xs), min(ys), max(xs), max(ys)), rgb, sem, iid, glow)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, rgb, sem: int | None, iid: int = 0,
                glow: bool = False) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        self._paint("ellipse", box, box, rgb, sem, iid, glow)

    def ring(self, cx: float, cy: float, r: float, width: int, rgb, sem: int, iid: int = 0) -> None:
        r = max(r, 1.0)
        box = (cx - r, cy - r, cx + r, cy + r)
        self._paint("ring", box, box, rgb, sem, iid, False, width=max(1, width))

    def line(self, pts, width: float, rgb, sem: int | None, iid: int = 0) -> None:
        w = max(1, int(round(width)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        h = w / 2
        self._paint("line", [tuple(p) for p in pts], (min(xs) - h, min(ys) - h, max(xs) + h, max(ys) + h),
                    rgb, sem, iid, False, width=w)

    def count(self, iid: int) -> int:
        """Pixels currently showing ``iid`` (looked up inside its drawn extent only)."""
        e = self.extent.get(iid)
        if e is None:
            return 0
        W, H = self.inst.size
        x0, y0 = max(0, int(math.floor(e[0])) - 1), max(0, int(math.floor(e[1])) - 1)
        x1, y1 = min(W, int(math.ceil(e[2])) + 2), min(H, int(math.ceil(e[3])) + 2)
        if x0 >= x1 or y0 >= y1:
            return 0
        return int((np.asarray(self.inst.crop((x0, y0, x1, y1))) == iid).sum())


# ---------------------------------------------------------------------------------------------
# Actors: everything whose drawing order depends on depth (objects, poles, trees, bins).
# ---------------------------------------------------------------------------------------------


@dataclass
class _Inst:
    """One labelled instance drawn by an actor. ``iid`` is its instance-map value (0: not yet
    assigned, ``_OCC``: drawn but not labelled in this set)."""

    category: str
    iid: int = 0
    crowd: bool = False


@dataclass
class _Actor:
    kind: str
    X: float  # lateral offset (m)
    Z: float  # depth (m)
    insts: list[_Inst]
    p: dict[str, Any] = field(default_factory=dict)  # shape / colour parameters, fixed at creation
    vX: float = 0.0  # metres per frame
    vZ: float = 0.0
    phase: float = 0.0  # walking phase (pedestrians)
    dphase: float = 0.0
    far: bool = False  # always painted first (trains run beyond everything else)


class _Local:
    """Maps actor-local metres ``(dx, z)`` (z up from the ground point) to pixels."""

    def __init__(self, sc: _Scene, a: _Actor):
        s = sc.s(a.Z)
        self.k = sc.ppm * s
        self.x0, self.yb = sc.pt(a.X, s)

    def __call__(self, dx: float, z: float) -> tuple[float, float]:
        return (self.x0 + dx * self.k, self.yb - z * self.k)

    def rect(self, x1: float, z1: float, x2: float, z2: float) -> list[tuple[float, float]]:
        return [self(x1, z1), self(x2, z1), self(x2, z2), self(x1, z2)]


def _draw_car(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L, (inst,) = _Local(sc, a), a.insts
    sem, iid, w, h = _SEM[inst.category], inst.iid, a.p["w"], a.p["h"]
    dark = (18, 18, 20)
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.05), 0, sgn * (w / 2 - 0.42), 0.4), dark, sem, iid)
    cv.poly(L.rect(-w / 2, 0.2, w / 2, 0.95), a.p["body"], sem, iid)
    cv.poly([L(-w * 0.46, 0.95), L(w * 0.46, 0.95), L(w * 0.36, h), L(-w * 0.36, h)], a.p["roof"], sem, iid)
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.05), 0.66, sgn * (w / 2 - 0.38), 0.86), (210, 25, 25), sem, iid, glow=True)
    cv.poly(L.rect(-0.26, 0.34, 0.26, 0.5), (225, 225, 210), sem, iid)


def _draw_box_vehicle(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    """Truck (orange box with a door seam) and trailer (white box with ribs), seen from behind."""
    L, (inst,) = _Local(sc, a), a.insts
    sem, iid, w, h = _SEM[inst.category], inst.iid, a.p["w"], a.p["h"]
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.05), 0, sgn * (w / 2 - 0.75), 0.5), (15, 15, 15), sem, iid)
    cv.poly(L.rect(-w / 2, 0.35, w / 2, 0.62), (60, 60, 64), sem, iid)
    cv.poly(L.rect(-w / 2, 0.62, w / 2, h), a.p["body"], sem, iid)
    if inst.category == "truck":
        cv.line([L(0, 0.7), L(0, h - 0.1)], 0.07 * L.k, a.p["trim"], sem, iid)
    else:
        for z in np.arange(1.2, h - 0.2, 0.6):
            cv.line([L(-w / 2 + 0.1, z), L(w / 2 - 0.1, z)], 0.05 * L.k, a.p["trim"], sem, iid)
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.05), 0.66, sgn * (w / 2 - 0.3), 0.9), (210, 25, 25), sem, iid, glow=True)


def _draw_bus(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L, (inst,) = _Local(sc, a), a.insts
    sem, iid, w, h = _SEM[inst.category], inst.iid, a.p["w"], a.p["h"]
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.1), 0, sgn * (w / 2 - 0.55), 0.45), (15, 15, 15), sem, iid)
    cv.poly(L.rect(-w / 2, 0.3, w / 2, h), a.p["body"], sem, iid)
    cv.poly(L.rect(-w / 2 + 0.2, h - 1.15, w / 2 - 0.2, h - 0.2), (35, 38, 48), sem, iid)
    cv.poly(L.rect(-w / 2, 0.3, w / 2, 0.55), (30, 30, 30), sem, iid)
    for sgn in (-1, 1):
        cv.poly(L.rect(sgn * (w / 2 - 0.08), 0.75, sgn * (w / 2 - 0.3), 1.1), (215, 30, 25), sem, iid, glow=True)


def _draw_train(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    """Side view of a carriage running parallel to the road on the plane X, from depth Z on."""
    (inst,) = a.insts
    sem, iid = _SEM[inst.category], inst.iid
    s1, s2 = sc.s(a.Z), sc.s(a.Z + a.p["length"])

    def band(z1: float, z2: float, sa: float = s1, sb: float = s2) -> list[tuple[float, float]]:
        return [sc.pt(a.X, sa, z1), sc.pt(a.X, sb, z1), sc.pt(a.X, sb, z2), sc.pt(a.X, sa, z2)]

    cv.poly(band(0.2, 0.7), (30, 30, 34), sem, iid)
    cv.poly(band(0.7, 3.9), a.p["body"], sem, iid)
    cv.poly(band(1.25, 1.55), (200, 30, 35), sem, iid)
    for z in np.arange(a.Z + 1.0, a.Z + a.p["length"] - 1.5, 2.6):
        cv.poly(band(2.2, 3.2, sc.s(z), sc.s(z + 1.6)), (40, 44, 66), sem, iid)


def _person_joints(a: _Actor) -> np.ndarray:
    """``[18, 2]`` joint positions in metres ``(dx, z)`` in ``bdd100k.POSE_JOINTS`` order.

    ``facing`` +1 faces the camera (the person's right side is on the image's left)."""
    H, facing = a.p["height"], a.p["facing"]
    swing = 0.18 * math.sin(a.phase)
    J = {"head": (0.0, 0.93 * H), "neck": (0.0, 0.845 * H)}
    for side, sgn, sw in (("right", -facing, swing), ("left", facing, -swing)):
        a_sh, a_el, a_hip, a_kn = a.p[side]
        a_sh, a_hip = a_sh + sw, max(0.0, a_hip - sw)
        sh = np.array([sgn * 0.11 * H, 0.80 * H])
        el = sh + 0.17 * H * np.array([sgn * math.sin(a_sh), -math.cos(a_sh)])
        d = np.array([sgn * math.sin(a_sh + a_el), -math.cos(a_sh + a_el)])
        wr = el + 0.15 * H * d
        hip = np.array([sgn * 0.065 * H, 0.52 * H])
        kn = hip + 0.245 * H * np.array([sgn * math.sin(a_hip), -math.cos(a_hip)])
        an = kn + 0.235 * H * np.array([sgn * math.sin(a_hip + a_kn), -math.cos(a_hip + a_kn)])
        J.update({f"{side}_shoulder": sh, f"{side}_elbow": el, f"{side}_wrist": wr, f"{side}_hand": wr + 0.05 * H * d,
                  f"{side}_hip": hip, f"{side}_knee": kn, f"{side}_ankle": an,
                  f"{side}_foot": an + np.array([sgn * 0.05 * H, -0.03 * H])})
    out = np.array([J[j] for j in B.POSE_JOINTS], dtype=np.float64)
    out[:, 1] -= out[:, 1].min()  # stand on the ground
    return out


def _draw_stick_figure(cv: _Canvas, L: _Local, a: _Actor, dx: float, sem: int, iid: int, colours: dict) -> np.ndarray:
    J = _person_joints(a)
    P = np.stack([L.x0 + (J[:, 0] + dx) * L.k, L.yb - J[:, 1] * L.k], axis=1)
    j = {n: tuple(P[i]) for i, n in enumerate(B.POSE_JOINTS)}
    lw = max(1.5, 0.055 * a.p["height"] * L.k)
    for side in ("right", "left"):
        leg = [j[f"{side}_hip"], j[f"{side}_knee"], j[f"{side}_ankle"], j[f"{side}_foot"]]
        cv.line(leg, lw, colours[side], sem, iid)
    cv.poly([j["right_shoulder"], j["left_shoulder"], j["left_hip"], j["right_hip"]], colours["torso"], sem, iid)
    cv.line([j["neck"], ((j["right_shoulder"][0] + j["left_shoulder"][0]) / 2, j["right_shoulder"][1])], lw,
            colours["torso"], sem, iid)
    for side in ("right", "left"):
        cv.line([j[f"{side}_shoulder"], j[f"{side}_elbow"], j[f"{side}_wrist"], j[f"{side}_hand"]], lw,
                colours[side], sem, iid)
    r = max(0.075 * a.p["height"] * L.k, 1.0)
    cv.ellipse(j["head"][0], j["head"][1], r, r * 1.1, _SKIN, sem, iid)
    return P


def _draw_person(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L, (inst,) = _Local(sc, a), a.insts
    colours = _PED if inst.category == "pedestrian" else _OTHER_PERSON
    P = _draw_stick_figure(cv, L, a, 0.0, _SEM[inst.category], inst.iid, colours)
    if inst.iid not in cv.skip:
        cv.keypoints[inst.iid] = P


def _draw_crowd(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    """A group of pedestrians labelled as one crowd instance."""
    L, (inst,) = _Local(sc, a), a.insts
    for dx, member in zip(a.p["offsets"], a.p["members"]):
        _draw_stick_figure(cv, L, member, dx, _SEM["pedestrian"], inst.iid, _PED)


def _draw_two_wheeler(cv: _Canvas, L: _Local, a: _Actor, inst: _Inst) -> None:
    sem, iid, f = _SEM[inst.category], inst.iid, a.p["facing"]
    lw = max(1.0, 0.07 * L.k)
    r = 0.33
    if inst.category == "bicycle":
        col = a.p["bike"]
        for hub in (-0.55, 0.55):
            cx, cy = L(hub * f, r)
            cv.ring(cx, cy, r * L.k, int(round(lw)), col, sem, iid)
        cv.line([L(-0.55 * f, r), L(-0.1 * f, 0.95), L(0.0, r), L(-0.55 * f, r)], lw, col, sem, iid)
        cv.line([L(0.0, r), L(0.42 * f, 1.0), L(0.55 * f, r)], lw, col, sem, iid)
        cv.line([L(0.35 * f, 1.05), L(0.52 * f, 1.05)], lw, col, sem, iid)
        cv.line([L(-0.22 * f, 0.98), L(0.0, 0.98)], lw, (40, 40, 40), sem, iid)
    else:
        for hub in (-0.6, 0.6):
            cx, cy = L(hub * f, r)
            cv.ellipse(cx, cy, r * L.k, r * L.k, (20, 20, 20), sem, iid)
        cv.poly([L(-0.68 * f, 0.5), L(0.6 * f, 0.45), L(0.48 * f, 0.9), L(-0.3 * f, 0.98), L(-0.7 * f, 0.82)],
                a.p["moto"], sem, iid)
        cv.poly(L.rect(-0.5 * f, 0.95, 0.05 * f, 1.08), (30, 30, 30), sem, iid)
        cx, cy = L(0.62 * f, 0.85)
        cv.ellipse(cx, cy, 0.08 * L.k, 0.08 * L.k, (255, 240, 180), sem, iid, glow=True)


def _draw_rider(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    """A two-wheeler (its own instance) with a seated rider on top (second instance)."""
    L = _Local(sc, a)
    vehicle, rider = a.insts
    _draw_two_wheeler(cv, L, a, vehicle)
    sem, iid, f = _SEM["rider"], rider.iid, a.p["facing"]
    lw = max(1.5, 0.1 * L.k)
    hip, sh, hand = L(-0.15 * f, 1.02), L(0.08 * f, 1.62), L(0.46 * f, 1.06)
    cv.line([hip, L(0.22 * f, 0.75), L(0.04 * f, 0.38)], lw, (130, 25, 130), sem, iid)
    cv.line([hip, sh], max(2.0, 0.24 * L.k), (190, 40, 190), sem, iid)
    cv.line([sh, L(0.3 * f, 1.3), hand], lw, (130, 25, 130), sem, iid)
    cx, cy = L(0.12 * f, 1.82)
    cv.ellipse(cx, cy, max(1.0, 0.13 * L.k), max(1.0, 0.14 * L.k), _SKIN, sem, iid)


def _draw_parked_bike(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    _draw_two_wheeler(cv, _Local(sc, a), a, a.insts[0])


def _draw_traffic_light(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L, (inst,) = _Local(sc, a), a.insts
    cv.line([L(0, 0), L(0, 3.4)], max(1.0, 0.14 * L.k), (112, 112, 118), _POLE, _OCC)
    sem, iid = _SEM["traffic light"], inst.iid
    cv.poly(L.rect(-0.2, 3.3, 0.2, 4.45), (24, 24, 24), sem, iid)
    lit = a.p["lit"]
    for i, (z, colour) in enumerate(zip((4.2, 3.88, 3.56), ((255, 45, 35), (255, 200, 30), (40, 235, 100)))):
        cx, cy = L(0, z)
        cv.ellipse(cx, cy, 0.12 * L.k, 0.12 * L.k, colour if i == lit else (62, 62, 62), sem, iid, glow=i == lit)


def _draw_traffic_sign(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L, (inst,) = _Local(sc, a), a.insts
    sem, iid, shape = _SEM["traffic sign"], inst.iid, a.p["shape"]
    pole = max(1.0, 0.1 * L.k)
    if shape == "board":  # highway direction board on two posts
        for x in (-1.1, 1.1):
            cv.line([L(x, 0), L(x, 3.2)], pole, (112, 112, 118), _POLE, _OCC)
        cv.poly(L.rect(-1.6, 3.0, 1.6, 4.6), (30, 120, 60), sem, iid)
        cv.poly(L.rect(-1.3, 3.6, 1.3, 4.0), (235, 235, 235), sem, iid)
        return
    cv.line([L(0, 0), L(0, 2.3)], pole, (112, 112, 118), _POLE, _OCC)
    cx, cy = L(0, 2.65)
    r = 0.42 * L.k
    if shape == "diamond":
        cv.poly([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], (240, 200, 30), sem, iid)
        cv.poly([(cx, cy - r / 3), (cx + r / 3, cy), (cx, cy + r / 3), (cx - r / 3, cy)], (25, 25, 25), sem, iid)
    elif shape == "disc":
        cv.ellipse(cx, cy, r, r, (215, 30, 30), sem, iid)
        cv.ellipse(cx, cy, 0.6 * r, 0.6 * r, (240, 240, 240), sem, iid)
    else:
        cv.poly([(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)], (30, 80, 200), sem, iid)
        h = r / 2
        cv.poly([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], (240, 240, 240), sem, iid)


def _draw_tree(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    L = _Local(sc, a)
    cv.line([L(0, 0), L(0, 2.6)], max(1.0, 0.28 * L.k), (92, 62, 34), _VEGETATION, _OCC)
    cx, cy = L(0, 4.0)
    cv.ellipse(cx, cy, a.p["r"] * L.k, a.p["r"] * 1.2 * L.k, a.p["crown"], _VEGETATION, _OCC)


def _draw_clutter(cv: _Canvas, a: _Actor, sc: _Scene) -> None:
    """Street clutter (bin, fuel pump): ignore (255) in the semantic masks."""
    L = _Local(sc, a)
    if a.kind == "bin":
        cv.poly(L.rect(-0.3, 0, 0.3, 0.95), (42, 72, 48), 255, _OCC)
        cv.poly(L.rect(-0.34, 0.95, 0.34, 1.08), (25, 40, 28), 255, _OCC)
    else:
        cv.poly(L.rect(-0.4, 0, 0.4, 1.7), (215, 40, 40), 255, _OCC)
        cv.poly(L.rect(-0.3, 1.0, 0.3, 1.45), (235, 235, 235), 255, _OCC)


_DRAW: Final[dict[str, Callable[[_Canvas, _Actor, _Scene], None]]] = {
    "car": _draw_car, "truck": _draw_box_vehicle, "bus": _draw_bus, "train": _draw_train,
    "pedestrian": _draw_person, "crowd": _draw_crowd, "rider": _draw_rider, "bike": _draw_parked_bike,
    "traffic light": _draw_traffic_light, "traffic sign": _draw_traffic_sign, "tree": _draw_tree,
    "bin": _draw_clutter, "pump": _draw_clutter,
}


# ---------------------------------------------------------------------------------------------
# Background: sky, ground, road, lane paint, scenery; plus the drivable and lane masks.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Background:
    rgb: Image.Image
    sem: Image.Image
    glow: Image.Image
    drivable: np.ndarray  # [H, W] uint8
    lane: np.ndarray  # [H, W] uint8


def _sky(sc: _Scene) -> np.ndarray:
    W, H = sc.width, sc.height
    top, low = {
        "clear": ((80, 140, 225), (170, 205, 240)), "partly cloudy": ((90, 145, 220), (175, 205, 235)),
        "overcast": ((165, 168, 176), (192, 194, 198)), "rainy": ((105, 110, 122), (140, 145, 152)),
        "snowy": ((198, 202, 212), (226, 228, 234)), "foggy": ((196, 198, 202), (214, 215, 218)),
        "undefined": ((140, 150, 160), (170, 175, 180)),
    }[sc.weather]
    if sc.timeofday == "dawn/dusk":
        top, low = (85, 80, 150), (250, 150, 85)
    t = np.clip(np.arange(H, dtype=np.float32) / max(sc.horizon, 1.0), 0, 1)[:, None, None]
    sky = np.array(top, np.float32) * (1 - t) + np.array(low, np.float32) * t
    return np.broadcast_to(sky, (H, W, 3)).copy()


def _lane_marks(sc: _Scene, rng: np.random.Generator) -> list[tuple[float, int, int, str]]:
    """Lane boundaries to paint: ``(X, category, style, look)``; look: white | yellow | double
    white | double yellow | curb."""
    C = {c: i for i, c in enumerate(B.LANE_CATEGORIES)}
    n = len(sc.bounds) - 1
    marks = []
    for k, X in enumerate(sc.bounds):
        if k in (0, n):
            if sc.sidewalk > 0:
                marks.append((X, C["road curb"], 0, "curb"))
            elif sc.scene == "highway" and k == 0:
                marks.append((X, C["single yellow"], 0, "yellow"))
            elif sc.scene != "parking lot":
                marks.append((X, C["single white"], 0, "white"))
        elif k == sc.divider:
            if sc.scene == "residential" and rng.random() < 0.5:
                marks.append((X, C["single yellow"], 1, "yellow"))
            else:
                marks.append((X, C["double yellow"], 0, "double yellow"))
        elif rng.random() < 0.12:
            marks.append((X, C["double white"], 0, "double white"))
        else:
            marks.append((X, C["single white"], 1, "white"))
    return marks


def _background(sc: _Scene, rng: np.random.Generator) -> tuple[_Background, list[_Actor]]:
    """Draw everything that never occludes an object; return it and the static actors."""
    W, H, u = sc.width, sc.height, sc.u
    rgb = Image.fromarray(_sky(sc).astype(np.uint8))
    cv = _Canvas(rgb, Image.new("L", (W, H), _SKY), Image.new("L", (W, H), 0), with_inst=False)
    drv_img, lane_img = Image.new("L", (W, H), 2), Image.new("L", (W, H), B.LANE_BACKGROUND)
    drv, lane = ImageDraw.Draw(drv_img), ImageDraw.Draw(lane_img)
    b0, bn = sc.bounds[0], sc.bounds[-1]
    statics: list[_Actor] = []

    # Clouds (partly cloudy): white blobs in the sky, still sky.
    if sc.weather == "partly cloudy":
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(0, W), rng.uniform(0, sc.horizon * 0.7)
            rx, ry = rng.uniform(0.06, 0.16) * W, rng.uniform(0.03, 0.07) * H
            cv.ellipse(cx + sc.pan, cy, rx, ry, _jit(rng, (240, 240, 244), 6), None)  # at infinity: pan only

    ground_cls, ground_rgb = {
        "city street": (_SIDEWALK, (150, 142, 134)), "residential": (_TERRAIN, (112, 150, 70)),
        "highway": (_TERRAIN, (128, 140, 80)), "tunnel": (_WALL, (96, 86, 74)),
        "parking lot": (_ROAD, (96, 96, 100)), "gas stations": (_ROAD, (110, 108, 104)),
        "undefined": (_TERRAIN, (135, 130, 95)),
    }[sc.scene]
    if sc.scene == "tunnel":  # walls and ceiling everywhere the road is not
        cv.poly([(0, 0), (W, 0), (W, H), (0, H)], _jit(rng, ground_rgb, 6), _WALL)
    cv.poly([(-W, sc.horizon), (2 * W, sc.horizon), (2 * W, 2 * H), (-W, 2 * H)], _jit(rng, ground_rgb, 8), ground_cls)

    def strip(Xa: float, Xb: float, s_far: float = _S_FAR) -> list[tuple[float, float]]:
        return [sc.pt(Xa, _S_NEAR), sc.pt(Xb, _S_NEAR), sc.pt(Xb, s_far), sc.pt(Xa, s_far)]

    # Sidewalks (or the tunnel's walkways) and the road.
    if sc.sidewalk > 0:
        cv.poly(strip(b0 - sc.sidewalk, b0), _jit(rng, (172, 164, 154), 8), _SIDEWALK)
        cv.poly(strip(bn, bn + sc.sidewalk), _jit(rng, (172, 164, 154), 8), _SIDEWALK)
    if sc.scene == "tunnel":
        cv.poly(strip(b0 - 1.0, b0), (150, 140, 128), _SIDEWALK)
        cv.poly(strip(bn, bn + 1.0), (150, 140, 128), _SIDEWALK)
    road_rgb = _jit(rng, (84, 84, 90), 6)
    if sc.scene != "parking lot":
        cv.poly(strip(b0, bn), road_rgb, _ROAD)

    # Drivable area: ego lane direct; lanes of the ego's direction alternative.
    if sc.scene == "parking lot":
        drv.polygon(strip(-14, 14, sc.s(40.0)), fill=1)
        drv.polygon(strip(sc.bounds[0], sc.bounds[1], sc.s(40.0)), fill=0)
    else:
        for i in sc.own_lanes():
            drv.polygon(strip(sc.bounds[i], sc.bounds[i + 1]), fill=0 if i == sc.ego else 1)
        if sc.scene == "gas stations":  # the forecourt on the right is drivable too
            drv.polygon(strip(bn + sc.sidewalk, bn + sc.sidewalk + 14, sc.s(50.0)), fill=1)

    # Lane markings: painted in the image (perspective width, dashes), labelled as constant-width
    # open polylines in the lane mask.
    lw_mask = max(2, round(W / 160))
    paint = {"white": [(_WHITE, 0.0)], "yellow": [(_YELLOW, 0.0)], "curb": [(_CURB, 0.0)],
             "double white": [(_WHITE, -0.13), (_WHITE, 0.13)], "double yellow": [(_YELLOW, -0.13), (_YELLOW, 0.13)]}

    def paint_segment(X: float, sa: float, sb: float, colour, half: float) -> None:
        cv.poly([sc.pt(X - half, sa), sc.pt(X + half, sa), sc.pt(X + half, sb), sc.pt(X - half, sb)], colour, None)

    for X, cat, style, look in _lane_marks(sc, rng):
        if style == 0:
            spans = [(1.5, 0.6), (0.6, 0.3), (0.3, 0.15), (0.15, 0.06)]  # width shrinks with depth
        else:
            z = float(rng.uniform(2.0, 8.0))
            spans = []
            while sc.s_last(z) > 0.06:
                spans.append((sc.s(z), sc.s(z + 3.0)))
                z += 9.0
        for colour, off in paint[look]:
            for sa, sb in spans:
                paint_segment(X + off, sa, sb, colour, 0.08 if look != "curb" else 0.12)
        lane.line([sc.pt(X, _S_NEAR), sc.pt(X, 0.06)], fill=B.encode_lane(cat, 0, style), width=lw_mask)
    crosswalk = sc.scene in ("city street", "residential") and rng.random() < 0.3
    if crosswalk:
        z1 = float(rng.uniform(9.0, 14.0))
        sa, sb = sc.s(z1), sc.s(z1 + 3.0)
        for X in np.arange(b0 + 0.3, bn - 0.3, 1.0):
            cv.poly([sc.pt(X, sa), sc.pt(X + 0.5, sa), sc.pt(X + 0.5, sb), sc.pt(X, sb)], _WHITE, None)
        code = B.encode_lane(B.LANE_CATEGORIES.index("crosswalk"), 1, 0)
        for s in (sa, sb):
            lane.line([sc.pt(b0, s), sc.pt(bn, s)], fill=code, width=lw_mask)

    # Scenery beyond the road, per scene.
    if sc.scene in ("city street", "gas stations", "undefined"):
        sides = (-1, 1) if sc.scene != "gas stations" else (-1,)
        for side in sides:
            Xp = (b0 - sc.sidewalk) if side < 0 else (bn + sc.sidewalk)
            if sc.scene == "undefined":
                _facades(cv, sc, rng, Xp + side * 6.0, (3.0, 6.0), (4.0, 20.0), windows=False)
            else:
                _facades(cv, sc, rng, Xp, (8.0, 32.0), (0.0, 4.0), windows=True)
    if sc.scene == "residential":
        for side in (-1, 1):
            Xp = (b0 - sc.sidewalk - rng.uniform(4, 7)) if side < 0 else (bn + sc.sidewalk + rng.uniform(4, 7))
            _houses(cv, sc, rng, Xp)
            if rng.random() < 0.5:
                Xf = (b0 - sc.sidewalk - 0.3) if side < 0 else (bn + sc.sidewalk + 0.3)
                cv.poly([sc.pt(Xf, 1.2, 0), sc.pt(Xf, _S_FAR, 0), sc.pt(Xf, _S_FAR, 1.0), sc.pt(Xf, 1.2, 1.0)],
                        (150, 120, 90), _FENCE)
    if sc.scene == "highway":
        for side in (-1, 1):
            Xt = (b0 - rng.uniform(10, 18)) if side < 0 else (bn + rng.uniform(10, 18))
            _tree_line(cv, sc, rng, Xt)
            Xg = (b0 - 1.0) if side < 0 else (bn + 1.0)
            cv.poly([sc.pt(Xg, 1.3, 0.35), sc.pt(Xg, _S_FAR, 0.35), sc.pt(Xg, _S_FAR, 0.8), sc.pt(Xg, 1.3, 0.8)],
                    (165, 165, 170), _FENCE)
    if sc.scene == "tunnel":
        for side in (-1, 1):
            Xw = (b0 - 1.0) if side < 0 else (bn + 1.0)
            for z in (1.0, 2.5, 4.0):
                cv.line([sc.pt(Xw, _S_NEAR, z), sc.pt(Xw, _S_FAR, z)], max(1, u), (70, 62, 54), None)
        z = float(rng.uniform(4, 9))
        while sc.s_last(z) > 0.05:
            s, s2 = sc.s(z), sc.s(z + 1.5)
            cv.poly([sc.pt(-0.6, s, 5.5), sc.pt(0.6, s, 5.5), sc.pt(0.6, s2, 5.5), sc.pt(-0.6, s2, 5.5)],
                    (255, 205, 130), None, glow=True)
            z += 8.0
    if sc.scene == "parking lot":
        s = sc.s(70.0)
        x1, y1 = sc.pt(-45, s, 9.0)
        x2, y2 = sc.pt(45, s, 0.0)
        cv.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], _jit(rng, (150, 130, 110)), _BUILDING)
        stall = B.encode_lane(B.LANE_CATEGORIES.index("single white"), 0, 0)
        for z1 in (9.0, 20.0):
            for X in np.concatenate([np.arange(-13.5, -3.0, 2.7), np.arange(3.0, 14.0, 2.7)]):
                sa, sb = sc.s(z1), sc.s(z1 + 5.0)
                paint_segment(float(X), sa, sb, _WHITE, 0.08)
                lane.line([sc.pt(float(X), sa), sc.pt(float(X), sb)], fill=stall, width=lw_mask)
    if sc.scene == "gas stations":
        Xa, Xb = bn + sc.sidewalk, bn + sc.sidewalk + 14
        cv.poly(strip(Xa, Xb, sc.s(50.0)), (116, 114, 110), _ROAD)
        _facades(cv, sc, rng, Xb + 6, (4.0, 6.0), (2.0, 6.0), windows=True)
        z1, z2 = float(rng.uniform(12, 16)), float(rng.uniform(26, 32))
        s1, s2 = sc.s(z1), sc.s(z2)
        for X in (Xa + 3, Xb - 3):
            for s in (s1, s2):
                cv.line([sc.pt(X, s, 0), sc.pt(X, s, 4.6)], max(1.0, 0.35 * sc.ppm * s), (200, 200, 205), _BUILDING)
        cv.poly([sc.pt(Xa + 1, s1, 4.6), sc.pt(Xb - 1, s1, 4.6), sc.pt(Xb - 1, s2, 4.6), sc.pt(Xa + 1, s2, 4.6)],
                (70, 70, 78), _BUILDING)
        cv.poly([sc.pt(Xa + 1, s1, 4.6), sc.pt(Xb - 1, s1, 4.6), sc.pt(Xb - 1, s1, 5.6), sc.pt(Xa + 1, s1, 5.6)],
                (240, 240, 240), _BUILDING)
        cv.poly([sc.pt(Xa + 1, s1, 4.9), sc.pt(Xb - 1, s1, 4.9), sc.pt(Xb - 1, s1, 5.2), sc.pt(Xa + 1, s1, 5.2)],
                (210, 30, 35), None)
        for X in (Xa + 5.5, Xa + 8.5):
            statics.append(_Actor("pump", X, float(rng.uniform(z1 + 2, z2 - 2)), []))

    bg_rgb = np.asarray(cv.rgb, dtype=np.float32).copy()
    sem = np.asarray(cv.sem)
    if sc.weather == "snowy":  # snow cover on everything that is not road or sky
        snow = np.isin(sem, (_SIDEWALK, _VEGETATION, _TERRAIN, _FENCE))
        bg_rgb[snow] = bg_rgb[snow] * 0.35 + np.array([236, 238, 243], np.float32) * 0.65
        bg_rgb[sem == _ROAD] = bg_rgb[sem == _ROAD] * 0.85 + 30
    elif sc.weather == "rainy":  # wet, darker road
        bg_rgb[sem == _ROAD] *= 0.78
    rgb = Image.fromarray(np.clip(bg_rgb, 0, 255).astype(np.uint8))
    return _Background(rgb, cv.sem, cv.glow, np.asarray(drv_img).copy(), np.asarray(lane_img).copy()), statics


def _facades(cv: _Canvas, sc: _Scene, rng: np.random.Generator, Xp: float, height: tuple[float, float],
             gap: tuple[float, float], *, windows: bool) -> None:
    """Building facades on the vertical plane X = Xp, one per depth interval."""
    night = sc.timeofday in ("night", "dawn/dusk")
    palette = ((150, 110, 90), (128, 128, 138), (176, 158, 120), (112, 100, 96), (160, 150, 140))
    z = float(rng.uniform(1.0, 4.0))
    while sc.s_last(z) > _S_FAR:
        length, h = float(rng.uniform(10, 26)), float(rng.uniform(*height))
        s1, s2 = sc.s(z), sc.s(z + length)
        cv.poly([sc.pt(Xp, s1), sc.pt(Xp, s2), sc.pt(Xp, s2, h), sc.pt(Xp, s1, h)],
                _jit(rng, palette[int(rng.integers(len(palette)))], 10), _BUILDING)
        if windows and sc.s_last(z + length) > 0.05:
            for zz in np.arange(z + 1.0, z + length - 1.8, 3.4):
                wa, wb = sc.s(float(zz)), sc.s(float(zz) + 1.7)
                for hh in np.arange(2.2, h - 1.2, 3.2):
                    lit = night and rng.random() < 0.35
                    cv.poly([sc.pt(Xp, wa, hh), sc.pt(Xp, wb, hh), sc.pt(Xp, wb, hh + 1.5), sc.pt(Xp, wa, hh + 1.5)],
                            (255, 214, 130) if lit else (52, 60, 78), None, glow=lit)
        z += length + float(rng.uniform(*gap))


def _houses(cv: _Canvas, sc: _Scene, rng: np.random.Generator, Xp: float) -> None:
    """Detached houses with pitched roofs on the plane X = Xp and trees in the gaps."""
    z = float(rng.uniform(2.0, 6.0))
    while sc.s_last(z) > _S_FAR:
        length, h = float(rng.uniform(8, 13)), float(rng.uniform(4, 6.5))
        s1, s2 = sc.s(z), sc.s(z + length)
        wall = [sc.pt(Xp, s1), sc.pt(Xp, s2), sc.pt(Xp, s2, h), sc.pt(Xp, s1, h)]
        cv.poly(wall, _jit(rng, (205, 192, 165), 14), _BUILDING)
        roof = _wall(sc, Xp, [(z, h), (z + length / 2, h + 2.8), (z + length, h)])
        cv.poly(roof, _jit(rng, (135, 55, 45), 12), _BUILDING)
        gap = float(rng.uniform(5, 10))
        st = sc.s(z + length + gap / 2)
        cx, cy = sc.pt(Xp, st, 4.5)
        k = sc.ppm * st
        cv.ellipse(cx, cy, 2.4 * k, 3.2 * k, _jit(rng, (46, 112, 42), 10), _VEGETATION)
        z += length + gap


def _tree_line(cv: _Canvas, sc: _Scene, rng: np.random.Generator, Xt: float) -> None:
    """A forest edge on the plane X = Xt with a bumpy top."""
    zs = np.arange(1.0, sc.z0 / _S_FAR + 6.0 + sc.reach, 5.0)
    tops = rng.uniform(6.0, 14.0, size=len(zs))
    zh = [(float(zs[0]), 0.0)] + [(float(z), float(t)) for z, t in zip(zs, tops)] + [(float(zs[-1]), 0.0)]
    cv.poly(_wall(sc, Xt, zh), _jit(rng, (44, 100, 40), 10), _VEGETATION)


def _wall(sc: _Scene, X: float, zh: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Image points of a polygon on the vertical plane ``X`` given as world ``(Z, height)``
    points, clipped to the camera's near plane (Sutherland-Hodgman on one plane); unchanged
    where nothing is clipped. ``[]`` if it lies wholly behind the near plane."""
    zn = sc.cam_z + _NEAR
    if any(z < zn for z, _ in zh):
        out = []
        for (za, ha), (zb, hb) in zip(zh, zh[1:] + zh[:1]):
            if za >= zn:
                out.append((za, ha))
            if (za >= zn) != (zb >= zn):
                out.append((zn, ha + (zn - za) / (zb - za) * (hb - ha)))
        zh = out
    return [sc.pt(X, sc.s(z), h) for z, h in zh]


# ---------------------------------------------------------------------------------------------
# Populating a scene with actors
# ---------------------------------------------------------------------------------------------


def _vehicle(rng: np.random.Generator, kind: str, X: float, Z: float) -> _Actor:
    if kind in ("car", "other vehicle"):
        van = kind == "other vehicle"
        p = {"w": float(rng.uniform(1.9, 2.1)) if van else float(rng.uniform(1.7, 1.9)),
             "h": float(rng.uniform(1.9, 2.2)) if van else float(rng.uniform(1.4, 1.6)),
             "body": _jit(rng, (62, 145, 92) if van else (40, 72, 196), 14),
             "roof": _jit(rng, (24, 40, 30) if van else (22, 30, 82), 6)}
        return _Actor("car", X, Z, [_Inst(kind)], p)
    if kind in ("truck", "trailer"):
        p = {"w": float(rng.uniform(2.35, 2.5)), "h": float(rng.uniform(3.1, 3.6)),
             "body": _jit(rng, (222, 130, 32) if kind == "truck" else (226, 226, 226), 10),
             "trim": (120, 66, 16) if kind == "truck" else (170, 170, 175)}
        return _Actor("truck", X, Z, [_Inst(kind)], p)
    if kind == "bus":
        p = {"w": 2.5, "h": float(rng.uniform(3.0, 3.3)), "body": _jit(rng, (232, 200, 40), 10)}
        return _Actor("bus", X, Z, [_Inst("bus")], p)
    raise ValueError(kind)


def _person_params(rng: np.random.Generator, height: float) -> dict[str, Any]:
    p: dict[str, Any] = {"height": height, "facing": int(rng.choice((-1, 1)))}
    for side in ("right", "left"):
        p[side] = (float(rng.uniform(0.05, 1.3)), float(rng.uniform(-0.3, 1.1)),
                   float(rng.uniform(0.0, 0.3)), float(rng.uniform(-0.25, 0.1)))
    return p


def _pedestrian(rng: np.random.Generator, X: float, Z: float, category: str = "pedestrian") -> _Actor:
    height = float(rng.uniform(1.55, 1.9)) if category == "pedestrian" else float(rng.uniform(1.0, 1.25))
    return _Actor("pedestrian", X, Z, [_Inst(category)], _person_params(rng, height), phase=float(rng.uniform(0, 6.3)))


def _fully_visible(sc: _Scene, X: float, Z: float, half_w: float, height: float, margin: float = 1.0) -> bool:
    x0, yb = sc.pt(X, sc.s(Z))
    k = sc.ppm * sc.s(Z)
    return (x0 - half_w * k >= margin and x0 + half_w * k <= sc.width - 1 - margin
            and yb - height * k >= margin and yb <= sc.height - 1 - margin)


def _populate(sc: _Scene, rng: np.random.Generator, *, pose: bool, video: bool) -> list[_Actor]:
    """Dynamic actors (vehicles, people) and street furniture for one scene."""
    actors: list[_Actor] = []
    b0, bn, sw = sc.bounds[0], sc.bounds[-1], sc.sidewalk
    lanes = list(range(len(sc.bounds) - 1))

    def sidewalk_x(side: int, inset: float = 0.3) -> float:
        if side < 0:
            return float(rng.uniform(b0 - sw + inset, b0 - inset))
        return float(rng.uniform(bn + inset, bn + sw - inset))

    # Vehicles in lanes, spaced in depth per lane.
    counts = {"city street": (2, 6), "highway": (3, 7), "residential": (1, 4), "tunnel": (2, 5),
              "gas stations": (1, 4), "undefined": (1, 4), "parking lot": (0, 2)}[sc.scene]
    taken: dict[int, list[float]] = {i: [] for i in lanes}
    for _ in range(int(rng.integers(*counts))):
        lane = int(rng.choice(lanes))
        zmin = 9.0 if lane == sc.ego else 5.5
        for _try in range(8):
            Z = float(sc.z0 / rng.uniform(0.1, sc.z0 / zmin))
            if all(abs(Z - z) > 7.0 + 0.1 * Z for z in taken[lane]):
                break
        else:
            continue
        taken[lane].append(Z)
        r = rng.random()
        kind = "car" if r < 0.74 else "truck" if r < 0.88 else "bus"
        if sc.scene == "highway" and r > 0.6:
            kind = "truck" if r < 0.85 else "bus"
        a = _vehicle(rng, kind, sc.lane_center(lane) + float(rng.uniform(-0.3, 0.3)), Z)
        oncoming = sc.divider is not None and lane < sc.divider
        a.vZ = -float(rng.uniform(0.5, 1.0)) if oncoming else float(rng.uniform(-0.8, 0.8))
        actors.append(a)

    # Parked cars (parking lot stalls, residential kerbs).
    if sc.scene == "parking lot":
        for z1 in (9.0, 20.0):
            for X in np.concatenate([np.arange(-12.15, -3.0, 2.7), np.arange(4.35, 14.0, 2.7)]):
                if rng.random() < 0.55:
                    actors.append(_vehicle(rng, "car", float(X), z1 + 2.0 + float(rng.uniform(-0.3, 0.3))))

    # People. Pose images get one or two large, fully visible pedestrians crossing the road.
    people = {"city street": (1, 5), "residential": (1, 4), "gas stations": (0, 3), "parking lot": (0, 3),
              "undefined": (0, 3), "highway": (0, 1), "tunnel": (0, 1)}[sc.scene]
    if pose:
        for _ in range(int(rng.integers(1, 3))):
            for _try in range(20):
                Z = float(sc.z0 / rng.uniform(0.45, 0.9))
                X = float(rng.uniform(b0, bn))
                if _fully_visible(sc, X, Z, 0.6, 2.0, margin=2.0):
                    actors.append(_pedestrian(rng, X, Z))
                    break
    if sw > 0:
        for _ in range(int(rng.integers(*people))):
            side = int(rng.choice((-1, 1)))
            Z = float(sc.z0 / rng.uniform(0.1, 0.8))
            actors.append(_pedestrian(rng, sidewalk_x(side), Z))
        if not pose and rng.random() < 0.12:  # a crowd
            members = [_Actor("pedestrian", 0, 0, [], _person_params(rng, float(rng.uniform(1.55, 1.9))))
                       for _ in range(3)]
            X, Z = sidewalk_x(int(rng.choice((-1, 1))), 0.8), float(sc.z0 / rng.uniform(0.15, 0.4))
            actors.append(_Actor("crowd", X, Z, [_Inst("pedestrian", crowd=True)],
                                 {"offsets": (-0.35, 0.0, 0.35), "members": members}))
    elif sc.scene in ("parking lot", "gas stations", "undefined"):
        for _ in range(int(rng.integers(*people))):
            actors.append(_pedestrian(rng, float(rng.uniform(b0 - 6, bn + 6)), float(sc.z0 / rng.uniform(0.15, 0.7))))

    # Two-wheelers: riders near the right edge of the road, parked bicycles on sidewalks.
    if sc.scene in ("city street", "residential", "undefined", "gas stations") and rng.random() < 0.45:
        vehicle = "bicycle" if rng.random() < 0.6 else "motorcycle"
        actors.append(_Actor("rider", bn - 0.8, float(sc.z0 / rng.uniform(0.15, 0.8)), [_Inst(vehicle), _Inst("rider")],
                             {"facing": int(rng.choice((-1, 1))), "bike": _jit(rng, (30, 190, 170), 10),
                              "moto": _jit(rng, (110, 40, 140), 10)}, vZ=float(rng.uniform(-0.8, 0.8))))
    if sw > 0 and rng.random() < 0.25:
        X, Z = sidewalk_x(int(rng.choice((-1, 1)))), float(sc.z0 / rng.uniform(0.15, 0.6))
        actors.append(_Actor("bike", X, Z, [_Inst("bicycle")],
                             {"facing": int(rng.choice((-1, 1))), "bike": _jit(rng, (30, 190, 170), 10)}))

    # Rare mapped-and-ignored categories (other person / other vehicle / trailer) and trains.
    if not pose and rng.random() < 0.15:
        rare = str(rng.choice(("other person", "other vehicle", "trailer")))
        if rare == "other person":
            side = int(rng.choice((-1, 1)))
            X = sidewalk_x(side) if sw > 0 else float(rng.uniform(b0 - 3, bn + 3))
            actors.append(_pedestrian(rng, X, float(sc.z0 / rng.uniform(0.15, 0.6)), "other person"))
        else:
            lane = int(rng.choice(lanes))
            actors.append(_vehicle(rng, rare, sc.lane_center(lane), float(sc.z0 / rng.uniform(0.12, 0.45))))
    if sc.scene in ("highway", "undefined") and rng.random() < 0.08:
        X = b0 - float(rng.uniform(5, 8))
        actors.append(_Actor("train", X, float(rng.uniform(8, 20)), [_Inst("train")],
                             {"length": float(rng.uniform(18, 30)), "body": _jit(rng, (175, 178, 188), 8)}, far=True))

    # Street furniture: traffic lights, signs, trees, bins.
    n_lights = {"city street": (0, 3), "residential": (0, 2), "gas stations": (0, 2)}.get(sc.scene, (0, 1))
    n_signs = {"city street": (0, 3), "residential": (0, 2), "highway": (0, 2), "undefined": (0, 2),
               "gas stations": (0, 2), "parking lot": (0, 2)}.get(sc.scene, (0, 1))
    def edge(side: int) -> float:  # where poles stand: on a sidewalk, else just off the road
        if sw > 0:
            return sidewalk_x(side, 0.2)
        return (b0 - 0.5) if side < 0 else (bn + 0.5)

    if sc.scene != "tunnel":
        for _ in range(int(rng.integers(*n_lights))):
            side = int(rng.choice((-1, 1)))
            X, Z = edge(side), float(sc.z0 / rng.uniform(0.12, 0.5))
            actors.append(_Actor("traffic light", X, Z, [_Inst("traffic light")], {"lit": int(rng.integers(3))}))
        for _ in range(int(rng.integers(*n_signs))):
            side = int(rng.choice((-1, 1)))
            shape = "board" if sc.scene == "highway" else str(rng.choice(("diamond", "disc", "plate")))
            X = edge(side) + (side * 1.5 if shape == "board" else 0.0)
            actors.append(_Actor("traffic sign", X, float(sc.z0 / rng.uniform(0.1, 0.45)), [_Inst("traffic sign")],
                                 {"shape": shape}))
    if sc.scene in ("city street", "residential") and sw > 0:
        for _ in range(int(rng.integers(0, 4))):
            side = int(rng.choice((-1, 1)))
            X = (b0 - sw + 0.6) if side < 0 else (bn + sw - 0.6)
            actors.append(_Actor("tree", X, float(sc.z0 / rng.uniform(0.08, 0.5)), [],
                                 {"r": float(rng.uniform(1.2, 1.8)), "crown": _jit(rng, (45, 118, 40), 12)}))
    for _ in range(int(rng.integers(1, 3))):
        side = int(rng.choice((-1, 1)))
        X = sidewalk_x(side, 0.4) if sw > 0 else ((b0 - 1.5) if side < 0 else (bn + 1.5))
        actors.append(_Actor("bin", X, float(sc.z0 / rng.uniform(0.1, 0.6)), []))

    if video:
        _set_motion(sc, rng, actors)
    return actors


def _set_motion(sc: _Scene, rng: np.random.Generator, actors: list[_Actor]) -> None:
    """World velocities for a video (the camera moves too, see :class:`_Ego`): vehicles keep
    their lane at about the ego speed (``_populate``'s ``vZ`` is the speed relative to the
    camera), oncoming ones drive towards it; people walk, riders cross; parked and static
    things stand still; with probability 0.7 one actor heads out of the frame sideways."""
    v, steps = (sc.motion.speed, sc.motion.frames - 1) if sc.motion is not None else (0.0, 1)
    movers = []
    traffic: dict[int, list[_Actor]] = {}  # moving vehicles per lane
    for a in actors:
        if a.kind == "pedestrian":
            a.vX = float(rng.choice((-1, 1)) * rng.uniform(0.12, 0.3))
            a.vZ, a.dphase = float(rng.uniform(-0.2, 0.2)), 0.9
            movers.append(a)
        elif a.kind == "rider":
            a.vX, a.vZ = a.p["facing"] * float(rng.uniform(0.1, 0.3)), 0.0
            movers.append(a)
        elif a.kind in ("car", "truck", "bus") and a.vZ != 0.0:
            lane = _lane_of(sc, a.X)
            if sc.divider is not None and lane < sc.divider:  # oncoming: about the ego's speed
                a.vZ = -v + a.vZ
            else:  # relative speed up to +-1.2 m per frame
                a.vZ = v + 1.5 * a.vZ
            traffic.setdefault(lane, []).append(a)
            movers.append(a)
    # Lane changes: a vehicle of the ego's direction moves over to a free neighbouring lane
    # within the video (it then counts in both lanes).
    own, ego_lane = set(sc.own_lanes()), {id(a) for a in traffic.get(sc.ego, [])}
    for lane in sorted(traffic):
        for a in list(traffic[lane]) if lane in own else []:
            side = int(rng.choice((-1, 1)))
            if rng.random() >= 0.35 or lane + side not in own or a.vX:
                continue
            if all(abs(b.Z - a.Z) > 12.0 for b in traffic.get(lane + side, [])):
                a.vX = (sc.lane_center(lane + side) - a.X) / steps * float(rng.uniform(0.8, 1.0))
                traffic.setdefault(lane + side, []).append(a)
                if lane + side == sc.ego:
                    ego_lane.add(id(a))
    # Nothing comes closer than 10 m to the camera in the ego lane, and no vehicle drives
    # through the next one in its lane: the farther of two keeps at least 6 m (it speeds up,
    # or an oncoming one slows down).
    for lane, cars in traffic.items():
        cars.sort(key=lambda b: b.Z)
        for a in cars:
            if id(a) in ego_lane:
                a.vZ = max(a.vZ, v + (10.0 - a.Z) / steps)
        for near, far in zip(cars, cars[1:]):
            far.vZ = max(far.vZ, near.vZ + (near.Z + 6.0 - far.Z) / steps)
    if movers and rng.random() < 0.7:
        a = movers[int(rng.integers(len(movers)))]
        x0, _ = sc.pt(a.X, sc.s(a.Z))
        side = -1.0 if x0 < sc.width / 2 else 1.0
        # about a fifteenth of the image width per frame, at this depth
        a.vX = side * sc.width / 15 / (sc.ppm * sc.s(a.Z))
        a.vZ = v if a.kind in ("car", "truck", "bus") else 0.0  # vehicles keep pace, people stop walking ahead
        if a.kind == "pedestrian":
            a.p["facing"] = int(rng.choice((-1, 1)))


def _lane_of(sc: _Scene, X: float) -> int:
    """Index of the lane at lateral offset ``X`` (clamped to the road's lanes)."""
    return int(np.clip(np.searchsorted(sc.bounds, X) - 1, 0, len(sc.bounds) - 2))


def _step(actors: list[_Actor], rng: np.random.Generator) -> None:
    """Advance one frame in the world: constant velocity plus small noise for moving actors
    (the camera's own motion is :meth:`_Ego.pose`)."""
    for a in actors:
        if a.vX or a.vZ:
            a.X += a.vX + float(rng.normal(0, 0.02))
            a.Z += a.vZ + float(rng.normal(0, 0.05))
        a.phase += a.dphase


# ---------------------------------------------------------------------------------------------
# Rendering one frame
# ---------------------------------------------------------------------------------------------


def _extents(inst_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per instance id ``i``: pixel count ``count[i]`` and inclusive extent ``ext[i] = (x1, y1, x2, y2)``
    (``x1 > x2`` where the id does not occur)."""
    n = int(inst_map.max()) + 1
    ys, xs = np.nonzero(inst_map)
    ids = inst_map[ys, xs]
    ext = np.empty((n, 4), np.int64)
    ext[:, :2], ext[:, 2:] = np.iinfo(np.int64).max, -1
    for col, v, op in ((0, xs, np.minimum), (1, ys, np.minimum), (2, xs, np.maximum), (3, ys, np.maximum)):
        op.at(ext[:, col], ids, v)
    return np.bincount(ids, minlength=n), ext


@dataclass
class _Object:
    """A labelled instance visible in a rendered frame."""

    iid: int
    category: str
    box: tuple[float, float, float, float]  # Scalabel box2d: x2, y2 inclusive
    occluded: bool
    truncated: bool
    crowd: bool
    keypoints: list[tuple[float, float, bool]] | None = None  # (x, y, visible) x 18


@dataclass
class _Frame:
    image: np.ndarray  # [H, W, 3] uint8
    sem: np.ndarray  # [H, W] uint8 train ids, 255 ignore
    drivable: np.ndarray  # [H, W] uint8
    lane: np.ndarray  # [H, W] uint8
    inst: np.ndarray  # [H, W] int32 labelled instance ids, 0 elsewhere
    objects: list[_Object]


def _render(sc: _Scene, bg: _Background, actors: list[_Actor], rng: np.random.Generator) -> _Frame:
    W, H = sc.width, sc.height
    min_px = max(6, round(0.00035 * W * H))
    order = sorted(actors, key=lambda a: (not a.far, -a.Z, a.X))
    skip: set[int] = set()
    # Instances left with too few visible pixels are dropped. One that still shows some pixels
    # forces a redraw without it (so no drawn pixel is unlabelled); one fully off-image or fully
    # covered left no trace in any layer and is just not labelled. Each pass drops one or more.
    while True:
        cv = _Canvas(bg.rgb.copy(), bg.sem.copy(), bg.glow.copy(), frozenset(skip))
        drawn: dict[int, int] = {}
        for a in order:
            far_end = a.Z + (a.p["length"] if a.kind == "train" else 0.0)
            if far_end - sc.cam_z <= _NEAR or sc.s(a.Z) < 0.03:  # behind the camera or too far
                continue
            _DRAW[a.kind](cv, a, sc)
            for inst in a.insts:
                if inst.iid != _OCC and inst.iid not in skip:
                    drawn[inst.iid] = cv.count(inst.iid)
        raw = np.asarray(cv.inst, dtype=np.int32)
        inst_map = np.where(raw == _OCC, 0, raw)
        visible, ext = _extents(inst_map)
        hidden = set()
        for iid in drawn:
            if iid >= len(visible) or visible[iid] < min_px or min(ext[iid, 2:] - ext[iid, :2]) < 1:
                hidden.add(iid)
        if not any(iid < len(visible) and visible[iid] > 0 for iid in hidden):
            break
        skip |= hidden
    covered = raw != 0
    drivable, lane = bg.drivable.copy(), bg.lane.copy()
    drivable[covered] = 2
    lane[covered] = B.LANE_BACKGROUND
    by_iid = {i.iid: i for a in actors for i in a.insts}
    objects = []
    for iid in sorted(set(drawn) - hidden):
        e = cv.extent[iid]
        kps = None
        if iid in cv.keypoints:
            kps = []
            for x, y in cv.keypoints[iid]:
                xi, yi = int(round(x)), int(round(y))
                patch = inst_map[max(0, yi - 1):yi + 2, max(0, xi - 1):xi + 2]
                inside = 0 <= x <= W - 1 and 0 <= y <= H - 1
                seen = bool(inside and (patch == iid).any())
                kps.append((float(np.clip(x, 0, W - 1)), float(np.clip(y, 0, H - 1)), seen))
        objects.append(_Object(
            iid=iid, category=by_iid[iid].category, box=tuple(float(v) for v in ext[iid]),  # type: ignore[arg-type]
            occluded=bool(visible[iid] < 0.9 * drawn[iid]),
            truncated=bool(e[0] < 0 or e[1] < 0 or e[2] > W - 1 or e[3] > H - 1),
            crowd=by_iid[iid].crowd, keypoints=kps,
        ))
    image = _finish(sc, np.asarray(cv.rgb), np.asarray(cv.glow), rng)
    return _Frame(image, np.asarray(cv.sem).copy(), drivable, lane, inst_map, objects)


def _finish(sc: _Scene, rgb: np.ndarray, glow: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weather and time-of-day look, then sensor noise. Labels are unaffected."""
    W, H = sc.width, sc.height
    f = rgb.astype(np.float32)
    lit = f.copy()
    grey = f.mean(axis=2, keepdims=True)
    sigma = 3.5
    if sc.weather == "overcast":
        f = (f * 0.55 + grey * 0.45) * 0.9
    elif sc.weather == "rainy":
        f = (f * 0.65 + grey * 0.35) * 0.74 * np.array([0.93, 0.98, 1.08], np.float32)
        f = _streaks(f, rng, W, H, snow=False)
        sigma = 5.0
    elif sc.weather == "snowy":
        f = (f * 0.82 + 38) * np.array([0.97, 1.0, 1.05], np.float32)
        f = _streaks(f, rng, W, H, snow=True)
    elif sc.weather == "foggy":
        y = np.arange(H, dtype=np.float32)[:, None, None]
        fog = 0.3 + 0.55 * np.exp(-np.abs(y - sc.horizon) / (0.22 * H))
        f = f * (1 - fog) + 206.0 * fog
    elif sc.weather == "undefined":
        f = f * 0.8 + 25 + np.array([8, -4, 6], np.float32)
        blur = ImageFilter.BoxBlur(max(1, round(sc.u)))
        f = np.asarray(Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).filter(blur), dtype=np.float32)
    elif sc.weather == "clear":
        f = (f - 128) * 1.06 + 130
    if sc.timeofday == "night":
        f = f * 0.27
        sigma += 1.5
    elif sc.timeofday == "dawn/dusk":
        f = f * np.array([0.9, 0.72, 0.58], np.float32)
    elif sc.timeofday == "undefined":
        f = f * 0.55
    if sc.timeofday != "daytime":  # lamps, tail lights and lit windows stay bright
        g = glow > 0
        f[g] = np.maximum(f[g], lit[g])
    f += rng.standard_normal(f.shape, dtype=np.float32) * sigma
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def _streaks(f: np.ndarray, rng: np.random.Generator, W: int, H: int, *, snow: bool) -> np.ndarray:
    """Rain streaks or snow flakes blended over the image."""
    ov = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(ov)
    u = H / 96.0
    n = int((0.004 if snow else 0.0025) * W * H / max(u, 1.0))
    xs, ys = rng.uniform(0, W, n), rng.uniform(0, H, n)
    if snow:
        rs = rng.uniform(0.4, 1.0, n) * u
        for x, y, r in zip(xs, ys, rs):
            d.ellipse((x - r, y - r, x + r, y + r), fill=255)
        a, target = 0.8, 245.0
    else:
        length = 0.07 * H
        for x, y in zip(xs, ys):
            d.line([(x, y), (x - 0.25 * length, y + length)], fill=255, width=max(1, round(0.5 * u)))
        a, target = 0.3, 215.0
    m = np.asarray(ov, dtype=np.float32)[..., None] / 255.0 * a
    return f * (1 - m) + target * m


# ---------------------------------------------------------------------------------------------
# Samples of each set
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, stream: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], B.SPLITS.index(split), index])


def _name(seed: int, stream: str, split: str, index: int) -> str:
    h = hashlib.blake2b(f"vtd-synth/{seed}/{stream}/{split}/{index}".encode(), digest_size=8).hexdigest()
    return f"{h[:8]}-{h[8:]}"


def _assign(actors: list[_Actor], labelled: Callable[[_Inst], bool]) -> None:
    """Give labelled instances ids 1..N in creation order and the rest ``_OCC``."""
    n = 0
    for a in actors:
        for inst in a.insts:
            if labelled(inst):
                n += 1
                inst.iid = n
            else:
                inst.iid = _OCC


def _is_thing(inst: _Inst) -> bool:
    return inst.category in B.THING_CATEGORIES or inst.category in B.IGNORE_MAP


def _still(seed: int, spec: SynthSize, stream: str, split: str, index: int, *, pose: bool) -> tuple[_Scene, _Frame]:
    """One det (``stream='det'``) or seg (``'seg'``) image."""
    rng = _rng(seed, stream, split, index)
    sc = _make_scene(rng, spec.width, spec.height)
    bg, statics = _background(sc, rng)
    actors = statics + _populate(sc, rng, pose=pose, video=False)
    _assign(actors, (lambda i: True) if stream == "det" else _is_thing)
    return sc, _render(sc, bg, actors, rng)


def _video(seed: int, spec: SynthSize, stream: str, split: str, index: int) -> tuple[_Scene, list[_Frame]]:
    """One tracking video: a camera driving along its lane (:class:`_Ego`), the background
    redrawn from each camera pose, moving actors with stable track ids."""
    rng = _rng(seed, stream, split, index)
    sc = _make_scene(rng, spec.width, spec.height)
    n = spec.frames_per_video
    lo, hi = _EGO_SPEED[sc.scene]
    ego = _Ego(speed=float(rng.uniform(lo, hi)), sway=float(rng.choice((-1, 1)) * rng.uniform(5.0, 10.0)) * sc.u,
               omega=float(rng.uniform(0.45, 0.85)), phase=float(rng.uniform(0, 2 * math.pi)), frames=n)
    sc = replace(sc, motion=ego, reach=ego.speed * (n - 1))
    bg_rng = copy.deepcopy(rng)  # every frame's background draws the same scenery
    bg, statics = _background(sc, rng)
    actors = statics + _populate(sc, rng, pose=False, video=True)
    _assign(actors, _is_thing)
    frames = []
    for t in range(n):
        cam = sc
        if t:
            cam = replace(sc, **ego.pose(sc, t))
            bg = _background(cam, copy.deepcopy(bg_rng))[0]
        frames.append(_render(cam, bg, actors, rng))
        _step(actors, rng)
    return sc, frames


#: Ego speed range per scene tag (metres per frame; BDD100K's tracking labels are at 5 fps).
_EGO_SPEED: Final[dict[str, tuple[float, float]]] = {
    "city street": (0.8, 1.6), "residential": (0.6, 1.3), "highway": (1.8, 2.4), "tunnel": (1.4, 2.0),
    "gas stations": (0.3, 0.8), "parking lot": (0.2, 0.6), "undefined": (0.7, 1.4),
}


@dataclass(frozen=True)
class _Ego:
    """The camera motion of one video: forward along the (straight) road at ``speed`` metres
    per frame, with a slow heading sway (yaw) that moves the vanishing point by
    ``pan(t) = sway * (sin(omega t + phase) - sin(phase))`` pixels; driving forward with that
    heading drifts the camera sideways. The road and its straight lines stay put under the
    forward motion; everything at a finite depth (dashes, facades, poles, objects) comes
    closer and moves outwards from the vanishing point."""

    speed: float
    sway: float
    omega: float
    phase: float
    frames: int  # frames of the video

    def pan(self, t: int) -> float:
        return self.sway * (math.sin(self.omega * t + self.phase) - math.sin(self.phase))

    def pose(self, sc: _Scene, t: int) -> dict[str, float]:
        """``cam_x``, ``cam_z``, ``pan`` of frame ``t`` (frame 0: all 0)."""
        focal = sc.ppm * sc.z0  # pixels per unit of X / Z
        cam_x = 0.0
        for k in range(t):  # heading psi = -pan / focal (+ right); the step k -> k+1 follows it
            cam_x += self.speed * -self.pan(k) / focal
        return {"cam_x": cam_x, "cam_z": self.speed * t, "pan": self.pan(t)}


def _is_pose_image(index: int) -> bool:
    return index % 2 == 0


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    """Atomic write: a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _png(a: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(a)
    if im.mode != mode:
        raise ValueError(f"mask has PIL mode {im.mode}, expected {mode}")
    im.save(buf, format="PNG")
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode()


def _box2d(o: _Object) -> dict[str, float]:
    return {"x1": o.box[0], "y1": o.box[1], "x2": o.box[2], "y2": o.box[3]}


def _attrs(o: _Object) -> dict[str, bool]:
    return {"occluded": o.occluded, "truncated": o.truncated, "crowd": o.crowd}


def _bitmask(fr: _Frame) -> np.ndarray:
    """RGBA bitmask of a frame's thing instances (mapped categories carry the ignore bit)."""
    n = int(fr.inst.max()) + 1
    cat, trunc, occ, crowd, ign = (np.zeros(n, np.int32) for _ in range(5))
    for o in fr.objects:
        if not _is_thing(_Inst(o.category)):
            continue
        mapped = B.IGNORE_MAP.get(o.category, o.category)
        cat[o.iid] = B.BITMASK_CATEGORIES.index(mapped) + 1
        trunc[o.iid], occ[o.iid], crowd[o.iid] = o.truncated, o.occluded, o.crowd
        ign[o.iid] = o.category in B.IGNORE_MAP
    keep = cat[fr.inst] > 0
    inst = np.where(keep, fr.inst, 0)
    return B.encode_bitmask(cat[inst], inst, truncated=trunc[inst], occluded=occ[inst], crowd=crowd[inst],
                            ignore=ign[inst])


def _prepare_root(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    existing = [root / d for d in ("images", "labels") if (root / d).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{root}: already holds a BDD100K layout ({', '.join(p.name + '/' for p in existing)}); "
                              "pass overwrite=True to replace it")
    for p in existing:  # overwrite: drop the old layout so no stale file survives
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate(out: str | os.PathLike[str], seed: int = 0, size: str = "tiny", overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic BDD100K root to ``out`` and return a JSON-able summary.

    ``size`` is a key of :data:`SIZES`. The same ``seed`` gives byte-identical files. Raises
    ``FileExistsError`` if ``out`` already holds ``images/`` or ``labels/`` and ``overwrite`` is
    false (with ``overwrite`` those two trees are deleted first).

    Summary: ``{"root", "seed", "size", "image_size": {"width", "height"}, "files",
    "sets": {set: {split: counts}}}`` with sets ``det`` (images, objects, pose_images,
    pose_persons), ``seg`` (images, objects), ``track`` and ``mots`` (videos, images, objects,
    tracks); ``objects`` counts labels (det, track) or bitmask instances (seg, mots).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    spec = SIZES[size]
    root = Path(out)
    _prepare_root(root, overwrite)
    sets: dict[str, dict[str, dict[str, int]]] = {"det": {}, "seg": {}, "track": {}, "mots": {}}
    n_files = 0

    def put(rel: str, data: bytes) -> None:
        nonlocal n_files
        _write(root / rel, data)
        n_files += 1

    for si, split in enumerate(B.SPLITS):
        # det set: det_20 + pose_21 + drivable + lane
        det_frames, pose_frames, label_id, n_obj, n_pose = [], [], 0, 0, 0
        for i in range(spec.det[si]):
            name = _name(seed, "det", split, i)
            pose = _is_pose_image(i)
            sc, fr = _still(seed, spec, "det", split, i, pose=pose)
            put(f"{Layout.images_100k(split)}/{name}.jpg", _jpeg(fr.image))
            put(f"{Layout.drivable_masks(split)}/{name}.png", _png(fr.drivable, "L"))
            put(f"{Layout.lane_masks(split)}/{name}.png", _png(fr.lane, "L"))
            labels, persons = [], []
            for o in fr.objects:
                label_id += 1
                labels.append({"id": str(label_id), "category": o.category, "attributes": _attrs(o),
                               "box2d": _box2d(o)})
                if pose and o.keypoints is not None and o.category == "pedestrian":
                    nodes = [{"location": [round(x, 2), round(y, 2)], "category": j,
                              "visibility": B.POSE_VISIBLE if v else B.POSE_NOT_VISIBLE}
                             for (x, y, v), j in zip(o.keypoints, B.POSE_JOINTS)]
                    graph = {"nodes": nodes, "edges": [], "type": B.POSE_GRAPH_TYPE}
                    persons.append({"id": str(label_id), "category": "pedestrian", "attributes": _attrs(o),
                                    "box2d": _box2d(o), "graph": graph})
            det_frames.append({"name": f"{name}.jpg", "attributes": sc.attributes(), "timestamp": 10000,
                               "labels": labels})
            if pose:
                pose_frames.append({"name": f"{name}.jpg", "attributes": sc.attributes(), "labels": persons})
            n_obj, n_pose = n_obj + len(labels), n_pose + len(persons)
        put(Layout.det_json(split), _json(det_frames))
        put(Layout.pose_json(split), _json(pose_frames))
        sets["det"][split] = {"images": len(det_frames), "objects": n_obj, "pose_images": len(pose_frames),
                              "pose_persons": n_pose}

        # seg set: sem_seg masks + ins_seg bitmasks
        n_obj = 0
        for i in range(spec.seg[si]):
            name = _name(seed, "seg", split, i)
            _, fr = _still(seed, spec, "seg", split, i, pose=False)
            put(f"{Layout.images_10k(split)}/{name}.jpg", _jpeg(fr.image))
            put(f"{Layout.sem_masks(split)}/{name}.png", _png(fr.sem, "L"))
            put(f"{Layout.ins_bitmasks(split)}/{name}.png", _png(_bitmask(fr), "RGBA"))
            n_obj += len(fr.objects)
        sets["seg"][split] = {"images": spec.seg[si], "objects": n_obj}

        # MOT videos: box_track_20
        n_obj, n_img, n_tracks = 0, 0, 0
        for v in range(spec.track_videos[si]):
            video = _name(seed, "track", split, v)
            sc, frames = _video(seed, spec, "track", split, v)
            out_frames, tracks = [], set()
            for t, fr in enumerate(frames):
                fname = f"{video}-{t:07d}.jpg"
                put(f"{Layout.images_track(split)}/{video}/{fname}", _jpeg(fr.image))
                labels = [{"id": str(o.iid), "category": o.category, "attributes": _attrs(o), "box2d": _box2d(o)}
                          for o in fr.objects]
                tracks.update(o.iid for o in fr.objects)
                out_frames.append({"name": fname, "videoName": video, "frameIndex": t, "attributes": sc.attributes(),
                                   "labels": labels})
                n_obj += len(labels)
            put(f"{Layout.box_track_dir(split)}/{video}.json", _json(out_frames))
            n_img += len(frames)
            n_tracks += len(tracks)
        sets["track"][split] = {"videos": spec.track_videos[si], "images": n_img, "objects": n_obj, "tracks": n_tracks}

        # MOTS videos: seg_track_20 bitmasks (instance id = track id)
        n_obj, n_img, n_tracks = 0, 0, 0
        for v in range(spec.mots_videos[si]):
            video = _name(seed, "mots", split, v)
            _, frames = _video(seed, spec, "mots", split, v)
            tracks = set()
            for t, fr in enumerate(frames):
                stem = f"{video}-{t:07d}"
                put(f"{Layout.images_seg_track(split)}/{video}/{stem}.jpg", _jpeg(fr.image))
                put(f"{Layout.seg_track_bitmasks(split)}/{video}/{stem}.png", _png(_bitmask(fr), "RGBA"))
                tracks.update(o.iid for o in fr.objects)
                n_obj += len(fr.objects)
            n_img += len(frames)
            n_tracks += len(tracks)
        sets["mots"][split] = {"videos": spec.mots_videos[si], "images": n_img, "objects": n_obj, "tracks": n_tracks}

    return {"root": str(root), "seed": seed, "size": size, "image_size": {"width": spec.width, "height": spec.height},
            "files": n_files, "sets": sets}
