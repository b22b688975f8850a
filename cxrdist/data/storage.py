"""Where a shard set lives: a local folder, a URL of any fsspec protocol, or a webdataset `pipe:` command.

    shards/phantom                                   a folder (index.json and the .tar files in it)
    https://host/sets/phantom                        fsspec: https, s3://, gs://, az://, hf://, ... (the folder URL)
    pipe:aws s3 cp s3://bucket/sets/phantom/{} -     a command writing one file to stdout; {} is the file name

Members (index.json, each shard) are opened as sequential streams: a shard is read once from its start and never
downloaded whole first. Credentials come from each library's usual environment and config files (AWS_* and
~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, ...); protocols beyond http(s) need their fsspec
package (s3fs, gcsfs, adlfs), and a missing one is named with its pip command.

What comes from a shard set is not trusted: a member name is only ever a plain file name of the set (never a path
out of it, never shell syntax in a pipe: command), a stream stops at the bytes it may have (index.json at
MAX_INDEX_BYTES, a shard at the size index.json gives it), and a transport failing mid-read is one DataError
naming the member.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shlex
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from cxrdist.errors import DataError
from cxrdist.fileio import check_not_special

PIPE = "pipe:"
# index.json of a million-image set is a few MiB: a stream far past that is not an index, and is not read on
MAX_INDEX_BYTES = 64 << 20
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


def safe_text(text: object) -> str:
    """`text` as it may reach a terminal: control characters, ANSI escapes and invisible code points become Python
    escapes (\\x1b, \\n, \\u202e); letters of any script stay as they are. For what a shard set or manifest says."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def member(root: str | os.PathLike, name: str) -> str:
    """The location of file `name` of the shard set at `root`.

    `name` comes from index.json, which load_index has already held to the builder's names; this is the second
    line: a name that could leave the set (a separator, '..', NUL) is refused for every kind of location, and for a
    pipe: command so is any name that is not one plain shell word. Refused rather than quoted: a command that puts
    {} inside its own quotes would turn shlex.quote's quotes inside out."""
    text = str(root)
    if not name or any(part in name for part in ("/", "\\", "..", "\0")):
        raise DataError(f"shard set {safe_text(text)}: {repr(name)[:80]} is not a file name of the set "
                        "(a path separator, '..' or NUL): rebuild the shard set's index.json")
    if text.startswith(PIPE):
        if "{}" not in text:
            raise DataError(f"shard set {text!r}: a pipe: location needs {{}} where the file name goes, e.g. "
                            "'pipe:aws s3 cp s3://bucket/set/{} -'")
        if shlex.quote(name) != name or name.startswith("-"):
            raise DataError(f"shard set {safe_text(text)}: file name {repr(name)[:80]} is not one plain word for "
                            "the shell (letters, digits and @%+=:,._- only): rebuild the shard set's index.json")
        return text.replace("{}", name)
    if is_remote(text):
        return text.rstrip("/") + "/" + name
    return str(Path(local_path(text)) / name)


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a stream's read raises when the file, connection or command fails: OSError (files, pipes, sockets,
    timeouts) and aiohttp's ClientError (an HTTP body cut short), which fsspec passes on as it is."""
    try:
        from aiohttp import ClientError
    except ImportError:
        return (OSError,)
    return (OSError, ClientError)


def _read_failed(raw: BinaryIO, location: str, exc: BaseException) -> DataError:
    status = getattr(raw, "status", None)  # a pipe: command that already exited
    if status:
        return DataError(f"{location} could not be read (the command exited with status {status}): check the "
                         "command and that the file exists")
    return DataError(f"{location} could not be read ({type(exc).__name__}: {safe_text(exc)}): check the location "
                     "and the network, then run again")


