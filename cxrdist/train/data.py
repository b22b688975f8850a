"""What the trainer needs from a shard set, behind one small interface (`TrainData`).

`ShardData` adapts `cxrdist.data.loader` (rank-aware WebDataset pipelines): every rank gets the same number
of training batches per epoch, the order is a pure function of (seed, epoch), and `start_batch` resumes
mid-epoch. Tests can pass any object with the members of `TrainData`.
"""
from __future__ import annotations

import logging
from typing import Iterable, Protocol

from cxrdist.config import Config
from cxrdist.errors import DataError

log = logging.getLogger(__name__)


class TrainData(Protocol):
    val_split: str
    shards_dir: str | None  # where cached latents would be; None for data that does not come from shards

    def batches_per_epoch(self) -> int: ...

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterable[dict]: ...

    def eval_batches(self, split: str) -> Iterable[dict]: ...

    def first_samples(self, split: str, n: int) -> Iterable[dict]: ...

    def train_reports(self) -> list[str]: ...

    def training_splits(self) -> list[str]: ...


class ShardData:
    """A shard set seen from one rank: fold `fold` held out for validation, the rest for training."""

    def __init__(self, cfg: Config, fold: int, *, channels: int, rank: int = 0, world_size: int = 1,
                 eval_batch_size: int = 0):
        from cxrdist.data.index import load_index

        self.cfg, self.fold, self.channels = cfg, fold, channels
        self.rank, self.world_size = rank, world_size
        self.eval_batch_size = eval_batch_size or cfg.train.batch_size
        self.shards_dir = cfg.data.shards
        self.index = load_index(cfg.data.shards)
        self.val_split = check_shards(self.index, cfg, fold, channels)

    def batches_per_epoch(self) -> int:
        from cxrdist.data.loader import batches_per_epoch

        return batches_per_epoch(self.cfg.data.shards, self.fold, batch_size=self.cfg.train.batch_size,
                                 world_size=self.world_size, max_samples=self.cfg.data.max_train_samples)

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterable[dict]:
        from cxrdist.data.loader import train_loader

        d, t = self.cfg.data, self.cfg.train
        return train_loader(d.shards, self.fold, batch_size=t.batch_size, image_size=d.image_size,
                            channels=self.channels, seed=t.seed, epoch=epoch, rank=self.rank,
                            world_size=self.world_size, num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                            max_samples=d.max_train_samples, augment=d.augment, start_batch=start_batch,
                            rank_split=d.rank_split)

    def eval_batches(self, split: str) -> Iterable[dict]:
        from cxrdist.data.loader import eval_loader

        return eval_loader(self.cfg.data.shards, split, batch_size=self.eval_batch_size,
                           image_size=self.cfg.data.image_size, channels=self.channels, rank=self.rank,
                           world_size=self.world_size, num_workers=self.cfg.data.num_workers,
                           max_samples=self.cfg.eval.max_eval_samples)  # first N of the split, then per rank

    def train_reports(self) -> list[str]:
        """This rank's contiguous share of the training reports (as stored, no template), in shard order: the
        ranks' shares gathered in rank order are what the frozen-text cache is filled with."""
        from cxrdist.data.loader import train_reports

        return train_reports(self.cfg.data.shards, self.fold, max_samples=self.cfg.data.max_train_samples,
                             rank=self.rank, world_size=self.world_size)

    def training_splits(self) -> list[str]:
        """The folds this run trains on: every fold but the held-out one."""
        return [s for s in self.index.fold_names if s != self.val_split]

    def first_samples(self, split: str, n: int) -> Iterable[dict]:
        """The same first `n` samples of a split every time, read by one process (image metrics, grids)."""
        from cxrdist.data.loader import eval_loader

        return eval_loader(self.cfg.data.shards, split, batch_size=max(1, n), image_size=self.cfg.data.image_size,
                           channels=self.channels, rank=0, world_size=1, num_workers=0, max_samples=n)


def check_shards(index, cfg: Config, fold: int, channels: int) -> str:
    """Fold in range, image size as configured, channels the model can take; returns the validation split."""
    if cfg.eval.k_folds and index.folds != cfg.eval.k_folds:
        raise DataError(f"{index.root} is split into {index.folds} folds but eval.k_folds={cfg.eval.k_folds}: "
                        f"set eval.k_folds={index.folds} (or 0 to take the shard set's), or rebuild the shards "
                        f"with --folds {cfg.eval.k_folds}")
    split = index.check_fold(fold)
    index.check_image_size(cfg.data.image_size)
    # Grayscale shards feed a 1-channel VAE directly or are replicated for an RGB one.
    if channels != index.channels and not (index.channels == 1 and channels == 3):
        raise DataError(f"{index.root} holds {index.channels}-channel images but the model's VAE takes {channels}: "
                        "rebuild the shards for this model or choose a matching --pretrained")
    if "test" not in index.splits:
        raise DataError(f"{index.root} has no 'test' split: rebuild the shard set with a test fraction > 0")
    return split
