"""WebDataset loaders for training and evaluation, rank- and worker-aware.

Batch format (both loaders): a dict with
    pixel_values  float32 tensor B x channels x H x W in [-1, 1] (grayscale repeated when channels == 3)
    prompts       list[str], the report text as stored (no prompt template: the trainer applies it)
    meta          list[dict], the sample's JSON (uid, group, split, view, labels, source, original_size...)
    keys          list[str]
    latents       float32 tensor B x C x h x w, only when the shards carry `latents.npy`

How samples are split, and why not at shard level: `split_by_node` gives each rank whole shards, so when
shard counts (or sizes) do not divide evenly, ranks get different numbers of batches and DDP hangs at the
first collective of the rank that still has data. Here every reader walks the same epoch-ordered shard list,
keeps the samples whose global position falls to its rank (position % world_size), and the train loader
stops each rank after exactly `batches_per_epoch` batches. Within a rank, DataLoader workers take positions
round-robin, which is the order DataLoader itself merges them back in, so the stream is the same for any
`num_workers`. Raw tar bytes are cheap to read; only the kept samples are decoded.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cxrdist.data.imageio import to_model_range
from cxrdist.data.index import TEST_SPLIT, ShardIndex, load_index, verify_once
from cxrdist.errors import DataError

__all__ = ["train_loader", "eval_loader", "batches_per_epoch", "train_reports", "ShardLoader"]


def _train_splits(index: ShardIndex, fold: int) -> list[str]:
    held_out = index.check_fold(fold)
    if index.folds < 2:
        raise DataError(f"{index.root} has {index.folds} fold: training with a held-out fold needs >= 2; "
                        "rebuild with --folds 5")
    return [name for name in index.fold_names if name != held_out]


def _capped_shards(index: ShardIndex, splits: list[str], max_samples: int) -> list[tuple[str, int]]:
    """(path, samples to read) per non-empty shard, in index order; max_samples keeps the first N overall."""
    out, left = [], max_samples if max_samples > 0 else math.inf
    for entry in index.shards(splits):
        take = int(min(entry["count"], left))
        if take > 0:
            out.append((entry["path"], take))
        left -= take
    return out


def _train_count(index: ShardIndex, fold: int, max_samples: int) -> int:
    total = index.count(_train_splits(index, fold))
    return min(total, max_samples) if max_samples > 0 else total


def batches_per_epoch(shards_dir, fold: int, *, batch_size: int, world_size: int = 1, max_samples: int = 0) -> int:
    """Batches every rank yields per epoch of `train_loader` (drop_last; identical on all ranks)."""
    index = load_index(shards_dir)
    return _train_count(index, fold, max_samples) // max(1, world_size) // batch_size


@dataclass
class _Stream:
    """One rank's view of an epoch: which shards, in which order, and which positions to keep."""

    shards: list[tuple[str, int]]
    rank: int
    world_size: int
    take: int  # rank-level samples to keep (after shuffling)
    skip: int  # rank-level samples dropped before decoding (resume inside an epoch)
    image_size: int
    channels: int
    shuffle_buffer: int = 0
    shuffle_seed: Optional[int] = None
    augment_seed: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


class _SampleStream(torch.utils.data.IterableDataset):
    """Decoded samples of one rank (and, inside DataLoader workers, of one worker), in the fixed order."""

    def __init__(self, stream: _Stream) -> None:
        super().__init__()
        self.stream = stream

    def _rank_raw(self) -> Iterator[dict]:
        s = self.stream
        position = 0
        read = wds.tarfile_to_samples()
        for path, count in s.shards:
            for sample in islice(read(iter([{"url": path}])), count):
                if position % s.world_size == s.rank:
                    yield sample
                position += 1

    def __iter__(self) -> Iterator[dict]:
        s = self.stream
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        raw: Iterator[dict] = self._rank_raw()
        if s.shuffle_seed is not None and s.shuffle_buffer > 1:
            # the same seed in every worker of a rank, so all of them agree on the shuffled order
            raw = wds.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=random.Random(s.shuffle_seed))(raw)
        kept = 0
        for position, sample in enumerate(raw):
            if position >= s.take:
                break
            kept = position + 1
            if position < s.skip or (position - s.skip) % workers != worker:
                continue
            yield decode_sample(sample, s, position)
        if kept < s.take:
            where = os.path.dirname(s.shards[0][0]) if s.shards else "the shard set"
            raise DataError(f"shards in {where} hold fewer samples than index.json says: "
                            "check them with `cxrdist shard inspect --verify`")


