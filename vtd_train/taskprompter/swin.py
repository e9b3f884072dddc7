"""Swin Transformer with spatial-channel task prompts (TaskPrompter report §2.3.1).

Each stage carries ``T = tasks × prompt_len`` task prompts of the stage's width next to the
patch tokens:

* **spatial prompts in window attention.** The prompts are copied into every (shifted) window,
  attend with the window's patches (the relative position bias and the shift mask act on
  patch-patch pairs only) and are averaged over the windows afterwards; the prompt-to-patch
  attention logits of all windows, stitched back into the image grid, are the spatial
  task-prompt affinity ``[B, heads, T, H, W]``;
* **channel prompts.** The prompts, projected to ``chan_embed_dim``, attend over the patch
  channels: every channel's whole map is one key/value token (a linear layer over the stage's
  ``H·W`` positions, so the model has a fixed input size), giving the channel affinity
  ``[B, T, C]`` and an update of the prompts;
* **patch merging** doubles the prompts' channels (a linear layer), downsamples the spatial
  affinity (a stride-2 convolution) and maps the channel affinity to the doubled channels.

Plain Swin pieces come from timm (``Mlp``, ``DropPath``, ``trunc_normal_``). Shapes:
``x [B, H·W, C]``, prompts ``[B, T, C]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn


def window_partition(x: Tensor, w: int) -> Tensor:
    """``[B, H, W, C]`` → ``[B·nW, w·w, C]`` (windows in row-major order)."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_merge(windows: Tensor, w: int, h: int, wd: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B·nW, w·w, C]`` → ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


