"""Files written so that a reader never sees half of one, and file digests.

Every JSON, YAML or JSON-lines file the toolkit writes (index.json, checkpoint markers, trainer state, run and
evaluation summaries) goes through `write_text_atomic`, and single binary files (the kohya LoRA export) through
`write_bytes_atomic`, and files written piece by piece (shard tars, preview images) through `atomic_file`: a
temporary name in the same folder, flushed and fsynced, then renamed over the target. A crash or a full disk
leaves the previous file or none, never a torn one. `probe_writable` tells, before any work, whether a folder
takes files at all.

Temporary names are unique to the process and recognisably ours (`temp_name`): a user's `x.tmp` beside the
target is never overwritten or removed. Paths that come from outside (a user, a manifest, a checkpoint, a model
folder) are checked with `check_not_special` before a library opens them: opening a FIFO blocks forever and a
device reads without end.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_SUFFIX = ".cxrdist-tmp"  # every temporary file or folder this toolkit creates ends with it


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or a quota, as the OS, torch's zip writer or safetensors report it: every writer that turns a full
    disk into one line asks this."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    # torch's PytorchStreamWriter says only "file write failed" (or "unexpected pos") when write() fails;
    # safetensors wraps the OS error as StorageFull / QuotaExceeded
    return any(word in text for word in ("No space left on device", "StorageFull", "Disk quota exceeded",
                                         "QuotaExceeded", "file write failed", "unexpected pos"))


def temp_name(path: str | os.PathLike) -> Path:
    """A name beside `path` for writing it before the rename: unique to this process and call, ending .cxrdist-tmp."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def special_file_kind(path: str | os.PathLike) -> str | None:
    """"a FIFO", "a character device", ... when `path` (links followed) exists and is neither a regular file nor a
    folder; None otherwise (a missing path is the caller's own error)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def find_special_file(folder: str | os.PathLike, max_depth: int = 8) -> tuple[Path, str] | None:
    """The first FIFO, device or socket under `folder` (sorted order, folders up to `max_depth` levels down) and
    its kind, or None. An unreadable folder is skipped: whatever needs it reports that."""
    def walk(current: Path, depth: int) -> tuple[Path, str] | None:
        try:
            entries = sorted(current.iterdir())
        except OSError:
            return None
        for entry in entries:
            if (kind := special_file_kind(entry)) is not None:
                return entry, kind
            if depth < max_depth and entry.is_dir() and (found := walk(entry, depth + 1)) is not None:
                return found
        return None

    return walk(Path(folder), 1)


def check_not_special(path: str | os.PathLike, what: str, error: type[Exception]) -> None:
    """Raise `error` with one line when `path` is a FIFO, device or socket (opening one may block or never end)."""
    if (kind := special_file_kind(path)) is not None:
        raise error(f"{what} {path} is {kind}, not a regular file: point it at a file")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """An open file that becomes `path` when the body ends without an exception: written under `temp_name(path)`,
    flushed and fsynced, then renamed over it. On any exception the temporary file is removed and `path` is as
    it was. The one temporary-name-and-rename route: text, JSON, tar shards and preview images all take it."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the write is the one to report
            tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: str | os.PathLike, data: str | bytes, mode: str, **open_kwargs: Any) -> Path:
    with atomic_file(path, mode, **open_kwargs) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return _write_atomic(path, text, "w", encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """A binary file (e.g. a .safetensors serialised in memory), by the same temporary-name-and-rename route."""
    return _write_atomic(path, data, "wb")


def json_text(data: Any, **dumps_kwargs: Any) -> str:
    """JSON with every script written as itself, except lone surrogates, which are written as JSON escapes
    (`\\udcff`): a file name that is not UTF-8 (Linux keeps its bytes as surrogates) can then be written as UTF-8 and
    read back as the same str."""
    text = json.dumps(data, ensure_ascii=False, **dumps_kwargs)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """`data` as JSON (values JSON lacks, such as paths, as their str), atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def probe_writable(folder: str | os.PathLike, *, parents: bool = True) -> None:
    """Create `folder` when it is missing, then create and remove a file in it; OSError when that fails.

    Trying is the only reliable test: os.access says yes to root on a read-only mount. The probe's name is
    temp_name's, unique to the process, so two writers probing one folder at once do not trip each other."""
    folder = Path(folder)
    folder.mkdir(parents=parents, exist_ok=True)
    probe = temp_name(folder / "write-test")
    probe.write_bytes(b"")
    probe.unlink()
