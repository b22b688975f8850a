"""Is the result usable? A build fails (BuildRejected) on an empty split or on more rejects than
--max-reject-fraction, and then removes what it wrote, so the corrected rerun starts in a clean folder.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Sequence

from cxrdist.data.index import PARTS_DIR, REJECTS_NAME
from cxrdist.data.sharding.layout import PLAN_NAME, stats_path
from cxrdist.errors import DataError


class BuildRejected(DataError):
    """The build ran but made no usable shard set (an empty split, too many rejects)."""


def top_reasons(rejects: Sequence[dict], n: int = 3) -> str:
    counts = Counter(r["reason"] for r in rejects)
    return ", ".join(f"{reason} {count}" for reason, count in counts.most_common(n))


class RejectBudget:
    """Every reject of the build so far, against --max-reject-fraction of its inputs. Rejects only grow during a
    build, so the check may run after every shard: a wrong --root fails half-way, not at the end, and exactly."""

    def __init__(self, out: Path, inputs: int, limit: float, rejects: Sequence[dict]) -> None:
        self.out, self.inputs, self.limit = out, inputs, limit
        self.rejects = list(rejects)

    def add(self, rejects: Sequence[dict]) -> None:
        self.rejects.extend(rejects)
        self.check()

    def check(self) -> None:
        if self.inputs and len(self.rejects) > self.limit * self.inputs:
            raise BuildRejected(f"{self.out}: {len(self.rejects)} of {self.inputs} inputs rejected "
                                f"({top_reasons(self.rejects)}), more than --max-reject-fraction {self.limit:g}: "
                                "check the input paths (--root, --from) and files, then rerun (every reject is "
                                f"listed in {self.out / REJECTS_NAME})")


def check_splits(out: Path, splits: dict[str, dict], rejects: Sequence[dict]) -> None:
    empty = [name for name, split in splits.items() if not split["count"]]
    if empty:
        lost = [r for r in rejects if r.get("split") in empty]
        raise BuildRejected(f"{out}: split {', '.join(empty)} came out empty (its inputs were rejected: "
                            f"{top_reasons(lost) or 'none'}): check the inputs, then rerun (every reject is "
                            f"listed in {out / REJECTS_NAME})")


def roll_back(out: Path, written: Sequence[str], plan_is_new: bool) -> None:
    """Remove what a failed build wrote, so a corrected rerun is not refused; shards kept from before stay."""
    for name in written:
        (out / name).unlink(missing_ok=True)
        stats_path(out, name).unlink(missing_ok=True)
    if plan_is_new:  # the folder was not taken before this build: it must not be taken after it
        (out / PARTS_DIR / PLAN_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out / PARTS_DIR).rmdir()  # only when empty
