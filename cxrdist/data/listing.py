"""Which records a shard build takes: the source read twice, its Records never held all at once.

Records carry their report text: held together, 377,000 MIMIC-CXR-JPG rows took about 735 MiB (2,045 bytes a
record). The split and the duplicate check need far less, so a build reads the source twice:

1. `list_records` keeps one small `RecordKey` per record (uid, group, file, official split), the order in
   which the source yielded them, and a digest of everything the shards will hold. Duplicates are dropped
   on the keys, before any split is drawn.
2. `Listing.stream` reads the source again and yields the kept Records one at a time to the writer. Sources
   promise a deterministic order; a record that comes back different (another uid, group or official split,
   or other text, labels or file) stops the build, since its split was drawn from the first reading.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat as stat_mode
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

from cxrdist.data.sources.base import Record
from cxrdist.errors import DataError
from cxrdist.fileio import json_text, sha256_file

DUPLICATE_PATH, DUPLICATE_CONTENT = "duplicate_path", "duplicate_content"


class SourceChanged(DataError):
    """The second reading of a source differs from the first, from which the split was drawn."""


# what list_records decided about each record the source yielded, by position (one byte a record)
_BAD_UID, _DUPLICATE, _KEPT = 0, 1, 2


class RecordKey(NamedTuple):
    """What splitting and de-duplicating a record needs; a tuple, so 377,000 of them stay small."""
    uid: str
    group: str
    source_path: str
    split: str  # Record.split: "test" when the data set's official split holds the image out


def _content_line(record: Record) -> bytes:
    """The part of a record its shard holds, for the digest that both readings must agree on."""
    return json_text([record.uid, record.group, record.split, record.prompt, record.source_path, record.labels,
                      record.view, record.extra], sort_keys=True, default=str).encode("utf-8")


def _finish_digest(digest, duplicate_uids: Iterable[str]) -> str:
    digest.update(json.dumps(sorted(duplicate_uids)).encode("utf-8"))
    return digest.hexdigest()


@dataclass
class Listing:
    keys: list[RecordKey]  # the kept records, in source order
    rejects: list[dict[str, Any]]  # rejected while listing (the source's, bad uids, duplicates)
    dedupe: dict[str, int]
    sha256: str  # over every record with a usable uid, then the uids dropped as duplicates
    source_name: str
    decisions: bytearray = field(repr=False, default_factory=bytearray)  # per yielded record: _BAD_UID ...

    def stream(self, source) -> Iterator[Record]:
        """The kept Records, read from `source` again, in the order of `keys`.

        Raises SourceChanged when the source yields other records than it did the first time: a file or table
        changed during the build, or a source that does not list in a deterministic order.
        """
        digest, kept, duplicates = hashlib.sha256(), iter(self.keys), []
        position = -1
        for position, record in enumerate(source.records()):
            if position >= len(self.decisions):
                raise self._changed(f"it now lists more than the {len(self.decisions)} records it listed first")
            decision = self.decisions[position]
            if decision == _BAD_UID:
                continue
            digest.update(_content_line(record))
            if decision == _DUPLICATE:
                duplicates.append(record.uid)
                continue
            key = next(kept)
            if (record.uid, record.group, record.split) != (key.uid, key.group, key.split):
                raise self._changed(f"record {position + 1} is now {record.uid} (group {record.group}), it was "
                                    f"{key.uid} (group {key.group})")
            yield record
        if position + 1 != len(self.decisions):
            raise self._changed(f"it now lists {position + 1} records, it listed {len(self.decisions)} first")
        if _finish_digest(digest, duplicates) != self.sha256:
            raise self._changed("a record's report, labels or file differ from the first reading")

    def _changed(self, what: str) -> SourceChanged:
        return SourceChanged(f"source {self.source_name} changed while the build read it ({what}): keep its "
                             "files unchanged during a build, then rerun it")


def list_records(source, workers: int = 1) -> Listing:
    """The first reading: every record's key and verdict, the listing rejects and the content digest."""
    keys, rejects, decisions, seen = [], [], bytearray(), set()
    digest = hashlib.sha256()
    for record in source.records():
        if record.uid in seen or not record.uid or "." in record.uid:
            rejects.append({"id": record.uid, "reason": "bad_uid", "source_path": record.source_path,
                            "detail": "duplicate uid" if record.uid in seen else "empty uid or contains '.'"})
            decisions.append(_BAD_UID)
            continue
        seen.add(record.uid)
        digest.update(_content_line(record))
        keys.append(RecordKey(record.uid, record.group, record.source_path, record.split))
        decisions.append(_KEPT)
    del seen
    listed = [{"id": ident, "reason": reason, "detail": detail} for ident, reason, detail in source.rejected()]
    kept, duplicates, dedupe = drop_duplicates(keys, workers)
    dropped = {reject["id"] for reject in duplicates}
    in_order = iter(keys)
    for position, decision in enumerate(decisions):
        if decision == _KEPT and next(in_order).uid in dropped:
            decisions[position] = _DUPLICATE
    return Listing(kept, listed + rejects + duplicates, dedupe, _finish_digest(digest, dropped),
                   getattr(source, "name", "unknown"), decisions)