class MemberStream:
    """One member, read sequentially: a read error of any transport is one DataError naming the member, and a
    stream longer than `limit` bytes (when given) is refused as the first byte past it arrives, so a server that
    never stops sending cannot grow this process. `too_long` ends that error's line (what it means, what to do)."""

    def __init__(self, raw: BinaryIO, location: str, limit: Optional[int] = None, too_long: str = ""):
        self.raw, self.location, self.limit, self.too_long = raw, location, limit, too_long
        self.seen = 0

    def read(self, n: int = -1) -> bytes:
        if self.limit is not None:
            room = self.limit - self.seen + 1  # one byte more than allowed shows the stream is too long
            n = room if n is None or n < 0 else min(n, room)
        try:
            block = self.raw.read(n)
        except _transport_errors() as exc:
            raise _read_failed(self.raw, self.location, exc) from None
        self.seen += len(block)
        if self.limit is not None and self.seen > self.limit:
            raise DataError(f"{self.location} holds more than {self.limit} bytes: {self.too_long}")
        return block

    def close(self) -> None:
        _close(self.raw, self.location)


def open_stream(location: str, limit: Optional[int] = None, too_long: str = "") -> MemberStream:
    """A binary stream of one member, read sequentially, at most `limit` bytes (MemberStream). DataError (one
    line) when it is missing or unreachable."""
    return MemberStream(_open_raw(location), location, limit, too_long)


def _open_raw(location: str) -> BinaryIO:
    if location.startswith(PIPE):
        from webdataset.gopen import gopen

        return gopen(location, "rb")  # its close() raises when the command failed
    if not is_remote(location):
        path = local_path(location)
        check_not_special(path, "shard set file", DataError)  # a FIFO blocks the open, a device never ends
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{location} is missing: rebuild the shard set (or restore the file)") from None
        except OSError as exc:
            raise DataError(f"{location} could not be opened ({exc.strerror or exc}): check the shard set's "
                            "files and their permissions") from None
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
    except _transport_errors() as exc:
        raise DataError(f"{location} could not be opened ({type(exc).__name__}: {safe_text(exc)}): check the URL, "
                        "the network and the credentials") from None


@contextlib.contextmanager
def opened(location: str, limit: Optional[int] = None, too_long: str = "") -> Iterator[MemberStream]:
    """open_stream as a context: closed at the end. When the body failed, that failure is the one reported (a
    pipe: command stopped early may also exit non-zero)."""
    stream = open_stream(location, limit, too_long)
    try:
        yield stream
    except BaseException:
        with contextlib.suppress(DataError):
            stream.close()
        raise
    stream.close()


def read_bytes(location: str, limit: int, too_long: str) -> bytes:
    """The whole member (index.json), refused past `limit` bytes."""
    blocks = []
    with opened(location, limit, too_long) as stream:
        while block := stream.read(1 << 20):
            blocks.append(block)
    return b"".join(blocks)


def _close(stream: BinaryIO, location: str) -> None:
    try:
        stream.close()
    except Exception as exc:  # a pipe: command that failed reports it here (webdataset raises a bare Exception)
        status = getattr(stream, "status", None)
        why = f"the command exited with status {status}" if status is not None else str(exc)
        raise DataError(f"{location} could not be read ({why}): check the command and that the file exists") from None


_SHARD_TOO_LONG = "more than index.json gives it: the shard is damaged or was replaced; upload the shard set again"


def sha256_stream(location: str, size: Optional[int] = None, chunk: int = 1 << 20) -> tuple[str, int]:
    """(sha256, bytes) of a whole member, streamed; refused as soon as it runs past the `size` index.json gives."""
    digest, seen = hashlib.sha256(), 0
    with opened(location, size, _SHARD_TOO_LONG) as stream:
        while block := stream.read(chunk):
            digest.update(block)
            seen += len(block)
    return digest.hexdigest(), seen


def open_checked(location: str, sha256: str, size: Optional[int]) -> "CheckedStream":
    """A shard stream that stops at the `size` bytes index.json gives it and is hashed as it is read."""
    return CheckedStream(open_stream(location, size, _SHARD_TOO_LONG), location, sha256, size)


class CheckedStream:
    """A shard stream that hashes what passes through it. `finish()`, once the reader has taken the whole shard,
    reads what is left (the tar's end padding) and compares the bytes with index.json's sha256 and size: a remote
    shard is checked this way instead of being read twice (once to hash, once to train). A rank that stops
    inside a shard never calls it, and that shard is not checked by that rank."""

    def __init__(self, stream: MemberStream, location: str, sha256: str, size: int | None):
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
        self.stream.close()
