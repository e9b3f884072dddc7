"""Rendering one frame: actors far to near over the background, labels from the drawn pixels,
then the weather / time-of-day look and sensor noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_pipeline.bdd100k import format as B

from .actors import _DRAW, _Actor
from .background import _Background
from .canvas import _Canvas
from .scene import _NEAR, _OCC, _Scene


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
