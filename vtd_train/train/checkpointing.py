"""Training checkpoints: the model part (:mod:`vtd_train.checkpoint`) plus the training state.

A training checkpoint directory holds:

=====================  =========================================================================
``train_state.pt``     optimizer, GradScaler and every rank's own state (RNG states — torch,
                       CUDA, numpy, python — and its partial epoch-loss sums); read with
                       ``weights_only=True``
``train_state.json``   progress (epoch, batch index within it, global step, counters, per-epoch
                       losses), world size, optimizer implementation, the run config
``model.pt``           model weights (:func:`vtd_train.checkpoint.save_model`)
``model.json``         model config
``checksums.json``     size and SHA-256 of the four files above, as stored — written last
=====================  =========================================================================

It is usable by ``vtd evaluate`` as is (the model part). The lr schedule has no state of its
own: the learning rate is a function of the global step (:func:`vtd_train.train.optim.lr_at`).

Atomicity: :func:`write_checkpoint` builds the directory under a ``.partial-<uuid>`` name and
renames it into place only when every file is written, so a crash mid-save leaves no directory
under the final name. :func:`persist_checkpoint` (Ray Train's upload, through
:func:`vtd_train.train.reporting.upload_checkpoint`) then copies the finished directory into the
run's storage under its final name, ``checksums.json`` last, and verifies every file *as stored*
before it returns; Ray registers the checkpoint (commits it) only after that. A copy that fails
— a full disk, a quota, a denied write, bytes that do not read back as written — removes what
it wrote and raises one error naming the file; a directory it could not remove, or one left by a
killed process, is never registered, fails verification, and is moved aside at the next resume
(:mod:`~vtd_train.train.recovery`). So the order of writing proves nothing where the checkpoint
is stored: :func:`load_checkpoint` and :func:`load_weights` verify every file against
``checksums.json`` (:mod:`vtd_train.checkpoint`) and reject a directory with any file missing,
truncated or changed, naming it.

Resume position: ``(epoch, batch_index)`` — the loader is deterministic in (seed, epoch, rank,
world size), so a resumed run rebuilds epoch ``epoch``'s loader, draws and drops its first
``batch_index`` batches, then restores the RNG states (after the loader iterator drew its own
base seed), which makes the continuation bit-identical on CPU.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from data_pipeline import fsio
from vtd_train.checkpoint import (
    CHECKSUMS,
    MODEL_JSON,
    MODEL_WEIGHTS,
    CheckpointError,
    load_tensors,
    parse_versioned_json,
    read_checksums,
    read_verified,
    save_model,
    verify_checkpoint,
    write_checksums,
)

TRAIN_STATE_PT = "train_state.pt"
TRAIN_STATE_JSON = "train_state.json"
FORMAT_VERSION = 1
#: The files ``checksums.json`` of a training checkpoint must list.
CHECKPOINT_FILES = (TRAIN_STATE_PT, TRAIN_STATE_JSON, MODEL_WEIGHTS, MODEL_JSON)


@dataclass
class Progress:
    """Where training stands. ``epoch``: the epoch in progress (or next to start);
    ``batch_index``: batches of it already consumed; ``global_step``: batches consumed in all,
    skipped steps included; ``images_seen``: images over all ranks. ``epoch_losses[e]``: mean
    total loss of epoch ``e`` over all ranks' updated steps."""

    epoch: int = 0
    batch_index: int = 0
    global_step: int = 0
    images_seen: int = 0
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    overflow_steps: int = 0
    nonfinite_streak: int = 0
    epoch_losses: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


#: Local checkpoint directories (rank 0 writes one, Ray's upload copies it to storage and removes
#: it): ``<tmp>/vtd-ckpt-<pid>-<uuid>``, so a later worker can tell which ones a dead process left.
LOCAL_CHECKPOINT_PREFIX = "vtd-ckpt-"


def local_checkpoint_dir(root: str | None = None) -> str:
    """A fresh local checkpoint directory name of this process (not created)."""
    import tempfile

    return os.path.join(root or tempfile.gettempdir(), f"{LOCAL_CHECKPOINT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")


