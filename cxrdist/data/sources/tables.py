"""What the large public sources (MIMIC-CXR, CheXpert Plus) share: streaming CSV tables (plain or gzip), view
filters, CheXpert-style labels (1.0 / 0.0 / -1.0 / blank) and the policy for uncertain ones.

Tables are read row by row with the csv module; a source keeps only keyed index tables (dicom_id -> split,
(subject, study) -> labels), never the rows themselves.
"""
from __future__ import annotations

import csv
import gzip
import re
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from cxrdist.errors import DataError

# The 14 CheXpert observations, as MIMIC-CXR's -chexpert / -negbio files and CheXpert name them.
CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
# Column -> label in the shape the IU source uses (MeSH-like terms; a normal study is "normal").
LABEL_NAMES = {name: name for name in CHEXPERT_LABELS} | {"No Finding": "normal"}
UNCERTAIN_POLICIES = ("drop", "positive", "negative", "uncertain")

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LATERAL", "LL")
# Words a user may give to --views besides the exact view names: frontal = PA, AP and a frontal image of unknown
# projection (CheXpert Plus says "Frontal" without AP/PA for a few), lateral = LATERAL and LL.
VIEW_ALIASES = {"FRONTAL": FRONTAL_VIEWS + ("FRONTAL",), "LATERAL": LATERAL_VIEWS}

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # ids that may become file names and sample keys


def find_table(root: Path, stem: str) -> Optional[Path]:
    """`root/stem.csv.gz` or `root/stem.csv`, whichever exists (the gzip first), else None."""
    for suffix in (".csv.gz", ".csv"):
        path = root / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_table(path: Path, required: Sequence[str] = ()) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """(header, iterator of (line number, row)) of a CSV, gzip-compressed when it ends in .gz.

    A missing required column or one named twice is a DataError before any row is read; a damaged gzip, bytes
    that are not UTF-8 or broken CSV quoting are DataErrors naming the file and line, raised while the rows are
    read.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        handle = opener(path, "rt", encoding="utf-8-sig", newline="")
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
        raise _table_error(path, 1, exc) from None
    reader.fieldnames = header
    repeated = next((name for i, name in enumerate(header) if name and name in header[:i]), None)
    if repeated is not None:  # csv.DictReader would silently keep the last column of that name
        handle.close()
        raise DataError(f"{path} has two columns named {repeated!r}: pass the file as published, or remove one")
    missing = [name for name in required if name not in header]
    if missing:
        handle.close()
        raise DataError(f"{path} has no column {', '.join(missing)} (columns are: {', '.join(header) or 'none'}): "
                        "pass the file as published, with its header line")

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with handle:
            try:
                for row in reader:
                    yield reader.line_num, row
            except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as exc:
                raise _table_error(path, reader.line_num, exc) from None

    return header, rows()


def _table_error(path: Path, line: int, exc: Exception) -> DataError:
    what = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"cannot be read ({exc})"
    return DataError(f"{path}:{line} {what}: replace the file with an intact copy of the download")


def parse_views(views: Sequence[str] | str) -> frozenset[str]:
    """--views PA,AP -> {"PA", "AP"}; "frontal" and "lateral" expand (see VIEW_ALIASES); "all" keeps every view,
    including images whose view is unknown."""
    names = views.split(",") if isinstance(views, str) else list(views)
    chosen: set[str] = set()
    for name in (n.strip().upper() for n in names if n.strip()):
        chosen.update(VIEW_ALIASES.get(name, (name,)))
    if not chosen:
        raise DataError("--views is empty: give view names such as PA,AP (or frontal, lateral, all)")
    return frozenset(chosen)


def view_wanted(view: str, views: frozenset[str]) -> bool:
    return "ALL" in views or view in views


def check_policy(uncertain: str) -> str:
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    return uncertain


def chexpert_labels(row: dict[str, Any], columns: Sequence[str], uncertain: str) -> tuple[tuple[str, ...],
                                                                                          tuple[str, ...]]:
    """(positive labels, negative labels) of one labelled study. 1.0 is positive, 0.0 negative, blank unknown
    (neither); -1.0 (uncertain) is dropped, made positive or negative, or kept as "Label/uncertain"."""
    positive, negative = [], []
    for column in columns:
        value = str(row.get(column) or "").strip()
        name = LABEL_NAMES.get(column, column)
        try:
            number = float(value) if value else None
        except ValueError:
            number = None  # not a CheXpert value: treated like a blank
        if number == 1.0 or (number == -1.0 and uncertain == "positive"):
            positive.append(name)
        elif number == 0.0 or (number == -1.0 and uncertain == "negative"):
            negative.append(name)
        elif number == -1.0 and uncertain == "uncertain":
            positive.append(f"{name}/uncertain")
    return tuple(positive), tuple(negative)
