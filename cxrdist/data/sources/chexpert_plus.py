"""CheXpert Plus (Stanford AIMI, about 223k image-report pairs) from its table `df_chexpert_plus_*.csv`:

    path_to_image   train/patient00001/study1/view1_frontal.jpg     (the release's PNGs: .png, maybe under PNG/)
    path_to_dcm     train/patient00001/study1/view1_frontal.dcm     (maybe under DICOM/)
    frontal_lateral Frontal | Lateral        ap_pa  AP | PA | LL | ...
    deid_patient_id the group: every image of a patient lands in one split
    report, section_findings, section_impression, section_clinical_history, section_comparison, ...
    split           train | valid

The prompt is built from the section columns (FINDINGS + IMPRESSION by default); sections the table has no column
for (wet_read, addendum) and the last-paragraph fallback come from parsing the full `report` text with the
shared parser (cxrdist.data.reports). With the official split, `valid` (and `test`, if present) rows are our
test split. Labels are read when the table carries the CheXpert label columns (a merged table); the published
one has none. Rows are streamed; nothing is held per row.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import decode_file
from cxrdist.data.reports import DEFAULT_SECTIONS, build_prompt, check_sections, has_words, split_sections
from cxrdist.data.sources.base import ListingRejects, Record
from cxrdist.data.sources.tables import (CHEXPERT_LABELS, FRONTAL_VIEWS, SAFE_ID, check_policy,
                                         chexpert_labels, parse_views, read_table, view_wanted)
from cxrdist.errors import DataError
from cxrdist.fileio import check_not_special

# Our section name -> the CheXpert Plus columns that hold it, the first non-empty one wins.
SECTION_COLUMNS = {"findings": ("section_findings",), "impression": ("section_impression",),
                   "indication": ("section_clinical_history", "section_history"),
                   "comparison": ("section_comparison",), "technique": ("section_technique",),
                   "examination": ("section_procedure_comments",)}
TEST_SPLITS = frozenset({"valid", "validate", "validation", "test"})
KNOWN_SPLITS = TEST_SPLITS | {"train"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


class CheXpertPlusSource(ListingRejects):
    name = "chexpert-plus"

    def __init__(self, root: str | Path, table: str | Path, image_format: str = "png",
                 views: Sequence[str] | str = FRONTAL_VIEWS, sections: Sequence[str] = DEFAULT_SECTIONS,
                 fallback: bool = False, official_split: bool = True, uncertain: str = "drop") -> None:
        self.root, self.table = Path(root), Path(table)
        if not self.root.is_dir():
            raise DataError(f"CheXpert Plus root {self.root} is not a folder: pass the folder the table's image "
                            "paths are relative to with --root")
        check_not_special(self.table, "CheXpert Plus table", DataError)  # a FIFO would block the read forever
        if not self.table.is_file():
            raise DataError(f"CheXpert Plus table {self.table} not found: pass df_chexpert_plus_*.csv with --csv")
        if image_format not in ("png", "dicom"):
            raise DataError(f"--image-format must be png or dicom, got {image_format!r}")
        self.image_format = image_format
        self.views = parse_views(views)
        self.sections = check_sections(sections)
        self.fallback = fallback
        self.official_split = official_split
        self.uncertain = check_policy(uncertain)
        self._clear_rejects()
        self._summary: Counter = Counter()

    @property
    def _path_column(self) -> str:
        return "path_to_image" if self.image_format == "png" else "path_to_dcm"

    def _check_header(self, header: list[str]) -> None:
        required = [self._path_column, "deid_patient_id", "frontal_lateral"] + (["split"] if self.official_split
                                                                                 else [])
        missing = [name for name in required if name not in header]
        if missing:
            hint = " (or pass --no-official-split)" if missing == ["split"] else ""
            raise DataError(f"{self.table} has no column {', '.join(missing)}{hint}: pass the CheXpert Plus table "
                            "as published")
        no_source = [s for s in self.sections if not any(c in header for c in SECTION_COLUMNS.get(s, ()))]
        if no_source and "report" not in header:
            raise DataError(f"{self.table} has no column for section {', '.join(no_source)} and no report column "
                            "to parse it from: choose other --sections")

    def records(self) -> Iterator[Record]:
        self._clear_rejects()
        self._summary = Counter()
        header, rows = read_table(self.table)
        self._check_header(header)
        label_columns = [name for name in CHEXPERT_LABELS if name in header]
        seen: set[str] = set()
        for line, row in rows:
            self._summary["rows"] += 1
            where = f"{self.table.name}:{line}"
            value, group = str(row.get(self._path_column) or "").strip(), str(row.get("deid_patient_id") or "").strip()
            if not value or not SAFE_ID.match(group):
                self._reject(where, "bad_row", f"{self._path_column} {value!r}, deid_patient_id {group!r}")
                continue
            view = _view(row)
            if not view_wanted(view, self.views):
                self._summary["other_views"] += 1
                continue
            split = str(row.get("split") or "").strip().lower() if self.official_split else ""
            if self.official_split and split not in KNOWN_SPLITS:
                self._reject(where, "not_in_split", f"split {split!r} is not train or valid")
                continue
            path = self._image_path(value)
            if path is None:
                self._reject(where, "missing_image", f"{value} not found under {self.root} (nor under its "
                                                     f"{'PNG' if self.image_format == 'png' else 'DICOM'}/ folder)")
                continue
            prompt = self._prompt(row)
            if not has_words(prompt):
                self._reject(where, "empty_report", f"no words in {'/'.join(self.sections)}")
                continue
            uid = _UNSAFE_KEY.sub("_", str(Path(value).with_suffix(""))).strip("_") or f"row{line}"
            if uid in seen:
                self._reject(where, "duplicate_image", f"{value} is listed twice")
                continue
            seen.add(uid)
            positive, negative = chexpert_labels(row, label_columns, self.uncertain) if label_columns else ((), ())
            self._summary["images"] += 1
            yield Record(uid=uid, group=group, prompt=prompt, labels=list(positive), view=view, source=self.name,
                         source_path=str(path), split="test" if split in TEST_SPLITS else "",
                         extra={"row": line, "official_split": split, "negative_labels": list(negative)})

    def _image_path(self, value: str) -> Optional[Path]:
        """The file a table path names, under root or its PNG/ or DICOM/ folder; for PNGs the table's .jpg
        suffix may stand for the released .png. None when no candidate exists inside root."""
        relative = Path(value)
        if relative.is_absolute() or ".." in relative.parts:
            return None
        folders = (self.root, self.root / ("PNG" if self.image_format == "png" else "DICOM"))
        suffixes = (relative.suffix,) + (_IMAGE_SUFFIXES if self.image_format == "png" else ())
        real_root = self.root.resolve()
        for folder in folders:
            for suffix in dict.fromkeys(suffixes):
                path = folder / relative.with_suffix(suffix)
                if path.is_file() and path.resolve().is_relative_to(real_root):
                    return path
        return None

    def _prompt(self, row: dict) -> str:
        report = split_sections(str(row.get("report") or ""))
        sections = dict(report.sections)
        for name, columns in SECTION_COLUMNS.items():
            for column in columns:
                if str(row.get(column) or "").strip():
                    sections[name] = str(row[column])
                    break
        return build_prompt(sections, self.sections, report.last_paragraph if self.fallback else "")

    def summary(self) -> dict[str, object]:
        counts = {key: int(self._summary[key]) for key in ("rows", "images", "other_views")}
        return {**counts, "images_from": self._path_column, "split": "official" if self.official_split else "drawn"}

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        return decode_file(record.source_path, fit)


def _view(row: dict) -> str:
    """PA / AP / LL / LATERAL / FRONTAL (a frontal image of unknown projection) / "" from the two view columns."""
    side, projection = (str(row.get(k) or "").strip().upper() for k in ("frontal_lateral", "ap_pa"))
    if side == "FRONTAL":
        return projection if projection in FRONTAL_VIEWS else "FRONTAL"
    if side == "LATERAL":
        return projection if projection == "LL" else "LATERAL"
    return projection
