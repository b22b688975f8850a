"""Indiana University / Open-i chest X-rays (NLMCXR): one XML report per study, one PNG per image.

Report layout (ecgen-radiology/<n>.xml), the parts we read:
    <uId id="CXR1"/>
    <AbstractText Label="FINDINGS">...</AbstractText>   also IMPRESSION, INDICATION, COMPARISON
    <MeSH><major>Cardiomegaly/mild</major>...</MeSH>
    <parentImage id="CXR1_1_IM-0001-3001">...</parentImage>   pixels in CXR1_1_IM-0001-3001.png
The report is the group: its frontal and lateral images always land in the same split.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import decode_file
from cxrdist.data.reports import build_prompt, clean_text, has_words
from cxrdist.data.sources.base import ListingRejects, Record, RecordRejected
from cxrdist.errors import DataError

# clean_text and has_words are imported from here by older callers: the shared parser (cxrdist.data.reports)
__all__ = ["IUReport", "IUXraySource", "build_prompt", "clean_text", "has_words", "parse_report"]
SECTIONS = ("findings", "impression", "indication", "comparison")
DEFAULT_FIELDS = ("findings", "impression")  # INDICATION is not visible in an image, so off by default
REPORTS_FOLDER = "ecgen-radiology"

_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class IUReport:
    uid: str  # <uId id>, or the file stem when absent
    file: str
    sections: dict[str, str] = field(default_factory=dict)  # lower-case label -> raw text
    images: list[str] = field(default_factory=list)  # parentImage ids, in document order
    mesh: list[str] = field(default_factory=list)  # <MeSH><major> terms, e.g. "Pleural Effusion/left/small"


def parse_report(path: str | Path) -> IUReport:
    """Parse one report XML. Raises RecordRejected('bad_xml') for files that are not well-formed."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise RecordRejected("bad_xml", f"{path.name}: {exc}") from None
    uid_node = root.find(".//uId")
    uid = (uid_node.get("id") if uid_node is not None else None) or path.stem
    report = IUReport(uid=_UNSAFE_KEY.sub("_", uid), file=path.name)
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        if label in SECTIONS:
            report.sections[label] = "".join(node.itertext()).strip()
    for node in root.iter("parentImage"):
        if node.get("id"):
            report.images.append(node.get("id").strip())
    for mesh in root.iter("MeSH"):
        report.mesh.extend(" ".join("".join(m.itertext()).split()) for m in mesh.findall("major"))
    report.mesh = [term for term in report.mesh if term]
    return report


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class IUXraySource(ListingRejects):
    """Records from extracted NLMCXR folders: `roots` hold ecgen-radiology/*.xml and the PNGs (any depth).

    `exclude` are folders never scanned from a root outside them: the shard output and its download cache
    may sit inside `--from`, and are then read once, as their own root, not twice.
    """

    name = "iu-xray"

    def __init__(self, roots: Sequence[str | Path], fields: Sequence[str] = DEFAULT_FIELDS,
                 exclude: Sequence[str | Path] = ()) -> None:
        unknown = [f for f in fields if f not in SECTIONS]
        if unknown or not fields:
            raise DataError(f"unknown report field(s) {unknown or fields}: choose from {', '.join(SECTIONS)}")
        self.roots = [Path(r) for r in roots]
        self.exclude = [Path(e).resolve() for e in exclude]
        self.fields = tuple(fields)
        self._clear_rejects()
        self._summary: Counter = Counter()

    def _walk(self, root: Path) -> Iterator[tuple[Path, list[str]]]:
        """(folder, file names) under root, pruned of the excluded folders that root is not inside."""
        real = root.resolve()
        skip = [e for e in self.exclude if not _within(real, e)]
        for folder, dirs, files in os.walk(root):  # like rglob: symbolic links to folders are not followed
            here = Path(folder)
            dirs[:] = [d for d in dirs if not any(_within((here / d).resolve(), e) for e in skip)]
            yield here, files

    def _files(self, suffix: str, folder_name: Optional[str] = None) -> list[Path]:
        """Files ending in `suffix` (inside a folder named `folder_name`), each real file once over all roots:
        overlapping roots (a cache inside --from) would otherwise count it twice."""
        found: dict[Path, Path] = {}
        for root in self.roots:
            paths = [folder / name for folder, files in self._walk(root)
                     if folder_name in (None, folder.name) for name in files if name.endswith(suffix)]
            for path in sorted(paths):  # by full path, root by root, as rglob was: the same file wins
                if path.is_file():
                    found.setdefault(path.resolve(), path)
        return list(found.values())

    def _report_files(self) -> list[Path]:
        files = self._files(".xml", REPORTS_FOLDER)
        if not files:
            raise DataError(f"no {REPORTS_FOLDER}/*.xml found under {', '.join(map(str, self.roots))}: "
                            "pass the folder (or archives) holding the NLMCXR reports with --from")
        # Numeric stems sort numerically (2.xml before 10.xml) so the order matches the collection's.
        return sorted(files, key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))

    def _image_index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for png in self._files(".png"):
            index.setdefault(png.stem, png)
        return index

    def records(self) -> Iterator[Record]:
        self._clear_rejects()
        self._summary = Counter()
        images = self._image_index()
        seen_images: set[str] = set()
        seen_reports: dict[str, str] = {}
        for path in self._report_files():
            try:
                report = parse_report(path)
            except RecordRejected as exc:
                self._summary["reports_seen"] += 1
                self._reject_because(path.name, exc)
                continue
            if report.uid in seen_reports:  # a second copy of the collection (archive and extracted folder)
                self._reject(str(path), "duplicate_report",
                             f"uId {report.uid} also in {seen_reports[report.uid]}")
                continue
            seen_reports[report.uid] = str(path)
            self._summary["reports_seen"] += 1
            prompt = build_prompt(report.sections, self.fields)
            if not prompt:
                self._reject(path.name, "empty_report", f"no words in {'/'.join(self.fields)}")
                continue
            if not report.images:
                self._reject(path.name, "no_images", "report lists no parentImage")
                continue
            self._summary["reports_used"] += 1
            for image_id in report.images:
                self._summary["images_listed"] += 1
                if image_id in seen_images:
                    self._reject(image_id, "duplicate_image", f"also listed by an earlier report ({path.name})")
                    continue
                seen_images.add(image_id)
                if image_id not in images:
                    self._summary["images_missing"] += 1
                    self._reject(image_id, "missing_image", f"{image_id}.png not found (listed in {path.name})")
                    continue
                self._summary["images_found"] += 1
                yield Record(uid=_UNSAFE_KEY.sub("_", image_id), group=report.uid, prompt=prompt,
                             labels=list(report.mesh), view="", source=self.name,
                             source_path=str(images[image_id]), extra={"report_file": report.file})

    def summary(self) -> dict[str, int]:
        """Counts from the last records() pass: reports seen/used, images listed/found/missing."""
        keys = ("reports_seen", "reports_used", "images_listed", "images_found", "images_missing")
        return {key: int(self._summary[key]) for key in keys}

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        return decode_file(record.source_path, fit)
