"""``jobs/taskprompter.yaml``: the pipeline file for both profiles (the paper's schedule; the tiny
profile = ``configs/taskprompter-tiny.yaml``), errors naming file / stage / key, the family rules
of a pipeline, and the tiny pipeline run through real Ray jobs (init → evaluate, train on 2 gloo
workers → evaluate) with mIoU / RMSE / mDS (cityscapesscripts' own) in its manifest and report."""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import pytest
import yaml

from data_pipeline.errors import VTDInputError
from orchestrator.spec import load_pipeline, pipeline_from_dict
from vtd_train.train.config import load_train_config

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "jobs" / "taskprompter.yaml"


@functools.cache
def raw_pipeline() -> dict:
    return yaml.safe_load(PIPELINE.read_text())


def spec_with(change, profile: str = "tiny"):
    raw = copy.deepcopy(raw_pipeline())
    change(raw)
    return pipeline_from_dict(raw, profile=profile, source="tp.yaml")


def test_both_profiles_validate_the_paper_schedule_and_the_tiny_config():
    paper = load_pipeline(str(PIPELINE), profile="paper")
    assert paper.family == "taskprompter" and list(paper.stages) == ["untrained", "train"]
    t = paper.stages["train"].train
    assert t.family == "taskprompter" and t.model.swin.embed_dim == 128 and t.model.swin.depths == (2, 2, 18, 2)  # Swin-B
    assert (t.optimizer.lr, t.optimizer.weight_decay, t.optimizer.grad_clip) == (2e-5, 0.0, 10.0)
    assert t.global_batch_size == 2 and t.max_steps == 40000 and t.lr_schedule.policy == "poly"
    assert t.epochs * (2975 // 2) >= 40000  # the epochs cover the 40K iterations on Cityscapes' 2,975 frames
    assert t.model.image_size == (1024, 2048) and t.model.resized_size == (768, 1536)  # evaluated at 1024×2048
    assert t.model.loss_weights == {"sem": 100.0, "depth": 1.0, "det3d": 1.0} and t.resources.use_gpu
    assert paper.stages["untrained"].evaluate and paper.stages["train"].evaluate

    tiny = load_pipeline(str(PIPELINE), profile="tiny")
    own = load_train_config(str(REPO / "configs" / "taskprompter-tiny.yaml"))
    t = tiny.stages["train"].train
    assert tiny.family == "taskprompter" and not t.resources.use_gpu
    for key in ("model", "optimizer", "lr_schedule", "epochs", "global_batch_size", "resources", "precision", "seed"):
        assert getattr(t, key) == getattr(own, key), key  # the demo's run, as a pipeline


def test_errors_name_file_stage_and_key():
    with pytest.raises(VTDInputError) as e:
        spec_with(lambda r: r["stages"]["train"].update(train={"optimizer": {"lrr": 1e-3}}))
    assert str(e.value).startswith("tp.yaml: stages.train") and "lrr" in str(e.value), str(e.value)
    with pytest.raises(VTDInputError, match=r"^tp.yaml: stages.train: unknown key\(s\) \['epochs'\]"):
        spec_with(lambda r: r["stages"]["train"].update(epochs=3), profile="paper")


def test_family_rules():
    # stage kinds of VTDNet's CPF protocol are not a TaskPrompter pipeline's
    with pytest.raises(VTDInputError, match=r"stages.m.kind: 'merge' is not a stage of a taskprompter pipeline"):
        spec_with(lambda r: r["stages"].update(m={"kind": "merge", "base": "train", "decoders": ["ft"]},
                                              ft={"kind": "train", "init": "train", "trainable": ["sem"]}))
    # one family per pipeline
    with pytest.raises(VTDInputError, match=r"one model family; stages.\w+ builds taskprompter, stages.vtd builds vtdnet"):
        spec_with(lambda r: r["stages"].update(vtd={"kind": "train", "train": {"model": {"family": "vtdnet", "preset": "tiny"}}}))
    # a decoder fine-tuning of TaskPrompter: only that task's modules train (checked on its model)
    spec = spec_with(lambda r: r["stages"].update(ft={"kind": "train", "init": "train", "trainable": ["depth"]}))
    from vtd_train.taskprompter.model import TaskPrompter
    from vtd_train.train.optim import freeze

    model = TaskPrompter(spec.stages["ft"].train.model)
    kept = {id(p) for p in freeze(model, spec.stages["ft"].freeze)}
    names = [n for n, p in model.named_parameters() if id(p) in kept]
    assert names and all(".depth." in n or n.startswith("heads.depth.") for n in names), names
    assert any(n.startswith("heads.depth.") for n in names) and "backbone" in spec.stages["ft"].freeze
    with pytest.raises(VTDInputError, match=r"stages.ft.trainable: trainable task 'det' has no decoder in this taskprompter model"):
        spec_with(lambda r: r["stages"].update(ft={"kind": "train", "init": "train", "trainable": ["det"]}))


@pytest.mark.ray
def test_tiny_pipeline_as_ray_jobs(ray_cluster, tmp_path):
    """init → its evaluation, train → its evaluation, each a Ray job on the session's cluster; the
    manifest and the report carry mIoU, depth RMSE and mDS, the paper's rows under them."""
    import ray

    from data_pipeline.cityscapes3d.convert import Cityscapes3DConvertOptions, convert_cityscapes3d
    from data_pipeline.cityscapes3d.synth import generate
    from orchestrator.cli import _connect_jobs_api
    from orchestrator.runner import Orchestrator
    from orchestrator.state import RunManifest
    from vtd_train.checkpoint import model_family
    from vtd_train.train.checkpointing import load_checkpoint

    generate(tmp_path / "root", seed=0, size="tiny")
    shards = str(tmp_path / "shards")
    convert_cityscapes3d(Cityscapes3DConvertOptions(root=str(tmp_path / "root"), out=shards, shard_size=4, progress=False))
    raw = copy.deepcopy(raw_pipeline())
    p = raw["profiles"]["tiny"]
    p.update(poll_s=0.3, retries=0, retry_backoff_s=0)
    # 2 gloo workers (global batch 4): the family's Ray Train run is data-parallel (the replicas
    # checked identical below); 4 epochs of 2 steps on the 8 frames
    p["base"].update(epochs=4, global_batch_size=4, report_every_steps=4)
    p["base"]["resources"].update(num_workers=2, cpus_per_worker=1)
    path = tmp_path / "taskprompter.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_pipeline(str(path), profile="tiny")
    client = _connect_jobs_api("http://" + ray._private.worker.get_dashboard_url())
    lines: list[str] = []
    orch = Orchestrator(spec, run="tp-tiny", data=shards, storage=str(tmp_path / "runs"), client=client,
                        python=sys.executable, log=lines.append)
    assert orch.run() == 0, "\n".join(lines)
    m = RunManifest.load(orch.run_dir)
    assert m is not None and m.state == "succeeded"
    assert m.stages["train"].outputs["global_step"] == 8  # 8 frames, batch 4, 4 epochs
    tc = load_checkpoint(m.stages["train"].outputs["checkpoint"])
    assert tc.meta["world_size"] == 2 and tc.meta["replica_divergence"] == 0.0
    assert model_family(m.stages["train"].outputs["checkpoint"]) == "taskprompter"
    losses = tc.progress.epoch_losses
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    before, after = (m.stages[f"eval-{s}"].outputs for s in ("untrained", "train"))
    for out in (before, after):
        assert set(out["metrics"]) == {"mds", "miou", "rmse_depth"} and out["scores"] == {}
        assert out["report"].endswith("report.md") and Path(out["report"]).exists()
        # mDS is cityscapesscripts' own: its results file beside the report
        results = json.loads((Path(out["report"]).parent / "det3d" / "results.json").read_text())
        assert results["eval_params"]["matching_method"] == "Modal"
    assert after["metrics"]["miou"] > before["metrics"]["miou"] + 10  # 8 steps: measured 0.0 → 27.5
    assert any("eval-train: succeeded" in ln and "RMSE" in ln and "mDS" in ln for ln in lines), lines
    report = json.loads(Path(orch.run_dir, "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["untrained", "train"]
    md = Path(orch.run_dir, "report.md").read_text()
    assert "| stage | mDS ↑ | mIoU ↑ | RMSE ↓ | time |" in md and "| TaskPrompter (paper, Swin-B) | 32.94 | 77.72 | 6.78 |  |" in md
