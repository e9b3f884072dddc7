"""Checkpoints that are verified before anything loads them, and the run directory after a crash.

Fault injection, cheap to expensive: files of a checkpoint flipped, truncated, deleted, replaced
by a hostile pickle (every load refuses, naming the file, in one line); a run directory as Ray
Train leaves it (checkpoints written by the production code, Ray's own snapshot model) with a
corrupt latest checkpoint, a registered directory deleted, an unregistered one left by a killed
driver — set right by :func:`prepare_resume` and accepted by Ray's own checkpoint manager; then
two Ray fits on the shared cluster: ``vtd train`` resuming such a run from the newest intact
checkpoint, and the workers' own fall-back when Ray's latest checkpoint fails verification.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from vtd_train.checkpoint import (
    CHECKSUMS,
    MODEL_JSON,
    MODEL_WEIGHTS,
    CheckpointError,
    checkpoint_hash,
    content_hash,
    load_model,
    save_model,
    verify_checkpoint,
)
from vtd_train.train.checkpointing import (
    CHECKPOINT_FILES,
    TRAIN_STATE_PT,
    Progress,
    capture_rng,
    load_checkpoint,
    load_weights,
    write_checkpoint,
)
from vtd_train.train.recovery import QUARANTINE, SNAPSHOT, inspect_run, prepare_resume, read_run, resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


# ---------------------------------------------------------------------------------------------
# Checkpoints written by the production code, and faults in them
# ---------------------------------------------------------------------------------------------


def _tiny_cfg(storage: Path, shards: str = "/nowhere", **changes):
    from vtd_train.train.config import load_train_config, resolve_paths
    from vtd_train.train.launch import config_with

    cfg = load_train_config(str(TINY), storage_path=str(storage))
    return resolve_paths(config_with(cfg, data={"uri": shards, "sets": ["det", "seg"]}, **changes))


class _Writer:
    """Writes training checkpoints of the tiny run config's model (as the loop does)."""

    def __init__(self, cfg, world: int = 2):
        from vtd_train.model.vtdnet import VTDNet
        from vtd_train.train.optim import build_optimizer

        torch.manual_seed(0)
        self.cfg, self.world = cfg, world
        self.model = VTDNet(cfg.model)
        self.opt, _ = build_optimizer(list(self.model.parameters()), cfg.optimizer, torch.device("cpu"))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)

    def write(self, directory: Path, step: int) -> Path:
        with torch.no_grad():  # distinct weights per checkpoint
            next(self.model.parameters()).add_(1.0)
        ranks = [{"rng": capture_rng(torch.device("cpu")), "epoch_acc": [0.0, 0.0]} for _ in range(self.world)]
        progress = Progress(epoch=0, batch_index=step, global_step=step, images_seen=step * self.cfg.global_batch_size)
        write_checkpoint(str(directory), model=self.model, model_cfg=self.cfg.model, optimizer=self.opt, scaler=self.scaler,
                         progress=progress, rank_states=ranks, meta={"run": self.cfg.name, "stage": self.cfg.stage})
        return directory


def _ckpt_name(step: int) -> str:
    return f"checkpoint_step{step:08d}_{step:06x}"


