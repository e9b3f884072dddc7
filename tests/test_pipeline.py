"""The CPF pipeline orchestrator: pipeline-file validation, and real Ray jobs on the session's
shared cluster (its Jobs API): a killed and restarted orchestrator, a retried stage, cancel, a
changed stage, frozen parameters and the merge."""

from __future__ import annotations

import copy
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_pipeline.errors import VTDInputError
from orchestrator.spec import load_pipeline, pipeline_from_dict
from orchestrator.state import RunManifest, checkpoint_hash

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Pipeline files (no Ray)
# ---------------------------------------------------------------------------------------------

BASE_PROFILE = {
    "data": "/data", "storage": "/runs",
    "base": {"precision": "fp32", "global_batch_size": 2, "max_steps": 2, "epochs": 1,
             "resources": {"num_workers": 1, "cpus_per_worker": 1}, "model": {"preset": "tiny"},
             "data": {"scales": [32], "loader_workers": 0}, "lr_schedule": {"milestones": []},
             "checkpoint": {"every_steps": 0, "at_epoch_end": False, "num_to_keep": 1}},
}


def doc(stage_defs: dict, **profile) -> dict:
    return {"pipeline": "p", "stages": stage_defs, "profiles": {"t": {**copy.deepcopy(BASE_PROFILE), **profile}}}


def check_error(raw: dict, *needles: str) -> None:
    with pytest.raises(VTDInputError) as e:
        pipeline_from_dict(raw, profile="t", source="p.yaml")
    msg = str(e.value)
    assert msg.startswith("p.yaml"), msg
    for n in needles:
        assert n in msg, msg


def test_cpf_yaml_is_the_papers_protocol():
    spec = load_pipeline(str(REPO / "jobs" / "cpf.yaml"), profile="tiny")
    st = spec.stages
    # curriculum: det + MOT first, then ins + pose with everything else frozen, from those weights
    assert st["curriculum_loc"].train.data.tasks == ("det", "mot")
    b = st["curriculum_ins_pose"]
    assert b.init == "curriculum_loc" and set(b.trainable) == {"ins", "pose"}
    assert "backbone" in b.freeze and "rpn" in b.freeze and "mask_head" not in b.freeze and "kp_head" not in b.freeze
    # pseudo-labels from the single-task baselines, joint training from the curriculum with them
    assert st["pseudo_labels"].checkpoints == {"sem": "baseline_sem", "pose": "baseline_pose"}
    assert st["baseline_sem"].train.model.tasks == ("sem",)
    joint = st["joint"]
    assert joint.init == "curriculum_ins_pose" and joint.pseudo == "pseudo_labels"
    assert joint.train.data.require_tasks == {"track": ("mots",)} and not joint.freeze
    # one fine-tuning stage per decoder (MOTS has none), lr ÷ 10, rest frozen
    fts = [n for n in st if n.startswith("finetune_")]
    assert sorted(fts) == sorted(f"finetune_{t}" for t in ("tag", "det", "ins", "pose", "drivable", "lane", "sem", "flow", "mot"))
    ft = st["finetune_sem"]
    assert ft.train.optimizer.lr == pytest.approx(joint.train.optimizer.lr / 10)
    assert ft.train.data.tasks == ("sem",) and "seg_decoders.drivable" in ft.freeze and "seg_decoders.sem" not in ft.freeze
    # the tiny profile gives pose and lane longer fine-tunings at the full rate (its lr_scale
    # wins over the stage's), the other fine-tunings keep the stage's ÷ 10 and 2 epochs
    assert st["finetune_pose"].train.optimizer.lr == pytest.approx(joint.train.optimizer.lr)
    assert st["finetune_pose"].train.epochs == 20 and ft.train.epochs == 2
    # ... and the lane fine-tuning its own rate (4× the joint stage's: 2% of the pixels are lane)
    assert st["finetune_lane"].train.optimizer.lr == pytest.approx(4e-3) and st["finetune_lane"].train.epochs == 12
    assert st["finetune_flow"].train.data.ref_range == 1 and joint.train.data.ref_range == 3
    assert st["final"].base == "joint" and set(st["final"].decoders) == set(fts)
    order = list(st)
    assert order.index("joint") > order.index("pseudo_labels") > order.index("baseline_pose")
    paper = load_pipeline(str(REPO / "jobs" / "cpf.yaml"), profile="paper")
    assert paper.stages["joint"].train.resources.num_workers == 8 and paper.stages["joint"].train.precision == "fp16"
    assert paper.stages["joint"].train.model.backbone.name == "resnet50"


