"""Any table of (image path, report text or report file, group id, optional view / labels) as a source.

This is the door for MIMIC-CXR-JPG, CheXpert Plus, PadChest or a hospital export: write (or convert to) a
CSV or JSONL file and map its column names with options. Relative paths resolve against `root`
(default: the manifest's folder). Images may be PNG, JPEG, 8/16-bit PNG or TIFF, or DICOM.

A manifest is data from somebody else, so it may not make us read arbitrary local files into a shard:
- with an explicit `root` (`--root`), every image and report path, absolute or relative, must resolve
  (symbolic links followed) inside that folder;
- without one, relative paths may not climb out of the manifest's folder (`../x` is refused; checked on the
  normalised path, so a symlinked image folder inside it keeps working). Absolute paths stay allowed, as
  before (only relative paths were ever resolved against a base): pass `--root` to confine them too.
A path that breaks these rules, a report file over `MAX_REPORT_BYTES` or one that is not UTF-8, a FIFO or device
where a file should be, or a cell that is not valid Unicode text (a JSON `"\\udcff"` escape) is a counted reject
(rejects.jsonl), never a crash, a hang or a silent repair. Report text in any language and script is kept.

A manifest whose header names a column twice (two `report` columns; a JSONL object with a key twice) is refused
as a whole: which one was meant cannot be known, and taking the last one silently trains on the wrong text. So
is a manifest that is not UTF-8 (one line naming the first bad line).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import decode_file
from cxrdist.data.reports import check_sections, clean_text, has_words, report_prompt, unicode_problem
from cxrdist.data.sources.base import ListingRejects, Record, RecordRejected
from cxrdist.errors import DataError
from cxrdist.fileio import check_not_special, special_file_kind

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
# The longest real radiology reports are a few KiB; 256 KiB leaves a wide margin and still stops a manifest
# from pulling a log file, a database dump or /dev/zero into every sample's text.
MAX_REPORT_BYTES = 256 * 1024


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
    """(column names, iterator of (line number, row)) for .csv / .tsv / .jsonl files.

    Text that is not UTF-8 and CSV fields over the csv module's limit are DataErrors naming the line, raised
    while listing (before anything is written), not tracebacks from the middle of the csv module.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    raise DataError(f"manifest {path} must be .csv, .tsv or .jsonl (got {suffix or 'no suffix'})")


def _not_utf8(path: Path) -> DataError:
    """The error for a manifest that is not UTF-8, naming the first line that does not decode."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return DataError(f"{path}:{number} is not UTF-8 text (byte {raw[exc.start]:#04x}): re-save the "
                                 "manifest as UTF-8")
    return DataError(f"{path} is not UTF-8 text: re-save the manifest as UTF-8")


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    handle = open(path, newline="", encoding="utf-8-sig")
    reader = csv.DictReader(handle, delimiter=delimiter)
    try:
        header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as exc:
        handle.close()
        raise _not_utf8(path) if isinstance(exc, UnicodeDecodeError) else _csv_error(path, 1, exc) from None
    try:
        _check_unique_columns(path, header)
    except DataError:
        handle.close()
        raise

    def csv_rows():
        with handle:
            try:
                for row in reader:
                    yield reader.line_num, row
            except UnicodeDecodeError:
                raise _not_utf8(path) from None
            except csv.Error as exc:
                raise _csv_error(path, reader.line_num, exc) from None

    return header, csv_rows()


def _check_unique_columns(path: Path, header: list[str]) -> None:
    """Refuse a header that names a column twice: csv.DictReader would silently keep the last one's value."""
    seen: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        if not name.strip():
            continue  # unnamed columns (trailing separators of a spreadsheet export) are never read
        if name in seen:
            raise DataError(f"{path} has two columns named {name!r} (columns {seen[name]} and {number}): rename "
                            "or remove one, so it is clear which one to read")
        seen[name] = number


def _unique_keys(path: Path, number: int):
    """json.loads object hook refusing an object that holds a key twice (json keeps the last one silently)."""
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in pairs:
            if key in row:
                raise DataError(f"{path}:{number} has the key {key!r} twice: remove one, so it is clear which one "
                                "to read")
            row[key] = value
        return row

    return build


