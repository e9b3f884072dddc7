"""Classification group: image tagging (weather, scene) from image features C5 (paper §4.1).

Global average pooling on C5, then one dense layer per classification task (the paper's
decoder); with ``TaggingConfig.pooled_norm`` a batch norm standardises the pooled vector first.

Why ``pooled_norm`` exists (the tiny preset turns it on; the paper's models keep it off): a
ResNet trained *from scratch* normalises with GroupNorm (``BackboneConfig.norm: auto``), which
sets every channel group's mean over the image to the same learned offset, so the pooled C5 of
every image is nearly the same vector. Measured on the demo's curriculum checkpoint (24 det
train images): per-channel standard deviation across images 1.5% of the mean magnitude. A dense
layer on such inputs is badly conditioned: the common part dominates every gradient, and
trained alone on those features (batch 2, AdamW lr 1e-3, 144 or 600 steps) it never leaves the
majority class even on its training images (scene 37.5%), while the same layer behind a batch
norm fits them (100%) and is above the majority class on validation (50% vs 37.5%); a linear
probe on the standardised features reaches 62.5%. An ImageNet-pretrained backbone (frozen BN)
has discriminative pooled features and needs none of this.

With ``pooled_norm`` the pooled vector is also *detached*: the tagging loss trains the decoder,
not the shared backbone. Backpropagated through a batch norm over a batch of two, the tagging
gradient is divided by the batch's spread (about 1% of the feature), and in the demo's joint
stage that amplified gradient disturbed every other task (validation VTDA 66.0 against 91.1
for the same stage without the norm: lane IoU 1.3 vs 5.6, MOT AP 4.7 vs 6.9, MOT AssA 6.6 vs
13.4, and the tags themselves below the majority class). The paper's weight on the tagging loss
(0.05) leaves it a small say in the shared features anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtd_train.model.schema import TaggingConfig


@dataclass
class TagLogits:
    """``weather [B, 7]`` and ``scene [B, 7]`` logits."""

    weather: Tensor
    scene: Tensor


class TaggingDecoder(nn.Module):
    """``forward(c5 [B, C, h, w]) -> TagLogits``.

    With ``pooled_norm`` the pooled ``[B, C]`` vector is detached and goes through a
    ``BatchNorm1d``: batch statistics in training (running statistics when a training batch
    holds a single image, whose variance is undefined, or when the decoder is frozen: a CPF
    fine-tuning stage of another decoder leaves this one bit-identical), running statistics in
    evaluation.
    """

    def __init__(self, cfg: TaggingConfig, in_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels) if cfg.pooled_norm else None
        self.weather = nn.Linear(in_channels, cfg.num_weathers)
        self.scene = nn.Linear(in_channels, cfg.num_scenes)
        for layer in (self.weather, self.scene):  # near-uniform start (classifier heads: N(0, 0.01))
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, c5: Tensor) -> TagLogits:
        x = c5.mean(dim=(2, 3))
        if self.norm is not None:
            n = self.norm
            x = F.batch_norm(x.detach().float(), n.running_mean, n.running_var, n.weight, n.bias,
                             training=self.training and x.shape[0] > 1 and n.weight.requires_grad,
                             momentum=n.momentum, eps=n.eps)
        return TagLogits(weather=self.weather(x), scene=self.scene(x))


class TaggingLoss(nn.Module):
    """Cross entropy per tag over the samples labelled with it (label −1 = unlabelled).

    ``forward(logits, weather [B] int64, scene [B] int64) -> {"weather", "scene"}``; a tag with
    no labelled sample in the batch is left out of the dict.
    """

    def forward(self, logits: TagLogits, weather: Tensor, scene: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, pred, target in (("weather", logits.weather, weather), ("scene", logits.scene, scene)):
            keep = target >= 0
            if bool(keep.any()):
                out[name] = F.cross_entropy(pred[keep].float(), target[keep])
        return out


def tag_targets(targets: list, device: torch.device) -> tuple[Tensor, Tensor]:
    """``FrameTargets`` list → ``weather [B]``, ``scene [B]`` int64 (−1 where unlabelled)."""
    weather = torch.tensor([t.weather for t in targets], dtype=torch.int64, device=device)
    scene = torch.tensor([t.scene for t in targets], dtype=torch.int64, device=device)
    return weather, scene
