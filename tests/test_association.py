"""Contract and behaviour tests of the association decoders: flow, QDTrack head/loss, tracker.

All tiny (CPU, a few ms each except the short flow optimisation)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from data_pipeline.loading.structures import FrameTargets
from vtd_train.model.flow import (
    FlowConfig,
    FlowDecoder,
    FlowLoss,
    FlowLossConfig,
    correlation,
    normalize_cosine,
    range_map,
    soft_argmax,
    warp,
)
from vtd_train.model.track_head import QDTrackConfig, QDTrackHead, QDTrackLoss, QDTrackLossConfig
from vtd_train.tracker import QDTracker, TrackerConfig

TINY_FLOW = FlowConfig(
    channels=(8, 8, 8, 8),
    estimator_channels=(16, 8),
    context_channels=(8,),
    context_dilations=(1,),
    max_displacement=2,
)
CENSUS_FLOOR = 0.01**0.4  # robust penalty (|h| + eps)^q of a perfect match


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add spin-wait overhead (measured 1.6 s
    with one thread vs 28 s with two for the flow optimisation on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_texture(seed: int, h: int = 64, w: int = 64, pad: int = 8) -> Tensor:
    """``[1, 3, h + 2·pad, w + 2·pad]`` smooth random texture, zero mean, unit std."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h + 2 * pad, w + 2 * pad, generator=g)
    x = F.avg_pool2d(F.avg_pool2d(x, 9, 1, 4), 9, 1, 4)
    return (x - x.mean()) / x.std()


def pooled_features(img: Tensor) -> list[Tensor]:
    """Stand-in for FPN [P2, P3]: the image average-pooled to strides 4 and 8."""
    return [F.avg_pool2d(img, 4), F.avg_pool2d(img, 8)]


# ---------------------------------------------------------------------------------------------
# Flow: functional pieces
# ---------------------------------------------------------------------------------------------


def test_warp_integer_and_half_pixel_flow() -> None:
    img = torch.randn(1, 3, 12, 16)
    ref = torch.roll(img, shifts=(1, 2), dims=(2, 3))  # ref[y + 1, x + 2] = img[y, x]
    flow = torch.zeros(1, 2, 12, 16)
    flow[:, 0], flow[:, 1] = 2.0, 1.0  # (dx, dy): key(x, y) = ref(x + 2, y + 1)
    out = warp(ref, flow)
    torch.testing.assert_close(out[..., :-1, :-2], img[..., :-1, :-2])
    assert out[..., :, -2:].abs().max() == 0  # sampled outside the frame: zeros
    half = torch.zeros(1, 2, 12, 16)
    half[:, 0] = 0.5
    torch.testing.assert_close(warp(img, half)[..., :-1], 0.5 * (img[..., :-1] + img[..., 1:]))


def test_correlation_peaks_at_the_displacement() -> None:
    d, dy0, dx0 = 3, -1, 2
    key = torch.randn(2, 64, 10, 12, generator=torch.Generator().manual_seed(0))
    ref = torch.roll(key, shifts=(dy0, dx0), dims=(2, 3))  # key(x, y) = ref(x + dx0, y + dy0)
    cost = correlation(key, ref, d)
    assert cost.shape == (2, (2 * d + 1) ** 2, 10, 12)
    peak = (dy0 + d) * (2 * d + 1) + (dx0 + d)
    interior = cost[:, :, d:-d, d:-d]
    assert bool((interior.argmax(dim=1) == peak).all())
    torch.testing.assert_close(interior[:, peak], (key**2).mean(1)[:, d:-d, d:-d])
    torch.testing.assert_close(correlation(key, ref, d, reduce="sum"), 64 * cost)


def test_cosine_cost_is_one_at_the_displacement_and_soft_argmax_reads_it() -> None:
    d, dy0, dx0 = 2, 1, -2
    g = torch.Generator().manual_seed(1)
    key = 3.0 + torch.randn(2, 16, 10, 12, generator=g)  # an offset the centring removes
    ref = torch.roll(key, shifts=(dy0, dx0), dims=(2, 3))
    cost = correlation(*normalize_cosine(key, ref), d, reduce="sum")
    interior = cost[:, :, d:-d, d:-d]
    peak = (dy0 + d) * (2 * d + 1) + (dx0 + d)
    torch.testing.assert_close(interior[:, peak], torch.ones_like(interior[:, peak]))
    assert float(interior.max()) <= 1.0 + 1e-5 and float(interior.min()) >= -1.0 - 1e-5
    flow = soft_argmax(interior, d, temperature=0.02)
    assert flow.shape == (2, 2, 6, 8)
    assert (flow[:, 0] - dx0).abs().max() < 0.1 and (flow[:, 1] - dy0).abs().max() < 0.1
    # a flat cost volume reads as zero displacement
    torch.testing.assert_close(soft_argmax(torch.zeros(1, 25, 3, 3), d, 0.1), torch.zeros(1, 2, 3, 3))


