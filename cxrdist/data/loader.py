"""WebDataset loaders for training and evaluation, rank- and worker-aware.

Batch format (both loaders): a dict with
    pixel_values  float32 tensor B x channels x H x W in [-1, 1] (grayscale repeated when channels == 3)
    prompts       list[str], the report text as stored (no prompt template: the trainer applies it)
    meta          list[dict], the sample's JSON (uid, group, split, view, labels, source, original_size...)
    keys          list[str]
    latents       float32 tensor B x C x h x w, only when the shards carry `latents.npy`

How an epoch is split over the ranks. Every rank builds the same epoch-ordered shard list (shuffled by
(seed, epoch)) and counts samples along it with the per-shard counts of index.json. With data.rank_split =
"shards" (the default) rank r keeps the r-th of `world_size` equal, contiguous ranges of that sequence, so it
opens only the shards its range overlaps and reads about 1/world of the bytes (plus the head of at most one
shard it starts inside). With "samples" every rank reads every shard and keeps the positions that fall to it
(position % world_size): N ranks x batch b then see exactly the batches of one process with batch N*b, at N
times the reads. Either way every rank keeps the same number of samples and the train loader stops each rank
after exactly `batches_per_epoch` batches: `split_by_node` (whole shards per rank) would give ranks different
numbers of batches when shard counts or sizes do not divide evenly, and DDP hangs at the first collective of
the rank that still has data. Within a rank, DataLoader workers take positions round-robin, which is the order
DataLoader itself merges them back in, so the stream is the same for any `num_workers`. Only the kept samples
are decoded.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cxrdist.config import RANK_SPLITS
from cxrdist.data import storage
from cxrdist.data.imageio import to_model_range
from cxrdist.data.index import TEST_SPLIT, ShardIndex, load_index, verify_once
from cxrdist.data.tars import tar_samples
from cxrdist.errors import DataError

__all__ = ["train_loader", "eval_loader", "batches_per_epoch", "train_reports", "ShardLoader", "RANK_SPLITS"]


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


class Piece(NamedTuple):
    """Samples [first, end) of the shard at `path`, which holds `count` samples."""

    path: str
    first: int
    end: int
    count: int


def rank_pieces(shards: list[tuple[str, int]], start: int, stop: int) -> list[Piece]:
    """The parts of the shards that overlap positions [start, stop) of the sequence `shards` (path, count) spell
    out, in order. Shards outside the range are never opened."""
    pieces, offset = [], 0
    for path, count in shards:
        first, end = max(start - offset, 0), min(stop - offset, count)
        if first < end:
            pieces.append(Piece(path, first, end, count))
        offset += count
    return pieces


def shard_samples(piece: Piece, check: Optional[tuple[str, Optional[int]]] = None) -> Iterator[dict]:
    """The raw samples (webdataset dicts of member bytes) of one piece, streamed from wherever the shard lives.
    Reading stops at `piece.end`; `check` = (sha256, bytes) stops the stream at that size and hashes a shard read
    to its end (storage.open_checked)."""
    stream = storage.open_checked(piece.path, *check) if check is not None else storage.open_stream(piece.path)
    try:
        for key, parts in islice(tar_samples(stream, piece.path), piece.first, piece.end):
            yield {**parts, "__key__": key, "__url__": piece.path}
        if check is not None and piece.end == piece.count:
            stream.finish()
    finally:
        stream.close()


def _member(sample: dict, ext: str) -> bytes:
    """The sample's `ext` member; DataError naming the shard and the sample when it has none."""
    if ext not in sample:
        raise DataError(f"{sample.get('__url__')}: sample {storage.safe_text(sample['__key__'])} has no {ext} member: "
                        "the shard is damaged or not one of this set; rebuild the shard set")
    return sample[ext]


def _share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s range of `total` positions split into `world_size` contiguous parts whose sizes differ by at
    most 1, the larger ones first (as position % world_size would share them)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class _Stream:
    """One rank's view of an epoch: which parts of which shards, in which order, and which positions to keep."""

    pieces: list[Piece]  # what this rank reads, in order (rank_pieces)
    rank: int
    stride: int  # keep every stride-th sample read (world_size for rank_split="samples", else 1) ...
    offset: int  # ... starting at this one
    take: int  # rank-level samples to keep (after shuffling)
    skip: int  # rank-level samples dropped before decoding (resume inside an epoch)
    image_size: int
    channels: int
    shuffle_buffer: int = 0
    shuffle_seed: Optional[int] = None
    augment_seed: Optional[int] = None
    checks: dict[str, tuple[str, Optional[int]]] = field(default_factory=dict)  # remote path -> (sha256, bytes)


