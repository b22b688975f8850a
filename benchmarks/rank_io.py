"""Bytes each rank reads in one training epoch, for 1, 2, 4 and 8 ranks: data.rank_split=shards (each rank its
own contiguous 1/world of the epoch's shards) against "samples" (every rank reads every shard and keeps every
world-th sample), side by side in one run.

    python benchmarks/rank_io.py [--shards DIR] [--n 2000] [--shard-size 50] [--worlds 1 2 4 8] [--epoch 0]

Ranks are simulated one after the other in this process: each builds its `train_loader` for the epoch and is
drained, while every shard stream (cxrdist.data.storage.open_stream) and every checksum pass counts the bytes it
reads. The checksum cache is cleared between ranks, as each rank is its own process in a real run. The target
for "shards" is at most dataset/world + one shard per rank (the head of the shard a rank starts inside).
Without --shards a phantom shard set of --n studies is built in a temporary folder first.
"""
from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from cxrdist.data import index as index_module
from cxrdist.data import loader, storage

READ: Counter = Counter()


class Counting:
    """A stream that adds what is read from it to READ[kind]."""

    def __init__(self, stream, kind: str):
        self.stream, self.kind = stream, kind

    def read(self, n: int = -1) -> bytes:
        block = self.stream.read(n)
        READ[self.kind] += len(block)
        return block

    def close(self) -> None:
        self.stream.close()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def install_counters() -> None:
    open_stream, sha256_file = storage.open_stream, index_module.sha256_file

    def counted_open(location: str):
        return Counting(open_stream(location), "stream")

    def counted_sha256(path):
        READ["checksum"] += Path(path).stat().st_size
        return sha256_file(path)

    storage.open_stream = counted_open
    index_module.sha256_file = counted_sha256


def rank_bytes(shards: str, fold: int, world: int, rank: int, rank_split: str, epoch: int) -> tuple[int, int]:
    READ.clear()
    index_module._VERIFIED.clear()  # a real rank is its own process: it checks its shards itself
    batches = loader.train_loader(shards, fold, batch_size=8, image_size=loader.load_index(shards).image_size,
                                  rank=rank, world_size=world, epoch=epoch, rank_split=rank_split)
    for _ in batches:
        pass
    return READ["stream"], READ["checksum"]


def build_phantoms(n: int, shard_size: int, where: Path) -> str:
    from cxrdist.data.shard import build_shards
    from cxrdist.data.sources import source_class

    out = where / "phantom"
    build_shards(source_class("phantom")(n=n, size=64, seed=0), out, size=64, folds=5, test_fraction=0.1, seed=0,
                 shard_size=shard_size, workers=2, progress=False)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="a shard set (default: build phantoms in a temporary folder)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_phantoms(args.n, args.shard_size, Path(tmp))
        index = loader.load_index(shards)
        entries = index.shards([s for s in index.fold_names if s != index.check_fold(args.fold)])
        dataset, largest = sum(e["bytes"] for e in entries), max(e["bytes"] for e in entries)
        print(f"training split of {shards}: {len(entries)} shards, {dataset / 2**20:.1f} MiB, largest shard "
              f"{largest / 2**20:.2f} MiB; epoch {args.epoch}")
        install_counters()
        print(f"{'world':>5}  {'target/rank':>11}  {'shards: stream':>14}  {'x target':>8}  {'checksums':>9}  "
              f"{'samples: stream':>15}  {'checksums':>9}  {'samples/shards':>14}")
        for world in args.worlds:
            worst = {}
            for mode in loader.RANK_SPLITS:
                reads = [rank_bytes(shards, args.fold, world, r, mode, args.epoch) for r in range(world)]
                worst[mode] = (max(r[0] for r in reads), max(r[1] for r in reads))
            target = dataset / world + largest
            (stream, checks), (every, every_checks) = worst["shards"], worst["samples"]
            print(f"{world:>5}  {mib(target):>11}  {mib(stream):>14}  {stream / target:>8.2f}  {mib(checks):>9}  "
                  f"{mib(every):>15}  {mib(every_checks):>9}  {every / stream:>13.2f}x")
        print("MiB of the worst rank. stream: tar bytes read for training, every epoch. checksums: sha256 of the "
              "shards the rank opens, once per process (the first epoch it opens them).")


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"

if __name__ == "__main__":
    main()