def test_range_map_counts_landings() -> None:
    flow = torch.zeros(1, 2, 4, 6)
    torch.testing.assert_close(range_map(flow), torch.ones(1, 1, 4, 6))
    flow[:, 0, :, 2] = 1.0  # column 2 moves onto column 3: column 2 empty, column 3 doubly hit
    r = range_map(flow)[0, 0]
    assert torch.allclose(r[:, 2], torch.zeros(4)) and torch.allclose(r[:, 3], torch.full((4,), 2.0))
    flow[:, 0, :, 5] = 1.0  # right edge leaves the frame: lost, not wrapped
    assert torch.allclose(range_map(flow)[0, 0, :, 5], torch.zeros(4))


def test_range_map_of_a_non_finite_flow_drops_those_pixels() -> None:
    """A NaN / inf flow pixel lands nowhere (it used to index out of range and crash the step
    before the training step's non-finite check could skip it)."""
    flow = torch.zeros(1, 2, 4, 6)
    flow[0, 0, 1, 1], flow[0, 1, 2, 4] = float("nan"), float("inf")
    r = range_map(flow)[0, 0]
    assert torch.isfinite(r).all()
    assert r[1, 1] == 0.0 and r[2, 4] == 0.0 and r.sum() == 4 * 6 - 2


# ---------------------------------------------------------------------------------------------
# Flow decoder
# ---------------------------------------------------------------------------------------------


def test_flow_decoder_shapes_strides_and_units() -> None:
    torch.manual_seed(0)
    dec = FlowDecoder(replace(TINY_FLOW, readout_add=False), in_channels=4)
    key = [torch.randn(2, 4, 16, 24), torch.randn(2, 4, 8, 12)]
    ref = [torch.randn(2, 4, 16, 24), torch.randn(2, 4, 8, 12)]
    flows = dec(key, ref)
    assert dec.strides == (4, 8, 16, 32)
    assert [tuple(f.shape) for f in flows] == [(2, 2, 16, 24), (2, 2, 8, 12), (2, 2, 4, 6), (2, 2, 2, 3)]
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in flows)
    # Units: only the coarsest estimator predicts, a constant (0.5, -0.25) coarse pixels.
    # Every level must then report the same displacement in image pixels: (16, -8).
    with torch.no_grad():
        for est in dec.estimators:
            est.predict.weight.zero_()
            est.predict.bias.zero_()
        dec.estimators[-1].predict.bias.copy_(torch.tensor([0.5, -0.25]))
        dec.context[-1].weight.zero_()
        dec.context[-1].bias.zero_()
        flows = dec(key, ref)
    for f in flows:
        torch.testing.assert_close(f[:, 0], torch.full_like(f[:, 0], 16.0))
        torch.testing.assert_close(f[:, 1], torch.full_like(f[:, 1], -8.0))


def test_flow_decoder_reads_a_shift_from_its_cost_volume_untrained() -> None:
    """With the soft-argmax readout added, a decoder whose predictions are zeroed and whose
    pyramid convolutions pass their input through outputs the matching of its cost volumes:
    the shift, coarse to fine, before any training."""
    torch.manual_seed(0)
    dec = FlowDecoder(replace(TINY_FLOW, channels=(16, 16, 16, 16)), in_channels=16)
    with torch.no_grad():
        for conv in dec.pyramid.modules():
            if isinstance(conv, nn.Conv2d):  # identity kernels (stride 2: subsampling)
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[torch.arange(16), torch.arange(16), 1, 1] = 1.0
        for est in dec.estimators:
            est.predict.weight.zero_()
            est.predict.bias.zero_()
        dec.context[-1].weight.zero_()
        dec.context[-1].bias.zero_()
    g = torch.Generator().manual_seed(2)
    base = F.avg_pool2d(torch.randn(1, 16, 48, 64, generator=g), 3, 1, 1).relu()
    key = [base, F.avg_pool2d(base, 2)]
    shifted = torch.roll(base, shifts=(0, 2), dims=(2, 3))  # key(x) = ref(x + 2 cells = 8 px)
    ref = [shifted, F.avg_pool2d(shifted, 2)]
    with torch.no_grad():
        flow = dec(key, ref)[0][:, :, 4:-4, 4:-4]
    assert abs(flow[:, 0].median().item() - 8.0) < 1.5, flow[:, 0].median()
    assert abs(flow[:, 1].median().item()) < 1.5, flow[:, 1].median()