def _make_run(cfg, steps=(2, 4, 6), *, registered=None) -> Path:
    """A run directory as Ray Train leaves it: checkpoint directories and Ray's snapshot (built
    with Ray's own state model) registering ``registered`` (default: all ``steps``)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState, _TrainingResultState

    run = Path(cfg.storage_path) / cfg.name
    run.mkdir(parents=True)
    writer = _Writer(cfg)
    for s in steps:
        writer.write(run / _ckpt_name(s), s)
    reg = [s for s in steps if registered is None or s in registered]
    results = [_TrainingResultState(checkpoint_dir_name=_ckpt_name(s), metrics={"step": s}) for s in reg]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(reg))),
        latest_checkpoint_result=results[-1] if results else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(reg), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )
    (run / SNAPSHOT).write_text(state.json())
    return run


def _flip(path: Path, offset: int | None = None, n: int = 4096) -> None:
    """Invert ``n`` bytes in the middle of ``path`` (size unchanged)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """One intact training checkpoint of the tiny model (read-only: tests copy it)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    return _Writer(_tiny_cfg(tmp)).write(tmp / "good", 4)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checksums_list_every_file_as_stored_and_hash_the_content(good_checkpoint, tmp_path):
    doc = json.loads((good_checkpoint / CHECKSUMS).read_text())
    assert sorted(doc["files"]) == sorted(CHECKPOINT_FILES)
    for name, entry in doc["files"].items():
        assert entry["size"] == (good_checkpoint / name).stat().st_size
    files = verify_checkpoint(str(good_checkpoint), require=CHECKPOINT_FILES)
    h = checkpoint_hash(str(good_checkpoint))
    assert h == content_hash(files) == checkpoint_hash(str(good_checkpoint), verify=False) and len(h) == 64
    # the same bytes elsewhere, or written again by the same seeded run, hash the same; other weights do not
    assert checkpoint_hash(str(_copy(good_checkpoint, tmp_path / "copy"))) == h
    writer = _Writer(_tiny_cfg(tmp_path))
    assert checkpoint_hash(str(writer.write(tmp_path / "again", 4))) == h
    assert checkpoint_hash(str(writer.write(tmp_path / "other", 4))) != h
    assert load_checkpoint(str(good_checkpoint)).progress.global_step == 4


@pytest.mark.parametrize(
    "fault, pattern",
    [
        ("flip", r"model\.pt: corrupt: sha256 .* differs .* \(same size"),
        ("truncate", r"model\.pt: truncated: \d+ bytes, checksums\.json records \d+"),
        ("delete", r"model\.pt: missing \(checksums\.json lists it\)"),
    ],
)
def test_every_load_refuses_a_damaged_model_pt_naming_it(good_checkpoint, tmp_path, fault, pattern):
    """A 4 KiB bit flip (size unchanged), a truncation, a deletion: resume, ``vtd evaluate``'s
    ``load_model``, ``init_checkpoint``'s ``load_weights`` and ``verify_checkpoint`` all refuse."""
    ckpt = _copy(good_checkpoint, tmp_path / "c")
    {"flip": _flip, "truncate": _truncate, "delete": Path.unlink}[fault](ckpt / MODEL_WEIGHTS)
    from vtd_train.model.vtdnet import VTDNet

    model = VTDNet(load_model(str(good_checkpoint))[1])
    for load in (load_checkpoint, load_model, lambda u: load_weights(model, u), verify_checkpoint):
        with pytest.raises(CheckpointError, match=pattern) as e:
            load(str(ckpt))
        assert str(e.value).startswith(str(ckpt / MODEL_WEIGHTS)) and "\n" not in str(e.value)


