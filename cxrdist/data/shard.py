"""Source records -> preprocessed WebDataset shards per split, with index.json and rejects.jsonl.

Pipeline (img2dataset-like): reader (source.records / source.load) -> resizer (imageio) -> writer (tar).
- Splits are drawn per group (patient / report) from the seed: a test split and K folds of the rest.
- One task = one shard: a shard is written under `<name>.tmp`, renamed when complete, then its stats file
  `.parts/<name>.json` is written; that file is the resume marker. `--resume` skips shards that have one.
- Images are spread over the worker pool one by one (not shard by shard) so that two cores stay busy even
  when a split has a single shard; results come back in order, so output is independent of `workers`.
- Same inputs + seed -> byte-identical shards: tar headers carry fixed mtime/owner/mode, members are
  sorted, PNG encoding writes no timestamps.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from tqdm import tqdm

from cxrdist.data.imageio import BIT_DEPTHS, RESIZE_MODES, check_pixels, encode_png, resize_square
from cxrdist.data.index import (FORMAT_VERSION, INDEX_NAME, PARTS_DIR, REJECTS_NAME, TEST_SPLIT, fold_name,
                                sha256_file, shard_name, write_json_atomic)
from cxrdist.data.sources.base import Record, RecordRejected
from cxrdist.errors import DataError, InputError

log = logging.getLogger(__name__)
PLAN_NAME = "plan.json"


@dataclass
class ShardOptions:
    size: int = 256
    folds: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    shard_size: int = 1000
    workers: int = 0  # 0 = all cores
    resize_mode: str = "pad"  # pad (letterbox, keeps the whole image) | crop (centre crop)
    bit_depth: int = 8  # 8 | 16 bit PNG
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.size >= 8 and self.size % 8 == 0, "--size", "a multiple of 8, >= 8"),
            (self.folds >= 1, "--folds", ">= 1"),
            (0.0 <= self.test_fraction < 1.0, "--test-fraction", "in [0, 1)"),
            (self.shard_size >= 1, "--shard-size", ">= 1"),
            (self.workers >= 0, "--workers", ">= 0 (0 = all cores)"),
            (self.resize_mode in RESIZE_MODES, "--resize", " or ".join(RESIZE_MODES)),
            (self.bit_depth in BIT_DEPTHS, "--bit-depth", "8 or 16"),
        ]
        for ok, name, wanted in checks:
            if not ok:
                raise InputError(f"{name} must be {wanted}")

    def plan_key(self) -> dict[str, Any]:
        """The options that shape the output; a resumed build must match them."""
        data = asdict(self)
        for key in ("workers", "resume", "progress"):
            data.pop(key)
        return data


def assign_splits(groups: Sequence[str], folds: int, test_fraction: float, seed: int) -> dict[str, str]:
    """group -> split name. Sorted then seeded shuffle: the same groups and seed always give the same split."""
    ordered = sorted(set(groups))
    random.Random(seed).shuffle(ordered)
    n_test = int(round(test_fraction * len(ordered)))
    split = {group: TEST_SPLIT for group in ordered[:n_test]}
    for i, group in enumerate(ordered[n_test:]):
        split[group] = fold_name(i % folds)
    return split


def split_names(options: ShardOptions) -> list[str]:
    return ([TEST_SPLIT] if options.test_fraction > 0 else []) + [fold_name(k) for k in range(options.folds)]


@dataclass
class ShardTask:
    split: str
    name: str
    records: list[Record]


def plan_tasks(records: Sequence[Record], assignment: dict[str, str], options: ShardOptions) -> list[ShardTask]:
    tasks = []
    for split in split_names(options):
        members = [r for r in records if assignment[r.group] == split]
        for number, start in enumerate(range(0, len(members), options.shard_size)):
            tasks.append(ShardTask(split, shard_name(split, number), members[start:start + options.shard_size]))
    return tasks


# ---- worker side -------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(source, size: int, resize_mode: str, bit_depth: int) -> None:
    _WORKER.update(source=source, size=size, resize_mode=resize_mode, bit_depth=bit_depth)


def _process(item: tuple[Record, str]) -> tuple[str, Optional[dict[str, bytes]], str, str]:
    """(uid, sample or None, reject reason, detail). Never raises for a bad input."""
    record, split = item
    try:
        pixels = check_pixels(_WORKER["source"].load(record), record.uid)
        original = list(pixels.shape)
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
              "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    return record.uid, sample, "", ""


# ---- writer side -------------------------------------------------------------------------------------------
def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, {ext: bytes}) as `path` via a temp name; returns (sha256, bytes).

    tarfile directly rather than webdataset's TarWriter: every header field is fixed here (mtime 0, owner
    0/0, mode 0444), which the byte-identical guarantee needs, and the build stays free of a torch import.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, parts in samples:
                    for ext in sorted(parts):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size, info.mtime, info.mode = len(parts[ext]), 0, 0o444
                        tar.addfile(info, io.BytesIO(parts[ext]))
            handle.flush()
            os.fsync(handle.fileno())
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest, size


def _stats_path(out: Path, name: str) -> Path:
    return out / PARTS_DIR / (name[: -len(".tar")] + ".json")


def _write_shard(out: Path, task: ShardTask, results: list[tuple], started: float) -> dict[str, Any]:
    samples = [(uid, sample) for uid, sample, _, _ in results if sample is not None]
    digest, size = write_tar(out / task.name, samples)
    by_uid = {r.uid: r for r in task.records}
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
    write_json_atomic(_stats_path(out, task.name), stats)
    return stats


def _plan_record(source, records: Sequence[Record], assignment: dict[str, str], options: ShardOptions) -> dict:
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.uid, r.group, assignment[r.group], r.prompt, r.source_path, r.labels,
                                  r.view]).encode("utf-8"))
    return {"format_version": FORMAT_VERSION, "source": getattr(source, "name", "unknown"),
            "options": options.plan_key(), "records": len(records), "records_sha256": digest.hexdigest()}


def _prepare_out(out: Path, plan: dict, options: ShardOptions) -> None:
    try:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / PARTS_DIR / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to {out} ({exc.strerror or exc}): choose a writable --out") from None
    plan_path = out / PARTS_DIR / PLAN_NAME
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
    for leftover in out.glob("*.tmp"):  # half-written shards of a killed build: never trusted
        leftover.unlink()
    write_json_atomic(plan_path, plan)


def _pool_results(items: list[tuple[Record, str]], source, options: ShardOptions, workers: int) -> Iterator:
    args = (source, options.size, options.resize_mode, options.bit_depth)
    if workers <= 1 or len(items) <= 1:
        _init_worker(*args)  # in-process: no pickling, no IPC, so one worker costs nothing extra
        yield from map(_process, items)
        return
    # fork starts in milliseconds, but a parent that has imported torch holds OpenMP threads a forked
    # child can deadlock on: then spawn (slower start, each worker imports numpy/PIL afresh).
    use_fork = "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if use_fork else "spawn")
    chunk = max(1, min(16, len(items) // (workers * 8)))
    with context.Pool(workers, initializer=_init_worker, initargs=args) as pool:
        yield from pool.imap(_process, items, chunksize=chunk)


def _collect_records(source) -> tuple[list[Record], list[dict]]:
    records, rejects, seen = [], [], set()
    for record in source.records():
        if record.uid in seen or not record.uid or "." in record.uid:
            rejects.append({"id": record.uid, "reason": "bad_uid", "source_path": record.source_path,
                            "detail": "duplicate uid" if record.uid in seen else "empty uid or contains '.'"})
            continue
        seen.add(record.uid)
        records.append(record)
    listed = [{"id": ident, "reason": reason, "detail": detail} for ident, reason, detail in source.rejected()]
    return records, listed + rejects


def build_shards(source, out_dir: str | os.PathLike, options: Optional[ShardOptions] = None,
                 **overrides: Any) -> dict[str, Any]:
    """Build (or with resume=True, finish) a shard set; returns the index written to out_dir/index.json.

    `overrides` are ShardOptions fields (size, folds, test_fraction, seed, shard_size, workers,
    resize_mode, bit_depth, resume, progress).
    """
    options = options or ShardOptions()
    if overrides:
        options = ShardOptions(**{**asdict(options), **overrides})
    out = Path(out_dir)
    started = time.perf_counter()
    records, listing_rejects = _collect_records(source)
    if not records:
        raise DataError(f"source {getattr(source, 'name', '?')} produced no usable records "
                        f"({len(listing_rejects)} rejected): check the inputs")
    assignment = assign_splits([r.group for r in records], options.folds, options.test_fraction, options.seed)
    tasks = plan_tasks(records, assignment, options)
    _prepare_out(out, _plan_record(source, records, assignment, options), options)

    done = {t.name for t in tasks if _stats_path(out, t.name).is_file() and (out / t.name).is_file()}
    todo = [t for t in tasks if t.name not in done]
    items = [(record, task.split) for task in todo for record in task.records]
    workers = options.workers or os.cpu_count() or 1
    log.info("%d records in %d shards (%d already done), %d workers", len(records), len(tasks), len(done), workers)
    bar = tqdm(total=len(items), unit="img", desc=f"shard {out.name}", disable=not options.progress)
    results = _pool_results(items, source, options, workers)
    written = rejected = 0
    try:
        for task in todo:
            shard_started = time.perf_counter()
            batch = []
            for _ in task.records:
                batch.append(next(results))
                bar.update(1)
            stats = _write_shard(out, task, batch, shard_started)
            written, rejected = written + stats["count"], rejected + len(stats["rejects"])
            bar.set_postfix(written=written, rejected=rejected)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(f"disk full while writing {out}: free space and rerun with --resume "
                            f"(completed shards are kept)") from None
        raise
    finally:
        bar.close()
        results.close()  # stops the pool when a write failed half-way
    index = _write_index(out, source, tasks, options, listing_rejects, records)
    elapsed = time.perf_counter() - started
    # "run" is returned for the summary line but not stored: index.json depends on inputs and options only
    return {**index, "run": {"processed": len(items), "shards_written": len(todo), "shards_resumed": len(done),
                             "seconds": round(elapsed, 2), "workers": workers,
                             "images_per_second": round(len(items) / elapsed, 2) if elapsed > 0 else 0.0}}


def _write_index(out: Path, source, tasks: list[ShardTask], options: ShardOptions, listing_rejects: list[dict],
                 records: list[Record]) -> dict[str, Any]:
    splits: dict[str, dict[str, Any]] = {
        name: {"count": 0, "groups": 0, "shards": [], "labels": {}, "views": {}} for name in split_names(options)}
    rejects = list(listing_rejects)
    groups: dict[str, set[str]] = {name: set() for name in splits}
    for task in tasks:
        stats = json.loads(_stats_path(out, task.name).read_text(encoding="utf-8"))
        split = splits[task.split]
        split["count"] += stats["count"]
        groups[task.split].update(stats["groups"])  # a group may fill two shards of its split
        split["shards"].append({k: stats[k] for k in ("name", "count", "sha256", "bytes")})
        for key in ("labels", "views"):
            split[key] = dict(sorted((Counter(split[key]) + Counter(stats[key])).items()))
        rejects.extend(stats["rejects"])
    for name, split in splits.items():
        split["groups"] = len(groups[name])
    summary = getattr(source, "summary", None)
    index = {
        "format_version": FORMAT_VERSION, "source": getattr(source, "name", "unknown"),
        "image_size": options.size, "channels": 1, "bit_depth": options.bit_depth, "folds": options.folds,
        "seed": options.seed, "test_fraction": options.test_fraction, "options": options.plan_key(),
        "splits": splits,
        "counts": {"records": len(records), "written": sum(s["count"] for s in splits.values()),
                   "rejected": len(rejects)},
        "rejects": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "source_summary": summary() if callable(summary) else {},
    }
    tmp = out / (REJECTS_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for reject in rejects:
            handle.write(json.dumps(reject, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, out / REJECTS_NAME)
    write_json_atomic(out / INDEX_NAME, index)
    return index