def test_flow_decoder_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    dec = FlowDecoder(TINY_FLOW, in_channels=3)
    key, ref = smooth_texture(0)[..., 8:72, 8:72], smooth_texture(1)[..., 8:72, 8:72]
    out = FlowLoss(FlowLossConfig())(dec(pooled_features(key), pooled_features(ref)), key, ref)
    (out["census"] + out["smooth"]).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_flow_decoder_learns_a_shift_with_the_census_loss() -> None:
    """A tiny decoder trained unsupervised on one pair moves its flow to the true shift."""
    torch.manual_seed(0)
    base = smooth_texture(3)
    key, ref = base[..., 8:72, 8:72], base[..., 8:72, 4:68]  # key(x, y) = ref(x + 4, y)
    dec = FlowDecoder(TINY_FLOW, in_channels=3)
    loss = FlowLoss(FlowLossConfig())
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(25):
        out = loss(dec(pooled_features(key), pooled_features(ref)), key, ref)
        opt.zero_grad()
        (out["census"] + out["smooth"]).backward()
        opt.step()
    with torch.no_grad():
        flow = dec(pooled_features(key), pooled_features(ref))[0]
    dx, dy = flow[:, 0, 1:-1, 1:-2].mean().item(), flow[:, 1, 1:-1, 1:-2].mean().item()
    assert 2.5 < dx < 6.0, (dx, dy)
    assert abs(dy) < 1.0, (dx, dy)


def test_flow_config_validation() -> None:
    with pytest.raises(ValueError, match="channels"):
        FlowConfig(channels=(8, 8, 8), levels=4)
    with pytest.raises(ValueError, match="levels"):
        FlowConfig(channels=(8,), levels=1)
    with pytest.raises(ValueError, match="cost_norm"):
        FlowConfig(cost_norm="l2")
    with pytest.raises(ValueError, match="readout_add"):
        FlowConfig(readout_temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Flow loss
# ---------------------------------------------------------------------------------------------


def _const_flow(dx: float, dy: float = 0.0, h: int = 16, w: int = 16) -> Tensor:
    f = torch.zeros(1, 2, h, w)
    f[:, 0], f[:, 1] = dx, dy
    return f


def test_census_is_minimal_at_the_true_flow() -> None:
    loss = FlowLoss(FlowLossConfig())
    img = smooth_texture(0)[..., 8:72, 8:72]
    same = loss([_const_flow(0.0)], img, img)["census"]
    assert same.item() == pytest.approx(CENSUS_FLOOR, rel=1e-4)
    assert loss([_const_flow(3.0)], img, img)["census"] > 5 * same
    base = smooth_texture(1)
    key, ref = base[..., 8:72, 8:72], base[..., 8:72, 4:68]  # key(x, y) = ref(x + 4, y)
    right = loss([_const_flow(4.0)], key, ref)["census"]
    assert right < 0.5 * loss([_const_flow(0.0)], key, ref)["census"]
    assert right < 0.5 * loss([_const_flow(-4.0)], key, ref)["census"]


def test_smoothness_is_second_order_and_edge_aware() -> None:
    loss = FlowLoss(FlowLossConfig())
    img = torch.zeros(1, 3, 64, 64)  # flat: edge weights are 1 everywhere
    floor = 4.0 * 1e-3  # smooth_weight · sqrt(0 + 1e-6)
    xs = torch.arange(16.0)
    linear = torch.zeros(1, 2, 16, 16)
    linear[:, 0] = 0.5 * xs
    quadratic = torch.zeros(1, 2, 16, 16)
    quadratic[:, 1] = 0.2 * xs.view(16, 1) ** 2
    assert loss([_const_flow(3.0, -2.0)], img, img)["smooth"].item() <= floor + 1e-6
    assert loss([linear], img, img)["smooth"].item() <= floor + 1e-5  # second order: no penalty
    # Golden value, in level (stride-4) pixels: d²/dy² of 0.2·y² image px is 0.4 / 4 = 0.1;
    # mean over (y: [0.1, ~0], x: [~0, ~0]) terms, times λ_smooth = 4.
    expected = 4.0 * 0.5 * ((math.sqrt(0.1**2 + 1e-6) + 1e-3) / 2 + 1e-3)
    assert loss([quadratic], img, img)["smooth"].item() == pytest.approx(expected, rel=1e-5)
    # A kink in the flow at column 8 (stride 4: image column 32) costs less on an image edge.
    kink = torch.zeros(1, 2, 16, 16)
    kink[:, 0] = 8.0 * (xs - 8).clamp(min=0)
    flat = torch.zeros(1, 3, 64, 64)
    edge = flat.clone()
    edge[..., 32:] = 1.0
    on_flat = loss([kink], flat, flat)["smooth"]
    on_edge = loss([kink], edge, edge)["smooth"]
    assert on_flat > 10 * floor
    assert on_edge < 0.2 * on_flat


def test_census_masks_occlusions_with_the_range_map() -> None:
    """An object (columns 16..31) moves 16 px right over a static background: the background
    at 32..47 is occluded in the reference frame and 16..31 is disoccluded in it."""
    bg = smooth_texture(0)[..., 8:72, 8:72]
    obj = 2.0 * smooth_texture(5)[..., 8:72, 8:72]
    key, ref = bg.clone(), bg.clone()
    key[..., 16:32] = obj[..., 16:32]
    ref[..., 32:48] = obj[..., 16:32]
    fw = torch.zeros(1, 2, 64, 64)  # full resolution, so upsampling leaves the flow exact
    fw[:, 0, :, 16:32] = 16.0
    bw = torch.zeros(1, 2, 64, 64)
    bw[:, 0, :, 32:48] = -16.0
    masked = FlowLoss(FlowLossConfig())
    unmasked = FlowLoss(FlowLossConfig(occlusion_thr=0.0, collision_thr=1e9))
    reference = unmasked([fw], key, ref, backward_flows=[bw])["census"]
    assert masked([fw], key, ref, backward_flows=[bw])["census"] < 0.4 * reference  # range map
    assert masked([fw], key, ref)["census"] < 0.4 * unmasked([fw], key, ref)["census"]  # fallback


@pytest.mark.parametrize("with_backward", [False, True])
def test_flow_loss_finite_on_constant_images(with_backward: bool) -> None:
    loss = FlowLoss(FlowLossConfig())
    img = torch.zeros(2, 3, 32, 32)
    flows = [torch.randn(2, 2, 8, 8, requires_grad=True), torch.randn(2, 2, 4, 4)]
    back = [torch.randn(2, 2, 8, 8, requires_grad=True), torch.randn(2, 2, 4, 4)] if with_backward else None
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[:, 24:] = False
    out = loss(flows, img, img, valid=valid, backward_flows=back)
    assert set(out) == {"census", "smooth"}
    total = out["census"] + out["smooth"]
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(flows[0].grad).all() and flows[0].grad.abs().sum() > 0
    if back is not None:
        assert torch.isfinite(back[0].grad).all()


def test_flow_loss_weights_scale_the_terms() -> None:
    img = smooth_texture(0)[..., 8:72, 8:72]
    flow = [torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))]
    one = FlowLoss(FlowLossConfig(census_weight=1.0, smooth_weight=1.0))(flow, img, img)
    default = FlowLoss(FlowLossConfig())(flow, img, img)
    torch.testing.assert_close(default["smooth"], 4.0 * one["smooth"])
    torch.testing.assert_close(default["census"], one["census"])


