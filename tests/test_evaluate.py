"""``vtd evaluate``: end to end on the tiny shards (in-process and on Ray: identical), the
predictions → metrics glue with ground truth as predictions (every metric 100), flow direction,
missing tasks and error cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline.bdd100k.format import SCENES, TASKS, WEATHERS, decode_lane_mask
from data_pipeline.errors import VTDInputError
from data_pipeline.loading.loader import iter_frames
from data_pipeline.shards.manifest import families_from_manifest, read_manifest
from data_pipeline.loading.structures import Batch, FrameTargets
from vtd_train.checkpoint import CheckpointError, save_model
from vtd_train.cli import main
from vtd_train.evaluation import METRIC_KEYS
from vtd_train.evaluation.evaluate import evaluate, run_evaluation
from vtd_train.evaluation.inference import EvalState, gt_instances, pred_instances
from vtd_train.model.outputs import FramePrediction
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig

EMBED_DIM = 64


# ---------------------------------------------------------------------------------------------
# An oracle "model": predicts the ground truth the batch carries
# ---------------------------------------------------------------------------------------------


def oracle_flow(key: FrameTargets, ref: FrameTargets, size: tuple[int, int]) -> torch.Tensor:
    """A flow ``[2, H, W]`` in the model's convention, key(x, y) ≈ ref(x + dx, y + dy), that is
    exact on the MOTS masks: every pixel of a key-frame instance points at a pixel of the same
    track in the reference frame; every other pixel points outside the image."""
    h, w = size
    flow = torch.zeros(2, h, w)
    flow[0] = -(w + 10)
    if key.instance_map is None or ref.instance_map is None:
        return flow
    key_masks, ref_masks = key.instance_masks(), ref.instance_masks()
    ref_ids = {int(t): i for i, t in enumerate(ref.track_ids) if not ref.ignore[i] and ref.mask_valid[i]}
    for i, t in enumerate(key.track_ids.tolist()):
        j = ref_ids.get(t)
        if key.ignore[i] or j is None or not ref_masks[j].any():
            continue
        qy, qx = (int(v) for v in torch.nonzero(ref_masks[j])[0])
        ys, xs = torch.nonzero(key_masks[i], as_tuple=True)
        flow[0, ys, xs] = (qx - xs).float()
        flow[1, ys, xs] = (qy - ys).float()
    return flow


class OracleModel:
    """``tasks`` + ``predict(batch)`` like VTDNet, returning the batch's ground truth as
    FramePredictions (score 1, tracking embeddings = one-hot track ids). ``corrupt`` may edit
    each prediction (error tests); ``pairs`` records the (key, reference) frame of flow calls."""

    def __init__(self, tasks: tuple[str, ...] = TASKS, corrupt=None) -> None:
        self.tasks = tasks
        self.corrupt = corrupt
        self.training = False
        self.pairs: list[tuple[str, str]] = []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def predict(self, batch: Batch, output_sizes=None) -> list[FramePrediction]:
        out = []
        for i, t in enumerate(batch.targets):
            h, w = batch.image_sizes[i]
            p = FramePrediction(size=(h, w))
            has = set(self.tasks).__contains__
            if has("tag"):
                p.weather = torch.nn.functional.one_hot(torch.tensor(max(t.weather, 0)), len(WEATHERS)).float()
                p.scene = torch.nn.functional.one_hot(torch.tensor(max(t.scene, 0)), len(SCENES)).float()
            if has("sem"):
                p.sem = torch.zeros(h, w, dtype=torch.uint8) if t.sem is None else torch.where(t.sem == 255, 0, t.sem)
            if has("drivable"):
                p.drivable = torch.full((h, w), 2, dtype=torch.uint8) if t.drivable is None else torch.where(t.drivable == 255, 2, t.drivable)
            if has("lane"):
                p.lane = torch.zeros(3, h, w, dtype=torch.uint8) if t.lane is None else decode_lane_mask(t.lane)
            if has("det"):
                n = t.num_instances
                keep = ~t.ignore if n else torch.zeros(0, dtype=torch.bool)
                p.boxes = t.boxes[keep] if n else torch.zeros(0, 4)
                p.classes = t.classes[keep] if n else torch.zeros(0, dtype=torch.int64)
                p.scores = torch.ones(len(p.boxes))
                if has("ins"):
                    p.masks = t.instance_masks()[keep] if t.instance_map is not None and n else torch.zeros(len(p.boxes), h, w, dtype=torch.bool)
                if has("mot"):
                    ids = t.track_ids[keep] if n else torch.zeros(0, dtype=torch.int64)
                    ids = torch.where(ids >= 0, ids, torch.arange(len(ids)))
                    assert len(ids) == 0 or int(ids.max()) < EMBED_DIM
                    p.embeddings = 10.0 * torch.nn.functional.one_hot(ids, EMBED_DIM).float()
            if has("pose"):
                kp = t.keypoints if t.keypoints is not None else torch.zeros(0, 18, 3)
                p.keypoints, p.keypoint_scores = kp.clone(), torch.ones(len(kp))
                p.keypoint_index = torch.zeros(len(kp), dtype=torch.int64)
            if has("flow") and batch.ref_images is not None:
                p.flow = oracle_flow(t, batch.ref_targets[i], (h, w))
                self.pairs.append((batch.meta[i]["name"], batch.meta[i]["frame_index"], batch.meta[i]["ref_frame_index"]))
            if self.corrupt is not None:
                p = self.corrupt(p)
            out.append(p)
        return out


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = VTDNetConfig.tiny()
    uri = str(tmp_path_factory.mktemp("ckpt") / "untrained")
    save_model(uri, VTDNet(cfg), cfg, {"note": "untrained"})
    return uri


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_cli_in_process_then_ray_give_identical_metrics(tiny_shards, untrained_checkpoint, ray_cluster, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", "--checkpoint", untrained_checkpoint, "--data", tiny_shards, "--out", str(out), "--overlays", "3"]) == 0
    printed = capsys.readouterr().out
    assert "in-process" in printed and "VTDA" in printed and "report:" in printed

    local = json.loads((out / "metrics.json").read_text())
    assert set(METRIC_KEYS) <= set(local) and local["missing"] == []
    assert all(0.0 <= local[k] <= 100.0 for k in METRIC_KEYS)
    assert local["vtda"] == pytest.approx(sum(local[f"vtda_{g}"] for g in ("cls", "seg", "loc", "ass")))
    for name in ("report.html", "report.md", "chart.png", "overlay_0.png", "overlay_1.png", "overlay_2.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "overlay_3.png").exists()
    html = (out / "report.html").read_text()
    assert "chart.png" in html and "overlay_2.png" in html and "VTDNet-R50 (paper)" in html

    # every labelled frame of the split was scored, as the manifest counts them
    info = json.loads((out / "eval_info.json").read_text())
    manifest = read_manifest(tiny_shards)
    for task in ("tag", "sem", "drivable", "lane", "det", "ins", "pose", "mot", "mots"):
        expected = sum(e["tasks"].get(task, {}).get("samples", 0) for e in manifest["sets"].values() if e["split"] == "val")
        assert info["labelled"][task] == expected, task
    assert info["frames"] == sum(e["samples"] for e in manifest["sets"].values() if e["split"] == "val")
    assert info["labelled"]["flow"] > 0

    remote = evaluate(untrained_checkpoint, tiny_shards, address=ray_cluster.address, workers=2)
    assert remote == local  # bit-identical: same units, batches, thread count and merge order


def test_ground_truth_as_predictions_scores_100_everywhere(tiny_shards):
    oracle = OracleModel()
    r = run_evaluation(model=oracle, data=tiny_shards, distributed=False, overlays=0)
    assert r.missing == {}
    assert set(r.metrics) == set(METRIC_KEYS)
    for key, value in r.metrics.items():
        assert value == pytest.approx(100.0), key
    assert r.scores["vtda"] == pytest.approx(400.0)
    # the flow was predicted with key = frame t−1 and reference = frame t (the metric's direction)
    assert oracle.pairs and all(ref == key + 1 for _, key, ref in oracle.pairs if ref != key)
    assert oracle.training is False


def test_oracle_flow_in_the_wrong_direction_scores_less(tiny_shards):
    """The 100 above needs the right key/reference order: the same oracle flow computed with
    the frames swapped scores clearly less on frames where objects move."""
    track = next(f for f in families_from_manifest(tiny_shards, "val") if f.set_name == "track")
    frames = [f for f in iter_frames(track.urls) if f.sources.get("mots")]
    frames.sort(key=lambda f: (f.record["video"], f.record["frame_index"]))
    right, wrong = EvalState(), EvalState()
    for a, b in zip(frames, frames[1:]):
        if a.record["video"] != b.record["video"]:
            continue
        prev = gt_instances(a.record["name"], a.targets, masks=True, video=a.record["video"], frame_index=a.record["frame_index"])
        cur = gt_instances(b.record["name"], b.targets, masks=True, video=b.record["video"], frame_index=b.record["frame_index"])
        size = tuple(a.image.shape[1:])
        for state, flow in ((right, oracle_flow(a.targets, b.targets, size)), (wrong, oracle_flow(b.targets, a.targets, size))):
            state.add_flow_pair(FramePrediction(size=size, flow=flow), prev, cur, ("flow",))
    assert right.flow.compute() == pytest.approx(100.0)
    assert wrong.flow.compute() < 90.0


# ---------------------------------------------------------------------------------------------
# Missing tasks and errors
# ---------------------------------------------------------------------------------------------


def test_tasks_the_model_lacks_are_missing_not_zero(tiny_shards, tmp_path):
    reference = tmp_path / "earlier-run.json"
    reference.write_text(json.dumps({"ap_det": 42.5, "iou_sem": 17.25}))
    r = run_evaluation(model=OracleModel(tasks=("sem", "det")), data=tiny_shards, distributed=False, out_dir=tmp_path,
                       overlays=1, reference=str(reference))
    assert set(r.metrics) == {"iou_sem", "ap_det"}
    assert r.missing["acc_weather"] == "the model has no tag decoder"
    assert r.missing["iou_flow"] == "the model has no flow decoder"
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["missing"] == [k for k in METRIC_KEYS if k not in ("iou_sem", "ap_det")]
    assert stored["vtda_cls"] is None and "partial VTDA" in stored["note"]
    assert json.loads((tmp_path / "eval_info.json").read_text())["missing"]["ap_mot"] == "the model has no mot decoder"
    html = (tmp_path / "report.html").read_text()
    assert "earlier-run.json" in html and "42.5" in html and "VTDNet-R50" not in html


def test_nothing_labelled_is_missing_with_a_reason():
    metrics, missing = EvalState().compute(TASKS)
    assert metrics == {}
    assert missing["ap_pose"] == "no frame labelled for pose in the data"
    assert missing["iou_flow"] == "no consecutive MOTS frame pair in the data"


def _bad_class(p: FramePrediction) -> FramePrediction:
    if p.classes is not None and len(p.classes):
        p.classes = p.classes.clone()
        p.classes[0] = 8
    return p


def _bad_sem_shape(p: FramePrediction) -> FramePrediction:
    p.sem = p.sem[:-1]
    return p


def _bad_size(p: FramePrediction) -> FramePrediction:
    p.size = (p.size[0] + 1, p.size[1])
    return p


def _bad_tag(p: FramePrediction) -> FramePrediction:
    p.weather = p.weather[:5]
    return p


def _bad_embeddings(p: FramePrediction) -> FramePrediction:
    p.embeddings = p.embeddings[:0]
    return p


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_bad_class, "unknown class id 8"),
        (_bad_sem_shape, "shape"),
        (_bad_size, "prediction is"),
        (_bad_tag, "weather prediction must hold 7 probabilities"),
        (_bad_embeddings, "inconsistent shapes"),
    ],
)
def test_bad_predictions_raise_clear_errors(tiny_shards, corrupt, message):
    with pytest.raises(VTDInputError, match=message):
        run_evaluation(model=OracleModel(corrupt=corrupt), data=tiny_shards, distributed=False, overlays=0)


def test_mismatched_and_duplicate_frame_names_raise():
    t = FrameTargets(boxes=torch.tensor([[1.0, 1.0, 5.0, 5.0]]), classes=torch.tensor([2]), ignore=torch.tensor([False]))
    pred = FramePrediction(size=(8, 8), boxes=t.boxes, classes=t.classes, scores=torch.ones(1))
    state = EvalState()
    with pytest.raises(VTDInputError, match="frame names of predictions and ground truth differ"):
        state.det.update(pred_instances("a.jpg", pred), gt_instances("b.jpg", t))

    state.labelled["det"] += 1
    state.det.update(pred_instances("a.jpg", pred), gt_instances("a.jpg", t))
    assert state.compute(("det",))[0]["ap_det"] == pytest.approx(100.0)
    with pytest.raises(VTDInputError, match="appears twice"):
        state.det.update(pred_instances("a.jpg", pred), gt_instances("a.jpg", t))
    with pytest.raises(VTDInputError, match="appears twice"):  # the same frame from two units is not counted twice
        state.merge(state)


def test_a_checkpoint_that_does_not_exist(tiny_shards, tmp_path, capsys):
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        evaluate(missing, tiny_shards)
    assert main(["evaluate", "--checkpoint", missing, "--data", tiny_shards, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtd: error:") and "no-such-checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
    with pytest.raises(VTDInputError, match="exactly one"):
        evaluate(data=tiny_shards)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        evaluate(model=OracleModel(), data=str(tmp_path / "no-shards"), distributed=False)


def test_overlays_show_every_task(tiny_shards):
    r = run_evaluation(model=OracleModel(), data=tiny_shards, distributed=False, overlays=3)
    assert len(r.overlays) == 3
    track, det, seg = r.overlays
    assert track.name.startswith("track set:") and "flow to the next frame" in track.name
    assert det.name.startswith("det set:") and seg.name.startswith("seg set:")
    for ov in r.overlays:
        h, w = ov.image.shape[:2]
        assert min(h, w) >= 360  # the 96×160 frames are enlarged
        assert ov.drivable.shape == (h, w) and ov.lane.shape == (3, h, w) and ov.sem.shape == (h, w)
        assert ov.tags is not None and set(ov.tags) == {"weather", "scene"}
    assert track.track_ids is not None and len(track.track_ids) > 0 and track.masks.shape[1:] == track.image.shape[:2]
    assert track.flow is not None and track.flow.shape == track.image.shape[:2] + (2,)
    assert det.keypoints is not None and det.track_ids is None and len(det.boxes) > 0
    assert seg.masks is not None and len(seg.masks) == len(seg.boxes) > 0
    assert np.isfinite(track.flow).all()


# ---------------------------------------------------------------------------------------------
# Test height
# ---------------------------------------------------------------------------------------------


class ScaledOracle(OracleModel):
    """Ground-truth boxes of the (resized) batch mapped to ``output_sizes``, as VTDNet.predict
    maps its detections; records the image heights it was given."""

    def __init__(self) -> None:
        super().__init__(tasks=("tag", "det"))
        self.heights: set[int] = set()

    def predict(self, batch: Batch, output_sizes=None) -> list[FramePrediction]:
        self.heights |= {h for h, _ in batch.image_sizes}
        preds = super().predict(batch)
        for p, (h, w), (oh, ow) in zip(preds, batch.image_sizes, output_sizes):
            p.size = (oh, ow)
            p.boxes = p.boxes * torch.tensor([ow / w, oh / h, ow / w, oh / h])
        return preds


def test_evaluation_runs_at_the_test_height_and_scores_at_the_stored_resolution(tiny_shards):
    oracle = ScaledOracle()
    r = run_evaluation(model=oracle, data=tiny_shards, distributed=False, overlays=0, height=192)
    assert oracle.heights == {192}  # the stored frames are 96 high
    assert r.metrics["ap_det"] == pytest.approx(100.0, abs=0.5)  # boxes mapped back exactly, up to rounding
    assert r.info["height"] == 192
    with pytest.raises(VTDInputError, match="test height"):
        run_evaluation(model=oracle, data=tiny_shards, distributed=False, height=0)


def test_a_trained_checkpoint_is_tested_at_its_largest_training_scale(tiny_shards, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = VTDNetConfig.tiny("single:tag")
    uri = str(tmp_path / "ckpt")
    save_model(uri, VTDNet(cfg), cfg, {"config": {"data": {"scales": [64, 80]}}})
    assert run_evaluation(uri, tiny_shards, distributed=False, overlays=0).info["height"] == 80
    assert run_evaluation(uri, tiny_shards, distributed=False, overlays=0, height="native").info["height"] == "stored resolution"
    assert main(["evaluate", "--checkpoint", uri, "--data", tiny_shards, "--out", str(tmp_path / "e"), "--height", "72"]) == 0
    assert "height 72" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", uri, "--data", tiny_shards, "--height", "-3"])
