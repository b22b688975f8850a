"""Files written so that a reader never sees half of one, and file digests.

Every JSON, YAML or JSON-lines file the toolkit writes (index.json, checkpoint markers, trainer state, run and
evaluation summaries) goes through `write_text_atomic`, and single binary files (the kohya LoRA export) through
`write_bytes_atomic`: a temporary name in the same folder, flushed and fsynced, then renamed over the target.
A crash or a full disk leaves the previous file or none, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def _write_atomic(path: str | os.PathLike, data: str | bytes, mode: str, **open_kwargs: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return _write_atomic(path, text, "w", encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """A binary file (e.g. a .safetensors serialised in memory), by the same temporary-name-and-rename route."""
    return _write_atomic(path, data, "wb")


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """`data` as JSON (values JSON lacks, such as paths, as their str), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
