"""`cxrdist shard inspect`: the index summary in words, checksum verification, a preview grid with prompts."""
from __future__ import annotations

import io
import textwrap
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrdist.data.index import TEST_SPLIT, ShardIndex
from cxrdist.data.storage import safe_text
from cxrdist.data.tars import read_samples
from cxrdist.errors import DataError
from cxrdist.fileio import atomic_file


def summary_lines(index: ShardIndex, top_labels: int = 8) -> list[str]:
    """The index in words. Every text index.json holds goes through safe_text: it came with the shard set, and a
    control character or escape sequence in it must reach the terminal as visible text."""
    counts, s = index.counts, safe_text
    lines = [
        f"shard set   {s(index.root)}",
        f"source      {s(index.source)}   images {index.image_size}x{index.image_size}, {index.channels} channel, "
        f"{index.bit_depth}-bit PNG, resize {s(index.options.get('resize_mode', '?'))}",
        f"splits      seed {index.seed}, "
        + ("official test split" if index.test_fraction is None else f"test fraction {index.test_fraction}")
        + f", {index.folds} folds",
        f"samples     {s(counts.get('written', 0))} written of {s(counts.get('records', 0))} records, "
        f"{s(counts.get('rejected', 0))} rejected",
    ]
    for name, split in index.splits.items():
        lines.append(f"  {s(name):<8} {split['count']:>7} samples  {split.get('groups', 0):>6} groups  "
                     f"{len(split['shards']):>4} shards")
    if index.rejects:
        lines.append("rejects     " + ", ".join(f"{s(reason)} {s(n)}" for reason, n in index.rejects.items()))
    if index.source_summary:
        lines.append("source      " + ", ".join(f"{s(k)} {s(v)}" for k, v in index.source_summary.items()))
    labels: Counter = Counter()
    for split in index.splits.values():
        labels.update({k: v for k, v in split.get("labels", {}).items() if isinstance(v, int)})
    if labels:
        lines.append("labels      " + ", ".join(f"{s(k)} {v}" for k, v in labels.most_common(top_labels)))
    return lines


def first_samples(index: ShardIndex, split: str, n: int) -> list[tuple[np.ndarray, str]]:
    """(pixels uint8, prompt) of the first n samples of `split` in shard order."""
    out: list[tuple[np.ndarray, str]] = []
    for entry in index.shards([split]):
        for key, sample in read_samples(entry["path"]):
            try:
                with Image.open(io.BytesIO(sample["png"])) as image:
                    array = np.asarray(image)
            except Exception as exc:  # no png member, or one PIL cannot read
                raise DataError(f"{entry['path']}: sample {safe_text(key)} has no readable png member "
                                f"({type(exc).__name__}): verify the shards with `cxrdist shard inspect --verify`"
                                ) from None
            if array.dtype == np.uint16:
                array = (array // 257).astype(np.uint8)
            out.append((array, sample.get("txt", b"").decode("utf-8", errors="replace")))
            if len(out) == n:
                return out
    return out


def preview_grid(index: ShardIndex, out_path: str | Path, *, n: int = 16, split: Optional[str] = None,
                 columns: int = 4, cell: int = 192, text_lines: int = 5) -> Path:
    """A PNG grid of the first `n` samples, each with the start of its prompt underneath."""
    split = split or (TEST_SPLIT if TEST_SPLIT in index.splits else index.fold_names[0])
    samples = first_samples(index, index.check_split(split), n)
    if not samples:
        raise DataError(f"split {split} of {index.root} is empty: choose another with --split")
    font = ImageFont.load_default()
    line_height, chars = 12, max(12, cell // 6)
    rows = -(-len(samples) // columns)
    height = cell + line_height * text_lines + 6
    canvas = Image.new("L", (columns * cell, rows * height), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (pixels, prompt) in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * height
        canvas.paste(Image.fromarray(pixels).resize((cell, cell), Image.Resampling.BICUBIC), (x, y))
        lines = textwrap.wrap(prompt, chars)[:text_lines] or ["(no text)"]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + cell + 2 + k * line_height), line, fill=0, font=font)
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_path) as handle:
            canvas.save(handle, format="PNG")
    except OSError as exc:  # a read-only mount, a full disk, no permission
        raise DataError(f"cannot write the preview {out_path} ({exc.strerror or exc}): {out_path.parent} is not "
                        "writable; pass --preview <a writable path>, or --no-preview") from None
    return out_path
