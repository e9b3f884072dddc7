"""Mixed precision: the one autocast context and the GradScaler of a run.

``fp16`` (the paper's setting): ``torch.autocast(dtype=float16)`` + ``torch.amp.GradScaler`` —
the loss is scaled before backward, gradients are unscaled before clipping, and a step whose
gradients overflow is skipped by the scaler (on every rank together: the all-reduced gradients
are identical, so is the inf check). ``bf16``: autocast to bfloat16, no scaler (bf16 has fp32's
range). ``fp32``: no autocast (CPU tests and exact-resume checks). Parameters, optimizer state and
the loss sum stay fp32 in every mode; torchvision's RoIAlign/NMS already run in fp32 under
autocast.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}


class Precision:
    """``autocast()`` for the forward pass and ``scaler`` (enabled for fp16 only)."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in _DTYPES:
            raise ValueError(f"precision must be one of {tuple(_DTYPES)}, got {mode!r}")
        self.mode = mode
        self.device = device
        self.dtype = _DTYPES[mode]
        if mode == "fp16" and device.type == "cpu":
            log.warning("precision fp16 on CPU: autocast float16 on CPU is slow; use fp32 or bf16 there")
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0
