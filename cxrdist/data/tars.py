"""Shard tar files: the one writer (byte-identical output) and the one sequential reader.

Training reads shards through webdataset (cxrdist.data.loader); these are for the build, latent caching and
inspection, which need every sample of a file in order.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterator, Sequence

from cxrdist.data import storage
from cxrdist.fileio import sha256_file


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, {ext: bytes}) as `path` via a temp name; returns (sha256, bytes).

    tarfile directly rather than webdataset's TarWriter: every header field is fixed here (mtime 0, owner
    0/0, mode 0444), which the byte-identical guarantee needs, and the build stays free of a torch import.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, parts in samples:
                    for ext in sorted(parts):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(parts[ext]), 0, 0o444
                        tar.addfile(info, io.BytesIO(parts[ext]))
            handle.flush()
            os.fsync(handle.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest, size


def read_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a shard in file order; webdataset's key = the name up to the first dot. `path` may be
    any location cxrdist.data.storage opens: the tar is streamed, not read whole first."""
    current, parts = None, {}
    with storage.opened(str(path)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if key != current and current is not None:
                yield current, parts
                parts = {}
            current = key
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts
