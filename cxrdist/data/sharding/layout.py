"""Where the builder's own files sit in a shard set, and how to find what a killed builder left of them.

Beside the shards and index.json, `.parts/` holds `plan.json` (what the build was asked for) and one stats file a
shard, `.parts/<shard stem>.json`, written once the shard is complete: the resume marker. Only what the builder
writes is ever removed: its temporary names for the planned files, never a user's `*.tmp` beside them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from cxrdist.data.index import INDEX_NAME, PARTS_DIR, REJECTS_NAME
from cxrdist.errors import InputError
from cxrdist.fileio import TEMP_SUFFIX, probe_writable

PLAN_NAME = "plan.json"


def stats_path(out: Path, name: str) -> Path:
    """`.parts/<shard stem>.json`: a shard's stats, the resume marker (cache-latents keeps its digest current)."""
    return out / PARTS_DIR / (name[: -len(".tar")] + ".json")


def read_stats(out: Path, name: str) -> dict[str, Any]:
    return json.loads(stats_path(out, name).read_text(encoding="utf-8"))


def temporaries_of(path: Path) -> list[Path]:
    """The temporary names cxrdist.fileio.temp_name gives `path` (`.<name>.<pid>-<hex>.cxrdist-tmp`) that exist
    beside it: what a killed writer of exactly that file left, and nothing a user named."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9]+-[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}")
    try:
        return [entry for entry in path.parent.iterdir() if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return []


def remove_our_temporaries(out: Path, shard_names: Sequence[str]) -> None:
    """Half-written files of a killed build of this plan: the temporary names of its planned shards, their stats,
    the plan, index.json and rejects.jsonl. Called under the folder's lock, so no live writer owns them."""
    targets = [out / name for name in shard_names] + [stats_path(out, name) for name in shard_names]
    targets += [out / INDEX_NAME, out / REJECTS_NAME, out / PARTS_DIR / PLAN_NAME]
    for name in shard_names:
        (out / (name + ".tmp")).unlink(missing_ok=True)  # what earlier versions wrote a shard under
    for target in targets:
        for leftover in temporaries_of(target):
            leftover.unlink(missing_ok=True)


def make_writable(out: Path) -> None:
    """Create `out/.parts` and check it takes files: a read-only --out fails in one line before the lock is taken."""
    try:
        probe_writable(out / PARTS_DIR)
    except OSError as exc:
        raise InputError(f"cannot write to {out} ({exc.strerror or exc}): choose a writable --out") from None
