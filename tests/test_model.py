"""VTDNet model tests, cheap to expensive: configs and parameter budgets (meta device), the
backbone shape contract and weight loading, then decoder contracts and inference on a tiny
model with 64×96 images.

Golden-loss tests live in ``test_model_losses.py``.
"""

from __future__ import annotations

import io
import time

import fsspec
import pytest
import torch

from data_pipeline.bdd100k.format import TASKS
from data_pipeline.errors import VTDInputError
from data_pipeline.loading.structures import TASK_INDEX, AugmentPlan, Batch, FrameTargets, LabelSource
from vtd_train.model import (
    BackboneConfig,
    FramePrediction,
    PretrainedWeightsError,
    VTDNet,
    VTDNetConfig,
    build_backbone,
    model_info,
    total_loss,
)

H, W = 64, 96

# ---------------------------------------------------------------------------------------------
# Synthetic batches
# ---------------------------------------------------------------------------------------------


def make_targets(g: torch.Generator, *, h: int = H, w: int = W, empty: bool = False) -> FrameTargets:
    """A frame labelled for every task; ``empty``: no objects and no people."""
    n = 0 if empty else 3
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0], [30.0, 10.0, 80.0, 60.0], [2.0, 30.0, 20.0, 60.0]])[:n]
    instance_map = torch.zeros(h, w, dtype=torch.uint8)  # later instances in front
    for k, b in enumerate(boxes.long()):
        instance_map[b[1] : b[3], b[0] : b[2]] = k + 1
    p = 0 if empty else 1
    kp = torch.rand(p, 18, 3, generator=g) * torch.tensor([35.0, 45.0, 0.0]) + torch.tensor([5.0, 5.0, 2.0])
    kp[:, ::3, 2] = 0  # some unlabelled joints
    return FrameTargets(
        weather=1,
        scene=4,
        boxes=boxes,
        classes=torch.tensor([0, 2, 1])[:n],
        ignore=torch.tensor([False, False, True])[:n],
        track_ids=torch.arange(n),
        instance_map=instance_map,
        mask_valid=torch.ones(n, dtype=torch.bool),
        keypoints=kp,
        pose_boxes=boxes[:p],
        sem=torch.randint(0, 19, (h, w), generator=g, dtype=torch.uint8),
        drivable=torch.randint(0, 3, (h, w), generator=g, dtype=torch.uint8),
        lane=torch.randint(0, 256, (h, w), generator=g, dtype=torch.uint8),  # BDD100K lane bytes
    )


def make_batch(tasks, *, b: int = 2, ref: bool = False, empty: bool = False, seed: int = 0, source=LabelSource.REAL) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(b, len(TASKS), dtype=torch.int8)
    for t in tasks:
        labels[:, TASK_INDEX[t]] = int(source)
    img = lambda: torch.randint(0, 256, (b, 3, H, W), generator=g, dtype=torch.uint8)  # noqa: E731
    return Batch(
        set_name="synthetic",
        images=img(),
        image_sizes=[(H, W)] * b,
        targets=[make_targets(g, empty=empty) for _ in range(b)],
        labels=labels,
        ref_images=img() if ref else None,
        ref_targets=[make_targets(g, empty=empty) for _ in range(b)] if ref else None,
    )


#: The three BDD100K image sets: which tasks they label, and whether they carry a reference frame.
SET_BATCHES = {
    "det": (("tag", "det", "pose", "drivable", "lane"), False),
    "seg": (("sem", "ins"), False),
    "track": (("mot", "mots", "flow"), True),
}


