"""Shard tar files: the one writer (byte-identical output) and the one sequential reader.

The build, latent caching, inspection and the training loaders all read shards through `tar_samples`, which
holds a shard to what the builder writes: an uncompressed tar of at most MAX_MEMBERS members of at most
MAX_MEMBER_BYTES each. A shard from elsewhere cannot make a reader hold more than one member in memory.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from cxrdist.data import storage
from cxrdist.errors import DataError
from cxrdist.fileio import atomic_file, sha256_file

# well above the largest real member: a 4096 x 4096 16-bit PNG is 32 MiB, a latents array far less
MAX_MEMBER_BYTES = 256 << 20
# a shard of 1000 samples has 3000 to 4000 members (png, txt, json, latents.npy)
MAX_MEMBERS = 1_000_000


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, {ext: bytes}) as `path` via a temp name; returns (sha256, bytes).

    tarfile directly rather than webdataset's TarWriter: every header field is fixed here (mtime 0, owner
    0/0, mode 0444), which the byte-identical guarantee needs, and the build stays free of a torch import.
    """
    with atomic_file(path) as handle:
        with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, parts in samples:
                for ext in sorted(parts):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(parts[ext]), 0, 0o444
                    tar.addfile(info, io.BytesIO(parts[ext]))
        handle.flush()  # hashed under its temporary name: a shard that cannot be hashed never appears
        digest, size = sha256_file(handle.name), os.fstat(handle.fileno()).st_size
    return digest, size


class _Oversized(Exception):
    def __init__(self, name: str, size: int):
        super().__init__(name, size)
        self.name, self.size = name, size


class _SizeCheckedTarInfo(tarfile.TarInfo):
    """Refuses a header that announces more than MAX_MEMBER_BYTES as soon as it is parsed: tarfile reads the body
    of a pax or GNU long-name header into memory whole, before any member reaches the reader."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        info = super().frombuf(buf, encoding, errors)
        if info.size > MAX_MEMBER_BYTES:
            raise _Oversized(info.name, info.size)
        return info


def tar_samples(stream: BinaryIO, location: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of the shard `stream` reads, in file order; the key is webdataset's (the member name up
    to its first dot). DataError naming the shard when it is not a shard the builder could have written."""
    current, parts = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_SizeCheckedTarInfo) as tar:
            for number, member in enumerate(tar, 1):
                tar.members = []  # stream mode would keep every header read so far
                if number > MAX_MEMBERS:
                    raise DataError(f"{location} has more than {MAX_MEMBERS} members, more than any shard: "
                                    "it is not a shard of this set; rebuild the shard set")
                if not member.isfile():
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise _Oversized(member.name, member.size)
                key, _, ext = member.name.partition(".")
                if key != current and current is not None:
                    yield current, parts
                    parts = {}
                if ext in parts:
                    raise DataError(f"{location}: sample {storage.safe_text(key)} has two {storage.safe_text(ext)} "
                                    "members: the shard is damaged; rebuild the shard set")
                current = key
                parts[ext] = tar.extractfile(member).read()
    except _Oversized as big:
        raise DataError(f"{location}: member {storage.safe_text(big.name)} has {big.size} bytes, more than the "
                        f"{MAX_MEMBER_BYTES >> 20} MiB a shard member may hold: the shard is damaged or not one of "
                        "this set; rebuild the shard set") from None
    except tarfile.TarError as exc:
        raise DataError(f"{location} is not a readable shard ({storage.safe_text(exc)}): the file is damaged or cut "
                        "short; rebuild the shard set (or upload it again)") from None
    if current is not None:
        yield current, parts


def read_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """tar_samples of the shard at `path`, any location cxrdist.data.storage opens: streamed, not read whole first."""
    with storage.opened(str(path)) as stream:
        yield from tar_samples(stream, str(path))
