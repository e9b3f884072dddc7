"""Evaluation report: metrics vs a reference row, a chart, and Figure-6-style overlays.

:func:`write_report` turns the canonical metrics of a run (the 13 keys of
:data:`vtda.METRIC_KEYS`, validated by :func:`vtda.score`) into a directory::

    out_dir/
      metrics.json     canonical keys present + vtda.score fields (``vtd score`` reads it back)
      chart.png        per-task bars (run vs reference) and the four VTDA group scores
      overlay_<k>.png  one per :class:`OverlayFrame`, drawn by :func:`render_overlay`
      report.md        the tables and images, Markdown
      report.html      the same, self-contained HTML (images by relative path)

The default reference is the paper's VTDNet-R50 row (:mod:`.reference`); any metrics file is
accepted instead (read it with :func:`load_reference`).

:func:`render_overlay` draws the paper's qualitative visualisation (Figure 6, appendix J):
drivable area red (direct) / blue (alternative), lanes green, instance masks and boxes in a
colour fixed by the track (or instance) id, pose skeletons and the image tags, with semantic
segmentation and optical flow as side panels.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib.colors import hsv_to_rgb
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_pipeline.bdd100k.format import IGNORE_INDEX, POSE_JOINTS, POSE_SKELETON, SEM_CLASSES, THING_CATEGORIES
from data_pipeline.errors import VTDInputError

from .containers import _bool_array, _check_boxes, _err, _float_array, _int_array
from .reference import PAPER_VTDNET_R50, PAPER_VTDNET_R50_NAME, PAPER_VTDNET_R50_SCORES, load_reference
from .vtda import GROUPS, METRIC_KEYS, VTDA_KEYS, score, validate_metrics

__all__ = ["OverlayFrame", "load_reference", "render_overlay", "track_colors", "write_report"]

#: Readable name and the paper's column symbol of every canonical metric.
METRIC_LABELS: Final[dict[str, tuple[str, str]]] = {
    "acc_weather": ("Weather tagging", "Acc_Gw"), "acc_scene": ("Scene tagging", "Acc_Gs"),
    "iou_sem": ("Semantic seg.", "IoU_S"), "iou_drivable": ("Drivable area", "IoU_A"),
    "iou_lane": ("Lane detection", "IoU_L"),
    "ap_det": ("Detection", "AP_D"), "ap_ins": ("Instance seg.", "AP_I"), "ap_pose": ("Pose", "AP_P"),
    "ap_mot": ("MOT", "AP_T"), "ap_mots": ("MOTS", "AP_R"),
    "iou_flow": ("Optical flow", "IoU_F"), "assa_mot": ("MOT", "AssA_T"), "assa_mots": ("MOTS", "AssA_R"),
}
GROUP_LABELS: Final = {"cls": "classification", "seg": "segmentation", "loc": "localization", "ass": "association"}

# Overlay colours (RGB). Drivable and lanes follow the paper's Figure 6 / appendix J.
DRIVABLE_COLORS: Final = np.array([[255, 0, 0], [0, 0, 255]], np.float32)  # direct, alternative
LANE_COLOR: Final = (0, 255, 0)
#: The Cityscapes palette of the 19 train ids (``bdd100k.SEM_CLASSES`` order).
SEM_PALETTE: Final = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], np.uint8)
# Pose skeleton: right limbs orange, left limbs cyan, the spine yellow (people are told apart by place).
_JOINT = {j: i for i, j in enumerate(POSE_JOINTS)}
_BONES: Final = np.array([(_JOINT[a], _JOINT[b]) for a, b in POSE_SKELETON], np.int64)
_BONE_COLORS: Final = [
    (255, 140, 0) if "right" in a + b and "left" not in a + b
    else (0, 220, 255) if "left" in a + b and "right" not in a + b
    else (255, 230, 0)
    for a, b in POSE_SKELETON
]
PANEL_GAP: Final = 4  # px of dark background between the main image and each side panel
_ALPHA_DRIVABLE, _ALPHA_MASK, _ALPHA_SEM = 0.5, 0.55, 0.7
_LANE_HUE_LO, _LANE_HUE_GAP = 0.27, 0.13  # hue band [0.27, 0.40) (green) kept for lanes
_OVERLAY_NAME = re.compile(r"overlay_\d+\.png")


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: identity equality
class OverlayFrame:
    """Predictions (or labels) of one image to draw. Validated on creation.

    ==========  ===================  ==============================================================
    field       shape / dtype        meaning
    ==========  ===================  ==============================================================
    name        str                  caption of the overlay
    image       [H, W, 3] uint8      RGB image
    drivable    [H, W] int           0 direct (red), 1 alternative (blue), 2 background, 255 ignore
    lane        [3, H, W] int        ``bdd100k.decode_lane_mask`` maps (direction, style,
                                     category); pixels whose category map is > 0 are drawn green
    sem         [H, W] int           train ids 0..18 (255 ignore): a side panel, Cityscapes colours
    boxes       [N, 4] float         ``x1 y1 x2 y2`` pixels; needed by every instance field below
    classes     [N] int              thing class 0..7 (``bdd100k.THING_CATEGORIES``), box label
    scores      [N] float            confidence, box label and ``score_threshold`` filter
    track_ids   [N] int              track (or instance) id: fixes the colour of mask and box;
                                     without it instances are coloured by their index
    masks       [N, H, W] bool       instance masks
    keypoints   [P, 18, 3] float     ``x, y, v`` (``bdd100k.POSE_JOINTS``); joints with v > 0 drawn
    flow        [H, W, 2] float      optical flow ``dx, dy`` in pixels: a side panel, HSV colours
    tags        {str: (str, float)}  e.g. ``{"weather": ("clear", 0.91)}``; score may be None
    ==========  ===================  ==============================================================

    Every optional field may be ``None``. CPU torch tensors are accepted (``np.asarray``).
    """

    name: str
    image: np.ndarray
    drivable: np.ndarray | None = None
    lane: np.ndarray | None = None
    sem: np.ndarray | None = None
    boxes: np.ndarray | None = None
    classes: np.ndarray | None = None
    scores: np.ndarray | None = None
    track_ids: np.ndarray | None = None
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    flow: np.ndarray | None = None
    tags: Mapping[str, tuple[str, float | None]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise VTDInputError(f"OverlayFrame: name must be a non-empty string, got {self.name!r}")
        f, set_ = self.name, object.__setattr__
        image = np.asarray(self.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise _err(f, "image", f"expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        set_(self, "image", image)
        h, w = image.shape[:2]

        def int_map(field: str, shape: tuple[int, ...], allowed: set[int] | None, what: str) -> None:
            value = getattr(self, field)
            if value is None:
                return
            a = _int_array(f, field, value, shape)
            bad = a[~np.isin(a, list(allowed))] if allowed is not None else a[a < 0]
            if bad.size:
                raise _err(f, field, f"value {int(bad[0])} is not {what}")
            set_(self, field, a)

        int_map("drivable", (h, w), {0, 1, 2, IGNORE_INDEX}, "0 direct, 1 alternative, 2 background or 255")
        int_map("lane", (3, h, w), None, "a lane class (>= 0)")
        int_map("sem", (h, w), set(range(len(SEM_CLASSES))) | {IGNORE_INDEX}, f"a train id 0..{len(SEM_CLASSES) - 1} or 255")

        instance_fields = ("classes", "scores", "track_ids", "masks")
        if self.boxes is None:
            given = [k for k in instance_fields if getattr(self, k) is not None]
            if given:
                raise _err(f, given[0], "instance fields need boxes (boxes set the instance count)")
        else:
            boxes = _float_array(f, "boxes", self.boxes, (None, 4))
            _check_boxes(f, boxes)
            set_(self, "boxes", boxes)
            n = boxes.shape[0]
            if self.classes is not None:
                classes = _int_array(f, "classes", self.classes, (n,))
                if classes.size and (classes.min() < 0 or classes.max() >= len(THING_CATEGORIES)):
                    raise _err(f, "classes", f"class ids must be 0..{len(THING_CATEGORIES) - 1}, got {classes.tolist()}")
                set_(self, "classes", classes)
            if self.scores is not None:
                set_(self, "scores", _float_array(f, "scores", self.scores, (n,)))
            if self.track_ids is not None:
                set_(self, "track_ids", _int_array(f, "track_ids", self.track_ids, (n,)))
            if self.masks is not None:
                set_(self, "masks", _bool_array(f, "masks", self.masks, (n, h, w)))
        if self.keypoints is not None:
            set_(self, "keypoints", _float_array(f, "keypoints", self.keypoints, (None, len(POSE_JOINTS), 3)))
        if self.flow is not None:
            set_(self, "flow", _float_array(f, "flow", self.flow, (h, w, 2)))
        if self.tags is not None:
            if not isinstance(self.tags, Mapping):
                raise _err(f, "tags", f"expected a mapping name -> (label, score), got {type(self.tags).__name__}")
            tags = {}
            for key, value in self.tags.items():
                ok = isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str)
                if ok and value[1] is not None:
                    ok = isinstance(value[1], (int, float)) and not isinstance(value[1], bool) and math.isfinite(value[1])
                if not isinstance(key, str) or not ok:
                    raise _err(f, "tags", f"expected str -> (label str, score float or None), got {key!r}: {value!r}")
                tags[key] = (value[0], None if value[1] is None else float(value[1]))
            set_(self, "tags", tags)


def track_colors(ids: Any) -> np.ndarray:
    """Stable RGB colour per id: ``[N]`` int → ``[N, 3]`` uint8.

    The hue steps by the golden ratio per id, so neighbouring ids get far-apart hues and the
    same id always gets the same colour (no hashing, no dependence on what else is drawn).
    Hues near pure green are skipped: green means lanes. Negative ids (unassigned) are grey.
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    hue = (ids * 0.6180339887498949 + 0.08) % 1.0 * (1.0 - _LANE_HUE_GAP)
    hue = np.where(hue >= _LANE_HUE_LO, hue + _LANE_HUE_GAP, hue)  # skip the lanes' green
    sat = np.where(ids % 2 == 0, 0.85, 0.6)  # alternate saturation: more distinct neighbours
    hsv = np.stack([hue, sat, np.full(hue.shape, 0.95)], axis=-1)
    rgb = np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8).reshape(-1, 3)
    rgb[ids < 0] = 160
    return rgb


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, width: int, *,
           fill: tuple[int, ...] = (0, 0, 0, 160), color: tuple[int, int, int] = (255, 255, 255)) -> tuple[int, ...]:
    """Text on a filled (by default translucent dark) box whose top-left is ``xy``, moved left as
    needed to stay inside an image ``width`` pixels wide; returns the box."""
    x0, y0, x1, y1 = draw.multiline_textbbox(xy, text, font=font)
    pad = max(2, font.size // 5) if hasattr(font, "size") else 2
    shift = min(0.0, width - 1 - pad - x1)  # past the right edge: move left ...
    shift = max(shift, pad - x0)  # ... but never past the left edge
    xy, x0, x1 = (xy[0] + shift, xy[1]), x0 + shift, x1 + shift
    box = (x0 - pad, y0 - pad, x1 + pad, y1 + pad)
    draw.rectangle(box, fill=fill)
    draw.multiline_text(xy, text, fill=color, font=font)
    return box


def _blend(img: np.ndarray, mask: np.ndarray, color: Any, alpha: float) -> None:
    """In place on float ``img`` [H, W, 3]: pixels of ``mask`` move ``alpha`` of the way to ``color``."""
    img[mask] = (1.0 - alpha) * img[mask] + alpha * np.asarray(color, np.float32)


def _sizes(h: int, w: int) -> tuple[int, int, int]:
    """Font size, line width and joint radius scaled to the image (a 720p frame: 22, 2, 4)."""
    s = min(h, w)
    return max(11, round(s / 32)), max(1, round(s / 360)), max(2, round(s / 180))


def render_overlay(frame: OverlayFrame, *, score_threshold: float = 0.0) -> np.ndarray:
    """Figure-6-style composite of ``frame``: uint8 RGB ``[H, W * (1 + k) + PANEL_GAP * k, 3]``.

    The main image carries, bottom to top: drivable area (red direct / blue alternative,
    alpha 0.5), lanes (opaque green, thickened with the image size), instance masks and boxes
    (colour from :func:`track_colors` of the track id, label ``class #id score``), pose
    skeletons and the tags in the top-left corner. ``k`` side panels follow on the right: the
    semantic map (Cityscapes palette over the dimmed image, legend of the largest classes) if
    ``sem`` is given and the flow (hue = direction, saturation = magnitude, with a colour
    wheel) if ``flow`` is given. Instances scoring below ``score_threshold`` are left out.
    """
    h, w = frame.image.shape[:2]
    font_size, line_w, radius = _sizes(h, w)
    font = _font(font_size)
    img = frame.image.astype(np.float32)

    if frame.drivable is not None:
        m = (frame.drivable == 0) | (frame.drivable == 1)
        img[m] = (1.0 - _ALPHA_DRIVABLE) * img[m] + _ALPHA_DRIVABLE * DRIVABLE_COLORS[frame.drivable[m]]
    if frame.lane is not None:
        lane = frame.lane[2] > 0
        size = 2 * round(min(h, w) / 480) + 1  # lane labels are ~1 px contours: 3 px at 360p, 5 at 720p
        if size > 1:
            lane = np.asarray(Image.fromarray(lane.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))) > 0
        img[lane] = LANE_COLOR

    keep = np.ones(0 if frame.boxes is None else len(frame.boxes), bool)
    if frame.scores is not None:
        keep = frame.scores >= score_threshold
    ids = frame.track_ids if frame.track_ids is not None else np.arange(len(keep))
    colors = track_colors(ids)
    if frame.masks is not None:
        for i in np.flatnonzero(keep):
            _blend(img, frame.masks[i], colors[i], _ALPHA_MASK)

    pil = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil, "RGBA")
    if frame.boxes is not None:
        for i in np.flatnonzero(keep):
            color = tuple(int(c) for c in colors[i])
            x1, y1, x2, y2 = frame.boxes[i].tolist()
            draw.rectangle((x1, y1, x2, y2), outline=color, width=line_w)
            parts = []
            if frame.classes is not None:
                parts.append(THING_CATEGORIES[frame.classes[i]])
            if frame.track_ids is not None:
                parts.append(f"#{frame.track_ids[i]}")
            if frame.scores is not None:
                parts.append(f"{frame.scores[i]:.2f}")
            if parts:
                text = " ".join(parts)
                ty = y1 - font_size - 2 * max(2, font_size // 5) if y1 >= font_size + 6 else y1 + 2
                dark = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150
                _label(draw, (x1 + 2, ty), text, font, w, fill=color + (220,), color=(0, 0, 0) if dark else (255, 255, 255))
    if frame.keypoints is not None:
        for person in frame.keypoints:
            xy, vis = person[:, :2], person[:, 2] > 0
            for (a, b), color in zip(_BONES, _BONE_COLORS):
                if vis[a] and vis[b]:
                    draw.line((*xy[a], *xy[b]), fill=color, width=max(2, line_w + 1))
            for x, y in xy[vis]:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    if frame.tags:
        lines = [f"{k}: {label}" + ("" if s is None else f" ({s:.2f})") for k, (label, s) in frame.tags.items()]
        _label(draw, (6, 6), "\n".join(lines), font, w)

    panels = [np.asarray(pil)]
    if frame.sem is not None:
        panels.append(_sem_panel(frame.image, frame.sem, font))
    if frame.flow is not None:
        panels.append(_flow_panel(frame.flow, font))
    out = np.full((h, w * len(panels) + PANEL_GAP * (len(panels) - 1), 3), 24, np.uint8)
    for k, panel in enumerate(panels):
        out[:, k * (w + PANEL_GAP): k * (w + PANEL_GAP) + w] = panel
    return out


def _sem_panel(image: np.ndarray, sem: np.ndarray, font: Any) -> np.ndarray:
    """Cityscapes colours over the dimmed image (ignore: dimmed image) with a legend of the 8 largest classes."""
    ignore = sem == IGNORE_INDEX
    colors = SEM_PALETTE[np.where(ignore, 0, sem)].astype(np.float32)
    base = image.astype(np.float32) * (1.0 - _ALPHA_SEM)
    panel = np.where(ignore[..., None], base, base + _ALPHA_SEM * colors)
    pil = Image.fromarray(np.clip(np.round(panel), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil, "RGBA")
    counts = np.bincount(sem[~ignore].ravel(), minlength=len(SEM_CLASSES))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:8]
    _label(draw, (6, 6), "semantic segmentation", font, pil.width)
    size = font.size if hasattr(font, "size") else 10
    y = pil.height - 6 - len(present) * (size + 4)
    for c in present:
        draw.rectangle((6, y, 6 + size, y + size), fill=tuple(int(v) for v in SEM_PALETTE[c]), outline=(255, 255, 255))
        _label(draw, (12 + size, y), SEM_CLASSES[c], font, pil.width, fill=(0, 0, 0, 120))
        y += size + 4
    return np.asarray(pil)


def _flow_rgb(u: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Flow colours: hue = direction, saturation = magnitude / ``scale`` (white = no motion)."""
    hue = (np.arctan2(v, u) / (2 * np.pi)) % 1.0
    sat = np.clip(np.hypot(u, v) / scale, 0.0, 1.0)
    return hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], axis=-1))


def _flow_panel(flow: np.ndarray, font: Any) -> np.ndarray:
    """HSV flow colours, saturated at the 99th percentile of the magnitude, with a colour wheel."""
    u, v = flow[..., 0], flow[..., 1]
    scale = max(float(np.percentile(np.hypot(u, v), 99)), 1e-6)
    panel = np.round(_flow_rgb(u, v, scale) * 255).astype(np.uint8)
    h, w = panel.shape[:2]
    r = max(8, min(h, w) // 10)  # colour wheel in the bottom-right corner
    if 2 * r + 12 <= min(h, w):
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
        inside = np.hypot(xx, yy) <= r
        wheel = np.round(_flow_rgb(xx, yy, r) * 255).astype(np.uint8)
        region = panel[h - 2 * r - 7: h - 6, w - 2 * r - 7: w - 6]
        region[inside] = wheel[inside]
    pil = Image.fromarray(panel)
    _label(ImageDraw.Draw(pil, "RGBA"), (6, 6), f"optical flow (saturated at {scale:.1f} px)", font, w)
    return np.asarray(pil)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _diff(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    d = round(a - b, 1)
    return "0.0" if d == 0 else f"{d:+.1f}"


def _rows(run: Mapping[str, float], ref: Mapping[str, float] | None) -> list[tuple[str, str, str, str, str, str]]:
    """(group, task, symbol (key), run, reference, Δ) per canonical metric."""
    rows = []
    for group, keys in GROUPS.items():
        for k in keys:
            task, symbol = METRIC_LABELS[k]
            r = None if ref is None else ref.get(k)
            rows.append((GROUP_LABELS[group], task, f"{symbol} ({k})", _fmt(run.get(k)), _fmt(r), _diff(run.get(k), r)))
    return rows


def _score_rows(run: Mapping[str, Any], ref: Mapping[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(score, run, reference, Δ) per VTDA field; the total's Δ is "—" when either side is partial."""
    partial = "note" in run or (ref is not None and "note" in ref)
    rows = []
    for key in VTDA_KEYS:
        name = "VTDA (sum)" if key == "vtda" else f"VTDA_{key[5:]} ({GROUP_LABELS[key[5:]]})"
        r = None if ref is None else ref[key]
        d = "—" if key == "vtda" and partial else _diff(run[key], r)
        rows.append((name, _fmt(run[key]), _fmt(r), d))
    return rows


def _chart_png(run: Mapping[str, float], run_scores: Mapping[str, Any], ref: Mapping[str, float] | None,
               ref_scores: Mapping[str, Any] | None, run_name: str, ref_name: str) -> bytes:
    """Grouped horizontal bars per canonical metric (left) and VTDA group scores (right)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg renders the PNG

    c_run, c_ref = "#1f77b4", "#b0b0b0"
    fig = Figure(figsize=(12.5, 7.0), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2.2, 1.3))
    bar_h = 0.38 if ref is not None else 0.6
    pos, y, labels, spans = [], -0.5, [], []
    for group, keys in GROUPS.items():
        start = y
        y += 1.0  # a heading row per group
        for k in keys:
            pos.append(y)
            labels.append(f"{METRIC_LABELS[k][0]}  {METRIC_LABELS[k][1]}")
            y += 1.0
        spans.append((group, start, y - 0.5))
        y += 0.1
    values = [v for d in (run, ref or {}) for v in d.values()]
    xmax = min(105.0, max(values + [10.0]) * 1.18)
    for i, (group, lo, hi) in enumerate(spans):
        ax.axhspan(lo, hi, color="#f3f3f3" if i % 2 == 0 else "#ffffff", zorder=0)
        ax.text(xmax * 0.005, lo + 0.3, GROUP_LABELS[group], ha="left", va="center", fontsize=9,
                style="italic", color="#555555")
    off = bar_h / 2 if ref is not None else 0.0
    for p, k in zip(pos, METRIC_KEYS):
        if k in run:
            ax.barh(p - off, run[k], height=bar_h, color=c_run, zorder=2)
            ax.text(run[k] + xmax * 0.01, p - off, f"{run[k]:.1f}", va="center", fontsize=8)
        else:
            ax.text(xmax * 0.01, p - off, "— (not in this run)", va="center", fontsize=8, color="#a00000")
        if ref is not None and k in ref:
            ax.barh(p + off, ref[k], height=bar_h, color=c_ref, zorder=2)
            ax.text(ref[k] + xmax * 0.01, p + off, f"{ref[k]:.1f}", va="center", fontsize=8, color="#555555")
    ax.set_yticks(pos, labels, fontsize=9.5)
    ax.set_ylim(y - 0.1, -0.5)
    ax.set_xlim(0, xmax)
    ax.set_xlabel("score (0–100)")
    ax.set_title("Per-task metrics", fontsize=12, loc="left")
    ax.grid(axis="x", color="#dddddd", zorder=1)
    handles = [ax.bar(0, 0, color=c_run, label=run_name)]
    if ref is not None:
        handles.append(ax.bar(0, 0, color=c_ref, label=ref_name))
    ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=9, frameon=False)

    groups = list(GROUPS)
    x = np.arange(len(groups), dtype=float)
    width = 0.38 if ref_scores is not None else 0.6
    xoff = width / 2 if ref_scores is not None else 0.0
    for sc, dx, color in ((run_scores, -xoff, c_run), (ref_scores, xoff, c_ref)):
        if sc is None:
            continue
        for xi, g in zip(x, groups):
            v = sc[f"vtda_{g}"]
            if v is None:
                ax2.text(xi + dx, 1, "—", ha="center", va="bottom", fontsize=9, color="#a00000")
                continue
            ax2.bar(xi + dx, v, width=width, color=color, zorder=2)
            ax2.text(xi + dx, v + 1, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(x, [f"VTDA_{g}\n{GROUP_LABELS[g]}" for g in groups], fontsize=9)
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("group score (0–100)")
    ax2.grid(axis="y", color="#dddddd", zorder=1)
    title = f"VTDA {_fmt(run_scores['vtda'])}"
    if ref_scores is not None:
        title += f"  vs {_fmt(ref_scores['vtda'])}"
        if "note" not in run_scores and "note" not in ref_scores:
            title += f"  ({_diff(run_scores['vtda'], ref_scores['vtda'])})"
    if "note" in run_scores:
        title += "\n(partial: groups missing)"
    ax2.set_title(title, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:0.25em 0.7em}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.pos{color:#0a7a0a}td.neg{color:#b00000}.note{background:#fff4d6;border:1px solid #e0c060;padding:0.5em 1em}
img{max-width:100%;height:auto;border:1px solid #ddd}figure{margin:1em 0}figcaption{color:#555;font-size:0.9em}
"""
_OVERLAY_LEGEND = ("Overlays: drivable area red (direct) / blue (alternative), lanes green, instance masks and boxes "
                   "coloured by track id (the same id has the same colour in every frame), pose skeletons "
                   "(right limbs orange, left cyan); side panels: semantic segmentation, optical flow.")


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ""
            if i >= numeric_from:
                cls = "num" + (" pos" if cell.startswith("+") and i == len(row) - 1 else "")
                cls += " neg" if cell.startswith("-") and i == len(row) - 1 else ""
            cells.append(f'<td class="{cls}">{html.escape(cell)}</td>' if cls else f"<td>{html.escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    reference: Mapping[str, Any] | None = None,
    reference_name: str = PAPER_VTDNET_R50_NAME,
    overlays: Sequence[OverlayFrame] = (),
    title: str = "VTD evaluation report",
    run_name: str = "this run",
) -> Path:
    """Write the report of ``metrics`` into ``out_dir`` (created if needed); return ``report.html``.

    ``metrics``: canonical metric values (a ``metrics.json``'s content; stored ``vtda_*`` fields
    are checked and recomputed). ``reference``: the row to compare against, any metrics mapping
    (e.g. :func:`load_reference` of an earlier ``metrics.json``); ``None`` is the paper's
    VTDNet-R50 row and an empty mapping leaves the comparison out. A metric absent on either
    side shows as "—". Every file is written atomically (temporary file + rename), the overlays
    and the chart before the pages that show them; ``overlay_<k>.png`` files of an earlier,
    longer report in the same directory are removed.

    Raises :class:`VTDInputError` for an unknown key, a non-number or out-of-range value or a
    stale stored score (the rules of :func:`vtda.score`), and for metrics without any task.
    """
    run_scores = score(metrics, source="metrics")
    run = validate_metrics(metrics, source="metrics")
    if not run:
        raise VTDInputError(f"metrics: no metric key; expected some of: {', '.join(METRIC_KEYS)}")
    ref_map = PAPER_VTDNET_R50 if reference is None else reference
    ref_scores = score(ref_map, source=f"reference {reference_name!r}") if ref_map else None
    ref = validate_metrics(ref_map, source=f"reference {reference_name!r}") if ref_map else None
    for i, ov in enumerate(overlays):
        if not isinstance(ov, OverlayFrame):
            raise VTDInputError(f"overlays[{i}]: expected an OverlayFrame, got {type(ov).__name__}")
    images = [_png(render_overlay(ov)) for ov in overlays]  # render all before writing anything

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overlay_names = [f"overlay_{k}.png" for k in range(len(images))]
    for name, data in zip(overlay_names, images):
        _write_atomic(out / name, data)
    _write_atomic(out / "chart.png", _chart_png(run, run_scores, ref, ref_scores, run_name, reference_name))
    stored = {k: run[k] for k in METRIC_KEYS if k in run} | run_scores
    _write_atomic(out / "metrics.json", (json.dumps(stored, indent=2) + "\n").encode())

    metric_header = ["group", "task", "metric", run_name] + ([reference_name, "Δ"] if ref is not None else [])
    score_header = ["score", run_name] + ([reference_name, "Δ"] if ref is not None else [])
    ncols = 4 if ref is None else 6
    metric_rows = [r[:ncols] for r in _rows(run, ref)]
    score_rows = [r[: ncols - 2] for r in _score_rows(run_scores, ref_scores)]
    notes = [f"{run_name}: {run_scores['note']}"] if "note" in run_scores else []
    if ref_scores is not None and "note" in ref_scores:
        notes.append(f"{reference_name}: {ref_scores['note']}")
    if run_scores["missing"]:
        notes.append(f"{run_name} lacks {', '.join(run_scores['missing'])} (shown as —); "
                     "VTDA leaves missing tasks out of their groups' means")
    if reference is None:
        notes.append(f"{reference_name}: Table 2 of the paper; its scores here are recomputed from the rounded "
                     f"task values with vtda.score (VTDA {_fmt(ref_scores['vtda'])}; the paper prints "
                     f"{PAPER_VTDNET_R50_SCORES['vtda']})")
    summary = f"VTDA of {run_name}: {_fmt(run_scores['vtda'])}" + (
        "" if ref_scores is None else f"; {reference_name}: {_fmt(ref_scores['vtda'])}")

    md = [f"# {title}", "", summary, ""]
    md += [f"> {n}" for n in notes] + ([""] if notes else [])
    md += ["## Task metrics", "", _md_table(metric_header, metric_rows), "", "## VTDA", "",
           _md_table(score_header, score_rows), "", "![chart](chart.png)", ""]
    if overlay_names:
        md += ["## Overlays", "", _OVERLAY_LEGEND, ""]
        md += [f"**{ov.name}**\n\n![{ov.name}]({name})\n" for ov, name in zip(overlays, overlay_names)]
    _write_atomic(out / "report.md", "\n".join(md).encode())

    e = html.escape
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{e(summary)}</p>",
        *[f'<p class="note">{e(n)}</p>' for n in notes],
        "<h2>Task metrics</h2>", _html_table(metric_header, metric_rows, numeric_from=3),
        "<h2>VTDA</h2>", _html_table(score_header, score_rows, numeric_from=1),
        f'<figure><img src="chart.png" alt="{e("per-task metrics and VTDA groups")}"></figure>',
    ]
    if overlay_names:
        page += ["<h2>Overlays</h2>", f"<p>{e(_OVERLAY_LEGEND)}</p>"]
        page += [f'<figure><img src="{e(name)}" alt="{e(ov.name)}"><figcaption>{e(ov.name)}</figcaption></figure>'
                 for ov, name in zip(overlays, overlay_names)]
    page.append("</body></html>\n")
    report = out / "report.html"
    _write_atomic(report, "\n".join(page).encode())

    for stale in out.iterdir():  # overlays of an earlier report with more frames
        if _OVERLAY_NAME.fullmatch(stale.name) and stale.name not in overlay_names:
            stale.unlink()
    return report