def test_a_directory_without_checksums_or_with_a_bad_one_is_not_a_checkpoint(good_checkpoint, tmp_path):
    ckpt = _copy(good_checkpoint, tmp_path / "c")
    (ckpt / CHECKSUMS).write_text((ckpt / CHECKSUMS).read_text()[:40])
    with pytest.raises(CheckpointError, match=r"checksums\.json: malformed JSON"):
        load_checkpoint(str(ckpt))
    (ckpt / CHECKSUMS).unlink()  # a copy interrupted before checksums.json arrived
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(no checksums\.json"):
        load_model(str(ckpt))
    # a train_state.json changed after writing (same length): named, never parsed
    ckpt2 = _copy(good_checkpoint, tmp_path / "c2")
    text = (ckpt2 / "train_state.json").read_text()
    (ckpt2 / "train_state.json").write_text(text.replace('"global_step": 4', '"global_step": 9'))
    with pytest.raises(CheckpointError, match=r"train_state\.json: corrupt"):
        load_checkpoint(str(ckpt2))


class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", [MODEL_WEIGHTS, TRAIN_STATE_PT])
def test_a_hostile_pickle_is_refused_in_one_line_without_unsafe_advice(good_checkpoint, tiny_shards, tmp_path, capsys, target):
    """A pickle that would run a command, in place of model.pt / train_state.pt, with checksums
    that match it (written by whoever planted it): no code runs; one line names the file and never
    suggests ``weights_only=False``; ``vtd evaluate`` prints it as one ``vtd: error:`` line."""
    from vtd_train.checkpoint import write_checksums
    from vtd_train.cli import main

    marker = tmp_path / "pwned"
    ckpt = _copy(good_checkpoint, tmp_path / "c")
    (ckpt / target).write_bytes(pickle.dumps({"state": _Hostile(str(marker))}, protocol=2))
    write_checksums(str(ckpt), list(CHECKPOINT_FILES))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(ckpt))
    msg = str(e.value)
    assert msg.startswith(f"{ckpt / target}: refused: holds more than tensors") and "posix.system" in msg, msg
    assert "weights_only" not in msg and "\n" not in msg
    if target == MODEL_WEIGHTS:
        rc = main(["evaluate", "--checkpoint", str(ckpt), "--data", tiny_shards, "--out", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.splitlines() == [err] and err.startswith("vtd: error:") and str(ckpt / target) in err, err
        assert "weights_only" not in err and "Traceback" not in err
    assert not marker.exists(), "the pickle ran"


def test_save_model_checkpoints_are_verified_too(tmp_path):
    from vtd_train.model.vtdnet import VTDNet, VTDNetConfig

    cfg = VTDNetConfig.tiny(tasks=("tag",))
    save_model(str(tmp_path / "m"), VTDNet(cfg), cfg, {"note": "x"})
    assert sorted(verify_checkpoint(str(tmp_path / "m"))) == [MODEL_JSON, MODEL_WEIGHTS]
    _flip(tmp_path / "m" / MODEL_JSON, offset=5, n=1)
    with pytest.raises(CheckpointError, match=r"model\.json: corrupt"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(CheckpointError, match=r"foo://x: cannot open: Protocol not known: foo"):
        load_model("foo://x")


# ---------------------------------------------------------------------------------------------
# A run directory after faults (no Ray fit: Ray's own checkpoint manager reads the result)
# ---------------------------------------------------------------------------------------------


def _ray_latest(cfg) -> str:
    """What Ray Train's checkpoint manager restores from the run's snapshot (it raises
    ``CheckpointManagerInitializationError`` when a registered directory is gone)."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = StorageContext(storage_path=cfg.storage_path, experiment_dir_name=cfg.name, read_only=True)
    manager = CheckpointManager(CheckpointConfig(num_to_keep=3), storage)
    return os.path.basename(manager.latest_checkpoint_result.checkpoint.path)


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_resume_skips_a_corrupt_latest_checkpoint_with_one_warning(tmp_path, fault):
    """The latest registered model.pt flipped (size unchanged) or truncated: a resume uses the
    previous checkpoint; one warning names the bad one, which is moved aside and dropped from Ray's
    snapshot, so Ray restores the intact one."""
    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg)
    {"flip": _flip, "truncate": _truncate}[fault](run / _ckpt_name(6) / MODEL_WEIGHTS)
    assert resume_checkpoint(cfg.storage_path, "r") == str(run / _ckpt_name(4))  # read-only question
    assert (run / _ckpt_name(6)).exists()
    said: list[str] = []
    plan = prepare_resume(cfg.storage_path, "r", say=said.append)
    assert plan.checkpoint == str(run / _ckpt_name(4))
    warnings = [s for s in said if "warning" in s]
    assert len(warnings) == 1 and f"skipping checkpoint {_ckpt_name(6)}" in warnings[0], said
    assert f"{run / _ckpt_name(6) / MODEL_WEIGHTS}: {'corrupt' if fault == 'flip' else 'truncated'}" in warnings[0]
    assert not (run / _ckpt_name(6)).exists() and (run / QUARANTINE / _ckpt_name(6) / MODEL_WEIGHTS).exists()
    assert _ray_latest(cfg) == _ckpt_name(4)
    assert read_run(str(run)).registered == [_ckpt_name(2), _ckpt_name(4)]


def test_a_deleted_registered_checkpoint_no_longer_stops_ray(tmp_path):
    """A registered directory deleted by hand: Ray alone refuses to start
    (CheckpointManagerInitializationError); after prepare_resume the run resumes from what is
    intact (the latest, here), the deletion said once."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg)
    shutil.rmtree(run / _ckpt_name(2))
    with pytest.raises(CheckpointManagerInitializationError):
        _ray_latest(cfg)
    said: list[str] = []
    plan = prepare_resume(cfg.storage_path, "r", say=said.append)
    assert plan.checkpoint == str(run / _ckpt_name(6)) and plan.dropped == [_ckpt_name(2)]
    assert len(said) == 1 and _ckpt_name(2) in said[0] and "gone" in said[0], said
    assert _ray_latest(cfg) == _ckpt_name(6)
    # the latest deleted too: the newest intact one left
    shutil.rmtree(run / _ckpt_name(6))
    assert prepare_resume(cfg.storage_path, "r", say=said.append).checkpoint == str(run / _ckpt_name(4))
    assert _ray_latest(cfg) == _ckpt_name(4)


def test_unregistered_directories_left_by_a_killed_driver_are_quarantined(tmp_path):
    """A checkpoint written after Ray's last registration (the driver was SIGKILLed) and a partial
    copy under a final name: both moved to quarantine/ and said so; registered ones untouched."""
    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg, steps=(2, 4, 6), registered=(2, 4))
    partial = run / _ckpt_name(8)
    partial.mkdir()
    (partial / MODEL_WEIGHTS).write_bytes(b"\0" * 100)
    said: list[str] = []
    plan = prepare_resume(cfg.storage_path, "r", say=said.append)
    assert plan.checkpoint == str(run / _ckpt_name(4))
    assert sorted(q[0] for q in plan.quarantined) == [_ckpt_name(6), _ckpt_name(8)]
    assert sorted(p.name for p in (run / QUARANTINE).iterdir()) == [_ckpt_name(6), _ckpt_name(8)]
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == [_ckpt_name(2), _ckpt_name(4)]
    assert len(said) == 2 and all("never registered" in s for s in said), said
    # a second resume finds nothing to do; a later leftover of the same name gets a free name
    assert prepare_resume(cfg.storage_path, "r", say=said.append).quarantined == []
    (run / _ckpt_name(8)).mkdir()
    assert prepare_resume(cfg.storage_path, "r", say=print).quarantined[0][1].endswith(f"{_ckpt_name(8)}.1")


def test_no_intact_registered_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg, steps=(2, 4))
    _flip(run / _ckpt_name(2) / MODEL_WEIGHTS)
    _truncate(run / _ckpt_name(4) / TRAIN_STATE_PT)
    for call in (lambda: resume_checkpoint(cfg.storage_path, "r"), lambda: prepare_resume(cfg.storage_path, "r")):
        with pytest.raises(CheckpointError, match=r"none of the 2 checkpoint\(s\) the run registered is intact") as e:
            call()
        assert f"{_ckpt_name(2)}/model.pt: corrupt" in str(e.value) and f"{_ckpt_name(4)}/train_state.pt: truncated" in str(e.value)
    assert resume_checkpoint(cfg.storage_path, "fresh") is None  # a run never started


def test_runs_verify_lists_integrity_and_the_resume_choice(tmp_path, capsys):
    from vtd_train.cli import main

    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg, steps=(2, 4, 6, 8), registered=(2, 4, 6))
    _flip(run / _ckpt_name(6) / MODEL_WEIGHTS)
    report = inspect_run(str(run))
    rows = {r["name"]: r for r in report["checkpoints"]}
    assert [rows[_ckpt_name(s)]["intact"] for s in (2, 4, 6, 8)] == [True, True, False, True]
    assert [rows[_ckpt_name(s)]["registered"] for s in (2, 4, 6, 8)] == [True, True, True, False]
    assert rows[_ckpt_name(4)]["step"] == 4 and "corrupt" in rows[_ckpt_name(6)]["error"]
    assert report["resume"] == str(run / _ckpt_name(4)) and report["error"] is None
    rc = main(["runs", "verify", str(run)])
    out = capsys.readouterr().out
    assert rc == 1, out  # a registered checkpoint is damaged
    assert f"resume would use: {run / _ckpt_name(4)}" in out and "CORRUPT" in out and "unregistered" in out, out
    assert (run / _ckpt_name(6)).exists(), "verify changes nothing"
    rc = main(["runs", "verify", str(run), "--json"])
    assert rc == 1 and json.loads(capsys.readouterr().out)["resume"] == str(run / _ckpt_name(4))
    assert main(["runs", "verify", str(tmp_path / "runs" / "none")]) == 2
    assert capsys.readouterr().err.startswith("vtd: error:")


