"""Which code every rank runs and which only the main process runs, made visible and checked.

A collective (an all-reduce, a gather, a DeepSpeed ZeRO-3 parameter gather, a checkpoint save) returns only when
every rank has called it, in the same order. Called on the main process alone it waits for ranks that never come:
a hang until train.collective_timeout_s, and only on a multi-rank run. Two rules make the order visible:

- Functions and methods that run collectives carry `@all_ranks` (and, in the trainer, the `_all_ranks` suffix):
  every rank calls them at the same point.
- Work only the main process does (writing a file, an export, a log line) runs inside `main_process_only()`.
  An `@all_ranks` function called inside it raises at once, in any run, one process included, so a collective
  moved into main-process-only code fails the first test that reaches it instead of hanging a cluster job.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)

_local = threading.local()


class CollectiveOnOneRank(RuntimeError):
    """A function that runs collectives was called from code only the main process runs."""


@contextlib.contextmanager
def main_process_only() -> Iterator[None]:
    """The body runs on the main process only (the caller checks `is_main_process`): no collective inside."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def in_main_process_only() -> bool:
    return getattr(_local, "depth", 0) > 0


def all_ranks(function: F) -> F:
    """Mark `function` as one every rank must call at the same point (it runs collectives); refuse it inside
    `main_process_only()`."""

    @functools.wraps(function)
    def checked(*args, **kwargs):
        if in_main_process_only():
            raise CollectiveOnOneRank(f"{function.__qualname__} runs collectives on every rank, but was called from "
                                      "code only the main process runs: the other ranks would never join it")
        return function(*args, **kwargs)

    checked.all_ranks = True  # type: ignore[attr-defined]
    return checked  # type: ignore[return-value]
