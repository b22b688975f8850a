"""One build per folder: `.cxrdist-build.lock` (a cxrdist.locks folder lock) held by a shard build and by
cache-latents.

Two builds in one --out write and delete the same temporary names, and a cache-latents rewrites the shards a
build is checking: whichever comes second must stop before touching the folder.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from cxrdist.errors import DataError
from cxrdist.locks import folder_lock

LOCK_NAME = ".cxrdist-build.lock"


def build_lock(out: Path, elsewhere: str = "--out") -> contextlib.AbstractContextManager:
    """Hold `out/.cxrdist-build.lock` (cxrdist.locks) while the body runs: taken by a build and by cache-latents."""
    return folder_lock(out, LOCK_NAME, busy="in use", wait="that shard build or cache-latents",
                       elsewhere=elsewhere, error=DataError)
