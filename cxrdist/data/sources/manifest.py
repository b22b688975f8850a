"""Any table of (image path, report text or report file, group id, optional view / labels) as a source.

This is the door for MIMIC-CXR-JPG, CheXpert Plus, PadChest or a hospital export: write (or convert to) a
CSV or JSONL file and map its column names with options. Relative paths resolve against `root`
(default: the manifest's folder). Images may be PNG, JPEG, 8/16-bit PNG or TIFF, or DICOM.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from cxrdist.data.imageio import decode_file
from cxrdist.data.sources.base import Record, RecordRejected
from cxrdist.data.sources.iu_xray import clean_text, has_words
from cxrdist.errors import DataError

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
_UNDERSCORE_DEID = re.compile(r"_{3,}")  # MIMIC writes "___" where a name or date was removed


@dataclass
class ManifestColumns:
    """Column names in the manifest. None = use the default name if the column exists, else go without."""

    image: str = "image"
    group: str = "group"
    text: Optional[str] = None  # default "report"
    text_path: Optional[str] = None  # default "report_path": a file holding the report text
    view: Optional[str] = None  # default "view"
    labels: Optional[str] = None  # default "labels": a JSON list, or one string split on label_sep
    uid: Optional[str] = None  # default "uid"; else derived from the image file name
    label_sep: str = "|"


_DEFAULTS = {"text": "report", "text_path": "report_path", "view": "view", "labels": "labels", "uid": "uid"}


def read_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """(column names, iterator of (line number, row)) for .csv / .tsv / .jsonl files."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        handle = open(path, newline="", encoding="utf-8-sig")
        reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
        header = list(reader.fieldnames or [])

        def csv_rows():
            with handle:
                for row in reader:
                    yield reader.line_num, row

        return header, csv_rows()
    if suffix in (".jsonl", ".ndjson"):
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number} is not a JSON object: one object per line is expected")
            rows.append((number, row))
        header = sorted({key for _, row in rows for key in row})
        return header, iter(rows)
    raise DataError(f"manifest {path} must be .csv, .tsv or .jsonl (got {suffix or 'no suffix'})")


class ManifestSource:
    name = "manifest"

    def __init__(self, manifest: str | Path, columns: ManifestColumns | None = None,
                 root: str | Path | None = None) -> None:
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise DataError(f"manifest {self.manifest} not found: pass an existing CSV or JSONL file")
        self.columns = columns or ManifestColumns()
        self.root = Path(root) if root else self.manifest.parent
        self._rejected: list[tuple[str, str, str]] = []
        self._summary = {"rows": 0, "records": 0}

    def _resolve_columns(self, header: list[str]) -> dict[str, Optional[str]]:
        cols = self.columns
        resolved: dict[str, Optional[str]] = {"image": cols.image, "group": cols.group}
        for key, default in _DEFAULTS.items():
            chosen = getattr(cols, key)
            if chosen is not None and chosen not in header:
                raise DataError(f"column {chosen!r} (--{key.replace('_', '-')}-col) not in {self.manifest}; "
                                f"columns are: {', '.join(header)}")
            resolved[key] = chosen if chosen is not None else (default if default in header else None)
        for key in ("image", "group"):
            if resolved[key] not in header:
                raise DataError(f"column {resolved[key]!r} not in {self.manifest}: map it with "
                                f"--{key}-col (columns are: {', '.join(header)})")
        if resolved["text"] is None and resolved["text_path"] is None:
            raise DataError(f"{self.manifest} has no report column: map one with --text-col or --text-path-col "
                            f"(columns are: {', '.join(header)})")
        return resolved

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path

    def _text(self, row: dict, cols: dict) -> str:
        text = row.get(cols["text"]) if cols["text"] else None
        if (text is None or str(text).strip() == "") and cols["text_path"] and row.get(cols["text_path"]):
            report_file = self._path(str(row[cols["text_path"]]))
            try:
                text = report_file.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise RecordRejected("missing_report", f"{report_file}: {exc.strerror or exc}") from None
        text = _UNDERSCORE_DEID.sub(" ", str(text or ""))
        return clean_text(text)

    def _labels(self, value: Any) -> list[str]:
        if value is None or value == "":
            return []
        if isinstance(value, list):
            return [str(v).strip() for v in value if str(v).strip()]
        text = str(value).strip()
        if text.startswith("["):
            try:
                return self._labels(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [part.strip() for part in text.split(self.columns.label_sep) if part.strip()]

    def records(self) -> Iterator[Record]:
        self._rejected, self._summary = [], {"rows": 0, "records": 0}
        header, rows = read_rows(self.manifest)
        cols = self._resolve_columns(header)
        seen: set[str] = set()
        for line, row in rows:
            self._summary["rows"] += 1
            where = f"{self.manifest.name}:{line}"
            image, group = str(row.get(cols["image"]) or "").strip(), str(row.get(cols["group"]) or "").strip()
            if not image or not group:
                self._rejected.append((where, "bad_row", f"empty {cols['image'] if not image else cols['group']}"))
                continue
            try:
                prompt = self._text(row, cols)
            except RecordRejected as exc:
                self._rejected.append((where, exc.reason, exc.detail))
                continue
            if not has_words(prompt):
                self._rejected.append((where, "empty_report", "no report text"))
                continue
            base = str(row.get(cols["uid"]) or "") if cols["uid"] else ""
            uid = _UNSAFE_KEY.sub("_", base or Path(image).stem) or f"row{line}"
            if uid in seen:
                uid = f"{uid}_r{line}"  # same file name in two folders: keep both, keys stay unique
            seen.add(uid)
            self._summary["records"] += 1
            yield Record(uid=uid, group=_UNSAFE_KEY.sub("_", group), prompt=prompt,
                         labels=self._labels(row.get(cols["labels"]) if cols["labels"] else None),
                         view=str(row.get(cols["view"]) or "").strip().upper() if cols["view"] else "",
                         source=self.name, source_path=str(self._path(image)), extra={"row": line})

    def rejected(self) -> list[tuple[str, str, str]]:
        return list(self._rejected)

    def summary(self) -> dict[str, int]:
        return dict(self._summary)

    def load(self, record: Record) -> np.ndarray:
        return decode_file(record.source_path)
