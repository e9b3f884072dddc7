"""Populating a scene with actors, and their motion in a video."""

from __future__ import annotations

from typing import Any

import numpy as np

from .actors import _Actor, _Inst
from .scene import _Scene, _jit


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