def _csv_error(path: Path, line: int, exc: csv.Error) -> DataError:
    # The usual cause is a field over csv.field_size_limit() (128 KiB), i.e. an unclosed quote swallowing the
    # rest of the file or a report pasted in whole; the limit is not raised: it is process-wide state.
    return DataError(f"{path}:{line} cannot be parsed as CSV ({exc}): check for an unclosed quote, or put long "
                     "reports in files (--text-path-col)")


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    rows = []
    # Split bytes on newlines only: str.splitlines() would also split inside strings holding U+2028 etc.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number} is not UTF-8 text (byte {raw[exc.start]:#04x}): re-save the "
                            "manifest as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys(path, number))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, a 4300+ digit integer, absurd nesting
            problem = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0][:80]
            raise DataError(f"{path}:{number} is not valid JSON ({problem}): fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number} is not a JSON object: one object per line is expected")
        rows.append((number, row))
    header = sorted({key for _, row in rows for key in row})
    return header, iter(rows)


def _group_key(group: str) -> str:
    """A patient id as a safe key. Ids in other scripts ("张伟", "Иванов") would all become underscores and merge
    different patients into one group, so a non-ASCII id keeps a digest of itself."""
    key = _UNSAFE_KEY.sub("_", group)
    if not group.isascii():
        key = f"{key}-{hashlib.sha256(group.encode('utf-8')).hexdigest()[:12]}"
    return key


def _unused_key(candidate: str, taken: set[str]) -> str:
    """`candidate`, or `candidate_2`, `_3`, ... when another row already holds that key."""
    key, n = candidate, 2
    while key in taken:
        key, n = f"{candidate}_{n}", n + 1
    return key