def decode_sample(sample: dict, stream: _Stream, position: int) -> dict:
    key = sample["__key__"]
    try:
        with Image.open(io.BytesIO(sample["png"])) as image:
            array = np.asarray(image)
    except Exception as exc:
        raise DataError(f"{sample.get('__url__')}: sample {key} has an unreadable PNG ({exc}): "
                        "verify the shards with `cxrdist shard inspect --verify`") from None
    if array.shape != (stream.image_size, stream.image_size):
        raise DataError(f"{sample.get('__url__')}: sample {key} is {array.shape}, expected "
                        f"{stream.image_size}x{stream.image_size}: rebuild the shards with --size {stream.image_size}")
    pixels = torch.from_numpy(to_model_range(array)).unsqueeze(0)
    if stream.augment_seed is not None:
        pixels = augment(pixels, torch.Generator().manual_seed(stream.augment_seed * 1_000_003 + position))
    if stream.channels == 3:
        pixels = pixels.expand(3, -1, -1).contiguous()
    out = {"pixel_values": pixels, "prompt": sample["txt"].decode("utf-8"), "key": key,
           "meta": json.loads(sample["json"].decode("utf-8"))}
    if "latents.npy" in sample:
        out["latents"] = torch.from_numpy(np.load(io.BytesIO(sample["latents.npy"])).astype(np.float32))
    return out


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild rotation (+-3 deg), zoom/shift (+-4 %) and contrast/brightness jitter. Never a flip: a
    mirrored chest film shows dextrocardia, a different anatomy."""
    u = torch.rand(6, generator=generator) * 2 - 1
    angle, zoom, dx, dy = u[0] * math.radians(3.0), 1.0 + 0.04 * u[1], 0.04 * u[2], 0.04 * u[3]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, dx], [sin, cos, dy]], dtype=torch.float32).unsqueeze(0)
    grid = torch.nn.functional.affine_grid(theta, [1, *pixels.shape], align_corners=False)
    unit = (pixels.unsqueeze(0) + 1) / 2  # pad with black (0 in [0, 1]) like the shard builder's letterbox
    unit = torch.nn.functional.grid_sample(unit, grid, padding_mode="zeros", align_corners=False)[0]
    unit = ((unit - 0.5) * (1.0 + 0.1 * u[4]) + 0.5 + 0.05 * u[5]).clamp_(0, 1)
    return unit * 2 - 1


def collate(samples: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
             "prompts": [s["prompt"] for s in samples], "meta": [s["meta"] for s in samples],
             "keys": [s["key"] for s in samples]}
    if all("latents" in s for s in samples):
        batch["latents"] = torch.stack([s["latents"] for s in samples])
    return batch


class ShardLoader:
    """Iterable of batches; len() = batches this rank yields (exact for train, per-rank for eval)."""

    def __init__(self, stream: _Stream, batch_size: int, num_workers: int, n_batches: int, drop_last: bool):
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.n_batches, self.drop_last = n_batches, drop_last

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict]:
        dataset = _SampleStream(self.stream)
        if self.num_workers > 0:
            samples = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers))
        else:
            samples = iter(dataset)
        yield from wds.batched(self.batch_size, collation_fn=collate, partial=not self.drop_last)(samples)


def _open(shards_dir, splits: list[str], index: ShardIndex, image_size: int, channels: int) -> None:
    index.check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}: set the model's in_channels accordingly")
    verify_once(index, splits)


def train_loader(shards_dir, fold: int, *, batch_size: int, image_size: int, channels: int = 1, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 256, max_samples: int = 0, augment: bool = False,
                 start_batch: int = 0) -> ShardLoader:
    """Shuffled batches of every fold except `fold`; exactly batches_per_epoch(...) batches on every rank."""
    index = load_index(shards_dir)
    splits = _train_splits(index, fold)
    _open(shards_dir, splits, index, image_size, channels)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    n_batches = _train_count(index, fold, max_samples) // world_size // batch_size
    if n_batches == 0:
        raise DataError(f"{index.root}: the training folds (all but fold {fold}) hold "
                        f"{_train_count(index, fold, max_samples)} samples, fewer than batch_size x world_size = "
                        f"{batch_size * world_size}: lower train.batch_size or raise data.max_train_samples")
    shards = _capped_shards(index, splits, max_samples)
    order_seed = (seed * 1_000_003 + epoch) & 0xFFFFFFFF
    random.Random(order_seed).shuffle(shards)  # same on all ranks: the position split stays disjoint
    start_batch = min(max(0, start_batch), n_batches)
    stream = _Stream(shards=shards, rank=rank, world_size=world_size, take=n_batches * batch_size,
                     skip=start_batch * batch_size, image_size=image_size, channels=channels,
                     shuffle_buffer=shuffle_buffer,
                     shuffle_seed=(order_seed * 65_537 + rank) & 0xFFFFFFFF,
                     augment_seed=((order_seed * 31 + rank) & 0xFFFFFFFF) if augment else None)
    return ShardLoader(stream, batch_size, num_workers, n_batches - start_batch, drop_last=True)


def train_reports(shards_dir, fold: int, *, max_samples: int = 0) -> list[str]:
    """The report of every training sample (all folds but `fold`, capped as the train loader caps them), in shard
    order; only the text members are decoded."""
    index = load_index(shards_dir)
    splits = _train_splits(index, fold)
    verify_once(index, splits)
    read = wds.tarfile_to_samples()
    return [sample["txt"].decode("utf-8") for path, count in _capped_shards(index, splits, max_samples)
            for sample in islice(read(iter([{"url": path}])), count)]


def eval_loader(shards_dir, split: str, *, batch_size: int, image_size: int, channels: int = 1, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, max_samples: int = 0) -> ShardLoader:
    """`split` is "test" or "fold<k>" (an int k also works). Fixed order; each sample on exactly one rank.

    Ranks may get different counts (they differ by at most one sample, so by at most one batch): gather
    results with padding, or all_gather_object, not a fixed-shape collective.
    """
    index = load_index(shards_dir)
    if isinstance(split, int) or str(split).isdigit():
        split = index.check_fold(int(split))
    elif split != TEST_SPLIT and split.startswith("fold") and split[4:].isdigit():
        index.check_fold(int(split[4:]))
    index.check_split(split)
    _open(shards_dir, [split], index, image_size, channels)
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    shards = _capped_shards(index, [split], max_samples)
    total = sum(count for _, count in shards)
    mine = len(range(rank, total, world_size))
    stream = _Stream(shards=shards, rank=rank, world_size=world_size, take=mine, skip=0,
                     image_size=image_size, channels=channels)
    return ShardLoader(stream, batch_size, num_workers, math.ceil(mine / batch_size), drop_last=False)


@dataclass
class SplitImages:
    """The images of (part of) a split as references for generated ones: what validation and evaluation score."""

    reports: list[str]
    references: np.ndarray  # N x H x W float32 in [0, 1], grayscale
    labels: list[list[str]]  # per sample; [] where the shard has none


def read_split_images(batches) -> SplitImages | None:
    """Collect loader batches into SplitImages (channels averaged, [-1, 1] -> [0, 1]); None when there are none."""
    reports, refs, labels = [], [], []
    for batch in batches:
        pixels = torch.as_tensor(batch["pixel_values"]).float()
        refs.append(((pixels.mean(dim=1) + 1.0) / 2.0).clamp(0, 1).numpy())
        reports.extend(batch["prompts"])
        labels.extend(list(m.get("labels") or []) for m in batch.get("meta", [{}] * len(batch["prompts"])))
    if not reports:
        return None
    return SplitImages(reports, np.concatenate(refs).astype(np.float32), labels)
