"""The model part of a checkpoint: weights + the config that builds the model.

A checkpoint is a directory (local path or any fsspec URI; Ray Train checkpoints are such
directories) holding:

==================  ============================================================================
``model.pt``        the model's ``state_dict`` (``torch.save``; read with ``weights_only=True``,
                    so loading never runs pickled code)
``model.json``      ``{"format_version", "family", "model": the family's config as a dict,
                    "meta": {...}}``; ``family`` is ``vtdnet`` (also when absent: files
                    written before TaskPrompter) or ``taskprompter``
``checksums.json``  ``{"format_version", "files": {name: {"size", "sha256"}}}`` of every other
                    file of the checkpoint — written last, from the bytes read back where they
                    were stored
==================  ============================================================================

Training state (optimizer, scaler, scheduler, loader position, RNG) lives beside these in the
same directory and is the training shell's business (its files are listed in ``checksums.json``
too).

**A checkpoint is intact only if every file ``checksums.json`` lists exists with that size and
hash.** Every load checks the files it reads (:func:`load_model`: ``model.json`` and ``model.pt``;
the training shell's resume: all four; :func:`verify_checkpoint`: every listed file). Intact is
never assumed from the order the files were written in: Ray Train copies a checkpoint directory
to storage in no particular order, so "``checksums.json`` exists" proves nothing after the copy,
while a size and a SHA-256 per file do. A file is read once: loads hash the bytes they parse.
:func:`checkpoint_hash` is a content hash of a checkpoint (cache keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import re
import warnings
from typing import Any

import torch

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from vtd_train.model.config import config_from_dict
from vtd_train.model.schema import VTDNetConfig
from vtd_train.taskprompter.config import TaskPrompterConfig

MODEL_WEIGHTS = "model.pt"
MODEL_JSON = "model.json"
CHECKSUMS = "checksums.json"
FORMAT_VERSION = 1
CHECKSUMS_VERSION = 1
_CHUNK = 8 << 20
#: model families a checkpoint can hold: family name → config class
FAMILIES = {"vtdnet": VTDNetConfig, "taskprompter": TaskPrompterConfig}


def model_class(family: str) -> type[torch.nn.Module]:
    """The model class of ``family``, imported on first use: a process that only reads or
    verifies checkpoints (a Ray job's driver, the orchestrator) loads neither torchvision (VTDNet,
    1.8 s of imports on 2 cores) nor timm (TaskPrompter's Swin, with huggingface_hub, over a
    second)."""
    if family == "taskprompter":
        from vtd_train.taskprompter.model import TaskPrompter

        return TaskPrompter
    from vtd_train.model.vtdnet import VTDNet

    return VTDNet


def family_of(cfg: Any) -> str:
    for name, cfg_cls in FAMILIES.items():
        if isinstance(cfg, cfg_cls):
            return name
    raise TypeError(f"not a model config of a known family: {type(cfg).__name__}")


class CheckpointError(VTDInputError):
    """A checkpoint that is missing, incomplete or does not match its model config."""


def save_model(uri: str, model: torch.nn.Module, cfg: VTDNetConfig | TaskPrompterConfig, meta: dict[str, Any] | None = None,
               *, checksums: bool = True) -> None:
    """Write ``model``'s weights and ``cfg`` into the checkpoint directory ``uri`` (atomically per
    file), then its ``checksums.json`` (``checksums=False``: the caller writes it after adding
    files of its own)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    fsio.write_bytes_atomic(fsio.join(uri, MODEL_WEIGHTS), buf.getvalue())
    doc = {"format_version": FORMAT_VERSION, "family": family_of(cfg), "model": dataclasses.asdict(cfg), "meta": meta or {}}
    fsio.write_json_atomic(fsio.join(uri, MODEL_JSON), doc)
    if checksums:
        write_checksums(uri, (MODEL_WEIGHTS, MODEL_JSON))


