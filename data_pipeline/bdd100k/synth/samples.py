"""One sample of each set: a still image (det, seg) or a tracking video (track, mots)."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from data_pipeline.bdd100k import format as B

from .actors import _Actor, _Inst
from .background import _background
from .populate import _populate, _step
from .render import _Frame, _render
from .scene import _EGO_SPEED, _OCC, _STREAMS, SynthSize, _Ego, _make_scene, _Scene, _tag_plan

_TAG_PLAN = 2**32  # generator key of a split's tag plan in place of an image index


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
    """One det (``stream='det'``) or seg (``'seg'``) image. The det images' tags (the only ones
    labelled for tagging) follow their split's :func:`_tag_plan`; the others are drawn per image."""
    rng = _rng(seed, stream, split, index)
    tags = None
    if stream == "det":
        plan_rng = np.random.default_rng([seed, _STREAMS[stream], B.SPLITS.index(split), _TAG_PLAN])
        tags = _tag_plan(plan_rng, spec.det[B.SPLITS.index(split)])[index]
    sc = _make_scene(rng, spec.width, spec.height, tags)
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


def _is_pose_image(index: int) -> bool:
    return index % 2 == 0