def train_step(model: VTDNet, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = model(batch)
    total_loss(losses).backward()
    return losses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: as fast as two on an idle 2-core host, far faster on a busy one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vtdnet() -> VTDNet:
    torch.manual_seed(0)
    return VTDNet(VTDNetConfig.tiny("vtdnet")).train()


@pytest.fixture(scope="module")
def mt() -> VTDNet:
    torch.manual_seed(0)
    return VTDNet(VTDNetConfig.tiny("mt")).train()


# ---------------------------------------------------------------------------------------------
# Configs, variants and parameter budgets (paper Table 13, ResNet-50, ±10 %)
# ---------------------------------------------------------------------------------------------

TABLE13 = {
    "vtdnet": 73.3,
    "mt": 73.4,
    "single:det": 41.2,
    "single:ins": 43.8,
    "single:tag": 23.5,
    "single:pose": 44.3,
    "single:sem": 28.6,
    "single:mot": 56.6,
    "single:mots": 59.3,
}


@pytest.mark.parametrize("variant", list(TABLE13))
def test_param_count_matches_table13(variant):
    with torch.device("meta"):  # shapes only: fast, no memory
        model = VTDNet(VTDNetConfig.variant(variant, "resnet50"))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - TABLE13[variant]) <= 0.1 * TABLE13[variant], f"{variant}: {params_m:.2f} M vs {TABLE13[variant]} M"


def test_variants_build_only_their_decoders():
    with torch.device("meta"):
        single = VTDNet(VTDNetConfig.single("ins", "resnet50"))
        subset = VTDNet(VTDNetConfig.multitask("resnet50", tasks=("sem", "drivable")))
        vtd = VTDNet(VTDNetConfig.vtdnet("resnet50"))
        mt = VTDNet(VTDNetConfig.multitask("resnet50"))
    assert single.tasks == ("det", "ins") and single.kp_head is None and single.track_head is None
    assert single.tagging is None and len(single.seg_decoders) == 0
    assert set(subset.seg_decoders) == {"sem", "drivable"} and subset.rpn is None and subset.box_head is None
    assert vtd.seg_intra is not None and vtd.loc_intra is not None and vtd.pixels_from_objects is not None
    assert mt.seg_intra is None and mt.loc_intra is None and mt.seg_aggregator is None
    assert vtd.seg_intra.tasks == ("sem", "drivable", "lane") and vtd.loc_intra.tasks == ("det", "ins", "pose")
    # MT: every segmentation decoder aggregates the pyramid itself; VTDNet shares one aggregator
    assert all(d.aggregator is not None for d in mt.seg_decoders.values())
    assert all(d.aggregator is None for d in vtd.seg_decoders.values()) and vtd.seg_aggregator is not None


def test_config_errors_name_the_bad_value():
    with pytest.raises(VTDInputError, match="'ins' needs"):
        VTDNetConfig(tasks=("ins",))
    with pytest.raises(VTDInputError, match="bogus"):
        VTDNetConfig(tasks=("bogus",))
    with pytest.raises(VTDInputError, match="resnet5000"):
        BackboneConfig(name="resnet5000")
    with pytest.raises(VTDInputError, match="single:nope|nope"):
        VTDNetConfig.variant("single:nope")
    with pytest.raises(VTDInputError, match="'xx'"):
        VTDNetConfig.variant("xx")
    assert VTDNetConfig.single("mots").tasks == ("det", "ins", "mot", "mots")


def test_the_schemas_backbone_names_are_the_registrys():
    """``BackboneConfig`` validates names against the torch-free schema's list; every name there
    must build, and every base network the registry builds must be accepted."""
    from vtd_train.model import BACKBONES
    from vtd_train.model.schema import BACKBONE_NAMES

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES)


