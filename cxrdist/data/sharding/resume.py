"""Whether a folder may take this build, and what of an interrupted build of the same plan may be kept.

`--resume` keeps a shard only when its size and sha256 still match its stats (or the latents-era digest
index.json records for it, after cache-latents), and rebuilds it otherwise: a kept shard is re-checked, never
trusted. A resumed set that is already complete (index.json of the same plan, every shard matching it) is left
alone. Without --resume a folder that holds a set or an interrupted build is refused.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from cxrdist.data.index import FORMAT_VERSION, INDEX_NAME, LATENTS_KEY, PARTS_DIR
from cxrdist.data.listing import Listing
from cxrdist.data.sharding.layout import PLAN_NAME, read_stats, remove_our_temporaries, stats_path
from cxrdist.data.sharding.options import ShardOptions
from cxrdist.data.sharding.splits import ShardTask
from cxrdist.errors import DataError
from cxrdist.fileio import sha256_file, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Resume:
    """What the folder holds for this build, found under its lock before any shard is written."""
    resuming: bool  # the folder holds an interrupted or finished build of this same plan
    previous: dict[str, Any]  # its index.json, {} when none (or not resuming)
    complete: bool = False  # every shard matches index.json: nothing to do
    kept: set[str] = field(default_factory=set)  # shards that still match their stats
    damaged: list[str] = field(default_factory=list)  # shards that were complete once and no longer match
    latents_swap_finished: int = 0  # shards a stopped cache-latents swapped in now

    @property
    def latents(self) -> Optional[dict[str, Any]]:
        return self.previous.get(LATENTS_KEY)


def examine(out: Path, listing: Listing, options: ShardOptions, tasks: Sequence[ShardTask]) -> Resume:
    """Finish a stopped cache-latents, check the folder may take this plan (recording it), and find the shards
    an interrupted build of it left usable."""
    swapped = _finish_latents_swap(out) if options.resume else 0
    resuming = _prepare_out(out, _plan_record(listing, options), options, tasks)
    previous = _previous_index(out) if resuming else {}
    if resuming and _already_complete(out, previous, tasks, options):
        return Resume(True, previous, complete=True, latents_swap_finished=swapped)
    # a shard cache-latents rewrote matches the digest index.json records beside the latents, not its old stats
    latents_era = {entry["name"]: entry for entry in _index_shards(previous)} if previous.get(LATENTS_KEY) else {}
    kept, damaged = _kept_shards(out, tasks, latents_era) if resuming else (set(), [])
    return Resume(resuming, previous, kept=kept, damaged=damaged, latents_swap_finished=swapped)


def _plan_record(listing: Listing, options: ShardOptions) -> dict:
    """What a resumed build must match. The split is not in it: the records and options decide it."""
    return {"format_version": FORMAT_VERSION, "source": listing.source_name, "options": options.plan_key(),
            "records": len(listing.keys), "records_sha256": listing.sha256}


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
    remove_our_temporaries(out, [task.name for task in tasks])
    write_json_atomic(plan_path, plan)
    return bool(previous)


def _finish_latents_swap(out: Path) -> int:
    """Finish a cache-latents that was stopped while swapping its shards in (see cxrdist.data.latents); the number
    of shards it swapped in, 0 when there was none. Imported here only: latents needs numpy and the VAE code."""
    from cxrdist.data.latents import settle_interrupted_cache

    finished = settle_interrupted_cache(out)
    return finished["shards"] if finished else 0


def _shard_problem(out: Path, task: ShardTask, latents_era: dict[str, dict]) -> Optional[str]:
    """None when the shard may be kept, "" when it was never completed, else what is wrong with it.

    A shard that cache-latents rewrote no longer matches the stats its build wrote, but matches the digest
    index.json records for it beside the latents: that shard is kept, and its stats brought up to date."""
    tar = out / task.name
    if not stats_path(out, task.name).is_file():
        return ""
    try:
        stats = read_stats(out, task.name)
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
            stats = read_stats(out, task.name)
        except (OSError, ValueError):
            return False
        if not isinstance(stats, dict) or [stats.get(k) for k in ("name", "split", "sha256", "bytes")] != \
                [task.name, task.split, entry.get("sha256"), entry.get("bytes")]:
            return False
        if not tar.is_file() or tar.stat().st_size != entry.get("bytes") or sha256_file(tar) != entry.get("sha256"):
            return False
    return True
