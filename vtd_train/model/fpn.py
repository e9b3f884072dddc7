"""Feature Pyramid Network: ``{c2..c5}`` → pixel features ``{p2..p6}`` (paper §4.1).

torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` (lateral 1×1 + output 3×3
convolutions, top-down nearest upsampling) with P6 = max-pool(P5, stride 2), as in Mask R-CNN.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from vtd_train.model.backbone import FEATURE_NAMES, ShapeSpec
from vtd_train.model.schema import FPNConfig

PYRAMID_NAMES = ("p2", "p3", "p4", "p5", "p6")


class FPN(nn.Module):
    """``forward({c2..c5}) -> {p2..p6}``, each ``[B, out_channels, H/s, W/s]``."""

    def __init__(self, cfg: FPNConfig, in_shapes: ShapeSpec) -> None:
        super().__init__()
        missing = [n for n in FEATURE_NAMES if n not in in_shapes]
        if missing:
            raise ValueError(f"FPN needs backbone features {FEATURE_NAMES}, missing {missing}")
        self.in_names = FEATURE_NAMES
        self.strides = tuple(s for _, s in self.shape_of(cfg, in_shapes).values())
        self.fpn = FeaturePyramidNetwork(
            [in_shapes[n][0] for n in FEATURE_NAMES], cfg.out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = cfg.out_channels

    def output_shape(self) -> ShapeSpec:
        return {n: (self.out_channels, s) for n, s in zip(PYRAMID_NAMES, self.strides)}

    @staticmethod
    def shape_of(cfg: FPNConfig, in_shapes: ShapeSpec) -> ShapeSpec:
        """The output shape an FPN built from ``cfg`` on ``in_shapes`` would have."""
        strides = [in_shapes[n][1] for n in FEATURE_NAMES] + [2 * in_shapes["c5"][1]]
        return {n: (cfg.out_channels, s) for n, s in zip(PYRAMID_NAMES, strides)}

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self.fpn(OrderedDict((n, feats[n]) for n in self.in_names))
        return dict(zip(PYRAMID_NAMES, out.values()))
