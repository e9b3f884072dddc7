"""Actors (objects, poles, trees, bins) and how each kind is drawn."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from data_pipeline.bdd100k import format as B

from .canvas import _Canvas
from .scene import _OCC, _OTHER_PERSON, _PED, _POLE, _SEM, _SKIN, _VEGETATION, _Scene


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