class ManifestSource(ListingRejects):
    name = "manifest"

    def __init__(self, manifest: str | Path, columns: ManifestColumns | None = None,
                 root: str | Path | None = None, sections: Optional[Sequence[str]] = None,
                 fallback: bool = False) -> None:
        self.manifest = Path(manifest)
        check_not_special(self.manifest, "manifest", DataError)  # a FIFO would block the read forever
        if not self.manifest.is_file():
            raise DataError(f"manifest {self.manifest} not found: pass an existing CSV or JSONL file")
        self.columns = columns or ManifestColumns()
        self.root = Path(root) if root else self.manifest.parent
        self.confined = root is not None  # an explicit root confines absolute paths too (see module docstring)
        # None: the whole report text is the prompt; else only these sections (cxrdist.data.reports)
        self.sections = check_sections(sections) if sections is not None else None
        self.fallback = fallback
        self._clear_rejects()
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

    def _checked_path(self, value: str, what: str) -> Path:
        """The path of an image or report file, or RecordRejected when it leaves the root or cannot be a path."""
        try:
            path, inside = self._containment(value)
        except (ValueError, RuntimeError, OSError) as exc:  # NUL byte, unknown ~user, symlink loop
            raise RecordRejected("bad_path", f"{what} {value!r}: {exc}") from None
        if not inside:
            where = f"--root {self.root}" if self.confined else f"the manifest's folder {self.root}"
            raise RecordRejected("outside_root", f"{what} {value!r} is outside {where}")
        return path

    def _containment(self, value: str) -> tuple[Path, bool]:
        path = self._path(value)
        if self.confined:
            return path, path.resolve().is_relative_to(self.root.resolve())  # symlinks followed
        if Path(value).expanduser().is_absolute():
            return path, True  # allowed without --root, as documented
        # Lexical check: `..` may not climb out, but a symlinked folder inside the manifest's folder is fine.
        return path, Path(os.path.abspath(path)).is_relative_to(os.path.abspath(self.root))  # abspath normalises

    def _text(self, row: dict, cols: dict) -> str:
        text = row.get(cols["text"]) if cols["text"] else None
        if (text is None or str(text).strip() == "") and cols["text_path"] and row.get(cols["text_path"]):
            text = self._report_file(self._checked_path(str(row[cols["text_path"]]), "report file"))
        text = str(text or "")
        if len(text.encode("utf-8")) > MAX_REPORT_BYTES:  # the same cap for text given inline (JSONL has no limit)
            raise RecordRejected("report_too_large", f"report text over {MAX_REPORT_BYTES // 1024} KiB")
        if self.sections:
            return report_prompt(text, self.sections, self.fallback)
        return clean_text(text)  # the whole text, de-identification markers ("___", "XXXX") removed

    @staticmethod
    def _report_file(report_file: Path) -> str:
        """A report file's text: a regular UTF-8 file of at most MAX_REPORT_BYTES, else RecordRejected."""
        try:
            if (kind := special_file_kind(report_file)) is not None:  # a FIFO would block, /dev/zero never end
                raise RecordRejected("missing_report", f"{report_file}: {kind}, not a regular file")
            if not report_file.is_file():
                raise RecordRejected("missing_report", f"{report_file}: not a regular file")
            with open(report_file, "rb") as handle:
                data = handle.read(MAX_REPORT_BYTES + 1)  # never more than the cap, whatever stat says
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise RecordRejected("missing_report", f"{report_file}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        if len(data) > MAX_REPORT_BYTES:
            raise RecordRejected("report_too_large", f"{report_file}: over {MAX_REPORT_BYTES // 1024} KiB")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            # Replacing bad bytes with U+FFFD would put invented characters into training text.
            raise RecordRejected("undecodable_report", f"{report_file}: not UTF-8 text (byte offset "
                                                       f"{exc.start}): re-save it as UTF-8") from None

    @staticmethod
    def _check_unicode(row: dict, cols: dict) -> None:
        """RecordRejected when a cell this row is read from holds text no UTF-8 file can (see `unicode_problem`):
        JSON may spell a lone surrogate as an escape; it would fail only later, while writing the shard."""
        for key, column in cols.items():
            if column is None:
                continue
            value = row.get(column)
            texts = value if isinstance(value, list) else [value]
            for text in texts:
                problem = unicode_problem(text) if isinstance(text, str) else None
                if problem is None:
                    continue
                if key in ("text", "text_path"):
                    what = "report" if key == "text" else "report file path"
                    raise RecordRejected("undecodable_report", f"{what} (column {column!r}) is not valid Unicode "
                                                               f"text: {problem}")
                raise RecordRejected("bad_row", f"column {column!r} is not valid Unicode text: {problem}")

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
        self._clear_rejects()
        self._summary = {"rows": 0, "records": 0}
        header, rows = read_rows(self.manifest)
        cols = self._resolve_columns(header)
        seen: set[str] = set()
        for line, row in rows:
            self._summary["rows"] += 1
            where = f"{self.manifest.name}:{line}"
            try:
                self._check_unicode(row, cols)
            except RecordRejected as exc:
                self._reject_because(where, exc)
                continue
            image, group = str(row.get(cols["image"]) or "").strip(), str(row.get(cols["group"]) or "").strip()
            if not image or not group:
                self._reject(where, "bad_row", f"empty {cols['image'] if not image else cols['group']}")
                continue
            try:
                image_path = self._checked_path(image, "image")
                prompt = self._text(row, cols)
            except RecordRejected as exc:
                self._reject_because(where, exc)
                continue
            if not has_words(prompt):
                what = f"no words in {'/'.join(self.sections)}" if self.sections else "no report text"
                self._reject(where, "empty_report", what)
                continue
            base = str(row.get(cols["uid"]) or "") if cols["uid"] else ""
            uid = _UNSAFE_KEY.sub("_", base or Path(image).stem) or f"row{line}"
            if uid in seen:  # same file name in two folders: keep both, keys stay unique
                uid = _unused_key(f"{uid}_r{line}", seen)
            seen.add(uid)
            self._summary["records"] += 1
            yield Record(uid=uid, group=_group_key(group), prompt=prompt,
                         labels=self._labels(row.get(cols["labels"]) if cols["labels"] else None),
                         view=str(row.get(cols["view"]) or "").strip().upper() if cols["view"] else "",
                         source=self.name, source_path=str(image_path), extra={"row": line})

    def summary(self) -> dict[str, int]:
        return dict(self._summary)

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        return decode_file(record.source_path, fit)
