"""MIMIC-CXR-JPG (and MIMIC-CXR's DICOM release) from PhysioNet, in the published layout:

    ROOT/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg   (or .dcm)
    ROOT/mimic-cxr-2.0.0-metadata.csv.gz    dicom_id, subject_id, study_id, ..., ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-split.csv.gz       dicom_id, study_id, subject_id, split (train / validate / test)
    ROOT/mimic-cxr-2.0.0-chexpert.csv.gz    subject_id, study_id, 14 labels (1.0 / 0.0 / -1.0 / blank)
    ROOT/mimic-cxr-2.0.0-negbio.csv.gz      the same columns from the NegBio labeller
    ROOT/cxr-record-list.csv.gz             subject_id, study_id, dicom_id, path   (DICOM release)
    mimic-cxr-reports.zip                   files/p10/p10000032/s50414267.txt (maybe under mimic-cxr-reports/)

The `.csv` files may also be uncompressed. Every image of a wanted view (PA and AP by default) is a sample,
with its study's report (FINDINGS + IMPRESSION by default, cxrdist.data.reports); the group is the patient
(subject_id), so the folds are patient-level. With the official split, MIMIC's `test` images are our test
split and `train` + `validate` are drawn into folds. The rows are streamed: only index tables (dicom_id ->
split, (subject, study) -> labels) are held, and the last study's report.
"""
from __future__ import annotations

import warnings
import zipfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import decode_file
from cxrdist.data.reports import DEFAULT_SECTIONS, check_sections, has_words, report_prompt
from cxrdist.data.sources.base import ListingRejects, Record, RecordRejected
from cxrdist.data.sources.manifest import MAX_REPORT_BYTES
from cxrdist.data.sources.tables import (CHEXPERT_LABELS, FRONTAL_VIEWS, SAFE_ID, check_policy,
                                         chexpert_labels, find_table, parse_views, read_table, view_wanted)
from cxrdist.errors import DataError
from cxrdist.fileio import check_not_special, special_file_kind

PREFIX = "mimic-cxr-2.0.0"
METADATA, SPLIT, CHEXPERT, NEGBIO = (f"{PREFIX}-metadata", f"{PREFIX}-split", f"{PREFIX}-chexpert",
                                     f"{PREFIX}-negbio")
RECORD_LIST = "cxr-record-list"
REPORTS_ZIP = "mimic-cxr-reports.zip"
LAYOUTS = ("auto", "jpg", "dicom")
LABELERS = ("auto", "chexpert", "negbio", "none")
TEST_SPLITS = frozenset({"test"})
KNOWN_SPLITS = frozenset({"train", "validate", "test"})
# ViewCodeSequence_CodeMeaning, used when ViewPosition is blank (a few percent of MIMIC-CXR-JPG rows).
_VIEW_CODES = {"postero-anterior": "PA", "antero-posterior": "AP", "lateral": "LATERAL", "left lateral": "LL",
               "right lateral": "LATERAL"}


def study_folder(subject: str, study: str) -> str:
    """files/p10/p10000032/s50414267 for subject 10000032, study 50414267."""
    return f"files/p{subject[:2]}/p{subject}/s{study}"


