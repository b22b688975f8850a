"""Files of a sampling run: prompts read from flags and files, 8-bit grayscale PNGs with text metadata,
`index.jsonl` and a contact sheet, written so that an interrupted run leaves nothing half-written.

Layout of an output folder (one run per folder; a folder that already holds samples is refused):
    0000_s42.png, 0001_s43.png, ...   run index (zero-padded, sorts in generation order) + seed
    index.jsonl                       one JSON object per image: file + every metadata field
    grid.png                          contact sheet of the first 64 images
    config.yaml                       the resolved config of the run

How the folder is finished: every file is written into a staging folder of this process first
(cxrdist.fileio.temp_name). A new (or empty) --out is that staging folder renamed in one step, so it exists
complete or not at all. An --out that already holds other files gets the files moved in one by one: a journal
of the moves is written into the staging folder before the first one, and a later run into that --out that
finds it finishes the moves, says so, and stops (the folder then holds that earlier run's complete samples).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from cxrdist.errors import InputError
from cxrdist.fileio import TEMP_SUFFIX, probe_writable, temp_name, write_json_atomic
from cxrdist.locks import folder_lock


def contact_sheet(images: np.ndarray, columns: int = 0, pad: int = 2, limit: int = 64) -> np.ndarray:
    """The first `limit` images tiled on a white-bordered grid (float32 in [0, 1]); for TensorBoard and grid.png."""
    images = np.asarray(images)[:limit]
    n, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    sheet = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    return sheet


PROMPT_KEYS = ("report", "description", "prompt")  # accepted keys of a JSONL prompts file, first found wins
OUR_FILES = ("index.jsonl", "grid.png", "config.yaml")
STAGING_STEM = "samples"  # a staging folder inside a used --out is temp_name(<out>/samples)
MOVES_NAME = "moves.json"  # the journal of the moves, inside that staging folder
SAMPLE_LOCK = ".cxrdist-sample.lock"
_STAGING = re.compile(rf"\.{STAGING_STEM}\.[0-9]+-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")
_OUR_NAME = re.compile(r"[0-9]+_s-?[0-9]+\.png|index\.jsonl|grid\.png|config\.yaml")


def read_prompts(descriptions: list[str] | tuple[str, ...], prompts_file: str | Path | None = None) -> list[str]:
    """Report texts from repeated --description and a prompts file (.txt: one per line; .jsonl: objects
    with a "report", "description" or "prompt" key, or bare JSON strings). Blank file lines are skipped."""
    from cxrdist.models.text import check_prompts

    prompts = list(descriptions)
    if prompts_file:
        prompts += _read_prompts_file(Path(prompts_file))
    if not prompts:
        raise InputError("no description: give --description TEXT (repeatable) or --prompts-file FILE")
    return check_prompts(prompts)


def _read_prompts_file(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"prompts file {path} not found: give a .txt (one report per line) or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"prompts file {path} cannot be read ({type(exc).__name__}): save it as UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix.lower() not in (".jsonl", ".json"):
            prompts.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{number} is not valid JSON: one object or string per line") from None
        if isinstance(item, dict):
            item = next((item[k] for k in PROMPT_KEYS if k in item), None)
        text = item
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{number} has no report text: use a non-empty \"report\" key")
        prompts.append(text.strip())
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts")
    return prompts


def check_output_dir(out_dir: str | Path) -> Path:
    """Refuse an --out that is a file, already holds samples, or cannot be written (runs never overwrite each
    other, and a bad --out fails before the model loads, not after every image was generated). An --out whose
    earlier run was stopped while moving its files in is finished first, and then refused with a line saying so."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder path")
    if out.is_dir():
        if (moved := finish_interrupted_output(out)) is not None:
            raise InputError(f"--out {out} held a run stopped while its files were moved in: finished it ({moved} "
                             "files moved in), so the folder now holds that run's complete samples; choose a new "
                             "folder for this run")
        _refuse_used(out)
    _check_writable(out)
    return out


def _refuse_used(out: Path) -> None:
    taken = [name for name in OUR_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("*_s*.png"))[:1]
    if taken:
        raise InputError(f"--out {out} already holds samples ({taken[0]}): choose a new folder or delete it")


def _output_lock(out: Path):
    return folder_lock(out, SAMPLE_LOCK, busy="being written", wait="that sample run", elsewhere="--out",
                       error=InputError)


def finish_interrupted_output(out: str | Path) -> int | None:
    """Finish the moves of a run into `out` that was stopped after writing its journal; the number of files it
    moved in, or None when there was nothing to finish."""
    out = Path(out)
    journals = [entry / MOVES_NAME for entry in out.iterdir()
                if _STAGING.fullmatch(entry.name) and (entry / MOVES_NAME).is_file()]
    if not journals:
        return None
    moved, finished = 0, False
    with _output_lock(out):
        for journal in journals:
            if journal.is_file():  # its own run may have finished between the look and the lock
                moved += _finish_moves(journal.parent, out, _read_moves(journal))
                finished = True
    return moved if finished else None


