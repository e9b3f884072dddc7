"""Optical flow decoder (PWC-Net style) and its unsupervised loss.

Paper (appendix G, "Association Decoders"): the flow decoder follows PWC-Net [54] on the first
two FPN pixel feature maps (P2, P3), builds a four-level feature pyramid, and at each level
warps the reference features with the upsampled flow of the coarser level, computes a cost
volume by local correlation and predicts the flow with convolutions (fewer dense connections
than PWC-Net). It is trained without flow labels with the census loss [40] (λ_photo = 1.0),
the edge-aware second-order smoothness [58] (λ_smooth = 4.0, edge weight 150) and the range
map occlusion estimate of Wang et al. [62], applied to the flow of the three finest levels
(:class:`FlowLoss`).

Flow convention used everywhere in this module (and by the flow metric, REFERENCE §7):
``flow[:, :, y, x] = (dx, dy)`` such that ``key(x, y) ≈ ref(x + dx, y + dy)``: the flow maps
key-frame pixels to reference-frame pixels and the reference frame is *backward warped* onto
the key frame. Pixel coordinates are integer indices of pixel centres (``x`` right, ``y``
down); ``x + dx`` lies on the reference frame's grid.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vtd_train.model.schema import FlowConfig, FlowLossConfig

__all__ = [
    "FlowConfig",
    "FlowDecoder",
    "FlowLoss",
    "FlowLossConfig",
    "census_transform",
    "correlation",
    "normalize_cosine",
    "normalize_pair",
    "range_map",
    "soft_argmax",
    "upsample_flow",
    "warp",
]

# ITU-R 601 luma weights (tf.image.rgb_to_grayscale, what UFlow's census loss uses); RGB order.
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


# ---------------------------------------------------------------------------------------------
# Functional building blocks (shared by the decoder, the loss and the tests)
# ---------------------------------------------------------------------------------------------


def _base_grid(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """``[B, 2, H, W]`` float32 pixel coordinates ``(x, y)`` of every pixel centre."""
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y)).unsqueeze(0).expand(batch, 2, height, width)


def warp(x: Tensor, flow: Tensor) -> Tensor:
    """Backward-warp ``x`` with ``flow``: ``out[..., y, x] = x[..., y + dy, x + dx]``.

    Args:
        x: ``[B, C, H, W]`` features or image of the reference frame.
        flow: ``[B, 2, H, W]`` displacement ``(dx, dy)`` in pixels of ``x``'s grid.

    Returns:
        ``[B, C, H, W]`` float32, bilinear samples, zero where ``p + flow(p)`` falls outside.
        Integer flows reproduce shifted pixels exactly (``align_corners=True`` coordinates).
    """
    b, _, h, w = x.shape
    if flow.shape != (b, 2, h, w):
        raise ValueError(f"warp: flow shape {tuple(flow.shape)} does not match x {tuple(x.shape)}")
    pos = _base_grid(b, h, w, x.device) + flow.float()
    # Normalise to [-1, 1] with align_corners=True: pixel 0 -> -1, pixel W-1 -> +1.
    gx = 2.0 * pos[:, 0] / max(w - 1, 1) - 1.0
    gy = 2.0 * pos[:, 1] / max(h - 1, 1) - 1.0
    grid = torch.stack((gx, gy), dim=-1)  # [B, H, W, 2]
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def correlation(key: Tensor, ref: Tensor, max_displacement: int, reduce: str = "mean") -> Tensor:
    """Local correlation (PWC-Net cost volume) computed by shifting ``ref``.

    Args:
        key: ``[B, C, H, W]`` key-frame features.
        ref: ``[B, C, H, W]`` (warped) reference-frame features.
        max_displacement: ``d``; displacements ``-d..d`` in both axes.
        reduce: ``"mean"`` (PWC-Net) or ``"sum"`` over channels (the dot product: the cosine
            similarity for unit-length features).

    Returns:
        ``[B, (2d+1)², H, W]`` float32; channel ``(dy + d)·(2d+1) + (dx + d)`` holds
        ``mean_c key[c, y, x] · ref[c, y + dy, x + dx]`` (``sum_c`` for ``reduce="sum"``;
        zero outside ``ref``).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"correlation: reduce must be 'mean' or 'sum', got {reduce!r}")
    if key.shape != ref.shape:
        raise ValueError(f"correlation: key {tuple(key.shape)} != ref {tuple(ref.shape)}")
    d = int(max_displacement)
    _, _, h, w = key.shape
    # fp32 on purpose: a channel-mean of products is a reduction (REFERENCE §5).
    key = key.float()
    padded = F.pad(ref.float(), (d, d, d, d))
    reducer = torch.mean if reduce == "mean" else torch.sum
    # One shifted product per displacement: autograd keeps only views of ``padded``, so the
    # memory is the (2d+1)² output channels, not the (2d+1)²·C of an unfold-based version.
    costs = [
        reducer(key * padded[:, :, dy : dy + h, dx : dx + w], dim=1)
        for dy in range(2 * d + 1)
        for dx in range(2 * d + 1)
    ]
    return torch.stack(costs, dim=1)