# ---------------------------------------------------------------------------------------------
# Storage that fails writes: full, truncating, changing bytes, refusing deletes (tests/faulty_fs.py)
# ---------------------------------------------------------------------------------------------


def test_a_full_storage_during_the_copy_leaves_nothing_and_names_the_file(good_checkpoint, tmp_path, monkeypatch):
    """The copy into the run's storage runs out of space inside model.pt: one ``OSError`` line
    naming the stored file, deterministic (not retried), and the partial directory is gone at
    once. Where the store refuses the delete, what stays fails verification and the next resume
    moves it aside: nothing partial ever counts as a checkpoint."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from faulty_fs import install
    from vtd_train.train.checkpointing import persist_checkpoint
    from vtd_train.train.failures import deterministic_cause, describe_failure

    cfg = _tiny_cfg(tmp_path / "runs", name="r")
    run = _make_run(cfg, steps=(2,))
    dest = run / _ckpt_name(4)
    before = sum((good_checkpoint / n).stat().st_size for n in (MODEL_JSON,))  # copied first (sorted)
    fs = install(monkeypatch, str(run), space=before + 1000)
    with pytest.raises(OSError) as e:
        persist_checkpoint(str(good_checkpoint), str(dest))
    assert e.value.errno == 28 and e.value.filename == str(dest / MODEL_WEIGHTS), e.value
    assert deterministic_cause(e.value) is e.value
    line = describe_failure("r", WorkerGroupError("failed", {0: e.value}))
    assert line == f"run 'r': {dest / MODEL_WEIGHTS}: No space left on device", line
    assert fs.written == [str(dest / MODEL_JSON), str(dest / MODEL_WEIGHTS)] and not dest.exists()  # cleaned up at once

    fs.space, fs.refuse_rm = before + 1000, True  # the same, on a store that refuses the clean-up
    with pytest.raises(OSError):
        persist_checkpoint(str(good_checkpoint), str(dest))
    assert dest.exists()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(str(dest))
    monkeypatch.undo()
    plan = prepare_resume(cfg.storage_path, "r", say=lambda _: None)
    assert plan.checkpoint == str(run / _ckpt_name(2)) and [q[0] for q in plan.quarantined] == [_ckpt_name(4)]


@pytest.mark.parametrize("fault, name, pattern", [
    ("truncate", MODEL_WEIGHTS, r"model\.pt: truncated: \d+ bytes, checksums\.json records \d+"),
    ("corrupt", TRAIN_STATE_PT, r"train_state\.pt: corrupt: sha256 .* \(same size"),
    ("truncate", CHECKSUMS, r"checksums\.json: malformed JSON"),
])
def test_a_store_that_loses_or_changes_bytes_fails_the_copy_before_registration(good_checkpoint, tmp_path, monkeypatch,
                                                                                fault, name, pattern):
    """Bytes that do not read back as written (no error from the store): the verification after
    the copy names the file, and the directory is removed, so Ray never registers it."""
    from faulty_fs import install
    from vtd_train.train.checkpointing import persist_checkpoint

    dest = tmp_path / "runs" / "r" / _ckpt_name(4)
    install(monkeypatch, str(tmp_path / "runs"), **{fault: (name,)})
    with pytest.raises(CheckpointError, match=pattern) as e:
        persist_checkpoint(str(good_checkpoint), str(dest))
    assert str(e.value).startswith(str(dest)) and "\n" not in str(e.value)
    assert not dest.exists()
    monkeypatch.undo()
    persist_checkpoint(str(good_checkpoint), str(dest))  # a healthy store: intact
    assert sorted(verify_checkpoint(str(dest))) == sorted(CHECKPOINT_FILES)


def test_a_full_disk_while_writing_the_local_checkpoint(tmp_path, monkeypatch):
    """The worker's own temp directory fills up during ``write_checkpoint``: one ``OSError``
    naming the file being written, and no directory left, partial or final."""
    from faulty_fs import install

    writer = _Writer(_tiny_cfg(tmp_path))
    install(monkeypatch, str(tmp_path / "tmp"), space=3000)
    (tmp_path / "tmp").mkdir()
    with pytest.raises(OSError) as e:
        writer.write(tmp_path / "tmp" / "ckpt", 4)
    assert e.value.errno == 28 and e.value.filename.startswith(str(tmp_path / "tmp" / "ckpt.partial-")), e.value
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_ray_upload_copies_verifies_and_cleans_up(good_checkpoint, tmp_path, monkeypatch):
    """``upload_checkpoint`` (Ray's ``checkpoint_upload_fn``): the local copy is removed whether
    the upload succeeded or not; a full store leaves no directory; the checkpoint Ray registers
    is the verified one in the run's storage."""
    import ray.train

    from faulty_fs import install
    from vtd_train.train.reporting import upload_checkpoint

    class Storage:
        storage_filesystem = None

        def build_checkpoint_path_from_name(self, name: str) -> str:
            return str(run / name)

    run = tmp_path / "runs" / "r"
    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_storage": lambda self: Storage()})())
    upload = upload_checkpoint(str(run))
    local = _copy(good_checkpoint, tmp_path / "local")
    fs = install(monkeypatch, str(run), space=1000)
    with pytest.raises(OSError, match=f"No space left on device: '{run / _ckpt_name(4)}/"):
        upload(ray.train.Checkpoint.from_directory(str(local)), _ckpt_name(4))
    assert not local.exists() and not (run / _ckpt_name(4)).exists()
    fs.space = None
    local = _copy(good_checkpoint, tmp_path / "local")
    persisted = upload(ray.train.Checkpoint.from_directory(str(local)), _ckpt_name(4))
    assert persisted.path == str(run / _ckpt_name(4)) and not local.exists()
    assert load_checkpoint(persisted.path).progress.global_step == 4


# ---------------------------------------------------------------------------------------------
# Ray fits on the shared cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_vtd_train_resumes_from_the_newest_intact_checkpoint_after_faults(ray_cluster, tiny_shards, tmp_path):
    """The latest checkpoint bit-flipped, an older registered one deleted, an unregistered one
    left by a killed driver: ``vtd train`` with the same name warns once about the bad one, says
    what it moved aside, resumes from step 4 and ends at step 6 with intact checkpoints only."""
    import argparse
    import contextlib

    import yaml

    from vtd_train.train.launch import train_command

    cfg = _tiny_cfg(tmp_path / "runs", tiny_shards, name="faulty")
    run = _make_run(cfg, steps=(2, 4, 6, 8), registered=(2, 4, 6))
    _flip(run / _ckpt_name(6) / MODEL_WEIGHTS)
    shutil.rmtree(run / _ckpt_name(2))
    doc = yaml.safe_load(TINY.read_text())
    doc.update(data={**doc["data"], "uri": tiny_shards, "sets": ["det", "seg"]}, max_steps=7, report_every_steps=1,
               checkpoint={"every_steps": 0, "at_epoch_end": False, "num_to_keep": 2}, lr_schedule={"milestones": [2]})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    args = argparse.Namespace(config=str(tmp_path / "run.yaml"), address=None, storage=cfg.storage_path, name="faulty",
                              result_json=None, takeover=False, verbose=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train_command(args)
    text = out.getvalue()
    assert rc == 0, text
    warnings = [ln for ln in text.splitlines() if "warning" in ln]
    assert len(warnings) == 2 and any(f"skipping checkpoint {_ckpt_name(6)}" in w for w in warnings), text  # + the gone one
    assert any(f"{_ckpt_name(2)} is registered for the run but gone" in w for w in warnings), text
    assert f"moved {run / _ckpt_name(8)} aside" in text and "done at step 7" in text, text
    kept = sorted(load_checkpoint(str(p)).progress.global_step for p in run.glob("checkpoint_step*"))
    assert kept == [4, 7], kept  # num_to_keep 2: the one resumed from and the new one; the bad one in quarantine/
    assert sorted(p.name for p in (run / QUARANTINE).iterdir()) == [_ckpt_name(6), _ckpt_name(8)]
    latest = load_checkpoint(resume_checkpoint(cfg.storage_path, "faulty"))
    assert latest.progress.global_step == 7 and latest.progress.images_seen == 7 * cfg.global_batch_size


@pytest.mark.ray
def test_workers_fall_back_when_rays_latest_checkpoint_fails_verification(ray_cluster, tiny_shards, tmp_path):
    """Without the driver's clean-up (a checkpoint that went bad while the run was live): every
    rank skips Ray's latest checkpoint, which fails verification, for the newest intact one Ray
    registered, and the run goes on from there."""
    from vtd_train.train.launch import build_trainer

    cfg = _tiny_cfg(tmp_path / "runs", tiny_shards, name="live", max_steps=5, report_every_steps=1,
                    checkpoint={"every_steps": 0, "at_epoch_end": False, "num_to_keep": 3})
    run = _make_run(cfg, steps=(2, 4))
    _truncate(run / _ckpt_name(4) / TRAIN_STATE_PT)
    result = build_trainer(cfg).fit()
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["step"] == 5, result.metrics


# ---------------------------------------------------------------------------------------------
# Deterministic errors are not retried; one line for the terminal
# ---------------------------------------------------------------------------------------------


def test_deterministic_worker_errors_are_raised_at_once_and_worker_loss_is_retried():
    """The policy the controller runs (Ray's own behind ours): a bad shard, a bad checkpoint, a
    full disk on any rank end the run at once; a lost worker or a collective error is retried up
    to max_failures."""
    import errno

    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from data_pipeline.errors import DataError
    from vtd_train.train.failures import FailFastPolicy, describe_failure

    def err(**failures):
        return WorkerGroupError("failed", {int(k[1:]): v for k, v in failures.items()})

    def policy():
        return FailFastPolicy(DefaultFailurePolicy(FailureConfig(max_failures=2)))

    wrapped = RuntimeError("in the loader")
    wrapped.__cause__ = DataError("/s/det/train/000003.tar", "truncated: 2 of 3 samples", field="tar")
    deterministic = [
        err(r1=DataError("/s/det/train/000003.tar", "truncated: 2 of 3 samples")),
        err(r0=CheckpointError("/runs/r/checkpoint_step00000004_000004/model.pt: truncated: 10 bytes, checksums.json records 20")),
        err(r0=RuntimeError("gloo: connection reset"), r1=wrapped),
        err(r0=OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoint_step00000006_x/model.pt")),
    ]
    for e in deterministic:
        assert policy().make_decision(e) == FailureDecision.RAISE, e
    assert describe_failure("r", deterministic[0]) == "run 'r': /s/det/train/000003.tar: truncated: 2 of 3 samples"
    assert describe_failure("r", deterministic[2]) == "run 'r': /s/det/train/000003.tar: tar: truncated: 2 of 3 samples"
    assert describe_failure("r", deterministic[3]) == "run 'r': /runs/r/checkpoint_step00000006_x/model.pt: No space left on device"
    p = policy()
    lost = err(r1=ActorDiedError())
    assert [p.make_decision(lost) for _ in range(3)] == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
    p = policy()
    assert p.make_decision(err(r0=RuntimeError("gloo: connection reset"))) == FailureDecision.RETRY
    msg = describe_failure("r", err(r0=RuntimeError("gloo: connection reset\n  more")))
    assert msg == "run 'r' failed (retries used up): rank 0: RuntimeError: gloo: connection reset"


@pytest.mark.ray
def test_a_bad_checkpoint_in_the_workers_fails_the_run_once_in_one_line(ray_cluster, tiny_shards, tmp_path, monkeypatch):
    """Every registered checkpoint fails verification (seen by the workers: the driver's clean-up
    is bypassed): one attempt although max_failures is 2, and one line naming the files."""
    import ray
    from ray.train import TrainingFailedError
    from ray.train.v2._internal.state.state_actor import get_state_actor

    from vtd_train.train.failures import describe_failure
    from vtd_train.train.launch import build_trainer

    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Ray records every attempt of a run
    cfg = _tiny_cfg(tmp_path / "runs", tiny_shards, name="all-bad", max_steps=5, failures={"max_failures": 2})
    run = _make_run(cfg, steps=(2, 4))
    _truncate(run / _ckpt_name(4) / MODEL_WEIGHTS)
    _flip(run / _ckpt_name(2) / TRAIN_STATE_PT)
    with pytest.raises(TrainingFailedError) as e:
        build_trainer(cfg).fit()
    line = describe_failure(cfg.name, e.value)
    assert line.startswith("run 'all-bad': no intact checkpoint to resume from: ") and "\n" not in line, line
    assert f"{_ckpt_name(4)}/model.pt: truncated" in line and f"{_ckpt_name(2)}/train_state.pt: corrupt" in line, line
    actor = get_state_actor()
    runs = {rid: r for rid, r in ray.get(actor.get_train_runs.remote()).items() if r.name == "all-bad"}
    attempts = ray.get(actor.get_train_run_attempts.remote())
    assert len(runs) == 1 and len(attempts[next(iter(runs))]) == 1, attempts


def test_local_checkpoint_copies_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    """A worker killed between writing its local checkpoint and the upload leaves the copy in
    the temp directory; the next worker on the node removes the copies of dead processes only."""
    import subprocess
    import sys

    from vtd_train.train.checkpointing import local_checkpoint_dir, sweep_local_checkpoints

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    mine = local_checkpoint_dir(str(tmp_path))
    theirs = str(tmp_path / f"vtd-ckpt-{int(dead.stdout)}-0123abcd")
    other = str(tmp_path / "vtd-ckpt-bench")  # not ours to judge: no pid in the name
    for d in (mine, theirs, other):
        os.makedirs(os.path.join(d, "sub"))
        Path(d, "model.pt").write_bytes(b"x" * 10)
    assert os.path.basename(mine).startswith(f"vtd-ckpt-{os.getpid()}-")
    assert sweep_local_checkpoints(str(tmp_path)) == [theirs]
    assert not os.path.exists(theirs) and os.path.isdir(mine) and os.path.isdir(other)
