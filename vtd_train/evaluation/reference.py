"""Reference rows a run is compared against in the evaluation report.

The default reference is the paper's VTDNet with a ResNet-50 base network trained with CPF
(Table 2, row "VTDNet / ResNet-50 / ✓"), transcribed with the 13 canonical keys of
:data:`vtda.METRIC_KEYS`. Its published group scores and VTDA are kept beside it so a test can
check that :func:`vtda.score` of the row reproduces them (225.3).

Any other reference is a metrics file in the ``vtd score`` format (for example the
``metrics.json`` of an earlier report); :func:`load_reference` reads it with the evaluation
package's own validation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from .vtda import METRIC_KEYS, score_file, validate_metrics

#: Display name of :data:`PAPER_VTDNET_R50` in reports.
PAPER_VTDNET_R50_NAME: Final = "VTDNet-R50 (paper)"

#: Table 2, VTDNet ResNet-50 with CPF: per-task metrics on the VTD validation set.
PAPER_VTDNET_R50: Final[Mapping[str, float]] = MappingProxyType({
    "acc_weather": 83.2, "acc_scene": 79.7,
    "iou_sem": 63.8, "iou_drivable": 85.4, "iou_lane": 27.8,
    "ap_det": 33.4, "ap_ins": 27.1, "ap_pose": 39.7, "ap_mot": 34.7, "ap_mots": 31.6,
    "iou_flow": 60.3, "assa_mot": 50.1, "assa_mots": 45.1,
})

#: The same row's published VTDA columns (Table 2), for checking the transcription.
PAPER_VTDNET_R50_SCORES: Final[Mapping[str, float]] = MappingProxyType({
    "vtda_cls": 82.0, "vtda_seg": 57.8, "vtda_loc": 32.9, "vtda_ass": 52.7, "vtda": 225.3,
})


def load_reference(path: str | Path) -> dict[str, float]:
    """Canonical metric values of a metrics JSON file, validated like ``vtd score``'s input.

    Returns ``{key: value}`` for the canonical keys present, in :data:`METRIC_KEYS` order;
    stored ``vtda_*``/``missing``/``note`` entries are checked against the task values (by
    :func:`vtda.score_file`) and then dropped, since the report recomputes them.

    Raises :class:`VTDInputError` naming the file for invalid JSON, a duplicate or unknown key,
    an out-of-range value, a stale stored score or no metric at all; a missing file raises
    :class:`FileNotFoundError`.
    """
    path = Path(path)
    score_file(path)  # all file-level and value checks, with the file in every message
    values = validate_metrics(json.loads(path.read_text(encoding="utf-8")), source=str(path))
    return {k: values[k] for k in METRIC_KEYS if k in values}
