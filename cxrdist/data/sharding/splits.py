"""Which split each group lands in, and the shards each split fills: pure functions of the keys and the options.

Splits are drawn per group (patient / report) from the seed: a test split (drawn, or the data set's official
one) and K folds of the rest. A split's records go to its shards in source order, `shard_size` a shard.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from cxrdist.data.index import TEST_SPLIT, fold_name, shard_name
from cxrdist.data.listing import RecordKey
from cxrdist.data.sharding.options import ShardOptions
from cxrdist.data.sources.base import Record
from cxrdist.errors import DataError

log = logging.getLogger(__name__)


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


def official_test_groups(records: Sequence[RecordKey]) -> set[str]:
    """Groups with an image in the official test split. A group (patient) with images on both sides goes to
    test whole: splitting it would put one patient in test and in training."""
    groups = {r.group for r in records if r.split == TEST_SPLIT}
    moved = sum(1 for r in records if r.group in groups and r.split != TEST_SPLIT)
    if moved:
        log.warning("%d images outside the official test split belong to patients (groups) inside it: they go "
                    "to the test split too, so no patient is in both", moved)
    return groups


def split_records(records: Sequence[RecordKey], options: ShardOptions) -> dict[str, str]:
    """group -> split for the de-duplicated records (so an image sits in one split only), checked to give every
    split a group before anything is written."""
    test_groups = official_test_groups(records) if options.official_split else None
    assignment = assign_splits([r.group for r in records], options.folds, options.drawn_test_fraction,
                               options.seed, test_groups)
    check_groups(assignment, options)
    return assignment


def check_groups(assignment: dict[str, str], options: ShardOptions) -> None:
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
