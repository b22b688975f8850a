"""Source records -> preprocessed WebDataset shards per split, with index.json and rejects.jsonl.

Pipeline (img2dataset-like): reader (source.records / source.load) -> resizer (imageio) -> writer (tar).
- Splits are drawn per group (patient / report) from the seed: a test split and K folds of the rest.
- One task = one shard: a shard is written under a temporary name of this process (cxrdist.fileio.temp_name),
  renamed when complete, then its stats file `.parts/<name>.json` is written; that file is the resume marker.
  `--resume` keeps a shard only when its size and sha256 still match its stats (or the latents-era digest
  index.json records for it, after cache-latents), and rebuilds it otherwise. A resumed set that is already
  complete (index.json of the same plan, every shard matching it) is left alone.
- Only what the builder writes is ever removed: its own temporary names for the planned shards and its files,
  never a user's `*.tmp` beside them.
- An image sits in one split only: records that read the same file, or a byte-copy of an earlier file, are
  rejected (duplicate_path / duplicate_content) before the split, keeping the first in source order.
- One build per folder: `.cxrdist-build.lock` holds the builder's PID while it runs; cache-latents takes the
  same lock, so a build and a cache-latents never change one set at once.
- A build whose result is unusable (an empty split, or more rejects than --max-reject-fraction) fails and
  removes what it wrote, so the corrected rerun starts in a clean folder.
- The source is read twice (listing.py): once for the keys that decide splits and duplicates, once to fill
  the shards, which are written as they fill. No more than a shard per split and two shards in the pool
  are held, so a source of any length streams.
- Images are spread over the worker pool one by one (not shard by shard) so that two cores stay busy even
  when a split has a single shard; results come back in order, so output is independent of `workers`.
- Same inputs + seed -> byte-identical shards: tar headers carry fixed mtime/owner/mode, members are
  sorted, PNG encoding writes no timestamps.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import (BIT_DEPTHS, RESIZE_MODES, check_pixels, encode_png, original_shape,
                                  resize_square)
from cxrdist.data.index import (FORMAT_VERSION, INDEX_NAME, LATENTS_KEY, PARTS_DIR, REJECTS_NAME, TEST_SPLIT,
                                fold_name, shard_name)
from cxrdist.data.listing import (DUPLICATE_CONTENT, DUPLICATE_PATH, Listing, RecordKey, SourceChanged,
                                  list_records)
from cxrdist.data.sources.base import Record, RecordRejected
from cxrdist.data.tars import write_tar
from cxrdist.errors import DataError, InputError
from cxrdist.fileio import (TEMP_SUFFIX, is_disk_full, json_text, sha256_file, temp_name, write_json_atomic,
                            write_text_atomic)
from cxrdist.locks import folder_lock
from cxrdist.progress import progress_meter

log = logging.getLogger(__name__)
PLAN_NAME = "plan.json"
LOCK_NAME = ".cxrdist-build.lock"


DEFAULT_TEST_FRACTION = 0.2
OFFICIAL_TEST_FRACTION = ("--test-fraction does not apply with --official-split: the data set's own test split is "
                          "used; pass --no-official-split to draw a test split by patient")


@dataclass
class ShardOptions:
    size: int = 256
    folds: int = 5
    test_fraction: Optional[float] = None  # None: DEFAULT_TEST_FRACTION, or nothing drawn with official_split
    seed: int = 0
    shard_size: int = 1000
    workers: int = 0  # 0 = all cores
    resize_mode: str = "pad"  # pad (letterbox, keeps the whole image) | crop (centre crop)
    bit_depth: int = 8  # 8 | 16 bit PNG
    resume: bool = False
    progress: bool = True
    max_reject_fraction: float = 0.5  # more rejects than this share of the inputs fails the build
    official_split: bool = False  # the source's test split (Record.split) replaces --test-fraction

    def __post_init__(self) -> None:
        if self.official_split and self.test_fraction is not None:
            raise InputError(OFFICIAL_TEST_FRACTION)  # it would be silently ignored
        checks = [
            (self.size >= 8 and self.size % 8 == 0, "--size", "a multiple of 8, >= 8"),
            (self.folds >= 1, "--folds", ">= 1"),
            (self.test_fraction is None or 0.0 <= self.test_fraction < 1.0, "--test-fraction", "in [0, 1)"),
            (self.shard_size >= 1, "--shard-size", ">= 1"),
            (self.workers >= 0, "--workers", ">= 0 (0 = all cores)"),
            (self.resize_mode in RESIZE_MODES, "--resize", " or ".join(RESIZE_MODES)),
            (self.bit_depth in BIT_DEPTHS, "--bit-depth", "8 or 16"),
            (0.0 <= self.max_reject_fraction <= 1.0, "--max-reject-fraction", "in [0, 1]"),
            (0 <= self.seed <= 2**63 - 1, "--seed", "in 0..2**63-1"),  # what numpy and torch generators take
        ]
        for ok, name, wanted in checks:
            if not ok:
                raise InputError(f"{name} must be {wanted}")

    @property
    def drawn_test_fraction(self) -> Optional[float]:
        """The share of groups drawn into the test split; None with the official split (nothing is drawn)."""
        if self.official_split:
            return None
        return DEFAULT_TEST_FRACTION if self.test_fraction is None else self.test_fraction

    def plan_key(self) -> dict[str, Any]:
        """The options that shape the output; a resumed build must match them."""
        data = {**asdict(self), "test_fraction": self.drawn_test_fraction}
        for key in ("workers", "resume", "progress", "max_reject_fraction"):
            data.pop(key)
        if not data["official_split"]:
            data.pop("official_split")  # plans and indexes written before the option existed still match
        return data


def assign_splits(groups: Sequence[str], folds: int, test_fraction: Optional[float], seed: int,
                  test_groups: Optional[set[str]] = None) -> dict[str, str]:
    """group -> split name. Sorted then seeded shuffle: the same groups and seed always give the same split.

    With `test_groups` (an official split) those groups are the test split and `test_fraction` is not used;
    the folds are drawn from the other groups as before.
    """
    ordered = sorted(set(groups))
    if test_groups is None:
        random.Random(seed).shuffle(ordered)
        n_test = int(round(test_fraction * len(ordered)))
        test, rest = ordered[:n_test], ordered[n_test:]
    else:
        test = [group for group in ordered if group in test_groups]
        rest = [group for group in ordered if group not in test_groups]
        random.Random(seed).shuffle(rest)
    split = {group: TEST_SPLIT for group in test}
    for i, group in enumerate(rest):
        split[group] = fold_name(i % folds)
    return split


def split_names(options: ShardOptions) -> list[str]:
    has_test = options.official_split or options.drawn_test_fraction > 0
    return ([TEST_SPLIT] if has_test else []) + [fold_name(k) for k in range(options.folds)]


def _official_test_groups(records: Sequence[RecordKey]) -> set[str]:
    """Groups with an image in the official test split. A group (patient) with images on both sides goes to
    test whole: splitting it would put one patient in test and in training."""
    groups = {r.group for r in records if r.split == TEST_SPLIT}
    moved = sum(1 for r in records if r.group in groups and r.split != TEST_SPLIT)
    if moved:
        log.warning("%d images outside the official test split belong to patients (groups) inside it: they go "
                    "to the test split too, so no patient is in both", moved)
    return groups


@dataclass
class ShardTask:
    split: str
    name: str
    count: int  # records planned for it (rejects among them are only known once it is written)


def plan_tasks(records: Sequence[RecordKey], assignment: dict[str, str], options: ShardOptions) -> list[ShardTask]:
    """Every shard of the build, split by split: a split's records in source order, `shard_size` a shard."""
    members = Counter(assignment[r.group] for r in records)
    tasks = []
    for split in split_names(options):
        for number, start in enumerate(range(0, members[split], options.shard_size)):
            tasks.append(ShardTask(split, shard_name(split, number), min(options.shard_size, members[split] - start)))
    return tasks