# ---------------------------------------------------------------------------------------------
# QDTrack head
# ---------------------------------------------------------------------------------------------


def _features(
    channels: int, size: int = 64, strides: tuple[int, ...] = (4, 8, 16, 32), batch: int = 2, seed: int = 0
) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, size // s, size // s, generator=g) for s in strides]


def test_qdtrack_head_default_parameter_count_and_shapes() -> None:
    head = QDTrackHead(QDTrackConfig(), in_channels=256, strides=(4, 8, 16, 32))
    expected = 4 * (256 * 256 * 9 + 256 + 512) + (256 * 49 * 1024 + 1024) + (1024 * 256 + 256)
    assert sum(p.numel() for p in head.parameters()) == expected
    assert abs(expected / 1e6 - 15.4) < 0.1  # Table 13: MOT 56.6 M - detection 41.2 M
    feats = _features(256)
    boxes = [
        torch.tensor([[2.0, 3.0, 20.0, 30.0], [0.0, 0.0, 64.0, 64.0], [5.0, 5.0, 9.0, 9.0]]),
        torch.zeros((0, 4)),
    ]
    with torch.no_grad():
        out = head(feats, boxes, [(64, 64), (64, 64)])
    assert [tuple(o.shape) for o in out] == [(3, 256), (0, 256)]
    assert torch.isfinite(out[0]).all()


def test_qdtrack_head_keeps_box_order_across_levels_and_images() -> None:
    head = _tiny_head()
    feats = _features(8, size=128, strides=(4, 8))
    boxes = [
        torch.tensor([[0.0, 0.0, 120.0, 120.0], [3.0, 4.0, 20.0, 30.0], [60.0, 10.0, 70.0, 90.0]]),
        torch.tensor([[5.0, 5.0, 125.0, 120.0], [1.0, 2.0, 9.0, 12.0]]),
    ]
    assert head._levels(torch.cat(boxes)).tolist() == [1, 0, 0, 1, 0]  # mixed levels
    with torch.no_grad():
        out = head(feats, boxes, [(128, 128)] * 2)
        for i, b in enumerate(boxes):
            for j in range(b.shape[0]):
                alone = head([f[i : i + 1] for f in feats], [b[j : j + 1]], [(128, 128)])[0]
                torch.testing.assert_close(out[i][j : j + 1], alone)


