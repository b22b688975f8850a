"""Samples -> shard tars, each with its stats file; then the set's index.json and rejects.jsonl.

A shard is written under a temporary name of this process (cxrdist.fileio.temp_name), renamed when complete,
then its stats file `.parts/<name>.json` is written: that file is the resume marker. Same inputs + seed ->
byte-identical shards: tar headers carry fixed mtime/owner/mode, members are sorted, PNG encoding writes no
timestamps.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from cxrdist.data.index import FORMAT_VERSION, INDEX_NAME, LATENTS_KEY, REJECTS_NAME
from cxrdist.data.listing import DUPLICATE_CONTENT, DUPLICATE_PATH, Listing
from cxrdist.data.sharding.layout import read_stats, stats_path
from cxrdist.data.sharding.options import ShardOptions
from cxrdist.data.sharding.splits import ShardTask, filled_shards, split_names
from cxrdist.data.sharding.worker import Processed, WorkerContext, worker_pool
from cxrdist.data.sources.base import Record
from cxrdist.data.tars import write_tar
from cxrdist.errors import DataError
from cxrdist.fileio import is_disk_full, json_text, write_json_atomic, write_text_atomic
from cxrdist.progress import progress_meter


def write_shard(out: Path, task: ShardTask, records: Sequence[Record], results: Sequence[Processed],
                started: float) -> dict[str, Any]:
    """The tar of the kept samples, then its stats (counts, digest, rejects): the stats make it complete."""
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


@dataclass
class _InPool:
    task: ShardTask
    records: list[Record]
    results: Iterator[Processed]
    started: float


class _Progress:
    """The build's progress line: images processed, with the samples written and rejected so far."""

    def __init__(self, out: Path, images: int, enabled: bool) -> None:
        self.bar = progress_meter(images, unit="img", desc=f"shard {out.name}", disable=not enabled)
        self.written = self.rejected = 0

    def shard_done(self, stats: dict[str, Any]) -> None:
        self.written += stats["count"]
        self.rejected += len(stats["rejects"])
        self.bar.set_postfix(written=self.written, rejected=self.rejected)


def _finish(out: Path, shard: _InPool, progress: _Progress) -> dict[str, Any]:
    batch = []
    for result in shard.results:
        batch.append(result)
        progress.bar.update(1)
    stats = write_shard(out, shard.task, shard.records, batch, shard.started)
    progress.shard_done(stats)
    return stats


def write_shards(source, out: Path, listing: Listing, assignment: dict[str, str], todo: Sequence[ShardTask],
                 options: ShardOptions, workers: int) -> Iterator[dict[str, Any]]:
    """Process and write the shards of `todo` as the second reading of the source fills them, yielding each
    one's stats once it is written. Two shards are in the pool at a time, so the workers never wait for the
    writer and at most two shards' images are in memory. Close the generator when stopping early: that stops
    the pool."""
    if not todo:  # a resumed build whose shards are all kept: no second reading, no pool
        return
    wanted = {task.name: task for task in todo}
    progress = _Progress(out, sum(t.count for t in todo), options.progress)
    context = WorkerContext(source, options.size, options.resize_mode, options.bit_depth)
    try:
        # a failure (or closing early) leaves no closing progress line
        with progress.bar, worker_pool(context, workers) as run:
            in_pool: deque[_InPool] = deque()
            for name, records in filled_shards(listing.stream(source), assignment, options):
                task = wanted.get(name)
                if task is None:  # kept from the interrupted build
                    continue
                in_pool.append(_InPool(task, records, run([(record, task.split) for record in records]),
                                       time.perf_counter()))
                if len(in_pool) > 1:
                    yield _finish(out, in_pool.popleft(), progress)
            while in_pool:
                yield _finish(out, in_pool.popleft(), progress)
    except OSError as exc:
        if is_disk_full(exc):
            raise DataError(f"disk full while writing {out}: free space and rerun with --resume "
                            f"(completed shards are kept)") from None
        raise


def gather(out: Path, tasks: Sequence[ShardTask], options: ShardOptions,
           listing_rejects: list[dict]) -> tuple[dict[str, dict[str, Any]], list[dict]]:
    """Per-split totals and every reject, from the shards' stats files (in task order: resume-independent)."""
    splits: dict[str, dict[str, Any]] = {
        name: {"count": 0, "groups": 0, "shards": [], "labels": {}, "views": {}} for name in split_names(options)}
    rejects = list(listing_rejects)
    groups: dict[str, set[str]] = {name: set() for name in splits}
    for task in tasks:
        stats = read_stats(out, task.name)
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


def write_rejects(out: Path, rejects: Sequence[dict]) -> None:
    write_text_atomic(out / REJECTS_NAME,
                      "".join(json_text(reject, sort_keys=True) + "\n" for reject in rejects))


def write_index(out: Path, source, options: ShardOptions, splits: dict[str, dict[str, Any]],
                rejects: list[dict], records: int, dedupe: dict,
                latents: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """rejects.jsonl, then index.json: the set is complete once index.json exists."""
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
    write_rejects(out, rejects)
    write_json_atomic(out / INDEX_NAME, index)
    return index