def filled_shards(records: Iterator[Record], assignment: dict[str, str],
                  options: ShardOptions) -> Iterator[tuple[str, list[Record]]]:
    """(shard name, its records) as each shard fills up, from the records in source order; the same shards
    as plan_tasks, in the order they complete. One shard's worth of records per split is held at a time."""
    filling: dict[str, list[Record]] = {split: [] for split in split_names(options)}
    numbers = Counter()
    for record in records:
        split = assignment[record.group]
        filling[split].append(record)
        if len(filling[split]) == options.shard_size:
            yield shard_name(split, numbers[split]), filling[split]
            filling[split], numbers[split] = [], numbers[split] + 1
    for split, rest in filling.items():
        if rest:
            yield shard_name(split, numbers[split]), rest


# ---- worker side -------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _takes_fit(load: Callable) -> bool:
    """Whether a source's load() accepts `fit=(size, mode)`, the hint that lets large JPEGs decode downscaled."""
    try:
        return "fit" in inspect.signature(load).parameters
    except (TypeError, ValueError):
        return False


def _init_worker(source, size: int, resize_mode: str, bit_depth: int) -> None:
    _WORKER.update(source=source, size=size, resize_mode=resize_mode, bit_depth=bit_depth,
                   fit=(size, resize_mode) if _takes_fit(source.load) else None)