def _tiny_head(in_channels: int = 8) -> QDTrackHead:
    cfg = QDTrackConfig(conv_channels=16, num_groups=4, num_convs=2, fc_channels=32, embed_channels=16)
    return QDTrackHead(cfg, in_channels=in_channels, strides=(4, 8))


def test_qdtrack_head_routes_boxes_to_levels() -> None:
    head = _tiny_head()
    small = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # sqrt(area) 20 -> stride 4 (clamped)
    large = torch.tensor([[0.0, 0.0, 200.0, 200.0]])  # sqrt(area) 200 -> stride 16 -> clamped to 8
    assert head._levels(small).tolist() == [0]
    assert head._levels(large).tolist() == [1]
    mid = torch.tensor([[0.0, 0.0, 112.0, 112.0]])  # exactly the stride-8 scale
    assert head._levels(mid).tolist() == [1]


# ---------------------------------------------------------------------------------------------
# QDTrack loss
# ---------------------------------------------------------------------------------------------

KEY_GT = torch.tensor([[4.0, 4.0, 24.0, 28.0], [30.0, 6.0, 50.0, 30.0], [10.0, 36.0, 34.0, 60.0]])
REF_GT = KEY_GT + torch.tensor([2.0, 1.0, 2.0, 1.0])


def _targets(boxes: Tensor, ids: list[int], ignore: list[bool] | None = None) -> FrameTargets:
    n = boxes.shape[0]
    return FrameTargets(
        boxes=boxes,
        classes=torch.zeros(n, dtype=torch.long),
        ignore=torch.tensor(ignore if ignore is not None else [False] * n, dtype=torch.bool),
        track_ids=torch.tensor(ids, dtype=torch.long),
    )


def _proposals(gt: Tensor, seed: int, n_random: int = 40) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    jitter = gt.repeat(4, 1) + torch.randn(4 * gt.shape[0], 4, generator=g)
    xy = torch.rand(n_random, 2, generator=g) * 48
    wh = torch.rand(n_random, 2, generator=g) * 14 + 2
    return torch.cat([jitter, torch.cat([xy, xy + wh], 1)])


def _pair(batch: int = 2):
    key_t = [_targets(KEY_GT, [1, 2, 3]) for _ in range(batch)]
    ref_t = [_targets(REF_GT, [1, 2, 4]) for _ in range(batch)]  # id 3 left, id 4 entered
    key_p = [_proposals(KEY_GT, i) for i in range(batch)]
    ref_p = [_proposals(REF_GT, 10 + i) for i in range(batch)]
    return key_p, ref_p, key_t, ref_t, [(64, 64)] * batch


def test_qdtrack_loss_finite_seedable_and_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    head = _tiny_head()
    loss = QDTrackLoss()
    key_p, ref_p, key_t, ref_t, sizes = _pair()
    kf, rf = _features(8, strides=(4, 8), seed=1), _features(8, strides=(4, 8), seed=2)
    out = loss(head, kf, rf, key_p, ref_p, key_t, ref_t, sizes, generator=torch.Generator().manual_seed(7))
    assert set(out) == {"embed", "aux"}
    assert torch.isfinite(out["embed"]) and torch.isfinite(out["aux"])
    assert out["embed"] > 0 and out["aux"] > 0
    (out["embed"] + out["aux"]).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    again = loss(head, kf, rf, key_p, ref_p, key_t, ref_t, sizes, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again["embed"], out["embed"])
    torch.testing.assert_close(again["aux"], out["aux"])


@pytest.mark.parametrize("case", ["no_gt", "all_ignored", "no_proposals_no_ids"])
def test_qdtrack_loss_without_positives_is_zero_and_connected(case: str) -> None:
    head = _tiny_head()
    key_p, ref_p, key_t, ref_t, sizes = _pair()
    if case == "no_gt":
        key_t = [FrameTargets() for _ in key_t]
        ref_t = [FrameTargets() for _ in ref_t]
    elif case == "all_ignored":
        key_t = [_targets(KEY_GT, [1, 2, 3], [True, True, True]) for _ in key_t]
    else:
        key_p = [torch.zeros((0, 4)) for _ in key_p]
        key_t = [_targets(KEY_GT, [-1, -1, -1]) for _ in key_t]  # boxes without track ids
    kf, rf = _features(8, strides=(4, 8), seed=1), _features(8, strides=(4, 8), seed=2)
    out = QDTrackLoss()(head, kf, rf, key_p, ref_p, key_t, ref_t, sizes)
    for v in out.values():
        assert v.item() == 0.0 and v.requires_grad
    (out["embed"] + out["aux"]).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0, name