# ---------------------------------------------------------------------------------------------
# Backbones: shape contract and pretrained weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "swin_t"])
def test_backbone_shape_contract(name):
    bb = build_backbone(BackboneConfig(name=name)).eval()
    shapes = bb.output_shape()
    assert list(shapes) == ["c2", "c3", "c4", "c5"] and [s for _, s in shapes.values()] == [4, 8, 16, 32]
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, H, W))
    for k, (c, s) in shapes.items():
        assert feats[k].shape == (1, c, H // s, W // s), (k, feats[k].shape)


def test_pretrained_weights_load_from_path_and_fsspec_uri(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)  # an "ImageNet" checkpoint, classifier included
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(BackboneConfig(name="resnet18", pretrained=str(path)))
    assert torch.equal(bb.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(bb.stem[1].running_mean, ref.bn1.running_mean)

    buf = io.BytesIO()
    torch.save({"state_dict": ref.state_dict()}, buf)
    with fsspec.open("memory://weights/r18.pth", "wb") as f:
        f.write(buf.getvalue())
    bb2 = build_backbone(BackboneConfig(name="resnet18", pretrained="memory://weights/r18.pth"))
    assert torch.equal(bb2.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)


def test_resnet_norm_is_frozen_bn_with_pretrained_weights_and_group_norm_from_scratch(tmp_path):
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    def norms(bb):
        return {type(m) for m in bb.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d, FrozenBatchNorm2d))}

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert norms(build_backbone(BackboneConfig(name="resnet18", pretrained=str(path)))) == {FrozenBatchNorm2d}
    # a random init under frozen BN would be unnormalised: from scratch the default is GroupNorm
    scratch = build_backbone(BackboneConfig(name="resnet18"))
    assert norms(scratch) == {torch.nn.GroupNorm}
    assert all(m.num_groups == 32 for m in scratch.modules() if isinstance(m, torch.nn.GroupNorm))
    assert norms(build_backbone(BackboneConfig(name="resnet18", norm="bn"))) == {torch.nn.BatchNorm2d}
    with pytest.raises(VTDInputError, match="norm must be one of"):
        BackboneConfig(name="resnet18", norm="layer")


def test_pretrained_weights_errors_name_the_file(tmp_path):
    import torchvision

    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="nope.pth"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=str(missing)))
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(PretrainedWeightsError, match=r"r34\.pth.*unexpected key"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=str(wrong)))
    wide = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wide)
    with pytest.raises(PretrainedWeightsError, match=r"r50\.pth.*shape mismatch"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=str(wide)))
    partial = tmp_path / "partial.pth"
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd.pop("layer2.0.conv1.weight")
    torch.save(sd, partial)
    with pytest.raises(PretrainedWeightsError, match=r"partial\.pth.*missing key.*layer2\.0\.conv1\.weight"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=str(partial)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=str(garbage)))


def test_timm_pretrained_weights_load(tmp_path):
    import timm

    ref = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "atto.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(BackboneConfig(name="convnext_atto", pretrained=str(path)))
    assert torch.equal(bb.net.stages[3].blocks[0].conv_dw.weight, ref.stages[3].blocks[0].conv_dw.weight)