def normalize_pair(key: Tensor, ref: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Centre and scale two feature maps by their joint moments (UFlow's ``normalize_features``).

    Args:
        key, ref: ``[B, C, H, W]``.

    Returns:
        both maps minus the mean and divided by the standard deviation that sample ``b``'s key
        and reference maps have together (over channels, rows, columns and the two maps), float32.
    """
    key, ref = key.float(), ref.float()
    both = torch.cat((key, ref), dim=1)
    var, mean = torch.var_mean(both, dim=(1, 2, 3), keepdim=True, correction=0)
    std = torch.sqrt(var + eps)
    return (key - mean) / std, (ref - mean) / std


def normalize_cosine(key: Tensor, ref: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Centre each channel on its mean over both maps, then scale every pixel's vector to unit length.

    Args:
        key, ref: ``[B, C, H, W]``.

    Returns:
        float32 maps whose dot product at two pixels is the cosine similarity of their
        channel-centred features (``correlation(..., reduce="sum")`` is then in ``[-1, 1]``).
    """
    key, ref = key.float(), ref.float()
    mean = 0.5 * (key.mean(dim=(2, 3), keepdim=True) + ref.mean(dim=(2, 3), keepdim=True))
    return F.normalize(key - mean, dim=1, eps=eps), F.normalize(ref - mean, dim=1, eps=eps)


def soft_argmax(cost: Tensor, max_displacement: int, temperature: float) -> Tensor:
    """Expected displacement of a cost volume under a softmax over its displacements.

    Args:
        cost: ``[B, (2d+1)², H, W]`` as :func:`correlation` returns it.
        max_displacement: ``d``.
        temperature: softmax temperature (in the cost's units).

    Returns:
        ``[B, 2, H, W]`` float32 ``(dx, dy)`` in level pixels, each in ``[-d, d]``.
    """
    d = int(max_displacement)
    b, n, h, w = cost.shape
    if n != (2 * d + 1) ** 2:
        raise ValueError(f"soft_argmax: {n} cost channels for max_displacement {d}")
    prob = torch.softmax(cost.float() / temperature, dim=1).view(b, 2 * d + 1, 2 * d + 1, h, w)
    disp = torch.arange(-d, d + 1, device=cost.device, dtype=torch.float32).view(1, -1, 1, 1)
    dx = (prob.sum(dim=1) * disp).sum(dim=1)  # marginal over dy, expectation over dx
    dy = (prob.sum(dim=2) * disp).sum(dim=1)
    return torch.stack((dx, dy), dim=1)


@torch.no_grad()
def range_map(flow: Tensor) -> Tensor:
    """Range map of Wang et al. 2018 (occlusion-aware unsupervised flow).

    Every pixel ``p`` of the *source* frame of ``flow`` is forward-splatted to ``p + flow(p)``
    on the *target* frame with bilinear weights; the range map counts how much of the source
    frame lands on each target pixel. Target pixels with range ≈ 0 are not reached by any
    source pixel (occluded in the source frame); range > 1 means collisions.

    Args:
        flow: ``[B, 2, H, W]`` flow from the source frame to the target frame (pixels).

    Returns:
        ``[B, 1, H, W]`` float32 range map on the target frame (no gradient).
    """
    b, _, h, w = flow.shape
    pos = _base_grid(b, h, w, flow.device) + flow.float()
    x, y = pos[:, 0], pos[:, 1]
    x0, y0 = torch.floor(x), torch.floor(y)
    out = torch.zeros(b * h * w, device=flow.device, dtype=torch.float32)
    batch_offset = (torch.arange(b, device=flow.device) * (h * w)).view(b, 1, 1)
    for ox in (0.0, 1.0):
        for oy in (0.0, 1.0):
            xi, yi = x0 + ox, y0 + oy
            weight = (1.0 - (x - xi).abs()) * (1.0 - (y - yi).abs())
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1) & torch.isfinite(weight)
            # a non-finite flow lands nowhere (clamp keeps NaN, whose .long() is out of range): the
            # loss it feeds turns non-finite and the training step's skip handles it
            idx = batch_offset + torch.where(inside, yi, 0.0).long() * w + torch.where(inside, xi, 0.0).long()
            out.index_add_(0, idx.reshape(-1), torch.where(inside, weight, 0.0).reshape(-1))
    return out.view(b, 1, h, w)


def upsample_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a flow that is in *input-image* pixels to ``size`` (bilinear; values unchanged).

    ``FlowDecoder`` outputs are already in image pixels, so upsampling the stride-4 output to
    the image resolution only interpolates. (Flows in level pixels would need rescaling.)
    """
    return F.interpolate(flow.float(), size=size, mode="bilinear", align_corners=False)


def census_transform(gray: Tensor, patch_size: int) -> Tensor:
    """Soft census transform (UnFlow / UFlow).

    Args:
        gray: ``[B, 1, H, W]`` intensities in 0..255.
        patch_size: odd window size (7 in the paper).

    Returns:
        ``[B, patch_size², H, W]``: ``t = Δ / sqrt(0.81 + Δ²)`` with ``Δ`` = neighbour − centre
        (zero padding; the loss masks a ``patch_size // 2`` border).
    """
    b, _, h, w = gray.shape
    neighbours = F.unfold(gray, patch_size, padding=patch_size // 2)
    diff = neighbours.view(b, patch_size * patch_size, h, w) - gray
    return diff / torch.sqrt(0.81 + diff * diff)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, slope: float, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.LeakyReLU(slope, inplace=True),
    )


class _FlowEstimator(nn.Module):
    """Conv chain ``[cost, key features, upsampled flow] -> (features, flow residual)``."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], slope: float) -> None:
        super().__init__()
        layers, cin = [], in_channels
        for cout in widths:
            layers.append(_conv(cin, cout, slope))
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.predict = nn.Conv2d(cin, 2, 3, padding=1)
        self.out_channels = cin

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feat = self.convs(x)
        return feat, self.predict(feat)


class FlowDecoder(nn.Module):
    """PWC-Net style coarse-to-fine flow decoder on FPN P2/P3.

    ``forward(key, ref)``:
        key, ref: ``[P2, P3]`` of the key and the reference frame, ``[B, C, H/4, W/4]`` and
        ``[B, C, H/8, W/8]`` with ``C = in_channels``.

    Returns ``levels`` flows, finest first; ``flows[l]`` is ``[B, 2, h_l, w_l]`` at stride
    ``self.strides[l] = 4·2^l`` (the finest at stride 4), in **pixels of the input image**
    (multiply a level's native flow by its stride), float32, mapping key to reference pixels
    (module docstring). ``upsample_flow(flows[0], (H, W))`` gives the full-resolution flow.

    Internally each level works in its own pixel units: the coarser flow is upsampled
    (bilinear) and doubled, the reference features are warped with it, the cost volume
    (``(2d+1)²`` channels) of the key and warped features, normalised as ``cfg.cost_norm``
    says (:func:`normalize_cosine` or :func:`normalize_pair`), goes through a LeakyReLU and is
    concatenated with the key features, the upsampled flow and (``readout_temperature`` > 0)
    the cost volume's soft-argmax (:func:`soft_argmax`, level pixels), and the estimator
    predicts a residual: the level's flow is ``up + residual``, or ``up + soft-argmax +
    residual`` with ``readout_add``. The finest flow is refined by the context network.

    Why the normalisation: the correlation scales with the square of the features' magnitude,
    which shrinks through the pyramid convolutions (untrained, a raw cost volume's standard
    deviation was 0.05 at stride 4 and 4e-4 at stride 32): the estimators could not see the
    matching. UFlow's joint moments fix the scale but leave a large constant component (on the
    tiny model's P2 of a frame and its copy rolled by 2 cells: mean 0.64, std over the
    displacements 0.18, argmax right at 62% of cells); per-channel centring + unit length
    (cosine) puts the argmax right at 95% of them.

    Why the readout: trained by the census alone, the estimators did not learn to read the
    cost volume (on frames rolled by a known global shift, held-out correlation of the mean
    predicted and the true shift ≤ 0.6 after 300 steps, against 0.99 for an L1 to the true
    shift). With the cosine cost and the soft-argmax added to the flow it is 0.98
    (benchmarks/RESULTS.md, the flow section).
    """

    def __init__(self, cfg: FlowConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        slope = cfg.negative_slope
        self.strides = tuple(4 * 2**level for level in range(cfg.levels))
        ch = cfg.channels
        pyramid = [
            nn.Sequential(_conv(in_channels, ch[0], slope), _conv(ch[0], ch[0], slope)),  # P2
            nn.Sequential(_conv(in_channels, ch[1], slope), _conv(ch[1], ch[1], slope)),  # P3
        ]
        for level in range(2, cfg.levels):  # strides 16, 32, ...: from the level below
            pyramid.append(
                nn.Sequential(_conv(ch[level - 1], ch[level], slope, stride=2), _conv(ch[level], ch[level], slope))
            )
        self.pyramid = nn.ModuleList(pyramid)
        cost_channels = (2 * cfg.max_displacement + 1) ** 2 + (2 if cfg.readout_temperature > 0 else 0)
        self.estimators = nn.ModuleList(
            _FlowEstimator(cost_channels + ch[level] + 2, cfg.estimator_channels, slope)
            for level in range(cfg.levels)
        )
        self.context: nn.Sequential | None = None
        if cfg.context_channels:
            layers, cin = [], self.estimators[0].out_channels + 2
            for cout, dil in zip(cfg.context_channels, cfg.context_dilations, strict=True):
                layers.append(_conv(cin, cout, slope, dilation=dil))
                cin = cout
            layers.append(nn.Conv2d(cin, 2, 3, padding=1))
            self.context = nn.Sequential(*layers)

    def _features(self, feats: list[Tensor]) -> list[Tensor]:
        """``[P2, P3]`` -> ``levels`` pyramid features, finest first."""
        out = [self.pyramid[0](feats[0]), self.pyramid[1](feats[1])]
        for level in range(2, self.cfg.levels):
            out.append(self.pyramid[level](out[-1]))
        return out

    def forward(self, key: list[Tensor], ref: list[Tensor]) -> list[Tensor]:
        if len(key) != 2 or len(ref) != 2:
            raise ValueError(f"FlowDecoder expects [P2, P3] per frame, got {len(key)} key and {len(ref)} ref maps")
        key_pyr, ref_pyr = self._features(key), self._features(ref)
        flows: list[Tensor] = []
        flow: Tensor | None = None
        for level in reversed(range(self.cfg.levels)):
            k, r = key_pyr[level], ref_pyr[level]
            b, _, h, w = k.shape
            if flow is None:
                up = torch.zeros(b, 2, h, w, device=k.device, dtype=torch.float32)
                warped = r
            else:
                # Level pixels: one coarse pixel is two fine pixels (strides double exactly).
                up = 2.0 * F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
                warped = warp(r, up)
            d = self.cfg.max_displacement
            if self.cfg.cost_norm == "cosine":
                raw = correlation(*normalize_cosine(k, warped), d, reduce="sum")
            else:
                raw = correlation(*normalize_pair(k, warped), d)
            inputs = [F.leaky_relu(raw, self.cfg.negative_slope), k, up]
            readout = None
            if self.cfg.readout_temperature > 0:
                readout = soft_argmax(raw, d, self.cfg.readout_temperature)
                inputs.append(readout)
            feat, residual = self.estimators[level](torch.cat(inputs, dim=1))
            flow = up + residual.float()
            if readout is not None and self.cfg.readout_add:
                flow = flow + readout
            if level == 0 and self.context is not None:
                flow = flow + self.context(torch.cat([feat, flow], dim=1)).float()
            flows.append(flow * self.strides[level])
        return flows[::-1]


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


class FlowLoss(nn.Module):
    """Census photometric loss + edge-aware second-order smoothness.

    ``forward(flows, key_img, ref_img, valid=None, backward_flows=None)``:
        flows: ``FlowDecoder`` output (key → ref), finest first, image pixels.
        key_img, ref_img: ``[B, 3, H, W]`` RGB normalised with ``pixel_mean``/``pixel_std``.
        valid: optional ``[B, H, W]`` or ``[B, 1, H, W]`` bool/float, True on real pixels
            (False on batch padding); both frames of a pair share the image size.
        backward_flows: optional decoder output for (ref → key), i.e. ``decoder(ref, key)``.

    Returns ``{"census": ..., "smooth": ...}``, scalar float32, already multiplied by
    ``census_weight`` and ``smooth_weight``.

    * Census (UnFlow/UFlow): the finest flow is upsampled to the image size; the reference
      grayscale image is backward-warped onto the key frame; 7×7 soft census on both; soft
      Hamming distance ``Σ d²/(0.1 + d²)``; robust penalty ``(|h| + 0.01)^0.4``; mean over the
      mask (zero border of ``patch // 2``, in-frame targets, ``valid``, non-occluded).
    * Levels: the same census for the flow of each of the ``census_levels`` finest levels, on
      the images downsampled by ``2^level`` (4× the level's flow resolution, as for the finest
      level) with the flow in their pixels; the census term is the mean over the levels. A
      census compares a pixel with its 3-pixel neighbourhood, so its gradient points towards
      the true motion only for motions of a few pixels (measured on the synthetic videos:
      cosine 0.3-0.4 under 4 px, about 0 beyond); at half resolution a motion is half as many
      pixels, so the coarser levels learn larger motions that the finest level then refines.
    * Occlusion, with ``backward_flows`` (the paper's approach, Wang et al. 2018): the range
      map of the key frame is splatted from the ref → key flow; key pixels with
      ``clamp(range, 0, 1) < occlusion_thr`` are occluded. The loss is then symmetric: the
      ref → key direction is scored too (masked by the range map of the key → ref flow) and
      both census and smoothness are the mean of the two directions.
    * Occlusion, key → ref flow only (fallback): the range map of the *reference* frame is
      splatted from the key → ref flow and read back at each key pixel's target; a key pixel
      whose target collects more than ``collision_thr`` source pixels is an occlusion
      candidate (an occluded pixel lands where its occluder lands) and is masked, together
      with its occluder. This masks a superset of the true occlusions; pass ``backward_flows``
      for the paper's estimate.
    * Smoothness (UFlow, ``smoothness_at_level=2``): on the finest flow at stride 4, in that
      level's pixels (image pixels / 4), second differences in x and y through a robust L1
      ``sqrt(x² + 1e-6)``, weighted by ``exp(-mean_c (150·∇I)²)`` with ``∇I`` the stride-2
      difference of the image (0..1) resized to the flow resolution.

    Masks are computed without gradient. All arithmetic is float32.
    """

    def __init__(self, cfg: FlowLossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_gray", torch.tensor(_GRAY_WEIGHTS).view(1, 3, 1, 1), persistent=False)

    def forward(
        self,
        flows: list[Tensor],
        key_img: Tensor,
        ref_img: Tensor,
        valid: Tensor | None = None,
        backward_flows: list[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if key_img.shape != ref_img.shape or key_img.dim() != 4 or key_img.shape[1] != 3:
            raise ValueError(
                f"FlowLoss: images must be [B, 3, H, W] alike, got {tuple(key_img.shape)} and {tuple(ref_img.shape)}"
            )
        b, _, h, w = key_img.shape
        key255 = key_img.float() * self._std + self._mean
        ref255 = ref_img.float() * self._std + self._mean
        if valid is not None:
            valid = (valid.view(b, 1, h, w) > 0).float()

        levels = min(self.cfg.census_levels, len(flows))
        if backward_flows is not None and len(backward_flows) < levels:
            raise ValueError(f"FlowLoss: {len(backward_flows)} backward flows for {levels} census levels")
        census = sum(self._census_level(level, flows, backward_flows, key255, ref255, valid) for level in range(levels))
        census = census / levels
        if backward_flows is None:
            smooth = self._smooth(flows[0], key255, valid)
        else:
            smooth = 0.5 * (self._smooth(flows[0], key255, valid) + self._smooth(backward_flows[0], ref255, valid))
        return {"census": self.cfg.census_weight * census, "smooth": self.cfg.smooth_weight * smooth}

    def _census_level(self, level: int, flows: list[Tensor], backward_flows: list[Tensor] | None, key255: Tensor,
                      ref255: Tensor, valid: Tensor | None) -> Tensor:
        """The census term of pyramid level ``level`` (see the class docstring): images (and
        ``valid``) downsampled by ``2^level``, the level's flows resized to them."""
        b, _, h, w = key255.shape
        scale = 2**level
        size = (max(h // scale, 1), max(w // scale, 1))
        if scale > 1:
            key255, ref255 = (F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                              for x in (key255, ref255))
            if valid is not None:
                valid = (F.interpolate(valid, size=size, mode="area") > 0.999).float()
        fw = upsample_flow(flows[level], size) / scale  # image pixels -> pixels of the downsampled images
        if backward_flows is None:
            with torch.no_grad():
                visible = (warp(range_map(fw), fw) <= self.cfg.collision_thr).float()
            return self._census(fw, key255, ref255, visible, valid)
        bw = upsample_flow(backward_flows[level], size) / scale
        with torch.no_grad():
            visible_key = (range_map(bw).clamp(0, 1) >= self.cfg.occlusion_thr).float()
            visible_ref = (range_map(fw).clamp(0, 1) >= self.cfg.occlusion_thr).float()
        return 0.5 * (self._census(fw, key255, ref255, visible_key, valid) + self._census(bw, ref255, key255, visible_ref, valid))

    def _census(self, flow: Tensor, src255: Tensor, tgt255: Tensor, visible: Tensor, valid: Tensor | None) -> Tensor:
        """Census loss of ``src`` vs ``tgt`` warped by ``flow`` (``[B, 2, H, W]``, image pixels)."""
        cfg = self.cfg
        b, _, h, w = src255.shape
        src_gray = (src255 * self._gray).sum(1, keepdim=True)
        tgt_gray = (tgt255 * self._gray).sum(1, keepdim=True)
        warped = warp(tgt_gray, flow)
        with torch.no_grad():
            pos = _base_grid(b, h, w, flow.device) + flow.detach()
            mask = (
                (pos[:, 0:1] >= 0) & (pos[:, 0:1] <= w - 1) & (pos[:, 1:2] >= 0) & (pos[:, 1:2] <= h - 1)
            ).float() * visible
            if valid is not None:
                mask = mask * valid * (warp(valid, flow.detach()) > 0.5).float()
            r = cfg.census_patch // 2
            border = torch.zeros_like(mask)
            border[:, :, r : h - r, r : w - r] = 1.0
            mask = mask * border
        t_src = census_transform(src_gray, cfg.census_patch)
        t_tgt = census_transform(warped, cfg.census_patch)
        sq = (t_src - t_tgt) ** 2
        hamming = (sq / (0.1 + sq)).sum(1, keepdim=True)
        penalty = (hamming.abs() + cfg.census_eps) ** cfg.census_q
        return (penalty * mask).sum() / (mask.sum() + 1e-6)

    def _smooth(self, flow: Tensor, img255: Tensor, valid: Tensor | None) -> Tensor:
        """Edge-aware 2nd-order smoothness of a stride-4 ``flow`` (image pixels) on ``img``."""
        b, _, h, w = flow.shape
        if h < 3 or w < 3:
            return flow.float().sum() * 0.0
        flow = flow.float() / 4.0  # level pixels (UFlow computes smoothness at level 2)
        img = F.interpolate(img255 / 255.0, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        edge = self.cfg.edge_weight
        weight_y = torch.exp(-((edge * (img[:, :, 2:] - img[:, :, :-2])) ** 2).mean(1, keepdim=True))
        weight_x = torch.exp(-((edge * (img[..., 2:] - img[..., :-2])) ** 2).mean(1, keepdim=True))
        ddy = flow[:, :, 2:] - 2.0 * flow[:, :, 1:-1] + flow[:, :, :-2]
        ddx = flow[..., 2:] - 2.0 * flow[..., 1:-1] + flow[..., :-2]
        term_y = weight_y * torch.sqrt(ddy * ddy + 1e-6)
        term_x = weight_x * torch.sqrt(ddx * ddx + 1e-6)
        if valid is None:
            return 0.5 * (term_y.mean() + term_x.mean())
        m = (F.interpolate(valid, size=(h, w), mode="nearest") > 0).float()
        m_y = m[:, :, 2:] * m[:, :, 1:-1] * m[:, :, :-2]
        m_x = m[..., 2:] * m[..., 1:-1] * m[..., :-2]
        loss_y = (term_y * m_y).sum() / (2.0 * m_y.sum() + 1e-6)
        loss_x = (term_x * m_x).sum() / (2.0 * m_x.sum() + 1e-6)
        return 0.5 * (loss_y + loss_x)