class _SampleStream(torch.utils.data.IterableDataset):
    """Decoded samples of one rank (and, inside DataLoader workers, of one worker), in the fixed order."""

    def __init__(self, stream: _Stream) -> None:
        super().__init__()
        self.stream = stream

    def _rank_raw(self) -> Iterator[dict]:
        s = self.stream
        position = 0
        for piece in s.pieces:
            for sample in shard_samples(piece, s.checks.get(piece.path)):
                if position % s.stride == s.offset:
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
            where = os.path.dirname(s.pieces[0].path) if s.pieces else "the shard set"
            raise DataError(f"shards in {where} hold fewer samples than index.json says: "
                            "check them with `cxrdist shard inspect --verify`")


def decode_sample(sample: dict, stream: _Stream, position: int) -> dict:
    key = sample["__key__"]
    png = _member(sample, "png")
    try:
        with Image.open(io.BytesIO(png)) as image:
            array = np.asarray(image)
    except Exception as exc:
        raise DataError(f"{sample.get('__url__')}: sample {storage.safe_text(key)} has an unreadable PNG "
                        f"({storage.safe_text(exc)}): "
                        "verify the shards with `cxrdist shard inspect --verify`") from None
    if array.shape != (stream.image_size, stream.image_size):
        raise DataError(f"{sample.get('__url__')}: sample {storage.safe_text(key)} is {array.shape}, expected "
                        f"{stream.image_size}x{stream.image_size}: rebuild the shards with --size {stream.image_size}")
    pixels = torch.from_numpy(to_model_range(array)).unsqueeze(0)
    if stream.augment_seed is not None:
        pixels = augment(pixels, torch.Generator().manual_seed(stream.augment_seed * 1_000_003 + position))
    if stream.channels == 3:
        pixels = pixels.expand(3, -1, -1).contiguous()
    try:
        prompt, meta = sample["txt"].decode("utf-8"), json.loads(sample["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataError(f"{sample.get('__url__')}: sample {storage.safe_text(key)} has no readable report or "
                        f"metadata ({type(exc).__name__}): verify the shards with `cxrdist shard inspect --verify`"
                        ) from None
    out = {"pixel_values": pixels, "prompt": prompt, "key": key, "meta": meta}
    if "latents.npy" in sample:
        out["latents"] = torch.from_numpy(_latents(sample))
    return out


def _latents(sample: dict) -> np.ndarray:
    """The sample's cached latents as float32. Never unpickled (a pickle in a shard would run code when loaded),
    and the header is checked against the bytes there are first: numpy allocates what the header claims."""
    data = sample["latents.npy"]
    try:
        buffer = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buffer)
        if dtype.kind not in "fiu":
            raise ValueError(f"dtype {dtype}, not numbers")
        if math.prod(shape) * dtype.itemsize > len(data) - buffer.tell():
            raise ValueError(f"its header claims {shape} {dtype}, more than the bytes it has")
        return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{sample.get('__url__')}: sample {storage.safe_text(sample['__key__'])} has unreadable "
                        f"latents ({storage.safe_text(exc)}): rebuild the latents with `cxrdist shard cache-latents`"
                        ) from None


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


def _check_request(index: ShardIndex, image_size: int, channels: int, rank: int, world_size: int) -> None:
    index.check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}: set the model's in_channels accordingly")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")


def _checks(index: ShardIndex, splits: list[str], pieces: list[Piece]) -> dict[str, tuple[str, Optional[int]]]:
    """Check the shards this rank opens, not every shard of the split: local ones are hashed up front (each once
    per process); remote ones are returned as path -> (sha256, bytes), to be hashed as they stream in."""
    mine = {piece.path for piece in pieces}
    if not index.remote:
        verify_once(index, splits, only=mine)
        return {}
    return {e["path"]: (e["sha256"], e.get("bytes")) for e in index.shards(splits) if e["path"] in mine}