def test_validation_errors_name_file_stage_and_key():
    a = {"kind": "train"}
    check_error(doc({"a": {"kind": "train", "needs": ["b"]}, "b": {"kind": "train", "needs": ["a"]}}), "cycle", "a -> b -> a")
    check_error(doc({"a": {"kind": "train", "init": "nosuch"}}), "stages.a.init", "unknown stage 'nosuch'")
    check_error(doc({"a": a, "b": {"kind": "train", "trainable": ["segmentation"]}}), "stages.b.trainable", "unknown task")
    check_error(doc({"a": {"kind": "train", "foreach": {"nosuch": {}}}}), "stages.a.foreach", "unknown task")
    check_error(doc({"a": {"kind": "train", "train": {"freeze": ["nosuch_module"]}}}), "stages.a.train.freeze", "nosuch_module")
    check_error(doc({"a": {"kind": "train", "train": {"optimizer": {"lr": -1}}}}), "stages.a", "lr must be > 0")
    check_error(doc({"a": {"kind": "sweep"}}), "stages.a.kind", "tune")  # the message lists the kinds
    check_error(doc({"a": {"kind": "train", "epochs": 3}}), "stages.a", "unknown key(s) ['epochs']")
    check_error(doc({"a": a, "m": {"kind": "merge", "base": "a", "decoders": ["a"]}}), "stages.m.decoders", "trainable")
    check_error(doc({"a": a}, stages={"b": {"epochs": 1}}), "profiles.t.stages", "unknown stage(s) ['b']")
    check_error(doc({"a": a}, stages={"a": {"lr_scale": 2}}), "stages.a.lr_scale", "expected a number in (0, 1]")
    check_error(doc({"a": {"kind": "train", "train": {"model": {"variant": "single:pose"}, "data": {"tasks": ["sem"]}}}}),
                "stages.a.train.data.tasks", "['sem']")
    with pytest.raises(VTDInputError, match="no profile 'paper'"):
        pipeline_from_dict(doc({"a": a}), profile="paper", source="p.yaml")


def test_loading_a_pipeline_builds_each_model_config_once(monkeypatch):
    """The freeze checks of every fine-tuning stage read one meta-device model per model config,
    and leave it unchanged (every `vtd jobs` command loads the pipeline)."""
    import orchestrator.spec as spec_module
    from vtd_train.train import families

    built = []
    real = families.meta_model
    monkeypatch.setattr(families, "meta_model", lambda cfg: built.append(cfg.model) or real(cfg))
    monkeypatch.setattr(spec_module, "_META_MODELS", {})
    spec = load_pipeline(str(REPO / "jobs" / "cpf.yaml"), profile="tiny")
    configs = {repr(st.train.model) for st in spec.stages.values() if st.freeze}
    assert len(built) == len(configs) >= 1, (len(built), len(configs))
    assert all(p.requires_grad for m in spec_module._META_MODELS.values() for p in m.parameters())


def test_trainable_freezes_everything_but_the_decoders():
    spec = pipeline_from_dict(doc({"a": {"kind": "train", "trainable": ["lane", "pose"]}}), profile="t")
    from vtd_train.model.vtdnet import VTDNet
    from vtd_train.train.optim import freeze

    model = VTDNet(spec.stages["a"].train.model)
    trainable = {id(p) for p in freeze(model, spec.stages["a"].freeze)}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    assert names and all(n.startswith(("seg_decoders.lane.", "kp_head.")) for n in names)
    assert any(n.startswith("seg_decoders.lane.") for n in names) and any(n.startswith("kp_head.") for n in names)


# ---------------------------------------------------------------------------------------------
# Real Ray jobs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs_api(ray_cluster) -> str:
    import ray

    from orchestrator.cli import _connect_jobs_api

    address = "http://" + ray._private.worker.get_dashboard_url()
    _connect_jobs_api(address)
    return address


