"""PNG decoding with the data pipeline's errors: label maps, masks, disparities, Cityscapes images.

A PNG is decoded in full (Pillow reads lazily: a truncated or corrupt stream shows only when the
pixels are read), and every failure becomes one :class:`~data_pipeline.errors.DataError`
naming the file, frame and field.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import DataError


def decode_png(data: bytes | bytearray | memoryview, uri: str, *, frame: str | None = None, field: str | None = None,
               what: str = "PNG") -> tuple[str, tuple[int, int], np.ndarray]:
    """``(mode, (width, height), pixels)`` of the PNG ``data`` read from ``uri``; ``what`` names
    it in the messages ("mask is not a PNG", "corrupt mask: ...")."""
    not_png = "not a PNG" if what == "PNG" else f"{what} is not a PNG"
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            if im.format != "PNG":
                raise DataError(uri, f"{not_png} (format {im.format})", frame=frame, field=field)
            return im.mode, im.size, np.asarray(im)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(uri, f"corrupt {what}: not a recognisable image file", frame=frame, field=field) from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise DataError(uri, f"corrupt {what}: {type(e).__name__}: {e}", frame=frame, field=field) from None
