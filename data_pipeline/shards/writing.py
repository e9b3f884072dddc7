"""What every converter (BDD100K, Cityscapes-3D) does the same way when it writes a shard family:
apply ``on_error`` to bad input, and clear a family's leftovers before (re)writing it."""

from __future__ import annotations

import re
from typing import Any

from data_pipeline import fsio
from data_pipeline.errors import DataError
from data_pipeline.shards import format as SF


class Skips:
    """Applies ``on_error`` to a DataError: re-raise it, or record it for the manifest."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.items: list[dict[str, Any]] = []

    def handle(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.items.append({"file": err.file, "frame": err.frame, "field": err.field, "error": err.message})


def clean_family(out: str, set_name: str, split: str, *, n_planned: int, everything: bool) -> None:
    """Remove temp files of interrupted writes and shards beyond the plan (all shards if
    ``everything``). Only names of this family's shard pattern are touched."""
    d = fsio.join(out, SF.shard_dir(set_name, split))
    pat = re.compile(rf"{set_name}-{split}-(\d{{6}})\.tar(\.json)?")
    for f in fsio.list_files(d):
        m = pat.fullmatch(f)
        if fsio.TMP_MARKER in f and f.startswith(f"{set_name}-{split}-"):
            fsio.remove(fsio.join(d, f))
        elif m and (everything or int(m[1]) >= n_planned):
            fsio.remove(fsio.join(d, f))
