"""Evaluation report: the paper reference row, write_report's files and render_overlay's colours."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_pipeline.errors import VTDInputError
from vtd_train.evaluation import METRIC_KEYS, VTDA_KEYS, score, score_file
from vtd_train.evaluation.reference import PAPER_VTDNET_R50, PAPER_VTDNET_R50_SCORES, load_reference
from vtd_train.evaluation.report import (
    PANEL_GAP,
    OverlayFrame,
    render_overlay,
    track_colors,
    write_report,
)

H, W = 96, 128  # big enough that box labels (11 px font) sit beside the masks
GREY = 128


def _frame(name: str, track_ids: list[int], mask_boxes: list[tuple[int, int, int, int]], **extra) -> OverlayFrame:
    """Grey image; drivable: rows 72.. direct on the left half, alternative on the right; lane: column 80."""
    drivable = np.full((H, W), 2, np.int64)
    drivable[72:, :64] = 0
    drivable[72:, 64:] = 1
    lane = np.zeros((3, H, W), np.uint8)
    lane[:, 72:, 80] = np.array([1, 1, 7])[:, None]
    masks = np.zeros((len(mask_boxes), H, W), bool)
    for i, (x1, y1, x2, y2) in enumerate(mask_boxes):
        masks[i, y1:y2, x1:x2] = True
    return OverlayFrame(
        name=name, image=np.full((H, W, 3), GREY, np.uint8), drivable=drivable, lane=lane,
        boxes=np.array(mask_boxes, float).reshape(-1, 4), classes=np.full(len(mask_boxes), 2),
        scores=np.full(len(mask_boxes), 0.9), track_ids=np.array(track_ids), masks=masks, **extra,
    )


def _metrics_without_pose() -> dict[str, float]:
    return {k: round(v - 1.5, 1) for k, v in PAPER_VTDNET_R50.items() if k != "ap_pose"}


# ---------------------------------------------------------------------------------------------
# Reference row
# ---------------------------------------------------------------------------------------------


def test_paper_reference_row_reproduces_table_2():
    assert tuple(PAPER_VTDNET_R50) == METRIC_KEYS
    result = score(PAPER_VTDNET_R50)
    assert result["vtda"] == pytest.approx(225.3, abs=0.1)
    for key, published in PAPER_VTDNET_R50_SCORES.items():
        assert result[key] == pytest.approx(published, abs=0.1), key
    assert result["missing"] == []


def test_load_reference_validates_with_the_evaluation_rules(tmp_path):
    good = tmp_path / "ref.json"
    good.write_text(json.dumps(dict(PAPER_VTDNET_R50) | {"vtda": 225.3}))
    assert load_reference(good) == dict(PAPER_VTDNET_R50)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"ap_det": 30.0, "ap_dett": 1.0}))
    with pytest.raises(VTDInputError, match="ap_dett"):
        load_reference(unknown)
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(dict(PAPER_VTDNET_R50) | {"vtda": 200.0}))
    with pytest.raises(VTDInputError, match="vtda"):
        load_reference(stale)


# ---------------------------------------------------------------------------------------------
# write_report
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    frames = [_frame("video/frame-0", [3, 7], [(4, 30, 30, 60), (60, 30, 90, 60)]),
              _frame("video/frame-1 <b>&", [7], [(60, 30, 90, 60)])]
    metrics = _metrics_without_pose()
    path = write_report(out, metrics, overlays=frames, title="Run <42> & co")
    return out, path, metrics


def test_write_report_creates_all_files(report):
    out, path, _ = report
    assert path == out / "report.html"
    names = {p.name for p in out.iterdir()}
    assert names == {"metrics.json", "chart.png", "overlay_0.png", "overlay_1.png", "report.md", "report.html"}
    for png in ("chart.png", "overlay_0.png", "overlay_1.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_json_round_trips_with_vtda_fields(report):
    out, _, metrics = report
    stored = json.loads((out / "metrics.json").read_text())
    expected = score(metrics)
    for key in VTDA_KEYS:
        assert stored[key] == pytest.approx(expected[key]), key
    assert stored["missing"] == ["ap_pose"]
    assert load_reference(out / "metrics.json") == metrics
    assert score_file(out / "metrics.json")["vtda"] == pytest.approx(expected["vtda"])


def test_html_has_every_metric_and_existing_images(report):
    out, path, _ = report
    text = path.read_text()
    for key in METRIC_KEYS:
        assert key in text, key
    assert "Run &lt;42&gt; &amp; co" in text and "<42>" not in text  # escaped title
    assert "frame-1 &lt;b&gt;&amp;" in text
    images = re.findall(r'<img src="([^"]+)"', text)
    assert sorted(images) == ["chart.png", "overlay_0.png", "overlay_1.png"]
    assert all((out / name).is_file() for name in images)
    pose_row = next(line for line in text.splitlines() if "ap_pose" in line and "<tr>" in line)
    assert "<td class=\"num\">—</td>" in pose_row and "39.7" in pose_row  # missing here, present in the paper
    md = (out / "report.md").read_text()
    assert "](chart.png)" in md and all(k in md for k in METRIC_KEYS)


def test_write_report_without_reference_removes_stale_overlays(report, tmp_path):
    out, _, metrics = report
    again = tmp_path / "again"
    again.mkdir()
    (again / "overlay_5.png").write_bytes(b"old")
    (again / "notes.txt").write_text("mine")
    path = write_report(again, metrics, reference={})
    assert not (again / "overlay_5.png").exists()
    assert (again / "notes.txt").exists()  # not ours: kept
    text = path.read_text()
    assert "VTDNet-R50" not in text and "Δ" not in text
    assert not list(again.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("bad", [{"ap_det": 30.0, "ap_dett": 20.0}, {"ap_det": 130.0}, {"ap_det": float("nan")}])
def test_write_report_rejects_bad_metrics_before_writing(tmp_path, bad):
    out = tmp_path / "out"
    with pytest.raises(VTDInputError, match="ap_det"):
        write_report(out, bad)
    assert not out.exists()


def test_write_report_rejects_bad_reference(tmp_path):
    with pytest.raises(VTDInputError, match="reference.*iou_sem"):
        write_report(tmp_path / "out", _metrics_without_pose(), reference={"iou_sem": -1.0}, reference_name="mine")


# ---------------------------------------------------------------------------------------------
# render_overlay
# ---------------------------------------------------------------------------------------------


def _dominant(pixel: np.ndarray) -> int:
    """Channel index (0 R, 1 G, 2 B) that exceeds both others."""
    c = int(np.argmax(pixel))
    assert (pixel[c] > np.delete(pixel, c) + 40).all(), pixel
    return c


def test_render_overlay_drivable_lane_and_instance_colours():
    a = _frame("a", [3, 7], [(4, 30, 30, 60), (60, 30, 90, 60)])
    b = _frame("b", [7, 12], [(60, 30, 90, 60), (100, 30, 124, 60)])  # id 7 at the same place, another index
    out_a, out_b = render_overlay(a), render_overlay(b)
    assert out_a.shape == (H, W, 3) and out_a.dtype == np.uint8
    assert _dominant(out_a[88, 10]) == 0  # direct: red
    assert _dominant(out_a[88, 110]) == 2  # alternative: blue
    assert _dominant(out_a[88, 80]) == 1  # lane: green
    assert (out_a[66, 50] == GREY).all()  # background untouched
    inside_7 = (50, 75)
    assert (out_a[inside_7] != GREY).any()
    assert (out_a[inside_7] == out_b[inside_7]).all()  # the same track id, the same colour
    assert (out_a[50, 17] != out_a[inside_7]).any()  # id 3 differs from id 7
    np.testing.assert_array_equal(track_colors([7, 3, 7]), track_colors([7, 3, 7])[[0, 1, 0]])


def test_render_overlay_tiles_side_panels():
    sem = np.zeros((H, W), np.int64)
    sem[:20] = 10
    sem[0] = 255
    flow = np.zeros((H, W, 2))
    flow[..., 0] = 3.0
    both = render_overlay(_frame("p", [1], [(4, 30, 30, 60)], sem=sem, flow=flow))
    assert both.shape == (H, 3 * W + 2 * PANEL_GAP, 3)
    only_flow = render_overlay(_frame("q", [1], [(4, 30, 30, 60)], flow=flow))
    assert only_flow.shape == (H, 2 * W + PANEL_GAP, 3)
    sem_panel = both[:, W + PANEL_GAP: 2 * W + PANEL_GAP]
    np.testing.assert_array_equal(sem_panel[90, 120], np.round(0.3 * GREY + 0.7 * np.array([128, 64, 128])))  # road


def test_overlay_frame_validates_shapes_and_values():
    with pytest.raises(VTDInputError, match="masks"):
        OverlayFrame(name="x", image=np.zeros((H, W, 3), np.uint8), boxes=np.zeros((1, 4)),
                     masks=np.zeros((2, H, W), bool))
    with pytest.raises(VTDInputError, match="drivable"):
        OverlayFrame(name="x", image=np.zeros((H, W, 3), np.uint8), drivable=np.full((H, W), 5))
    with pytest.raises(VTDInputError, match="need boxes"):
        OverlayFrame(name="x", image=np.zeros((H, W, 3), np.uint8), track_ids=np.array([1]))
    with pytest.raises(VTDInputError, match="image"):
        OverlayFrame(name="x", image=np.zeros((H, W, 3), np.float32))
