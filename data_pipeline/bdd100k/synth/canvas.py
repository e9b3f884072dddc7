"""The drawing canvas: one draw call paints every layer of a frame."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .scene import _OCC


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
