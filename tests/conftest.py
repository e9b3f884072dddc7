"""Fixtures shared by the whole suite: one generated mini dataset and its shards per session."""

from __future__ import annotations

import pytest

from data_pipeline.convert import ConvertOptions, convert
from data_pipeline.synth import generate


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    """A BDD100K-format 'tiny' dataset (seed 0). Read-only: tests must not modify it."""
    root = tmp_path_factory.mktemp("bdd100k")
    generate(str(root), seed=0, size="tiny", overwrite=True)
    return str(root)


@pytest.fixture(scope="session")
def tiny_shards(tiny_root, tmp_path_factory) -> str:
    """``tiny_root`` converted with small shards (3 clips each) so sets have unequal shard counts."""
    out = tmp_path_factory.mktemp("shards")
    convert(ConvertOptions(bdd_root=tiny_root, out=str(out), shard_size=3, clip_len=4, workers=1, progress=False, overwrite=True))
    return str(out)