def sweep_local_checkpoints(root: str | None = None) -> list[str]:
    """Remove the local checkpoint directories left in ``root`` (default: the temp directory) by
    processes that no longer run — a worker killed between writing a checkpoint and its upload
    leaves its copy behind — and return them. Directories of live processes are kept."""
    import tempfile

    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(LOCAL_CHECKPOINT_PREFIX):
            continue
        pid = name[len(LOCAL_CHECKPOINT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue  # another naming (not ours to judge) or a live process's
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def write_checkpoint(
    directory: str,
    *,
    model: nn.Module,
    model_cfg: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    rank_states: list[dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    """Write a complete checkpoint as the new local directory ``directory`` (atomically).
    ``rank_states[r]``: rank ``r``'s ``{"rng": capture_rng(...), ...}``."""
    if os.path.exists(directory):
        raise FileExistsError(f"{directory}: checkpoint directory already exists")
    tmp = f"{directory}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "ranks": rank_states}, buf)
        fsio.write_bytes_atomic(os.path.join(tmp, TRAIN_STATE_PT), buf.getvalue())
        doc = {"format_version": FORMAT_VERSION, "progress": asdict(progress), **meta}
        fsio.write_json_atomic(os.path.join(tmp, TRAIN_STATE_JSON), doc)
        save_model(tmp, model, model_cfg, meta={"step": progress.global_step, "epoch": progress.epoch,
                                                "run": meta.get("run"), "stage": meta.get("stage")}, checksums=False)
        write_checksums(tmp, CHECKPOINT_FILES)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def persist_checkpoint(local: str, dest: str) -> dict[str, dict[str, Any]]:
    """Copy the finished local checkpoint directory ``local`` (:func:`write_checkpoint`) to
    ``dest`` (a local path or fsspec URI: the checkpoint's directory in the run's storage), its
    other files first and ``checksums.json`` last, then verify every file as stored (read back).
    Returns the verified ``checksums.json`` entries.

    On any failure ``dest`` is removed (best effort: what stays behind fails verification and is
    never registered) and the error names the file: an ``OSError`` (no space, quota, permission)
    with its path, or a :class:`CheckpointError` for bytes that did not read back as written."""
    names = sorted(os.listdir(local))
    if CHECKSUMS not in names:
        raise CheckpointError(f"{local}: no {CHECKSUMS}: not a finished checkpoint")
    fs, root = fsio.resolve(dest)
    try:
        with fsio.naming(dest):
            fs.makedirs(root, exist_ok=True)
        for name in [n for n in names if n != CHECKSUMS] + [CHECKSUMS]:
            target = fsio.join(dest, name)
            with fsio.naming(target), open(os.path.join(local, name), "rb") as src, fs.open(fsio.resolve(target)[1], "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        return verify_checkpoint(dest, require=CHECKPOINT_FILES)
    except BaseException:
        try:
            fs.rm(root, recursive=True)
        except Exception:  # noqa: BLE001 - the error that matters is the one being raised
            pass
        raise


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainCheckpoint:
    """A loaded training checkpoint (tensors on CPU)."""

    uri: str
    progress: Progress
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rank_states: list[dict[str, Any]]


def check_complete(uri: str) -> None:
    """Raise :class:`CheckpointError` unless ``uri`` is an intact training checkpoint: every file
    of it present with the size and hash its ``checksums.json`` records (reads every file)."""
    verify_checkpoint(uri, require=CHECKPOINT_FILES)


def load_checkpoint(uri: str) -> TrainCheckpoint:
    """Read a training checkpoint directory (local path or fsspec URI), every file verified
    against ``checksums.json`` as it is read (:class:`CheckpointError` naming the bad file)."""
    files = read_checksums(uri)
    missing = [f for f in CHECKPOINT_FILES if f not in files]
    if missing:
        raise CheckpointError(f"{uri}: not a complete training checkpoint (missing {', '.join(missing)} in {CHECKSUMS})")
    jpath = fsio.join(uri, TRAIN_STATE_JSON)
    doc = parse_versioned_json(read_verified(uri, TRAIN_STATE_JSON, files), jpath, FORMAT_VERSION)
    state = load_tensors(read_verified(uri, TRAIN_STATE_PT, files), fsio.join(uri, TRAIN_STATE_PT))
    weights = load_tensors(read_verified(uri, MODEL_WEIGHTS, files), fsio.join(uri, MODEL_WEIGHTS))
    read_verified(uri, MODEL_JSON, files)  # unused here, but `vtd evaluate` of this checkpoint needs it
    meta = {k: v for k, v in doc.items() if k not in ("format_version", "progress")}
    try:
        return TrainCheckpoint(
            uri=uri, progress=Progress.from_dict(doc["progress"]), meta=meta, model_state=weights,
            optimizer=state["optimizer"], scaler=state["scaler"], rank_states=list(state["ranks"]),
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{uri}: training state lacks {e}: not a checkpoint this build wrote") from None


def load_weights(model: nn.Module, uri: str) -> None:
    """Load the model part of checkpoint ``uri`` into ``model`` (names and shapes must match;
    ``model.pt`` verified against ``checksums.json``)."""
    files = read_checksums(uri)
    read_verified(uri, MODEL_JSON, files)
    state = load_tensors(read_verified(uri, MODEL_WEIGHTS, files), fsio.join(uri, MODEL_WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{uri}: weights do not fit this run's model: {e}") from None


def read_progress(uri: str) -> Progress:
    """Only the progress of a checkpoint (cheap: reads ``train_state.json`` alone, verified)."""
    files = read_checksums(uri)
    data = read_verified(uri, TRAIN_STATE_JSON, files)
    return Progress.from_dict(parse_versioned_json(data, fsio.join(uri, TRAIN_STATE_JSON), FORMAT_VERSION)["progress"])
