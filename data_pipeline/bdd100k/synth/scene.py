"""Size presets, scene attributes and the scene geometry: a flat ground plane seen by a level
camera (:class:`_Scene`), and the camera motion of a video (:class:`_Ego`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from data_pipeline.bdd100k import format as B


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


_TINY: Final = SynthSize(width=160, height=96, det=(24, 8), seg=(12, 4), track_videos=(3, 2), mots_videos=(2, 2))
SIZES: Final[dict[str, SynthSize]] = {
    # two validation videos of each kind: with one, AssA (HOTA over a few tracked objects of a
    # weak tiny detector) moved by 6-8 points between checkpoints whose embeddings differed little
    "tiny": _TINY,
    # `vtd demo`: tiny with 32 det validation frames. On tiny's 8 a frame is 12.5 points of a
    # tagging accuracy: the demo's final model scored acc_scene 25.0 there and 51.0 on 96 frames
    # of the same generator, where the untrained one scored 37.5 and 21.9 (benchmarks/RESULTS.md)
    "demo": replace(_TINY, det=(24, 32)),
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


def _quota(table: dict[str, float], n: int) -> list[str]:
    """``n`` values of ``table`` in proportion to its probabilities (largest remainder; ties go
    to the earlier key), in table order."""
    keys = list(table)
    p = np.array([table[k] for k in keys], np.float64)
    share = p / p.sum() * n
    count = np.floor(share).astype(int)
    order = sorted(range(len(keys)), key=lambda i: (-(share[i] - count[i]), i))
    for i in order[: n - int(count.sum())]:
        count[i] += 1
    return [k for k, c in zip(keys, count) for _ in range(c)]


def _tag_plan(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """Tags ``(weather, scene, timeofday)`` of the ``n`` images of one split: each tag's values in
    proportion to its table (:func:`_quota`), shuffled independently, so that the train and val
    splits share one distribution however few images they hold (drawn independently per image,
    8 val images once came out 6 "city street" against a mostly "highway" train split)."""
    columns = []
    for table in (_WEATHER_P, _SCENE_P, _TIME_P):
        values = _quota(table, n)
        columns.append([values[i] for i in rng.permutation(n)])
    return list(zip(*columns))


def _make_scene(rng: np.random.Generator, W: int, H: int, tags: tuple[str, str, str] | None = None) -> _Scene:
    """A random scene; ``tags`` ``(weather, scene, timeofday)`` replace the drawn ones (the draws
    are still made, so the rest of the image draws the same numbers as before)."""
    weather, scene, tod = _pick(rng, _WEATHER_P), _pick(rng, _SCENE_P), _pick(rng, _TIME_P)
    if tags is not None:
        weather, scene, tod = tags
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
