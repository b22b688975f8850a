"""The contract between a data source and the shard builder.

A source yields cheap `Record`s (metadata only) in a deterministic order, and turns one record into pixels
with `load(record, fit)`. `load` runs inside worker processes, so a source object must be picklable and must
not hold open files. A record that cannot be loaded raises `RecordRejected(reason)`: the builder counts it
in rejects.jsonl, it never becomes a dummy image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Protocol

import numpy as np


class RecordRejected(Exception):
    """This input is skipped; `reason` is a short, stable key (e.g. 'corrupt_image', 'empty_report')."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    uid: str  # unique per image; becomes the webdataset __key__ (no dots)
    group: str  # patient / report / study id: every record of a group lands in the same split
    prompt: str  # cleaned report text (FINDINGS + IMPRESSION by default), no template applied
    labels: list[str] = field(default_factory=list)  # MeSH-style "Term/qualifier/..." e.g. "Pleural Effusion/left/small"
    view: str = ""  # PA, AP, LATERAL, ... ("" when unknown)
    source: str = ""  # source name, e.g. "iu-xray", "manifest", "phantom"
    source_path: str = ""  # where the pixels come from (file path, or a description for generated images)
    extra: dict[str, Any] = field(default_factory=dict)  # source-specific, JSON-serialisable (e.g. phantom geometry)
    # "test" when the data set's official split holds this image out; read only from a source whose
    # `official_split` is true: then the builder puts every group with such a record in the test split and
    # draws the folds from the rest (a test_fraction is refused)
    split: str = ""


class Source(Protocol):
    name: str

    def records(self) -> Iterator[Record]:
        """Every candidate record, in a deterministic order. May yield rejects via `rejected()`."""
        ...

    def load(self, record: Record, fit: Optional[tuple[int, str]] = None) -> np.ndarray:
        """Pixels as a 2-D float32 array in [0, 1], full bit depth kept (quantised only when encoding).

        `fit=(size, resize mode)` is what the builder will resize the pixels to: a source that reads files passes
        it on to `imageio.decode_file`, which lets a large JPEG decode at a reduced DCT scale (fast JPEG ingest);
        a source that draws its images may ignore it."""
        ...

    def rejected(self) -> list[tuple[str, str, str]]:
        """(identifier, reason, detail) for inputs dropped while listing records (e.g. report without text)."""
        ...


class ListingRejects:
    """The `rejected()` half of a Source that reads files: what its last records() pass dropped, in the order met.

    A source calls `_clear_rejects()` when a pass starts (records() is read twice per build, and the second
    reading must not count a reject twice), then `_reject(...)` for each input it drops."""

    _rejected: list[tuple[str, str, str]]

    def _clear_rejects(self) -> None:
        self._rejected = []

    def _reject(self, identifier: str, reason: str, detail: str = "") -> None:
        self._rejected.append((identifier, reason, detail))

    def _reject_because(self, identifier: str, exc: RecordRejected) -> None:
        self._reject(identifier, exc.reason, exc.detail)

    def rejected(self) -> list[tuple[str, str, str]]:
        return list(self._rejected)
