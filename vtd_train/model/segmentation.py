"""Segmentation group: semantic (19), drivable area (3) and lane (3 labels) decoders (§4.1, G.1).

Pixel aggregation (Semantic-FPN style): every FPN level is progressively upsampled to the P2
scale by ``conv → GroupNorm → ReLU → ×2 bilinear`` stages (P2: one conv, no upsampling; P_k:
``k − 2`` stages) and the results are summed. Following appendix G.1 every 3×3 convolution is a
modulated deformable convolution (DCNv2, :class:`torchvision.ops.DeformConv2d` with a zero-init
offset/mask branch) followed by GroupNorm. The final classifiers are 1×1 convolutions (a 1×1
kernel has nothing to deform). The lane decoder has one classifier per label (direction 3,
style 3, category 9 channels, each including background) matching
:func:`data_pipeline.bdd100k.format.decode_lane_mask`.

In the multi-task / single-task baselines every segmentation decoder owns a
:class:`PixelAggregator`; in VTDNet one aggregator is shared by the group (it feeds the
Intra-IB) and each decoder is lightened to :class:`SegDecoder` ``num_convs`` DCN blocks plus the
classifiers.

Logits are produced at stride 4; :class:`SegLoss` upsamples them (bilinear) to the label size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from data_pipeline.bdd100k.format import IGNORE_INDEX
from vtd_train.model.backbone import ShapeSpec
from vtd_train.model.schema import PixelAggregatorConfig, SegDecoderConfig

#: Output channels of each segmentation decoder, one entry per classifier.
SEG_OUTPUTS: dict[str, tuple[int, ...]] = {"sem": (19,), "drivable": (3,), "lane": (3, 3, 9)}
#: Loss term names per classifier.
SEG_TERMS: dict[str, tuple[str, ...]] = {"sem": ("ce",), "drivable": ("ce",), "lane": ("direction", "style", "category")}


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also takes groups holding a single value.

    With one channel per group (the tiny preset's 16-channel aggregator) a 1×1 map holds one
    value per group, as P6 is for an image 32-63 px high (``vtd evaluate --height 32``, a test
    pipeline's 32-px scale) in a batch of one. Group norm of one value is defined: it is its own
    mean, so it normalises to 0 and the output is the bias. torch's ``group_norm`` refuses the
    case instead (``Expected more than 1 value per channel when training``, the check it shares
    with batch norm, made whatever the mode). Here it gives the bias, with the input and the
    affine parameters in the graph (zero gradients), so every rank's parameters get a gradient.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0 or x[0].numel() // self.num_groups > 1:  # values per group and sample
            return super().forward(x)
        zero = x * 0
        if not self.affine:
            return zero
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return zero + self.weight.view(shape) * 0 + self.bias.view(shape)


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm:
    """GroupNorm with the largest power-of-two group count ≤ ``max_groups`` dividing ``channels``."""
    groups = max(g for g in (1, 2, 4, 8, 16, 32, 64) if g <= max_groups and channels % g == 0)
    return GroupNorm(groups, channels)


class DeformConvBlock(nn.Module):
    """3×3 modulated deformable conv (DCNv2) → GroupNorm → ReLU.

    The offset/mask branch is a plain 3×3 conv initialised to zero (offsets 0, mask 0.5), so the
    block starts as a regular convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, deformable: bool = True) -> None:
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.offset = nn.Conv2d(in_channels, 27, 3, padding=1)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)
            self.conv: nn.Module = DeformConv2d(in_channels, out_channels, 3, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.norm = group_norm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.deformable:
            om = self.offset(x)
            # deform_conv2d has no reduced-precision kernel; run it in fp32 under autocast.
            with torch.autocast(x.device.type, enabled=False):
                y = self.conv(x.float(), om[:, :18].float(), om[:, 18:].sigmoid().float())
        else:
            y = self.conv(x)
        return F.relu(self.norm(y))


class PixelAggregator(nn.Module):
    """``forward(pyramid {p2..p6}) -> [B, channels, H/4, W/4]`` (sum of upsampled levels)."""

    def __init__(self, cfg: PixelAggregatorConfig, in_shapes: ShapeSpec) -> None:
        super().__init__()
        missing = [lvl for lvl in cfg.levels if lvl not in in_shapes]
        if missing:
            raise ValueError(f"pixel aggregator levels {missing} not in the pyramid {sorted(in_shapes)}")
        self.levels = cfg.levels
        self.base_stride = min(in_shapes[lvl][1] for lvl in cfg.levels)
        self.strides = {lvl: in_shapes[lvl][1] for lvl in cfg.levels}
        self.stages = nn.ModuleDict()
        for lvl in cfg.levels:
            c_in, stride = in_shapes[lvl]
            n = max(1, int(round(math.log2(stride / self.base_stride))))
            blocks = [DeformConvBlock(c_in if i == 0 else cfg.channels, cfg.channels, cfg.deformable) for i in range(n)]
            self.stages[lvl] = nn.ModuleList(blocks)
        self.out_channels = cfg.channels

    def output_shape(self) -> ShapeSpec:
        return {"agg": (self.out_channels, self.base_stride)}

    def forward(self, pyramid: dict[str, Tensor]) -> Tensor:
        # Target size of each stride on the way down, taken from the pyramid itself so that
        # odd sizes (ceil at every stride) line up exactly.
        size_at = {self.strides[lvl]: pyramid[lvl].shape[-2:] for lvl in self.levels}
        out: Tensor | None = None
        for lvl in self.levels:
            x, stride = pyramid[lvl], self.strides[lvl]
            for block in self.stages[lvl]:
                x = block(x)
                if stride > self.base_stride:
                    stride //= 2
                    size = size_at.get(stride, (x.shape[-2] * 2, x.shape[-1] * 2))
                    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        assert out is not None
        return out


@dataclass
class SegLogits:
    """One ``[B, K_i, H/4, W/4]`` logit map per classifier (sem/drivable: 1, lane: 3)."""

    logits: list[Tensor]


class SegDecoder(nn.Module):
    """``forward(x [B, C, H/4, W/4]) -> SegLogits``.

    With ``aggregator`` given (baselines), ``forward`` takes the pyramid dict instead and runs
    its own aggregation first.
    """

    def __init__(
        self,
        cfg: SegDecoderConfig,
        in_channels: int,
        outputs: tuple[int, ...],
        aggregator: PixelAggregator | None = None,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        c = in_channels
        convs = []
        for _ in range(cfg.num_convs):
            convs.append(DeformConvBlock(c, cfg.channels, cfg.deformable))
            c = cfg.channels
        self.convs = nn.Sequential(*convs)
        self.classifiers = nn.ModuleList(nn.Conv2d(c, k, 1) for k in outputs)

    def forward(self, x: Tensor | dict[str, Tensor]) -> SegLogits:
        if self.aggregator is not None:
            assert isinstance(x, dict), "a decoder with its own aggregator takes the pyramid"
            x = self.aggregator(x)
        assert isinstance(x, Tensor)
        x = self.convs(x)
        return SegLogits(logits=[cls(x) for cls in self.classifiers])


class SegLoss(nn.Module):
    """Per-pixel cross entropy, ignore label 255, for one segmentation task.

    ``forward(out, target) -> {term: loss}``; ``target`` is ``[B, H, W]`` (one classifier) or
    ``[B, K, H, W]`` (one map per classifier), uint8/int64 with 255 = ignore. Logits are
    bilinearly upsampled to the label size first. With ``foreground_weight`` w ≠ 1 (lanes:
    10), pixels of class > 0 weigh w and background pixels 1, and the loss is the weighted mean
    ``Σ w_i · ce_i / Σ w_i`` over labelled pixels (PyTorch's class-weighted cross entropy).
    """

    def __init__(self, terms: tuple[str, ...], foreground_weight: float = 1.0) -> None:
        super().__init__()
        self.terms = terms
        self.foreground_weight = float(foreground_weight)

    def forward(self, out: SegLogits, target: Tensor) -> dict[str, Tensor]:
        if target.dim() == 3:
            target = target[:, None]
        if target.shape[1] != len(out.logits):
            raise ValueError(f"{len(out.logits)} classifiers but target has {target.shape[1]} maps")
        losses = {}
        for i, (term, logits) in enumerate(zip(self.terms, out.logits)):
            t = target[:, i].long()
            logits = F.interpolate(logits.float(), size=t.shape[-2:], mode="bilinear", align_corners=False)
            weight = None
            if self.foreground_weight != 1.0:
                weight = torch.full((logits.shape[1],), self.foreground_weight, device=logits.device)
                weight[0] = 1.0
            if bool((t != IGNORE_INDEX).any()):
                losses[term] = F.cross_entropy(logits, t, weight=weight, ignore_index=IGNORE_INDEX)
            else:  # every pixel ignored: a zero that keeps the graph (and DDP) consistent
                losses[term] = logits.sum() * 0.0
        return losses


def stack_label_maps(maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Stack ``[H_i, W_i]`` / ``[K, H_i, W_i]`` label maps into ``[B, (K,) H, W]``, padding 255."""
    h, w = size
    out = []
    for m in maps:
        m = m.to(torch.int64)
        if m.shape[-2] > h or m.shape[-1] > w:
            raise ValueError(f"label map {tuple(m.shape)} larger than the padded image {size}")
        pad = (0, w - m.shape[-1], 0, h - m.shape[-2])
        out.append(F.pad(m, pad, value=IGNORE_INDEX) if any(pad) else m)
    return torch.stack(out)