class ReportStore:
    """Report texts by (subject, study) from mimic-cxr-reports.zip or its extracted folder. Opened for one
    records() pass (`with store:`), so the source itself holds no open file and stays picklable."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._zip: Optional[zipfile.ZipFile] = None
        self._prefix = ""

    def __enter__(self) -> "ReportStore":
        if self.location.is_file():
            try:
                self._zip = zipfile.ZipFile(self.location)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.location} cannot be opened as a zip ({exc}): pass an intact "
                                f"{REPORTS_ZIP} or its extracted folder with --reports") from None
            names = (n for n in self._zip.namelist() if n.endswith(".txt") and "files/p" in n)
            first = next(names, None)
            if first is None:
                raise DataError(f"{self.location} holds no files/pXX/pSUBJECT/sSTUDY.txt: pass MIMIC-CXR's "
                                f"{REPORTS_ZIP} with --reports")
            self._prefix = first[: first.index("files/p")]  # "" or "mimic-cxr-reports/"
        else:
            nested = self.location / "mimic-cxr-reports"
            self._prefix = "mimic-cxr-reports/" if not (self.location / "files").is_dir() and nested.is_dir() else ""
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def text(self, subject: str, study: str) -> str:
        name = f"{self._prefix}{study_folder(subject, study)}.txt"
        if self._zip is not None:
            try:
                info = self._zip.getinfo(name)
                if info.file_size > MAX_REPORT_BYTES:
                    raise RecordRejected("report_too_large", f"{name} in {self.location}: over "
                                                             f"{MAX_REPORT_BYTES // 1024} KiB")
                with self._zip.open(info) as handle:
                    data = handle.read(MAX_REPORT_BYTES + 1)
            except KeyError:
                raise RecordRejected("missing_report", f"{name} not in {self.location}") from None
            except (OSError, zipfile.BadZipFile, EOFError) as exc:  # a damaged member: that report only
                raise RecordRejected("missing_report", f"{name} in {self.location}: {exc}") from None
        else:
            path = self.location / name
            if (kind := special_file_kind(path)) is not None:  # a FIFO would block the read forever
                raise RecordRejected("missing_report", f"{path}: {kind}, not a regular file")
            try:
                with open(path, "rb") as handle:
                    data = handle.read(MAX_REPORT_BYTES + 1)
            except OSError as exc:
                raise RecordRejected("missing_report", f"{path}: {exc.strerror or exc} (pass the reports with "
                                                       f"--reports {REPORTS_ZIP} or its folder)") from None
        if len(data) > MAX_REPORT_BYTES:
            raise RecordRejected("report_too_large", f"{name}: over {MAX_REPORT_BYTES // 1024} KiB")
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RecordRejected("undecodable_report", f"{name}: not UTF-8 text (byte offset {exc.start})") from None


class MimicCXRSource(ListingRejects):
    name = "mimic-cxr"

    def __init__(self, root: str | Path, reports: str | Path | None = None, views: Sequence[str] | str = FRONTAL_VIEWS,
                 sections: Sequence[str] = DEFAULT_SECTIONS, fallback: bool = False, official_split: bool = True,
                 uncertain: str = "drop", labeler: str = "auto", layout: str = "auto") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"MIMIC-CXR root {self.root} is not a folder: pass the folder holding files/ and the "
                            f"{PREFIX}-*.csv.gz tables with --root")
        self.views = parse_views(views)
        self.sections = check_sections(sections)
        self.fallback = fallback
        self.official_split = official_split
        self.uncertain = check_policy(uncertain)
        self.layout = self._layout(layout)
        self.metadata = find_table(self.root, METADATA)
        self.record_list = find_table(self.root, RECORD_LIST)
        self.split_table = find_table(self.root, SPLIT) if official_split else None
        if official_split and self.split_table is None:
            raise DataError(f"no {SPLIT}.csv(.gz) in {self.root}: put MIMIC-CXR-JPG's split table there, or pass "
                            "--no-official-split to draw the test split from --test-fraction")
        self.label_table = self._label_table(labeler)
        self.reports = self._reports(reports)
        self._clear_rejects()
        self._summary: Counter = Counter()

    def _layout(self, layout: str) -> str:
        if layout not in LAYOUTS:
            raise DataError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        has_jpg, has_dicom = find_table(self.root, METADATA) is not None, find_table(self.root, RECORD_LIST) is not None
        if layout == "auto":
            layout = "jpg" if has_jpg else "dicom" if has_dicom else ""
        if layout == "jpg" and not has_jpg or layout == "dicom" and not has_dicom or not layout:
            wanted = {"jpg": f"{METADATA}.csv(.gz)", "dicom": f"{RECORD_LIST}.csv.gz"}.get(
                layout, f"{METADATA}.csv(.gz) (MIMIC-CXR-JPG) or {RECORD_LIST}.csv.gz (MIMIC-CXR DICOM)")
            raise DataError(f"no {wanted} in {self.root}: pass the MIMIC-CXR folder that holds files/ and the "
                            "tables with --root")
        return layout

    def _label_table(self, labeler: str) -> Optional[Path]:
        if labeler not in LABELERS:
            raise DataError(f"--labeler must be one of {', '.join(LABELERS)}, got {labeler!r}")
        if labeler == "none":
            return None
        stems = {"auto": (CHEXPERT, NEGBIO), "chexpert": (CHEXPERT,), "negbio": (NEGBIO,)}[labeler]
        for stem in stems:
            path = find_table(self.root, stem)
            if path is not None:
                return path
        if labeler != "auto":
            raise DataError(f"no {stems[0]}.csv(.gz) in {self.root}: put the label table there, or pass "
                            "--labeler auto / none")
        return None  # auto and neither table: records without labels (the summary says so)

    def _reports(self, reports: str | Path | None) -> Path:
        if reports is not None:
            location = Path(reports)
            if not location.exists():
                raise DataError(f"--reports {location} does not exist: pass {REPORTS_ZIP} or its extracted folder")
            check_not_special(location, "--reports", DataError)  # opened as a zip, a FIFO would block forever
            return location
        zipped = self.root / REPORTS_ZIP
        return zipped if zipped.is_file() else self.root  # the DICOM release keeps sSTUDY.txt beside sSTUDY/

    # ---- index tables --------------------------------------------------------------------------------------
    def _splits(self) -> dict[str, str]:
        if self.split_table is None:
            return {}
        _, rows = read_table(self.split_table, ("dicom_id", "split"))
        table = {}
        for _, row in rows:
            split = (row["split"] or "").strip().lower()
            if split in KNOWN_SPLITS:
                table[(row["dicom_id"] or "").strip()] = "test" if split in TEST_SPLITS else split
        return table

    def _labels(self) -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
        if self.label_table is None:
            return {}
        header, rows = read_table(self.label_table, ("subject_id", "study_id"))
        columns = [name for name in CHEXPERT_LABELS if name in header]
        if not columns:
            raise DataError(f"{self.label_table} has none of the CheXpert label columns ({', '.join(CHEXPERT_LABELS)})"
                            ": pass the label table as published, or --labeler none")
        return {(row["subject_id"].strip(), row["study_id"].strip()): chexpert_labels(row, columns, self.uncertain)
                for _, row in rows}

    def _views(self) -> dict[str, str]:
        """dicom_id -> view from the metadata table, for the DICOM layout (the JPG layout reads it per row)."""
        if self.layout != "dicom" or self.metadata is None:
            return {}
        _, rows = read_table(self.metadata, ("dicom_id",))
        return {(row["dicom_id"] or "").strip(): _row_view(row) for _, row in rows}

    # ---- records -------------------------------------------------------------------------------------------
    def records(self) -> Iterator[Record]:
        self._clear_rejects()
        self._summary = Counter()
        splits, labels, views = self._splits(), self._labels(), self._views()
        table = self.metadata if self.layout == "jpg" else self.record_list
        required = ("dicom_id", "subject_id", "study_id") + (("path",) if self.layout == "dicom" else ())
        _, rows = read_table(table, required)
        last_study: tuple[tuple[str, str], object] = (("", ""), None)
        with ExitStack() as stack:
            store = stack.enter_context(ReportStore(self.reports))
            for line, row in rows:
                self._summary["rows"] += 1
                where = f"{table.name}:{line}"
                dicom, subject, study = (str(row.get(k) or "").strip() for k in ("dicom_id", "subject_id", "study_id"))
                if not (SAFE_ID.match(dicom) and subject.isdigit() and study.isdigit() and len(subject) >= 2):
                    self._reject(where, "bad_row", f"dicom_id {dicom!r}, subject_id {subject!r}, study_id {study!r}")
                    continue
                path = self._image_path(row, subject, study, dicom)
                if path is None:
                    self._reject(dicom, "outside_root", f"path {row.get('path')!r} ({where}) leaves {self.root}")
                    continue
                view = _row_view(row) if self.layout == "jpg" else views.get(dicom)
                if view is not None and not view_wanted(view, self.views):
                    self._summary["other_views"] += 1  # not an input we were asked for: no reject
                    continue
                if not path.is_file():
                    self._reject(dicom, "missing_image", f"{path} not found ({where})")
                    continue
                if view is None:  # DICOM release without the metadata table: the header says
                    view = _dicom_view(path)
                    if not view_wanted(view, self.views):
                        self._summary["other_views"] += 1
                        continue
                split = splits.get(dicom, "") if self.official_split else ""
                if self.official_split and not split:
                    self._reject(dicom, "not_in_split", f"{dicom} is not in {self.split_table.name}")
                    continue
                if last_study[0] != (subject, study):
                    last_study = ((subject, study), self._prompt(store, subject, study))
                prompt = last_study[1]
                if isinstance(prompt, RecordRejected):
                    self._reject_because(dicom, prompt)
                    continue
                positive, negative = labels.get((subject, study), ((), ()))
                self._summary["images"] += 1
                self._summary["images_without_labels"] += (subject, study) not in labels
                yield Record(uid=dicom, group=subject, prompt=prompt, labels=list(positive), view=view,
                             source=self.name, source_path=str(path), split="test" if split == "test" else "",
                             extra={"subject_id": subject, "study_id": study, "official_split": split,
                                    "negative_labels": list(negative)})

    def _image_path(self, row: dict, subject: str, study: str, dicom: str) -> Optional[Path]:
        if self.layout == "jpg":
            return self.root / study_folder(subject, study) / f"{dicom}.jpg"
        path = self.root / str(row.get("path") or "").strip()
        return path if path.resolve().is_relative_to(self.root.resolve()) else None

    def _prompt(self, store: ReportStore, subject: str, study: str):
        """The study's prompt, or the RecordRejected that every image of the study gets."""
        try:
            text = store.text(subject, study)
        except RecordRejected as exc:
            return exc
        prompt = report_prompt(text, self.sections, self.fallback)
        if not has_words(prompt):
            what = "/".join(self.sections) + (" (nor a last paragraph)" if self.fallback else "")
            return RecordRejected("empty_report", f"s{study}.txt has no words in {what}")
        return prompt

    def summary(self) -> dict[str, object]:
        """Counts from the last records() pass, and which tables were read."""
        counts = {key: int(self._summary[key]) for key in ("rows", "images", "other_views", "images_without_labels")}
        return {**counts, "layout": self.layout, "labels": self.label_table.name if self.label_table else "none",
                "split": "official" if self.official_split else "drawn"}

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        return decode_file(record.source_path, fit)


def _row_view(row: dict) -> str:
    view = str(row.get("ViewPosition") or "").strip().upper()
    if view:
        return view
    return _VIEW_CODES.get(str(row.get("ViewCodeSequence_CodeMeaning") or "").strip().lower(), "")


def _dicom_view(path: Path) -> str:
    """ViewPosition (0018,5101) from a DICOM header, pixels not read; "" when absent or unreadable."""
    try:
        import pydicom

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["ViewPosition"])
        return str(ds.get("ViewPosition", "") or "").strip().upper()
    except Exception:  # an unreadable header: the view is unknown; load() rejects a file that cannot be read
        return ""