def test_images_must_be_uint8(vtdnet):
    with pytest.raises(TypeError, match="uint8"):
        vtdnet.normalizer(torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------
# Decoder contracts: output shapes, gradients exactly where labels are
# ---------------------------------------------------------------------------------------------


def test_decoder_output_shapes(vtdnet):
    m, b = vtdnet, 2
    with torch.no_grad():
        pyr = m.extract(torch.randn(b, 3, H, W))
        assert {k: tuple(v.shape[-2:]) for k, v in pyr.items()} == {
            "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)
        }
        tags = m.tagging(torch.randn(b, 512, 2, 3))
        assert tags.weather.shape == (b, 7) and tags.scene.shape == (b, 7)
        agg = m.seg_aggregator(pyr)
        assert agg.shape == (b, 16, H // 4, W // 4)
        for task, ks in {"sem": [19], "drivable": [3], "lane": [3, 3, 9]}.items():
            logits = m.seg_decoders[task](agg).logits
            assert [tuple(x.shape) for x in logits] == [(b, k, H // 4, W // 4) for k in ks]
        rois = torch.randn(5, 32, 7, 7)
        out = m.box_head(rois)
        assert out.class_logits.shape == (5, 9) and out.box_deltas.shape == (5, 36)
        assert m.mask_head(torch.randn(5, 32, 14, 14)).shape == (5, 9, 28, 28)
        assert m.kp_head(torch.randn(5, 32, 14, 14)).shape == (5, 18, 28, 28)
        flows = m.flow([pyr["p2"], pyr["p3"]], [pyr["p2"], pyr["p3"]])
        assert flows[0].shape == (b, 2, H // 4, W // 4)
        boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 5.0, 60.0, 40.0]]), torch.zeros(0, 4)]
        emb = m.track_head([pyr[p] for p in ("p2", "p3", "p4", "p5")], boxes, [(H, W)] * b)
        assert [tuple(e.shape) for e in emb] == [(2, 16), (0, 16)]
    assert m.decoder("mots") == []  # MOTS combines MOT and instance outputs, no parameters


def _grads(model: VTDNet, task: str) -> list[tuple[str, torch.Tensor | None]]:
    return [(n, p.grad) for m in model.decoder(task) for n, p in m.named_parameters()]


@pytest.mark.parametrize("variant", ["vtdnet", "mt"])
@pytest.mark.parametrize("image_set", list(SET_BATCHES))
def test_decoder_gradients_follow_labels(variant, image_set, request):
    model: VTDNet = request.getfixturevalue(variant)
    tasks, ref = SET_BATCHES[image_set]
    losses = train_step(model, make_batch(tasks, ref=ref))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    labelled = set(tasks)
    # a mots frame trains the box decoder and the mask decoder (MOTS has no parameters)
    trained = labelled | ({"det", "ins"} if "mots" in labelled else set()) | ({"det"} if labelled & {"ins", "mot"} else set())
    for task in TASKS:
        grads = _grads(model, task)
        if task in trained:
            assert grads or task == "mots"
            for name, g in grads:
                assert g is not None, f"{task}: {name} got no gradient"
                assert torch.isfinite(g).all(), f"{task}: {name} has a non-finite gradient"
        else:
            for name, g in grads:
                assert g is None or not g.any(), f"{task} is not labelled but {name} got a gradient"
    expected_keys = {
        "det": {"loss/tag/weather", "loss/tag/scene", "loss/drivable/ce", "loss/lane/direction", "loss/lane/style",
                "loss/lane/category", "loss/rpn/cls", "loss/rpn/box", "loss/det/cls", "loss/det/box", "loss/pose/heatmap"},
        "seg": {"loss/sem/ce", "loss/rpn/cls", "loss/rpn/box", "loss/ins/cls", "loss/ins/box", "loss/ins/mask"},
        "track": {"loss/rpn/cls", "loss/rpn/box", "loss/mot/cls", "loss/mot/box", "loss/mots/mask", "loss/mot/embed",
                  "loss/mot/aux", "loss/flow/census", "loss/flow/smooth"},
    }[image_set]
    assert set(losses) == expected_keys


def test_interaction_blocks_get_gradients(vtdnet):
    train_step(vtdnet, make_batch(SET_BATCHES["det"][0]))
    for block in (vtdnet.seg_intra, vtdnet.loc_intra, vtdnet.pixels_from_objects, vtdnet.objects_from_pixels):
        for name, p in block.named_parameters():
            if ".out." in f".{name}" and name.split(".")[1] not in ("drivable", "lane", "det", "pose"):
                continue  # the output projection of an unlabelled task (sem, ins) is not used
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_empty_targets_give_finite_losses(vtdnet):
    batch = make_batch(TASKS, ref=True, empty=True)
    losses = train_step(vtdnet, batch)
    assert "loss/det/cls" in losses and "loss/mot/embed" in losses
    assert all(torch.isfinite(v) for v in losses.values()), losses
    for n, p in vtdnet.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n


def test_per_sample_presence_and_pseudo_labels():
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny("mt", tasks=("sem", "det"))).train()

    def losses_of(batch):
        torch.manual_seed(0)
        with torch.no_grad():
            return {k: float(v) for k, v in model(batch).items()}

    batch = make_batch(("sem", "det"))
    batch.labels[1] = 0  # sample 1 carries no label at all
    base = losses_of(batch)
    t1 = batch.targets[1]
    t1.sem = torch.zeros_like(t1.sem)  # labels of an unlabelled sample must not matter
    t1.boxes = torch.tensor([[0.0, 0.0, 90.0, 60.0]])
    t1.classes, t1.ignore = torch.tensor([5]), torch.tensor([False])
    assert losses_of(batch) == pytest.approx(base)
    # ... while they do once the sample is labelled
    batch.labels[1, TASK_INDEX["sem"]] = int(LabelSource.REAL)
    assert losses_of(batch)["loss/sem/ce"] != pytest.approx(base["loss/sem/ce"])
    # pseudo labels are used exactly like real ones
    real = losses_of(make_batch(("sem", "det")))
    pseudo = losses_of(make_batch(("sem", "det"), source=LabelSource.PSEUDO))
    assert pseudo == pytest.approx(real)


