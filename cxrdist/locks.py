"""One process at a time per folder: a lock file that names its holder, taken over only when the holder is gone.

A lock is a file created whole by `os.link` from a private temporary name (so it never exists empty) holding
`PID HOST [SLURM_JOB_ID SLURM_RESTART_COUNT]`. It works on any file system a shard set or a run folder may sit
on (local, NFS, Lustre), where advisory locks (flock/fcntl) are not always available, and it tells the second
process who holds the folder.

Its holder is gone when the PID is not running on this host, when the PID is ours but this process never took
the lock (a restarted container reuses PIDs), or when it was taken by an earlier start of this SLURM job (a
requeued job runs once at a time, so that start is over). A lock from another host with no such job record is
respected: a process there cannot be checked from here, and the message says how to clear it.

Taking over a dead holder's lock is serialised by a second file created with O_EXCL: without it, two processes
that both saw the dead lock could each remove the other's fresh lock and both go on.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from cxrdist.errors import CxrdistError

_HELD: set[str] = set()  # locks this process holds (a lock naming our PID may be debris of an earlier life)
TAKEOVER_SUFFIX = ".takeover"
STALE_TAKEOVER_S = 30.0  # a takeover lasts milliseconds: an older marker was left by a process killed inside one


def _slurm_start() -> tuple[str, int] | None:
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        return None
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
    return job, int(restarts) if restarts.isdigit() else 0


def _content() -> str:
    fields = [str(os.getpid()), socket.gethostname()]
    if (start := _slurm_start()) is not None:
        fields += [start[0], str(start[1])]
    return " ".join(fields) + "\n"


def holder(lock: Path) -> Optional[str]:
    """Who holds `lock` ("PID", "PID on HOST"), or None when nobody does (no file, or its holder is gone)."""
    try:
        fields = lock.read_text(encoding="utf-8", errors="replace").split()
    except FileNotFoundError:
        return None
    if not fields or not fields[0].isdigit():
        return None  # never written by us (a lock is created whole): debris
    pid, host = int(fields[0]), fields[1] if len(fields) > 1 else socket.gethostname()
    if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
        start = _slurm_start()
        if start is not None and start[0] == fields[2] and start[1] > int(fields[3]):
            return None  # an earlier start of this requeued job
    if host != socket.gethostname():
        return f"{pid} on {host}"  # a process on another machine cannot be checked from here
    if pid == os.getpid():
        return str(pid) if os.path.abspath(lock) in _HELD else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return str(pid)


def _link_new(lock: Path) -> bool:
    """Create `lock` whole, holding our PID; False when it exists."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.cxrdist-tmp")
    tmp.write_text(_content(), encoding="utf-8")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(lock: Path, seen: str) -> bool:
    """Replace the dead holder's lock (content `seen`) with ours; False when another process got there first."""
    marker = lock.with_name(lock.name + TAKEOVER_SUFFIX)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - marker.stat().st_mtime > STALE_TAKEOVER_S:
                raise _Stuck(marker) from None
        time.sleep(0.05)
        return False
    os.close(fd)
    try:
        try:
            current = lock.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            current = None
        if current is not None:
            if current != seen:
                return False  # someone else's lock now: judge it again
            lock.unlink()
        return _link_new(lock)
    finally:
        marker.unlink(missing_ok=True)


class _Stuck(Exception):
    def __init__(self, marker: Path):
        self.marker = marker


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str, *, busy: str, wait: str, elsewhere: str,
                error: type[CxrdistError]) -> Iterator[Path]:
    """Hold `folder/name` while the body runs. When a live process holds it (this one included), raise `error`
    with one line: "<folder> is <busy> by process <holder>: wait for <wait> to end or choose another <elsewhere>".
    Yields the lock's path."""
    lock = Path(folder) / name
    key = os.path.abspath(lock)
    try:
        for _ in range(50):
            if _link_new(lock):
                break
            try:
                seen = lock.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            who = holder(lock)
            if who is not None:
                raise error(f"{folder} is {busy} by process {who}: wait for {wait} to end or choose another "
                            f"{elsewhere} (if no such process runs, delete {lock})")
            if _take_over(lock, seen):
                break
        else:
            raise error(f"cannot take the lock {lock}: other processes keep taking it; wait, or choose another "
                        f"{elsewhere}")
    except _Stuck as stuck:
        raise error(f"{stuck.marker} was left by a process stopped while taking over {lock}: make sure no other "
                    "process uses the folder, then delete both files") from None
    except PermissionError as exc:
        raise error(f"cannot create the lock {lock} ({exc.strerror}): the folder must be writable") from None
    _HELD.add(key)
    try:
        yield lock
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):  # remove it only while it is still ours
            if lock.read_text(encoding="utf-8").split()[:2] == _content().split()[:2]:
                lock.unlink()