# ---------------------------------------------------------------------------------------------
# Integrity: sizes and SHA-256 per file
# ---------------------------------------------------------------------------------------------


def _digest_stream(f: Any) -> dict[str, Any]:
    h, n = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}


def file_digest(uri: str) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a stored file, read back in chunks."""
    with fsio.open_read(uri) as f:
        return _digest_stream(f)


def write_checksums(uri: str, names: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """Hash the files ``names`` of checkpoint directory ``uri`` *as stored* (read back) and write
    ``checksums.json`` (atomically, last). Returns the entries."""
    files = {name: file_digest(fsio.join(uri, name)) for name in names}
    fsio.write_json_atomic(fsio.join(uri, CHECKSUMS), {"format_version": CHECKSUMS_VERSION, "files": files})
    return files


def read_checksums(uri: str) -> dict[str, dict[str, Any]]:
    """The ``files`` entries of checkpoint ``uri``'s ``checksums.json`` (:class:`CheckpointError`
    when it is missing or malformed)."""
    path = fsio.join(uri, CHECKSUMS)
    try:
        raw = fsio.read_bytes(path)
    except (ValueError, ImportError) as e:  # fsspec: unknown scheme / missing package
        raise CheckpointError(f"{uri}: cannot open: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    except FileNotFoundError:
        what = "no such directory" if not fsio.exists(uri) else f"no {CHECKSUMS}"
        raise CheckpointError(f"{uri}: not a complete checkpoint ({what}; a checkpoint is complete once "
                              f"its {CHECKSUMS} is written, last)") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON ({e}): a truncated or corrupt checkpoint") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format_version") != CHECKSUMS_VERSION or not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str) for e in files.values()
    ):
        raise CheckpointError(f"{path}: not a checksums file of format_version {CHECKSUMS_VERSION}")
    return files


def _mismatch(path: str, expected: dict[str, Any], got: dict[str, Any]) -> str | None:
    if got["size"] != expected["size"]:
        what = "truncated" if got["size"] < expected["size"] else "longer than written"
        return f"{path}: {what}: {got['size']} bytes, {CHECKSUMS} records {expected['size']}"
    if got["sha256"] != expected["sha256"]:
        return (f"{path}: corrupt: sha256 {got['sha256'][:16]}… differs from the {expected['sha256'][:16]}… "
                f"that {CHECKSUMS} records (same size: bytes changed after writing)")
    return None


def verify_checkpoint(uri: str, *, require: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Check checkpoint directory ``uri``: every file its ``checksums.json`` lists exists with the
    recorded size and SHA-256, and the files ``require`` are among them. Returns
    ``{file name: {"size", "sha256"}}``; raises :class:`CheckpointError` naming the first bad
    file. Reads every file once (in chunks)."""
    files = read_checksums(uri)
    missing = [n for n in require if n not in files]
    if missing:
        raise CheckpointError(f"{fsio.join(uri, CHECKSUMS)}: lists no {', '.join(missing)}: not a checkpoint of this kind")
    for name, expected in sorted(files.items()):
        path = fsio.join(uri, name)
        try:
            got = file_digest(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing ({CHECKSUMS} lists it)") from None
        if (err := _mismatch(path, expected, got)) is not None:
            raise CheckpointError(err)
    return files


def read_verified(uri: str, name: str, files: dict[str, dict[str, Any]]) -> bytes:
    """The bytes of file ``name`` of checkpoint ``uri``, checked against its ``checksums.json``
    entries ``files`` (from :func:`read_checksums`)."""
    path = fsio.join(uri, name)
    if name not in files:
        raise CheckpointError(f"{path}: not listed in {CHECKSUMS}: not part of the checkpoint as written")
    try:
        data = fsio.read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({CHECKSUMS} lists it)") from None
    if (err := _mismatch(path, files[name], {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})) is not None:
        raise CheckpointError(err)
    return data


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """A checkpoint's content hash: SHA-256 over its sorted ``name size sha256`` lines (the same
    files give the same hash wherever they are stored)."""
    lines = "".join(f"{n}\t{e['size']}\t{e['sha256']}\n" for n, e in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def checkpoint_hash(uri: str, *, verify: bool = True) -> str:
    """:func:`content_hash` of checkpoint ``uri``, after verifying its files (``verify=False``:
    from ``checksums.json`` alone, without reading the files)."""
    return content_hash(verify_checkpoint(uri) if verify else read_checksums(uri))


def load_tensors(data: bytes, path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint file's bytes; anything else than tensors
    and plain containers (a pickle that would run code) or an unreadable file is a one-line
    :class:`CheckpointError` naming ``path`` — never torch's advice to load it unsafely."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: holds more than tensors ({_unpickling_detail(str(e))}); "
                              f"nothing of it was run") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch file: {first}") from None


def _unpickling_detail(message: str) -> str:
    """The cause in torch's weights-only error, without its advice to load unsafely."""
    lines = [ln.strip() for ln in message.splitlines()[1:] if ln.strip()]
    text = " ".join(ln for ln in lines if not ln.startswith("Check the documentation"))
    text = re.sub(r"^Please file an issue.*?WeightsUnpickler error:\s*", "", text)
    sentences = [s for s in re.split(r"(?<=\.)\s+", text) if s and "weights_only" not in s]
    return " ".join(sentences).rstrip(".") or "not a weights-only torch file"


def read_versioned_json(path: str, version: int) -> dict[str, Any]:
    """A checkpoint JSON file, checked to be valid JSON with ``format_version == version``."""
    return parse_versioned_json(fsio.read_bytes(path), path, version)


def parse_versioned_json(data: bytes, path: str, version: int) -> dict[str, Any]:
    """:func:`read_versioned_json` of bytes already read (``path`` names them in errors)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format_version") != version:
        found = doc.get("format_version") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path}: format_version {found!r}, this build reads {version}")
    return doc


def model_family(uri: str) -> str:
    """The ``family`` of the checkpoint ``uri``'s ``model.json`` (verified), ``vtdnet`` when absent."""
    files = read_checksums(uri)
    jpath = fsio.join(uri, MODEL_JSON)
    return _family(parse_versioned_json(read_verified(uri, MODEL_JSON, files), jpath, FORMAT_VERSION), jpath)


def _family(doc: dict[str, Any], jpath: str) -> str:
    family = doc.get("family", "vtdnet")
    if family not in FAMILIES:
        raise CheckpointError(f"{jpath}: family {family!r} is not one of {sorted(FAMILIES)}")
    return family


def load_model(uri: str, map_location: str | torch.device = "cpu", *, family: str | None = "vtdnet") -> tuple[Any, Any, dict[str, Any]]:
    """Build the model a checkpoint directory describes and load its weights (both files
    verified against ``checksums.json`` first). ``family``: the family the caller can use (a
    checkpoint of another is a :class:`CheckpointError` naming both); None: whichever it holds."""
    files = read_checksums(uri)
    jpath, wpath = fsio.join(uri, MODEL_JSON), fsio.join(uri, MODEL_WEIGHTS)
    doc = parse_versioned_json(read_verified(uri, MODEL_JSON, files), jpath, FORMAT_VERSION)
    held = _family(doc, jpath)
    if family is not None and held != family:
        raise CheckpointError(f"{jpath}: holds a {held} model; this command takes a {family} checkpoint")
    cfg = config_from_dict(FAMILIES[held], doc["model"], source=jpath)
    model = model_class(held)(cfg)
    state = load_tensors(read_verified(uri, MODEL_WEIGHTS, files), wpath, map_location)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{wpath}: expected a state dict of tensors, got {type(state).__name__}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{wpath}: weights do not match the model in {MODEL_JSON}: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model, cfg, doc.get("meta", {})