def _read_moves(journal: Path) -> list[str]:
    try:
        names = json.loads(journal.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        names = None
    # the names become paths: only the files a run writes, never a path elsewhere
    if not isinstance(names, list) or not all(isinstance(n, str) and _OUR_NAME.fullmatch(n) for n in names):
        raise InputError(f"{journal} is not a list of moves a sample run writes: move the images you need out of "
                         f"{journal.parent} and delete it")
    return names


def _finish_moves(staging: Path, out: Path, names: list[str]) -> int:
    """Move what is still in `staging` to `out` (index.jsonl last), then remove the journal and `staging`. Every
    step may be repeated, so a run stopped anywhere in here is finished by calling this again."""
    moved = 0
    for name in names:
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
            moved += 1
    (staging / MOVES_NAME).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return moved


def _check_writable(out: Path) -> None:
    """Create the missing part of `out` and a probe file in it, then remove both again.

    Trying is the only reliable test: os.access says yes to root on a read-only mount, and no to nothing
    about a file sitting where a parent folder should be.
    """
    missing, existing = [], out
    while not existing.exists():  # False also under a file (ENOTDIR), so this stops at the first real entry
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, not a folder: choose another path")
    try:
        probe_writable(out)
    except OSError as exc:
        raise InputError(f"--out {out} cannot be written ({exc.strerror or exc}): choose a folder you can "
                         "write to") from None
    finally:
        for folder in missing:  # deepest first; only folders this check created, and only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def sample_name(index: int, seed: int, total: int) -> str:
    """`0000_s42.png`: zero-padded run index first (sorts in generation order), then the seed."""
    return f"{index:0{max(4, len(str(total - 1)))}d}_s{seed}.png"


def _png_info(record: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in record.items():
        text = json.dumps(value) if isinstance(value, (bool, dict, list)) or value is None else str(value)
        info.add_itxt(key, text)  # iTXt: UTF-8, so report text with any characters survives
    return info


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def write_samples(out_dir: str | Path, images: np.ndarray, records: list[dict], config=None) -> list[Path]:
    """Write 8-bit grayscale PNGs with text metadata, index.jsonl, grid.png (and config.yaml when given).

    Everything is written into a staging folder first; then a new or empty `out_dir` is that folder, renamed in
    one step, and a folder holding other files gets the files moved in after a journal of the moves (see the
    module's docstring). An interrupted run leaves no half-written image and no folder a rerun refuses unexplained.
    """
    out = check_output_dir(out_dir)
    if len(images) != len(records):
        raise InputError(f"{len(images)} images but {len(records)} records")
    whole = _replaceable(out)
    staging = temp_name(out) if whole else temp_name(out / STAGING_STEM)
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        names = _render(staging, images, records, config)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if whole:
        try:
            os.rename(staging, out)  # an empty folder is replaced too
            return [out / name for name in names[:len(records)]]
        except OSError:  # something appeared in --out meanwhile: move the files in instead
            try:
                out.mkdir(exist_ok=True)
                inside = temp_name(out / STAGING_STEM)
                os.rename(staging, inside)
            except OSError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise InputError(f"--out {out} cannot be written ({exc.strerror or exc}): choose another "
                                 "folder") from None
            staging = inside
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename was done
            raise
    journaled = False
    try:
        with _output_lock(out):
            _refuse_used(out)  # again, under the lock: another run may have finished into it meanwhile
            write_json_atomic(staging / MOVES_NAME, {"files": names})
            journaled = True
            _finish_moves(staging, out, names)
    except BaseException:
        if not journaled:  # nothing was moved: the staging folder is only ours
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / name for name in names[:len(records)]]


def _replaceable(out: Path) -> bool:
    """Whether `out` can be the staging folder renamed: missing, or an empty real folder (not a link to one)."""
    if not os.path.lexists(out):
        return True
    return out.is_dir() and not out.is_symlink() and not any(out.iterdir())


def _render(folder: Path, images: np.ndarray, records: list[dict], config) -> list[str]:
    """Write the run's files into `folder`; their names, the images first and index.jsonl last."""
    from PIL import Image

    from cxrdist import __version__

    rows = []
    for i, (image, record) in enumerate(zip(images, records)):
        name = sample_name(i, int(record["seed"]), len(records))
        meta = {**record, "synthetic": True, "software": f"cxrdist {__version__}"}
        Image.fromarray(_to_uint8(image)).save(folder / name, pnginfo=_png_info(meta))
        rows.append({"file": name, **meta})
    Image.fromarray(_to_uint8(contact_sheet(images))).save(folder / "grid.png")
    if config is not None:
        config.save(folder / "config.yaml")
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extras = ["grid.png", "config.yaml"] if config is not None else ["grid.png"]
    return [r["file"] for r in rows] + extras + ["index.jsonl"]
