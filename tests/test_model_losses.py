"""Golden losses: each loss module against a value computed independently by hand on a tiny
input (no value produced by the code under test is recorded)."""

from __future__ import annotations

import math

import pytest
import torch

from vtd_train.model.classification import TagLogits, TaggingLoss
from vtd_train.model.interaction import ObjectsFromPixels, PixelsFromObjects, CrossIBConfig, IntraIB, IntraIBConfig
from vtd_train.model.localization import (
    BoxHeadConfig,
    BoxTargets,
    KeypointLoss,
    RoISampler,
    RPNConfig,
    RPNLoss,
    RPNOutput,
    gaussian_heatmaps,
)
from vtd_train.model.losses import LossWeights, total_loss
from vtd_train.model.segmentation import SegLogits, SegLoss, stack_label_maps


def _ce(logits: list[float], target: int) -> float:
    """Cross entropy of one pixel, by hand: logsumexp − logit[target]."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_tagging_uniform_logits_give_log7():
    loss = TaggingLoss()(TagLogits(weather=torch.zeros(3, 7), scene=torch.zeros(3, 7)), torch.tensor([0, 3, -1]), torch.tensor([-1, -1, -1]))
    assert float(loss["weather"]) == pytest.approx(math.log(7))
    assert "scene" not in loss  # no labelled sample: no term


def test_lane_cross_entropy_weights_foreground_by_10():
    # one 2×2 map, 3 classes (0 = background); pixel (1, 1) is ignored
    px = {(0, 0): [2.0, 0.5, -1.0], (0, 1): [0.0, 1.0, 0.0], (1, 0): [0.3, -0.2, 0.8], (1, 1): [5.0, 5.0, 5.0]}
    tgt = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 255}
    logits = torch.zeros(1, 3, 2, 2)
    for (i, j), v in px.items():
        logits[0, :, i, j] = torch.tensor(v)
    target = torch.tensor([[[0, 1], [2, 255]]], dtype=torch.uint8)
    w = {0: 1.0, 1: 10.0, 2: 10.0}
    num = sum(w[tgt[p]] * _ce(px[p], tgt[p]) for p in px if tgt[p] != 255)
    den = sum(w[tgt[p]] for p in px if tgt[p] != 255)
    loss = SegLoss(("category",), foreground_weight=10.0)(SegLogits([logits]), target)
    assert float(loss["category"]) == pytest.approx(num / den, rel=1e-5)
    # without the weight: the plain mean over labelled pixels
    plain = SegLoss(("ce",))(SegLogits([logits]), target)
    assert float(plain["ce"]) == pytest.approx(sum(_ce(px[p], tgt[p]) for p in px if tgt[p] != 255) / 3, rel=1e-5)


def test_seg_loss_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 19, 2, 2, requires_grad=True)
    loss = SegLoss(("ce",))(SegLogits([logits]), torch.full((1, 2, 2), 255, dtype=torch.uint8))
    assert float(loss["ce"].detach()) == 0.0
    loss["ce"].backward()
    assert torch.isfinite(logits.grad).all()


def test_label_maps_are_padded_with_ignore():
    out = stack_label_maps([torch.ones(2, 3, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.uint8)], (3, 4))
    assert out.shape == (2, 3, 4) and int(out[0, 2, 0]) == 255 and int(out[0, 0, 3]) == 255 and int(out[0, 1, 2]) == 1


def test_gaussian_heatmap_targets_by_hand():
    sigma = 1.0
    rois = torch.tensor([[10.0, 20.0, 14.0, 24.0]])  # 4×4 px RoI, heatmap size 4: 1 px per cell
    kps = torch.tensor([[[12.0, 22.0, 2.0], [30.0, 22.0, 2.0], [11.5, 21.5, 0.0]]])  # centre, outside, unlabelled
    targets, weights = gaussian_heatmaps(kps, rois, 4, sigma)
    assert weights.tolist() == [[1.0, 0.0, 0.0]]
    # joint 0 at heatmap (u, v) = (2, 2); cell (i=1, j=1) has centre (1.5, 1.5): d² = 0.5
    assert float(targets[0, 0, 1, 1]) == pytest.approx(math.exp(-0.5 / 2))
    # cell (i=3, j=0): centre (x, y) = (0.5, 3.5), d² = 1.5² + 1.5²
    assert float(targets[0, 0, 3, 0]) == pytest.approx(math.exp(-(1.5**2 + 1.5**2) / 2))
    # an off-centre keypoint: (u, v) = (0.5, 3.0); cell (i=2, j=1) centre (1.5, 2.5): d² = 1 + 0.25
    t2, _ = gaussian_heatmaps(torch.tensor([[[10.5, 23.0, 1.0]]]), rois, 4, sigma)
    assert float(t2[0, 0, 2, 1]) == pytest.approx(math.exp(-1.25 / 2))
    assert float(targets[0, 1].abs().sum()) == 0.0 and float(targets[0, 2].abs().sum()) == 0.0


def test_keypoint_mse_by_hand():
    pred = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]], [[9.0, 9.0], [9.0, 9.0]]]])  # [1, 2 joints, 2, 2]
    target = torch.tensor([[[[0.0, 1.0], [0.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]])
    weights = torch.tensor([[1.0, 0.0]])  # joint 1 unlabelled: contributes 0, stays in the mean
    expected = ((0.1 - 0) ** 2 + (0.2 - 1) ** 2 + (0.3 - 0) ** 2 + (0.4 - 0.5) ** 2) / 8
    assert float(KeypointLoss()(pred, target, weights)["heatmap"]) == pytest.approx(expected)


def test_rpn_loss_ignores_anchors_on_crowd_regions():
    # two anchors, no matchable ground truth, one ignore (crowd) box on anchor 0
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    out = RPNOutput(
        proposals=[anchors],
        scores=[torch.zeros(2)],
        objectness=torch.tensor([[5.0, 0.3]]),
        deltas=torch.zeros(1, 2, 4),
        anchors=[anchors],
    )
    tgt = BoxTargets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor([[0.0, 0.0, 10.0, 11.0]]))
    loss = RPNLoss(RPNConfig())(out, [0], [tgt])
    # only anchor 1 is sampled, as a negative: BCE(0.3, 0) = log(1 + e^0.3)
    assert float(loss["cls"]) == pytest.approx(math.log(1 + math.exp(0.3)))
    assert float(loss["box"]) == 0.0


def test_roi_sampler_skips_crowd_and_matches_gt():
    sampler = RoISampler(BoxHeadConfig(batch_size_per_image=16))
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [200.0, 0.0, 230.0, 30.0]])
    tgt = BoxTargets(
        boxes=torch.tensor([[0.0, 0.0, 10.0, 10.5]]),
        classes=torch.tensor([3]),
        ignore_boxes=torch.tensor([[100.0, 100.0, 110.0, 111.0]]),
    )
    rois = sampler([proposals], [tgt])
    kept = {tuple(b.tolist()): int(l) for b, l in zip(rois.boxes[0], rois.labels[0])}
    assert kept[(0.0, 0.0, 10.0, 10.0)] == 4  # class 3 + 1
    assert kept[(200.0, 0.0, 230.0, 30.0)] == 0  # background
    assert (100.0, 100.0, 110.0, 110.0) not in kept  # on a crowd region: neither fg nor bg
    assert (0.0, 0.0, 10.0, 10.5) in kept  # the GT box itself is a proposal


def test_loss_weights_table11_and_single_sum():
    w = LossWeights()
    expected = {
        "loss/tag/weather": 0.05, "loss/tag/scene": 0.05, "loss/sem/ce": 1.0, "loss/drivable/ce": 1.0,
        "loss/lane/style": 2.0, "loss/det/cls": 2.0, "loss/ins/mask": 2.0, "loss/pose/heatmap": 800.0,
        "loss/mot/box": 1.0, "loss/mot/embed": 1.0, "loss/flow/census": 1.0, "loss/rpn/cls": 1.0,
        "loss/mots/mask": 2.0,
    }
    for key, value in expected.items():
        assert w.weight(key) == value, key
    with pytest.raises(KeyError):
        w.weight("loss/nope/x")
    weighted = LossWeights(det=3.0).apply({"loss/det/cls": torch.tensor(2.0), "loss/tag/scene": torch.tensor(1.0)})
    assert float(weighted["loss/det/cls"]) == 6.0 and float(weighted["loss/tag/scene"]) == pytest.approx(0.05)
    assert float(total_loss(weighted)) == pytest.approx(6.05)
    with pytest.raises(ValueError):
        total_loss({})


def test_intra_ib_shapes_and_task_split():
    ib = IntraIB(IntraIBConfig(task_channels=4, num_heads=2, window_size=4), 8, ("sem", "lane"), windowed=True)
    x = torch.randn(2, 8, 10, 13)  # not a multiple of the window
    f = ib(x)
    assert f.shape == (2, 8, 10, 13)  # T·C' = 2·4
    assert ib.task_features(x, f, "lane").shape == x.shape
    loc = IntraIB(IntraIBConfig(task_channels=4, num_heads=2), 8, ("det", "ins", "pose"), windowed=False)
    r = torch.randn(5, 8, 7, 7)
    assert loc(r).shape == (5, 12, 7, 7) and loc(torch.zeros(0, 8, 7, 7)).shape == (0, 12, 7, 7)


def test_cross_ib_stays_within_each_image():
    torch.manual_seed(0)
    cfg = CrossIBConfig(channels=8, num_heads=2, pixel_downsample=2)
    p2o = PixelsFromObjects(cfg, 6, 4).eval()
    o2p = ObjectsFromPixels(cfg, 4, 6).eval()
    pixels = torch.randn(2, 6, 8, 8)
    objects = torch.randn(5, 4, 3, 3)
    index = torch.tensor([1, 0, 1, 1, 0])
    out = p2o(pixels, objects, index)
    # changing image 1's objects leaves image 0's pixels untouched
    objects2 = objects.clone()
    objects2[index == 1] += 1.0
    out2 = p2o(pixels, objects2, index)
    assert torch.allclose(out[0], out2[0]) and not torch.allclose(out[1], out2[1])
    # an image without objects is left unchanged
    only0 = p2o(pixels, objects[index == 0], torch.zeros(2, dtype=torch.int64))
    assert torch.equal(only0[1], pixels[1])
    # objects query their own image's pixels; results come back in input order
    tokens = o2p.pixel_tokens(pixels)
    res = o2p(objects, index, tokens)
    single = o2p(objects[2:3], torch.tensor([0]), tokens[1:2])
    assert res.shape == objects.shape and torch.allclose(res[2], single[0], atol=1e-6)