def test_unapplied_augmentation_is_refused(vtdnet):
    batch = make_batch(("tag",))
    batch.augment = AugmentPlan(height=None, flips=(False, False))
    with pytest.raises(ValueError, match="prepare_batch"):
        vtdnet(batch)


def test_loss_terms_are_weighted_by_table11(vtdnet):
    torch.manual_seed(0)
    with torch.no_grad():
        weighted = vtdnet(make_batch(("tag",)))
    # uniform-ish logits at init: CE ≈ log 7, scaled by λ = 0.05
    assert 0.02 < float(weighted["loss/tag/weather"]) < 0.2


# ---------------------------------------------------------------------------------------------
# The whole network: forward + backward time, inference outputs
# ---------------------------------------------------------------------------------------------


def test_tiny_vtdnet_forward_backward_all_tasks(vtdnet, capsys):
    batch = make_batch(TASKS, ref=True)
    train_step(vtdnet, batch)  # warm-up (allocator, lazy init)
    t0 = time.perf_counter()
    losses = train_step(vtdnet, batch)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[tiny VTDNet, 2×3×{H}×{W}, all ten tasks] forward+backward {elapsed:.2f} s, {len(losses)} loss terms")
    # a frame labelled for det and ins names its box terms det and its mask term ins
    assert {k.split("/")[1] for k in losses} == {"tag", "sem", "drivable", "lane", "rpn", "det", "ins", "pose", "mot", "flow"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert elapsed < 30.0  # "a few seconds" on an idle 2-core machine; generous for a loaded CI host


@pytest.mark.parametrize("variant", ["vtdnet", "mt"])
def test_predict_returns_every_task_at_image_size(variant, request):
    model: VTDNet = request.getfixturevalue(variant)
    model.eval()
    try:
        batch = make_batch(TASKS, ref=True)
        batch.image_sizes = [(H, W), (56, 80)]  # second image is padded
        preds = model.predict(batch)
        preds_up = model.predict(batch, output_sizes=[(2 * H, 2 * W), (112, 160)])
    finally:
        model.train()
    assert len(preds) == 2 and all(isinstance(p, FramePrediction) for p in preds)
    for p, (h, w) in zip(preds, [(H, W), (56, 80)]):
        assert p.size == (h, w)
        assert p.weather.shape == (7,) and torch.allclose(p.weather.sum(), torch.tensor(1.0))
        assert 0 <= p.weather_label < 7 and 0 <= p.scene_label < 7
        assert p.sem.shape == (h, w) and p.sem.dtype == torch.uint8 and int(p.sem.max()) < 19
        assert p.drivable.shape == (h, w) and int(p.drivable.max()) < 3
        assert p.lane.shape == (3, h, w) and int(p.lane[0].max()) < 3 and int(p.lane[2].max()) < 9
        n = p.boxes.shape[0]
        assert p.boxes.shape == (n, 4) and p.scores.shape == (n,) and p.classes.shape == (n,)
        assert n > 0 and bool((p.boxes[:, 2] <= w + 1e-3).all()) and bool((p.boxes[:, 3] <= h + 1e-3).all())
        assert p.masks.shape == (n, h, w) and p.masks.dtype == torch.bool
        assert p.embeddings.shape == (n, 16)
        k = p.keypoints.shape[0]
        assert p.keypoints.shape == (k, 18, 3) and p.keypoint_index.shape == (k,) and p.keypoint_scores.shape == (k,)
        assert bool(torch.isin(p.classes[p.keypoint_index], torch.tensor([0, 1])).all())
        assert p.flow.shape == (2, h, w) and torch.isfinite(p.flow).all()
    for p, q in zip(preds, preds_up):
        oh, ow = q.size
        assert q.sem.shape == (oh, ow) and q.masks.shape[1:] == (oh, ow) and q.flow.shape == (2, oh, ow)
        assert torch.allclose(q.boxes, p.boxes * torch.tensor([ow / p.size[1], oh / p.size[0]] * 2), atol=1e-3)


def test_predictions_feed_the_tracker(vtdnet):
    from vtd_train.tracker import QDTracker

    vtdnet.eval()
    try:
        preds = vtdnet.predict(make_batch(("det",), b=1))
    finally:
        vtdnet.train()
    p = preds[0]
    tracker = QDTracker()
    out = tracker.update(boxes=p.boxes, scores=p.scores, classes=p.classes, embeddings=p.embeddings, frame_index=0)
    assert out is not None


def test_model_info_counts_params_and_macs():
    info = model_info(config=VTDNetConfig.tiny("vtdnet"), height=H, width=W)
    model = VTDNet(VTDNetConfig.tiny("vtdnet"))
    assert info["params_m"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert info["gmacs"] > 0 and info["gflops"] == pytest.approx(2 * info["gmacs"], abs=0.11)
    mods = info["gmacs_by_module"]
    assert mods["TorchvisionResNet"] > 0 and mods["IntraIB"] > 0 and mods["FlowDecoder"] > 0
    assert info["proposals"] > 0 and info["detections"] > 0


@pytest.mark.parametrize("argv, fragment", [
    (["model", "info", "--height", "-5"], "vtd model info: argument --height: expected a number of pixels from 1 to 16384, got '-5'"),
    (["model", "info", "--width", "wide"], "argument --width: expected a number of pixels from 1 to 16384, got 'wide'"),
    (["model", "info", "--backbone", "resnet5"], "unknown backbone 'resnet5'"),
    (["model", "info", "--variant", "single:xyz"], "unknown task 'xyz'"),
    (["data", "synth", "--out", "/nowhere", "--seed", "-1"], "argument --seed: expected a non-negative integer, got '-1'"),
    (["train"], "vtd train: the following arguments are required: --config"),
])
def test_bad_cli_values_stop_in_one_line_naming_the_value(argv, fragment, capsys):
    from vtd_train.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors exit
        rc = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vtd: error: ") and fragment in lines[0], captured


def test_config_from_dict_validates_keys_and_values():
    from vtd_train.model.config import config_from_dict

    cfg = config_from_dict(
        VTDNetConfig,
        {"backbone": {"name": "swin_t"}, "tasks": ["det", "ins"], "use_interaction": False,
         "loss_weights": {"det": 4}, "rpn": {"anchor_sizes": [16, 32, 64, 128, 256]}},
        source="configs/x.yaml",
    )
    assert cfg.backbone.name == "swin_t" and cfg.tasks == ("det", "ins") and cfg.loss_weights.det == 4.0
    assert cfg.rpn.anchor_sizes == (16, 32, 64, 128, 256) and cfg.use_interaction is False
    with pytest.raises(VTDInputError, match=r"configs/x\.yaml: backbone: unknown key\(s\) \['nmae'\]"):
        config_from_dict(VTDNetConfig, {"backbone": {"nmae": "x"}}, source="configs/x.yaml")
    with pytest.raises(VTDInputError, match=r"configs/x\.yaml: fpn\.out_channels: expected an integer, got 'big'"):
        config_from_dict(VTDNetConfig, {"fpn": {"out_channels": "big"}}, source="configs/x.yaml")
    with pytest.raises(VTDInputError, match=r"configs/x\.yaml: .*'ins' needs"):
        config_from_dict(VTDNetConfig, {"tasks": ["ins"]}, source="configs/x.yaml")
    with pytest.raises(VTDInputError, match=r"loss_weights: .*pose must be a non-negative number, got -1"):
        config_from_dict(VTDNetConfig, {"loss_weights": {"pose": -1}}, source="configs/x.yaml")


def test_tiny_tagging_norm_learns_its_statistics_only_when_trained():
    """The tiny preset's tagging decoder standardises the pooled C5 with a batch norm: a training
    batch of two or more updates its running statistics, and a frozen decoder (a CPF stage that
    fine-tunes another one) keeps them as they are; gradients never reach C5 through it."""
    from vtd_train.model.classification import TaggingConfig, TaggingDecoder
    from vtd_train.train.optim import freeze

    torch.manual_seed(0)
    dec = TaggingDecoder(TaggingConfig(pooled_norm=True), in_channels=8).train()
    c5 = torch.randn(4, 8, 3, 5, requires_grad=True)
    before = dec.norm.running_mean.clone()
    out = dec(c5)
    assert not torch.equal(dec.norm.running_mean, before)
    (out.weather.sum() + out.scene.sum()).backward()
    assert c5.grad is None and dec.weather.weight.grad is not None
    freeze(dec, ("norm", "weather", "scene"))
    frozen = (dec.norm.running_mean.clone(), dec.norm.running_var.clone())
    dec(torch.randn(4, 8, 3, 5))
    assert torch.equal(dec.norm.running_mean, frozen[0]) and torch.equal(dec.norm.running_var, frozen[1])


def test_group_norm_of_one_value_per_group_is_the_bias():
    """The aggregator's 16 groups of one channel on a 1×1 map (P6 of a 32-px frame): torch's
    group norm refuses a batch of one; ours gives what torch gives for the same map in a batch of
    two (one value per group is its own mean: the bias), with gradients reaching every parameter."""
    from vtd_train.model.segmentation import GroupNorm, group_norm

    norm = group_norm(16)
    assert isinstance(norm, GroupNorm) and norm.num_groups == 16
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 16, 1, 1, requires_grad=True)
    reference = torch.nn.functional.group_norm(x, 16, norm.weight, norm.bias, norm.eps)
    assert torch.allclose(norm(x), reference, atol=1e-4)
    with pytest.raises(ValueError):
        torch.nn.functional.group_norm(x[:1], 16, norm.weight, norm.bias, norm.eps)
    one = norm(x[:1])
    assert torch.allclose(one, norm.bias.view(1, -1, 1, 1)) and torch.allclose(one, reference[:1], atol=1e-4)
    one.sum().backward()
    assert norm.weight.grad is not None and norm.bias.grad is not None and x.grad is not None
    # more than one value per group: torch's group norm, unchanged
    y = torch.randn(1, 16, 2, 3)
    assert torch.equal(norm(y), torch.nn.functional.group_norm(y, 16, norm.weight, norm.bias, norm.eps))
    assert norm(torch.zeros(0, 16, 1, 1)).shape == (0, 16, 1, 1)  # an empty batch, as torch's


def test_a_32_px_frame_alone_gets_predictions(vtdnet):
    """A 32-px-high frame in a batch of one (``vtd evaluate --height 32``'s last batch): P5 and P6
    are 1×1, which the segmentation aggregator's group norms take (this crashed a pipeline's
    evaluation stage)."""
    vtdnet.eval()
    try:
        batch = make_batch(TASKS, b=1)
        batch.images, batch.image_sizes = batch.images[:, :, :32, :64].contiguous(), [(32, 64)]
        preds = vtdnet.predict(batch)
    finally:
        vtdnet.train()
    assert preds[0].size == (32, 64) and preds[0].sem.shape == (32, 64) and preds[0].lane.shape == (3, 32, 64)
