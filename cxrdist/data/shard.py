"""Source records -> preprocessed WebDataset shards per split, with index.json and rejects.jsonl: the build.

Pipeline (img2dataset-like): reader (source.records / source.load) -> resizer (imageio) -> writer (tar). This
module only composes the parts, each of which has a module of its own under cxrdist.data.sharding:
- listing (cxrdist.data.listing): the source is read twice, once for the keys that decide splits and
  duplicates, once to fill the shards. An image sits in one split only: records that read the same file, or a
  byte-copy of an earlier file, are rejected (duplicate_path / duplicate_content) before the split.
- sharding.splits: groups -> a test split and K folds, and the shards each split fills.
- sharding.lock: one build per folder (`.cxrdist-build.lock`, shared with cache-latents).
- sharding.resume: whether the folder may take the build, and what an interrupted one left usable.
- sharding.worker / sharding.writer: records -> samples in a pool -> shard tars as they fill. No more than a
  shard per split and two shards in the pool are held, so a source of any length streams.
- sharding.outcome: a build whose result is unusable (an empty split, or more rejects than
  --max-reject-fraction) fails and removes what it wrote, so the corrected rerun starts in a clean folder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from cxrdist.data.index import INDEX_NAME
from cxrdist.data.listing import Listing, SourceChanged, list_records
from cxrdist.data.sharding import resume, writer
from cxrdist.data.sharding.layout import make_writable, read_stats
from cxrdist.data.sharding.lock import build_lock
from cxrdist.data.sharding.options import ShardOptions
from cxrdist.data.sharding.outcome import BuildRejected, RejectBudget, check_splits, roll_back, top_reasons
from cxrdist.data.sharding.splits import ShardTask, plan_tasks, split_records
from cxrdist.errors import DataError

log = logging.getLogger(__name__)


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
        options = options.replaced(**overrides)
    if getattr(source, "official_split", False) and not options.official_split:
        options = options.replaced(official_split=True)
    out = Path(out_dir)
    started = time.perf_counter()
    workers = options.workers or os.cpu_count() or 1
    listing = list_records(source, workers)
    if not listing.keys:
        raise DataError(f"source {listing.source_name} produced no usable records "
                        f"({len(listing.rejects)} rejected: {top_reasons(listing.rejects) or 'none'}): "
                        "check the inputs")
    assignment = split_records(listing.keys, options)
    tasks = plan_tasks(listing.keys, assignment, options)
    make_writable(out)
    with build_lock(out):
        index, run = _build_locked(source, out, listing, assignment, tasks, options, workers)
    elapsed = time.perf_counter() - started
    # "run" is returned for the summary line but not stored: index.json depends on inputs and options only
    return {**index, "run": {**run, "seconds": round(elapsed, 2), "workers": workers,
                             "images_per_second": round(run["processed"] / elapsed, 2) if elapsed > 0 else 0.0}}


def _build_locked(source, out: Path, listing: Listing, assignment: dict[str, str], tasks: list[ShardTask],
                  options: ShardOptions, workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    found = resume.examine(out, listing, options, tasks)
    if found.complete:
        log.info("%s is already complete: every shard matches index.json", out)
        return found.previous, {"processed": 0, "shards_written": 0, "shards_resumed": len(tasks),
                                "shards_rebuilt": 0, "already_complete": True,
                                "latents_swap_finished": found.latents_swap_finished}
    todo = [t for t in tasks if t.name not in found.kept]
    if todo:  # index.json means "complete", which the set is not while shards are (re)written
        (out / INDEX_NAME).unlink(missing_ok=True)
    log.info("%d records in %d shards (%d kept, %d damaged ones rebuilt), %d workers", len(listing.keys),
             len(tasks), len(found.kept), len(found.damaged), workers)
    budget = RejectBudget(out, len(listing.keys) + len(listing.rejects), options.max_reject_fraction,
                          list(listing.rejects) + [r for t in tasks if t.name in found.kept
                                                   for r in read_stats(out, t.name)["rejects"]])
    rejects, written = budget.rejects, []
    try:
        budget.check()
        with contextlib.closing(writer.write_shards(source, out, listing, assignment, todo, options,
                                                    workers)) as shards:
            for stats in shards:
                written.append(stats["name"])
                budget.add(stats["rejects"])  # a wrong --root fails half-way, not at the end
        splits, rejects = writer.gather(out, tasks, options, listing.rejects)
        check_splits(out, splits, rejects)
    except BuildRejected:
        roll_back(out, written, plan_is_new=not found.resuming)
        writer.write_rejects(out, rejects)
        raise
    except SourceChanged:  # what was written follows a split drawn from other records
        roll_back(out, written, plan_is_new=not found.resuming)
        raise
    # Latents stay recorded only while every shard still carries them: a rebuilt shard has none.
    keep_latents = found.latents if found.latents and not todo else None
    index = writer.write_index(out, source, options, splits, rejects, len(listing.keys), listing.dedupe,
                               keep_latents)
    return index, {"processed": sum(t.count for t in todo), "shards_written": len(todo),
                   "shards_resumed": len(found.kept), "shards_rebuilt": len(found.damaged),
                   "latents_swap_finished": found.latents_swap_finished,
                   "latents_dropped": bool(found.latents and todo)}
