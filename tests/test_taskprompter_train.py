"""TaskPrompter through the training shell and ``vtd evaluate``: the ``model.family`` switch, the
poly schedule, the Cityscapes-3D loader (balanced, deterministic, random access by frame),
family-tagged checkpoints and the evaluation (mIoU, depth RMSE, mDS from cityscapesscripts). The
2-worker Ray Train run and ``vtd evaluate`` of its checkpoint run as the stages of
``jobs/taskprompter.yaml`` in tests/test_taskprompter_pipeline.py (one Ray run for both)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d
from data_pipeline.cityscapes3d.loader import Cityscapes3DDataset, build_loader
from data_pipeline.cityscapes3d.synth import generate
from data_pipeline.errors import DataError, VTDInputError
from vtd_train.checkpoint import CheckpointError, load_model, model_family, save_model
from vtd_train.evaluation.cityscapes3d.evaluate import evaluate_taskprompter
from vtd_train.taskprompter.batch import collate_batch
from vtd_train.taskprompter.config import tiny
from vtd_train.taskprompter.model import TaskPrompter
from vtd_train.train.config import LRScheduleConfig, load_train_config, train_config_from_dict
from vtd_train.train.optim import lr_at

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "taskprompter-tiny.yaml"


@pytest.fixture(scope="module")
def cs3d_shards(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("cs3d-train")
    generate(d / "root", seed=0, size="tiny")
    out = str(d / "shards")
    convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(d / "root"), out=out, shard_size=3, progress=False))
    return out


def test_config_family_switch_and_errors(tmp_path):
    cfg = load_train_config(str(CONFIG))
    assert cfg.family == "taskprompter" and cfg.model.image_size == (128, 256) and cfg.lr_schedule.policy == "poly"
    # the plain form (a pipeline stage's config.yaml, train_state.json) reads back as the same config
    assert train_config_from_dict(json.loads(json.dumps(cfg.to_dict())), source="x.yaml") == cfg
    base = {"data": {"uri": "x"}, "model": {"family": "taskprompter", "preset": "paper"}}
    assert train_config_from_dict(base).model.swin.embed_dim == 128
    bad = [({"model": {"family": "taskprompter", "preset": "huge"}}, "preset 'huge'"),
           ({"model": {"family": "tp"}}, "family must be one of"),
           ({"model": {"family": "taskprompter", "tasks": ["sem", "flow"]}}, "tasks"),
           ({"data": {"uri": "x", "sets": ["det"]}}, "data.sets is for VTDNet"),
           ({"lr_schedule": {"policy": "cosine"}}, "policy must be one of")]
    for change, fragment in bad:
        with pytest.raises(VTDInputError, match=fragment):
            train_config_from_dict({**base, **change}, source="x.yaml")


def test_poly_schedule():
    cfg = LRScheduleConfig(policy="poly", power=0.9)
    assert lr_at(0, base_lr=2e-5, steps_per_epoch=10, cfg=cfg, total_steps=100) == 2e-5
    assert lr_at(50, base_lr=2e-5, steps_per_epoch=10, cfg=cfg, total_steps=100) == pytest.approx(2e-5 * 0.5**0.9)
    assert lr_at(100, base_lr=2e-5, steps_per_epoch=10, cfg=cfg, total_steps=100) == 0.0


def test_loader_is_balanced_deterministic_and_worker_count_free(cs3d_shards):
    cfg = tiny()
    collate = functools.partial(collate_batch, tasks=cfg.tasks, size=(64, 128))  # stored at 128×256: resized
    ranks = [Cityscapes3DDataset(cs3d_shards, "train", batch_size=2, rank=r, world_size=2, seed=1, collate=collate) for r in (0, 1)]
    assert [len(d) for d in ranks] == [2, 2]  # 8 frames, global batch 4
    for e in (0, 1):
        for d in ranks:
            d.set_epoch(e)
        frames = [i for d in ranks for s in range(len(d)) for i in d.step_frames(s)]
        assert sorted(frames) == list(range(8))  # every frame once per epoch, ranks disjoint
    ranks[0].set_epoch(0)
    one = [b.names for b in build_loader(ranks[0], 0)]
    two = [b.names for b in build_loader(ranks[0], 2)]
    assert one == two and len(one) == 2
    b = next(iter(build_loader(ranks[0], 0)))
    assert b.images.shape == (2, 3, 64, 128) and b.targets.sem.shape == (2, 64, 128) and b.targets.depth.shape == (2, 64, 128)
    # 2D targets follow the resize, depths do not
    full = Cityscapes3DDataset(cs3d_shards, "train", batch_size=2, seed=1,
                               collate=functools.partial(collate_batch, tasks=cfg.tasks, size=(128, 256)))
    f = next(iter(build_loader(full, 0)))
    assert f.names == next(iter(build_loader(Cityscapes3DDataset(cs3d_shards, "train", batch_size=2, seed=1, collate=collate), 0))).names
    g_half, g_full = next(iter(build_loader(Cityscapes3DDataset(cs3d_shards, "train", batch_size=2, seed=1, collate=collate), 0))).targets.det3d[0], f.targets.det3d[0]
    assert torch.allclose(g_half.centers2d * 2, g_full.centers2d) and torch.equal(g_half.depths, g_full.depths)


def test_loader_rejects_bdd_shards(tiny_shards):
    with pytest.raises(DataError, match="benchmark"):
        Cityscapes3DDataset(tiny_shards, "train", batch_size=2)


def test_checkpoint_records_the_family(tmp_path):
    cfg = tiny(tasks=("sem",))
    save_model(str(tmp_path / "m"), TaskPrompter(cfg), cfg, {"note": "untrained"})
    assert model_family(str(tmp_path / "m")) == "taskprompter"
    model, got, _ = load_model(str(tmp_path / "m"), family=None)
    assert got == cfg and isinstance(model, TaskPrompter)
    with pytest.raises(CheckpointError, match="holds a taskprompter model"):
        load_model(str(tmp_path / "m"))  # the VTDNet commands' default


def test_evaluation_of_a_single_task_model(cs3d_shards, tmp_path):
    torch.manual_seed(0)
    model = TaskPrompter(tiny(tasks=("depth",)))
    r = evaluate_taskprompter(model=model, data=cs3d_shards, split="val", out_dir=tmp_path / "ev")
    assert set(r["metrics"]) == {"rmse_depth"} and r["metrics"]["rmse_depth"] > 0
    assert r["missing"] == {"miou": "the model has no sem head", "mds": "the model has no det3d head"}
    assert r["info"]["labelled"]["frames"] == 4 and model.training  # left in the mode it came in
    doc = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert doc["rmse_depth"] == r["metrics"]["rmse_depth"]
    assert "| TaskPrompter (paper, Swin-B) | 32.94 | 77.72 | 6.78 |" in (tmp_path / "ev" / "report.md").read_text()


def test_model_init_writes_the_configs_family(tmp_path):
    """``vtd model init`` (a pipeline's ``init`` stage) builds the config's family, seeded as
    ``vtd train`` seeds: the same weights the training run starts from."""
    from vtd_train.checkpoint_ops import init_checkpoint
    from vtd_train.train.families import build_model

    init_checkpoint(str(CONFIG), str(tmp_path / "m"))
    model, cfg, meta = load_model(str(tmp_path / "m"), family="taskprompter")
    assert cfg == load_train_config(str(CONFIG)).model and meta["step"] == 0
    torch.manual_seed(load_train_config(str(CONFIG)).seed)
    fresh = build_model(load_train_config(str(CONFIG)))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_demo_arguments_config_and_flagging(tmp_path):
    """``vtd demo --benchmark cityscapes3d``: its arguments, the training config it runs (the tiny
    config pointed into the workdir) and the comparison that flags a metric that did not improve
    (RMSE: lower is better; a missing metric did not improve)."""
    from vtd_train.cli import build_parser
    from vtd_train.demo_cityscapes3d import compare_metrics, write_config

    a = build_parser().parse_args(["demo", "--benchmark", "cityscapes3d", "--workdir", str(tmp_path)])
    assert (a.benchmark, a.size, a.func.__name__) == ("cityscapes3d", None, "_cmd_demo")
    assert build_parser().parse_args(["demo"]).benchmark == "bdd100k"  # today's demo stays the default
    cfg = load_train_config(str(write_config(tmp_path, tmp_path / "shards")))
    assert cfg.family == "taskprompter" and cfg.data.uri == str(tmp_path / "shards")
    assert cfg.storage_path == str(tmp_path / "runs") and cfg.epochs == load_train_config(str(CONFIG)).epochs

    lines, bad = compare_metrics({"mds": 0.0, "miou": 10.0, "rmse_depth": 9.0}, {"mds": 5.0, "miou": 30.0, "rmse_depth": 4.0})
    assert bad == [] and "3 of 3 metrics improved" in lines[-1] and "+20.00" in lines[2] and "-5.00" in lines[3]
    lines, bad = compare_metrics({"mds": 0.0, "miou": 10.0, "rmse_depth": 4.0}, {"mds": 0.0, "miou": 30.0, "rmse_depth": 9.0})
    assert bad == ["mds", "rmse_depth"] and lines[1].endswith("<- did not improve") and lines[3].endswith("<- did not improve")
    assert "did not improve: mds, rmse_depth" in lines[-1]
    _, bad = compare_metrics({"mds": 0.0, "miou": 10.0, "rmse_depth": 4.0}, {"miou": 30.0, "rmse_depth": 3.0})
    assert bad == ["mds"]
