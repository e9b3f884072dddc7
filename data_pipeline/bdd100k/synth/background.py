"""The background of a frame: sky, ground, road, lane paint and scenery, with the drivable and
lane masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.bdd100k import format as B

from .actors import _Actor
from .canvas import _Canvas
from .scene import (_BUILDING, _CURB, _FENCE, _NEAR, _ROAD, _S_FAR, _S_NEAR, _SIDEWALK, _SKY, _TERRAIN, _VEGETATION,
                    _WALL, _WHITE, _YELLOW, _jit, _Scene)


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
