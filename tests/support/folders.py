"""Whole-folder comparisons for tests that must prove nothing was written or changed."""
from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hash(folder: Path) -> str:
    """sha256 over every path below `folder` (names, and the bytes of files): any change, added or removed file
    changes it."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()
