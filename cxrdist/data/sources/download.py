"""Resumable HTTP downloads and safe archive extraction (used by the IU X-ray source).

Download rules: a `<name>.part` file grows until complete (it outlives the process on purpose: the next
run resumes it, so it is the one temporary name here that is not unique to a process); a resumed request must
come back 206 with a Content-Range that starts exactly where the file ends, otherwise the part is discarded
and the download restarts cleanly. Transient failures retry with exponential backoff. The result is checked against the
server's size (and `expected_size` / `sha256` when given) before it is renamed into place.
"""
from __future__ import annotations

import re
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import requests

from cxrdist.errors import DataError
from cxrdist.fileio import is_disk_full, sha256_file, temp_name
from cxrdist.progress import progress_meter

IU_BASE_URL = "https://openi.nlm.nih.gov/imgs/collections/"
IU_ARCHIVES = ("NLMCXR_png.tgz", "NLMCXR_reports.tgz")
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
CHUNK = 1 << 20


class _Retry(Exception):
    """A transient failure: try again after a pause."""


@dataclass
class _Probe:
    total: Optional[int]  # None when the server does not say
    ranges: bool


def _probe(session: requests.Session, url: str, timeout: float) -> _Probe:
    # A one-byte range request answers both questions (size, range support) without a HEAD, which some
    # servers answer differently from GET.
    with session.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=timeout) as response:
        _raise_for(response, url)
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match and match.group(3) != "*":
                return _Probe(int(match.group(3)), True)
        length = response.headers.get("Content-Length")
        return _Probe(int(length) if length and response.status_code == 200 else None, False)


def _raise_for(response: requests.Response, url: str) -> None:
    if response.status_code in _RETRY_STATUS:
        raise _Retry(f"HTTP {response.status_code}")
    if response.status_code >= 400 and response.status_code != 416:
        raise DataError(f"{url} answered HTTP {response.status_code}: check the URL, or download it by hand and "
                        "pass the folder with --from")


def _fetch_range(session, url: str, part: Path, start: int, end: Optional[int], bar, timeout: float) -> None:
    """Append bytes [start + already on disk, end] of `url` to `part`; restart the part if Range is ignored."""
    have = part.stat().st_size if part.exists() else 0
    if end is not None and start + have > end:
        return
    headers = {}
    if start + have > 0 or end is not None:
        headers["Range"] = f"bytes={start + have}-{'' if end is None else end}"
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        _raise_for(response, url)
        mode = "ab"
        if headers and response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != start + have:
                raise _Retry(f"bad Content-Range {response.headers.get('Content-Range')!r}")
        elif headers and response.status_code == 200:
            if start > 0:
                raise DataError(f"{url} stopped honouring Range requests: rerun with --parallel-downloads 1")
            bar.update(-have)  # server ignored Range: the body is the whole file, so start over
            mode = "wb"
        elif response.status_code == 416:
            raise _Retry("range not satisfiable")
        with open(part, mode) as handle:
            for block in response.iter_content(CHUNK):
                handle.write(block)
                bar.update(len(block))


