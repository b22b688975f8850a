"""One record -> one encoded sample, or the reason it was rejected; and the pool that does this over many.

Images are spread over the pool one by one (not shard by shard) so that two cores stay busy even when a split
has a single shard; results come back in order, so output is independent of `workers`. A bad input never
raises here: it comes back as a reject with its reason.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from cxrdist.data.imageio import check_pixels, encode_png, original_shape, resize_square
from cxrdist.data.sources.base import Record, RecordRejected, Source
from cxrdist.fileio import json_text


class Processed(NamedTuple):
    uid: str
    sample: Optional[dict[str, bytes]]  # {"png", "txt", "json"} for the tar; None when rejected
    reason: str  # the reject's reason ("" when kept)
    detail: str


@dataclass(frozen=True)
class WorkerContext:
    """What every worker needs to turn a record into a sample: the source and the output format."""
    source: Source
    size: int
    resize_mode: str
    bit_depth: int

    def process(self, item: tuple[Record, str]) -> Processed:
        """(record, its split) -> the sample or the reject. Never raises for a bad input."""
        record, split = item
        try:
            # fit lets a source decode a large JPEG at a reduced scale that still covers the output size
            loaded = self.source.load(record, fit=(self.size, self.resize_mode))
            original = list(original_shape(loaded)) if isinstance(loaded, np.ndarray) else None
            pixels = check_pixels(loaded, record.uid)
            original = original or list(pixels.shape)
            png = encode_png(resize_square(pixels, self.size, self.resize_mode), self.bit_depth)
        except RecordRejected as exc:
            return Processed(record.uid, None, exc.reason, exc.detail)
        except Exception as exc:  # a bad input must not stop the build; the reason names the failure
            return Processed(record.uid, None, "load_error", f"{type(exc).__name__}: {exc}")
        meta = {"uid": record.uid, "group": record.group, "split": split, "view": record.view,
                "labels": list(record.labels), "source": record.source, "source_path": record.source_path,
                "original_size": original, "size": self.size, "extra": record.extra}
        sample = {"png": png, "txt": record.prompt.encode("utf-8"),
                  "json": json_text(meta, sort_keys=True).encode("utf-8")}
        return Processed(record.uid, sample, "", "")


# A pool process's context, set once by the pool's initializer. Handing the context over with each chunk instead
# would pickle the source (with every reject its listing kept) again for every few images.
_POOL_CONTEXT: Optional[WorkerContext] = None


def _start_pool_process(context: WorkerContext) -> None:
    global _POOL_CONTEXT
    _POOL_CONTEXT = context


def _process_in_pool(item: tuple[Record, str]) -> Processed:
    return _POOL_CONTEXT.process(item)


@contextlib.contextmanager
def worker_pool(context: WorkerContext, workers: int) -> Iterator[Callable[[Sequence], Iterator[Processed]]]:
    """A function that turns (record, split) items into Processed results, in order, lazily."""
    if workers <= 1:
        yield lambda items: map(context.process, items)  # in-process: no pickling, no IPC, nothing extra
        return
    # fork starts in milliseconds, but a parent that has imported torch holds OpenMP threads a forked
    # child can deadlock on: then spawn (slower start, each worker imports numpy/PIL afresh).
    use_fork = "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods()
    start = multiprocessing.get_context("fork" if use_fork else "spawn")
    with start.Pool(workers, initializer=_start_pool_process, initargs=(context,)) as pool:
        yield lambda items: pool.imap(_process_in_pool, items, chunksize=max(1, min(16, len(items) // (workers * 8))))