class PromptWindowAttention(nn.Module):
    """Window multi-head self-attention over ``[prompts; window patches]``."""

    def __init__(self, dim: int, window: int, heads: int, n_prompts: int):
        super().__init__()
        self.heads, self.window, self.n_prompts = heads, window, n_prompts
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x: Tensor, prompts: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B·nW, N, C]``, ``prompts [B, T, C]``, ``mask [nW, N, N]`` (0 / −100) or None →
        (``x [B·nW, N, C]``, prompt-to-patch logits ``[B·nW, heads, T, N]``, prompts ``[B, T, C]``)."""
        bw, n, c = x.shape
        b, t = prompts.shape[0], self.n_prompts
        nw = bw // b
        tokens = torch.cat([prompts.repeat_interleave(nw, dim=0), x], dim=1) if t else x
        qkv = self.qkv(tokens).view(bw, t + n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1)  # [B·nW, heads, T+N, T+N]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        patch_bias = bias.unsqueeze(0)
        if mask is not None:
            patch_bias = patch_bias + mask.repeat(b, 1, 1).unsqueeze(1)  # [B·nW, 1, N, N]
        full_bias = F.pad(patch_bias, (t, 0, t, 0))  # prompts get no position bias and no mask
        attn = (logits + full_bias).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(bw, t + n, c))
        prompt_out = out[:, :t].reshape(b, nw, t, c).mean(dim=1)  # averaged over the windows
        return out[:, t:], logits[:, :, :t, t:], prompt_out


class PromptSwinBlock(nn.Module):
    """One (shifted-)window block with spatial and channel task prompts."""

    def __init__(self, dim: int, resolution: tuple[int, int], heads: int, window: int, shift: int, n_prompts: int,
                 chan_dim: int, mlp_ratio: float, drop_path: float, last: bool):
        super().__init__()
        h, w = resolution
        if min(h, w) <= window:  # a window covers the whole map: no shift (as Swin does)
            window, shift = min(h, w), 0
        self.resolution, self.window, self.shift, self.heads, self.n_prompts = resolution, window, shift, heads, n_prompts
        self.last = last
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PromptWindowAttention(dim, window, heads, n_prompts)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        if n_prompts:
            self.token_trans = nn.Linear(dim, chan_dim)
            self.chan_q = nn.Linear(chan_dim, chan_dim)
            self.chan_kv = nn.Linear(h * w, chan_dim * 2)  # a channel's whole map is one token
            self.chan_scale = chan_dim**-0.5
            if not last:
                self.chan_proj = nn.Linear(chan_dim, chan_dim)
                self.token_trans1 = nn.Linear(chan_dim, dim)
        self.register_buffer("attn_mask", self._shift_mask(h, w) if shift else None, persistent=False)

    def _shift_mask(self, h: int, w: int) -> Tensor:
        img = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        for i, (hs, ws) in enumerate((a, b) for a in cuts for b in cuts):
            img[:, hs, ws, :] = i
        win = window_partition(img, self.window).squeeze(-1)  # [nW, N]
        diff = win.unsqueeze(1) - win.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)

    def forward(self, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """``x [B, H·W, C]``, ``prompts [B, T, C]`` → (x, prompts, (spatial ``[B, heads, T, H, W]``,
        channel ``[B, T, C]`` affinities) or None without prompts)."""
        h, w = self.resolution
        b, _, c = x.shape
        t, ws = self.n_prompts, self.window
        shortcut = x
        xs = self.norm1(x).view(b, h, w, c)
        if self.shift:
            xs = torch.roll(xs, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out, logits, spa_prompts = self.attn(window_partition(xs, ws), self.norm1(prompts), self.attn_mask)
        xs = window_merge(out, ws, h, w)
        spa = None
        if t:  # stitch the windows' prompt-to-patch logits into the image grid
            spa = window_merge(logits.permute(0, 3, 1, 2).reshape(-1, ws * ws, self.heads * t), ws, h, w)
            spa = spa.permute(0, 3, 1, 2).reshape(b, self.heads, t, h, w)
        if self.shift:
            xs = torch.roll(xs, shifts=(self.shift, self.shift), dims=(1, 2))
            spa = torch.roll(spa, shifts=(self.shift, self.shift), dims=(3, 4)) if spa is not None else None
        x = shortcut + self.drop_path(xs.reshape(b, h * w, c))
        affinity = None
        if t:
            q = self.chan_q(self.token_trans(prompts))  # [B, T, cd]
            k, v = self.chan_kv(x.transpose(1, 2)).chunk(2, dim=-1)  # [B, C, cd] each
            chan_logits = (q @ k.transpose(1, 2)) * self.chan_scale  # [B, T, C]
            chan_out = chan_logits.softmax(dim=-1) @ v  # [B, T, cd]
            affinity = (spa, chan_logits)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if t and not self.last:
            update = spa_prompts + self.token_trans1(self.chan_proj(chan_out))
            prompts = prompts + self.drop_path(update)
            prompts = prompts + self.drop_path(self.mlp(self.norm2(prompts)))
        return x, prompts, affinity


class PromptPatchMerging(nn.Module):
    """2×2 patch merging; prompts ``C → 2C``; affinities downsampled to the merged grid."""

    def __init__(self, dim: int, resolution: tuple[int, int], heads: int, n_prompts: int):
        super().__init__()
        self.resolution, self.n_prompts = resolution, n_prompts
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        if n_prompts:
            self.task_prompts_up = nn.Linear(dim, 2 * dim, bias=False)
            self.spa_attn_ds = nn.Conv2d(heads * n_prompts, heads * n_prompts, 3, stride=2, padding=1)
            self.process_chan_attn = nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, prompts: Tensor, affinity):
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.reduction(self.norm(x.view(b, -1, 4 * c)))
        if not self.n_prompts:
            return x, prompts.new_zeros(b, 0, 2 * c), None
        spa, chan = affinity
        heads, t = spa.shape[1], spa.shape[2]
        spa = self.spa_attn_ds(spa.reshape(b, heads * t, h, w)).view(b, heads, t, h // 2, w // 2)
        return x, self.task_prompts_up(prompts), (spa, self.process_chan_attn(chan))


class PromptSwin(nn.Module):
    """The backbone: patch embedding, four prompt stages. ``forward`` returns, per task-feature
    scale (after stages 0-2's merging and after the last stage), the tokens as a map
    ``[B, C, H, W]`` and the affinities at that scale (None without prompts)."""

    def __init__(self, cfg):
        super().__init__()
        s = cfg.swin
        self.cfg = cfg
        n_tasks = len(cfg.tasks)
        self.n_prompts = n_tasks * cfg.prompt_len if cfg.prompting else 0
        self.patch_embed = nn.Conv2d(3, s.embed_dim, kernel_size=s.patch_size, stride=s.patch_size)
        self.patch_norm = nn.LayerNorm(s.embed_dim)
        self.task_prompts = nn.Parameter(torch.ones(self.n_prompts, s.embed_dim)) if self.n_prompts else None
        if self.task_prompts is not None:
            trunc_normal_(self.task_prompts, mean=1.0, std=1.0)
        n_blocks = sum(s.depths)  # stochastic depth rises linearly over the blocks
        dpr = [s.drop_path * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        n_stages = len(s.depths)
        for i, depth in enumerate(s.depths):
            dim, res = s.channels(i), cfg.stage_size(i)
            blocks = nn.ModuleList([
                PromptSwinBlock(dim, res, s.num_heads[i], s.window_size, 0 if j % 2 == 0 else s.window_size // 2,
                                self.n_prompts, cfg.chan_embed_dim, s.mlp_ratio, dpr[sum(s.depths[:i]) + j],
                                last=(i == n_stages - 1 and j == depth - 1))
                for j in range(depth)])
            self.stages.append(blocks)
            if i < n_stages - 1:
                self.merges.append(PromptPatchMerging(dim, res, s.num_heads[i], self.n_prompts))
        self.norm = nn.LayerNorm(s.channels(n_stages - 1))
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> list[tuple[Tensor, tuple[Tensor, Tensor] | None]]:
        x = self.patch_embed(images)
        b = x.shape[0]
        x = self.patch_norm(x.flatten(2).transpose(1, 2))
        prompts = self.task_prompts.unsqueeze(0).expand(b, -1, -1) if self.task_prompts is not None else x.new_zeros(b, 0, x.shape[-1])
        out = []
        for i, blocks in enumerate(self.stages):
            affinity = None
            for blk in blocks:
                x, prompts, affinity = blk(x, prompts)
            if i < len(self.merges):
                x, prompts, affinity = self.merges[i](x, prompts, affinity)
                h, w = self.cfg.stage_size(i + 1)
            else:
                x = self.norm(x)
                h, w = self.cfg.stage_size(i)
            out.append((x.transpose(1, 2).reshape(b, -1, h, w), affinity))
        return out


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