class _OracleHead(nn.Module):
    """Embeds a box by the track id of the gt it overlaps (IoU ≥ 0.5), background otherwise.

    ``features[0][0, 0, 0, 0]`` tells the frame (0 key, 1 ref); ``ref_perm`` relabels the
    reference ids to make a wrong association; ``random`` gives seeded random embeddings.
    """

    def __init__(self, ref_perm: dict[int, int] | None = None, random: bool = False) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.ref_perm = ref_perm or {}
        self.random = random
        self.gen = torch.Generator().manual_seed(0)

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        frame = int(features[0][0, 0, 0, 0])
        gt, ids = (KEY_GT, [1, 2, 3]) if frame == 0 else (REF_GT, [1, 2, 4])
        out = []
        for b in boxes:
            if self.random:
                out.append(5.0 * torch.randn(b.shape[0], 8, generator=self.gen) + self.anchor)
                continue
            emb = torch.zeros(b.shape[0], 8)
            if b.shape[0]:
                iou, j = box_iou(b, gt).max(1)
                for r in range(b.shape[0]):
                    tid = ids[int(j[r])] if iou[r] >= 0.5 else 0
                    if frame == 1:
                        tid = self.ref_perm.get(tid, tid)
                    emb[r, tid] = 5.0
            out.append(emb + self.anchor)
        return out


def test_qdtrack_loss_prefers_identity_consistent_embeddings() -> None:
    key_p, ref_p, key_t, ref_t, sizes = _pair()
    kf = [torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 8, 8)]
    rf = [torch.ones(2, 1, 16, 16), torch.ones(2, 1, 8, 8)]
    loss = QDTrackLoss()

    def run(head: nn.Module) -> dict[str, Tensor]:
        return loss(head, kf, rf, key_p, ref_p, key_t, ref_t, sizes, generator=torch.Generator().manual_seed(3))

    oracle, swapped, rand = run(_OracleHead()), run(_OracleHead(ref_perm={1: 2, 2: 1})), run(_OracleHead(random=True))
    assert oracle["embed"] < 1e-3 and oracle["aux"] < 1e-6
    assert swapped["embed"] > 1.0 and swapped["aux"] > 0.1
    assert rand["embed"] > 10 * oracle["embed"] and rand["aux"] > 10 * oracle["aux"] + 1e-3


