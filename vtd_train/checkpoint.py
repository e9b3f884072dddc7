"""The model part of a checkpoint: weights + the config that builds the model.

A checkpoint is a directory (local path or any fsspec URI; Ray Train checkpoints are such
directories) holding:

================  ==============================================================================
``model.pt``      the model's ``state_dict`` (``torch.save``; read with ``weights_only=True``,
                  so loading never runs pickled code)
``model.json``    ``{"format_version", "model": VTDNetConfig as a dict, "meta": {...}}`` — written
                  last: a directory without it is an incomplete checkpoint
================  ==============================================================================

Training state (optimizer, scaler, scheduler, loader position, RNG) lives beside these in the
same directory and is the training shell's business.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import torch

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from vtd_train.model.config import config_from_dict
from vtd_train.model.vtdnet import VTDNet, VTDNetConfig

MODEL_WEIGHTS = "model.pt"
MODEL_JSON = "model.json"
FORMAT_VERSION = 1


class CheckpointError(VTDInputError):
    """A checkpoint that is missing, incomplete or does not match its model config."""


def save_model(uri: str, model: torch.nn.Module, cfg: VTDNetConfig, meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and ``cfg`` into the checkpoint directory ``uri`` (atomically per
    file, ``model.json`` last)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    fsio.write_bytes_atomic(fsio.join(uri, MODEL_WEIGHTS), buf.getvalue())
    doc = {"format_version": FORMAT_VERSION, "model": dataclasses.asdict(cfg), "meta": meta or {}}
    fsio.write_json_atomic(fsio.join(uri, MODEL_JSON), doc)


def read_versioned_json(path: str, version: int) -> dict[str, Any]:
    """A checkpoint JSON file, checked to be valid JSON with ``format_version == version``."""
    try:
        doc = json.loads(fsio.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: malformed JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format_version") != version:
        found = doc.get("format_version") if isinstance(doc, dict) else None
        raise CheckpointError(f"{path}: format_version {found!r}, this build reads {version}")
    return doc


def load_model(uri: str, map_location: str | torch.device = "cpu") -> tuple[VTDNet, VTDNetConfig, dict[str, Any]]:
    """Build the model a checkpoint directory describes and load its weights."""
    jpath, wpath = fsio.join(uri, MODEL_JSON), fsio.join(uri, MODEL_WEIGHTS)
    if not fsio.exists(jpath):
        raise CheckpointError(f"{uri}: not a complete checkpoint (no {MODEL_JSON})")
    doc = read_versioned_json(jpath, FORMAT_VERSION)
    cfg = config_from_dict(VTDNetConfig, doc["model"], source=jpath)
    model = VTDNet(cfg)
    if not fsio.exists(wpath):
        raise CheckpointError(f"{uri}: {MODEL_WEIGHTS} is missing")
    state = torch.load(io.BytesIO(fsio.read_bytes(wpath)), map_location=map_location, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{wpath}: weights do not match the model in {MODEL_JSON}: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model, cfg, doc.get("meta", {})
