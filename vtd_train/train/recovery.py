"""A run's checkpoints where they are stored: which ones Ray Train registered, which are intact,
which one a resume uses, and the clean-up after a crash.

A run lives in ``<storage_path>/<name>/`` (Ray Train's experiment directory):

==================================  ===============================================================
``checkpoint_manager_snapshot.json``  Ray Train's record of the run: the checkpoint directories it
                                    registered (kept ones, in report order) and the latest one
``checkpoint_step<N>_<id>/``        checkpoint directories (:mod:`~vtd_train.train.checkpointing`)
``quarantine/``                     directories moved aside by :func:`prepare_resume`
``.lease/``                         the run's owner (:mod:`~vtd_train.train.lease`)
==================================  ===============================================================

Ray resumes from the latest *registered* checkpoint and refuses to start
(``CheckpointManagerInitializationError``) when a registered directory is gone. What a crash
can leave behind, and what :func:`prepare_resume` (run by ``vtd train`` under the run's lease,
before Ray starts) does about it:

* a checkpoint directory that was never registered (the driver was killed during or right after
  the copy, or the copy failed half-way: Ray copies under the final name): moved to
  ``quarantine/``, said so;
* a registered directory that is gone (deleted by hand): dropped from the snapshot, said so;
* registered checkpoints that fail verification (a file missing, truncated or changed): the
  newest intact one is used; the newer bad ones are moved to ``quarantine/`` and dropped from the
  snapshot, with one warning naming each. With registered checkpoints but none intact the run
  stops with an error naming them (it does not silently start over).

:func:`resume_checkpoint` answers "which checkpoint would a resume use" without changing
anything (a pipeline's question); :func:`inspect_run` lists every checkpoint directory of a run
with its integrity (``vtd runs verify``).

The snapshot is Ray Train 2.60's format (JSON); this module edits only its lists of checkpoint
directory names and keeps every other field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from data_pipeline import fsio
from vtd_train.checkpoint import CheckpointError, verify_checkpoint
from vtd_train.train.checkpointing import CHECKPOINT_FILES

#: Ray Train V2's record of a run (``ray.train.v2._internal.constants``).
SNAPSHOT = "checkpoint_manager_snapshot.json"
QUARANTINE = "quarantine"
CHECKPOINT_PREFIX = "checkpoint_"


def run_uri(storage_path: str, name: str) -> str:
    """The run's directory: ``<storage_path>/<name>``, a local ``storage_path`` resolved to its
    real absolute path (symlinks, ``./``, ``~``), so that every spelling names one directory."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        return fsio.join(storage_path, name)
    local = storage_path.removeprefix("file://")
    return os.path.join(os.path.realpath(os.path.expanduser(local)), name)


@dataclass
class RunState:
    """What a run directory holds. ``registered``: checkpoint directory names in the snapshot,
    oldest report first; ``on_disk``: checkpoint directories present."""

    uri: str
    snapshot: dict[str, Any] | None
    registered: list[str]
    on_disk: list[str]

    @property
    def unregistered(self) -> list[str]:
        return [d for d in self.on_disk if d not in self.registered]

    @property
    def missing(self) -> list[str]:
        return [d for d in self.registered if d not in self.on_disk]

    def checkpoint(self, name: str) -> str:
        return fsio.join(self.uri, name)


def _read_snapshot(uri: str) -> dict[str, Any] | None:
    path = fsio.join(uri, SNAPSHOT)
    try:
        raw = fsio.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        results = doc["checkpoint_results"]
        indices = doc["checkpoint_report_indices"]
        assert isinstance(results, list) and isinstance(indices, list) and len(results) == len(indices)
        assert all(isinstance(r["checkpoint_dir_name"], str) for r in results)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{path}: Ray Train's run snapshot is unreadable ({type(e).__name__}: {e}); "
                              f"move the run directory aside or pick another run name") from None
    return doc


def read_run(uri: str) -> RunState:
    """The state of run directory ``uri`` (nothing is changed)."""
    snap = _read_snapshot(uri)
    registered: list[str] = []
    if snap is not None:
        order = sorted(zip(snap["checkpoint_report_indices"], range(len(snap["checkpoint_results"]))))
        registered = [snap["checkpoint_results"][i]["checkpoint_dir_name"] for _, i in order]
    on_disk = [d for d in fsio.list_dirs(uri) if d.startswith(CHECKPOINT_PREFIX)]
    return RunState(uri=uri, snapshot=snap, registered=registered, on_disk=on_disk)


