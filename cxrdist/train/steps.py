"""Training steps outside `Trainer.fit`: for the benchmarks, which time the trainer's own step on its own data, and the
tests, which check what a number of steps did. Neither evaluates, checkpoints nor logs, as fit does.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterator

from cxrdist.train.data import TrainData


def endless_batches(data: TrainData, epoch: int = 0) -> Iterator[dict]:
    """The training batches of `data`, epoch after epoch from `epoch` on (a shard set is sized for one epoch; a
    step count past it only costs data time)."""
    for e in itertools.count(epoch):
        yield from data.train_batches(e)


def optimizer_steps(trainer: Any, n: int) -> Iterator[dict[str, Any]]:
    """`n` optimizer steps of `trainer` (a cxrdist.train.trainer.Trainer): micro-steps of `trainer.train_step` over
    its training batches from epoch 0 on, micro-steps numbered from 0. Yields the output of each micro-step whose
    optimizer step happened (`stepped`), right after it: a step skipped for an inf/NaN loss or a gradient overflow
    does not count."""
    taken = 0
    if n <= 0:
        return
    for micro, batch in enumerate(endless_batches(trainer.data)):
        out = trainer.train_step(batch, micro)
        if out["stepped"]:
            yield out
            taken += 1
            if taken == n:
                return