def _with_retries(action, what: str, retries: int, backoff: float) -> None:
    for attempt in range(retries + 1):
        try:
            return action()
        except (_Retry, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == retries:
                raise DataError(f"{what} failed after {retries + 1} attempts ({exc}): check the connection and "
                                "rerun (the partial file is kept and resumed)") from None
            time.sleep(backoff * (2 ** attempt))


def download(url: str, dest: str | Path, *, expected_size: Optional[int] = None, sha256: Optional[str] = None,
             parallel: int = 1, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
             progress: bool = True, session: Optional[requests.Session] = None) -> Path:
    """Download `url` to `dest` (resumable, checked). Returns dest; DataError with the fix on failure."""
    dest = Path(dest)
    if dest.is_file() and (expected_size is None or dest.stat().st_size == expected_size) \
            and (sha256 is None or sha256_file(dest, CHUNK) == sha256.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    session = session or requests.Session()
    part = dest.with_name(dest.name + ".part")
    probe: list[_Probe] = []
    _with_retries(lambda: probe.append(_probe(session, url, timeout)), f"reaching {url}", retries, backoff)
    total = probe[0].total
    if expected_size is not None and total is not None and total != expected_size:
        raise DataError(f"{url} is {total} bytes but {expected_size} were expected: the file changed upstream; "
                        "check the URL or the expected size")
    pieces = parallel if probe[0].ranges and total and parallel > 1 and total >= parallel * CHUNK else 1
    done = part.stat().st_size if part.exists() and pieces == 1 and probe[0].ranges else 0
    if (pieces == 1 and not probe[0].ranges) or (total is not None and done > total):
        part.unlink(missing_ok=True)  # cannot resume without ranges: a clean restart is the only safe option
        done = 0
    # Parallel pieces update this one reporter from their threads (the plain-line kind counts under a lock).
    with progress_meter(total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                        disable=not progress) as bar:
        if pieces == 1 and total is not None and done == total:
            pass  # complete from an earlier run; checked below
        elif pieces == 1:
            _with_retries(lambda: _fetch_range(session, url, part, 0, None, bar, timeout), f"downloading {url}",
                          retries, backoff)
        else:
            _download_pieces(session, url, part, total, pieces, bar, timeout, retries, backoff)
    _check(part, url, total if total is not None else expected_size, sha256)
    part.replace(dest)
    return dest


def _download_pieces(session, url, part: Path, total: int, pieces: int, bar, timeout, retries, backoff) -> None:
    step = -(-total // pieces)
    ranges = [(i * step, min(total, (i + 1) * step) - 1) for i in range(pieces)]
    paths = [part.with_name(f"{part.name}.{i}") for i in range(pieces)]
    bar.update(sum(p.stat().st_size for p in paths if p.exists()))

    def one(i: int) -> None:
        start, end = ranges[i]
        _with_retries(lambda: _fetch_range(session, url, paths[i], start, end, bar, timeout),
                      f"downloading {url} bytes {start}-{end}", retries, backoff)

    with ThreadPoolExecutor(pieces) as pool:
        list(pool.map(one, range(pieces)))
    with open(part, "wb") as out:
        for path in paths:
            with open(path, "rb") as handle:
                shutil.copyfileobj(handle, out, CHUNK)
    for path in paths:
        path.unlink()


def _check(part: Path, url: str, size: Optional[int], sha256: Optional[str]) -> None:
    if size is not None and part.stat().st_size != size:
        got = part.stat().st_size
        part.unlink()
        raise DataError(f"{url}: got {got} bytes, expected {size}: the download was cut short; rerun it")
    if sha256 is not None and sha256_file(part, CHUNK) != sha256.lower():
        part.unlink()
        raise DataError(f"{url}: sha256 mismatch (the file is damaged or changed upstream): rerun the download, "
                        "or check the expected checksum")


def check_members(archive: tarfile.TarFile, name: str) -> None:
    """Refuse absolute paths, '..', links and device/fifo members before anything is written."""
    for member in archive.getmembers():
        parts = Path(member.name).parts
        problem = ("an absolute path" if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute()
                   else "a '..' path" if ".." in parts
                   else "a link" if member.issym() or member.islnk()
                   else "a device or fifo" if member.isdev() else None)
        if problem:
            raise DataError(f"archive {name} contains {problem} ({member.name!r}): refusing to extract it; "
                            "get the archive from its official source")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a tar archive into `dest` (skipped when dest exists): member checks, then tarfile's data filter.
    The archive is extracted into a temporary folder of this process beside `dest`, renamed when complete; a
    failure removes that folder and nothing else."""
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        return dest
    partial = temp_name(dest)  # ours alone: a folder of the user's beside dest is never touched
    try:
        with tarfile.open(archive) as tar:
            check_members(tar, archive.name)
            tar.extractall(partial, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            # The archive is fine: the disk (or quota) under dest is full.
            raise DataError(f"disk full while extracting {archive} into {dest.parent}: free space there (or "
                            "point --out elsewhere) and rerun") from None
        if isinstance(exc, PermissionError):
            raise DataError(f"cannot extract {archive}: {exc.filename or dest.parent} is not writable") from None
        raise DataError(f"cannot extract {archive} ({exc}): the archive is damaged; download it again") from None
    try:
        partial.rename(dest)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if dest.is_dir():  # another extraction of the same archive finished first: its folder is as good
            return dest
        raise
    return dest


def _archive_stem(path: Path) -> str:
    for suffix in ARCHIVE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def prepare_iu_inputs(from_dir: Optional[str | Path], cache_dir: str | Path, *, parallel: int = 1,
                      progress: bool = True, sha256: Optional[dict[str, str]] = None) -> list[Path]:
    """Folders to read the IU collection from: `from_dir` (archives are extracted into cache_dir, extracted
    folders are used as they are), or, without it, the official archives downloaded into cache_dir."""
    cache = Path(cache_dir)
    if from_dir is not None:
        source = Path(from_dir)
        if not source.is_dir():
            raise DataError(f"--from {source} is not a folder: pass the folder holding the NLMCXR archives or "
                            "the extracted ecgen-radiology/ and PNG folders")
        archives: Sequence[Path] = sorted(p for p in source.iterdir()
                                          if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    else:
        archives = [download(IU_BASE_URL + name, cache / name, parallel=parallel, progress=progress,
                             sha256=(sha256 or {}).get(name)) for name in IU_ARCHIVES]
    roots = [safe_extract(a, cache / _archive_stem(a)) for a in archives]
    return ([Path(from_dir)] if from_dir is not None else []) + roots