def _pick(state: RunState) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest registered checkpoint that is intact (verifying newest first, stopping at the
    first intact one) and the ``(name, reason)`` of each newer one skipped."""
    skipped: list[tuple[str, str]] = []
    for name in reversed(state.registered):
        if name not in state.on_disk:
            skipped.append((name, f"{state.checkpoint(name)}: registered but gone"))
            continue
        try:
            verify_checkpoint(state.checkpoint(name), require=CHECKPOINT_FILES)
        except CheckpointError as e:
            skipped.append((name, str(e)))
            continue
        return name, skipped
    if state.registered:
        raise CheckpointError(
            f"{state.uri}: none of the {len(state.registered)} checkpoint(s) the run registered is intact ("
            + "; ".join(r for _, r in skipped)
            + "); move the run directory aside or pick another run name to start afresh"
        )
    return None, skipped


def resume_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The checkpoint a resume of run ``run_name`` would start from: the newest intact checkpoint
    Ray Train registered for it (its URI), ``None`` for a run with none registered (a fresh
    start). Raises :class:`CheckpointError` when checkpoints are registered but none is intact.
    Changes nothing; reads the files of the checkpoints it verifies."""
    state = read_run(run_uri(storage_path, run_name))
    name, _ = _pick(state)
    return None if name is None else state.checkpoint(name)


@dataclass
class ResumePlan:
    """What :func:`prepare_resume` found and did. ``checkpoint``: URI a resume starts from
    (``None``: fresh start); ``quarantined``: ``(directory, where it went, why)``; ``dropped``:
    registered names removed from Ray's snapshot; ``messages``: what was said."""

    run: str
    checkpoint: str | None
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    lease: Any = None  # the RunLease held while the plan is in use (owned_run)


def _quarantine(state: RunState, name: str) -> str:
    """Move checkpoint directory ``name`` to ``<run>/quarantine/`` (a free name there)."""
    fs, src = fsio.resolve(state.checkpoint(name))
    qdir = fsio.join(state.uri, QUARANTINE)
    existing = set(fsio.list_dirs(qdir))
    target, k = name, 1
    while target in existing:
        target, k = f"{name}.{k}", k + 1
    dest_uri = fsio.join(qdir, target)
    _, dest = fsio.resolve(dest_uri)
    fs.makedirs(fsio.resolve(qdir)[1], exist_ok=True)
    fs.mv(src, dest, recursive=True)
    return dest_uri


def _drop_from_snapshot(state: RunState, names: set[str]) -> None:
    """Rewrite Ray's snapshot without the checkpoint directories ``names`` (the latest becomes
    the newest remaining one). Written atomically."""
    snap = dict(state.snapshot or {})
    keep = [i for i, r in enumerate(snap["checkpoint_results"]) if r["checkpoint_dir_name"] not in names]
    results = [snap["checkpoint_results"][i] for i in keep]
    indices = [snap["checkpoint_report_indices"][i] for i in keep]
    snap["checkpoint_results"], snap["checkpoint_report_indices"] = results, indices
    snap["latest_checkpoint_result"] = results[max(range(len(results)), key=indices.__getitem__)] if results else None
    pending = [(r, v) for r, v in zip(snap.get("pending_training_results", []), snap.get("pending_validation_specs", []))
               if r["checkpoint_dir_name"] not in names]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snap:
            snap[key] = [n for n in snap[key] if n not in names]
    fsio.write_bytes_atomic(fsio.join(state.uri, SNAPSHOT), json.dumps(snap).encode("utf-8"))
    state.snapshot = snap
    state.registered = [n for n in state.registered if n not in names]


def prepare_resume(storage_path: str, run_name: str, *, say: Callable[[str], None] = print) -> ResumePlan:
    """Make run ``run_name``'s directory consistent before Ray Train starts on it (call it while
    holding the run's lease): quarantine unregistered checkpoint directories, drop registered
    ones that are gone, skip (quarantine and drop) registered ones newer than the newest intact
    one. Each action is said through ``say`` in one line. Returns the :class:`ResumePlan`."""
    state = read_run(run_uri(storage_path, run_name))
    plan = ResumePlan(run=state.uri, checkpoint=None)

    def tell(msg: str) -> None:
        plan.messages.append(msg)
        say(msg)

    for name in state.unregistered:
        dest = _quarantine(state, name)
        plan.quarantined.append((name, dest, "not registered by Ray Train"))
        tell(f"vtd train: moved {state.checkpoint(name)} aside to {dest}: a checkpoint directory Ray Train never "
             f"registered (left by an interrupted run or a failed copy)")
    state.on_disk = [d for d in state.on_disk if d in state.registered]

    chosen, skipped = _pick(state)
    gone = set(state.missing)
    bad = {name for name, _ in skipped} - gone
    for name in sorted(gone):
        tell(f"vtd train: warning: checkpoint {state.checkpoint(name)} is registered for the run but gone; "
             f"dropped from the run's record")
    for name, reason in skipped:
        if name in bad:
            dest = _quarantine(state, name)
            plan.quarantined.append((name, dest, reason))
            tell(f"vtd train: warning: skipping checkpoint {name}: {reason} (moved to {dest})")
    if gone or bad:
        _drop_from_snapshot(state, gone | bad)
        plan.dropped = sorted(gone | bad)
    if chosen is not None:
        plan.checkpoint = state.checkpoint(chosen)
        if skipped:
            tell(f"vtd train: resuming from {plan.checkpoint}")
    return plan


