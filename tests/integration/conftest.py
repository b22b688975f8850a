"""Shared integration fixtures: a small phantom shard set built with the real shard builder."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory) -> Path:
    """120 grayscale 64 px phantoms with reports: 2 folds + a test split (built once per session)."""
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    out = tmp_path_factory.mktemp("shards") / "phantom"
    source = source_class("phantom")(n=120, size=64, seed=0)
    build_shards(source, out, size=64, folds=2, test_fraction=0.2, seed=0, shard_size=32, workers=1, progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _private_torch_extensions(tmp_path_factory):
    """Launched ranks get a torch extensions folder of this session's own, not the user's shared cache.

    Ranks build no op (cxrdist.train.deepspeed_ops), but if one ever does, it cannot wait behind another job's
    build or a lock a killed build left there, and a test that kills a rank cannot leave such a lock in the
    user's cache (torch's build lock is a plain file that only its holder removes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        yield
