"""VTD Accuracy (VTDA): the paper's aggregate score over the ten tasks (§3.2, appendix F.2).

Every task metric ``m_t`` (in ``[0, 100]``, canonical key in :data:`METRIC_KEYS`) is scaled
by its sensitivity factor ``s_t`` (Table 14) and the tasks are grouped into classification,
segmentation, localization and association. Each group score is the *s-weighted mean* of
its tasks,

    VTDA_g = Σ_{t∈g} s_t · m_t / Σ_{t∈g} s_t,

so every group stays in ``[0, 100]`` ("each score is normalized to the range [0, 100]"),
and ``VTDA = VTDA_cls + VTDA_seg + VTDA_loc + VTDA_ass``.

Why the weighted mean: eq. (1) of the paper reads as a plain mean of scaled scores
``(s_Gw·Acc_Gw + s_Gs·Acc_Gs) / 2``, but that gives 60.4 for the single-task R50 row whose
published ``VTDA_cls`` is 80.6; ``(1.00·81.9 + 0.50·77.9) / 1.50 = 80.57`` reproduces it.
The weighted mean reproduces every group column and the VTDA column of Tables 2, 4, 5, 7 and
12 within 0.09 (tests/test_vtda.py). The factors are Table 14's printed ``s_t``, i.e.
``1/⌈2σ_t⌉`` rounded to two decimals (1/3 → 0.33, 1/7 → 0.14); the exact fractions
reproduce the tables equally well (worst difference 0.08 either way).

Missing tasks (the decision, following the paper's own rule for KITTI in appendix D, "we
simply drop the missing tasks from the averages"): a task absent from the input is dropped
from its group's weighted mean. A group with no task present is ``None`` and left out of the
VTDA sum; the result then carries a ``note`` saying that the VTDA is partial and not
comparable with a full one. With no task at all, ``vtda`` is ``None`` too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from data_pipeline.errors import VTDInputError

#: Canonical metric keys, in the paper's column order. Every value is in ``[0, 100]``.
METRIC_KEYS: Final = (
    "acc_weather", "acc_scene",
    "iou_sem", "iou_drivable", "iou_lane",
    "ap_det", "ap_ins", "ap_pose", "ap_mot", "ap_mots",
    "iou_flow", "assa_mot", "assa_mots",
)

#: Task groups of VTDA (paper §3.2) → their metric keys.
GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "cls": ("acc_weather", "acc_scene"),
    "seg": ("iou_sem", "iou_drivable", "iou_lane"),
    "loc": ("ap_det", "ap_ins", "ap_pose", "ap_mot", "ap_mots"),
    "ass": ("iou_flow", "assa_mot", "assa_mots"),
}

#: Scaling factors s_t of Table 14 (Gw, Gs | S, A, L | D, I, P, T, R | F, AssA-T, AssA-R).
SCALING: Final[dict[str, float]] = {
    "acc_weather": 1.00, "acc_scene": 0.50,
    "iou_sem": 0.20, "iou_drivable": 0.50, "iou_lane": 0.50,
    "ap_det": 0.33, "ap_ins": 0.25, "ap_pose": 0.14, "ap_mot": 0.33, "ap_mots": 0.25,
    "iou_flow": 0.50, "assa_mot": 0.50, "assa_mots": 0.33,
}

#: Score keys produced by :func:`score` (besides ``missing`` and, when partial, ``note``).
VTDA_KEYS: Final = ("vtda_cls", "vtda_seg", "vtda_loc", "vtda_ass", "vtda")
#: Keys :func:`score` returns; a metrics file may carry them (they are recomputed and checked).
OUTPUT_KEYS: Final = VTDA_KEYS + ("missing", "note")

#: A stored score may differ from the recomputed one by rounding only: each task value and
#: each score rounded to one decimal moves a group by ≤ 0.05 + 0.05 and VTDA by ≤ 4·0.05 + 0.05.
_STORED_TOLERANCE: Final = {"vtda_cls": 0.1, "vtda_seg": 0.1, "vtda_loc": 0.1, "vtda_ass": 0.1, "vtda": 0.25}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_metrics(metrics: Mapping[str, Any], *, source: str = "metrics") -> dict[str, float]:
    """Check a metrics mapping and return its canonical entries as floats.

    Canonical keys need a finite number in ``[0, 100]`` (``bool`` is not a number; ``null`` is
    not allowed: leave a task out to mark it missing). Keys of :data:`OUTPUT_KEYS` are allowed
    and ignored here (see :func:`score`). Anything else is a :class:`VTDInputError` that names
    ``source``, the key and the value.
    """
    if not isinstance(metrics, Mapping):
        raise VTDInputError(f"{source}: expected a JSON object of metric values, got {type(metrics).__name__}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key in OUTPUT_KEYS:
            continue
        if key not in SCALING:
            raise VTDInputError(
                f"{source}: unknown metric key {key!r} (value {value!r}); expected keys: {', '.join(METRIC_KEYS)}"
            )
        if not _is_number(value) or not math.isfinite(value):
            raise VTDInputError(f"{source}: {key}: expected a finite number in [0, 100], got {value!r}")
        if not 0.0 <= value <= 100.0:
            raise VTDInputError(f"{source}: {key}: value {value!r} is outside [0, 100]")
        out[key] = float(value)
    return out


def score(metrics: Mapping[str, Any], *, source: str = "metrics") -> dict[str, Any]:
    """VTDA of a mapping of canonical metric values.

    Returns ``vtda_cls``, ``vtda_seg``, ``vtda_loc``, ``vtda_ass`` (float, or ``None`` for a
    group without any task), ``vtda`` (sum of the present groups; ``None`` if none is),
    ``missing`` (canonical keys absent, in :data:`METRIC_KEYS` order) and, only when a whole
    group is absent, ``note``.

    Stored results (keys of :data:`OUTPUT_KEYS`, e.g. a ``metrics.json`` written by
    ``vtd evaluate``) are recomputed, and must agree with the recomputation up to
    one-decimal rounding (``vtda_*``: 0.1, ``vtda``: 0.25; ``missing`` exactly); a stale
    score is a :class:`VTDInputError` rather than silently overwritten.
    """
    values = validate_metrics(metrics, source=source)
    result: dict[str, Any] = {}
    absent_groups = []
    for group, keys in GROUPS.items():
        present = [k for k in keys if k in values]
        if not present:
            result[f"vtda_{group}"] = None
            absent_groups.append(group)
            continue
        weight = sum(SCALING[k] for k in present)
        result[f"vtda_{group}"] = sum(SCALING[k] * values[k] for k in present) / weight
    present_scores = [result[f"vtda_{g}"] for g in GROUPS if result[f"vtda_{g}"] is not None]
    result["vtda"] = sum(present_scores) if present_scores else None
    result["missing"] = [k for k in METRIC_KEYS if k not in values]
    if absent_groups:
        result["note"] = (
            f"partial VTDA: no task of group(s) {', '.join(absent_groups)}; the sum covers "
            f"{len(present_scores)} of {len(GROUPS)} groups and is not comparable with a full VTDA"
        )
    _check_stored(metrics, result, source)
    return result


def _check_stored(metrics: Mapping[str, Any], result: Mapping[str, Any], source: str) -> None:
    for key, tol in _STORED_TOLERANCE.items():
        if key not in metrics:
            continue
        stored, fresh = metrics[key], result[key]
        if stored is None and fresh is None:
            continue
        if stored is None or fresh is None or not _is_number(stored) or not math.isfinite(stored):
            raise VTDInputError(f"{source}: {key}: stored value {stored!r} but the metrics give {fresh!r}")
        if abs(stored - fresh) > tol:
            raise VTDInputError(
                f"{source}: {key}: stored value {stored!r} disagrees with {fresh:.3f} recomputed from the "
                f"task metrics (tolerance {tol}); remove the stored scores or fix the task values"
            )
    if "missing" in metrics and metrics["missing"] != result["missing"]:
        raise VTDInputError(f"{source}: missing: stored {metrics['missing']!r} but the file lacks {result['missing']!r}")
    if "note" in metrics and not isinstance(metrics["note"], str):
        raise VTDInputError(f"{source}: note: expected a string, got {metrics['note']!r}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def score_file(path: str | Path) -> dict[str, Any]:
    """:func:`score` of a JSON file holding one object of canonical metric values.

    Errors (:class:`VTDInputError`, naming the file): not valid JSON, a duplicate key, not an
    object, an unknown key, a non-number or out-of-range value, or no metric at all. A missing
    file raises :class:`FileNotFoundError` (the CLI reports both as one line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8 text
        raise VTDInputError(f"{path}: cannot read the metrics file: {e}") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as e:  # json.JSONDecodeError is a ValueError, as is a duplicate key
        raise VTDInputError(f"{path}: not a valid metrics JSON file: {e}") from None
    if not isinstance(data, dict):
        raise VTDInputError(f"{path}: expected a JSON object of metric values, got a JSON {type(data).__name__}")
    if not any(k in SCALING for k in data):
        raise VTDInputError(f"{path}: no metric key; expected some of: {', '.join(METRIC_KEYS)}")
    return score(data, source=str(path))