# ---------------------------------------------------------------------------------------------
# `vtd runs verify`
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointReport:
    """One checkpoint directory of a run: ``registered`` by Ray Train, ``intact`` after
    verification (``error`` says why not), ``step`` from its training state when intact."""

    name: str
    uri: str
    registered: bool
    present: bool
    intact: bool
    error: str | None = None
    step: int | None = None


def inspect_run(uri: str) -> dict[str, Any]:
    """Every checkpoint directory of run directory ``uri`` (registered ones and any other), each
    fully verified, and the checkpoint a resume would use: ``{"run", "checkpoints": [...],
    "resume": uri | None, "error": str | None, "quarantined": [...]}``."""
    from vtd_train.train.checkpointing import read_progress

    state = read_run(uri)
    if state.snapshot is None and not state.on_disk and not fsio.exists(uri):
        raise FileNotFoundError(f"{uri}: no such run directory")
    rows: list[CheckpointReport] = []
    for name in sorted(set(state.registered) | set(state.on_disk)):
        row = CheckpointReport(name=name, uri=state.checkpoint(name), registered=name in state.registered,
                               present=name in state.on_disk, intact=False)
        if not row.present:
            row.error = "registered but gone"
        else:
            try:
                verify_checkpoint(row.uri, require=CHECKPOINT_FILES)
                row.intact, row.step = True, read_progress(row.uri).global_step
            except CheckpointError as e:
                row.error = str(e)
        rows.append(row)
    by_name = {r.name: r for r in rows}
    resume = next((r.uri for r in reversed([by_name[n] for n in state.registered]) if r.intact), None)
    error = None
    if state.registered and resume is None:
        error = f"{uri}: none of the {len(state.registered)} checkpoint(s) the run registered is intact"
    return {"run": uri, "checkpoints": [vars(r) for r in rows], "resume": resume, "error": error,
            "quarantined": fsio.list_dirs(fsio.join(uri, QUARANTINE))}


def format_run_report(report: dict[str, Any]) -> str:
    """:func:`inspect_run`'s report as text, one line per checkpoint directory."""
    lines = [f"run {report['run']}"]
    for c in report["checkpoints"]:
        state = f"intact, step {c['step']}" if c["intact"] else ("GONE" if not c["present"] else "CORRUPT")
        reg = "registered" if c["registered"] else "unregistered (a resume moves it to quarantine/)"
        lines.append(f"  {c['name']}  {state}  {reg}" + (f"  {c['error']}" if c["error"] and c["present"] else ""))
    if not report["checkpoints"]:
        lines.append("  no checkpoints")
    if report["quarantined"]:
        lines.append(f"  quarantine/: {', '.join(report['quarantined'])}")
    if report["error"]:
        lines.append(f"resume would fail: {report['error']}")
    else:
        lines.append(f"resume would use: {report['resume'] or 'nothing (a fresh start)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A run owned by this process
# ---------------------------------------------------------------------------------------------


def _interrupt_main(holder: Any) -> None:
    """Stop this driver's training run: Ray Train's SIGINT handler (``fit()`` installs it in the
    main thread) aborts the run gracefully."""
    import _thread

    _thread.interrupt_main()


@contextmanager
def owned_run(cfg: Any, *, takeover: bool = False, say: Callable[[str], None] = print,
              on_lost: Callable[[Any], None] | None = None) -> Iterator[ResumePlan]:
    """For the ``with`` block: hold the lease of run ``cfg`` (a :class:`TrainConfig` with
    resolved paths; :class:`~vtd_train.train.lease.LeaseHeldError` when another process holds it),
    make its directory consistent (:func:`prepare_resume`) and, for a fresh start from
    ``init_checkpoint``, verify that checkpoint. Yields the :class:`ResumePlan`, whose ``lease``
    tells afterwards whether the lease was lost (taken over) during the block.

    ``on_lost`` (default: when entered from the main thread, abort the run there as Ctrl-C would;
    from another thread, only log) is called if another process takes the lease meanwhile."""
    import threading

    from vtd_train.checkpoint import MODEL_JSON, MODEL_WEIGHTS
    from vtd_train.train.lease import hold_lease

    if on_lost is None and threading.current_thread() is threading.main_thread():
        on_lost = _interrupt_main
    uri = run_uri(cfg.storage_path, cfg.name)
    with hold_lease(uri, owner=f"vtd train (stage {cfg.stage})", takeover=takeover, say=say, on_lost=on_lost) as lease:
        plan = prepare_resume(cfg.storage_path, cfg.name, say=say)
        plan.lease = lease
        if plan.checkpoint is None and cfg.init_checkpoint is not None:
            verify_checkpoint(cfg.init_checkpoint, require=(MODEL_JSON, MODEL_WEIGHTS))
        yield plan
