"""VTDNet: the ten-task network, its building blocks, losses and model facts.

Module map (data flow order):

- :mod:`~vtd_train.model.backbone` — base networks by name (registry), ImageNet weights, input normalisation
- :mod:`~vtd_train.model.fpn` — FPN, C2–C5 → P2–P6
- :mod:`~vtd_train.model.classification` — tagging decoder + loss
- :mod:`~vtd_train.model.segmentation` — pixel aggregation (DCNv2 + GN), semantic / drivable / lane decoders + loss
- :mod:`~vtd_train.model.localization` — RPN, RoIAlign, box / mask / keypoint decoders + losses
- :mod:`~vtd_train.model.interaction` — Intra-IB and Cross-IB
- :mod:`~vtd_train.model.flow`, :mod:`~vtd_train.model.track_head` — association decoders (flow, QDTrack)
- :mod:`~vtd_train.model.schema` — every config dataclass, the variants (torch-free)
- :mod:`~vtd_train.model.vtdnet` — assembly of a config, ``forward`` (losses) and ``predict``
- :mod:`~vtd_train.model.outputs` — the typed inference output
- :mod:`~vtd_train.model.losses` — loss weights (Table 11) and the single sum
- :mod:`~vtd_train.model.info` — parameter count and GMACs (``vtd model info``)
- :mod:`~vtd_train.model.config` — build the config dataclasses from YAML dicts, key by key

Heavy submodules are imported lazily so that ``import vtd_train.model.info`` stays the only cost
of ``vtd model info``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "BackboneConfig": "schema",
    "BACKBONES": "backbone",
    "PretrainedWeightsError": "backbone",
    "build_backbone": "backbone",
    "FPNConfig": "schema",
    "LossWeights": "losses",
    "total_loss": "losses",
    "FramePrediction": "outputs",
    "VTDNet": "vtdnet",
    "VTDNetConfig": "schema",
    "build_model": "vtdnet",
    "VARIANTS": "schema",
    "model_info": "info",
    "config_from_dict": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"vtd_train.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vtd_train.model' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from vtd_train.model.config import config_from_dict
    from vtd_train.model.backbone import BACKBONES, PretrainedWeightsError, build_backbone
    from vtd_train.model.info import model_info
    from vtd_train.model.losses import LossWeights, total_loss
    from vtd_train.model.outputs import FramePrediction
    from vtd_train.model.schema import VARIANTS, BackboneConfig, FPNConfig, VTDNetConfig
    from vtd_train.model.vtdnet import VTDNet, build_model