def train_loader(shards_dir, fold: int, *, batch_size: int, image_size: int, channels: int = 1, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 256, max_samples: int = 0, augment: bool = False,
                 start_batch: int = 0, rank_split: str = "shards") -> ShardLoader:
    """Shuffled batches of every fold except `fold`; exactly batches_per_epoch(...) batches on every rank.
    `rank_split` is how the epoch is shared out (module docstring): "shards" or "samples"."""
    if rank_split not in RANK_SPLITS:
        raise DataError(f"data.rank_split={rank_split!r}: use one of {', '.join(RANK_SPLITS)}")
    index = load_index(shards_dir)
    splits = _train_splits(index, fold)
    _check_request(index, image_size, channels, rank, world_size)
    total = _train_count(index, fold, max_samples)
    n_batches = total // world_size // batch_size
    if n_batches == 0:
        raise DataError(f"{index.root}: the training folds (all but fold {fold}) hold {total} samples, fewer than "
                        f"batch_size x world_size = {batch_size * world_size}: lower train.batch_size or raise "
                        "data.max_train_samples")
    shards = _capped_shards(index, splits, max_samples)
    order_seed = (seed * 1_000_003 + epoch) & 0xFFFFFFFF
    random.Random(order_seed).shuffle(shards)  # same on all ranks: the rank ranges stay disjoint
    if rank_split == "samples":
        pieces, stride, offset = rank_pieces(shards, 0, total), world_size, rank
    else:
        per_rank = total // world_size
        pieces, stride, offset = rank_pieces(shards, rank * per_rank, (rank + 1) * per_rank), 1, 0
    start_batch = min(max(0, start_batch), n_batches)
    stream = _Stream(pieces=pieces, checks=_checks(index, splits, pieces), rank=rank, stride=stride, offset=offset,
                     take=n_batches * batch_size, skip=start_batch * batch_size, image_size=image_size,
                     channels=channels, shuffle_buffer=shuffle_buffer,
                     shuffle_seed=(order_seed * 65_537 + rank) & 0xFFFFFFFF,
                     augment_seed=((order_seed * 31 + rank) & 0xFFFFFFFF) if augment else None)
    return ShardLoader(stream, batch_size, num_workers, n_batches - start_batch, drop_last=True)


def train_reports(shards_dir, fold: int, *, max_samples: int = 0, rank: int = 0, world_size: int = 1) -> list[str]:
    """The reports of rank `rank`'s contiguous 1/world of the training samples (all folds but `fold`, capped as
    the train loader caps them), in shard order, so the ranks' lists concatenated in rank order are the whole
    split's. Each rank opens only the shards of its share; only the text members are decoded."""
    index = load_index(shards_dir)
    splits = _train_splits(index, fold)
    shards = _capped_shards(index, splits, max_samples)
    pieces = rank_pieces(shards, *_share(sum(count for _, count in shards), rank, world_size))
    checks = _checks(index, splits, pieces)
    try:
        return [_member(sample, "txt").decode("utf-8")
                for piece in pieces for sample in shard_samples(piece, checks.get(piece.path))]
    except UnicodeDecodeError:
        raise DataError(f"{index.root}: a report in the training folds is not UTF-8 text: verify the shards with "
                        "`cxrdist shard inspect --verify`") from None


def eval_loader(shards_dir, split: str, *, batch_size: int, image_size: int, channels: int = 1, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, max_samples: int = 0) -> ShardLoader:
    """`split` is "test" or "fold<k>" (an int k also works). Fixed order; each sample on exactly one rank:
    rank r reads the r-th of `world_size` contiguous ranges of the split, so only the shards that range overlaps.

    Ranks may get different counts (they differ by at most one sample, so by at most one batch): gather
    results with padding, or all_gather_object, not a fixed-shape collective.
    """
    index = load_index(shards_dir)
    if isinstance(split, int) or str(split).isdigit():
        split = index.check_fold(int(split))
    elif split != TEST_SPLIT and split.startswith("fold") and split[4:].isdigit():
        index.check_fold(int(split[4:]))
    index.check_split(split)
    _check_request(index, image_size, channels, rank, world_size)
    shards = _capped_shards(index, [split], max_samples)
    start, stop = _share(sum(count for _, count in shards), rank, world_size)
    pieces = rank_pieces(shards, start, stop)
    stream = _Stream(pieces=pieces, checks=_checks(index, [split], pieces), rank=rank, stride=1, offset=0,
                     take=stop - start, skip=0, image_size=image_size, channels=channels)
    return ShardLoader(stream, batch_size, num_workers, math.ceil((stop - start) / batch_size), drop_last=False)


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
