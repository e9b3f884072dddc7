"""Golden losses: the first training steps of a seeded tiny VTDNet, pinned.

A change that silently alters a target encoding, a loss, a sampler or the data (synthetic
frames, converter, loader, augmentation) moves these numbers; one that does not, leaves them
within float noise. If a change is *meant* to move them, check the new values by hand as below
and record them with the reason in the commit.

How the recorded values were checked: the step-0 terms sit where an untrained network's
near-uniform outputs put them — tag cross entropies at λ·ln 7 (λ = 0.05), RPN objectness at
ln 2, the box classifier near λ·ln 9 (9 classes, λ = 2), semantic / drivable cross entropies
near ln 19 / ln 3, box regression terms small (zero-initialised deltas), the QDTrack embedding
loss near its value for random embeddings, the heatmap MSE near λ·πσ²/28² (a zero heatmap
against Gaussian targets, λ = 800, σ = 1.5) — and they fall at the next step of the same set.
Those checks are asserted too, so the golden numbers cannot drift into nonsense unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.loader import LoaderConfig, MultiSetDataset, build_train_loader
from data_pipeline.manifest import families_from_manifest
from data_pipeline.transforms import AugmentConfig, prepare_batch
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig
from vtd_train.train.amp import Precision
from vtd_train.train.config import OptimizerConfig
from vtd_train.train.grad_sync import GradSync, mutable_buffers
from vtd_train.train.optim import build_optimizer, freeze
from vtd_train.train.step import TrainStep

CPU = torch.device("cpu")

# Recorded from this test's run on 2026-12-05 (2 CPU threads), checked as the docstring says.
# The steps until each of the det, seg and track sets gave two batches (loader's round-robin order).
GOLDEN: list[dict[str, float]] = [
    {
        'loss/rpn/cls': 0.69698566198349,
        'loss/rpn/box': 0.024056481197476387,
        'loss/mot/cls': 2.1710197925567627,
        'loss/mot/box': 0.046225957572460175,
        'loss/mots/mask': 2.4640820026397705,
        'loss/flow/census': 3.5357141494750977,
        'loss/flow/smooth': 0.006888790056109428,
        'loss/mot/embed': 0.8655728101730347,
        'loss/mot/aux': 0.19790662825107574,
    },
    {
        'loss/tag/weather': 0.0922505185008049,
        'loss/tag/scene': 0.09338953346014023,
        'loss/drivable/ce': 1.3849921226501465,
        'loss/lane/direction': 1.9609453678131104,
        'loss/lane/style': 1.9509093761444092,
        'loss/lane/category': 4.492803573608398,
        'loss/rpn/cls': 0.7026059627532959,
        'loss/rpn/box': 0.3500271141529083,
        'loss/det/cls': 4.425559043884277,
        'loss/det/box': 0.0007654062937945127,
        'loss/pose/heatmap': 6.950511932373047,
    },
    {
        'loss/rpn/cls': 0.675869345664978,
        'loss/rpn/box': 0.03414731100201607,
        'loss/mot/cls': 1.781105399131775,
        'loss/mot/box': 0.0004789693048223853,
        'loss/mots/mask': 24.294878005981445,
        'loss/flow/census': 3.5359771251678467,
        'loss/flow/smooth': 0.011571262031793594,
        'loss/mot/embed': 0.8661986589431763,
        'loss/mot/aux': 0.3593938946723938,
    },
    {
        'loss/sem/ce': 3.0385348796844482,
        'loss/rpn/cls': 0.6621054410934448,
        'loss/rpn/box': 0.09228857606649399,
        'loss/ins/cls': 3.3277506828308105,
        'loss/ins/box': 0.2767540216445923,
        'loss/ins/mask': 3.2017734050750732,
    },
    {
        'loss/tag/weather': 0.15372860431671143,
        'loss/tag/scene': 0.1285983771085739,
        'loss/drivable/ce': 1.263271689414978,
        'loss/lane/direction': 1.872074842453003,
        'loss/lane/style': 1.9150967597961426,
        'loss/lane/category': 4.56399393081665,
        'loss/rpn/cls': 0.6492013931274414,
        'loss/rpn/box': 0.07325693219900131,
        'loss/det/cls': 2.8468236923217773,
        'loss/det/box': 0.03291896730661392,
        'loss/pose/heatmap': 7.605276107788086,
    },
    {
        'loss/rpn/cls': 0.6020729541778564,
        'loss/rpn/box': 0.004621184431016445,
        'loss/mot/cls': 0.7955737709999084,
        'loss/mot/box': 0.001511767623014748,
        'loss/flow/census': 3.412627935409546,
        'loss/flow/smooth': 0.008163582533597946,
        'loss/mot/embed': 0.8660925626754761,
        'loss/mot/aux': 0.3340306282043457,
    },
    {
        'loss/rpn/cls': 0.5542722344398499,
        'loss/rpn/box': 0.0024244580417871475,
        'loss/mot/cls': 0.3465330898761749,
        'loss/mot/box': 0.003421270288527012,
        'loss/flow/census': 3.386639356613159,
        'loss/flow/smooth': 0.007908914238214493,
        'loss/mot/embed': 0.8662947416305542,
        'loss/mot/aux': 0.21502666175365448,
    },
    {
        'loss/tag/weather': 0.1591482162475586,
        'loss/tag/scene': 0.13520987331867218,
        'loss/drivable/ce': 1.2080414295196533,
        'loss/lane/direction': 1.8540284633636475,
        'loss/lane/style': 1.9383898973464966,
        'loss/lane/category': 4.511056900024414,
        'loss/rpn/cls': 0.4854138493537903,
        'loss/rpn/box': 0.03478280082345009,
        'loss/det/cls': 0.9833354949951172,
        'loss/det/box': 0.061616331338882446,
    },
    {
        'loss/rpn/cls': 0.45212337374687195,
        'loss/rpn/box': 0.03627806529402733,
        'loss/mot/cls': 1.3287469148635864,
        'loss/mot/box': 0.4034612476825714,
        'loss/mots/mask': 4.405709743499756,
        'loss/flow/census': 3.719841957092285,
        'loss/flow/smooth': 0.00549814198166132,
        'loss/mot/embed': 0.8663877248764038,
        'loss/mot/aux': 0.3378681540489197,
    },
    {
        'loss/sem/ce': 2.7992420196533203,
        'loss/rpn/cls': 0.3872472047805786,
        'loss/rpn/box': 0.0464705154299736,
        'loss/ins/cls': 2.476749897003174,
        'loss/ins/box': 0.45804381370544434,
        'loss/ins/mask': 3.015223741531372,
    },
]


def first_steps(shards: str, per_set: int) -> list[tuple[str, dict[str, float]]]:
    """Train until every set has given ``per_set`` batches; ``[(set, losses)]`` of every step."""
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny())
    params = freeze(model, ())
    optimizer, _ = build_optimizer(params, OptimizerConfig(lr=1e-3, weight_decay=1e-4), CPU)
    step_fn = TrainStep(model, optimizer, Precision("fp32", CPU), GradSync(params, buffers=mutable_buffers(model)))
    cfg = LoaderConfig(batch_size=2, num_workers=0, seed=0, augment=AugmentConfig(scales=(), flip_prob=0.0))
    dataset = MultiSetDataset(families_from_manifest(shards, "train"), cfg, rank=0, world_size=1)
    dataset.set_epoch(0)
    out = []
    model.train()
    for i, batch in enumerate(build_train_loader(dataset)):
        if all(sum(name == s for name, _ in out) >= per_set for s in ("det", "seg", "track")):
            break
        s = step_fn(prepare_batch(batch), step=i, lr=1e-3)
        assert s.reason is None
        out.append((batch.set_name, s.losses))
    return out


def untrained_losses(shards: str) -> dict[str, dict[str, float]]:
    """The seeded untrained model's loss terms on the first batch of each set (no update)."""
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny()).train()
    cfg = LoaderConfig(batch_size=2, num_workers=0, seed=0, augment=AugmentConfig(scales=(), flip_prob=0.0))
    dataset = MultiSetDataset(families_from_manifest(shards, "train"), cfg, rank=0, world_size=1)
    dataset.set_epoch(0)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for batch in build_train_loader(dataset):
            if batch.set_name not in out:
                out[batch.set_name] = {k: float(v) for k, v in model(prepare_batch(batch)).items()}
            if len(out) == 3:
                return out
    raise AssertionError(f"the loader gave batches of {sorted(out)} only")


