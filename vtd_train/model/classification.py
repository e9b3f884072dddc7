"""Classification group: image tagging (weather, scene) from image features C5 (paper §4.1).

Global average pooling on C5, then one dense layer per classification task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.bdd100k.format import SCENES, WEATHERS


@dataclass(frozen=True, kw_only=True)
class TaggingConfig:
    num_weathers: int = len(WEATHERS)
    num_scenes: int = len(SCENES)


@dataclass
class TagLogits:
    """``weather [B, 7]`` and ``scene [B, 7]`` logits."""

    weather: Tensor
    scene: Tensor


class TaggingDecoder(nn.Module):
    """``forward(c5 [B, C, h, w]) -> TagLogits``."""

    def __init__(self, cfg: TaggingConfig, in_channels: int) -> None:
        super().__init__()
        self.weather = nn.Linear(in_channels, cfg.num_weathers)
        self.scene = nn.Linear(in_channels, cfg.num_scenes)
        for layer in (self.weather, self.scene):  # near-uniform start (classifier heads: N(0, 0.01))
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, c5: Tensor) -> TagLogits:
        x = c5.mean(dim=(2, 3))
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
