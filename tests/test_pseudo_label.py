"""CPF pseudo-labels (paper H.2): the thresholds, ``vtd pseudo-label`` on the tiny shards through
Ray, the loader's join and label selection, ``vtd data inspect`` of pseudo-labels, bad input.

The checkpoints are freshly initialised tiny single-task models (nothing is trained): the
semantic model's confidences straddle 0.3 as they come; the pose model gets a pedestrian bias
(every detection a confident person) and joint biases that put joints 0-8 far above 0.2 and
joints 9-17 far below, so the default thresholds give a known result.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.loading.decode import split_members
from data_pipeline.errors import DataError, VTDInputError
from data_pipeline.shards.inspect import inspect_pseudo, inspect_shards
from data_pipeline.loading.loader import LoaderConfig, MultiSetDataset, build_train_loader, iter_frames, iter_shard
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.loading.pseudo import iter_pseudo_shard, read_pseudo_manifest, split_pseudo_members
from data_pipeline.shards.format import decode_label_map
from data_pipeline.loading.structures import TASK_INDEX, Batch, FrameTargets, LabelSource, RunLengthMap
from data_pipeline.loading.config import AugmentConfig
from data_pipeline.loading.transforms import prepare_batch
from vtd_train.checkpoint import save_model
from vtd_train.cli import main
from vtd_train.evaluation.evaluate import EvalWorker, torch_threads
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig
from vtd_train.pseudo_label import PseudoLabelOptions, generate_pseudo_labels, pose_pseudo_instances, sem_pseudo_map
from vtd_train.train.config import train_config_from_dict

NO_AUG = AugmentConfig(scales=(), flip_prob=0.0)
TRAINED_AT = 64  # the checkpoints' recorded training scale (the tiny frames are 96 px high)
KEPT_JOINTS = 9  # the pose checkpoint's joints 0..8 score ~0.5, joints 9..17 ~ -0.5


# ---------------------------------------------------------------------------------------------
# Thresholds on hand-made predictions
# ---------------------------------------------------------------------------------------------


def test_sem_pixels_below_the_confidence_threshold_become_ignore():
    sem = torch.tensor([[3, 4, 5], [6, 7, 8]], dtype=torch.uint8)
    score = torch.tensor([[0.29, 0.30, 0.90], [0.10, 0.31, 0.2999]])
    assert sem_pseudo_map(sem, score).tolist() == [[255, 4, 5], [255, 7, 255]]  # default 0.3, as the paper
    assert sem_pseudo_map(sem, score, 0.0).tolist() == sem.tolist()
    assert (sem_pseudo_map(sem, score, 0.95) == 255).all()


def test_predict_reports_the_probability_of_the_predicted_class():
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny("single:sem")).eval()
    images = [torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8) for _ in range(2)]
    batch = prepare_batch(Batch(set_name="seg", images=images, image_sizes=[(64, 96)] * 2, targets=[FrameTargets()] * 2,
                                labels=torch.zeros(2, len(TASK_INDEX), dtype=torch.int8)))
    for p in model.predict(batch, output_sizes=[(96, 144)] * 2):
        assert p.sem.shape == p.sem_score.shape == (96, 144)
        # a max softmax probability over 19 classes lies in [1/19, 1]
        assert float(p.sem_score.min()) >= 1 / 19 - 1e-6 and float(p.sem_score.max()) <= 1 + 1e-6


def test_pose_joints_below_the_threshold_are_dropped_and_empty_persons_left_out():
    kps = torch.zeros(3, 18, 3)
    kps[..., 0], kps[..., 1] = 10.0, 20.0
    kps[0, :, 2] = 0.5  # every joint kept
    kps[0, 4, 2] = 0.19  # ... but this one
    kps[1, :, 2] = 0.1  # no joint left: the person is left out
    kps[2, :, 2] = 0.9  # a person below the person threshold
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 3)
    out = pose_pseudo_instances(kps, torch.tensor([0.8, 0.8, 0.2]), boxes)  # defaults: joints 0.2, persons 0.3
    assert len(out) == 1
    (person,) = out
    assert person["box"] == [1.0, 2.0, 30.0, 40.0] and person["score"] == 0.8
    assert [j[2] for j in person["keypoints"]] == [2] * 4 + [0] + [2] * 13
    assert person["keypoints"][4] == [0.0, 0.0, 0] and person["keypoints"][0] == [10.0, 20.0, 2]
    kps[1, 7, 2] = 0.2  # exactly at the threshold: kept
    out = pose_pseudo_instances(kps, torch.tensor([0.8, 0.8, 0.2]), boxes)
    assert len(out) == 2 and [j[2] for j in out[1]["keypoints"]] == [0] * 7 + [2] + [0] * 10


# ---------------------------------------------------------------------------------------------
# Generation through Ray, on the tiny shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pseudo-ckpt")
    out = {}
    for task in ("sem", "pose"):
        torch.manual_seed(0)
        cfg = VTDNetConfig.tiny(f"single:{task}")
        model = VTDNet(cfg)
        if task == "pose":
            with torch.no_grad():
                model.box_head.predictor.cls_score.bias[1] = 3.0  # pedestrian: score ~0.7
                model.kp_head.out.bias[:KEPT_JOINTS] = 0.5
                model.kp_head.out.bias[KEPT_JOINTS:] = -0.5
        out[task] = str(root / task)
        save_model(out[task], model, cfg, {"config": {"data": {"scales": [TRAINED_AT]}}})
    return out


@pytest.fixture(scope="module")
def family(tiny_shards, checkpoints, ray_cluster, tmp_path_factory) -> str:
    """``vtd pseudo-label`` on the train split, MOTS frames of the tracking set, on 2 Ray workers."""
    out = str(tmp_path_factory.mktemp("pseudo") / "family")
    rc = main(["pseudo-label", "--checkpoint", f"sem={checkpoints['sem']}", "--checkpoint", f"pose={checkpoints['pose']}",
               "--data", tiny_shards, "--out", out, "--require", "track=mots",
               "--address", ray_cluster.address, "--workers", "2"])
    assert rc == 0
    return out


def _samples(url: str) -> list[tuple[str, dict, dict]]:
    return [(s["__key__"], *split_members(s)) for s in iter_shard(url)]


def test_pseudo_shards_mirror_the_image_shards_and_label_only_what_lacks_a_label(tiny_shards, family, checkpoints):
    manifest = read_pseudo_manifest(family)
    assert manifest["source"]["manifest_sha256"] and manifest["thresholds"] == {"sem": 0.3, "pose_joint": 0.2, "pose_person": 0.3}
    assert {t: c["height"] for t, c in manifest["checkpoints"].items()} == {"sem": TRAINED_AT, "pose": TRAINED_AT}
    assert set(manifest["sets"]) == {"det/train", "seg/train", "track/train"}
    seen = Counter()
    ignored = kept = 0
    for fam in families_from_manifest(tiny_shards, "train"):
        for url in fam.urls:
            purl = family + url[len(tiny_shards):]
            images, pseudo = _samples(url), list(iter_pseudo_shard(purl))
            assert [k for k, _, _ in images] == [p["__key__"] for p in pseudo]  # same keys, same order
            for (key, clip, members), psample in zip(images, pseudo):
                doc, sem = split_pseudo_members(psample)
                assert [f["name"] for f in doc["frames"]] == [r["name"] for r in clip["frames"]]
                for i, (rec, pf) in enumerate(zip(clip["frames"], doc["frames"])):
                    real = rec["tasks"]
                    for task in pf["tasks"]:
                        assert task not in real, f"{rec['name']}: pseudo {task} on a frame with the real label"
                        if fam.set_name == "track":
                            assert "mots" in real  # --require track=mots
                        seen[fam.set_name, task] += 1
                    if "sem" in pf["tasks"]:
                        m = decode_label_map(sem[i])
                        assert m.shape == (rec["height"], rec["width"])  # the stored resolution
                        assert set(np.unique(m)) <= set(range(19)) | {255}
                        ignored, kept = ignored + int((m == 255).sum()), kept + int((m != 255).sum())
                    for person in pf.get("pose", []):
                        assert [j[2] for j in person["keypoints"]] == [2] * KEPT_JOINTS + [0] * (18 - KEPT_JOINTS)
                        assert person["score"] >= 0.3
    # every det and MOTS frame lacks sem; pose is made on det, seg and MOTS frames without it
    assert seen["det", "sem"] == 24 and seen["track", "sem"] == 16 and ("seg", "sem") not in seen
    assert seen["det", "pose"] > 0 and seen["seg", "pose"] > 0 and seen["track", "pose"] > 0
    assert ignored > 0 and kept > 0  # the untrained model's confidences straddle 0.3


def test_written_labels_are_the_models_thresholded_predictions(tiny_shards, family, checkpoints):
    """The first det shard's frames, predicted here in-process at the training height, thresholded
    with the same functions: the Ray workers wrote exactly that."""
    (det,) = families_from_manifest(tiny_shards, "train", ("det",))
    frames = list(iter_frames(det.urls[:1]))
    pseudo = list(iter_pseudo_shard(family + det.urls[0][len(tiny_shards):]))
    with torch_threads(1):
        preds = {t: EvalWorker(checkpoints[t], height=TRAINED_AT).predict_frames("det", frames) for t in ("sem", "pose")}
    for f, ps, pp, psample in zip(frames, preds["sem"], preds["pose"], pseudo):
        doc, sem = split_pseudo_members(psample)
        (pf,) = doc["frames"]
        np.testing.assert_array_equal(decode_label_map(sem[0]), sem_pseudo_map(ps.sem, ps.sem_score))
        want = pose_pseudo_instances(pp.keypoints, pp.keypoint_scores, pp.boxes[pp.keypoint_index])
        if "pose" in f.record["tasks"]:
            assert "pose" not in pf["tasks"]
        else:
            assert pf.get("pose", []) == want and ("pose" in pf["tasks"]) == bool(want)


def test_inspect_counts_what_was_written(tiny_shards, family, capsys):
    manifest = read_pseudo_manifest(family)
    report = inspect_pseudo(family)
    assert report["kind"] == "pseudo"
    for key, entry in manifest["sets"].items():
        got = report["sets"][key]
        assert (got["samples"], got["clips"], got["shards"]) == (entry["samples"], entry["clips"], len(entry["shards"]))
        assert got["tasks"] == {t: c for t, c in entry["tasks"].items() if c["samples"]}
    joined = inspect_shards(tiny_shards, pseudo=family)
    plain = inspect_shards(tiny_shards)
    for key, entry in plain["sets"].items():  # the real counts are the plain inspection's
        assert {k: joined["sets"][key][k] for k in entry} == entry
    for key in manifest["sets"]:
        assert joined["sets"][key]["pseudo"] == report["sets"][key]["tasks"]
    assert "pseudo" not in joined["sets"]["det/val"]
    assert main(["data", "inspect", tiny_shards, "--pseudo", family]) == 0
    out = capsys.readouterr().out
    sem = manifest["sets"]["det/train"]["tasks"]["sem"]["samples"]
    assert f"  pseudo — sem: {sem} samples / 0 inst" in out
    assert main(["data", "inspect", family]) == 0
    assert "det/train: 24 frames (24 clips) — pseudo-labels" in capsys.readouterr().out


def test_a_rerun_keeps_complete_shards_and_an_existing_family_needs_overwrite(tiny_shards, family, checkpoints, tmp_path):
    copy = tmp_path / "family"
    shutil.copytree(family, copy)
    opts = PseudoLabelOptions(checkpoints=checkpoints, data=tiny_shards, out=str(copy), require={"track": ("mots",)})
    with pytest.raises(FileExistsError, match="manifest.json already exists"):
        generate_pseudo_labels(opts, distributed=False)
    (copy / "manifest.json").unlink()
    shard = copy / "det" / "train" / "det-train-000000.tar"
    before = shard.stat().st_mtime_ns
    again = generate_pseudo_labels(opts, distributed=False)
    assert shard.stat().st_mtime_ns == before  # kept: its sidecar matches the plan
    assert again["info"]["runner"] == "in-process"
    # the same inputs give the same manifest bytes (a pipeline hashes it)
    assert (copy / "manifest.json").read_bytes() == open(f"{family}/manifest.json", "rb").read()


# ---------------------------------------------------------------------------------------------
# The loader: join and label selection
# ---------------------------------------------------------------------------------------------


def _epoch(shards: str, cfg: LoaderConfig, sets: tuple[str, ...] | None = None) -> list:
    return list(MultiSetDataset(families_from_manifest(shards, "train", sets), cfg, rank=0, world_size=1))


def _same(a, b) -> bool:
    if isinstance(a, RunLengthMap):
        return (isinstance(b, RunLengthMap) and a.shape == b.shape
                and torch.equal(a.values, b.values) and torch.equal(a.lengths, b.lengths))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _written(family: str) -> dict[str, tuple[dict, np.ndarray | None]]:
    """Every pseudo frame by name: (PseudoFrame, sem map or None)."""
    out = {}
    for key, entry in read_pseudo_manifest(family)["sets"].items():
        for sh in entry["shards"]:
            for s in iter_pseudo_shard(f"{family}/{sh['path']}"):
                doc, sem = split_pseudo_members(s)
                for i, pf in enumerate(doc["frames"]):
                    out[pf["name"]] = (pf, decode_label_map(sem[i]) if i in sem else None)
    return out


def test_the_loader_joins_pseudo_labels_where_real_ones_are_missing(tiny_shards, family):
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, shuffle_buffer=4, require_tasks={"track": ("mots",)})
    plain, joined = _epoch(tiny_shards, cfg), _epoch(tiny_shards, replace(cfg, pseudo=family))
    written = _written(family)
    assert len(plain) == len(joined) > 0
    pseudo_seen = Counter()
    for a, b in zip(plain, joined):
        assert a.meta == b.meta and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
        for i, name in enumerate(m["name"] for m in a.meta):
            pf, sem = written[name]
            for task, col in TASK_INDEX.items():
                src_a, src_b = int(a.labels[i, col]), int(b.labels[i, col])
                if src_a != LabelSource.ABSENT:
                    assert src_b == src_a  # a real label stays real
                elif task in pf["tasks"]:
                    assert src_b == LabelSource.PSEUDO and bool(b.is_pseudo(task)[i])
                    pseudo_seen[task] += 1
                else:
                    assert src_b == LabelSource.ABSENT
            ta, tb = a.targets[i], b.targets[i]
            for fld in FrameTargets.__dataclass_fields__:
                va, vb = getattr(ta, fld), getattr(tb, fld)
                if fld == "sem" and "sem" in pf["tasks"] and not a.has("sem")[i]:
                    assert va is None and np.array_equal(vb.expand().numpy(), sem)
                elif fld in ("keypoints", "pose_boxes") and "pose" in pf["tasks"] and not a.has("pose")[i]:
                    want = [q["keypoints"] for q in pf["pose"]] if fld == "keypoints" else [q["box"] for q in pf["pose"]]
                    assert va is None and torch.equal(vb, torch.tensor(want, dtype=torch.float32))
                else:
                    assert _same(va, vb), f"{name}: real {fld} changed by the join"
    assert pseudo_seen["sem"] > 0 and pseudo_seen["pose"] > 0
    # through a DataLoader worker (packed into shared memory): the same batches
    fams = families_from_manifest(tiny_shards, "train")
    ds = MultiSetDataset(fams, replace(cfg, pseudo=family, num_workers=1), rank=0, world_size=1)
    for b, c in zip(joined, build_train_loader(ds)):
        assert torch.equal(b.labels, c.labels) and b.meta == c.meta


def test_pseudo_labels_train_with_the_task_loss(tiny_shards, family):
    """A det batch whose sem and pose labels are all pseudo: the tiny VTDNet's sem and pose
    decoders get their usual losses and gradients from them."""
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, pseudo=family)
    batch = next(b for b in _epoch(tiny_shards, cfg, ("det",)) if b.is_pseudo("sem").all() and b.is_pseudo("pose").any())
    torch.manual_seed(0)
    model = VTDNet(VTDNetConfig.tiny())
    losses = model(prepare_batch(batch))
    assert {"loss/sem/ce", "loss/pose/heatmap"} <= set(losses), sorted(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss/sem/ce"] + losses["loss/pose/heatmap"]).backward()
    for decoder in (model.decoder("sem"), model.decoder("pose")):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for m in decoder for p in m.parameters())


def test_data_tasks_drop_every_other_task_pseudo_ones_too(tiny_shards, family):
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, tasks=("det", "mot"), pseudo=family)
    batches = _epoch(tiny_shards, cfg)
    keep = [TASK_INDEX["det"], TASK_INDEX["mot"]]
    others = [c for c in TASK_INDEX.values() if c not in keep]
    assert {b.set_name for b in batches} == {"det", "seg", "track"}
    for b in batches:
        assert (b.labels[:, others] == LabelSource.ABSENT).all()
        assert (b.labels[:, keep] != LabelSource.PSEUDO).all()
        for t in b.targets:  # their label maps and poses are not even read
            assert t.sem is None and t.drivable is None and t.lane is None and t.instance_map is None and t.keypoints is None
        if b.set_name in ("det", "track"):
            assert b.has("det" if b.set_name == "det" else "mot").all()
    with pytest.raises(ValueError, match="LoaderConfig.tasks"):
        LoaderConfig(tasks=("det", "bogus"))


def test_the_config_validates_the_task_names():
    cfg = train_config_from_dict({"data": {"uri": "s", "tasks": ["det", "mot"], "pseudo": "p"}}, source="c.yaml")
    assert cfg.data.loader_config(batch_size=2, seed=0).tasks == ("det", "mot")
    assert cfg.data.loader_config(batch_size=2, seed=0).pseudo == "p"
    with pytest.raises(VTDInputError, match=r"c\.yaml: data: tasks: .*'segm'"):
        train_config_from_dict({"data": {"uri": "s", "tasks": ["det", "segm"]}}, source="c.yaml")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_pseudo_labels_of_another_dataset_are_refused(tiny_shards, family, tmp_path):
    other = tmp_path / "other-shards"
    shutil.copytree(tiny_shards, other)
    doc = json.loads((other / "manifest.json").read_text())
    doc["options"]["bdd_root"] = "/somewhere/else"
    (other / "manifest.json").write_text(json.dumps(doc, indent=2))
    with pytest.raises(DataError, match=rf"{family}/manifest.json: source.manifest_sha256: .*{other}/manifest.json"):
        MultiSetDataset(families_from_manifest(str(other), "train"), LoaderConfig(pseudo=family), rank=0, world_size=1)
    with pytest.raises(DataError, match="belong to other shards"):
        inspect_shards(str(other), pseudo=family)
    with pytest.raises(DataError, match="not a pseudo-label family"):
        MultiSetDataset(families_from_manifest(tiny_shards, "train"), LoaderConfig(pseudo=tiny_shards), rank=0, world_size=1)


def test_a_missing_pseudo_shard_is_named(tiny_shards, family, tmp_path):
    copy = tmp_path / "family"
    shutil.copytree(family, copy)
    gone = copy / "det" / "train" / "det-train-000002.tar"
    gone.unlink()
    cfg = LoaderConfig(batch_size=2, num_workers=0, augment=NO_AUG, pseudo=str(copy))
    with pytest.raises(DataError, match=rf"{gone}: pseudo shard is missing"):
        _epoch(tiny_shards, cfg, ("det",))
    with pytest.raises(DataError, match=rf"{gone}: pseudo shard is missing"):
        inspect_pseudo(str(copy))


def test_the_cli_refuses_a_checkpoint_without_the_task(tiny_shards, checkpoints, tmp_path, capsys):
    out = str(tmp_path / "p")
    base = ["pseudo-label", "--data", tiny_shards, "--out", out]
    assert main(base + ["--checkpoint", f"pose={checkpoints['sem']}"]) == 2
    assert "the model predicts ['sem'], not 'pose'" in capsys.readouterr().err
    assert main(base + ["--checkpoint", f"det={checkpoints['sem']}"]) == 2
    assert "pseudo-labels are made for ['sem', 'pose']" in capsys.readouterr().err
    assert main(base + ["--checkpoint", f"sem={tmp_path / 'none'}"]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
