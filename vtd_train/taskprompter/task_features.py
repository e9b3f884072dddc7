"""Dense spatial-channel task-prompt decoding: stage tokens + prompt affinities → task features.

At each of the four scales and for each task ``t``:

* spatial: the task's prompt-to-patch affinity of each head weights that head's channel group of
  the tokens (``x + a_h · x_h``), then a 1×1 convolution to ``level_embed_dim``;
* channel: the task's channel affinity weights the channels (``x + c · x``), then a 1×1
  convolution to ``level_embed_dim``;
* both are fused: 1×1 (2·level → final), 3×3, BN, GELU, 3×3 (the public code's ``fea_fuse``).

Dense tasks (sem, depth) are decoded at twice each scale's resolution (the reweighted maps are
upsampled before the 1×1 convolutions), their four scales summed at the finest and passed through
a 3×3 convolution; 3D detection keeps the four scales for its FPN. Without prompts (the
baseline) a 1×1 convolution per task and scale maps the stage features to ``final_embed_dim``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ScaleDecoder(nn.Module):
    def __init__(self, channels: int, level: int, final: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.spa = nn.Conv2d(channels, level, 1)
        self.chan = nn.Conv2d(channels, level, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * level, final, 1), nn.Conv2d(final, final, 3, padding=1),
            nn.BatchNorm2d(final), nn.GELU(), nn.Conv2d(final, final, 3, padding=1))

    def forward(self, x: Tensor, spa: Tensor, chan: Tensor) -> Tensor:
        """``x [B, C, H, W]``, ``spa [B, heads·prompt_len, H, W]``, ``chan [B, C]`` →
        ``[B, final, H, W]`` (``2H, 2W`` with ``upsample``)."""
        b, c, h, w = x.shape
        groups = spa.shape[1]
        spa_x = (x.view(b, groups, c // groups, h, w) * spa.unsqueeze(2)).view(b, c, h, w) + x
        chan_x = x * chan[:, :, None, None] + x
        if self.upsample:
            spa_x, chan_x = (F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False) for m in (spa_x, chan_x))
        return self.fuse(torch.cat([self.spa(spa_x), self.chan(chan_x)], dim=1))


class TaskFeatures(nn.Module):
    """``forward(scales) → {task: [B, final_embed_dim, H/4, W/4]`` (sem, depth; of the resized
    input) or ``[4 maps of final_embed_dim]`` (det3d)``}`` from :class:`~.swin.PromptSwin`'s output."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tasks = cfg.tasks
        final = cfg.final_embed_dim
        if cfg.prompting:
            self.decoders = nn.ModuleList(
                nn.ModuleDict({t: _ScaleDecoder(c, cfg.level_embed_dim, final, upsample=t != "det3d") for t in cfg.tasks})
                for c in cfg.stage_channels)
        else:
            self.projections = nn.ModuleList(nn.ModuleDict({t: nn.Conv2d(c, final, 1) for t in cfg.tasks})
                                             for c in cfg.stage_channels)
        self.multi_scale_fuse = nn.ModuleDict({t: nn.Conv2d(final, final, 3, padding=1) for t in cfg.tasks if t != "det3d"})

    def forward(self, scales: list[tuple[Tensor, tuple[Tensor, Tensor] | None]]) -> dict[str, Tensor | list[Tensor]]:
        per_task: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        pl = self.cfg.prompt_len
        for i, (x, affinity) in enumerate(scales):
            for k, t in enumerate(self.tasks):
                if not self.cfg.prompting:
                    proj = self.projections[i][t](x)
                    per_task[t].append(proj if t == "det3d" else F.interpolate(proj, scale_factor=2, mode="bilinear", align_corners=False))
                    continue
                spa, chan = affinity
                b, heads, _, h, w = spa.shape
                task_spa = spa[:, :, k * pl:(k + 1) * pl].reshape(b, heads * pl, h, w)
                task_chan = chan[:, k * pl:(k + 1) * pl].mean(dim=1)
                per_task[t].append(self.decoders[i][t](x, task_spa, task_chan))
        out: dict[str, Tensor | list[Tensor]] = {}
        for t, maps in per_task.items():
            if t == "det3d":
                out[t] = maps
            else:
                size = maps[0].shape[-2:]
                out[t] = self.multi_scale_fuse[t](sum(
                    m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=False) for m in maps))
        return out
