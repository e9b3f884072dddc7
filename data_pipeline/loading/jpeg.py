"""JPEG decoding for the data pipeline: libjpeg-turbo through ``simplejpeg``.

``simplejpeg`` decodes into a buffer the caller gives it, and the loader relies on that: a
DataLoader worker decodes each frame straight into the shared-memory segment its batch travels
in (:func:`data_pipeline.loading.transfer.pack_batch`), instead of decoding into private memory and
copying 2.7 MB per 720p frame across afterwards, a copy that cost a worker 0.55 ms per frame,
a seventh of the decode itself (benchmarks/RESULTS.md). It is also the fastest decoder installed
(about 5% faster than ``torchvision.io.decode_jpeg``, pixel-identical output), and it is strict:
a truncated or corrupt stream is an error, not a warning with a half-grey frame.

Only JPEG is parsed here; any colour space libjpeg-turbo reads (YCbCr, grey, CMYK, YCCK) is
converted to RGB. Errors come back as ``ValueError`` with libjpeg-turbo's message; callers turn
them into :class:`~data_pipeline.errors.DataError` naming the shard, frame and member.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
import torch
from torch import Tensor


def read_size(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """``(height, width)`` from a JPEG's header, without decoding it. ``ValueError`` if the
    header is not a JPEG one."""
    if not len(data):
        raise ValueError("empty JPEG member")
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    return h, w


def decode_into(data: bytes | bytearray | memoryview, out: np.ndarray) -> None:
    """Decode ``data`` to RGB into ``out``, a C-contiguous uint8 ``[H, W, 3]`` array of the
    image's size. ``ValueError`` if the stream is corrupt or truncated, or its size is not
    ``out``'s."""
    if out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3 or not out.flags.c_contiguous:
        raise ValueError(f"decode target must be a C-contiguous uint8 [H, W, 3] array, got {out.dtype} {out.shape}")
    if not len(data):
        raise ValueError("empty JPEG member")
    got = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True).shape
    if got != out.shape:  # a larger image is refused before decoding ("buffer too small")
        raise ValueError(f"JPEG is {got[1]}x{got[0]}, the decode target {out.shape[1]}x{out.shape[0]}")


def decode(data: bytes | bytearray | memoryview) -> Tensor:
    """Decode ``data`` to a uint8 ``[3, H, W]`` RGB tensor (a view of ``[H, W, 3]`` memory, as
    ``torchvision.io.decode_jpeg`` returns it)."""
    h, w = read_size(data)
    out = np.empty((h, w, 3), np.uint8)
    decode_into(data, out)
    return torch.from_numpy(out).permute(2, 0, 1)