class _SpyHead(nn.Module):
    """Records the boxes it is asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls: list[list[Tensor]] = []

    def forward(
        self, features: list[Tensor], boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        self.calls.append(boxes)
        return [self.w * torch.ones(b.shape[0], 4) for b in boxes]


def test_qdtrack_sampling_budget_and_ignored_gt() -> None:
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    many = gt.repeat(300, 1) + 0.1 * torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    bg = torch.tensor([[100.0, 100.0, 120.0, 120.0]]).repeat(500, 1)
    half = torch.tensor([[10.0, 10.0, 50.0, 30.0]]).repeat(200, 1)  # IoU 0.5: neither pos nor neg
    proposals = [torch.cat([many, bg, half])]
    spy = _SpyHead()
    cfg = QDTrackLossConfig()
    QDTrackLoss(cfg)(spy, [torch.zeros(1)], [torch.zeros(1)], proposals, proposals,
                     [_targets(gt, [5])], [_targets(gt, [5])], [(128, 128)])
    key_boxes, ref_boxes = spy.calls[0][0], spy.calls[1][0]
    assert key_boxes.shape[0] == int(cfg.num_samples * cfg.pos_fraction)  # key: positives only
    assert ref_boxes.shape[0] == cfg.num_samples  # ref: positives and negatives
    iou = box_iou(ref_boxes, gt)[:, 0]
    assert int((iou >= cfg.pos_iou_thr).sum()) == 128 and not bool(((iou >= 0.3) & (iou < 0.7)).any())
    spy.calls.clear()
    QDTrackLoss(cfg)(spy, [torch.zeros(1)], [torch.zeros(1)], proposals, proposals,
                     [_targets(gt, [5], [True])], [_targets(gt, [5], [True])], [(128, 128)])
    assert spy.calls[0][0].shape[0] == 0  # an ignored gt gives no positives
    assert spy.calls[1][0].shape[0] == cfg.num_samples  # and its overlapping RoIs are no negatives
    assert bool((spy.calls[1][0][:, 0] >= 99).all())


def test_heads_and_losses_under_cpu_autocast() -> None:
    """bf16 autocast (the CPU stand-in for the trainer's CUDA autocast): losses stay fp32, finite."""
    torch.manual_seed(0)
    dec, head = FlowDecoder(TINY_FLOW, in_channels=8), _tiny_head()
    key_p, ref_p, key_t, ref_t, sizes = _pair()
    kf, rf = _features(8, strides=(4, 8), seed=1), _features(8, strides=(4, 8), seed=2)
    img = smooth_texture(0)[..., 8:72, 8:72].expand(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flows = dec(kf, rf)
        out = FlowLoss(FlowLossConfig())(flows, img, img)
        out |= QDTrackLoss()(head, kf, rf, key_p, ref_p, key_t, ref_t, sizes)
    assert all(f.dtype == torch.float32 for f in flows)
    for name, v in out.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), name
    sum(out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in [*dec.parameters(), *head.parameters()])


# ---------------------------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------------------------

D = 16


def _emb(i: int) -> Tensor:
    e = torch.zeros(D)
    e[i] = 8.0
    return e


def _frame(objs: list[tuple[int, float, float, float, int]], noise_seed: int = 0):
    """objs: (embedding index, x, y, score, class) -> update() inputs (20×30 boxes)."""
    g = torch.Generator().manual_seed(noise_seed)
    boxes = torch.tensor([[x, y, x + 20.0, y + 30.0] for _, x, y, _, _ in objs]).reshape(-1, 4)
    scores = torch.tensor([s for _, _, _, s, _ in objs])
    classes = torch.tensor([c for *_, c in objs], dtype=torch.long)
    emb = torch.stack([_emb(e) for e, *_ in objs]) if objs else torch.zeros(0, D)
    emb = emb + 0.3 * torch.randn(emb.shape, generator=g)
    return boxes, scores, classes, emb


def _ids_by_embedding(res, objs) -> dict[int, int]:
    """Map embedding index -> track id using the returned input indices."""
    return {objs[int(i)][0]: int(t) for i, t in zip(res.indices, res.track_ids)}


def test_tracker_keeps_ids_of_moving_objects_and_assigns_new_ones() -> None:
    tracker = QDTracker(TrackerConfig())
    seen: dict[int, set[int]] = {}
    for f in range(5):
        objs = [(0, 5.0 + 4 * f, 10.0, 0.9, 2), (1, 100.0 - 4 * f, 40.0, 0.85, 2)]
        if f >= 2:
            objs.append((2, 60.0, 90.0, 0.95, 0))
        if f % 2:
            objs = objs[::-1]  # input order must not matter
        res = tracker.update(f, *_frame(objs, noise_seed=f))
        assert res.track_ids.dtype == torch.int64 and res.masks is None
        for e, t in _ids_by_embedding(res, objs).items():
            seen.setdefault(e, set()).add(t)
    assert seen == {0: {0}, 1: {1}, 2: {2}}


def test_tracker_drops_tracks_after_memo_frames() -> None:
    cfg = TrackerConfig(memo_frames=3)
    for gap, same in ((3, True), (4, False)):
        tracker = QDTracker(cfg)
        first = tracker.update(0, *_frame([(0, 10.0, 10.0, 0.9, 1), (1, 80.0, 10.0, 0.9, 1)]))
        a_id = _ids_by_embedding(first, [(0,), (1,)])[0]
        for f in range(1, gap):
            tracker.update(f, *_frame([(1, 80.0, 10.0, 0.9, 1)], noise_seed=f))
        back = tracker.update(gap, *_frame([(0, 10.0, 10.0, 0.9, 1), (1, 80.0, 10.0, 0.9, 1)], noise_seed=9))
        ids = _ids_by_embedding(back, [(0,), (1,)])
        assert (ids[0] == a_id) is same, (gap, ids, a_id)
        assert ids[1] == _ids_by_embedding(first, [(0,), (1,)])[1]


def test_tracker_low_scores_do_not_start_but_do_continue_tracks() -> None:
    tracker = QDTracker(TrackerConfig())
    res = tracker.update(0, *_frame([(0, 10.0, 10.0, 0.9, 0), (1, 80.0, 10.0, 0.5, 0)]))
    assert res.track_ids.tolist() == [0]  # 0.5 < init_score_thr 0.7: no track, dropped
    res = tracker.update(1, *_frame([(0, 12.0, 10.0, 0.5, 0), (1, 80.0, 10.0, 0.5, 0)], noise_seed=1))
    assert _ids_by_embedding(res, [(0,), (1,)]) == {0: 0}  # 0.5 > obj_score_thr 0.3 continues
    res = tracker.update(2, *_frame([(0, 14.0, 10.0, 0.2, 0)], noise_seed=2))
    assert len(res) == 0  # below obj_score_thr: never reported


def test_tracker_respects_classes() -> None:
    for with_cats, expected in ((True, 1), (False, 0)):
        tracker = QDTracker(TrackerConfig(with_cats=with_cats))
        tracker.update(0, *_frame([(0, 10.0, 10.0, 0.9, 3)]))
        res = tracker.update(1, *_frame([(0, 10.0, 10.0, 0.9, 4)], noise_seed=1))
        assert res.track_ids.tolist() == [expected]
        assert res.classes.tolist() == [4]


def test_tracker_removes_cross_class_duplicates_and_passes_masks() -> None:
    tracker = QDTracker(TrackerConfig())
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [11.0, 10.0, 31.0, 40.0], [60.0, 10.0, 80.0, 40.0]])
    scores = torch.tensor([0.8, 0.9, 0.75])
    classes = torch.tensor([0, 1, 2])
    emb = torch.stack([_emb(0), _emb(1), _emb(2)])
    masks = torch.arange(3, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).clone()
    res = tracker.update(0, boxes, scores, classes, emb, masks=masks)
    assert res.indices.tolist() == [1, 2]  # score order; box 0 duplicates the better box 1
    assert res.track_ids.tolist() == [0, 1]
    assert torch.equal(res.masks, masks[res.indices])
    res2 = tracker.update(1, boxes[[2, 1]], scores[[2, 1]], classes[[2, 1]], emb[[2, 1]], masks=masks[[2, 1]])
    assert dict(zip(res2.masks[:, 0, 0].tolist(), res2.track_ids.tolist())) == {1: 0, 2: 1}


