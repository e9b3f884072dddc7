"""``vtd tune``: the search file, the trials' configs, the tune stage of a pipeline, and a real
loss-weight sweep on the session's shared Ray cluster (ASHA over the validation VTDA that the
training loop reports, the winner's checkpoint verified and scored as reported)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from data_pipeline.errors import VTDInputError
from orchestrator.spec import load_pipeline, pipeline_from_dict
from orchestrator.stages import StageExecutor
from vtd_train.train.config import train_config_from_dict
from vtd_train.tune import SearchConfig, load_search_config, trial_config, trial_name, validations

REPO = Path(__file__).resolve().parent.parent


def base_config(data: str, storage: str, **over) -> dict:
    raw = {"name": "sweep", "stage": "tune", "storage_path": storage, "precision": "fp32", "epochs": 2,
           "global_batch_size": 2, "resources": {"num_workers": 1, "cpus_per_worker": 1},
           "data": {"uri": data, "sets": ["det"], "scales": [64], "loader_workers": 0},
           "model": {"preset": "tiny"}, "optimizer": {"lr": 1e-3}, "lr_schedule": {"milestones": []},
           "checkpoint": {"every_steps": 0, "at_epoch_end": False, "num_to_keep": 2}, "report_every_steps": 50}
    return {**raw, **over}


@pytest.mark.parametrize("raw, fragment", [
    ({"loss_weights": {}}, "name at least one loss weight"),
    ({"loss_weights": {"detection": [1.0]}}, "loss_weights.detection: unknown loss weight"),
    ({"loss_weights": {"det": 2.0}}, "loss_weights.det: expected a non-empty list"),
    ({"loss_weights": {"det": [1.0, -1.0]}}, "values must be numbers >= 0, got [-1.0]"),
    ({"loss_weights": {"det": [1.0]}, "reduction_factor": 1}, "reduction_factor must be >= 2"),
    ({"loss_weights": {"det": [1.0]}, "max_concurrent": 0}, "max_concurrent must be >= 1"),
    ({"loss_weights": {"det": [1.0]}, "num_samples": 3}, "num_samples"),
])
def test_search_file_errors_name_the_file_and_key(tmp_path, raw, fragment):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(VTDInputError) as e:
        load_search_config(str(path))
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)


def test_the_grid_and_each_trials_training_config(tmp_path):
    search = SearchConfig(loss_weights={"det": [1.0, 4.0], "sem": [0.5, 2.0]}, validate_every_epochs=2)
    grid = search.grid()
    assert grid == [{"det": 1.0, "sem": 0.5}, {"det": 1.0, "sem": 2.0}, {"det": 4.0, "sem": 0.5}, {"det": 4.0, "sem": 2.0}]
    base = train_config_from_dict(base_config("/data", str(tmp_path), epochs=5))
    names = [trial_name("sweep", w) for w in grid]
    assert len(set(names)) == 4 and names == [trial_name("sweep", dict(reversed(list(w.items())))) for w in grid]
    cfg = trial_config(base, search, grid[2])
    assert cfg.name == names[2] and cfg.model.loss_weights.det == 4.0 and cfg.model.loss_weights.sem == 0.5
    # every other weight and setting is the base run's
    assert cfg.model.loss_weights.lane == base.model.loss_weights.lane and cfg.optimizer == base.optimizer
    assert cfg.validation.every_epochs == 2 and cfg.checkpoint.at_epoch_end
    assert validations(cfg) == 3  # after epochs 2, 4 and the last (5)


def test_a_profile_turns_the_disabled_tune_stage_on():
    raw = yaml.safe_load((REPO / "jobs" / "cpf.yaml").read_text())
    assert "tune_joint" not in load_pipeline(str(REPO / "jobs" / "cpf.yaml"), profile="tiny").stages
    on = copy.deepcopy(raw)
    on["profiles"]["tiny"]["stages"]["tune_joint"]["enabled"] = True
    spec = pipeline_from_dict(on, profile="tiny", source="cpf.yaml")
    st = spec.stages["tune_joint"]
    assert st.kind == "tune" and st.init == "curriculum_ins_pose" and st.pseudo == "pseudo_labels"
    assert len(st.search.grid()) == 4 and st.train.epochs == 3
    assert "eval-tune_joint" not in spec.stages  # evaluation stages are added by the runner, not the spec
    bad = copy.deepcopy(on)
    bad["stages"]["tune_joint"]["search"]["loss_weights"] = {"nosuch": [1.0]}
    with pytest.raises(VTDInputError, match=r"cpf.yaml: stages.tune_joint.search: loss_weights.nosuch: unknown"):
        pipeline_from_dict(bad, profile="tiny", source="cpf.yaml")


def test_the_stage_after_a_sweep_trains_with_its_weights_and_loss_weights(tmp_path):
    spec = load_pipeline(str(REPO / "jobs" / "tune.yaml"), profile="tiny")
    ex = StageExecutor(spec, str(tmp_path / "run"), "/data/shards", "python")
    sweep = ex.prepare(spec.stages["sweep"], "k" * 16, {})
    assert " tune --config " in sweep.entrypoint and "--search" in sweep.entrypoint
    written = load_search_config(str(Path(sweep.directory) / "search.yaml"))
    assert written == spec.stages["sweep"].search
    winner = {"checkpoint": "/ckpt/best", "loss_weights": {**dataclasses.asdict(spec.stages["refine"].train.model.loss_weights),
                                                           "det": 4.0, "sem": 2.0}}
    refine = ex.prepare(spec.stages["refine"], "r" * 16, {"sweep": winner})
    cfg = yaml.safe_load((Path(refine.directory) / "config.yaml").read_text())
    assert cfg["init_checkpoint"] == "/ckpt/best"
    assert cfg["model"]["loss_weights"] == winner["loss_weights"]


@pytest.mark.ray
def test_a_sweep_keeps_the_trial_with_the_best_validation_vtda(ray_cluster, tiny_shards, tmp_path):
    """Two trials (detection weight 0 and 2) of a tiny model on the detection set, validated at
    both epoch ends; the summary's winner has the highest last VTDA, its checkpoint is intact,
    carries its loss weights, and scores on validation exactly what its trial reported."""
    from vtd_train.checkpoint import load_model, verify_checkpoint
    from vtd_train.evaluation.evaluate import evaluate
    from vtd_train.tune import run_sweep

    base = train_config_from_dict(base_config(tiny_shards, str(tmp_path / "runs")))
    search = SearchConfig(loss_weights={"det": [0.0, 2.0]}, max_concurrent=2)
    summary = run_sweep(base, search)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    trials = {t["name"]: t for t in summary["trials"]}
    assert set(trials) == {trial_name("sweep", {"det": 0.0}), trial_name("sweep", {"det": 2.0})}
    assert summary["max_validations"] == 2
    assert all(not t["error"] and 1 <= t["validations"] <= 2 for t in trials.values()), trials
    best = max(trials.values(), key=lambda t: t["vtda"][-1])
    assert summary["trial"] == best["name"] and summary["vtda"] == best["vtda"][-1]
    for t in trials.values():  # ASHA stops a trial only below the leader of its rung
        if t["validations"] < 2:
            assert t["vtda"][-1] < max(o["vtda"][0] for o in trials.values() if o is not t)

    verify_checkpoint(summary["checkpoint"])
    assert Path(summary["checkpoint"]).parent.name == best["name"]
    _, cfg, _ = load_model(summary["checkpoint"])
    assert cfg.loss_weights.det == best["loss_weights"]["det"] == summary["loss_weights"]["det"]
    scored = evaluate(summary["checkpoint"], tiny_shards, split="val", overlays=0, distributed=False, height=64)
    assert scored["vtda"] == pytest.approx(summary["vtda"], abs=1e-6)


def test_a_finished_sweep_stage_outputs_the_winner(tmp_path):
    """What the orchestrator records of a tune stage: the winner's checkpoint with its content
    hash, its loss weights and the trials; a sweep that wrote no result is an error naming it."""
    from orchestrator.state import checkpoint_hash
    from vtd_train.checkpoint import save_model
    from vtd_train.model.vtdnet import VTDNet, VTDNetConfig

    spec = load_pipeline(str(REPO / "jobs" / "tune.yaml"), profile="tiny")
    ex = StageExecutor(spec, str(tmp_path / "run"), "/data/shards", "python")
    d = Path(ex.directory("sweep", "k" * 16))
    with pytest.raises(FileNotFoundError, match="result.json: the sweep ended without writing its result"):
        ex.collect(spec.stages["sweep"], "k" * 16)
    cfg = VTDNetConfig.tiny("single:tag")
    ckpt = str(d / "ray" / "sweep-0a1b2c3d" / "checkpoint_step00000002_abcdef")
    save_model(ckpt, VTDNet(cfg), cfg)
    trials = [{"name": "sweep-0a1b2c3d", "loss_weights": {"det": 4.0}, "vtda": [50.0, 61.0], "validations": 2, "error": None}]
    (d / "result.json").write_text(json.dumps({"checkpoint": ckpt, "trial": "sweep-0a1b2c3d", "vtda": 61.0,
                                               "loss_weights": {"det": 4.0, "sem": 1.0}, "trials": trials}))
    out = ex.collect(spec.stages["sweep"], "k" * 16)
    assert out["checkpoint"] == ckpt and out["hash"] == checkpoint_hash(ckpt)
    assert out["loss_weights"] == {"det": 4.0, "sem": 1.0} and out["vtda"] == 61.0
    assert out["trials"] == [{"name": "sweep-0a1b2c3d", "loss_weights": {"det": 4.0}, "vtda": [50.0, 61.0]}]
    assert ex.still_valid(out)