def _process(item: tuple[Record, str]) -> tuple[str, Optional[dict[str, bytes]], str, str]:
    """(uid, sample or None, reject reason, detail). Never raises for a bad input."""
    record, split = item
    try:
        fit = _WORKER["fit"]
        loaded = _WORKER["source"].load(record, fit=fit) if fit else _WORKER["source"].load(record)
        original = list(original_shape(loaded)) if isinstance(loaded, np.ndarray) else None
        pixels = check_pixels(loaded, record.uid)
        original = original or list(pixels.shape)
        pixels = resize_square(pixels, _WORKER["size"], _WORKER["resize_mode"])
        png = encode_png(pixels, _WORKER["bit_depth"])
    except RecordRejected as exc:
        return record.uid, None, exc.reason, exc.detail
    except Exception as exc:  # a bad input must not stop the build; the reason names the failure
        return record.uid, None, "load_error", f"{type(exc).__name__}: {exc}"
    meta = {"uid": record.uid, "group": record.group, "split": split, "view": record.view,
            "labels": list(record.labels), "source": record.source, "source_path": record.source_path,
            "original_size": original, "size": _WORKER["size"], "extra": record.extra}
    sample = {"png": png, "txt": record.prompt.encode("utf-8"),
              "json": json_text(meta, sort_keys=True).encode("utf-8")}
    return record.uid, sample, "", ""


# ---- writer side -------------------------------------------------------------------------------------------
def stats_path(out: Path, name: str) -> Path:
    """`.parts/<shard stem>.json`: a shard's stats, the resume marker (cache-latents keeps its digest current)."""
    return out / PARTS_DIR / (name[: -len(".tar")] + ".json")


def temporaries_of(path: Path) -> list[Path]:
    """The temporary names cxrdist.fileio.temp_name gives `path` (`.<name>.<pid>-<hex>.cxrdist-tmp`) that exist
    beside it: what a killed writer of exactly that file left, and nothing a user named."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9]+-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")
    try:
        return [entry for entry in path.parent.iterdir() if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return []


def _remove_our_temporaries(out: Path, tasks: Sequence[ShardTask]) -> None:
    """Half-written files of a killed build of this plan: the temporary names of its planned shards, their stats,
    the plan, index.json and rejects.jsonl. Called under the folder's lock, so no live writer owns them."""
    targets = [out / task.name for task in tasks] + [stats_path(out, task.name) for task in tasks]
    targets += [out / INDEX_NAME, out / REJECTS_NAME, out / PARTS_DIR / PLAN_NAME]
    for task in tasks:
        (out / (task.name + ".tmp")).unlink(missing_ok=True)  # what earlier versions wrote a shard under
    for target in targets:
        for leftover in temporaries_of(target):
            leftover.unlink(missing_ok=True)