def test_untrained_losses_are_where_uniform_outputs_put_them(tiny_shards):
    torch.set_num_threads(2)
    first = untrained_losses(tiny_shards)
    det, seg, track = first["det"], first["seg"], first["track"]
    # classifiers start near-uniform (weights N(0, 0.01)): λ · ln(classes); the tagging
    # classifier reads pooled C5 features whose norm is far from 1, so its logits are not as
    # close to zero as the RoI classifiers'
    assert det["loss/tag/weather"] == pytest.approx(0.05 * math.log(7), rel=0.25)
    assert det["loss/tag/scene"] == pytest.approx(0.05 * math.log(7), rel=0.25)
    assert det["loss/rpn/cls"] == pytest.approx(math.log(2), rel=0.02)
    assert det["loss/det/cls"] == pytest.approx(2 * math.log(9), rel=0.02)
    assert track["loss/mot/cls"] == pytest.approx(1 * math.log(9), rel=0.02)
    assert seg["loss/ins/cls"] == pytest.approx(2 * math.log(9), rel=0.02)
    # box deltas start near zero: the regression loss is what zero deltas cost, small
    assert det["loss/det/box"] < 2.0 and seg["loss/ins/box"] < 2.0
    # per-pixel heads with default conv init: cross entropies within a factor of ln(classes)
    assert math.log(3) * 0.7 < det["loss/drivable/ce"] < math.log(3) * 1.5
    assert math.log(19) * 0.7 < seg["loss/sem/ce"] < math.log(19) * 1.5
    # lane: three cross entropies (3 directions, 3 styles, 9 categories), λ = 2
    assert 2 * math.log(9) * 0.7 < det["loss/lane/category"] < 2 * math.log(9) * 1.5
    # a near-zero heatmap against Gaussian targets (σ = 1.5 px of 28): at most λ · πσ² / 28²
    assert 0 < det["loss/pose/heatmap"] <= 800 * math.pi * 1.5**2 / 28**2 * 1.05
    # QDTrack's multi-positive CE at random embeddings: λ · ln(1 + #negatives) at most
    assert 0 < track["loss/mot/embed"] < 0.25 * math.log(1 + 256)


def test_first_losses_match_the_recorded_run(tiny_shards):
    torch.set_num_threads(2)
    run = first_steps(tiny_shards, 2)
    by_set: dict[str, list[dict[str, float]]] = {}
    for name, losses in run:
        by_set.setdefault(name, []).append(losses)
    assert set(by_set) == {"det", "seg", "track"}

    # training moves the losses down: the second batch of a set scores lower than the first
    for name in ("det", "seg"):
        key = {"det": "loss/rpn/cls", "seg": "loss/sem/ce"}[name]
        assert by_set[name][1][key] < by_set[name][0][key], name

    if not GOLDEN:
        pytest.fail("no golden values recorded; this run gave:\n" + repr([losses for _, losses in run]))
    assert len(run) == len(GOLDEN)
    for i, ((name, losses), golden) in enumerate(zip(run, GOLDEN)):
        assert set(losses) == set(golden), f"step {i} ({name}): terms {sorted(losses)} vs {sorted(golden)}"
        for key, value in golden.items():
            assert losses[key] == pytest.approx(value, rel=2e-3, abs=1e-5), f"step {i} ({name}) {key}"