# ---- duplicates --------------------------------------------------------------------------------------------
# A manifest may list one file under two group ids, and a collection may hold a byte-copy of an image under
# another name and patient: either puts one image in two splits (test and a training fold). So the whole
# source is checked before the split, and the first record in source order keeps the image.
def _path_key(source_path: str) -> str:
    """The file a record reads, links and `..` resolved; a generated record's descriptor as it is."""
    return os.path.realpath(source_path) if os.path.lexists(source_path) else os.path.normpath(source_path)


def _regular_size(path: str) -> Optional[int]:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_size if stat_mode.S_ISREG(info.st_mode) else None


def _digest_or_none(path: str) -> Optional[str]:
    try:
        return sha256_file(path)
    except OSError:
        return None  # vanished or unreadable: loading the record rejects it with the reason


def _threaded(func: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """[func(x) for x in items] on `workers` threads, in order. Threads, not processes: stat, file reads and
    hashlib release the GIL and nothing needs pickling; one slice per thread, not one future per item."""
    if workers <= 1 or len(items) < 2:
        return [func(item) for item in items]
    step = -(-len(items) // workers)
    slices = [items[start:start + step] for start in range(0, len(items), step)]
    with ThreadPoolExecutor(max_workers=len(slices)) as pool:
        parts = pool.map(lambda part: [func(item) for item in part], slices)
        return [result for part in parts for result in part]


def _content_digests(paths: Sequence[str], workers: int) -> tuple[dict[str, str], int]:
    """(path -> sha256 of the files that share their size with another file, number of existing files).

    Only files of equal size can be byte-copies, so the others are never read here: on a large collection
    that spares reading most of it twice.
    """
    sizes = {path: size for path, size in zip(paths, _threaded(_regular_size, paths, workers))
             if size is not None}
    same_size = Counter(sizes.values())
    candidates = [path for path, size in sizes.items() if same_size[size] > 1]
    digests = dict(zip(candidates, _threaded(_digest_or_none, candidates, workers)))
    return {path: digest for path, digest in digests.items() if digest}, len(sizes)


def _duplicate_reject(record: RecordKey, kept: RecordKey, reason: str) -> dict[str, Any]:
    what = "file" if reason == DUPLICATE_PATH else "bytes"
    return {"id": record.uid, "reason": reason, "source_path": record.source_path, "kept": kept.uid,
            "detail": f"same {what} as {kept.uid} (group {kept.group}), which is kept; this one was in group "
                      f"{record.group}"}


def drop_duplicates(records: Sequence[RecordKey], workers: int = 1) -> tuple[list[RecordKey], list[dict], dict]:
    """(kept records, rejects, counts): one record per resolved path, then one per file content (sha256).

    Records without a file (generated in memory, like the phantoms) are compared by their descriptor only:
    their pixels come from the source's own seed and index, not from a file that can be copied or listed
    twice, and hashing their pixels would mean generating every image twice. counts["without_file"] says
    how many records were not compared by content.
    """
    keys = _threaded(lambda r: _path_key(r.source_path) if r.source_path else "", records, workers)
    kept, rejects, by_path = [], [], {}
    for record, key in zip(records, keys):
        if key and key in by_path:
            rejects.append(_duplicate_reject(record, by_path[key], DUPLICATE_PATH))
            continue
        by_path.setdefault(key, record)
        kept.append((record, key))
    digests, n_files = _content_digests([key for _, key in kept if key], workers)
    unique, by_digest = [], {}
    for record, key in kept:
        digest = digests.get(key)
        if digest and digest in by_digest:
            rejects.append(_duplicate_reject(record, by_digest[digest], DUPLICATE_CONTENT))
            continue
        by_digest.setdefault(digest, record)
        unique.append(record)
    reasons = Counter(r["reason"] for r in rejects)
    counts = {DUPLICATE_PATH: reasons[DUPLICATE_PATH], DUPLICATE_CONTENT: reasons[DUPLICATE_CONTENT],
              "files": n_files, "files_hashed": len(digests), "without_file": len(kept) - n_files}
    return unique, rejects, counts
