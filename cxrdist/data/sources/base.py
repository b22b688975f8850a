"""The contract between a data source and the shard builder.

A source yields cheap `Record`s (metadata only) in a deterministic order, and turns one record into pixels
with `load(record)`. `load` runs inside worker processes, so a source object must be picklable and must
not hold open files. A record that cannot be loaded raises `RecordRejected(reason)`: the builder counts it
in rejects.jsonl, it never becomes a dummy image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

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

    def load(self, record: Record) -> np.ndarray:
        """Pixels as a 2-D float32 array in [0, 1], full bit depth kept (quantised only when encoding).

        A source may also accept `fit=(size, resize mode)`: what the builder will resize the pixels to. Passing
        it on to `imageio.decode_file` lets a large JPEG decode at a reduced DCT scale (fast JPEG ingest)."""
        ...

    def rejected(self) -> list[tuple[str, str, str]]:
        """(identifier, reason, detail) for inputs dropped while listing records (e.g. report without text)."""
        ...
