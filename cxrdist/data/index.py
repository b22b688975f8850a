"""index.json: what a shard set holds, and the checks every reader runs before trusting it.

Layout of a shard set folder:
    index.json          written last: its presence means the build completed
    rejects.jsonl       one line per skipped input, with the reason
    test-000000.tar     shards per split (test, fold0 .. fold{K-1}), `shard_size` samples each
    .parts/             per-shard stats (the resume markers) and the build plan
    .cxrdist-build.lock the running builder's PID (only while a build runs)

An index.json may come from anywhere (a URL, a copied folder): load_index holds every name in it to what the
builder writes before any location is built from one (see _check_names).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from cxrdist.data import storage
from cxrdist.errors import DataError
from cxrdist.fileio import check_not_special, sha256_file, special_file_kind, write_json_atomic

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
PARTS_DIR = ".parts"
TEST_SPLIT = "test"
LATENTS_KEY = "latents"  # index.json's record of cached latents (cxrdist.data.latents)
SHARD_NUMBER = re.compile(r"[0-9]{6,}")  # shard_name's number: ASCII digits (\d would take any script's)
SHA256 = re.compile(r"[0-9a-f]{64}")
VAE_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


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
    latents: Optional[dict[str, Any]] = None  # the latents record (cxrdist.data.latents), when the shards carry them

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
    return _index_bytes(location)


def _read_index(shards_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(location of index.json, its parsed content); DataError naming the file and the fix otherwise."""
    path = storage.member(shards_dir, INDEX_NAME)
    if not storage.is_remote(shards_dir):
        check_not_special(path, "index file", DataError)
        if not Path(path).is_file():
            parts = Path(storage.member(shards_dir, PARTS_DIR))
            hint = " (an interrupted build: rerun it with --resume)" if parts.is_dir() else ""
            raise DataError(f"{path} not found{hint}: build the shard set with `cxrdist shard ...` first")
    try:
        raw = _remote_index_bytes(path) if storage.is_remote(shards_dir) else _index_bytes(path)
        return path, json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, or a huge number
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {storage.safe_text(exc)}): check data.shards, "
                        "or rebuild the shard set with `cxrdist shard ...`") from None


def _index_bytes(location: str) -> bytes:
    return storage.read_bytes(location, storage.MAX_INDEX_BYTES,
                              f"an index.json holds at most {storage.MAX_INDEX_BYTES >> 20} MiB: check that the "
                              "location is a shard set")


