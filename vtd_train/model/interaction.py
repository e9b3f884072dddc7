"""Feature interaction blocks (paper §4.2, appendix G.2).

**Intra-IB** (one per task group, segmentation and localization). Input features ``F_g``
``[*, C, h, w]`` are flattened into tokens; ``T`` task-specific linear layers ``L_g^t: C → C'``
give task tokens that are concatenated to ``X̂_g`` of width ``T·C'``; ``M`` pre-LN self-attention
blocks (Eq. 2: ``X' = MHA(LN X) + X``, ``X = FFN(LN X') + X'``) model the interactions.

* segmentation: tokens are the pixels of the shared P2-scale aggregated features; attention is
  windowed, alternating window and shifted-window blocks (Swin; timm's
  ``SwinTransformerBlock``), because the map is large;
* localization: tokens are the cells of each RoI's feature grid (7×7 for the box decoder,
  14×14 for the mask and pose decoders); standard multi-head attention within each RoI.
  No positional encoding: attention is permutation-equivariant, so every token keeps its grid
  cell through the residual path.

The block output ``F̂_g [*, T·C', h, w]`` is handed back to the task decoders as
``F_t = F_g + W_t · F̂_g[t-th C' slice]`` (``W_t: C' → C``, :meth:`IntraIB.task_features`): each
decoder reads its own task-specific channels, projected back to the input width so that the
decoder keeps the same input contract (channels C) in every variant, and the residual lets a
baseline-pretrained decoder start from its usual features.

**Cross-IB** (Eq. 3) between the two groups, in both directions, placed after the Intra-IBs and
computed from their outputs: group tokens are projected to a common width ``C''``, the tokens of
one group query the other (pre-LN cross-attention + FFN), and the update is projected back to
the querying group's width and added. To keep it cheap (G.2) pixel features are average-pooled
×8 and object features are average-pooled to one vector per RoI; attention stays within an
image. The pixel update is upsampled ×8 (bilinear) before it is added; the object update is
broadcast over the RoI grid.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.errors import VTDInputError
from vtd_train.model.schema import CrossIBConfig, IntraIBConfig


class MultiHeadAttention(nn.Module):
    """Multi-head attention ``(query [B, Lq, D], context [B, Lk, D], mask [B, Lq|1, Lk] bool) -> [B, Lq, D]``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise VTDInputError(f"attention width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        b, lq, d = query.shape
        h = self.num_heads
        q = self.q(query).view(b, lq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None]  # broadcast over heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, lq, d))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SelfAttentionBlock(nn.Module):
    """Eq. 2: ``x = MHA(LN x) + x; x = FFN(LN x) + x`` over ``[B, L, D]`` tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y)
        return x + self.ffn(self.norm2(x))


class IntraIB(nn.Module):
    """Intra-group interaction block for the tasks ``tasks`` of one group.

    ``forward(x [N, C, h, w]) -> F̂ [N, T·C', h, w]``; ``task_features(x, F̂, task) -> [N, C, h, w]``.
    ``windowed=True``: (shifted-)window attention over the whole map (segmentation);
    ``windowed=False``: full attention over the ``h·w`` cells of each item (RoIs).
    """

    def __init__(self, cfg: IntraIBConfig, in_channels: int, tasks: tuple[str, ...], *, windowed: bool) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("an Intra-IB needs at least one task")
        self.tasks = tasks
        self.windowed = windowed
        c_task = cfg.task_channels
        dim = c_task * len(tasks)
        self.task_channels = c_task
        self.out_channels = dim
        self.tokens = nn.ModuleDict({t: nn.Linear(in_channels, c_task) for t in tasks})
        if windowed:
            from timm.models.swin_transformer import SwinTransformerBlock

            ws = cfg.window_size
            self.blocks = nn.ModuleList(
                SwinTransformerBlock(
                    dim,
                    input_resolution=(ws * 64, ws * 64),  # only bounds the window; masks are dynamic
                    num_heads=cfg.num_heads,
                    window_size=ws,
                    shift_size=0 if i % 2 == 0 else ws // 2,
                    always_partition=True,
                    dynamic_mask=True,
                    mlp_ratio=cfg.mlp_ratio,
                )
                for i in range(cfg.num_blocks)
            )
        else:
            self.blocks = nn.ModuleList(
                SelfAttentionBlock(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.num_blocks)
            )
        self.out = nn.ModuleDict({t: nn.Linear(c_task, in_channels) for t in tasks})

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if n == 0:
            return x.new_zeros(0, self.out_channels, h, w)
        tokens = x.permute(0, 2, 3, 1)  # [N, h, w, C]
        tokens = torch.cat([self.tokens[t](tokens) for t in self.tasks], dim=-1)  # [N, h, w, T·C']
        if self.windowed:
            for blk in self.blocks:
                tokens = blk(tokens)
        else:
            tokens = tokens.reshape(n, h * w, -1)
            for blk in self.blocks:
                tokens = blk(tokens)
            tokens = tokens.reshape(n, h, w, -1)
        return tokens.permute(0, 3, 1, 2).contiguous()

    def task_features(self, x: Tensor, f_hat: Tensor, task: str) -> Tensor:
        """``x + W_task · (task's C' slice of F̂)``, the decoder input of ``task``."""
        i = self.tasks.index(task)
        part = f_hat[:, i * self.task_channels : (i + 1) * self.task_channels]
        return x + self.out[task](part.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CrossAttentionBlock(nn.Module):
    """Eq. 3 on token sets: the update ``X̂_q − X_q`` of ``queries`` attending to ``keys``.

    ``forward(queries [B, Lq, Cq], keys [B, Lk, Ck], key_valid [B, Lk] bool) -> [B, Lq, Cq]``.
    """

    def __init__(self, cfg: CrossIBConfig, query_channels: int, key_channels: int) -> None:
        super().__init__()
        c = cfg.channels
        self.query_in = nn.Linear(query_channels, c)
        self.key_in = nn.Linear(key_channels, c)
        self.norm_q = nn.LayerNorm(c)
        self.norm_k = nn.LayerNorm(c)
        self.attn = MultiHeadAttention(c, cfg.num_heads)
        self.norm_ffn = nn.LayerNorm(c)
        self.ffn = FeedForward(c, cfg.mlp_ratio)
        self.query_out = nn.Linear(c, query_channels)

    def forward(self, queries: Tensor, keys: Tensor, key_valid: Tensor | None = None) -> Tensor:
        xq = self.query_in(queries)
        xk = self.norm_k(self.key_in(keys))
        mask = None if key_valid is None else key_valid[:, None, :]
        x = xq + self.attn(self.norm_q(xq), xk, mask)
        x = x + self.ffn(self.norm_ffn(x))
        return self.query_out(x - xq)


def _pad_groups(x: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Rows of ``x [N, C]`` grouped by ``index [N]`` → ``[G, max_n, C]`` and a validity mask."""
    counts = torch.bincount(index, minlength=num_groups) if index.numel() else index.new_zeros(num_groups)
    max_n = max(int(counts.max()) if num_groups else 0, 1)
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(index.numel(), device=x.device) - starts[index[order]]
    out = x.new_zeros(num_groups, max_n, x.shape[1])
    valid = torch.zeros(num_groups, max_n, dtype=torch.bool, device=x.device)
    out[index[order], pos] = x[order]
    valid[index[order], pos] = True
    return out, valid


class PixelsFromObjects(nn.Module):
    """Cross-IB localization → segmentation: pixel tokens (pooled ×8) query the image's objects.

    ``forward(pixels [B, Dp, H, W], objects [N, Do, s, s], image_index [N]) -> [B, Dp, H, W]``.
    """

    def __init__(self, cfg: CrossIBConfig, pixel_channels: int, object_channels: int) -> None:
        super().__init__()
        self.down = cfg.pixel_downsample
        self.block = CrossAttentionBlock(cfg, pixel_channels, object_channels)

    def forward(self, pixels: Tensor, objects: Tensor, image_index: Tensor) -> Tensor:
        b, d, h, w = pixels.shape
        pooled = F.avg_pool2d(pixels, self.down, ceil_mode=True)  # [B, Dp, h/8, w/8]
        hq, wq = pooled.shape[-2:]
        queries = pooled.flatten(2).transpose(1, 2)
        keys, valid = _pad_groups(objects.mean(dim=(2, 3)), image_index, b)
        has_objects = valid.any(dim=1)
        valid = valid | ~has_objects[:, None]  # attend to a zero row where an image has no object
        delta = self.block(queries, keys, valid) * has_objects[:, None, None].to(pixels.dtype)
        delta = delta.transpose(1, 2).reshape(b, d, hq, wq)
        return pixels + F.interpolate(delta, size=(h, w), mode="bilinear", align_corners=False)


class ObjectsFromPixels(nn.Module):
    """Cross-IB segmentation → localization: each RoI (pooled to a vector) queries its image's
    pixel tokens (pooled ×8). ``forward(objects [N, Do, s, s], image_index [N], pixels [B, Dp, H, W])``."""

    def __init__(self, cfg: CrossIBConfig, object_channels: int, pixel_channels: int) -> None:
        super().__init__()
        self.down = cfg.pixel_downsample
        self.block = CrossAttentionBlock(cfg, object_channels, pixel_channels)

    def pixel_tokens(self, pixels: Tensor) -> Tensor:
        """``[B, Dp, H, W]`` → ``[B, L, Dp]`` (computed once per image batch, reused per RoI set)."""
        return F.avg_pool2d(pixels, self.down, ceil_mode=True).flatten(2).transpose(1, 2)

    def forward(self, objects: Tensor, image_index: Tensor, pixel_tokens: Tensor) -> Tensor:
        if objects.shape[0] == 0:
            return objects
        b = pixel_tokens.shape[0]
        queries, valid = _pad_groups(objects.mean(dim=(2, 3)), image_index, b)
        delta = self.block(queries, pixel_tokens)  # [B, max_n, Do]
        return objects + delta[valid][self._inverse(image_index)][:, :, None, None]

    @staticmethod
    def _inverse(index: Tensor) -> Tensor:
        """Map rows of ``delta[valid]`` (grouped by image, stable) back to the input order."""
        order = torch.argsort(index, stable=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(order.numel(), device=order.device)
        return inv
