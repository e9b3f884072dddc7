"""``vtd predict``: BDD100K-format predictions, scored by BDD100K's official toolkit in a separate
environment and compared with ``vtd evaluate`` on the same model.

The toolkit (``bdd100k`` 1.0.1 + ``scalabel`` 0.3.1, their newest releases, June 2023) does not
run with today's dependency versions: under pydantic 2 every ``Optional`` field of scalabel's
schema becomes required and its own configs fail to load ("scalabel.attributes: Field
required"). So the test builds a virtual environment of its own, resolved as of the toolkit's
release (``uv pip install --exclude-newer 2023-07-15`` with ``pydantic<2``: numpy 1.25,
pycocotools 2.0.6 built from source, pandas 2.0), cached under pytest's cache directory, and
runs ``tests/bdd100k_toolkit_eval.py`` with it. The toolkit's command line is
``python -m bdd100k.eval.run -t TASK -g GT -r RESULT``; ground truth is the mini dataset's own
BDD100K files (``tiny_root``).

What the toolkit reports against the paper's metrics (``vtd evaluate``), metric by metric:

* ``ap_det`` — the paper's box AP is COCO AP over the **8 thing classes**; the toolkit's ``det``
  averages over all **10** detection classes with ground truth, traffic lights and signs
  included (VTD treats them as stuff, its detector never predicts them: AP 0 there). The
  comparison averages the toolkit's per-class APs over the 8 thing classes: equal.
* ``acc_weather`` / ``acc_scene`` — scalabel's ``evaluate_tagging`` accuracy (the BDD100K
  command has no tagging task): equal.
* ``ap_pose`` — COCO keypoint AP, 18 BDD100K sigmas, 20 detections: equal.
* ``iou_sem`` — mean IoU over the classes present in the ground truth from one confusion
  histogram, 255 ignored: equal.
* ``iou_drivable`` — the paper scores direct and alternative over all pixels, a prediction of
  "direct" on background ground truth being a false positive; the toolkit treats background
  as its ignore class and drops background ground-truth pixels from the histogram, so those
  false positives never count: the toolkit's mIoU is never lower.
* ``iou_lane`` — the paper's boundary IoU with a 5-pixel tolerance, averaged over the frames
  where a value occurs; the toolkit reports an F-score (precision / recall of the boundary
  pixels within 1, 2 and 5 pixels) averaged over all frames, a frame where a value is absent
  on both sides counting as 1. Different numbers by design; with ground truth as predictions
  both are 100.
* ``ap_ins`` — COCO mask AP over the 8 classes; the toolkit scores bitmasks, one instance per
  pixel, with its own matcher, so overlapping predicted masks are cut (the higher score keeps
  the pixel) and the two can differ where predictions overlap.
* ``ap_mot`` / ``assa_mot``, ``ap_mots`` / ``assa_mots`` — the paper scores tracking by AP on
  the tracking frames and HOTA's AssA; BDD100K's 1.0.1 toolkit reports CLEAR MOT (MOTA, MOTP,
  IDF1; the 2020/21 challenge metrics). No number to compare; the test checks the files are
  accepted, perfect tracks score MOTA = IDF1 = 100, and a tracker that swaps identities loses
  IDF1 in the toolkit as it loses AssA here.
* ``iou_flow`` — a proxy of the paper's (MOTS masks warped by the flow); BDD100K has no flow
  task and ``vtd predict`` writes no flow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import OracleModel

from data_pipeline.bdd100k.format import (
    DET_CATEGORIES,
    LANE_BACKGROUND,
    SCENES,
    THING_CATEGORIES,
    WEATHERS,
    decode_lane_mask,
)
from data_pipeline.errors import VTDInputError
from vtd_train.checkpoint import save_model
from vtd_train.cli import main
from vtd_train.evaluation.bdd100k_format import encode_lane, instance_bitmask, scalabel_box
from vtd_train.evaluation.evaluate import run_evaluation
from vtd_train.evaluation.predict import run_prediction
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig

HERE = Path(__file__).parent
#: The official toolkit and what it needs, as of its release (see the module docstring).
TOOLKIT_PINS = ("bdd100k==1.0.1", "scalabel==0.3.1", "pydantic<2")
TOOLKIT_AS_OF = "2023-07-15"
#: numpy 1.25 (the toolkit's time) has wheels up to CPython 3.11.
TOOLKIT_PYTHON = "3.11"


# ---------------------------------------------------------------------------------------------
# The toolkit's environment
# ---------------------------------------------------------------------------------------------


def _uv() -> list[str]:
    if os.environ.get("UV"):  # set by `uv run`
        return [os.environ["UV"]]
    if shutil.which("uv"):
        return [shutil.which("uv")]
    return ["python3", "-m", "uv"]


@pytest.fixture(scope="session")
def toolkit_python(request) -> str:
    """The Python of a virtual environment holding BDD100K's toolkit, built once and cached
    (pytest's cache directory; the pins are its key). A failure to build it fails the test with
    uv's reason: the comparison is the point of these tests, never skipped."""
    key = "-".join(TOOLKIT_PINS + (TOOLKIT_AS_OF, TOOLKIT_PYTHON)).replace("<", "lt").replace("=", "")
    root = Path(request.config.cache.mkdir("bdd100k-toolkit")) / key
    python = root / "bin" / "python"
    ready = root / "READY"
    if ready.exists() and python.exists():
        return str(python)
    shutil.rmtree(root, ignore_errors=True)
    steps = [
        _uv() + ["venv", "-q", "--python", TOOLKIT_PYTHON, str(root)],
        _uv() + ["pip", "install", "-q", "--python", str(python), "--exclude-newer", TOOLKIT_AS_OF, *TOOLKIT_PINS],
        [str(python), "-c", "import bdd100k.eval.run, scalabel.eval.tagging"],
    ]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            pytest.fail(f"cannot build BDD100K's toolkit environment: `{' '.join(cmd)}` exited {r.returncode}:\n"
                        f"{(r.stdout + r.stderr)[-3000:]}", pytrace=False)
    ready.write_text("\n".join(TOOLKIT_PINS) + "\n")
    return str(python)


def toolkit(python: str, gt_root: str, pred: Path, tmp: Path) -> dict:
    """Every task of ``pred`` (a ``vtd predict`` directory) scored by the toolkit against the
    BDD100K files under ``gt_root``; ``{task: the toolkit's result dict}``."""
    labels = f"{gt_root}/labels"
    jobs = [
        {"task": "det", "gt": f"{labels}/det_20/det_val.json", "result": str(pred / "det.json")},
        {"task": "pose", "gt": f"{labels}/pose_21/pose_val.json", "result": str(pred / "pose.json")},
        {"task": "sem_seg", "gt": f"{labels}/sem_seg/masks/val", "result": str(pred / "sem_seg/masks")},
        {"task": "drivable", "gt": f"{labels}/drivable/masks/val", "result": str(pred / "drivable/masks")},
        {"task": "lane_mark", "gt": f"{labels}/lane/masks/val", "result": str(pred / "lane/masks")},
        {"task": "ins_seg", "gt": f"{labels}/ins_seg/bitmasks/val", "result": str(pred / "ins_seg/bitmasks"),
         "score_file": str(pred / "ins_seg/scores.json")},
        {"task": "box_track", "gt": f"{labels}/box_track_20/val", "result": str(pred / "box_track")},
        {"task": "seg_track", "gt": f"{labels}/seg_track_20/bitmasks/val", "result": str(pred / "seg_track/bitmasks")},
        {"task": "tagging", "gt": f"{labels}/det_20/det_val.json", "result": str(pred / "det.json"),
         "classes": {"weather": list(WEATHERS), "scene": list(SCENES)}},
    ]
    jobs_file, out_file = tmp / "jobs.json", tmp / "toolkit.json"
    jobs_file.write_text(json.dumps(jobs))
    r = subprocess.run([python, str(HERE / "bdd100k_toolkit_eval.py"), str(jobs_file), str(out_file)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out_file.read_text())
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not errors, "the toolkit refused vtd predict's output:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items())
    return results


def thing_ap(result: dict) -> float:
    """The toolkit's per-class AP averaged over the 8 thing classes with ground truth (NaN: none)."""
    per_class = result["AP"][0]
    assert set(per_class) <= set(DET_CATEGORIES)
    values = [per_class[c] for c in THING_CATEGORIES if c in per_class and not np.isnan(per_class[c])]
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class NoisyOracle(OracleModel):
    """The ground truth, degraded deterministically (by frame name) so that every metric lands
    between 0 and 100: wrong tags on a third of the frames, a block of wrong classes in the dense
    maps, lanes shifted by 2 pixels, boxes and joints jittered by up to 3 pixels with scores
    spread over (0.7, 1), a fifth of the objects dropped, one false positive per frame, and, from
    frame 4 of each video on, two tracks' identities swapped."""

    def predict(self, batch, output_sizes=None):
        out = super().predict(batch, output_sizes)
        for p, meta, t in zip(out, batch.meta, batch.targets):
            rng = np.random.default_rng(zlib.crc32(meta["name"].encode()))
            h, w = p.size
            if p.weather is not None and rng.random() < 0.33:
                p.weather, p.scene = p.weather.roll(1), p.scene.roll(1)
            y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            block = (slice(y0, y0 + h // 4), slice(x0, x0 + w // 4))
            if t.sem is not None:
                p.sem[block] = (p.sem[block] + 1) % 19
            if t.drivable is not None:
                p.drivable[block] = (p.drivable[block] + 1) % 3
            if t.lane is not None:
                p.lane = torch.roll(p.lane, 2, dims=1)
            if p.boxes is not None:
                n = len(p.boxes)
                keep = torch.from_numpy(rng.random(n) > 0.2)
                jitter = torch.from_numpy(rng.uniform(-3, 3, (n, 4))).float()
                boxes = (p.boxes + jitter).clamp(min=0)
                boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
                scores = torch.from_numpy(rng.uniform(0.7, 1.0, n)).float()
                fp = torch.tensor([[x0, y0, x0 + 12.0, y0 + 10.0]])
                p.boxes = torch.cat([boxes[keep], fp])
                p.scores = torch.cat([scores[keep], torch.tensor([0.75])])
                p.classes = torch.cat([p.classes[keep], torch.tensor([int(rng.integers(0, 8))])])
                if p.masks is not None:
                    fp_mask = torch.zeros(1, h, w, dtype=torch.bool)
                    fp_mask[0, y0 : y0 + 10, x0 : x0 + 12] = True
                    p.masks = torch.cat([p.masks[keep], fp_mask])
                if p.embeddings is not None:
                    emb = p.embeddings[keep]
                    if (meta.get("frame_index") or 0) >= 4 and len(emb) >= 2:
                        emb = emb[torch.tensor([1, 0] + list(range(2, len(emb))))]
                    p.embeddings = torch.cat([emb, torch.zeros(1, emb.shape[1])])
            if p.keypoints is not None and len(p.keypoints):
                jitter = torch.from_numpy(rng.uniform(-3, 3, (*p.keypoints.shape[:2], 2))).float()
                p.keypoints[..., :2] = (p.keypoints[..., :2] + jitter).clamp(min=0)
                p.keypoint_scores = torch.from_numpy(rng.uniform(0.5, 1.0, len(p.keypoints))).float()
        return out


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def test_ground_truth_as_predictions_scores_100_in_the_toolkit(tiny_root, tiny_shards, toolkit_python, tmp_path):
    """Every format round-trips: box2d's inclusive convention (an off-by-one box misses IoU 0.95
    on these small objects), bitmask ids and categories, lane bytes, per-video track ids."""
    pred = tmp_path / "pred"
    info = run_prediction(model=OracleModel(), data=tiny_shards, out_dir=pred, distributed=False)
    assert set(info["outputs"]) == {"det", "pose", "drivable", "lane", "sem_seg", "ins_seg", "box_track", "seg_track"}
    tk = toolkit(toolkit_python, tiny_root, pred, tmp_path)
    assert thing_ap(tk["det"]) == pytest.approx(100.0)
    assert tk["pose"]["AP"][-1]["OVERALL"] == pytest.approx(100.0)
    assert tk["ins_seg"]["AP"][-1]["OVERALL"] == pytest.approx(100.0)
    for task in ("sem_seg", "drivable"):
        assert tk[task]["IoU"][-1]["AVERAGE"] == pytest.approx(100.0), task
    assert tk["lane_mark"]["F1_pix1"][-1]["AVERAGE"] == pytest.approx(100.0)
    assert tk["tagging"]["accuracy"][-2] == {"WEATHER": 100.0, "SCENE": 100.0}
    for task in ("box_track", "seg_track"):
        assert tk[task]["MOTA"][-1]["OVERALL"] == pytest.approx(100.0), task
        assert tk[task]["IDF1"][-1]["OVERALL"] == pytest.approx(100.0), task


def test_toolkit_scores_match_vtd_evaluate(tiny_root, tiny_shards, toolkit_python, tmp_path):
    """The same imperfect model through ``vtd predict`` + the toolkit and through ``vtd evaluate``
    (metric by metric as in the module docstring)."""
    pred = tmp_path / "pred"
    run_prediction(model=NoisyOracle(), data=tiny_shards, out_dir=pred, distributed=False)
    ours = run_evaluation(model=NoisyOracle(), data=tiny_shards, distributed=False, overlays=0).metrics
    tk = toolkit(toolkit_python, tiny_root, pred, tmp_path)
    print(json.dumps({"vtd evaluate": ours, "toolkit": {k: {m: v[-1] if isinstance(v, list) else v for m, v in r.items()}
                                                        for k, r in tk.items()}}, indent=1, default=float))
    for key in ("ap_det", "ap_pose", "iou_sem", "iou_drivable", "ap_ins", "acc_weather", "acc_scene"):
        assert 5.0 < ours[key] < 99.0, (key, ours[key])  # the comparison means something
    assert thing_ap(tk["det"]) == pytest.approx(ours["ap_det"], abs=1e-6)
    assert tk["tagging"]["accuracy"][-2]["WEATHER"] == pytest.approx(ours["acc_weather"], abs=1e-6)
    assert tk["tagging"]["accuracy"][-2]["SCENE"] == pytest.approx(ours["acc_scene"], abs=1e-6)
    assert tk["pose"]["AP"][-1]["OVERALL"] == pytest.approx(ours["ap_pose"], abs=1e-6)
    assert tk["sem_seg"]["IoU"][-1]["AVERAGE"] == pytest.approx(ours["iou_sem"], abs=1e-6)
    assert tk["drivable"]["IoU"][-1]["AVERAGE"] >= ours["iou_drivable"] - 1e-6
    assert tk["ins_seg"]["AP"][-1]["OVERALL"] == pytest.approx(ours["ap_ins"], abs=5.0)
    assert 0.0 < tk["lane_mark"]["F1_pix5"][-1]["AVERAGE"] < 100.0 and 0.0 < ours["iou_lane"] < 100.0
    # swapped identities: the toolkit's IDF1 drops below 100 as AssA does here
    for task, assa in (("box_track", "assa_mot"), ("seg_track", "assa_mots")):
        assert tk[task]["IDF1"][-1]["OVERALL"] < 100.0 and ours[assa] < 100.0, task


def test_cli_predict_and_evaluate_the_same_checkpoint(tiny_root, tiny_shards, toolkit_python, tmp_path, capsys):
    """``vtd predict`` and ``vtd evaluate`` on one checkpoint (an untrained tiny VTDNet): the
    toolkit takes every file, and the metrics defined alike agree."""
    torch.manual_seed(0)
    cfg = VTDNetConfig.tiny()
    ckpt = str(tmp_path / "ckpt")
    save_model(ckpt, VTDNet(cfg), cfg, {"note": "untrained"})
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    assert main(["predict", "--checkpoint", ckpt, "--data", tiny_shards, "--out", str(pred)]) == 0
    printed = capsys.readouterr().out
    assert "det.json" in printed and "seg_track/bitmasks" in printed and f"out: {pred}" in printed
    assert main(["evaluate", "--checkpoint", ckpt, "--data", tiny_shards, "--out", str(ev), "--overlays", "0"]) == 0
    ours = json.loads((ev / "metrics.json").read_text())
    tk = toolkit(toolkit_python, tiny_root, pred, tmp_path)
    assert thing_ap(tk["det"]) == pytest.approx(ours["ap_det"], abs=1e-6)
    assert tk["pose"]["AP"][-1]["OVERALL"] == pytest.approx(ours["ap_pose"], abs=1e-6)
    assert tk["sem_seg"]["IoU"][-1]["AVERAGE"] == pytest.approx(ours["iou_sem"], abs=1e-6)
    assert tk["drivable"]["IoU"][-1]["AVERAGE"] >= ours["iou_drivable"] - 1e-6
    assert tk["tagging"]["accuracy"][-2]["WEATHER"] == pytest.approx(ours["acc_weather"], abs=1e-6)
    assert tk["tagging"]["accuracy"][-2]["SCENE"] == pytest.approx(ours["acc_scene"], abs=1e-6)
    info = json.loads((pred / "predict_info.json").read_text())
    assert info["checkpoint"] == ckpt and info["frames"] == json.loads((ev / "eval_info.json").read_text())["frames"]


# ---------------------------------------------------------------------------------------------
# Formats and failures (no toolkit needed)
# ---------------------------------------------------------------------------------------------


def test_lane_bytes_round_trip():
    rng = np.random.default_rng(0)
    cat, direction, style = rng.integers(0, 8, (20, 30)), rng.integers(0, 2, (20, 30)), rng.integers(0, 2, (20, 30))
    byte = (cat + (direction << 5) + (style << 4)).astype(np.uint8)
    byte[rng.random((20, 30)) < 0.5] = LANE_BACKGROUND
    assert np.array_equal(encode_lane(decode_lane_mask(byte)), byte)


def test_bitmask_keeps_the_higher_score_where_masks_overlap():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :, :3] = True
    masks[1, :, 1:] = True
    rgba = instance_bitmask(masks, np.array([2, 0]), np.array([0.9, 0.5]), np.array([1, 300]), (4, 4))
    inst = (rgba[..., 2].astype(int) << 8) + rgba[..., 3]
    assert inst[:, :3].tolist() == [[1, 1, 1]] * 4 and inst[:, 3].tolist() == [300] * 4
    assert rgba[0, 0, 0] == 3 and rgba[0, 3, 0] == 1 and not rgba[..., 1].any()


def test_boxes_are_written_inclusive():
    assert scalabel_box(np.array([10.0, 20.0, 15.0, 30.0])) == {"x1": 10.0, "y1": 20.0, "x2": 14.0, "y2": 29.0}


def test_an_existing_output_needs_overwrite(tiny_shards, tmp_path):
    pred = tmp_path / "pred"
    run_prediction(model=OracleModel(tasks=("sem",)), data=tiny_shards, out_dir=pred, distributed=False)
    stale = pred / "sem_seg" / "masks" / "stale.png"
    stale.write_bytes(b"x")
    with pytest.raises(VTDInputError, match=r"already holds predictions \(sem_seg, predict_info.json\).*--overwrite"):
        run_prediction(model=OracleModel(tasks=("sem",)), data=tiny_shards, out_dir=pred, distributed=False)
    run_prediction(model=OracleModel(tasks=("sem",)), data=tiny_shards, out_dir=pred, distributed=False, overwrite=True)
    assert not stale.exists() and len(list((pred / "sem_seg" / "masks").iterdir())) == 4


def test_a_bad_prediction_names_the_frame_and_leaves_no_json(tiny_shards, tmp_path):
    def bad_class(p):
        if p.classes is not None and len(p.classes):
            p.classes = p.classes.clone()
            p.classes[0] = 9
        return p

    pred = tmp_path / "pred"
    with pytest.raises(VTDInputError, match=r"frame '.+\.jpg': classes: unknown class id 9"):
        run_prediction(model=OracleModel(corrupt=bad_class), data=tiny_shards, out_dir=pred, distributed=False)
    left = sorted(p.name for p in pred.rglob("*") if p.is_file())
    assert not any(n.endswith(".json") or ".tmp" in n for n in left), left


def test_ray_workers_write_the_same_files(tiny_shards, ray_cluster, tmp_path):
    """The units run on Ray actors (each loading the checkpoint) give the files the in-process
    run gives, byte for byte."""
    torch.manual_seed(0)
    cfg = VTDNetConfig.tiny()
    ckpt = str(tmp_path / "ckpt")
    save_model(ckpt, VTDNet(cfg), cfg, {"note": "untrained"})
    local, remote = tmp_path / "local", tmp_path / "remote"
    run_prediction(ckpt, tiny_shards, out_dir=local, distributed=False)
    info = run_prediction(ckpt, tiny_shards, out_dir=remote, address=ray_cluster.address, workers=2)
    assert info["runner"].startswith("ray") and info["workers"] == 2

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
                and p.name != "predict_info.json"}

    assert files(local) == files(remote) and len(files(local)) > 30
