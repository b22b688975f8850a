"""index.json: what a shard set holds, and the checks every reader runs before trusting it.

Layout of a shard set folder:
    index.json          written last: its presence means the build completed
    rejects.jsonl       one line per skipped input, with the reason
    test-000000.tar     shards per split (test, fold0 .. fold{K-1}), `shard_size` samples each
    .parts/             per-shard stats (the resume markers) and the build plan
    .cxrdist-build.lock the running builder's PID (only while a build runs)
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from cxrdist.data import storage
from cxrdist.errors import DataError
from cxrdist.fileio import sha256_file, write_json_atomic

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
PARTS_DIR = ".parts"
TEST_SPLIT = "test"
LATENTS_KEY = "latents"  # index.json's record of cached latents (cxrdist.data.latents)


def fold_name(fold: int) -> str:
    return f"fold{fold}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


@dataclass
class ShardIndex:
    root: str  # the shard set's location: a folder, a URL or a pipe: command (cxrdist.data.storage)
    format_version: int
    source: str
    image_size: int
    channels: int  # always 1: shards hold grayscale; loaders replicate to 3 channels when asked
    bit_depth: int
    folds: int
    seed: int
    test_fraction: Optional[float]  # None: the data set's official test split (options.official_split)
    splits: dict[str, dict[str, Any]]  # name -> {count, groups, shards: [{name, count, sha256, bytes}], labels}
    options: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    source_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    @property
    def fold_names(self) -> list[str]:
        return [fold_name(k) for k in range(self.folds)]

    def check_fold(self, fold: int) -> str:
        if not isinstance(fold, int) or not 0 <= fold < self.folds:
            raise DataError(f"fold {fold} is out of range for {self.root}: valid folds are 0..{self.folds - 1}")
        return fold_name(fold)

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise DataError(f"split {split!r} not in {self.root}: choose one of {', '.join(self.splits)}")
        return split

    def check_image_size(self, image_size: int) -> None:
        if image_size != self.image_size:
            raise DataError(
                f"{self.root} holds {self.image_size}x{self.image_size} images but {image_size} was asked for: "
                f"rebuild the shards with --size {image_size} or set data.image_size={self.image_size}")

    def shards(self, splits: Iterable[str]) -> list[dict[str, Any]]:
        """Shard entries of the given splits, in index order, each with an added `path` (its location)."""
        out = []
        for split in splits:
            for entry in self.splits[self.check_split(split)]["shards"]:
                out.append({**entry, "split": split, "path": storage.member(self.root, entry["name"])})
        return out

    def count(self, splits: Iterable[str]) -> int:
        return sum(int(self.splits[self.check_split(s)]["count"]) for s in splits)


@functools.lru_cache(maxsize=8)
def _remote_index_bytes(location: str) -> bytes:
    """A remote index.json, fetched once per process: the loaders reopen the index every epoch and evaluation,
    and a local file read costs nothing where a request to object storage does. A local index is read each time
    (cache-latents rewrites it)."""
    return storage.read_bytes(location)


def _read_index(shards_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(location of index.json, its parsed content); DataError naming the file and the fix otherwise."""
    path = storage.member(shards_dir, INDEX_NAME)
    if not storage.is_remote(shards_dir) and not Path(path).is_file():
        parts = Path(storage.member(shards_dir, PARTS_DIR))
        hint = " (an interrupted build: rerun it with --resume)" if parts.is_dir() else ""
        raise DataError(f"{path} not found{hint}: build the shard set with `cxrdist shard ...` first")
    try:
        raw = _remote_index_bytes(path) if storage.is_remote(shards_dir) else storage.read_bytes(path)
        return path, json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable ({exc}): check data.shards, or rebuild the shard set with "
                        "`cxrdist shard ...`") from None


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def load_index(shards_dir: str | os.PathLike) -> ShardIndex:
    """Read and sanity-check `<shards_dir>/index.json` (a folder, URL or pipe: command); DataError naming the file
    and the fix otherwise."""
    root = str(shards_dir) if storage.is_remote(shards_dir) else str(Path(storage.local_path(shards_dir)))
    path, data = _read_index(root)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a shard set index (not a JSON object): rebuild the shard set")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format version {version}, this cxrdist reads {FORMAT_VERSION}: "
                        "rebuild the shard set with this version")
    try:
        return ShardIndex(root=root, format_version=version, source=data["source"],
                          image_size=int(data["image_size"]), channels=int(data["channels"]),
                          bit_depth=int(data["bit_depth"]), folds=int(data["folds"]), seed=int(data["seed"]),
                          test_fraction=_optional_float(data["test_fraction"]), splits=data["splits"],
                          options=data.get("options", {}), counts=data.get("counts", {}),
                          rejects=data.get("rejects", {}), source_summary=data.get("source_summary", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is missing or has a bad field ({exc}): rebuild the shard set") from None


def verify_checksums(index: ShardIndex | str | os.PathLike, splits: Optional[Iterable[str]] = None, *,
                     full: bool = True, raise_on_error: bool = True) -> list[str]:
    """Check every shard of `splits` (default: all) exists, has the recorded size and (full) sha256.

    Returns the list of problems (empty when all is well); raises DataError on the first problem when
    `raise_on_error`.
    """
    if not isinstance(index, ShardIndex):
        index = load_index(index)
    problems = []
    for entry in index.shards(list(splits) if splits is not None else list(index.splits)):
        problem = _remote_problem(entry, full) if index.remote else _local_problem(entry, full)
        if problem is None:
            continue
        if raise_on_error:
            raise DataError(problem)
        problems.append(problem)
    return problems


def _local_problem(entry: dict[str, Any], full: bool) -> str | None:
    path = Path(entry["path"])
    if not path.is_file():
        return f"{path} is missing: rebuild the shard set (or restore the file)"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return (f"{path} has {path.stat().st_size} bytes, index.json says {entry['bytes']}: "
                "the file is damaged; rebuild the shard set")
    if full and sha256_file(path) != entry["sha256"]:
        return f"{path} checksum mismatch with index.json: the file is damaged; rebuild the shard set"
    return None


def _remote_problem(entry: dict[str, Any], full: bool) -> str | None:
    """A remote shard is streamed whole to hash it: there is no cheap size-only check that works for every
    protocol, so `full` makes no difference."""
    try:
        digest, size = storage.sha256_stream(entry["path"])
    except DataError as exc:
        return str(exc)
    if "bytes" in entry and size != entry["bytes"]:
        return f"{entry['path']} has {size} bytes, index.json says {entry['bytes']}: upload the shard set again"
    if digest != entry["sha256"]:
        return f"{entry['path']} checksum mismatch with index.json: upload the shard set again"
    return None


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_once(index: ShardIndex, splits: Iterable[str], only: Optional[set[str]] = None) -> None:
    """verify_checksums, but each file is hashed once per process (loaders are rebuilt every epoch); with `only`,
    just the shards of those paths (what one rank reads)."""
    for entry in index.shards(splits):
        if only is not None and entry["path"] not in only:
            continue
        path = Path(entry["path"])
        try:
            stat = path.stat()
        except OSError:
            raise DataError(f"{path} is missing: rebuild the shard set (or restore the file)") from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if _VERIFIED.get(key) == entry["sha256"]:
            continue
        if stat.st_size != entry.get("bytes", stat.st_size) or sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path} checksum mismatch with index.json: the file is damaged; rebuild the shard set")
        _VERIFIED[key] = entry["sha256"]


def latents_record(shards_dir: str | os.PathLike) -> dict[str, Any] | None:
    """index.json's record of the latents the shards carry, or None (no latents, or no local index.json)."""
    if not storage.is_remote(shards_dir) and not Path(storage.member(shards_dir, INDEX_NAME)).exists():
        return None
    return _read_index(shards_dir)[1].get(LATENTS_KEY)


def record_latents(shards_dir: str | os.PathLike, rewritten: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """Rewrite index.json after shards were rewritten with latents: each rewritten shard's new sha256 and size
    (`rewritten`: shard name -> {"sha256", "bytes"}) and the latents record, atomically."""
    path = Path(shards_dir) / INDEX_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    for split in data["splits"].values():
        for shard in split["shards"]:
            shard.update(rewritten.get(shard["name"], {}))
    data[LATENTS_KEY] = record
    write_json_atomic(path, data)
