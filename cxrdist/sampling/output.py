"""Files of a sampling run: prompts read from flags and files, 8-bit grayscale PNGs with text metadata,
`index.jsonl` and a contact sheet, written so that an interrupted run leaves nothing half-written.

Layout of an output folder (one run per folder; a folder that already holds samples is refused):
    0000_s42.png, 0001_s43.png, ...   run index (zero-padded, sorts in generation order) + seed
    index.jsonl                       one JSON object per image: file + every metadata field
    grid.png                          contact sheet of the first 64 images
    config.yaml                       the resolved config of the run
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cxrdist.errors import InputError


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
    other, and a bad --out fails before the model loads, not after every image was generated)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder path")
    if out.is_dir():
        taken = [name for name in OUR_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("*_s*.png"))[:1]
        if taken:
            raise InputError(f"--out {out} already holds samples ({taken[0]}): choose a new folder or delete it")
    _check_writable(out)
    return out


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
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(handle)
        os.unlink(probe)
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

    Everything is written into a hidden temporary folder first and moved into `out_dir` at the end, so an
    interrupted run leaves no half-written image; index.jsonl is moved last.
    """
    from PIL import Image

    from cxrdist import __version__

    out = check_output_dir(out_dir)
    if len(images) != len(records):
        raise InputError(f"{len(images)} images but {len(records)} records")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        rows = []
        for i, (image, record) in enumerate(zip(images, records)):
            name = sample_name(i, int(record["seed"]), len(records))
            meta = {**record, "synthetic": True, "software": f"cxrdist {__version__}"}
            Image.fromarray(_to_uint8(image)).save(tmp / name, pnginfo=_png_info(meta))
            rows.append({"file": name, **meta})
        Image.fromarray(_to_uint8(contact_sheet(images))).save(tmp / "grid.png")
        if config is not None:
            config.save(tmp / "config.yaml")
        (tmp / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        extras = ["grid.png", "config.yaml"] if config is not None else ["grid.png"]
        names = [r["file"] for r in rows] + extras + ["index.jsonl"]
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / r["file"] for r in rows]
