"""Zip archives of checkpoint folders: safe extraction and atomic writing.

The original project shipped checkpoints as `best_model_foldX_epochY.zip` and extracted archives without a
member filter. Here every member is checked before anything is extracted: absolute paths, `..` components,
drive letters and symbolic links are refused, so an archive can never write outside its target folder.
Only the files a model is made of are extracted (`MODEL_SUFFIXES`), and the bytes written are capped
relative to the archive's own size (`unpack_limit`), so a small archive cannot fill the disk.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from cxrdist.errors import InputError, ModelError
from cxrdist.fileio import is_disk_full, temp_name

log = logging.getLogger(__name__)

MAX_UNPACKED_BYTES = 64 * 2**30  # refuse archives claiming more than this (zip bombs, corrupt headers)
# What `load_for_sampling` reads from a model folder: configs, markers and metadata (.json: model_index,
# */config.json, cxrdist.json, cxrdist_checkpoint.json, tokenizer files), weights (.safetensors; legacy .bin,
# which diffusers/transformers read with torch.load(weights_only=True)), tokenizer vocabularies (.txt, .model)
# and a training checkpoint's config.yaml. Optimizer state, samples, logs and anything else stay in the zip.
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".yaml")
# Model weights are float tensors, which deflate barely compresses (~1.1x); configs and tokenizers compress
# ~5-10x but are small. 20x the archive's size is far above any real checkpoint, and the fixed allowance
# covers archives made only of text; a zip bomb (1000x and more) is refused before anything is written.
UNPACK_RATIO = 20
UNPACK_ALLOWANCE = 64 * 2**20


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member may not be extracted, or None when it is safe."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in path.parts:
        return "has a '..' component"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return None


def unpack_limit(zip_path: str | Path) -> int:
    """The most bytes extracting `zip_path` may write: UNPACK_RATIO x its size + UNPACK_ALLOWANCE."""
    return min(MAX_UNPACKED_BYTES, UNPACK_RATIO * Path(zip_path).stat().st_size + UNPACK_ALLOWANCE)


def is_model_file(info: zipfile.ZipInfo) -> bool:
    return not info.is_dir() and PurePosixPath(info.filename.replace("\\", "/")).suffix.lower() in MODEL_SUFFIXES


def check_zip(zip_path: str | Path) -> list[zipfile.ZipInfo]:
    """Validate every member of an archive; raise ModelError naming the first bad one. Returns the members
    that `safe_extract` writes (the model files)."""
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{zip_path} is not a readable zip archive ({exc}): re-create or re-download it") from None
    for info in members:
        problem = _member_problem(info)
        if problem:
            raise ModelError(f"{zip_path}: member '{info.filename}' {problem}; refusing to extract this archive")
    wanted = [info for info in members if is_model_file(info)]
    if len(wanted) < len(members):
        log.debug("%s: %d member(s) that are not model files stay unextracted", zip_path, len(members) - len(wanted))
    total, limit = sum(info.file_size for info in wanted), unpack_limit(zip_path)
    if total > limit:
        raise ModelError(f"{zip_path} claims {_size(total)} unpacked from {_size(zip_path.stat().st_size)}, "
                         f"more than the {_size(limit)} limit for an archive of that size: it is damaged or a "
                         "zip bomb; re-create it with `cxrdist export`")
    return wanted


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def safe_extract(zip_path: str | Path, dest: str | Path) -> Path:
    """Extract the model files of `zip_path` into `dest` after checking every member; return `dest`.

    Bytes are counted while they are written (a member's header may lie about its size), and a failure
    (bad CRC, truncated data, over the limit) removes what this call wrote before raising ModelError.
    """
    members = check_zip(zip_path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    budget = [unpack_limit(zip_path)]
    written: list[Path] = []
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in members:
                target = (root / info.filename.replace("\\", "/")).resolve()
                if root != target and root not in target.parents:  # belt and braces after the name checks
                    raise ModelError(f"{zip_path}: member '{info.filename}' points outside the target folder")
                _extract_member(archive, info, target, budget, written)
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, RuntimeError, NotImplementedError) as exc:
        # bad CRC, truncated or undecompressable data; RuntimeError: an encrypted member;
        # NotImplementedError: a compression method this Python lacks
        _remove(written)
        raise ModelError(f"{zip_path} is damaged ({exc}): re-create or re-download it") from None
    except (ModelError, OSError):  # OSError: the destination (disk full, permissions), reported by the CLI
        _remove(written)
        raise
    return dest


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: list[int],
                    written: list[Path]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    written.append(target)
    with archive.open(info) as src, open(target, "wb") as dst:  # zipfile checks the CRC at the member's end
        while chunk := src.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise ModelError(f"{archive.filename} unpacks to more than its size allows: it is damaged or a "
                                 "zip bomb; re-create it with `cxrdist export`")
            dst.write(chunk)


def _remove(paths: list[Path]) -> None:
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            path.unlink()


def write_zip(folder: str | Path, out: str | Path | None = None) -> Path:
    """Zip `folder` (members under the folder's own name) into `out` (default: `<folder>.zip`), atomically.

    Members are written in sorted order, so the same folder gives the same member list every time. The archive
    is written under a temporary name of this process and linked into place, so it never replaces a file, and
    a failure (a full disk included) leaves nothing behind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"cannot zip {folder}: not a folder")
    out = Path(out) if out is not None else folder.with_name(folder.name + ".zip")
    if out.exists():
        raise ModelError(f"{out} already exists: archives are never overwritten, move it or choose another name")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the parent folder {out.parent} does not exist; create it or choose "
                         "another path")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    tmp = temp_name(out)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in files:
                archive.write(file, arcname=(Path(folder.name) / file.relative_to(folder)).as_posix())
        _link_into_place(tmp, out)
    except OSError as exc:
        raise InputError(_zip_problem(out, tmp, exc)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _link_into_place(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out` unless `out` appeared meanwhile: a hard link fails on an existing name where a rename
    would replace it. File systems without hard links get the rename after a last check."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise ModelError(f"{out} already exists: archives are never overwritten, move it or choose another "
                         "name") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if out.exists():
            raise ModelError(f"{out} already exists: archives are never overwritten, move it or choose another "
                             "name") from None
        os.replace(tmp, out)


def _zip_problem(out: Path, tmp: Path, exc: OSError) -> str:
    if exc.filename is not None and str(exc.filename) not in (str(tmp), str(out)):
        return f"cannot read {exc.filename} ({exc.strerror or exc}): nothing was written"
    if is_disk_full(exc):
        return f"disk full while writing {out}: free space and rerun (nothing was left behind)"
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        return f"cannot write {out} ({exc.strerror or exc}): choose a writable folder"
    return f"cannot write {out} ({exc.strerror or exc})"