def _optional_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _shown(value: Any) -> str:
    """A value from index.json as an error line shows it: quoted and escaped (repr), and short."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_names(path: str, index: ShardIndex) -> None:
    """Every split and shard entry is what the builder writes: splits test and fold0..fold{K-1}, shard names
    <split>-NNNNNN.tar with a sha256 and a size. Shard locations (a path, a URL, a pipe: command run by a shell)
    are built from these names, so anything else is refused before one is built."""
    def bad(what: str) -> DataError:
        return DataError(f"{path}: {what}: this is not an index the shard builder wrote; rebuild the shard set")

    if not isinstance(index.splits, dict) or not 1 <= index.folds <= len(index.splits):
        raise bad(f"{index.folds} folds and splits {_shown(index.splits)}")
    allowed = {TEST_SPLIT, *index.fold_names}
    seen: set[str] = set()
    for split, entry in index.splits.items():
        if split not in allowed:
            raise bad(f"split {_shown(split)} is neither {TEST_SPLIT} nor fold0..fold{index.folds - 1}")
        if not isinstance(entry, dict) or not _count(entry.get("count")) or not isinstance(entry.get("shards"), list) \
                or not _count(entry.get("groups", 0)) or not isinstance(entry.get("labels", {}), dict):
            raise bad(f"split {split} has no count and shard list, or a bad groups or labels field")
        for shard in entry["shards"]:
            name = shard.get("name") if isinstance(shard, dict) else None
            if not (isinstance(name, str) and name.startswith(f"{split}-") and name.endswith(".tar")
                    and SHARD_NUMBER.fullmatch(name[len(split) + 1:-len(".tar")])):
                raise bad(f"split {split} names shard {_shown(name if name is not None else shard)}, not "
                          f"{split}-NNNNNN.tar")
            if name in seen:
                raise bad(f"shard {name} is listed twice")
            seen.add(name)
            if not (_count(shard.get("count")) and _count(shard.get("bytes"))
                    and isinstance(shard.get("sha256"), str) and SHA256.fullmatch(shard["sha256"])):
                raise bad(f"shard {name} has no sample count, size and sha256")


def _check_fields(path: str, index: ShardIndex) -> None:
    """The free-form parts are of the types their readers expect; the latents record's fingerprint is the hex that
    cache-latents writes (an error line quotes it)."""
    for name in ("options", "counts", "rejects", "source_summary"):
        if not isinstance(getattr(index, name), dict):
            raise DataError(f"{path}: {name} is not a JSON object: rebuild the shard set")
    if not isinstance(index.source, str):
        raise DataError(f"{path}: source is not a string: rebuild the shard set")
    latents = index.latents
    if latents is not None and not (
            isinstance(latents, dict) and isinstance(latents.get("vae_fingerprint"), str)
            and VAE_FINGERPRINT.fullmatch(latents["vae_fingerprint"]) and isinstance(latents.get("base"), str)):
        raise DataError(f"{path}: the {LATENTS_KEY} record {_shown(latents)} is not one cache-latents writes: rerun "
                        "`cxrdist shard cache-latents`")


def load_index(shards_dir: str | os.PathLike) -> ShardIndex:
    """Read and sanity-check `<shards_dir>/index.json` (a folder, URL or pipe: command); DataError naming the file
    and the fix otherwise."""
    root = str(shards_dir) if storage.is_remote(shards_dir) else str(Path(storage.local_path(shards_dir)))
    path, data = _read_index(root)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a shard set index (not a JSON object): rebuild the shard set")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format version {_shown(version)}, this cxrdist reads {FORMAT_VERSION}: "
                        "rebuild the shard set with this version")
    try:
        index = ShardIndex(root=root, format_version=version, source=data["source"],
                           image_size=int(data["image_size"]), channels=int(data["channels"]),
                           bit_depth=int(data["bit_depth"]), folds=int(data["folds"]), seed=int(data["seed"]),
                           test_fraction=_optional_float(data["test_fraction"]), splits=data["splits"],
                           options=data.get("options", {}), counts=data.get("counts", {}),
                           rejects=data.get("rejects", {}), source_summary=data.get("source_summary", {}),
                           latents=data.get(LATENTS_KEY))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path} is missing or has a bad field ({type(exc).__name__}: {_shown(str(exc))}): rebuild "
                        "the shard set") from None
    _check_names(path, index)
    _check_fields(path, index)
    return index


def _refuse_pending_latents_swap(index: ShardIndex) -> None:
    """A cache-latents stopped mid-swap leaves shards that index.json does not describe yet: say how to finish it
    rather than calling the shards damaged. (load_index itself must not refuse: the rerun that finishes the swap
    reads the index first.)"""
    from cxrdist.data.latents import interrupted_swap_message

    if (message := interrupted_swap_message(index.root)) is not None:
        raise DataError(message)


def verify_checksums(index: ShardIndex | str | os.PathLike, splits: Optional[Iterable[str]] = None, *,
                     full: bool = True, raise_on_error: bool = True) -> list[str]:
    """Check every shard of `splits` (default: all) exists, has the recorded size and (full) sha256.

    Returns the list of problems (empty when all is well); raises DataError on the first problem when
    `raise_on_error`.
    """
    if not isinstance(index, ShardIndex):
        index = load_index(index)
    _refuse_pending_latents_swap(index)
    problems = []
    for entry in index.shards(list(splits) if splits is not None else list(index.splits)):
        problem = _remote_problem(entry, full) if index.remote else _local_problem(entry, full)
        if problem is None:
            continue
        if raise_on_error:
            raise DataError(problem)
        problems.append(problem)
    return problems


def _special_shard(path: Path) -> str | None:
    """What is wrong with a shard path that is a FIFO, device or socket: never opened (a FIFO blocks the open, a
    device never ends). None for anything else."""
    kind = special_file_kind(path)
    return None if kind is None else f"{path} is {kind}, not a shard file: restore the shard (or rebuild the shard set)"


def _local_problem(entry: dict[str, Any], full: bool) -> str | None:
    path = Path(entry["path"])
    if (problem := _special_shard(path)) is not None:
        return problem
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
        digest, size = storage.sha256_stream(entry["path"], entry.get("bytes"))
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
    _refuse_pending_latents_swap(index)
    for entry in index.shards(splits):
        if only is not None and entry["path"] not in only:
            continue
        path = Path(entry["path"])
        if (problem := _special_shard(path)) is not None:
            raise DataError(problem)
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
    return load_index(shards_dir).latents


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
