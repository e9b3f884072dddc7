"""The training shell, cheap to expensive: config validation, lr schedule, optimizer choice,
checkpoint atomicity, mixed-precision steps (no Ray); partial-task batches under data parallelism (two gloo processes
holding different image sets in the same step, freezing, a NaN on one rank); then 2-worker gloo runs of the tiny
VTDNet on the shared Ray cluster: a CLI run whose loss falls, and a chaos run whose driver and
workers are SIGKILLed at random points, restarted each time, that ends bit-identical to the
uninterrupted one (both with a NaN step skipped on all ranks). (A worker killed by the
``faults:`` drill is tested by tests/test_pipeline.py.)

Every Ray fit costs a fixed worker start-up (tens of seconds on 2 cores), so the runs are few and
each is checked for several things.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_pipeline.errors import VTDInputError
from vtd_train.checkpoint import CheckpointError, load_model
from vtd_train.train.checkpointing import (
    CHECKPOINT_FILES,
    Progress,
    capture_rng,
    load_checkpoint,
    read_progress,
    restore_rng,
    write_checkpoint,
)
from vtd_train.train.config import LRScheduleConfig, OptimizerConfig, load_train_config, resolve_paths
from vtd_train.train.launch import check_config, config_with
from vtd_train.train.optim import build_optimizer, freeze, lr_at

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _tiny(tmp_path, shards: str, **changes):
    cfg = load_train_config(str(TINY), storage_path=str(tmp_path / "runs"))
    return resolve_paths(config_with(cfg, data={"uri": shards}, **changes))


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_tiny_config_is_the_documented_run():
    cfg = load_train_config(str(TINY))
    assert cfg.resources.num_workers == 2 and cfg.per_worker_batch_size == 2
    assert cfg.precision == "fp32" and cfg.model.backbone.name == "resnet18"
    assert cfg.optimizer.betas == (0.9, 0.999) and cfg.optimizer.weight_decay == 0.05
    assert cfg.data.scales == (64,) and cfg.data.sets == ("det", "seg", "track")
    # the paper's defaults where the tiny config says nothing
    base = load_train_config(str(TINY))
    assert (base.lr_schedule.gamma, OptimizerConfig().lr, LRScheduleConfig().milestones) == (0.1, 1e-4, (8, 11))


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


BASE = "data: {uri: /nowhere}\n"


@pytest.mark.parametrize(
    "text, fragments",
    [
        (BASE + "optimizr: {lr: 1}\n", ["unknown key(s) ['optimizr']"]),
        (BASE + "optimizer: {lr: fast}\n", ["optimizer.lr", "expected a number", "'fast'"]),
        (BASE + "optimizer: {lr: -1}\n", ["optimizer", "lr must be > 0", "-1"]),
        (BASE + "optimizer: {betas: [0.9]}\n", ["optimizer.betas", "expected 2 values"]),
        (BASE + "optimizer: {implementation: apex_sgd}\n", ["optimizer", "implementation", "'apex_sgd'"]),
        (BASE + "precision: fp8\n", ["precision must be one of", "'fp8'"]),
        (BASE + "global_batch_size: 5\nresources: {num_workers: 2}\n", ["global_batch_size 5", "num_workers 2"]),
        (BASE + "lr_schedule: {milestones: [8, 4]}\n", ["lr_schedule", "strictly increasing", "[8, 4]"]),
        (BASE + "epochs: 6\n", ["milestones [8, 11]", "epochs 6"]),
        (BASE + "model: {backbone: {name: resnet7}}\n", ["model", "unknown backbone 'resnet7'"]),
        (BASE + "model: {preset: huge}\n", ["model", "preset 'huge'"]),
        (BASE + "model: {tasks: [det, teleport]}\n", ["model", "teleport"]),
        ("data: {uri: /x, sampling: random}\n", ["data", "sampling", "'random'"]),
        ("data: {uri: /x, require_tasks: {det: tag}}\n", ["data", "require_tasks.det", "'tag'"]),
        ("data: {uri: /x, scales: [0]}\n", ["data", "scales", "(0,)"]),
        ("data: {uri: /x, handoff_batches: 0}\n", ["data", "handoff_batches must be >= 1", "0"]),
        ("epochs: 3\n", ["missing key 'data'"]),
        (BASE + "checkpoint: {every_steps: -2}\n", ["checkpoint", "every_steps", "-2"]),
        (BASE + "checkpoint: {upload: later}\n", ["checkpoint", "upload must be one of ('async', 'sync')", "'later'"]),
        (BASE + "failures: {max_consecutive_nonfinite: 0}\n", ["failures", "max_consecutive_nonfinite", "0"]),
        (BASE + "grad_sync: {bucket_mb: 0}\n", ["grad_sync", "bucket_mb must be > 0", "0"]),
        (BASE + "grad_sync: {comm_dtype: fp8}\n", ["grad_sync", "comm_dtype must be one of", "'fp8'"]),
        (BASE + "grad_sync: {bucket_size: 4}\n", ["grad_sync", "unknown key(s) ['bucket_size']"]),
        (BASE + "faults: {kill_rank: 0}\n", ["faults", "kill_marker"]),
        (BASE + "freeze: backbone\n", ["freeze", "expected a list", "'backbone'"]),
        (BASE + "epochs: [1\n", ["invalid YAML", "line"]),
        (BASE + "name: ..\n", ["name must be a run name", "'..'"]),
        (BASE + "name: .\n", ["name must be a run name", "'.'"]),
        (BASE + "name: a b\n", ["name must be a run name", "'a b'"]),
        (BASE + "name: runs/x\n", ["name must be a run name", "'runs/x'"]),
        (BASE + "storage_path: foo://bucket/runs\n", ["storage_path 'foo://bucket/runs'", "unknown URI scheme 'foo'"]),
        ("data: {uri: 'bar://x'}\n", ["data.uri 'bar://x'", "unknown URI scheme 'bar'"]),
        (BASE + "init_checkpoint: 's3x://b/c'\n", ["init_checkpoint 's3x://b/c'", "unknown URI scheme 's3x'"]),
    ],
)
def test_config_errors_name_file_key_and_value(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    with pytest.raises(VTDInputError) as e:
        load_train_config(path)
    msg = str(e.value)
    assert msg.startswith(path), msg
    for f in fragments:
        assert f in msg, (f, msg)


def test_checks_that_need_the_model_and_the_manifest(tmp_path, tiny_shards):
    cfg = _tiny(tmp_path, tiny_shards)
    check_config(cfg)
    with pytest.raises(VTDInputError, match=r"freeze: prefix 'backbon' matches no parameter.*'backbone'"):
        check_config(config_with(cfg, freeze=("backbon",)))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        check_config(config_with(cfg, data={"uri": str(tmp_path / "empty")}))
    with pytest.raises(FileNotFoundError):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_rays_controller_gets_no_model_classes_and_no_dataset_manager(tmp_path, tiny_shards):
    """What Ray Train's controller unpickles (the run context and the callbacks) must not import
    the model: the controller sits on the path to the first step, and the model's modules pull
    in torchvision, torch._dynamo and sympy (6-8 s of a run's start on 2 cores). The config
    travels with the training function instead, which only the workers read. A run without Ray
    Datasets starts no DatasetManager actor."""
    import subprocess
    import sys

    from ray import cloudpickle
    from ray.train.v2._internal.callbacks import DatasetsCallback

    from vtd_train.train.launch import build_trainer

    trainer = build_trainer(_tiny(tmp_path, tiny_shards))
    callbacks = trainer._create_default_callbacks()
    assert not any(isinstance(c, DatasetsCallback) for c in callbacks), callbacks
    heavy = ("torchvision", "sympy", "vtd_train.model.vtdnet", "vtd_train.train.config")
    code = f"import pickle, sys; pickle.loads(sys.stdin.buffer.read()); print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps((trainer.train_run_context, callbacks)),
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "[]", out.stdout.decode()


def test_configs_load_without_torch_and_a_driver_checks_without_torchvision(tmp_path, tiny_shards):
    """The training config, the model schema, the loader's settings and the pipeline orchestrator
    import no torch; a ``vtd train`` driver's checks of a run without freeze prefixes import no
    torchvision. The orchestrator, ``vtd jobs`` commands and each Ray job's driver start without
    those imports (torch 2.0 s, torchvision with torch._dynamo and sympy 1.8 s more, on 2 cores)."""
    import subprocess
    import sys

    doc = yaml.safe_load(TINY.read_text())
    doc["data"]["uri"] = tiny_shards
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    code = ("import sys\n"
            "import vtd_train.train.config, vtd_train.model.schema, data_pipeline.loading.config\n"
            "import orchestrator.spec, orchestrator.runner, orchestrator.cli\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
            "from vtd_train.train.config import load_train_config, resolve_paths\n"
            "from vtd_train.train.launch import check_config\n"
            f"check_config(resolve_paths(load_train_config({str(tmp_path / 'run.yaml')!r}, storage_path={str(tmp_path)!r})))\n"
            "print(sorted(m for m in ('torchvision', 'sympy', 'vtd_train.model.vtdnet') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "[]"], out.stdout


def test_lr_schedule_steps_down_at_milestone_epochs():
    sched = LRScheduleConfig(milestones=(8, 11), gamma=0.1)
    at = [lr_at(e * 10, base_lr=1e-4, steps_per_epoch=10, cfg=sched) for e in range(12)]
    assert at[:8] == [1e-4] * 8 and at[8:11] == pytest.approx([1e-5] * 3) and at[11] == pytest.approx(1e-6)
    assert lr_at(79, base_lr=1e-4, steps_per_epoch=10, cfg=sched) == 1e-4
    warm = LRScheduleConfig(milestones=(), warmup_steps=10, warmup_ratio=0.1)
    assert lr_at(0, base_lr=1.0, steps_per_epoch=5, cfg=warm) == pytest.approx(0.1)
    assert lr_at(5, base_lr=1.0, steps_per_epoch=5, cfg=warm) == pytest.approx(0.55)
    assert lr_at(10, base_lr=1.0, steps_per_epoch=5, cfg=warm) == 1.0


def test_optimizer_choice_is_named_and_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt, name = build_optimizer([a, b], OptimizerConfig(), torch.device("cpu"))
    assert name == "torch.optim.AdamW(fused=True)"
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 0.05
    a.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(4)) and torch.equal(b.detach(), torch.ones(4))  # no decay without grad
    _, name = build_optimizer([a], OptimizerConfig(fused=False), torch.device("cpu"))
    assert name == "torch.optim.AdamW(foreach=True)"
    with pytest.raises(VTDInputError, match="apex_adam"):
        build_optimizer([a], OptimizerConfig(implementation="apex_adam"), torch.device("cpu"))


def test_reporter_sends_interval_means_through_one_call(tmp_path):
    from vtd_train.train.reporting import Reporter
    from vtd_train.train.step import StepOutput

    calls, lines = [], []
    rep = Reporter(run="r", stage="joint", rank=0, world_size=1, epochs=2, steps_per_epoch=4, total_steps=8,
                   static={"optimizer": "opt"}, report_fn=lambda m, **kw: calls.append((m, kw)), printer=lines.append)

    def out(total, reason=None):
        return StepOutput(losses={"loss/det/cls": total - 1.0, "loss/sem/ce": 1.0}, total=total, reason=reason,
                          nonfinite_tasks=(), nonfinite=(), local_nonfinite=False, grad_norm=1.0, loss_scale=1.0,
                          lr=1e-4, agree_s=0.01, allreduce_s=0.02)

    for o in (out(3.0), out(5.0), out(float("nan"), "nonfinite_loss")):
        rep.observe(o, images=2, data_wait_s=0.001, step_s=0.1, monitor_s=0.0)
    m = rep.report(Progress(global_step=3, batch_index=3, images_seen=6, skipped_steps=1), divergence=0.0)
    assert len(calls) == 1 and calls[0][1] == {}
    assert (m["loss"], m["loss/det/cls"], m["loss/sem/ce"], m["skipped_steps"], m["optimizer"]) == (4.0, 3.0, 1.0, 1, "opt")
    assert m["time/allreduce_s"] == pytest.approx(0.06) and m["time/step_s"] == pytest.approx(0.3)
    assert lines == [lines[0]] and lines[0].startswith("[r/joint] epoch 1/2 step 3/8 |") and "loss 4.0000 | det 3.000 sem 1.000" in lines[0]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    m = rep.report(Progress(global_step=4, epoch=1), divergence=0.0, checkpoint_dir=str(ckpt))
    assert calls[1][1]["checkpoint"].path == str(ckpt) and calls[1][1]["checkpoint_dir_name"].startswith("checkpoint_step00000004_")
    assert m["checkpoint"] and "| checkpoint" in lines[1]


# ---------------------------------------------------------------------------------------------
# Checkpoints (no Ray)
# ---------------------------------------------------------------------------------------------


def test_checkpoint_is_atomic_and_partial_directories_are_rejected(tmp_path, monkeypatch):
    from vtd_train.model.vtdnet import VTDNet, VTDNetConfig
    from vtd_train.train import checkpointing

    cfg = VTDNetConfig.tiny(tasks=("tag",))
    model = VTDNet(cfg)
    opt, _ = build_optimizer(list(model.parameters()), OptimizerConfig(), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    progress = Progress(epoch=1, batch_index=3, global_step=12, epoch_losses=[2.5])
    ranks = [{"rng": capture_rng(torch.device("cpu")), "epoch_acc": [1.0, 2.0]}] * 2
    drawn = (torch.rand(3).tolist(), float(np.random.rand()), random.random())
    kw = dict(model=model, model_cfg=cfg, optimizer=opt, scaler=scaler, progress=progress, rank_states=ranks,
              meta={"run": "t", "stage": "s"})

    good = write_checkpoint(str(tmp_path / "ok"), **kw)
    tc = load_checkpoint(good)
    assert tc.progress == progress and tc.meta["run"] == "t" and len(tc.rank_states) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in tc.model_state.items())
    assert load_model(good)[1] == cfg  # `vtd evaluate` reads the model part as is
    restore_rng(tc.rank_states[1]["rng"], torch.device("cpu"))  # RNG states survive weights_only loading
    assert (torch.rand(3).tolist(), float(np.random.rand()), random.random()) == drawn

    # A save interrupted after the training state (before model.json): nothing under the final
    # name, no leftovers.
    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(checkpointing, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(str(tmp_path / "interrupted"), **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]

    # Partial directories (as a crash during a copy would leave them) are rejected, naming the
    # missing file (tests/test_checkpoint_integrity.py: truncated and changed files).
    import shutil

    for missing in (*CHECKPOINT_FILES, "checksums.json"):
        d = tmp_path / f"partial-{missing}"
        shutil.copytree(good, d)
        (d / missing).unlink()
        expected = "not a complete checkpoint" if missing == "checksums.json" else f"{missing}: missing"
        with pytest.raises(CheckpointError, match=expected):
            load_checkpoint(str(d))
    with pytest.raises(FileExistsError):
        write_checkpoint(good, **kw)


# ---------------------------------------------------------------------------------------------
# Mixed precision (one process)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_fp16_steps_skip_overflows_and_bf16_steps_update(tiny_shards, tmp_path, device):
    """The production step under autocast: fp16 with a GradScaler (a step whose gradients
    overflow is skipped and halves the scale; otherwise parameters move) and bf16 (no scaler)."""
    from data_pipeline.loading.loader import MultiSetDataset, build_train_loader
    from data_pipeline.shards.manifest import families_from_manifest
    from data_pipeline.loading.transforms import prepare_batch
    from vtd_train.model.vtdnet import VTDNet
    from vtd_train.train.amp import Precision
    from vtd_train.train.grad_sync import GradSync
    from vtd_train.train.step import TrainStep

    cfg = _tiny(tmp_path, tiny_shards)
    dev = torch.device(device)
    ds = MultiSetDataset(families_from_manifest(tiny_shards, "train", ("det",)), cfg.data.loader_config(batch_size=2, seed=0),
                         rank=0, world_size=1)
    # GradScaler starts at 2**16: the first steps may all overflow (three did on the det frames
    # of 2026-12-05), each halving the scale, until one fits
    batches = [prepare_batch(b.to(dev)) for _, b in zip(range(8), build_train_loader(ds))]
    model_cfg = dataclasses.replace(cfg.model, tasks=("tag", "drivable", "det"))  # a smaller model: the path is the point
    for mode in ("fp16", "bf16"):
        torch.manual_seed(0)
        model = VTDNet(model_cfg).to(dev)
        params = list(model.parameters())
        opt, _ = build_optimizer(params, cfg.optimizer, dev)
        precision = Precision(mode, dev)
        step = TrainStep(model, opt, precision, GradSync(params))
        reasons = []
        for k, b in enumerate(batches):
            before, scale = [p.detach().clone() for p in params], precision.loss_scale
            out = step(b, step=k, lr=1e-4)
            moved = any(not torch.equal(a, p) for a, p in zip(before, params))
            reasons.append(out.reason)
            assert out.reason in (None, "overflow") and moved == (out.reason is None), (mode, k, out.reason, moved)
            if out.reason == "overflow":
                assert precision.loss_scale == scale / 2
            assert torch.isfinite(torch.tensor(out.total))
        assert None in reasons, (mode, reasons)
        assert (precision.scaler.is_enabled(), precision.loss_scale == 1.0) == ((True, False) if mode == "fp16" else (False, True))


# ---------------------------------------------------------------------------------------------
# Data parallelism with partial-task batches (2 gloo processes)
# ---------------------------------------------------------------------------------------------


def _partial_task_worker(rank: int, world: int, port: int, cfg, out_path: str) -> None:
    """Rank 0 trains on a det-set batch, rank 1 on a seg-set batch, in the same step (a gloo
    process group of 2 processes: the data-parallel code below Ray's process-group setup)."""
    import hashlib
    import os

    import torch.distributed as dist

    from data_pipeline.loading.loader import MultiSetDataset, build_train_loader
    from data_pipeline.shards.manifest import families_from_manifest
    from data_pipeline.loading.transforms import prepare_batch
    from vtd_train.model.vtdnet import VTDNet
    from vtd_train.train.amp import Precision
    from vtd_train.train.grad_sync import GradSync, all_gather_objects
    from vtd_train.train.step import NonFiniteGuard, NonFiniteLossError, TrainStep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    out: dict = {}

    # 1. the averaging rule on hand-made gradients: mean over the ranks that have one
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    loss = sum(v * ps[i].sum() for i, v in {0: {0: 1.0, 1: 2.0}, 1: {1: 4.0, 2: 8.0}}[rank].items())  # grad v
    sync = GradSync(ps)
    sync.agree(torch.tensor([float(rank == 1), 0.0]), loss)
    flags = sync.finish().flags  # a flag set: nothing armed
    sync.agree(torch.zeros(2), loss)
    loss.backward()
    counts = sync.finish().counts
    out["sync"] = all_gather_objects({"flags": flags, "counts": counts,
                                      "grads": [None if p.grad is None else p.grad.tolist() for p in ps]})

    # 2. the real model and step, ranks on different image sets
    torch.manual_seed(0)
    model = VTDNet(cfg.model)
    fams = {f.set_name: f for f in families_from_manifest(cfg.data.uri, "train")}
    own = {0: "det", 1: "seg"}[rank]
    ds = MultiSetDataset([fams[own]], cfg.data.loader_config(batch_size=2, seed=0), rank=0, world_size=1)
    batch = prepare_batch(next(iter(build_train_loader(ds))))
    torch.manual_seed(100 + rank)

    def digest(t):
        return hashlib.sha1(t.detach().contiguous().numpy().tobytes()).hexdigest()

    for phase, prefixes in (("joint", ()), ("finetune", ("backbone", "fpn"))):
        params = freeze(model, prefixes)
        opt, _ = build_optimizer(params, cfg.optimizer, cpu)
        step = TrainStep(model, opt, Precision("fp32", cpu), GradSync(params), rank=rank)
        before = {n: digest(p) for n, p in model.named_parameters()}
        res = step(batch, step=0, lr=1e-3)
        after = {n: digest(p) for n, p in model.named_parameters()}
        out[phase] = all_gather_objects({
            "after": after, "changed": sorted(n for n in before if before[n] != after[n]),
            "tasks": sorted({k.split("/")[1] for k in res.losses}), "skipped": res.skipped, "trainable": len(params),
        })

    # 3. NaN in rank 1's loss/rpn/cls at three steps in a row: both ranks skip the first two
    #    (no parameter moves anywhere), both raise at the third, naming the term
    def poison(step, losses):
        return {k: v * float("nan") if (rank == 1 and k == "loss/rpn/cls") else v for k, v in losses.items()}

    step = TrainStep(model, opt, Precision("fp32", cpu), GradSync(params), rank=rank, loss_hook=poison)
    guard = NonFiniteGuard(3)
    nan: dict = {"moved": [], "reasons": [], "error": None}
    for k in range(3):
        before = {n: digest(p) for n, p in model.named_parameters()}
        res = step(batch, step=k, lr=1e-3)
        nan["reasons"].append(res.reason)
        nan["moved"].append([n for n, p in model.named_parameters() if digest(p) != before[n]])
        try:
            guard.update(res, step=k, epoch=0)
        except NonFiniteLossError as e:
            nan["error"] = str(e)
    out["nan"] = all_gather_objects(nan)
    if rank == 0:
        torch.save(out, out_path)
    dist.destroy_process_group()


def _under(names, *prefixes):
    return {n for n in names if any(n.startswith(p + ".") for p in prefixes)}


def test_ranks_with_different_image_sets_update_correctly(tiny_shards, tmp_path):
    """Two gloo ranks holding different image sets in the same step: decoders fed on one rank
    move identically on both, decoders fed nowhere do not move at all, replicas stay identical;
    then the same with the backbone and FPN frozen (fine-tuning); then a NaN on one rank: skipped
    by both ranks, and the error on both after the configured streak."""
    import torch.multiprocessing as mp

    from cluster.local import free_port

    cfg = _tiny(tmp_path, tiny_shards)
    out_path = str(tmp_path / "partial.pt")
    mp.spawn(_partial_task_worker, args=(2, free_port(), cfg, out_path), nprocs=2)
    r = torch.load(out_path, weights_only=False)

    # hand-made gradients: p0 only on rank 0, p1 on both, p2 only on rank 1, p3 nowhere
    for rr in r["sync"]:
        assert rr["counts"] == [1, 2, 1, 0] and rr["flags"] == [1.0, 0.0]  # flags summed over ranks
        assert rr["grads"] == [[1.0] * 3, [3.0] * 3, [8.0] * 3, None]  # mean over holders; None stays None

    r0, r1 = r["joint"]
    assert "tag" in r0["tasks"] and "sem" in r1["tasks"] and "sem" not in r0["tasks"], (r0["tasks"], r1["tasks"])
    assert not r0["skipped"] and not r1["skipped"]
    names = list(r0["after"])
    diff = [n for n in names if r0["after"][n] != r1["after"][n]]
    assert diff == [], f"replicas differ after the step: {diff[:5]}"
    assert r0["changed"] == r1["changed"]
    changed = set(r0["changed"])
    # decoders with data on one rank only moved (on both ranks, identically: checked above)
    assert _under(names, "tagging", "kp_head", "seg_decoders.drivable", "seg_decoders.lane") <= changed  # rank 0 only
    assert _under(names, "seg_decoders.sem", "mask_head") <= changed  # rank 1 only
    assert _under(names, "backbone", "box_head") <= changed
    # decoders with data on no rank did not move at all (no weight decay, no momentum)
    nowhere = _under(names, "track_head", "flow")
    assert nowhere and not (nowhere & changed), sorted(nowhere & changed)[:5]

    f0, f1 = r["finetune"]
    assert [n for n in names if f0["after"][n] != f1["after"][n]] == [] and not (f0["skipped"] or f1["skipped"])
    assert f0["trainable"] < r0["trainable"]
    frozen = _under(names, "backbone", "fpn")
    assert not (frozen & set(f0["changed"])), "frozen parameters moved"
    assert _under(names, "seg_decoders.sem", "tagging") <= set(f0["changed"])

    for rr in r["nan"]:
        assert rr["reasons"] == ["nonfinite_loss"] * 3 and rr["moved"] == [[], [], []], rr
        assert rr["error"] is not None and "3 consecutive steps with non-finite losses (steps 0..2" in rr["error"]
        assert "rank 1: loss/rpn/cls=nan" in rr["error"] and "tasks ['rpn']" in rr["error"], rr["error"]


# ---------------------------------------------------------------------------------------------
# Ray: full runs through the production loop
# ---------------------------------------------------------------------------------------------

#: The runs below: the tiny config (2 workers, global batch 4, det + seg sets, 64-px images) for
#: 3 epochs of 9 steps; checkpoints every 12 steps and at epoch ends (9, 12, 18, 24, 27; the last 3
#: kept); a NaN injected into rank 1's loss/rpn/cls at step 2 (one skipped step, on both ranks).
RUN = dict(epochs=3, data={"sets": ["det", "seg"]}, lr_schedule={"milestones": [2]},
           checkpoint={"every_steps": 12, "at_epoch_end": True, "num_to_keep": 3}, report_every_steps=3,
           faults={"nan_loss_term": "loss/rpn/cls", "nan_rank": 1, "nan_steps": [2]})


def _latest(run_dir: Path) -> Path:
    ckpts = [p for p in run_dir.glob("checkpoint_step*") if p.is_dir()]
    assert ckpts, f"no checkpoint in {run_dir}"
    return max(ckpts, key=lambda p: read_progress(str(p)).global_step)


@pytest.fixture(scope="module")
def reference_run(ray_cluster, tiny_shards, tmp_path_factory):
    """The uninterrupted run, started through the CLI entry point (``vtd train``)."""
    from vtd_train.train.launch import train_command

    tmp = tmp_path_factory.mktemp("train-ref")
    cfg_doc = yaml.safe_load(TINY.read_text())
    cfg_doc["data"]["uri"] = tiny_shards
    for k, v in RUN.items():
        cfg_doc[k] = {**cfg_doc.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg_doc))
    args = argparse.Namespace(config=str(path), address=None, storage=str(tmp / "runs"), name="ref")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = train_command(args)
    return {"rc": rc, "out": buf.getvalue(), "args": args, "run_dir": tmp / "runs" / "ref", "config": str(path)}


@pytest.mark.ray
def test_cli_run_loss_falls_and_checkpoints(reference_run):
    assert reference_run["rc"] == 0, reference_run["out"]
    out = reference_run["out"]
    assert "embedded local Ray cluster" in out and "run 'ref' done at step 27" in out and "skipped steps 1" in out, out
    latest = _latest(reference_run["run_dir"])
    tc = load_checkpoint(str(latest))
    p = tc.progress
    assert (p.global_step, p.epoch, p.batch_index, p.images_seen) == (27, 3, 0, 27 * 4)
    # the NaN of step 2 was skipped on both ranks: one skip, replicas identical
    assert (p.skipped_steps, p.nonfinite_steps, p.nonfinite_streak) == (1, 1, 0)
    assert tc.meta["replica_divergence"] == 0.0
    assert tc.meta["optimizer"] == "torch.optim.AdamW(fused=True)" and tc.meta["world_size"] == 2
    first, last = p.epoch_losses[0], p.epoch_losses[-1]
    assert len(p.epoch_losses) == 3 and last < 0.9 * first, p.epoch_losses
    # num_to_keep = 3
    kept = sorted(read_progress(str(d)).global_step for d in reference_run["run_dir"].glob("checkpoint_step*"))
    assert kept == [18, 24, 27], kept
    model, _, meta = load_model(str(latest))
    assert meta["step"] == 27

_STEP_LINE = re.compile(r"\] epoch \d+/\d+ step (\d+)/\d+ \|")


def _train_worker_pids(since: float) -> list[int]:
    """Ray Train worker processes started since ``since`` (those of the current driver's run)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "RayTrainWorker" in cmd and (p.info["create_time"] or 0) >= since:
            pids.append(p.pid)
    return sorted(pids)


@pytest.mark.ray
def test_chaos_killed_drivers_and_workers_end_bit_identical(reference_run, ray_cluster, tmp_path):
    """``vtd train`` (a subprocess driver on the shared cluster) with checkpoints every 2 steps,
    uploaded in the background, SIGKILLed twice at seeded random points — the driver (restarted
    with the same name: it takes the dead driver's lease and sets the run directory right), then
    a worker of the resumed run (Ray restarts the workers) — ends at step 18 with weights,
    optimizer state and progress bit-identical to the uninterrupted reference run's at step 18,
    and only intact checkpoints registered. (A second driver kill, after the worker's, added
    one more driver start-up, about a minute of CI, and no path the first kill does not take.)"""
    import queue
    import signal
    import subprocess
    import sys
    import threading
    import time

    from vtd_train.train.recovery import inspect_run, resume_checkpoint

    rng = random.Random(24)
    doc = yaml.safe_load(Path(reference_run["config"]).read_text())
    doc.update(max_steps=18, report_every_steps=1, failures={**doc["failures"], "max_failures": 3},
               checkpoint={"every_steps": 2, "at_epoch_end": True, "num_to_keep": 2, "upload": "async"})
    (tmp_path / "chaos.yaml").write_text(yaml.safe_dump(doc))
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "vtd_train.cli", "train", "--config", str(tmp_path / "chaos.yaml"),
           "--address", ray_cluster.address, "--storage", str(storage), "--name", "chaos"]
    kills = list(zip(sorted(rng.sample(range(3, 16), 2)), ["driver", "worker"]))
    drivers, done = [], []
    while True:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put(None)], daemon=True).start()
        out: list[str] = []
        drivers.append(out)
        killed = False
        while (line := lines.get(timeout=300)) is not None:
            out.append(line)
            m = _STEP_LINE.search(line)
            if m and kills and int(m[1]) >= kills[0][0]:
                step, kind = kills.pop(0)
                time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the next step or its checkpoint
                if kind == "driver":
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                else:
                    pids = _train_worker_pids(started)
                    assert len(pids) == 2, pids
                    os.kill(rng.choice(pids), signal.SIGKILL)
                done.append((step, kind))
        rc = proc.wait(timeout=60)
        if not killed:
            break
    text = "".join(drivers[-1])
    assert [k for _, k in done] == ["driver", "worker"] and len(drivers) == 2, (done, text[-3000:])
    assert rc == 0 and "run 'chaos' done at step 18" in text, text[-3000:]
    assert all("took over the lease" in "".join(d) for d in drivers[1:]), [d[:5] for d in drivers]
    report = inspect_run(str(storage / "chaos"))
    assert report["error"] is None and all(c["intact"] for c in report["checkpoints"] if c["registered"]), report
    ref = load_checkpoint(str(next(d for d in reference_run["run_dir"].glob("checkpoint_step*")
                                   if read_progress(str(d)).global_step == 18)))
    got = load_checkpoint(resume_checkpoint(str(storage), "chaos"))
    assert got.progress == ref.progress
    diff = [k for k in ref.model_state if not torch.equal(ref.model_state[k], got.model_state[k])]
    assert diff == [], f"weights differ from the uninterrupted run: {diff[:5]}"
    for a, b in zip(ref.optimizer["state"].values(), got.optimizer["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