def test_tracker_gives_a_track_to_one_detection_only() -> None:
    tracker = QDTracker()
    tracker.update(0, *_frame([(0, 10.0, 10.0, 0.9, 0)]))
    # Two look-alikes far apart: both match track 0 (bi-softmax 0.75); the better one keeps it.
    res = tracker.update(1, *_frame([(0, 12.0, 10.0, 0.8, 0), (0, 90.0, 60.0, 0.95, 0)], noise_seed=1))
    assert dict(zip(res.indices.tolist(), res.track_ids.tolist())) == {1: 0, 0: 1}


def test_tracker_embedding_momentum_weights_the_new_observation() -> None:
    tracker = QDTracker(TrackerConfig(momentum=0.8))
    box, score, cls = torch.tensor([[10.0, 10.0, 30.0, 40.0]]), torch.tensor([0.9]), torch.tensor([1])
    old, new = _emb(0), _emb(0) + _emb(1)
    tracker.update(0, box, score, cls, old[None])
    res = tracker.update(1, box + 2, score, cls, new[None])
    assert res.track_ids.tolist() == [0]
    torch.testing.assert_close(tracker._tracks[0].embed, 0.2 * old + 0.8 * new)  # QDTrack convention


def test_tracker_handles_empty_frames() -> None:
    tracker = QDTracker()
    tracker.update(0, *_frame([(0, 10.0, 10.0, 0.9, 0)]))
    empty = tracker.update(1, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, D))
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    res = tracker.update(2, *_frame([(0, 12.0, 10.0, 0.9, 0)], noise_seed=2))
    assert res.track_ids.tolist() == [0]


def test_tracker_is_deterministic_and_resets() -> None:
    def run(tracker: QDTracker) -> list[list[int]]:
        out = []
        for f in range(4):
            objs = [(e, 10.0 + 30 * e + f, 5.0, 0.9 - 0.01 * e, 0) for e in range(5)]
            out.append(tracker.update(f, *_frame(objs, noise_seed=f)).track_ids.tolist())
        return out

    tracker = QDTracker()
    first = run(tracker)
    tracker.reset()
    assert run(tracker) == first
    with pytest.raises(ValueError, match="frame_index"):
        tracker.update(2, *_frame([(0, 1.0, 1.0, 0.9, 0)]))


def test_multi_positive_ce_accepts_fp16_dots_and_matches_fp32():
    """Under fp16 autocast the embedding dot products arrive in half precision; the loss must
    not overflow its masking value and must equal the fp32 computation."""
    from vtd_train.model.track_head import QDTrackLoss

    g = torch.Generator().manual_seed(0)
    dots = torch.randn(4, 6, generator=g) * 3
    pos = torch.zeros(4, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 2] = pos[1, 3] = pos[3, 0] = True  # row 2 has no positive
    half = QDTrackLoss._multi_pos_ce(dots.half(), pos)
    full = QDTrackLoss._multi_pos_ce(dots.half().float(), pos)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert torch.allclose(half, full)
