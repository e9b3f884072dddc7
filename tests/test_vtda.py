"""VTDA against the paper's published numbers, the ``vtd score`` CLI and its input errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from data_pipeline.errors import VTDInputError
from vtd_train.cli import main
from vtd_train.evaluation import GROUPS, METRIC_KEYS, SCALING, score, score_file

# Rows transcribed from the paper (per-task metrics, then its VTDA_cls, _seg, _loc, _ass and
# VTDA columns) in the column order: Acc_Gw Acc_Gs VTDA_cls | IoU_S IoU_A IoU_L VTDA_seg |
# AP_D AP_I AP_P AP_T AP_R VTDA_loc | IoU_F AssA_T AssA_R VTDA_ass | VTDA.
PAPER_ROWS = {
    # Table 2
    "T2 ST baselines R50": "81.9 77.9 80.6 59.7 83.9 28.4 56.7 32.3 20.2 37.0 32.9 27.2 29.7 59.6 48.8 42.4 51.3 218.2",
    "T2 MT baseline R50 no CPF": "83.5 79.2 82.1 45.1 85.2 26.7 54.1 32.7 26.5 29.6 31.2 28.5 30.0 60.6 46.9 41.6 50.7 216.9",
    "T2 MT baseline R50 CPF": "83.0 79.4 81.8 60.6 85.2 25.9 56.4 32.5 26.4 35.0 33.8 30.2 31.5 60.3 49.0 43.3 51.8 221.5",
    "T2 VTDNet R50": "83.2 79.7 82.0 63.8 85.4 27.8 57.8 33.4 27.1 39.7 34.7 31.6 32.9 60.3 50.1 45.1 52.7 225.3",
    "T2 ST baselines Swin-T": "82.8 78.9 81.5 60.0 83.9 26.0 55.8 34.4 22.6 40.4 33.5 28.4 31.4 57.5 50.0 42.8 51.0 219.7",
    "T2 MT baseline Swin-T no CPF": "84.0 79.8 82.6 45.9 85.4 26.3 54.2 33.3 26.8 33.3 30.5 28.5 30.4 57.5 47.8 41.0 49.7 217.0",
    "T2 MT baseline Swin-T CPF": "83.5 80.0 82.3 61.7 85.6 25.4 56.5 35.5 27.8 34.0 35.3 31.4 33.0 58.0 50.4 44.9 51.9 223.7",
    "T2 VTDNet Swin-T": "83.8 80.0 82.5 64.5 85.9 26.3 57.5 35.4 28.5 40.2 35.8 32.2 34.1 60.3 50.5 45.1 52.8 226.9",
    # Table 7 (more base networks)
    "T7 ST baselines ConvNeXt-T": "82.7 78.6 81.3 63.2 84.6 27.6 57.3 34.4 23.7 42.5 34.9 30.7 32.7 58.8 50.5 44.6 52.1 223.4",
    "T7 VTDNet ConvNeXt-B": "83.3 80.0 82.2 65.9 86.0 27.1 58.1 36.3 29.4 45.5 37.6 34.7 36.0 60.8 51.9 48.3 54.3 230.7",
    # Table 4 (Intra-IB only) and Table 5 (no CPF component)
    "T4 Intra-IB only": "82.8 79.4 81.7 63.9 85.2 26.0 57.0 33.4 27.0 39.8 34.5 31.7 32.8 60.2 49.3 45.1 52.3 223.9",
    "T5 no C/P/F": "83.6 79.1 82.1 41.5 85.0 26.3 53.3 32.3 26.4 29.1 31.3 29.4 30.0 60.6 47.1 43.6 51.3 216.7",
}
_COLUMNS = (
    "acc_weather", "acc_scene", "vtda_cls", "iou_sem", "iou_drivable", "iou_lane", "vtda_seg",
    "ap_det", "ap_ins", "ap_pose", "ap_mot", "ap_mots", "vtda_loc", "iou_flow", "assa_mot", "assa_mots",
    "vtda_ass", "vtda",
)


def _row(name: str) -> tuple[dict[str, float], dict[str, float]]:
    values = dict(zip(_COLUMNS, map(float, PAPER_ROWS[name].split()), strict=True))
    return {k: values[k] for k in METRIC_KEYS}, {k: v for k, v in values.items() if k.startswith("vtda")}


def _write(tmp_path, obj, name="metrics.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_constants_match_table_14():
    # s_t row of Table 14: Gw Gs | S A L | D I P T R | F AssA-T AssA-R
    assert [SCALING[k] for k in METRIC_KEYS] == [1.00, 0.50, 0.20, 0.50, 0.50, 0.33, 0.25, 0.14, 0.33, 0.25, 0.50, 0.50, 0.33]
    assert [k for g in GROUPS.values() for k in g] == list(METRIC_KEYS)
    assert len(METRIC_KEYS) == 13


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_score_file_reproduces_paper_rows(tmp_path, name):
    metrics, expected = _row(name)
    result = score_file(_write(tmp_path, metrics))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=0.1), key
    assert result["missing"] == []
    assert "note" not in result


def test_headline_rows_exact_vtda(tmp_path):
    # The three VTDA numbers the paper leads with, rounded as the paper rounds.
    for name, vtda in (("T2 ST baselines R50", 218.2), ("T2 VTDNet R50", 225.3), ("T2 VTDNet Swin-T", 226.9)):
        got = score(_row(name)[0])["vtda"]
        assert abs(got - vtda) <= 0.1, (name, got)
    # Hand computation of the ST R50 classification group: (1.00·81.9 + 0.50·77.9) / 1.50.
    assert score(_row("T2 ST baselines R50")[0])["vtda_cls"] == pytest.approx((81.9 + 0.5 * 77.9) / 1.5)


@pytest.mark.parametrize("name", ["T2 ST baselines R50", "T2 VTDNet R50", "T2 VTDNet Swin-T"])
def test_cli_score_reproduces_paper(tmp_path, capsys, name):
    metrics, expected = _row(name)
    assert main(["score", _write(tmp_path, metrics)]) == 0
    out = json.loads(capsys.readouterr().out)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=0.1), key


def test_stored_scores_are_accepted_when_consistent(tmp_path):
    # A metrics file carrying the paper's own rounded scores next to the task values.
    metrics, expected = _row("T2 VTDNet R50")
    result = score_file(_write(tmp_path, {**metrics, **expected, "missing": []}))
    assert result["vtda"] == pytest.approx(225.3, abs=0.1)
    # A file written from score()'s own output round-trips.
    assert score_file(_write(tmp_path, {**metrics, **score(metrics)}, "again.json")) == score(metrics)


def test_stale_stored_score_is_an_error(tmp_path):
    metrics, expected = _row("T2 VTDNet R50")
    path = _write(tmp_path, {**metrics, **expected, "vtda": 230.0})
    with pytest.raises(VTDInputError, match=r"metrics\.json: vtda: stored value 230\.0"):
        score_file(path)
    path = _write(tmp_path, {**metrics, "missing": ["ap_pose"]}, "m2.json")
    with pytest.raises(VTDInputError, match="missing"):
        score_file(path)


def test_missing_task_is_dropped_from_its_group():
    metrics, _ = _row("T2 VTDNet R50")
    del metrics["ap_pose"]
    result = score(metrics)
    loc = (0.33 * 33.4 + 0.25 * 27.1 + 0.33 * 34.7 + 0.25 * 31.6) / (0.33 + 0.25 + 0.33 + 0.25)
    assert result["vtda_loc"] == pytest.approx(loc)
    assert result["missing"] == ["ap_pose"]
    assert result["vtda"] == pytest.approx(result["vtda_cls"] + result["vtda_seg"] + loc + result["vtda_ass"])
    assert "note" not in result


def test_absent_group_is_null_and_noted(tmp_path, capsys):
    metrics, expected = _row("T2 VTDNet R50")
    del metrics["acc_weather"], metrics["acc_scene"]
    result = score(metrics)
    assert result["vtda_cls"] is None
    assert result["vtda"] == pytest.approx(result["vtda_seg"] + result["vtda_loc"] + result["vtda_ass"])
    assert result["vtda"] == pytest.approx(expected["vtda"] - expected["vtda_cls"], abs=0.1)
    assert result["missing"] == ["acc_weather", "acc_scene"]
    assert "partial VTDA" in result["note"] and "cls" in result["note"]
    assert main(["score", _write(tmp_path, metrics)]) == 0
    assert json.loads(capsys.readouterr().out)["vtda_cls"] is None


def test_score_of_nothing():
    result = score({})
    assert result["vtda"] is None and all(result[f"vtda_{g}"] is None for g in GROUPS)
    assert result["missing"] == list(METRIC_KEYS)


def test_boundary_values_are_valid():
    result = score({"acc_weather": 0, "acc_scene": 100})
    assert result["vtda_cls"] == pytest.approx(50 / 1.5)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ({"ap_det": 30.0, "ap_dett": 1.0}, r"unknown metric key 'ap_dett'"),
        ({"ap_det": True}, r"ap_det: expected a finite number in \[0, 100\], got True"),
        ({"ap_det": "30"}, r"ap_det: expected a finite number.*'30'"),
        ({"ap_det": None}, r"ap_det: expected a finite number.*None"),
        ('{"ap_det": NaN}', r"ap_det: expected a finite number.*nan"),
        ('{"ap_det": Infinity}', r"ap_det: expected a finite number.*inf"),
        ({"ap_det": 100.5}, r"ap_det: value 100\.5 is outside \[0, 100\]"),
        ({"ap_det": -0.1}, r"ap_det: value -0\.1 is outside \[0, 100\]"),
        ([30.0, 40.0], r"expected a JSON object .* got a JSON list"),
        ('"ap_det"', r"expected a JSON object .* got a JSON str"),
        ("{not json", r"not a valid metrics JSON file"),
        ('{"ap_det": 30, "ap_det": 40}', r"duplicate key 'ap_det'"),
        ({}, r"no metric key"),
        ({"vtda": 10.0}, r"no metric key"),
    ],
)
def test_score_file_errors_name_file_key_and_value(tmp_path, content, pattern):
    path = _write(tmp_path, content)
    with pytest.raises(VTDInputError, match=pattern) as info:
        score_file(path)
    assert str(info.value).startswith(path)


def test_cli_reports_errors_as_one_line(tmp_path, capsys):
    path = _write(tmp_path, {"ap_det": 130})
    assert main(["score", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtd: error: ") and path in err and "ap_det" in err and "130" in err
    assert err.count("\n") == 1
    missing = str(tmp_path / "nope.json")
    assert main(["score", missing]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_unreadable_file_is_an_input_error(tmp_path):
    with pytest.raises(VTDInputError, match="cannot read the metrics file"):
        score_file(tmp_path)  # a directory
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(VTDInputError, match="bin.json"):
        score_file(tmp_path / "bin.json")


def test_vtd_score_does_not_load_the_metric_libraries():
    code = (
        "import sys; from vtd_train.evaluation.vtda import score_file; import vtd_train.evaluation; "
        "print(sorted(m for m in ('trackeval', 'pycocotools', 'scipy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_score_validates_dicts_too():
    with pytest.raises(VTDInputError, match="metrics: ap_det"):
        score({"ap_det": math.nan})
    with pytest.raises(VTDInputError, match="expected a JSON object"):
        score([("ap_det", 1.0)])  # type: ignore[arg-type]
