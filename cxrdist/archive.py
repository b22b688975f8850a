"""Zip archives of checkpoint folders: safe extraction and atomic writing.

The original project shipped checkpoints as `best_model_foldX_epochY.zip` and extracted archives without a
member filter. Here every member is checked before anything is extracted: absolute paths, `..` components,
drive letters and symbolic links are refused, so an archive can never write outside its target folder.
"""
from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from cxrdist.errors import ModelError

MAX_UNPACKED_BYTES = 64 * 2**30  # refuse archives claiming more than this (zip bombs, corrupt headers)


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


def check_zip(zip_path: str | Path) -> list[zipfile.ZipInfo]:
    """Validate every member of an archive; raise ModelError naming the first bad one."""
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
    total = sum(info.file_size for info in members)
    if total > MAX_UNPACKED_BYTES:
        raise ModelError(f"{zip_path} claims {total / 2**30:.1f} GiB unpacked, more than the "
                         f"{MAX_UNPACKED_BYTES / 2**30:.0f} GiB limit: check the archive")
    return members


def safe_extract(zip_path: str | Path, dest: str | Path) -> Path:
    """Extract `zip_path` into `dest` after checking every member; return `dest`."""
    members = check_zip(zip_path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        for info in members:
            target = (root / info.filename.replace("\\", "/")).resolve()
            if root != target and root not in target.parents:  # belt and braces after the name checks
                raise ModelError(f"{zip_path}: member '{info.filename}' points outside the target folder")
            archive.extract(info, root)
    return dest


def write_zip(folder: str | Path, out: str | Path | None = None) -> Path:
    """Zip `folder` (members under the folder's own name) into `out` (default: `<folder>.zip`), atomically.

    Members are written in sorted order, so the same folder gives the same member list every time.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"cannot zip {folder}: not a folder")
    out = Path(out) if out is not None else folder.with_name(folder.name + ".zip")
    if out.exists():
        raise ModelError(f"{out} already exists: archives are never overwritten, move it or choose another name")
    tmp = out.with_name(out.name + ".partial")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, arcname=(Path(folder.name) / file.relative_to(folder)).as_posix())
    os.replace(tmp, out)
    return out
