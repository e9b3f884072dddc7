"""Prediction heads: dense (semantic segmentation, depth) and FCOS3D-style 3D detection.

Dense heads (upsampled bilinearly to the input at the end): ``deconv`` as the public code's
latest Cityscapes config (ConvTranspose 2×2 stride 2 → BN-GELU → Conv3×3-BN-GELU → Conv1×1, at
half the channels) or ``conv`` as the report's text (Conv3×3-BN-ReLU → Conv1×1). The 3D detection head is FCOS3D's (Wang et al. 2021) as the public
code configures it (``det_head_params.py``): an FPN on the four task-feature scales (256
channels, five levels, the extra level a stride-2 3×3 convolution on the last output after a
ReLU), then per level a classification and a regression tower of ``stacked_convs`` 3×3
Conv-GN-ReLU, and branches: classes (Conv-GN-ReLU 256, 128 → 6), regression groups offset (2),
depth (1), size (3), rotation (3 Euler angles), 2D box (4) (each Conv-GN-ReLU 256 → group),
direction classes (2 bins × 3 angles) and centerness, with learnable per-level scales of offset,
depth, size and 2D box. Depth and size leave through ``exp``, 2D box distances through ReLU.
(The public code's deformable last tower convolution is a plain one here.)
"""

from __future__ import annotations

from collections import OrderedDict
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock


class DenseHead(nn.Module):
    def __init__(self, channels: int, out_channels: int, kind: str = "deconv", bias_init: float = 0.0):
        super().__init__()
        if kind == "deconv":
            c = channels // 2
            self.conv = nn.Sequential(nn.ConvTranspose2d(channels, c, 2, stride=2), nn.BatchNorm2d(c), nn.GELU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU())
        else:
            c = channels
            self.conv = nn.Sequential(nn.Conv2d(channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.out = nn.Conv2d(c, out_channels, 1)
        nn.init.constant_(self.out.bias, bias_init)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.out(self.conv(x)), size, mode="bilinear", align_corners=False)


class _LastLevelConv(ExtraFPNBlock):
    """One extra FPN level: ReLU then a stride-2 3×3 conv on the last output (mmdet's
    ``add_extra_convs='on_output'``, ``relu_before_extra_convs``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, results, x, names):
        return results + [self.conv(F.relu(results[-1]))], names + ["extra"]


def _conv_gn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(32, max(1, cout // 4)), cout), nn.ReLU())


def _branch(channels: tuple[int, ...], cin: int) -> nn.Sequential:
    layers, c = [], cin
    for co in channels:
        layers.append(_conv_gn(c, co))
        c = co
    return nn.Sequential(*layers)


#: Regression groups in the order of the ``reg`` output channels.
REG_GROUPS = (("offset", 2), ("depth", 1), ("size", 3), ("rot", 3), ("box2d", 4))
REG_DIM = sum(n for _, n in REG_GROUPS)


@dataclass
class Det3DLevel:
    """One FPN level's raw outputs: ``cls [B, K, h, w]`` logits, ``reg [B, 13, h, w]``
    (offset/stride, depth m, size m, Euler angles, 2D box side distances/stride), ``dir
    [B, 6, h, w]`` logits (2 bins per angle), ``ctr [B, 1, h, w]`` logits."""

    cls: Tensor
    reg: Tensor
    dir: Tensor
    ctr: Tensor


class FCOS3DHead(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], num_classes: int, det_cfg):
        super().__init__()
        c, bc = det_cfg.fpn_channels, det_cfg.branch_channels
        self.fpn = FeaturePyramidNetwork(list(in_channels), c, extra_blocks=_LastLevelConv(c))
        self.n_levels = len(in_channels) + 1
        self.cls_tower = nn.Sequential(*[_conv_gn(c, c) for _ in range(det_cfg.stacked_convs)])
        self.reg_tower = nn.Sequential(*[_conv_gn(c, c) for _ in range(det_cfg.stacked_convs)])
        self.cls_branch = _branch(det_cfg.cls_branch, c)
        self.cls_out = nn.Conv2d(det_cfg.cls_branch[-1], num_classes, 1)
        self.reg_branches = nn.ModuleList(_branch((bc,), c) for _ in REG_GROUPS)
        self.reg_outs = nn.ModuleList(nn.Conv2d(bc, n, 1) for _, n in REG_GROUPS)
        self.dir_branch = _branch((bc,), c)
        self.dir_out = nn.Conv2d(bc, 6, 1)
        self.ctr_branch = _branch((bc,), c)
        self.ctr_out = nn.Conv2d(bc, 1, 1)
        # per level: scales of offset, depth, size, 2D box
        self.scales = nn.Parameter(torch.ones(self.n_levels, 4))
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m not in self.fpn.modules():
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        prior = -math.log((1 - 0.01) / 0.01)  # FCOS: p = 0.01 at start
        nn.init.constant_(self.cls_out.bias, prior)
        nn.init.constant_(self.dir_out.bias, prior)

    def forward(self, feats: list[Tensor]) -> list[Det3DLevel]:
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        out = []
        for lvl, x in enumerate(pyramid.values()):
            cls_feat, reg_feat = self.cls_tower(x), self.reg_tower(x)
            cls = self.cls_out(self.cls_branch(cls_feat))
            raw = torch.cat([o(b(reg_feat)) for b, o in zip(self.reg_branches, self.reg_outs)], dim=1)
            s = self.scales[lvl]
            reg = torch.cat([
                raw[:, 0:2] * s[0],
                (raw[:, 2:3] * s[1]).exp(),
                (raw[:, 3:6] * s[2]).exp() + 1e-6,
                raw[:, 6:9],
                F.relu(raw[:, 9:13] * s[3]),
            ], dim=1)
            out.append(Det3DLevel(cls=cls, reg=reg, dir=self.dir_out(self.dir_branch(reg_feat)),
                                  ctr=self.ctr_out(self.ctr_branch(reg_feat))))
        return out
