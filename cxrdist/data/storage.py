"""Where a shard set lives: a local folder, a URL of any fsspec protocol, or a webdataset `pipe:` command.

    shards/phantom                                   a folder (index.json and the .tar files in it)
    https://host/sets/phantom                        fsspec: https, s3://, gs://, az://, hf://, ... (the folder URL)
    pipe:aws s3 cp s3://bucket/sets/phantom/{} -     a command writing one file to stdout; {} is the file name

Members (index.json, each shard) are opened as sequential streams: a shard is read once from its start and never
downloaded whole first. Credentials come from each library's usual environment and config files (AWS_* and
~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, ...); protocols beyond http(s) need their fsspec
package (s3fs, gcsfs, adlfs), and a missing one is named with its pip command.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator

from cxrdist.errors import DataError

PIPE = "pipe:"
# fsspec protocols whose package is not installed with cxrdist: the pip command that adds it
EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def is_remote(location: str | os.PathLike) -> bool:
    """A URL (`scheme://...`) or a pipe: command; anything else is a local path."""
    text = str(location)
    return text.startswith(PIPE) or "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    """A local location as a plain path (`file:///data/set` -> `/data/set`)."""
    text = str(location)
    return text[len("file://"):] if text.startswith("file://") else text


def member(root: str | os.PathLike, name: str) -> str:
    """The location of file `name` of the shard set at `root`."""
    text = str(root)
    if text.startswith(PIPE):
        if "{}" not in text:
            raise DataError(f"shard set {text!r}: a pipe: location needs {{}} where the file name goes, e.g. "
                            "'pipe:aws s3 cp s3://bucket/set/{} -'")
        return text.replace("{}", name)
    if is_remote(text):
        return text.rstrip("/") + "/" + name
    return str(Path(local_path(text)) / name)


def open_stream(location: str) -> BinaryIO:
    """A binary stream of one member, read sequentially. DataError (one line) when it is missing or unreachable."""
    if location.startswith(PIPE):
        from webdataset.gopen import gopen

        return gopen(location, "rb")  # its close() raises when the command failed
    if not is_remote(location):
        try:
            return open(local_path(location), "rb")
        except FileNotFoundError:
            raise DataError(f"{location} is missing: rebuild the shard set (or restore the file)") from None
    import fsspec

    protocol = location.split("://", 1)[0]
    try:
        # http(s): a plain streaming GET (block_size 0), so servers without range requests work too
        options = {"block_size": 0} if protocol in ("http", "https") else {}
        return fsspec.open(location, "rb", **options).open()
    except ImportError as exc:
        package = EXTRAS.get(protocol)
        hint = f"pip install {package}" if package else f"install the fsspec package for {protocol}:// ({exc})"
        raise DataError(f"{location}: reading {protocol}:// needs {package or 'a package'}: {hint}") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise DataError(f"{location}: fsspec knows no protocol {protocol!r}: check data.shards") from None
        raise
    except FileNotFoundError:
        raise DataError(f"{location} is missing (not found at the URL): check data.shards and that the shard "
                        "set was uploaded whole") from None
    except OSError as exc:
        raise DataError(f"{location} could not be opened ({type(exc).__name__}: {exc}): check the URL, the "
                        "network and the credentials") from None


@contextlib.contextmanager
def opened(location: str) -> Iterator[BinaryIO]:
    """open_stream as a context: closed at the end, and a failed pipe: command or a broken connection is one line."""
    stream = open_stream(location)
    try:
        yield stream
    except OSError as exc:
        raise DataError(f"{location} could not be read ({exc}): check the location and the network") from None
    finally:
        _close(stream, location)


def read_bytes(location: str) -> bytes:
    """The whole member (index.json)."""
    with opened(location) as stream:
        return stream.read()


def _close(stream: BinaryIO, location: str) -> None:
    try:
        stream.close()
    except Exception as exc:  # a pipe: command that failed reports it here (webdataset raises a bare Exception)
        status = getattr(stream, "status", None)
        why = f"the command exited with status {status}" if status is not None else str(exc)
        raise DataError(f"{location} could not be read ({why}): check the command and that the file exists") from None


def sha256_stream(location: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256, bytes) of a whole member, streamed."""
    digest, size = hashlib.sha256(), 0
    with opened(location) as stream:
        while block := stream.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class CheckedStream:
    """A shard stream that hashes what passes through it. `finish()`, once the reader has taken the whole shard,
    reads what is left (the tar's end padding) and compares the bytes with index.json's sha256 and size: a remote
    shard is checked this way instead of being read twice (once to hash, once to train). A rank that stops
    inside a shard never calls it, and that shard is not checked by that rank."""

    def __init__(self, stream: BinaryIO, location: str, sha256: str, size: int | None):
        self.stream, self.location, self.expected, self.size = stream, location, sha256, size
        self.digest, self.seen = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        block = self.stream.read(n)
        self.digest.update(block)
        self.seen += len(block)
        return block

    def finish(self) -> None:
        while self.read(1 << 16):
            pass
        if (self.size is not None and self.seen != self.size) or self.digest.hexdigest() != self.expected:
            raise DataError(f"{self.location}: {self.seen} bytes, sha256 {self.digest.hexdigest()[:12]}...; index.json "
                            f"says {self.size} bytes, {self.expected[:12]}...: the shard is damaged or was replaced; "
                            "upload the shard set again")

    def close(self) -> None:
        _close(self.stream, self.location)