def write_pipeline(path: Path, stages: dict, data: str, storage: Path, **profile) -> str:
    settings = {"retries": 0, "retry_backoff_s": 0, "poll_s": 0.3, "eval_overlays": 0, **profile}
    raw = doc(stages, data=data, storage=str(storage), **settings)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def orchestrator(pipeline: str, address: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vtd_train.cli", "jobs", "run", pipeline, "--profile", "t",
                             "--address", address, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def manifest(storage: Path, run: str = "p-t") -> RunManifest:
    m = RunManifest.load(str(storage / run))
    assert m is not None
    return m


def state_of(storage: Path, stage: str) -> str | None:
    m = RunManifest.load(str(storage / "p-t"))
    rec = m.stages.get(stage) if m else None
    return rec.state if rec else None


def weights(ckpt: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(Path(ckpt, "model.pt").read_bytes()), map_location="cpu", weights_only=True)


# the adoption test's first stage makes the fine-tuned stage's starting point: an untrained model
# (`vtd model init`, a Ray job without a Ray Train run, ~50 s less than a training stage here)
INIT_A = {"kind": "init", "train": {"data": {"sets": ["det"], "tasks": ["det"]}}}
TRAIN_B = {"kind": "train", "init": "a", "trainable": ["ins"], "train": {"data": {"sets": ["seg"], "tasks": ["ins"]}}}


@pytest.mark.ray
def test_killed_orchestrator_adopts_its_running_stage_and_a_changed_stage_reruns_with_its_dependants(
        jobs_api, tiny_shards, tmp_path):
    from orchestrator.runner import JobsClient

    storage = tmp_path / "runs"
    stages = {"a": INIT_A, "b": TRAIN_B,
              "final": {"kind": "merge", "base": "a", "decoders": ["b"], "evaluate": True}}
    pipe = write_pipeline(tmp_path / "p.yaml", stages, tiny_shards, storage, max_parallel=2)

    first = orchestrator(pipe, jobs_api)
    try:
        wait_for(lambda: state_of(storage, "b") == "running", 480, "stage b running")
    finally:
        first.send_signal(signal.SIGKILL)
        out = first.communicate()[0]
    before = manifest(storage)
    b_job = before.stages["b"].job_id
    a_job = before.stages["a"].job_id
    client = JobsClient(jobs_api)
    assert client.status(b_job) in ("PENDING", "RUNNING"), out  # the stage job outlives its orchestrator

    second = orchestrator(pipe, jobs_api)
    out2 = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out2
    m = manifest(storage)
    assert all(r.state == "succeeded" for r in m.stages.values()), {k: r.state for k, r in m.stages.items()}
    # finished stages not rerun, the running job adopted: one attempt, one job each
    assert m.stages["a"].job_id == a_job and m.stages["a"].attempt == 1
    assert m.stages["b"].job_id == b_job and m.stages["b"].attempt == 1
    assert [h["state"] for h in m.stages["b"].history] == ["succeeded"]
    assert "a: up to date" in out2
    jobs = [j for j in client.client.list_jobs() if (j.metadata or {}).get("run") == "p-t" and j.submission_id]
    per_stage = {}
    for j in jobs:
        per_stage.setdefault(j.metadata["stage"], []).append(j.submission_id)
    assert all(len(v) == 1 for v in per_stage.values()), per_stage
    # the manifest's hashes are the outputs' own
    for name in ("a", "b", "final"):
        assert checkpoint_hash(m.stages[name].outputs["checkpoint"]) == m.stages[name].outputs["hash"]
    assert m.stages["b"].inputs["a"]["hash"] == m.stages["a"].outputs["hash"]
    # b's first training step came after a ended, and the gap is on record
    assert 0 < m.stages["b"].metrics["first_step_gap_s"] < 600

    # fine-tuning only the ins decoder left every other tensor bit-identical; the merge holds it
    wa, wb, wf = (weights(m.stages[s].outputs["checkpoint"]) for s in ("a", "b", "final"))
    decoder = [k for k in wa if k.startswith("mask_head.")]
    assert decoder and any(not torch.equal(wa[k], wb[k]) for k in decoder)
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not k.startswith("mask_head."))
    assert set(wf) == set(wa)
    assert all(torch.equal(wf[k], wb[k] if k.startswith("mask_head.") else wa[k]) for k in wf)
    report = json.loads((storage / "p-t" / "report.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["final"] and report["stages"][0]["vtda"] is not None

    # a changed stage reruns with its dependants only
    raw = yaml.safe_load(Path(pipe).read_text())
    raw["stages"]["b"]["train"]["optimizer"] = {"lr": 5e-4}
    Path(pipe).write_text(yaml.safe_dump(raw))
    third = orchestrator(pipe, jobs_api)
    out3 = third.communicate(timeout=600)[0]
    assert third.returncode == 0, out3
    m3 = manifest(storage)
    assert m3.stages["a"].job_id == m.stages["a"].job_id
    for name in ("b", "final", "eval-final"):
        assert m3.stages[name].key != m.stages[name].key and m3.stages[name].job_id != m.stages[name].job_id, name
    assert {s["stage"] for s in m3.superseded} == {"b", "final", "eval-final"}


@pytest.mark.ray
def test_a_failing_stage_is_retried_and_its_error_recorded(jobs_api, tiny_shards, tmp_path):
    from orchestrator.metrics import PipelineMetrics
    from orchestrator.runner import JobsClient, Orchestrator

    marker = tmp_path / "killed-once"
    stages = {"a": {"kind": "train", "train": {
        "max_steps": 3, "failures": {"max_failures": 0},
        "faults": {"kill_rank": 0, "kill_step": 1, "kill_marker": str(marker)}, "data": {"sets": ["det"]}}}}
    pipe = write_pipeline(tmp_path / "p.yaml", stages, tiny_shards, tmp_path / "runs", retries=1)
    spec = load_pipeline(pipe, profile="t")
    lines: list[str] = []
    metrics = PipelineMetrics(None)
    orch = Orchestrator(spec, run="p-t", data=tiny_shards, storage=str(tmp_path / "runs"), client=JobsClient(jobs_api),
                        python=sys.executable, log=lines.append, metrics=metrics)
    assert orch.run() == 0, "\n".join(lines)
    # the orchestrator's Prometheus series say the same
    value = metrics.registry.get_sample_value
    assert value("vtd_pipeline_stage_state", {"run": "p-t", "stage": "a", "state": "succeeded"}) == 1.0
    assert value("vtd_pipeline_stage_state", {"run": "p-t", "stage": "a", "state": "failed"}) == 0.0
    assert value("vtd_pipeline_stage_attempt", {"run": "p-t", "stage": "a"}) == 2.0
    assert value("vtd_pipeline_stage_duration_seconds", {"run": "p-t", "stage": "a"}) > 0
    assert value("vtd_pipeline_submit_latency_seconds_count", {"run": "p-t"}) == 2.0
    rec = manifest(tmp_path / "runs").stages["a"]
    assert marker.exists()
    assert rec.attempt == 2 and [h["state"] for h in rec.history] == ["failed", "succeeded"]
    assert rec.history[0]["error"] and rec.history[0]["job_id"].endswith("--1") and rec.job_id.endswith("--2")
    assert any("retry 1 of 1" in ln for ln in lines), lines
    # the second attempt ran to the end (in the same stage directory: one key, one directory)
    assert rec.outputs["global_step"] == 3
    assert rec.metrics["first_step_gap_s"] is None  # a stage without inputs has no gap


@pytest.mark.ray
def test_cancel_stops_every_running_stage_job(jobs_api, tiny_shards, tmp_path):
    from orchestrator.runner import JobsClient

    storage = tmp_path / "runs"
    slow = {"kind": "train", "train": {"max_steps": 10_000, "epochs": 100, "data": {"sets": ["det"]}}}
    pipe = write_pipeline(tmp_path / "p.yaml", {"a": slow, "b": copy.deepcopy(slow), "after": {"kind": "init", "needs": ["a"]}},
                          tiny_shards, storage, max_parallel=2)
    proc = orchestrator(pipe, jobs_api)
    try:
        wait_for(lambda: state_of(storage, "a") == "running" and state_of(storage, "b") == "running", 240, "a and b running")
        cancel = subprocess.run([sys.executable, "-m", "vtd_train.cli", "jobs", "cancel", pipe, "--profile", "t"],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert cancel.returncode == 0, cancel.stderr
        assert "stopped a (" in cancel.stdout and "b (" in cancel.stdout, cancel.stdout
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    m = manifest(storage)
    client = JobsClient(jobs_api)
    for name in ("a", "b"):
        assert m.stages[name].state == "cancelled"
        wait_for(lambda: client.status(m.stages[name].job_id) == "STOPPED", 60, f"{name}'s job stopped")
    assert m.state == "cancelled" and "after" not in m.stages or m.stages["after"].state in ("pending", "cancelled")


def test_the_orchestrator_metrics_endpoint_binds_the_address_it_is_given():
    """Beside the embedded local cluster (loopback only) the orchestrator serves its metrics on
    loopback only; on a real cluster on every interface, for the cluster's Prometheus."""
    import os
    import urllib.request

    import psutil

    from cluster.local import free_port
    from orchestrator.metrics import PipelineMetrics

    def listening(port: int) -> set[str]:
        return {c.laddr.ip for c in psutil.Process(os.getpid()).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port}

    local, everywhere = free_port(), free_port()
    PipelineMetrics(local, addr="127.0.0.1")
    PipelineMetrics(everywhere)
    assert listening(local) == {"127.0.0.1"} and listening(everywhere) in ({"0.0.0.0"}, {"::"}), (
        listening(local), listening(everywhere))
    body = urllib.request.urlopen(f"http://127.0.0.1:{local}/metrics", timeout=10).read().decode()
    assert "vtd_pipeline_submit_latency_seconds" in body