def _write_shard(out: Path, task: ShardTask, records: Sequence[Record], results: list[tuple],
                 started: float) -> dict[str, Any]:
    samples = [(uid, sample) for uid, sample, _, _ in results if sample is not None]
    digest, size = write_tar(out / task.name, samples)
    by_uid = {r.uid: r for r in records}
    labels = Counter(label for uid, _ in samples for label in by_uid[uid].labels)
    views = Counter(by_uid[uid].view or "unknown" for uid, _ in samples)
    stats = {
        "name": task.name, "split": task.split, "count": len(samples), "sha256": digest, "bytes": size,
        "groups": sorted({by_uid[uid].group for uid, _ in samples}),
        "labels": dict(sorted(labels.items())), "views": dict(sorted(views.items())),
        "rejects": [{"id": uid, "reason": reason, "detail": detail, "split": task.split,
                     "source_path": by_uid[uid].source_path}
                    for uid, sample, reason, detail in results if sample is None],
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(stats_path(out, task.name), stats)
    return stats


def _plan_record(listing: Listing, options: ShardOptions) -> dict:
    """What a resumed build must match. The split is not in it: the records and options decide it."""
    return {"format_version": FORMAT_VERSION, "source": listing.source_name, "options": options.plan_key(),
            "records": len(listing.keys), "records_sha256": listing.sha256}


def _make_writable(out: Path) -> None:
    try:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = temp_name(out / PARTS_DIR / "write-test")  # per process: a second build may probe too
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {out} ({exc.strerror or exc}): choose a writable --out") from None


def _prepare_out(out: Path, plan: dict, options: ShardOptions, tasks: Sequence[ShardTask]) -> bool:
    """Check the folder may take this build, remove what a killed build of it left half-written, and record its
    plan; True when it continues the same plan."""
    plan_path = out / PARTS_DIR / PLAN_NAME
    previous: dict = {}
    if plan_path.is_file() or (out / INDEX_NAME).is_file():
        if not options.resume:
            raise DataError(f"{out} already holds a shard set or an interrupted build: pass --resume to "
                            "continue it, or choose an empty folder")
        previous = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else {}
        if previous and previous != plan:
            changed = sorted(k for k in set(previous["options"]) | set(plan["options"])
                             if previous["options"].get(k) != plan["options"].get(k))
            what = f"options {', '.join(changed)}" if changed else "the input records"
            raise DataError(f"cannot resume {out}: {what} differ from the interrupted build; rerun with the "
                            "same inputs and options, or build into an empty folder")
    _remove_our_temporaries(out, tasks)
    write_json_atomic(plan_path, plan)
    return bool(previous)


# ---- one build per folder ----------------------------------------------------------------------------------
# Two builds in one --out write and delete the same temporary names, and a cache-latents rewrites the shards a
# build is checking: whichever comes second must stop before touching the folder.
def build_lock(out: Path, elsewhere: str = "--out") -> contextlib.AbstractContextManager:
    """Hold `out/.cxrdist-build.lock` (cxrdist.locks) while the body runs: taken by a build and by cache-latents."""
    return folder_lock(out, LOCK_NAME, busy="in use", wait="that shard build or cache-latents",
                       elsewhere=elsewhere, error=DataError)


# ---- which shards a resumed build keeps --------------------------------------------------------------------
def _read_stats(out: Path, name: str) -> dict[str, Any]:
    return json.loads(stats_path(out, name).read_text(encoding="utf-8"))


def _shard_problem(out: Path, task: ShardTask, latents_era: dict[str, dict]) -> Optional[str]:
    """None when the shard may be kept, "" when it was never completed, else what is wrong with it.

    A shard that cache-latents rewrote no longer matches the stats its build wrote, but matches the digest
    index.json records for it beside the latents: that shard is kept, and its stats brought up to date."""
    tar = out / task.name
    if not stats_path(out, task.name).is_file():
        return ""
    try:
        stats = _read_stats(out, task.name)
    except (OSError, ValueError):
        return "its stats file is unreadable"
    if not isinstance(stats, dict):
        return "its stats file is unreadable"
    if not tar.is_file():
        return "the shard file is missing"
    if stats.get("name") != task.name or stats.get("split") != task.split:
        return "its stats belong to another shard"
    size, digest = tar.stat().st_size, None
    if size == stats.get("bytes"):
        digest = sha256_file(tar)
        if digest == stats.get("sha256"):
            return None
    era = latents_era.get(task.name, {})
    if size == era.get("bytes") and (digest or sha256_file(tar)) == era.get("sha256"):
        write_json_atomic(stats_path(out, task.name), {**stats, "sha256": era["sha256"], "bytes": era["bytes"]})
        return None
    if size != stats.get("bytes"):
        return f"it has {size} bytes, its stats say {stats.get('bytes')}"
    return "its sha256 differs from its stats"


def _kept_shards(out: Path, tasks: Sequence[ShardTask],
                 latents_era: dict[str, dict]) -> tuple[set[str], list[str]]:
    """(shards kept as they are, damaged shards to rebuild): a kept shard is re-checked, never trusted."""
    kept, damaged = set(), []
    for task in tasks:
        problem = _shard_problem(out, task, latents_era)
        if problem is None:
            kept.add(task.name)
            continue
        if problem:
            log.warning("%s: %s; rebuilding it", out / task.name, problem)
            damaged.append(task.name)
        stats_path(out, task.name).unlink(missing_ok=True)  # an interrupted rebuild must not trust it either
    return kept, damaged


def _previous_index(out: Path) -> dict[str, Any]:
    """index.json as the folder holds it (a finished set, perhaps with cached latents), or {}."""
    try:
        data = json.loads((out / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _index_shards(index: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shard entry of an index.json's splits; [] when they are not the lists the builder writes."""
    splits = index.get("splits")
    if not isinstance(splits, dict):
        return []
    entries = [shard for split in splits.values() if isinstance(split, dict)
               for shard in (split.get("shards") if isinstance(split.get("shards"), list) else [])]
    return [entry for entry in entries if isinstance(entry, dict)]


def _already_complete(out: Path, previous: dict[str, Any], tasks: Sequence[ShardTask],
                      options: ShardOptions) -> bool:
    """Whether index.json describes this plan's finished set and every shard and its stats still match it
    (cache-latents updates all three together, so a set with latents counts): then a resume has nothing to do."""
    if previous.get("format_version") != FORMAT_VERSION or previous.get("options") != options.plan_key():
        return False
    entries = {str(entry.get("name")): entry for entry in _index_shards(previous)}
    if sorted(entries) != sorted(task.name for task in tasks):
        return False
    for task in tasks:
        entry, tar = entries[task.name], out / task.name
        try:
            stats = _read_stats(out, task.name)
        except (OSError, ValueError):
            return False
        if not isinstance(stats, dict) or [stats.get(k) for k in ("name", "split", "sha256", "bytes")] != \
                [task.name, task.split, entry.get("sha256"), entry.get("bytes")]:
            return False
        if not tar.is_file() or tar.stat().st_size != entry.get("bytes") or sha256_file(tar) != entry.get("sha256"):
            return False
    return True


# ---- is the result usable? ---------------------------------------------------------------------------------
class BuildRejected(DataError):
    """The build ran but made no usable shard set (an empty split, too many rejects)."""


def top_reasons(rejects: Sequence[dict], n: int = 3) -> str:
    counts = Counter(r["reason"] for r in rejects)
    return ", ".join(f"{reason} {count}" for reason, count in counts.most_common(n))


def _check_groups(assignment: dict[str, str], options: ShardOptions) -> None:
    """Fail before anything is written when there are too few groups to give every split one."""
    filled = Counter(assignment.values())
    empty = [name for name in split_names(options) if not filled[name]]
    if options.official_split and TEST_SPLIT in empty:
        raise DataError("no input is in the official test split (or every one was rejected): add the test "
                        "images, or draw a test split from --test-fraction with --no-official-split")
    if empty:
        raise DataError(f"{len(assignment)} groups leave split {', '.join(empty)} empty (--test-fraction "
                        f"{options.drawn_test_fraction:g}, --folds {options.folds}): lower --folds or "
                        "--test-fraction, or add inputs")


def _check_rejects(out: Path, rejects: Sequence[dict], inputs: int, options: ShardOptions) -> None:
    """Rejects only grow during a build, so this may be asked after every shard: failing early is exact."""
    limit = options.max_reject_fraction
    if inputs and len(rejects) > limit * inputs:
        raise BuildRejected(f"{out}: {len(rejects)} of {inputs} inputs rejected ({top_reasons(rejects)}), "
                            f"more than --max-reject-fraction {limit:g}: check the input paths (--root, "
                            f"--from) and files, then rerun (every reject is listed in {out / REJECTS_NAME})")


def _check_splits(out: Path, splits: dict[str, dict], rejects: Sequence[dict]) -> None:
    empty = [name for name, split in splits.items() if not split["count"]]
    if empty:
        lost = [r for r in rejects if r.get("split") in empty]
        raise BuildRejected(f"{out}: split {', '.join(empty)} came out empty (its inputs were rejected: "
                            f"{top_reasons(lost) or 'none'}): check the inputs, then rerun (every reject is "
                            f"listed in {out / REJECTS_NAME})")


def _roll_back(out: Path, written: Sequence[str], plan_is_new: bool) -> None:
    """Remove what a failed build wrote, so a corrected rerun is not refused; shards kept from before stay."""
    for name in written:
        (out / name).unlink(missing_ok=True)
        stats_path(out, name).unlink(missing_ok=True)
    if plan_is_new:  # the folder was not taken before this build: it must not be taken after it
        (out / PARTS_DIR / PLAN_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out / PARTS_DIR).rmdir()  # only when empty


@contextlib.contextmanager
def _worker_pool(source, options: ShardOptions, workers: int) -> Iterator[Callable[[list], Iterator]]:
    """A function that turns (record, split) items into _process results, in order, lazily."""
    args = (source, options.size, options.resize_mode, options.bit_depth)
    if workers <= 1:
        _init_worker(*args)  # in-process: no pickling, no IPC, so one worker costs nothing extra
        yield lambda items: map(_process, items)
        return
    # fork starts in milliseconds, but a parent that has imported torch holds OpenMP threads a forked
    # child can deadlock on: then spawn (slower start, each worker imports numpy/PIL afresh).
    use_fork = "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if use_fork else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=args) as pool:
        yield lambda items: pool.imap(_process, items, chunksize=max(1, min(16, len(items) // (workers * 8))))


def build_shards(source, out_dir: str | os.PathLike, options: Optional[ShardOptions] = None,
                 **overrides: Any) -> dict[str, Any]:
    """Build (or with resume=True, finish) a shard set; returns the index written to out_dir/index.json.

    `overrides` are ShardOptions fields (size, folds, test_fraction, seed, shard_size, workers,
    resize_mode, bit_depth, resume, progress, max_reject_fraction). A source with `official_split` sets it,
    and then refuses a test_fraction. Raises DataError (BuildRejected when the result is unusable: then no
    index.json is written and this build's shards are removed).
    """
    options = options or ShardOptions()
    if overrides:
        options = ShardOptions(**{**asdict(options), **overrides})
    if getattr(source, "official_split", False) and not options.official_split:
        options = ShardOptions(**{**asdict(options), "official_split": True})
    out = Path(out_dir)
    started = time.perf_counter()
    workers = options.workers or os.cpu_count() or 1
    listing = list_records(source, workers)
    if not listing.keys:
        raise DataError(f"source {listing.source_name} produced no usable records "
                        f"({len(listing.rejects)} rejected: {top_reasons(listing.rejects) or 'none'}): "
                        "check the inputs")
    # the one place records meet their split: duplicates are gone, so an image can sit in one split only
    test_groups = _official_test_groups(listing.keys) if options.official_split else None
    assignment = assign_splits([r.group for r in listing.keys], options.folds, options.drawn_test_fraction,
                               options.seed, test_groups)
    _check_groups(assignment, options)
    tasks = plan_tasks(listing.keys, assignment, options)
    _make_writable(out)
    with build_lock(out):
        index, run = _build_locked(source, out, listing, assignment, tasks, options, workers)
    elapsed = time.perf_counter() - started
    # "run" is returned for the summary line but not stored: index.json depends on inputs and options only
    return {**index, "run": {**run, "seconds": round(elapsed, 2), "workers": workers,
                             "images_per_second": round(run["processed"] / elapsed, 2) if elapsed > 0 else 0.0}}


def _build_locked(source, out: Path, listing: Listing, assignment: dict[str, str], tasks: list[ShardTask],
                  options: ShardOptions, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    swapped = _finish_latents_swap(out) if options.resume else 0
    resuming = _prepare_out(out, _plan_record(listing, options), options, tasks)
    previous = _previous_index(out) if resuming else {}
    if resuming and _already_complete(out, previous, tasks, options):
        log.info("%s is already complete: every shard matches index.json", out)
        return previous, {"processed": 0, "shards_written": 0, "shards_resumed": len(tasks), "shards_rebuilt": 0,
                          "already_complete": True, "latents_swap_finished": swapped}
    latents = previous.get(LATENTS_KEY)
    latents_era = {entry["name"]: entry for entry in _index_shards(previous)} if latents else {}
    done, damaged = _kept_shards(out, tasks, latents_era) if resuming else (set(), [])
    todo = [t for t in tasks if t.name not in done]
    if todo:  # index.json means "complete", which the set is not while shards are (re)written
        (out / INDEX_NAME).unlink(missing_ok=True)
    log.info("%d records in %d shards (%d kept, %d damaged ones rebuilt), %d workers", len(listing.keys),
             len(tasks), len(done), len(damaged), workers)
    inputs = len(listing.keys) + len(listing.rejects)
    rejects = list(listing.rejects) + [r for t in tasks if t.name in done
                                       for r in _read_stats(out, t.name)["rejects"]]
    written: list[str] = []

    def after_shard(stats: dict[str, Any]) -> None:
        written.append(stats["name"])
        rejects.extend(stats["rejects"])
        _check_rejects(out, rejects, inputs, options)  # a wrong --root fails half-way, not at the end

    try:
        _check_rejects(out, rejects, inputs, options)
        _write_tasks(source, out, listing, assignment, todo, options, workers, after_shard)
        splits, rejects = _gather(out, tasks, options, listing.rejects)
        _check_splits(out, splits, rejects)
    except BuildRejected:
        _roll_back(out, written, plan_is_new=not resuming)
        _write_rejects(out, rejects)
        raise
    except SourceChanged:  # what was written follows a split drawn from other records
        _roll_back(out, written, plan_is_new=not resuming)
        raise
    # Latents stay recorded only while every shard still carries them: a rebuilt shard has none.
    keep_latents = latents if latents and not todo else None
    index = _write_index(out, source, options, splits, rejects, len(listing.keys), listing.dedupe, keep_latents)
    processed = sum(t.count for t in todo)
    return index, {"processed": processed, "shards_written": len(todo), "shards_resumed": len(done),
                   "shards_rebuilt": len(damaged), "latents_swap_finished": swapped,
                   "latents_dropped": bool(latents and todo)}


def _finish_latents_swap(out: Path) -> int:
    """Finish a cache-latents that was stopped while swapping its shards in (see cxrdist.data.latents); the number
    of shards it swapped in, 0 when there was none. Imported here only: latents needs numpy and the VAE code."""
    from cxrdist.data.latents import settle_interrupted_cache

    finished = settle_interrupted_cache(out)
    return finished["shards"] if finished else 0


def _write_tasks(source, out: Path, listing: Listing, assignment: dict[str, str], todo: list[ShardTask],
                 options: ShardOptions, workers: int, on_shard: Callable[[dict[str, Any]], None]) -> None:
    """Process and write the shards of `todo` as the second reading of the source fills them; `on_shard(stats)`
    after each one. Two shards are in the pool at a time, so the workers never wait for the writer and at most
    two shards' images are in memory."""
    if not todo:  # a resumed build whose shards are all kept: no second reading, no pool
        return
    wanted = {task.name: task for task in todo}
    bar = progress_meter(sum(t.count for t in todo), unit="img", desc=f"shard {out.name}",
                         disable=not options.progress)
    written = rejected = 0

    def finish(task: ShardTask, records: list[Record], results: Iterator, started: float) -> None:
        nonlocal written, rejected
        batch = []
        for result in results:
            batch.append(result)
            bar.update(1)
        stats = _write_shard(out, task, records, batch, started)
        written, rejected = written + stats["count"], rejected + len(stats["rejects"])
        bar.set_postfix(written=written, rejected=rejected)
        on_shard(stats)

    try:
        with bar, _worker_pool(source, options, workers) as run:  # a failure leaves no closing progress line
            in_pool: deque = deque()
            for name, records in filled_shards(listing.stream(source), assignment, options):
                task = wanted.get(name)
                if task is None:  # kept from the interrupted build
                    continue
                in_pool.append((task, records, run([(record, task.split) for record in records]),
                                time.perf_counter()))
                if len(in_pool) > 1:
                    finish(*in_pool.popleft())
            while in_pool:
                finish(*in_pool.popleft())
    except OSError as exc:
        if is_disk_full(exc):
            raise DataError(f"disk full while writing {out}: free space and rerun with --resume "
                            f"(completed shards are kept)") from None
        raise


def _gather(out: Path, tasks: list[ShardTask], options: ShardOptions,
            listing_rejects: list[dict]) -> tuple[dict[str, dict[str, Any]], list[dict]]:
    """Per-split totals and every reject, from the shards' stats files (in task order: resume-independent)."""
    splits: dict[str, dict[str, Any]] = {
        name: {"count": 0, "groups": 0, "shards": [], "labels": {}, "views": {}} for name in split_names(options)}
    rejects = list(listing_rejects)
    groups: dict[str, set[str]] = {name: set() for name in splits}
    for task in tasks:
        stats = _read_stats(out, task.name)
        split = splits[task.split]
        split["count"] += stats["count"]
        groups[task.split].update(stats["groups"])  # a group may fill two shards of its split
        split["shards"].append({k: stats[k] for k in ("name", "count", "sha256", "bytes")})
        for key in ("labels", "views"):
            split[key] = dict(sorted((Counter(split[key]) + Counter(stats[key])).items()))
        rejects.extend(stats["rejects"])
    for name, split in splits.items():
        split["groups"] = len(groups[name])
    return splits, rejects


def _write_rejects(out: Path, rejects: Sequence[dict]) -> None:
    write_text_atomic(out / REJECTS_NAME,
                      "".join(json_text(reject, sort_keys=True) + "\n" for reject in rejects))


def _write_index(out: Path, source, options: ShardOptions, splits: dict[str, dict[str, Any]],
                 rejects: list[dict], records: int, dedupe: dict,
                 latents: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    summary = getattr(source, "summary", None)
    index = {
        "format_version": FORMAT_VERSION, "source": getattr(source, "name", "unknown"),
        "image_size": options.size, "channels": 1, "bit_depth": options.bit_depth, "folds": options.folds,
        # null with the official split: no fraction was drawn (options.official_split says which split was used)
        "seed": options.seed, "test_fraction": options.drawn_test_fraction, "options": options.plan_key(),
        "splits": splits,
        "counts": {"records": records, "written": sum(s["count"] for s in splits.values()),
                   "rejected": len(rejects),
                   "duplicates": dedupe[DUPLICATE_PATH] + dedupe[DUPLICATE_CONTENT]},
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "dedupe": dedupe,
        "source_summary": summary() if callable(summary) else {},
    }
    if latents:  # kept shards that all carry cache-latents' latents, resumed without a rebuild
        index[LATENTS_KEY] = latents
    _write_rejects(out, rejects)
    write_json_atomic(out / INDEX_NAME, index)
    return index
