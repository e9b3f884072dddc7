"""Loss weights (paper Table 11, first row) and the one place where loss terms are summed.

The model returns a flat dict ``{"loss/<task>/<term>": weighted scalar}``. ``<task>`` names the
task whose labels produced the term:

==================  ===========================  =====================================
key                 weight field (default)       what
==================  ===========================  =====================================
loss/tag/weather    ``tag_weather`` (0.05)       weather cross entropy
loss/tag/scene      ``tag_scene`` (0.05)         scene cross entropy
loss/sem/ce         ``sem`` (1.0)                semantic segmentation cross entropy
loss/drivable/ce    ``drivable`` (1.0)           drivable area cross entropy
loss/lane/{direction,style,category}  ``lane`` (2.0)  lane cross entropies (fg ×10)
loss/rpn/{cls,box}  ``rpn`` (1.0)                RPN, on every box-labelled frame (G.1 λ_RPN)
loss/det/{cls,box}  ``det`` (2.0)                box decoder on detection frames
loss/ins/{cls,box,mask}  ``ins`` (2.0)           box + mask decoders on instance-seg frames
loss/pose/heatmap   ``pose`` (800.0)             keypoint heatmap MSE
loss/mot/{cls,box}  ``mot_det`` (1.0)            box decoder on tracking frames (Table 11's
                                                 localization column "MOT")
loss/mot/{embed,aux}  ``mot`` (1.0)              QDTrack embedding (λ_embed 0.25, λ_aux 1.0
                                                 are applied inside the QDTrack loss)
loss/mots/mask      ``mots_mask`` (2.0)          mask decoder on MOTS frames (MOTS has no
                                                 weight of its own; the instance decoder's
                                                 λ_I is used)
loss/flow/{census,smooth}  ``flow`` (1.0)        census / smoothness (λ 1.0 / 4.0 inside
                                                 the flow loss)
==================  ===========================  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from data_pipeline.errors import VTDInputError

if TYPE_CHECKING:  # annotations only: the schema imports LossWeights without torch
    from torch import Tensor

_TERM_FIELDS: dict[tuple[str, str], str] = {
    ("tag", "weather"): "tag_weather",
    ("tag", "scene"): "tag_scene",
    ("mot", "cls"): "mot_det",
    ("mot", "box"): "mot_det",
    ("mot", "embed"): "mot",
    ("mot", "aux"): "mot",
    ("mots", "mask"): "mots_mask",
}
_TASK_FIELDS = ("sem", "drivable", "lane", "rpn", "det", "ins", "pose", "flow")


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """λ per task (defaults: Table 11, first row; λ_RPN = 1.0 from appendix G.1)."""

    tag_weather: float = 0.05
    tag_scene: float = 0.05
    sem: float = 1.0
    drivable: float = 1.0
    lane: float = 2.0
    rpn: float = 1.0
    det: float = 2.0
    ins: float = 2.0
    pose: float = 800.0
    mot_det: float = 1.0
    mot: float = 1.0
    mots_mask: float = 2.0
    flow: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v < 0:
                raise VTDInputError(f"loss weight {f.name} must be a non-negative number, got {v!r}")

    def weight(self, key: str) -> float:
        """The λ of a ``loss/<task>/<term>`` key."""
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "loss":
            raise KeyError(f"loss key {key!r} is not of the form loss/<task>/<term>")
        _, task, term = parts
        name = _TERM_FIELDS.get((task, term), task if task in _TASK_FIELDS else None)
        if name is None:
            raise KeyError(f"no loss weight for {key!r}")
        return float(getattr(self, name))

    def apply(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{key: λ_key · value}`` for every term."""
        return {k: v * self.weight(k) for k, v in losses.items()}


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The training objective ``Σ_t λ_t L_t``: the sum of the (already weighted) terms."""
    if not losses:
        raise ValueError("no loss terms: the batch carries no label of any task the model has")
    return sum(losses.values())  # type: ignore[return-value]
